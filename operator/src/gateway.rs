//! Reading the gateway pods' `/status` (docs/interfaces.md): a plain HTTP/1.1 GET over a tokio
//! TcpStream with `Connection: close`, bounded in time and size.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The document is typed once, in `partnergate_core::status`, for both sides.
pub use partnergate_core::status::{GatewayStatus, StatusConnector, StatusValidation};

/// One ready gateway pod and what its `/status` said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodReport {
    pub name: String,
    pub ip: String,
    pub status: Result<GatewayStatus, String>,
}

/// All ready gateway pods at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GatewaySnapshot {
    pub pods: Vec<PodReport>,
}

/// A pod counts when it is Ready, has a pod IP and is not terminating.
pub fn ready_pod_ip(pod: &Pod) -> Option<String> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref()?;
    let ready = status
        .conditions
        .as_ref()?
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    if !ready {
        return None;
    }
    status.pod_ip.clone().filter(|ip| !ip.is_empty())
}

const MAX_BODY: usize = 8 * 1024 * 1024;

/// GET http://ip:port/path; the body of a 200 response.
pub async fn http_get(
    ip: &str,
    port: u16,
    path: &str,
    timeout: Duration,
) -> Result<Vec<u8>, String> {
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_string()
    };
    let fut = async {
        let mut tcp = TcpStream::connect((ip, port))
            .await
            .map_err(|e| format!("connect {host}:{port}: {e}"))?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: partnergate-operator\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
        );
        tcp.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let n = tcp
                .read(&mut chunk)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.len() > MAX_BODY {
                return Err("response too large".to_string());
            }
        }
        parse_response(&buf)
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| format!("GET {host}:{port}{path} timed out"))?
}

fn parse_response(buf: &[u8]) -> Result<Vec<u8>, String> {
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("malformed HTTP response")?;
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| "malformed HTTP response head")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let code = status_line.split_whitespace().nth(1).unwrap_or_default();
    if code != "200" {
        return Err(format!("HTTP {status_line}"));
    }
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = &buf[end + 4..];
    if chunked {
        dechunk(body)
    } else {
        Ok(body.to_vec())
    }
}

fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("bad chunk")?;
        let size_str = std::str::from_utf8(&body[..line_end]).map_err(|_| "bad chunk")?;
        let size = usize::from_str_radix(size_str.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| "bad chunk size")?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if body.len() < size + 2 {
            return Err("truncated chunk".into());
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

/// Reads one pod's `/status`, its `connectors` sorted by name (what
/// [`crate::conditions::programming`] binary-searches: it runs for every connector on every
/// "reconcile all", and a scan was connectors² per round).
pub async fn fetch_status(ip: &str, port: u16, timeout: Duration) -> Result<GatewayStatus, String> {
    let body = http_get(ip, port, "/status", timeout).await?;
    let mut status: GatewayStatus = serde_json::from_slice(&body)
        .map_err(|e| format!("/status is not the expected JSON: {e}"))?;
    status.connectors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(status)
}

/// Reads every pod's `/status` concurrently. `pods` is (name, ip).
pub async fn snapshot(
    pods: Vec<(String, String)>,
    port: u16,
    timeout: Duration,
) -> GatewaySnapshot {
    let futs = pods.into_iter().map(|(name, ip)| async move {
        let status = fetch_status(&ip, port, timeout).await;
        PodReport { name, ip, status }
    });
    let mut pods = futures::future::join_all(futs).await;
    pods.sort_by(|a, b| a.name.cmp(&b.name));
    GatewaySnapshot { pods }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn serve_once(resp: &'static str) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            if let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(resp.as_bytes()).await;
            }
        });
        port
    }

    #[tokio::test]
    async fn reads_status() {
        let port = serve_once("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{\"configHash\":\"abc\",\"connectors\":[{\"name\":\"mail/c\",\"direction\":\"Inbound\",\"generation\":3},{\"name\":\"mail/b\",\"direction\":\"Outbound\",\"generation\":1}],\"extra\":1}\n").await;
        let st = fetch_status("127.0.0.1", port, Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(st.config_hash, "abc");
        let names: Vec<&str> = st.connectors.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["mail/b", "mail/c"], "sorted by name");
        assert_eq!(st.connectors[1].generation, 3);
    }

    #[tokio::test]
    async fn chunked_and_errors() {
        let port = serve_once("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"con\r\n1e\r\nfigHash\":\"x\",\"connectors\":[]}\n\r\n0\r\n\r\n").await;
        let st = fetch_status("127.0.0.1", port, Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(st.config_hash, "x");
        let port = serve_once("HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
        assert!(
            fetch_status("127.0.0.1", port, Duration::from_secs(2))
                .await
                .unwrap_err()
                .contains("503")
        );
        // nothing listening
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        assert!(
            fetch_status("127.0.0.1", port, Duration::from_secs(2))
                .await
                .is_err()
        );
    }
}
