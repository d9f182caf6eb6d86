//! The controller: the loops that watch the cluster, render the gateway config and write each
//! PartnerConnector's status, and the [`Context`] they share. This file holds the shared state
//! and the wiring ([`run`]); each loop lives in its own file:
//! - `render_loop.rs`: renders the whole connector set (the config is global), reading the
//!   referenced Secrets/ConfigMaps through `references.rs`, applies the ConfigMap and Secret in
//!   the gateway namespace with server-side apply when the hash differs from what is live, and
//!   publishes the per-connector outcomes ([`RenderState`]);
//! - `references.rs`: metadata-only watches of Secrets/ConfigMaps and the cache of the data of
//!   the referenced ones;
//! - `gateways.rs`: watches the gateway pods and reads `/status` of every ready one every couple
//!   of seconds (and at once when a pod changes), publishing a [`GatewaySnapshot`];
//! - `reconcile.rs`: the kube-runtime Controller's reconcile of one PartnerConnector, which
//!   executes what the pure `plan.rs` decides (status write, Events, requeue);
//! - `server_certificate.rs`: expiry metric and Warning for the gateway's server certificate.
//!
//! Invariants:
//! - the render loop and the poller trigger "reconcile all" (`reconcile_all`) whenever what
//!   they publish changes, so a status never waits for the periodic requeue;
//! - reconcile only reads what the other loops published; it never renders or polls itself;
//! - every object the operator writes (the rendered ConfigMap and Secret, statuses) is written
//!   with server-side apply as [`FIELD_MANAGER`], which also names the Events' reporter;
//! - Secret data is never cached wholesale: only referenced objects' data is held in memory.
//!
//! Run only while leader (main.rs holds the Lease).

mod gateways;
mod plan;
mod reconcile;
mod references;
mod render_loop;
mod server_certificate;

#[cfg(test)]
mod mock_api;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Client;
use kube::ResourceExt;
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use partnergate_crds::PartnerConnector;
use tokio::sync::{Notify, watch};

use crate::gateway::GatewaySnapshot;
use crate::metrics::Metrics;
use crate::render::{Outcome, RefKind};

/// Reconciles at once. Most reconciles write nothing (the status is unchanged or the render
/// has not seen the connector yet); the rest wait on the API server, which is what bounds how
/// fast thousands of new connectors get their status, so more of them in flight than cores.
const RECONCILE_CONCURRENCY: u16 = 64;

/// Field manager of every write.
pub const FIELD_MANAGER: &str = "partnergate-operator";
/// Annotation on the rendered objects: hash of the connectors file.
pub const HASH_ANNOTATION: &str = "partnergate.io/config-hash";
/// Key of the connectors file in the ConfigMap.
pub const CONNECTORS_KEY: &str = "connectors.json";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("serialising: {0}")]
    Json(#[from] serde_json::Error),
}

impl Error {
    pub fn metric_label(&self) -> String {
        match self {
            Error::Kube(_) => "kube".into(),
            Error::Json(_) => "json".into(),
        }
    }
}

/// Settings from the command line (docs/interfaces.md).
#[derive(Debug, Clone)]
pub struct Settings {
    pub gateway_namespace: String,
    pub gateway_selector: String,
    pub gateway_admin_port: u16,
    pub connectors_configmap: String,
    pub material_secret: String,
    pub server_certificate_secret: String,
    /// Empty = all namespaces.
    pub watch_namespaces: Vec<String>,
    /// How often gateway pods' /status is read.
    pub poll_interval: Duration,
    /// Quiet time before a render after a change.
    pub debounce: Duration,
    /// Full re-render (re-reading every referenced object) at least this often.
    pub resync: Duration,
    /// Reporter instance for Events (the pod name).
    pub instance: Option<String>,
}

/// What the last render saw and decided.
#[derive(Debug, Default)]
pub struct RenderState {
    pub hash: String,
    /// connector key → (uid, generation) as rendered.
    pub seen: HashMap<String, (String, i64)>,
    pub outcomes: BTreeMap<String, Outcome>,
}

pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub metrics: Metrics,
    stores: Vec<Store<PartnerConnector>>,
    render_state: RwLock<Arc<RenderState>>,
    /// None until the first poll of the gateway pods.
    gateways: RwLock<Option<Arc<GatewaySnapshot>>>,
    recorder: Recorder,
    render_notify: Notify,
    poll_notify: Notify,
    /// Bumped whenever every connector should be reconciled.
    reconcile_all: watch::Sender<u64>,
    /// Referenced Secrets/ConfigMaps and the cache of their data.
    references: references::References,
    /// Material applied last (kept one more round so a config in flight finds its files).
    previous_material: Mutex<BTreeMap<String, Vec<u8>>>,
    /// Expiry warnings already given (dedup across reconciles).
    warned: Mutex<HashSet<String>>,
}

impl Context {
    fn new(
        client: Client,
        settings: Settings,
        metrics: Metrics,
        stores: Vec<Store<PartnerConnector>>,
        reconcile_all: watch::Sender<u64>,
    ) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: settings.instance.clone(),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            metrics,
            stores,
            render_state: RwLock::new(Arc::new(RenderState::default())),
            gateways: RwLock::new(None),
            render_notify: Notify::new(),
            poll_notify: Notify::new(),
            reconcile_all,
            references: references::References::default(),
            previous_material: Mutex::new(BTreeMap::new()),
            warned: Mutex::new(HashSet::new()),
        }
    }

    fn bump(&self) {
        self.reconcile_all.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn render_state(&self) -> Arc<RenderState> {
        self.render_state
            .read()
            .map(|g| g.clone())
            .unwrap_or_default()
    }

    fn gateways(&self) -> Option<Arc<GatewaySnapshot>> {
        self.gateways.read().ok().and_then(|g| g.clone())
    }

    fn connectors(&self) -> Vec<Arc<PartnerConnector>> {
        self.stores.iter().flat_map(|s| s.state()).collect()
    }
}

/// What a render records per connector and reconcile compares: a new uid or generation means
/// the render has not seen this object yet.
fn uid_gen(pc: &PartnerConnector) -> (String, i64) {
    (
        pc.metadata.uid.clone().unwrap_or_default(),
        pc.metadata.generation.unwrap_or(0),
    )
}

/// Waits until a store has its initial list. `Store::wait_until_ready` wakes only the last of
/// several concurrent waiters (the Controller waits on the same store), so poll it with a
/// timeout: a re-poll after the init sees the value.
async fn store_ready<K>(store: &Store<K>) -> bool
where
    K: kube::runtime::reflector::Lookup + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        match tokio::time::timeout(Duration::from_millis(500), store.wait_until_ready()).await {
            Ok(Ok(())) => return true,
            Ok(Err(_)) => return false,
            Err(_) => continue,
        }
    }
}

/// Runs everything until `shutdown` resolves (or forever). Call only while leader.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Metrics,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let scopes: Vec<Api<PartnerConnector>> = if settings.watch_namespaces.is_empty() {
        vec![Api::all(client.clone())]
    } else {
        settings
            .watch_namespaces
            .iter()
            .map(|ns| Api::namespaced(client.clone(), ns))
            .collect()
    };
    let controllers: Vec<Controller<PartnerConnector>> = scopes
        .into_iter()
        .map(|api| {
            // The store keeps every connector for the life of the process: without their
            // managedFields (what kube-rs recommends for memory), which nothing here reads and
            // which are most of a small object's metadata once its status has been applied.
            let (reader, writer) = reflector::store();
            let stream = reflector(
                writer,
                watcher(api, watcher::Config::default().any_semantic()).modify(|pc| {
                    pc.managed_fields_mut().clear();
                }),
            )
            .applied_objects();
            Controller::for_stream(stream, reader).with_config(
                kube::runtime::controller::Config::default()
                    .debounce(Duration::from_millis(200))
                    .concurrency(RECONCILE_CONCURRENCY),
            )
        })
        .collect();
    let stores = controllers.iter().map(|c| c.store()).collect();
    let (tx, rx) = watch::channel(0u64);
    let ctx = Arc::new(Context::new(
        client.clone(),
        settings.clone(),
        metrics,
        stores,
        tx,
    ));

    let (pod_reader, pod_writer) = reflector::store();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(render_loop::render_loop(ctx.clone()));
    tasks.spawn(gateways::pod_watch(ctx.clone(), pod_writer));
    tasks.spawn(gateways::poll_loop(ctx.clone(), pod_reader));
    tasks.spawn(server_certificate::server_certificate_watch(ctx.clone()));
    if settings.watch_namespaces.is_empty() {
        tasks.spawn(references::ref_watch(
            ctx.clone(),
            Api::<PartialObjectMeta<Secret>>::all(client.clone()),
            RefKind::Secret,
        ));
        tasks.spawn(references::ref_watch(
            ctx.clone(),
            Api::<PartialObjectMeta<ConfigMap>>::all(client.clone()),
            RefKind::ConfigMap,
        ));
    } else {
        for ns in &settings.watch_namespaces {
            tasks.spawn(references::ref_watch(
                ctx.clone(),
                Api::<PartialObjectMeta<Secret>>::namespaced(client.clone(), ns),
                RefKind::Secret,
            ));
            tasks.spawn(references::ref_watch(
                ctx.clone(),
                Api::<PartialObjectMeta<ConfigMap>>::namespaced(client.clone(), ns),
                RefKind::ConfigMap,
            ));
        }
    }

    let shutdown = futures::future::FutureExt::shared(Box::pin(shutdown));
    let runs = controllers.into_iter().map(|c| {
        c.reconcile_all_on(watch_stream(rx.clone()))
            .graceful_shutdown_on(shutdown.clone())
            .run(reconcile::reconcile, reconcile::error_policy, ctx.clone())
            .for_each(|res| async move {
                match res {
                    Ok((obj, _)) => tracing::debug!(connector = %obj, "reconciled"),
                    Err(e) => tracing::debug!(error = %e, "reconcile error"),
                }
            })
    });
    futures::future::join_all(runs).await;
    tasks.abort_all();
}

/// A stream that yields once per change of the watch channel.
pub fn watch_stream(rx: watch::Receiver<u64>) -> impl Stream<Item = ()> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        Some(((), rx))
    })
}
