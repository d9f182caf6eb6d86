//! The controller: watches, the render loop, the gateway poller and per-connector status.
//!
//! Three cooperating loops share one [`Context`]:
//! - the **render loop** renders the whole connector set (the config is global), fetching the
//!   referenced Secrets/ConfigMaps through a small cache, applies the ConfigMap and Secret in the
//!   gateway namespace with server-side apply when the hash differs from what is live, and
//!   publishes the per-connector outcomes;
//! - the **gateway poller** reads `/status` of every ready gateway pod every couple of seconds
//!   (and at once when a gateway pod changes) and publishes a snapshot;
//! - the kube-runtime **Controller** reconciles each PartnerConnector: status from (outcome,
//!   snapshot), written with server-side apply on the status subresource when it changed, plus
//!   Events on condition transitions. Both other loops trigger "reconcile all" when what they
//!   publish changes.
//!
//! Secrets are not cached: a metadata-only watch says *that* a Secret/ConfigMap changed; if it
//! is referenced by a connector, its cached data is dropped and the render loop re-reads it
//! with a GET. Only referenced objects' data is ever held in memory.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PartialObjectMeta, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event as WatchEvent, watcher};
use kube::{Client, Resource, ResourceExt};
use partnergate_crds::PartnerConnector;
use serde_json::json;
use time::OffsetDateTime;
use tokio::sync::{Notify, watch};

use crate::conditions::{self, compute_status};
use crate::gateway::{self, GatewaySnapshot};
use crate::metrics::Metrics;
use crate::render::{self, ObjectKey, Objects, Outcome, RefKind};

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

/// Data of one Secret/ConfigMap: key → bytes.
type ObjectData = BTreeMap<String, Vec<u8>>;

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
    /// Referenced objects (for the Secret/ConfigMap metadata watches).
    refs_index: RwLock<HashSet<ObjectKey>>,
    /// Data of referenced objects; `None` = not found.
    ref_cache: Mutex<HashMap<ObjectKey, Option<ObjectData>>>,
    /// Material applied last (kept one more round so a config in flight finds its files).
    previous_material: Mutex<BTreeMap<String, Vec<u8>>>,
    /// Expiry warnings already given (dedup across reconciles).
    warned: Mutex<HashSet<String>>,
}

impl Context {
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

fn uid_gen(pc: &PartnerConnector) -> (String, i64) {
    (
        pc.metadata.uid.clone().unwrap_or_default(),
        pc.metadata.generation.unwrap_or(0),
    )
}

// ---------------------------------------------------------------------------------------------
// reconcile

async fn reconcile(pc: Arc<PartnerConnector>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    let result = reconcile_inner(&pc, &ctx).await;
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    result
}

async fn reconcile_inner(pc: &PartnerConnector, ctx: &Context) -> Result<Action, Error> {
    if pc.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let key = pc.key();
    let rs = ctx.render_state();
    if rs.seen.get(&key) != Some(&uid_gen(pc)) {
        // The render has not seen this generation yet: it will trigger us when it has.
        ctx.render_notify.notify_one();
        return Ok(Action::requeue(Duration::from_secs(2)));
    }
    let outcome = rs.outcomes.get(&key);
    let Some(snapshot) = ctx.gateways() else {
        // Not polled yet: don't write NoGateways only to take it back a moment later.
        return Ok(Action::requeue(Duration::from_secs(1)));
    };
    let status = compute_status(pc, outcome, &snapshot, Time(Timestamp::now()));

    if pc.status.as_ref() != Some(&status) {
        let api: Api<PartnerConnector> =
            Api::namespaced(ctx.client.clone(), &pc.namespace().unwrap_or_default());
        let patch = json!({
            "apiVersion": "partnergate.io/v1alpha1",
            "kind": "PartnerConnector",
            "status": status,
        });
        api.patch_status(
            &pc.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
        for probe in conditions::newly_failing_validation(pc.status.as_ref(), &status) {
            let note = format!(
                "validation of next hop {} failed: {}",
                probe.host,
                probe.error.as_deref().unwrap_or("no detail")
            );
            publish(ctx, pc, EventType::Warning, "ValidationFailed", &note).await;
        }
        let transitions = conditions::transitions(pc.status.as_ref(), &status);
        for t in transitions {
            let type_ = if t.status == "True" {
                EventType::Normal
            } else {
                EventType::Warning
            };
            // Programmed=False/Pending is the normal path to Ready: not worth a Warning.
            let type_ = if t.reason == partnergate_crds::reason::PENDING {
                EventType::Normal
            } else {
                type_
            };
            publish(
                ctx,
                pc,
                type_,
                &t.reason,
                &format!("{} is {}: {}", t.type_, t.status, t.message),
            )
            .await;
        }
    }

    if let Some(o) = outcome {
        for msg in &o.expiring {
            let dedup = format!("{}|{msg}", pc.metadata.uid.as_deref().unwrap_or_default());
            let first = ctx
                .warned
                .lock()
                .map(|mut w| w.insert(dedup))
                .unwrap_or(false);
            if first {
                publish(ctx, pc, EventType::Warning, "CertificateExpiring", msg).await;
            }
        }
    }

    let programmed = status
        .conditions
        .iter()
        .any(|c| c.type_ == partnergate_crds::condition::PROGRAMMED && c.status == "True");
    let included = outcome.is_some_and(|o| o.included);
    Ok(if included && !programmed {
        Action::requeue(Duration::from_secs(2))
    } else {
        Action::requeue(Duration::from_secs(300))
    })
}

async fn publish(ctx: &Context, pc: &PartnerConnector, type_: EventType, reason: &str, note: &str) {
    let note: String = note.chars().take(1000).collect();
    let ev = KubeEvent {
        type_,
        reason: reason.to_string(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &pc.object_ref(&())).await {
        tracing::warn!(connector = %pc.key(), error = %e, "cannot publish event");
    }
}

fn error_policy(pc: Arc<PartnerConnector>, err: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(connector = %pc.key(), error = %err, "reconcile failed");
    ctx.metrics
        .reconcile_errors
        .get_or_create(&crate::metrics::ErrorLabel {
            error: err.metric_label(),
        })
        .inc();
    Action::requeue(Duration::from_secs(5))
}

// ---------------------------------------------------------------------------------------------
// render loop

fn fingerprint(connectors: &[Arc<PartnerConnector>]) -> Vec<(String, String, i64)> {
    let mut fp: Vec<_> = connectors
        .iter()
        .map(|pc| {
            let (uid, gen_) = uid_gen(pc);
            (pc.key(), uid, gen_)
        })
        .collect();
    fp.sort();
    fp
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

async fn render_loop(ctx: Arc<Context>) {
    for s in &ctx.stores {
        if !store_ready(s).await {
            tracing::error!("connector store writer dropped before the initial list");
            return;
        }
    }
    tracing::debug!("connector stores ready: render loop starts");
    let mut last_fp = None;
    let mut last_full: Option<Instant> = None;
    loop {
        let notified = tokio::time::timeout(Duration::from_secs(2), ctx.render_notify.notified())
            .await
            .is_ok();
        let fp = fingerprint(&ctx.connectors());
        let due = last_full.is_none_or(|t| t.elapsed() >= ctx.settings.resync);
        if !notified && !due && last_fp.as_ref() == Some(&fp) {
            continue;
        }
        // coalesce a burst of changes into one render
        tokio::time::sleep(ctx.settings.debounce).await;
        if due {
            if let Ok(mut c) = ctx.ref_cache.lock() {
                c.clear();
            }
            last_full = Some(Instant::now());
        }
        let started = Instant::now();
        tracing::debug!(notified, due, "rendering");
        let result = render_once(&ctx).await;
        ctx.metrics
            .render_duration
            .observe(started.elapsed().as_secs_f64());
        let label = match &result {
            Ok(true) => "applied",
            Ok(false) => "unchanged",
            Err(_) => "error",
        };
        ctx.metrics
            .renders
            .get_or_create(&crate::metrics::ResultLabel {
                result: label.into(),
            })
            .inc();
        match result {
            Ok(_) => last_fp = Some(fingerprint(&ctx.connectors())),
            Err(e) => {
                tracing::warn!(error = %e, "render failed; retrying");
                last_fp = None;
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

async fn fetch_object(client: &Client, key: &ObjectKey) -> Result<Option<ObjectData>, kube::Error> {
    match key.kind {
        RefKind::Secret => {
            let api: Api<Secret> = Api::namespaced(client.clone(), &key.namespace);
            Ok(api.get_opt(&key.name).await?.map(|s| {
                let mut data: BTreeMap<String, Vec<u8>> = s
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect();
                for (k, v) in s.string_data.unwrap_or_default() {
                    data.entry(k).or_insert_with(|| v.into_bytes());
                }
                data
            }))
        }
        RefKind::ConfigMap => {
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), &key.namespace);
            Ok(api.get_opt(&key.name).await?.map(|c| {
                let mut data: BTreeMap<String, Vec<u8>> = c
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .collect();
                for (k, v) in c.binary_data.unwrap_or_default() {
                    data.entry(k).or_insert(v.0);
                }
                data
            }))
        }
    }
}

/// Renders, applies when needed, publishes. Ok(true) when something was written.
async fn render_once(ctx: &Context) -> Result<bool, Error> {
    let connectors: Vec<PartnerConnector> =
        ctx.connectors().iter().map(|pc| (**pc).clone()).collect();

    let refs: HashSet<ObjectKey> = connectors.iter().flat_map(render::references).collect();
    if let Ok(mut idx) = ctx.refs_index.write() {
        idx.clone_from(&refs);
    }
    let missing: Vec<ObjectKey> = {
        let cache = ctx.ref_cache.lock().map_err(|_| poisoned())?;
        refs.iter()
            .filter(|k| !cache.contains_key(k))
            .cloned()
            .collect()
    };
    let fetched: Vec<(ObjectKey, Option<ObjectData>)> = futures::stream::iter(missing)
        .map(|key| async move {
            let data = fetch_object(&ctx.client, &key).await?;
            Ok::<_, kube::Error>((key, data))
        })
        .buffer_unordered(16)
        .try_collect()
        .await?;
    let objects: Objects = {
        let mut cache = ctx.ref_cache.lock().map_err(|_| poisoned())?;
        cache.extend(fetched);
        cache.retain(|k, _| refs.contains(k));
        cache
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|d| (k.clone(), d.clone())))
            .collect()
    };

    let rendered = render::render(&connectors, &objects, OffsetDateTime::now_utc());
    ctx.metrics
        .connectors_rendered
        .set(rendered.outcomes.values().filter(|o| o.included).count() as i64);
    let applied = apply_rendered(ctx, &rendered).await;

    // Publish outcomes even when the apply failed: Accepted/ResolvedRefs are still right and
    // Programmed will say the gateways don't have it.
    let state = RenderState {
        hash: rendered.hash.clone(),
        seen: connectors
            .iter()
            .map(|pc| (pc.key(), uid_gen(pc)))
            .collect(),
        outcomes: rendered.outcomes,
    };
    let changed = {
        let prev = ctx.render_state();
        prev.hash != state.hash || prev.seen != state.seen || prev.outcomes != state.outcomes
    };
    if let Ok(mut g) = ctx.render_state.write() {
        *g = Arc::new(state);
    }
    if changed {
        ctx.bump();
        ctx.poll_notify.notify_one();
    }
    applied
}

fn poisoned() -> Error {
    Error::Json(serde_json::Error::io(std::io::Error::other(
        "lock poisoned",
    )))
}

fn rendered_labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "partnergate".to_string(),
        ),
        (
            "app.kubernetes.io/managed-by".to_string(),
            FIELD_MANAGER.to_string(),
        ),
    ])
}

/// Applies Secret then ConfigMap when the live ConfigMap's hash annotation differs.
async fn apply_rendered(ctx: &Context, rendered: &render::Rendered) -> Result<bool, Error> {
    let s = &ctx.settings;
    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &s.gateway_namespace);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &s.gateway_namespace);
    let live_cm = cms.get_opt(&s.connectors_configmap).await?;
    let live_secret = secrets.get_metadata_opt(&s.material_secret).await?;
    let live_hash = |meta: Option<&ObjectMeta>| {
        meta.and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get(HASH_ANNOTATION))
            .cloned()
    };
    let cm_hash = live_hash(live_cm.as_ref().map(|c| &c.metadata));
    let secret_hash = live_hash(
        live_secret
            .as_ref()
            .map(|m: &PartialObjectMeta<Secret>| &m.metadata),
    );
    if cm_hash.as_deref() == Some(&rendered.hash) && secret_hash.as_deref() == Some(&rendered.hash)
    {
        if let Ok(mut p) = ctx.previous_material.lock() {
            p.clone_from(&rendered.material);
        }
        return Ok(false);
    }

    let annotations = BTreeMap::from([(HASH_ANNOTATION.to_string(), rendered.hash.clone())]);
    let mut material = ctx
        .previous_material
        .lock()
        .map(|p| p.clone())
        .unwrap_or_default();
    material.extend(rendered.material.clone());
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(s.material_secret.clone()),
            namespace: Some(s.gateway_namespace.clone()),
            labels: Some(rendered_labels()),
            annotations: Some(annotations.clone()),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(
            material
                .into_iter()
                .map(|(k, v)| (k, k8s_openapi::ByteString(v)))
                .collect(),
        ),
        ..Secret::default()
    };
    let mut secret_json = serde_json::to_value(&secret)?;
    secret_json["apiVersion"] = json!("v1");
    secret_json["kind"] = json!("Secret");
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    secrets
        .patch(&s.material_secret, &pp, &Patch::Apply(&secret_json))
        .await?;

    let json_text = String::from_utf8_lossy(&rendered.connectors_json).into_owned();
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(s.connectors_configmap.clone()),
            namespace: Some(s.gateway_namespace.clone()),
            labels: Some(rendered_labels()),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(CONNECTORS_KEY.to_string(), json_text)])),
        ..ConfigMap::default()
    };
    let mut cm_json = serde_json::to_value(&cm)?;
    cm_json["apiVersion"] = json!("v1");
    cm_json["kind"] = json!("ConfigMap");
    cms.patch(&s.connectors_configmap, &pp, &Patch::Apply(&cm_json))
        .await?;
    ctx.metrics.config_applies.inc();
    if let Ok(mut p) = ctx.previous_material.lock() {
        p.clone_from(&rendered.material);
    }
    tracing::info!(config_hash = %rendered.hash, configmap = %s.connectors_configmap, secret = %s.material_secret, "applied rendered gateway config");
    Ok(true)
}

// ---------------------------------------------------------------------------------------------
// referenced Secrets/ConfigMaps: metadata-only watches

async fn ref_watch<K>(ctx: Arc<Context>, api: Api<PartialObjectMeta<K>>, kind: RefKind)
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    // Api<PartialObjectMeta<K>> lists and watches metadata only: Secret data never arrives.
    let stream = watcher(api, watcher::Config::default().any_semantic()).default_backoff();
    futures::pin_mut!(stream);
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(WatchEvent::Apply(m)) | Ok(WatchEvent::Delete(m)) => {
                let key = ObjectKey {
                    kind,
                    namespace: m.metadata.namespace.clone().unwrap_or_default(),
                    name: m.metadata.name.clone().unwrap_or_default(),
                };
                let referenced = ctx
                    .refs_index
                    .read()
                    .map(|i| i.contains(&key))
                    .unwrap_or(true);
                if referenced {
                    if let Ok(mut c) = ctx.ref_cache.lock() {
                        c.remove(&key);
                    }
                    tracing::debug!(object = %key, "referenced object changed");
                    ctx.render_notify.notify_one();
                }
            }
            Ok(WatchEvent::InitDone) => {
                // a (re)list: anything may have changed while the watch was down
                if let Ok(mut c) = ctx.ref_cache.lock() {
                    c.retain(|k, _| k.kind != kind);
                }
                ctx.render_notify.notify_one();
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "watch of referenced objects failed; retrying"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// gateway pods

async fn pod_watch(ctx: Arc<Context>, writer: reflector::store::Writer<Pod>) {
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

async fn poll_loop(ctx: Arc<Context>, pods: Store<Pod>) {
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

// ---------------------------------------------------------------------------------------------
// the gateway's server certificate

async fn server_certificate_watch(ctx: Arc<Context>) {
    let s = &ctx.settings;
    if s.server_certificate_secret.is_empty() {
        return;
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &s.gateway_namespace);
    let cfg = watcher::Config::default()
        .fields(&format!("metadata.name={}", s.server_certificate_secret));
    let stream = watcher(api, cfg).default_backoff().applied_objects();
    futures::pin_mut!(stream);
    let mut warned_for = None;
    while let Some(ev) = stream.next().await {
        let secret = match ev {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "server certificate watch failed; retrying");
                continue;
            }
        };
        let Some(crt) = secret.data.as_ref().and_then(|d| d.get("tls.crt")) else {
            continue;
        };
        match crate::certs::parse_pem_certificates(&crt.0) {
            Ok(certs) => {
                let Some(leaf) = certs.first() else { continue };
                ctx.metrics
                    .certificate_expiry
                    .get_or_create(&crate::metrics::SecretLabel {
                        secret: s.server_certificate_secret.clone(),
                    })
                    .set(leaf.not_after.unix_timestamp());
                let now = OffsetDateTime::now_utc();
                let soon =
                    leaf.not_after <= now + time::Duration::days(render::EXPIRY_WARNING_DAYS);
                if soon && warned_for != Some(leaf.not_after) {
                    warned_for = Some(leaf.not_after);
                    let ev = KubeEvent {
                        type_: EventType::Warning,
                        reason: "CertificateExpiring".into(),
                        note: Some(format!(
                            "gateway server certificate {} expires at {}",
                            leaf.subject,
                            leaf.not_after_rfc3339()
                        )),
                        action: "Reconcile".into(),
                        secondary: None,
                    };
                    if let Err(e) = ctx.recorder.publish(&ev, &secret.object_ref(&())).await {
                        tracing::warn!(error = %e, "cannot publish event");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(secret = %s.server_certificate_secret, error = %e, "gateway server certificate does not parse")
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// wiring

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
            Controller::new(api, watcher::Config::default().any_semantic()).with_config(
                kube::runtime::controller::Config::default()
                    .debounce(Duration::from_millis(200))
                    .concurrency(16),
            )
        })
        .collect();
    let stores = controllers.iter().map(|c| c.store()).collect();
    let (tx, rx) = watch::channel(0u64);
    let reporter = Reporter {
        controller: FIELD_MANAGER.into(),
        instance: settings.instance.clone(),
    };
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client: client.clone(),
        settings: settings.clone(),
        metrics,
        stores,
        render_state: RwLock::new(Arc::new(RenderState::default())),
        gateways: RwLock::new(None),
        render_notify: Notify::new(),
        poll_notify: Notify::new(),
        reconcile_all: tx,
        refs_index: RwLock::new(HashSet::new()),
        ref_cache: Mutex::new(HashMap::new()),
        previous_material: Mutex::new(BTreeMap::new()),
        warned: Mutex::new(HashSet::new()),
    });

    let (pod_reader, pod_writer) = reflector::store();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(render_loop(ctx.clone()));
    tasks.spawn(pod_watch(ctx.clone(), pod_writer));
    tasks.spawn(poll_loop(ctx.clone(), pod_reader));
    tasks.spawn(server_certificate_watch(ctx.clone()));
    if settings.watch_namespaces.is_empty() {
        tasks.spawn(ref_watch(
            ctx.clone(),
            Api::<PartialObjectMeta<Secret>>::all(client.clone()),
            RefKind::Secret,
        ));
        tasks.spawn(ref_watch(
            ctx.clone(),
            Api::<PartialObjectMeta<ConfigMap>>::all(client.clone()),
            RefKind::ConfigMap,
        ));
    } else {
        for ns in &settings.watch_namespaces {
            tasks.spawn(ref_watch(
                ctx.clone(),
                Api::<PartialObjectMeta<Secret>>::namespaced(client.clone(), ns),
                RefKind::Secret,
            ));
            tasks.spawn(ref_watch(
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
            .run(reconcile, error_policy, ctx.clone())
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
