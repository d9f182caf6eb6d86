//! The tiny HTTP/1.1 responder behind both binaries' admin ports (the gateway's /healthz,
//! /readyz, /metrics, /status and the operator's /healthz, /readyz, /metrics). Hand-written:
//! a few GET routes answered with `Connection: close` do not justify pulling hyper into the
//! gateway's dependency tree.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// (status, content type, body).
pub type Response = (u16, &'static str, String);

/// Largest request head read; anything longer is dropped unanswered.
const MAX_HEAD: usize = 16 * 1024;

/// Serves GET and HEAD with `route(path)` (query string removed); other methods get 405.
pub async fn serve<F>(listener: TcpListener, route: F)
where
    F: Fn(&str) -> Response + Send + Sync + 'static,
{
    let route = Arc::new(route);
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                let route = route.clone();
                tokio::spawn(async move { handle(tcp, &*route).await });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept on the admin listener failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(mut tcp: TcpStream, route: &(dyn Fn(&str) -> Response + Send + Sync)) {
    let mut buf = Vec::with_capacity(1024);
    let read = async {
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_HEAD {
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
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let method = parts.next().unwrap_or("");
    let path = parts.next().unwrap_or("/");
    let (code, ctype, body) = if method == "GET" || method == "HEAD" {
        route(path.split('?').next().unwrap_or(path))
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
