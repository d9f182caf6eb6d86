//! The admin HTTP port: /healthz, /readyz, /metrics, /status (docs/interfaces.md). A small
//! hand-written HTTP/1.1 responder: four GET routes with `Connection: close` do not justify
//! pulling hyper into the gateway's dependency tree.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::server::State;

fn rfc3339(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

pub fn status_json(state: &State) -> serde_json::Value {
    let rt = state.config.load();
    let mut connectors = Vec::new();
    for c in &rt.connectors.inbound {
        connectors
            .push(json!({"name": c.name, "direction": "Inbound", "generation": c.generation}));
    }
    for c in &rt.connectors.outbound {
        connectors
            .push(json!({"name": c.name, "direction": "Outbound", "generation": c.generation}));
    }
    let certificates: Vec<_> = rt
        .certificates
        .iter()
        .map(|c| json!({"file": c.file, "subject": c.subject, "notAfter": rfc3339(c.not_after)}))
        .collect();
    let last_error = state.last_reload_error.lock().ok().and_then(|e| e.clone());
    let validation: Vec<_> = state
        .validation
        .snapshot()
        .iter()
        .map(crate::validation::ProbeResult::to_json)
        .collect();
    json!({
        "configHash": rt.hash,
        "loadedAt": rt.loaded_at.format(&Rfc3339).unwrap_or_default(),
        "lastReloadError": last_error,
        "connectors": connectors,
        "certificates": certificates,
        "validation": validation,
    })
}

/// (status, content type, body) for a request path.
pub fn route(state: &State, method: &str, path: &str) -> (u16, &'static str, String) {
    if method != "GET" && method != "HEAD" {
        return (405, "text/plain", "method not allowed\n".into());
    }
    let path = path.split('?').next().unwrap_or(path);
    match path {
        "/healthz" => (200, "text/plain", "ok\n".into()),
        "/readyz" => {
            let ready = state.listening.load(Ordering::SeqCst)
                && !state.shutting_down.load(Ordering::SeqCst);
            if ready {
                (200, "text/plain", "ok\n".into())
            } else {
                (503, "text/plain", "not ready\n".into())
            }
        }
        "/metrics" => (
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            state.metrics.encode(),
        ),
        "/status" => (200, "application/json", format!("{}\n", status_json(state))),
        _ => (404, "text/plain", "not found\n".into()),
    }
}

async fn handle(mut tcp: TcpStream, state: Arc<State>) {
    let mut buf = Vec::with_capacity(1024);
    let read = async {
        let mut tmp = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
            let n = tcp.read(&mut tmp).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&tmp[..n]);
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
    let (code, ctype, body) = route(&state, method, path);
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let mut resp = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        resp.extend_from_slice(body.as_bytes());
    }
    let _ = tcp.write_all(&resp).await;
    let _ = tcp.shutdown().await;
}

pub async fn serve(listener: TcpListener, state: Arc<State>) {
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                tokio::spawn(handle(tcp, state.clone()));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
