//! A private HAProxy (Debian's package) in TCP mode in front of the gateway, as a load balancer
//! with `send-proxy-v2` would be: its own config file in a tempdir, run in the foreground
//! (`-db`, never the system service), listening on one loopback address of the test's block
//! and connecting to the gateway from another (`source`), so the gateway can trust exactly that
//! address. Killed when dropped; its output is printed if the test failed.
//!
//! Also [`proxy_v2_header`], the header a proxy sends, for tests that play the proxy themselves.

use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tempfile::TempDir;

use super::net::free_port;
use super::{require_tool, wait_for};

pub struct Haproxy {
    child: Child,
    _dir: TempDir,
    /// Where clients connect.
    pub addr: SocketAddr,
    /// The address HAProxy connects to the gateway from.
    logs: Arc<Mutex<Vec<String>>>,
}

impl Haproxy {
    /// Starts HAProxy listening on `listen_ip` (a free port), forwarding every connection to
    /// `backend` from `source` with a PROXY v2 header. Waits (guard 20 s) until it listens;
    /// `probe_from` is the client address of that one probe connection.
    pub fn start(
        listen_ip: Ipv4Addr,
        source: Ipv4Addr,
        backend: SocketAddr,
        probe_from: Ipv4Addr,
    ) -> Haproxy {
        let bin = require_tool("haproxy");
        let dir = tempfile::Builder::new()
            .prefix("pg-haproxy-")
            .tempdir()
            .expect("tempdir");
        let addr = SocketAddr::from((listen_ip, free_port(listen_ip)));
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "global\n\
                 \tmaxconn 500\n\
                 \tlog stderr format raw local0 info\n\
                 defaults\n\
                 \tmode tcp\n\
                 \tlog global\n\
                 \toption tcplog\n\
                 \ttimeout connect 5s\n\
                 \ttimeout client 60s\n\
                 \ttimeout server 60s\n\
                 frontend smtp\n\
                 \tbind {addr}\n\
                 \tdefault_backend gateway\n\
                 backend gateway\n\
                 \tserver gw {backend} send-proxy-v2 source {source}\n"
            ),
        )
        .expect("write haproxy.cfg");
        let check = Command::new(&bin)
            .arg("-c")
            .arg("-f")
            .arg(&cfg)
            .output()
            .expect("run haproxy -c");
        assert!(
            check.status.success(),
            "haproxy -c refused the config: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let mut child = Command::new(&bin)
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn haproxy");
        let logs = Arc::new(Mutex::new(Vec::new()));
        for pipe in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    logs.lock().expect("lock").push(line);
                }
            });
        }
        let mut h = Haproxy {
            child,
            _dir: dir,
            addr,
            logs,
        };
        wait_for(Duration::from_secs(20), "haproxy to listen", || {
            if let Ok(Some(status)) = h.child.try_wait() {
                panic!("haproxy exited ({status}): {}", h.logs().join("\n"));
            }
            super::smtp::connect_from(addr, Some(probe_from)).ok()
        });
        h
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().expect("lock").clone()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- haproxy output ({}) ----\n{}\n---- end ----",
                self.addr,
                self.logs().join("\n")
            );
        }
    }
}

/// A PROXY protocol v2 header (PROXY command, TCP) for a connection from `src` to `dst`; both
/// must be of one family.
pub fn proxy_v2_header(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21);
    let mut addrs = Vec::new();
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            h.push(0x11);
            addrs.extend_from_slice(&s.octets());
            addrs.extend_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            h.push(0x21);
            addrs.extend_from_slice(&s.octets());
            addrs.extend_from_slice(&d.octets());
        }
        _ => panic!("PROXY v2 addresses of different families: {src} {dst}"),
    }
    addrs.extend_from_slice(&src.port().to_be_bytes());
    addrs.extend_from_slice(&dst.port().to_be_bytes());
    h.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
    h.extend_from_slice(&addrs);
    h
}
