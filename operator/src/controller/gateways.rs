//! The gateway pods: a watch of the pods matching the gateway selector, and the poller that
//! reads `/status` of every ready one and publishes a `GatewaySnapshot` for reconcile.
//!
//! Invariants:
//! - the poller starts only once the pod store has its initial list; until its first poll the
//!   snapshot is `None`, which reconcile takes as "don't know yet" (not "no gateways");
//! - it polls every `poll_interval`, and at once (after a 200 ms pause that makes a burst of
//!   pod events one poll) when a pod changes or the render loop asks;
//! - "reconcile all" is triggered only when the snapshot differs from the last one.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, watcher};

use super::{Context, store_ready};
use crate::gateway;

pub(super) async fn pod_watch(ctx: Arc<Context>, writer: reflector::store::Writer<Pod>) {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.settings.gateway_namespace);
    let cfg = watcher::Config::default().labels(&ctx.settings.gateway_selector);
    let stream = watcher(api, cfg).default_backoff().reflect(writer);
    futures::pin_mut!(stream);
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(_) => ctx.poll_notify.notify_one(),
            Err(e) => tracing::warn!(error = %e, "gateway pod watch failed; retrying"),
        }
    }
}

pub(super) async fn poll_loop(ctx: Arc<Context>, pods: Store<Pod>) {
    if !store_ready(&pods).await {
        return;
    }
    loop {
        let ready: Vec<(String, String)> = pods
            .state()
            .iter()
            .filter_map(|p| gateway::ready_pod_ip(p).map(|ip| (p.name_any(), ip)))
            .collect();
        ctx.metrics.gateway_pods_ready.set(ready.len() as i64);
        let snap = gateway::snapshot(
            ready,
            ctx.settings.gateway_admin_port,
            Duration::from_secs(3),
        )
        .await;
        let changed = ctx.gateways().as_deref() != Some(&snap);
        if changed {
            if let Ok(mut g) = ctx.gateways.write() {
                *g = Some(Arc::new(snap));
            }
            ctx.bump();
        }
        let _ = tokio::time::timeout(ctx.settings.poll_interval, ctx.poll_notify.notified()).await;
        // a short pause so a burst of pod events is one poll
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
