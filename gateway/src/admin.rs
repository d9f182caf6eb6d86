//! The admin HTTP port: /healthz, /readyz, /metrics, /status (docs/interfaces.md), served by
//! the shared responder (`partnergate_core::http`); `/status` is the typed document of
//! `partnergate_core::status` the operator reads.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::net::TcpListener;

use crate::http::Response;
use crate::status::{GatewayStatus, StatusCertificate, StatusConnector};

use crate::server::State;

fn rfc3339(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

/// The `/status` document of the live config.
pub fn status(state: &State) -> GatewayStatus {
    let rt = state.config.load();
    let inbound = rt.connectors.inbound.iter().map(|c| StatusConnector {
        name: c.name.clone(),
        direction: "Inbound".into(),
        generation: c.generation,
    });
    let outbound = rt.connectors.outbound.iter().map(|c| StatusConnector {
        name: c.name.clone(),
        direction: "Outbound".into(),
        generation: c.generation,
    });
    GatewayStatus {
        config_hash: rt.hash.clone(),
        loaded_at: rt.loaded_at.format(&Rfc3339).ok(),
        last_reload_error: state.last_reload_error.lock().ok().and_then(|e| e.clone()),
        connectors: inbound.chain(outbound).collect(),
        certificates: rt
            .certificates
            .iter()
            .map(|c| StatusCertificate {
                file: c.file.clone(),
                subject: c.subject.clone(),
                not_after: rfc3339(c.not_after),
            })
            .collect(),
        validation: state
            .validation
            .snapshot()
            .iter()
            .map(crate::validation::ProbeResult::to_status)
            .collect(),
    }
}

fn status_body(state: &State) -> String {
    match serde_json::to_string(&status(state)) {
        Ok(body) => body + "\n",
        Err(e) => format!("{{\"error\":\"{e}\"}}\n"),
    }
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
        "/status" => (200, "application/json", status_body(state)),
        _ => (404, "text/plain", "not found\n".into()),
    }
}

pub async fn serve(listener: TcpListener, state: Arc<State>) {
    crate::http::serve(listener, move |path: &str| route(&state, path)).await
}
