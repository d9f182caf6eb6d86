//! A mock API server for the controller's tests (tower-test, as kube-rs' controller-rs does):
//! a [`Context`] whose Client talks to a task that records every request and answers it the
//! way kube-apiserver would.
//!
//! Invariants: it answers a status patch of a PartnerConnector with the object carrying the
//! patched status, an Event post with the Event, and anything else with 404 (and records it,
//! so a test sees every call made); it stops, handing back the calls, once every Client is
//! dropped.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use partnergate_crds::PartnerConnector;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower_test::mock;

use super::{Context, Settings};
use crate::metrics::Metrics;

/// One request the controller made.
#[derive(Debug, Clone)]
pub(super) struct Call {
    pub method: Method,
    pub path: String,
    /// Query parameters (not percent-decoded).
    pub query: BTreeMap<String, String>,
    pub content_type: String,
    pub body: serde_json::Value,
}

pub(super) fn settings() -> Settings {
    Settings {
        gateway_namespace: "partnergate".into(),
        gateway_selector: "app.kubernetes.io/component=gateway".into(),
        gateway_admin_port: 8080,
        connectors_configmap: "partnergate-connectors".into(),
        material_secret: "partnergate-connector-material".into(),
        server_certificate_secret: String::new(),
        watch_namespaces: vec![],
        poll_interval: Duration::from_secs(2),
        debounce: Duration::from_millis(200),
        resync: Duration::from_secs(300),
        instance: Some("operator-0".into()),
    }
}

/// A Context on the mock API server, and the server, which knows `pc` (the object a status
/// patch returns); await the server after dropping the Context to get the calls.
pub(super) fn context(pc: &PartnerConnector) -> (Arc<Context>, JoinHandle<Vec<Call>>) {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let ctx = Context::new(
        client,
        settings(),
        Metrics::new(),
        vec![],
        watch::channel(0).0,
    );
    let pc = pc.clone();
    let server = tokio::spawn(async move {
        let mut calls = vec![];
        while let Some((request, send)) = handle.next_request().await {
            let call = record(request).await;
            let status_patch = call.method == Method::PATCH && call.path.ends_with("/status");
            let event_post = call.method == Method::POST && call.path.ends_with("/events");
            let response = if status_patch {
                let mut obj = pc.clone();
                obj.status = serde_json::from_value(call.body["status"].clone()).ok();
                json_response(StatusCode::OK, &serde_json::to_value(&obj).unwrap())
            } else if event_post {
                json_response(StatusCode::CREATED, &call.body)
            } else {
                json_response(
                    StatusCode::NOT_FOUND,
                    &serde_json::json!({
                        "apiVersion": "v1", "kind": "Status", "status": "Failure",
                        "reason": "NotFound", "code": 404, "message": "not mocked",
                    }),
                )
            };
            calls.push(call);
            send.send_response(response);
        }
        calls
    });
    (Arc::new(ctx), server)
}

async fn record(request: Request<Body>) -> Call {
    let (parts, body) = request.into_parts();
    let bytes = body.collect_bytes().await.unwrap();
    Call {
        method: parts.method,
        path: parts.uri.path().to_string(),
        query: parts
            .uri
            .query()
            .unwrap_or_default()
            .split('&')
            .filter(|kv| !kv.is_empty())
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (kv.to_string(), String::new()),
            })
            .collect(),
        content_type: parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string(),
        body: if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        },
    }
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}
