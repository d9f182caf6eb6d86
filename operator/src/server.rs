//! /healthz, /readyz and /metrics on `--listen`: a small HTTP/1.1 responder (four GET routes
//! with `Connection: close`; the gateway's admin port does the same).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::metrics::Metrics;

#[derive(Clone)]
pub struct Health {
    pub metrics: Metrics,
    /// Set once the process can talk to the API server; cleared on shutdown.
    pub ready: Arc<AtomicBool>,
}

fn route(h: &Health, path: &str) -> (u16, &'static str, String) {
    match path.split('?').next().unwrap_or(path) {
        "/healthz" => (200, "text/plain", "ok\n".into()),
        "/readyz" if h.ready.load(Ordering::SeqCst) => (200, "text/plain", "ok\n".into()),
        "/readyz" => (503, "text/plain", "not ready\n".into()),
        "/metrics" => (
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            h.metrics.encode(),
        ),
        _ => (404, "text/plain", "not found\n".into()),
    }
}

async fn handle(mut tcp: TcpStream, h: Health) {
    let mut buf = Vec::with_capacity(1024);
    let read = async {
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
            let n = tcp.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Some(())
    };
    if tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .ok()
        .flatten()
        .is_none()
    {
        return;
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.split_whitespace();
    let method = parts.next().unwrap_or_default();
    let path = parts.next().unwrap_or("/");
    let (code, ctype, body) = if method == "GET" || method == "HEAD" {
        route(&h, path)
    } else {
        (405, "text/plain", "method not allowed\n".into())
    };
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let mut resp = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        resp.push_str(&body);
    }
    let _ = tcp.write_all(resp.as_bytes()).await;
    let _ = tcp.shutdown().await;
}

pub async fn serve(listener: TcpListener, h: Health) {
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                tokio::spawn(handle(tcp, h.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept on the health/metrics listener failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
