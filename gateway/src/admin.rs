//! The admin HTTP port: /healthz, /readyz, /metrics, /status (docs/interfaces.md), served by
//! the shared responder in `http.rs`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::net::TcpListener;

use crate::http::Response;

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

/// The response for a GET/HEAD of `path` (query string already removed).
pub fn route(state: &State, path: &str) -> Response {
    match path {
        "/healthz" => (200, "text/plain", "ok\n".into()),
        "/readyz" => {
            // `listening` is set only once the SMTP listener runs, which `main` starts after the
            // config watcher has registered its watches: ready means changes are being watched.
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

pub async fn serve(listener: TcpListener, state: Arc<State>) {
    crate::http::serve(listener, move |path: &str| route(&state, path)).await
}
