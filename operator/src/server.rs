//! /healthz, /readyz and /metrics on `--listen`, served by the shared HTTP
//! responder (`partnergate_core::http`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use partnergate_core::http::Response;
use tokio::net::TcpListener;

use crate::metrics::Metrics;

#[derive(Clone)]
pub struct Health {
    pub metrics: Metrics,
    /// Set once the process can talk to the API server; cleared on shutdown.
    pub ready: Arc<AtomicBool>,
}

fn route(h: &Health, path: &str) -> Response {
    match path {
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

pub async fn serve(listener: TcpListener, h: Health) {
    partnergate_core::http::serve(listener, move |path: &str| route(&h, path)).await
}
