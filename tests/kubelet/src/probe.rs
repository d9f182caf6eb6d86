//! Readiness probes against the pod IP: httpGet (HTTP; HTTPS degrades to a TCP connect) and
//! tcpSocket. exec and grpc probes are not run (treated as TCP connect for grpc, success for
//! exec, with a warning from the caller).

use std::net::SocketAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

fn resolve_port(container: &Container, port: &IntOrString) -> Result<u16, String> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).map_err(|_| format!("invalid port {p}")),
        IntOrString::String(name) => {
            if let Ok(p) = name.parse::<u16>() {
                return Ok(p);
            }
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok())
                .ok_or_else(|| format!("named port {name:?} not found in the container"))
        }
    }
}

/// Runs the probe once. `Ok(())` = success, `Err(message)` = failure.
pub async fn run(probe: &Probe, container: &Container, pod_ip: &str) -> Result<(), String> {
    let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1) as u64);
    if let Some(h) = &probe.http_get {
        let port = resolve_port(container, &h.port)?;
        let host = h.host.clone().unwrap_or_else(|| pod_ip.to_string());
        let path = h.path.clone().unwrap_or_else(|| "/".to_string());
        let https = h
            .scheme
            .as_deref()
            .is_some_and(|s| s.eq_ignore_ascii_case("HTTPS"));
        let addr: SocketAddr = format!("{host}:{port}")
            .parse()
            .map_err(|e| format!("bad probe address {host}:{port}: {e}"))?;
        let fut = async {
            let mut s = TcpStream::connect(addr)
                .await
                .map_err(|e| format!("Get \"http://{addr}{path}\": {e}"))?;
            if https {
                return Ok(());
            }
            let mut req = format!(
                "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kube-probe/process-kubelet\r\nAccept: */*\r\nConnection: close\r\n"
            );
            for hd in h.http_headers.iter().flatten() {
                req.push_str(&format!("{}: {}\r\n", hd.name, hd.value));
            }
            req.push_str("\r\n");
            s.write_all(req.as_bytes())
                .await
                .map_err(|e| format!("write: {e}"))?;
            let mut buf = Vec::with_capacity(256);
            let mut chunk = [0u8; 256];
            while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < 4096 {
                let n = s.read(&mut chunk).await.map_err(|e| format!("read: {e}"))?;
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let line = String::from_utf8_lossy(&buf);
            let code: u16 = line
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| format!("malformed HTTP response from {addr}{path}"))?;
            if (200..400).contains(&code) {
                Ok(())
            } else {
                Err(format!("HTTP probe failed with statuscode: {code}"))
            }
        };
        return tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| format!("Get \"http://{addr}{path}\": timeout after {timeout:?}"))?;
    }
    let tcp_port = probe
        .tcp_socket
        .as_ref()
        .map(|t| (t.host.clone(), resolve_port(container, &t.port)))
        .or_else(|| {
            probe.grpc.as_ref().map(|g| {
                (
                    None,
                    u16::try_from(g.port).map_err(|_| format!("invalid port {}", g.port)),
                )
            })
        });
    if let Some((host, port)) = tcp_port {
        let port = port?;
        let host = host.unwrap_or_else(|| pod_ip.to_string());
        let addr = format!("{host}:{port}");
        return match tokio::time::timeout(timeout, TcpStream::connect(&addr)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("dial tcp {addr}: {e}")),
            Err(_) => Err(format!("dial tcp {addr}: timeout")),
        };
    }
    // exec probes are not supported by the process kubelet
    Ok(())
}
