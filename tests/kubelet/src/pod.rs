//! One worker task per Pod bound to the node: volumes, process, probes, status, deletion.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use jiff::Timestamp;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret, ServiceAccount, Volume};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::env::{self, MountMap};
use crate::volumes::{self, Payload};
use crate::{Ctx, events, logs, probe};

/// Where kube clients look for the in-cluster service-account token.
pub const SA_MOUNT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Env var naming the pod IP the process must bind its listeners to.
pub const BIND_IP_ENV: &str = "PARTNERGATE_BIND_IP";

struct Proc {
    child: tokio::process::Child,
    pid: i32,
    started_at: String,
    started: Instant,
}

struct Term {
    exit_code: i32,
    signal: Option<i32>,
    reason: &'static str,
    started_at: String,
    finished_at: String,
}

struct Token {
    token: String,
    refresh_at: Instant,
}

/// Result of classifying a pod's first container.
enum Plan {
    Run {
        binary: PathBuf,
    },
    Unsupported {
        reason: &'static str,
        message: String,
    },
}

struct Worker {
    ctx: Arc<Ctx>,
    ns: String,
    name: String,
    uid: String,
    dir: PathBuf,
    plan: Option<Plan>,
    ip: Option<Ipv4Addr>,
    proc: Option<Proc>,
    restart_count: i32,
    last_term: Option<Term>,
    next_start: Instant,
    backoff: Duration,
    ready: bool,
    probe_ok: i32,
    probe_fail: i32,
    next_probe: Instant,
    live_fail: i32,
    next_live: Instant,
    written: HashMap<String, Payload>,
    tokens: HashMap<String, Token>,
    volumes_ok: bool,
    next_volume_sync: Instant,
    conds: HashMap<String, (String, String)>,
    last_status: Option<Value>,
    waiting: Option<(String, String)>,
    terminal: Option<&'static str>,
    start_time: String,
    emitted: HashSet<String>,
}

pub async fn run(
    ctx: Arc<Ctx>,
    mut rx: watch::Receiver<Option<Pod>>,
    mut shutdown: watch::Receiver<bool>,
    done: mpsc::UnboundedSender<String>,
    uid: String,
) {
    let first = rx.borrow().clone();
    let Some(first) = first else {
        let _ = done.send(uid);
        return;
    };
    let ns = first.metadata.namespace.clone().unwrap_or_default();
    let name = first.metadata.name.clone().unwrap_or_default();
    let dir = ctx.args.state_dir.join("pods").join(format!("{ns}_{name}"));
    let mut w = Worker {
        ctx,
        ns,
        name,
        uid: uid.clone(),
        dir,
        plan: None,
        ip: None,
        proc: None,
        restart_count: 0,
        last_term: None,
        next_start: Instant::now(),
        backoff: Duration::from_secs(1),
        ready: false,
        probe_ok: 0,
        probe_fail: 0,
        next_probe: Instant::now(),
        live_fail: 0,
        next_live: Instant::now(),
        written: HashMap::new(),
        tokens: HashMap::new(),
        volumes_ok: false,
        next_volume_sync: Instant::now(),
        conds: HashMap::new(),
        last_status: None,
        waiting: None,
        terminal: None,
        start_time: Timestamp::now().to_string(),
        emitted: HashSet::new(),
    };
    // A kubelet restart keeps counting restarts where the previous one left off.
    w.restart_count = first
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.first())
        .map(|c| c.restart_count)
        .unwrap_or(0);
    info!(pod = %w.key(), "pod worker started");
    let mut rx_open = true;
    loop {
        if *shutdown.borrow() {
            w.stop(Duration::from_secs(5)).await;
            w.release_ip().await;
            break;
        }
        let current = rx.borrow_and_update().clone();
        let Some(pod) = current else {
            info!(pod = %w.key(), "pod removed from the API: stopping its process");
            w.stop(Duration::from_secs(2)).await;
            w.cleanup().await;
            break;
        };
        if pod.metadata.deletion_timestamp.is_some() {
            w.terminate(&pod).await;
            break;
        }
        w.step(&pod).await;
        tokio::select! {
            r = rx.changed(), if rx_open => {
                if r.is_err() {
                    rx_open = false;
                }
            }
            _ = shutdown.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(1000)) => {}
        }
    }
    info!(pod = %w.key(), "pod worker finished");
    let _ = done.send(uid);
}

fn first_container(pod: &Pod) -> Option<&Container> {
    pod.spec.as_ref().and_then(|s| s.containers.first())
}

/// Repository of an image reference without tag or digest.
fn image_repository(image: &str) -> &str {
    let no_digest = image.split('@').next().unwrap_or(image);
    match no_digest.rfind(':') {
        Some(i) if !no_digest[i..].contains('/') => &no_digest[..i],
        _ => no_digest,
    }
}

pub fn is_partnergate_image(image: &str, names: &[String]) -> bool {
    let repo = image_repository(image);
    let last = repo.rsplit('/').next().unwrap_or(repo);
    names.iter().any(|n| n == last)
}

impl Worker {
    fn key(&self) -> String {
        format!("{}/{}", self.ns, self.name)
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.ctx.client.clone(), &self.ns)
    }

    fn volumes_dir(&self) -> PathBuf {
        self.dir.join("volumes")
    }

    fn classify(&self, pod: &Pod) -> Plan {
        let Some(c) = first_container(pod) else {
            return Plan::Unsupported {
                reason: "NoContainers",
                message: "pod has no containers".into(),
            };
        };
        let image = c.image.clone().unwrap_or_default();
        if !is_partnergate_image(&image, &self.ctx.args.image_names) {
            return Plan::Unsupported {
                reason: "UnsupportedImage",
                message: format!(
                    "process-kubelet only runs partnergate images (repository ending in {:?}) as local processes; image {image:?} of container {:?} cannot run on this node",
                    self.ctx.args.image_names, c.name
                ),
            };
        }
        let Some(cmd0) = c.command.as_ref().and_then(|v| v.first()) else {
            return Plan::Unsupported {
                reason: "UnsupportedCommand",
                message: format!(
                    "container {:?} has no command; process-kubelet needs command[0] to name a binary in --bin-dir",
                    c.name
                ),
            };
        };
        let base = Path::new(cmd0)
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        for d in &self.ctx.args.bin_dirs {
            let p = d.join(&base);
            if p.is_file() {
                return Plan::Run { binary: p };
            }
        }
        Plan::Unsupported {
            reason: "BinaryNotFound",
            message: format!(
                "binary {base:?} (command[0] of container {:?}) not found in --bin-dir {:?}",
                c.name, self.ctx.args.bin_dirs
            ),
        }
    }

    async fn event_once(&mut self, pod: &Pod, type_: &str, reason: &str, message: &str) {
        let k = format!("{reason}\n{message}");
        if self.emitted.insert(k) {
            let c = first_container(pod).map(|c| c.name.clone());
            events::emit(&self.ctx, pod, c.as_deref(), type_, reason, message).await;
        }
    }

    async fn event(&self, pod: &Pod, type_: &str, reason: &str, message: &str) {
        let c = first_container(pod).map(|c| c.name.clone());
        events::emit(&self.ctx, pod, c.as_deref(), type_, reason, message).await;
    }

    fn mount_map(&self, pod: &Pod) -> MountMap {
        let Some(c) = first_container(pod) else {
            return Vec::new();
        };
        let vols: HashMap<&str, &Volume> = pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.as_ref())
            .map(|v| v.iter().map(|v| (v.name.as_str(), v)).collect())
            .unwrap_or_default();
        let mut out: MountMap = Vec::new();
        for m in c.volume_mounts.iter().flatten() {
            let mount = m.mount_path.trim_end_matches('/');
            if mount.is_empty() {
                continue;
            }
            let mut host = match vols.get(m.name.as_str()).and_then(|v| v.host_path.as_ref()) {
                Some(hp) => PathBuf::from(&hp.path),
                None => self.volumes_dir().join(&m.name),
            };
            if let Some(sp) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
                host = host.join(sp);
            }
            out.push((mount.to_string(), host.to_string_lossy().into_owned()));
        }
        out.sort_by_key(|(m, _)| std::cmp::Reverse(m.len()));
        out
    }

    fn sa_mount_host_dir(&self, pod: &Pod) -> Option<String> {
        self.mount_map(pod)
            .into_iter()
            .find(|(m, _)| m == SA_MOUNT_PATH)
            .map(|(_, h)| h)
    }

    async fn step(&mut self, pod: &Pod) {
        if self.plan.is_none() {
            let plan = self.classify(pod);
            match &plan {
                Plan::Run { binary } => {
                    let image = first_container(pod)
                        .and_then(|c| c.image.clone())
                        .unwrap_or_default();
                    info!(pod = %self.key(), binary = %binary.display(), "running pod as a local process");
                    let msg = format!(
                        "Container image {image:?} is a partnergate image: running local binary {} instead of pulling",
                        binary.display()
                    );
                    self.event_once(pod, "Normal", "Pulled", &msg).await;
                    if let Some(spec) = &pod.spec
                        && (spec.containers.len() > 1
                            || spec.init_containers.as_ref().is_some_and(|v| !v.is_empty()))
                    {
                        let msg = "process-kubelet runs only the first container; other containers and init containers are ignored";
                        warn!(pod = %self.key(), "{msg}");
                        self.event_once(pod, "Warning", "ContainersIgnored", msg)
                            .await;
                    }
                }
                Plan::Unsupported { reason, message } => {
                    info!(pod = %self.key(), reason, "{message}");
                    let (r, m) = (reason.to_string(), message.clone());
                    self.event_once(pod, "Warning", &r, &m).await;
                }
            }
            self.plan = Some(plan);
        }
        if matches!(self.plan, Some(Plan::Unsupported { .. })) {
            self.report_status(pod).await;
            return;
        }

        if self.ip.is_none() {
            let preferred = pod
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|s| s.parse::<Ipv4Addr>().ok());
            let ip = match self.ctx.ipam.lock() {
                Ok(mut ipam) => ipam.allocate(preferred),
                Err(_) => None,
            };
            let ip = match ip {
                Some(ip) if self.ctx.manage_addresses => match crate::net::add_address(ip).await {
                    Ok(()) => Some(ip),
                    Err(e) => {
                        if let Ok(mut ipam) = self.ctx.ipam.lock() {
                            ipam.release(ip);
                        }
                        let msg = format!("cannot add pod IP {ip} to lo: {e:#}");
                        warn!(pod = %self.key(), error = %msg, "pod network setup failed");
                        self.waiting = Some(("ContainerCreating".into(), msg.clone()));
                        self.event_once(pod, "Warning", "FailedCreatePodSandBox", &msg)
                            .await;
                        self.report_status(pod).await;
                        return;
                    }
                },
                other => other,
            };
            match ip {
                Some(ip) => {
                    info!(pod = %self.key(), %ip, "pod IP allocated");
                    self.ip = Some(ip);
                }
                None => {
                    self.waiting = Some((
                        "ContainerCreating".into(),
                        "no free pod IP in --pod-cidr".into(),
                    ));
                    self.event_once(
                        pod,
                        "Warning",
                        "FailedCreatePodSandBox",
                        "no free pod IP in --pod-cidr",
                    )
                    .await;
                    self.report_status(pod).await;
                    return;
                }
            }
        }

        if Instant::now() >= self.next_volume_sync {
            self.next_volume_sync = Instant::now() + Duration::from_millis(1500);
            match self.sync_volumes(pod).await {
                Ok(()) => self.volumes_ok = true,
                Err(e) => {
                    let msg = format!("{e:#}");
                    if self.emitted.insert(format!("volume-error\n{msg}")) {
                        warn!(pod = %self.key(), error = %msg, "volume setup failed (retrying every 1.5 s)");
                    }
                    if self.proc.is_none() && !self.volumes_ok {
                        self.waiting = Some(("ContainerCreating".into(), msg.clone()));
                    }
                    self.event_once(pod, "Warning", "FailedMount", &msg).await;
                }
            }
        }

        self.check_exit(pod).await;

        if self.proc.is_none()
            && self.terminal.is_none()
            && self.volumes_ok
            && Instant::now() >= self.next_start
            && let Err(e) = self.start(pod).await
        {
            let msg = format!("{e:#}");
            warn!(pod = %self.key(), error = %msg, "cannot start process");
            self.waiting = Some(("CreateContainerConfigError".into(), msg.clone()));
            self.event_once(pod, "Warning", "Failed", &msg).await;
            self.next_start = Instant::now() + Duration::from_secs(2);
        }

        self.probe(pod).await;
        self.report_status(pod).await;
    }

    // ---------------------------------------------------------------- volumes

    async fn sync_volumes(&mut self, pod: &Pod) -> anyhow::Result<()> {
        let mounts = if self.ctx.args.rewrite_file_contents {
            self.mount_map(pod)
        } else {
            Vec::new()
        };
        let vols = pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.clone())
            .unwrap_or_default();
        let mut errors = Vec::new();
        for v in &vols {
            let dir = self.volumes_dir().join(&v.name);
            if v.empty_dir.is_some() {
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("create {}", dir.display()))?;
                continue;
            }
            if v.host_path.is_some() {
                continue;
            }
            let payload = match self.payload(pod, v, &mounts).await {
                Ok(Some(p)) => p,
                Ok(None) => {
                    if self
                        .emitted
                        .insert(format!("unsupported-volume/{}", v.name))
                    {
                        warn!(pod = %self.key(), volume = %v.name, "volume type not supported by process-kubelet; skipped");
                    }
                    continue;
                }
                Err(e) => {
                    errors.push(format!(
                        "MountVolume.SetUp failed for volume {:?}: {e:#}",
                        v.name
                    ));
                    continue;
                }
            };
            if self.written.get(&v.name) != Some(&payload) {
                volumes::write_atomic(&dir, &payload)
                    .with_context(|| format!("write volume {:?}", v.name))?;
                if self.written.contains_key(&v.name) {
                    info!(pod = %self.key(), volume = %v.name, "volume content updated");
                }
                self.written.insert(v.name.clone(), payload);
            }
        }
        if let Some(sa_dir) = self.sa_mount_host_dir(pod) {
            let kc = self.kubeconfig_text(&sa_dir);
            let path = self.dir.join("kubeconfig");
            if std::fs::read_to_string(&path).ok().as_deref() != Some(kc.as_str()) {
                std::fs::write(&path, kc).context("write pod kubeconfig")?;
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(anyhow!(errors.join("; ")))
        }
    }

    fn kubeconfig_text(&self, sa_dir: &str) -> String {
        let kc = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "in-cluster", "cluster": {
                "server": self.ctx.api_url,
                "certificate-authority": format!("{sa_dir}/ca.crt"),
            }}],
            "users": [{"name": "serviceaccount", "user": {"tokenFile": format!("{sa_dir}/token")}}],
            "contexts": [{"name": "in-cluster", "context": {
                "cluster": "in-cluster", "user": "serviceaccount", "namespace": self.ns,
            }}],
            "current-context": "in-cluster",
        });
        serde_json::to_string_pretty(&kc).unwrap_or_default()
    }

    async fn configmap_map(
        &self,
        name: &str,
        mounts: &MountMap,
    ) -> anyhow::Result<Option<BTreeMap<String, Vec<u8>>>> {
        let api: Api<ConfigMap> = Api::namespaced(self.ctx.client.clone(), &self.ns);
        let Some(cm) = api.get_opt(name).await.context("get configmap")? else {
            return Ok(None);
        };
        let mut m = BTreeMap::new();
        for (k, v) in cm.data.into_iter().flatten() {
            m.insert(k, env::rewrite_paths(&v, mounts).into_bytes());
        }
        for (k, v) in cm.binary_data.into_iter().flatten() {
            m.insert(k, v.0);
        }
        Ok(Some(m))
    }

    async fn secret_map(
        &self,
        name: &str,
        mounts: &MountMap,
    ) -> anyhow::Result<Option<BTreeMap<String, Vec<u8>>>> {
        let api: Api<Secret> = Api::namespaced(self.ctx.client.clone(), &self.ns);
        let Some(s) = api.get_opt(name).await.context("get secret")? else {
            return Ok(None);
        };
        let mut m = BTreeMap::new();
        for (k, v) in s.data.into_iter().flatten() {
            let bytes = match String::from_utf8(v.0) {
                Ok(text) => env::rewrite_paths(&text, mounts).into_bytes(),
                Err(e) => e.into_bytes(),
            };
            m.insert(k, bytes);
        }
        for (k, v) in s.string_data.into_iter().flatten() {
            m.entry(k).or_insert_with(|| v.into_bytes());
        }
        Ok(Some(m))
    }

    /// `Ok(None)`: volume type not materialised by this kubelet.
    async fn payload(
        &mut self,
        pod: &Pod,
        v: &Volume,
        mounts: &MountMap,
    ) -> anyhow::Result<Option<Payload>> {
        let mut out = Payload::new();
        let mode_of = |m: Option<i32>| m.map(|m| (m as u32) & 0o777).unwrap_or(0o644);
        if let Some(cm) = &v.config_map {
            let optional = cm.optional.unwrap_or(false);
            let what = format!("configmap {:?}", cm.name);
            match self.configmap_map(&cm.name, mounts).await? {
                Some(data) => volumes::project_keys(
                    &mut out,
                    &data,
                    cm.items.as_ref(),
                    mode_of(cm.default_mode),
                    optional,
                    &what,
                )?,
                None if optional => {}
                None => bail!("configmap {:?} not found", cm.name),
            }
            return Ok(Some(out));
        }
        if let Some(s) = &v.secret {
            let optional = s.optional.unwrap_or(false);
            let name = s.secret_name.clone().unwrap_or_default();
            let what = format!("secret {name:?}");
            match self.secret_map(&name, mounts).await? {
                Some(data) => volumes::project_keys(
                    &mut out,
                    &data,
                    s.items.as_ref(),
                    mode_of(s.default_mode),
                    optional,
                    &what,
                )?,
                None if optional => {}
                None => bail!("secret {name:?} not found"),
            }
            return Ok(Some(out));
        }
        if let Some(d) = &v.downward_api {
            let mode = mode_of(d.default_mode);
            self.downward_items(pod, d.items.as_ref(), mode, &mut out)?;
            return Ok(Some(out));
        }
        if let Some(p) = &v.projected {
            let mode = mode_of(p.default_mode);
            for src in p.sources.iter().flatten() {
                if let Some(cm) = &src.config_map {
                    let optional = cm.optional.unwrap_or(false);
                    let what = format!("configmap {:?}", cm.name);
                    match self.configmap_map(&cm.name, mounts).await? {
                        Some(data) => volumes::project_keys(
                            &mut out,
                            &data,
                            cm.items.as_ref(),
                            mode,
                            optional,
                            &what,
                        )?,
                        None if optional => {}
                        None => bail!("configmap {:?} not found", cm.name),
                    }
                }
                if let Some(s) = &src.secret {
                    let optional = s.optional.unwrap_or(false);
                    let what = format!("secret {:?}", s.name);
                    match self.secret_map(&s.name, mounts).await? {
                        Some(data) => volumes::project_keys(
                            &mut out,
                            &data,
                            s.items.as_ref(),
                            mode,
                            optional,
                            &what,
                        )?,
                        None if optional => {}
                        None => bail!("secret {:?} not found", s.name),
                    }
                }
                if let Some(d) = &src.downward_api {
                    self.downward_items(pod, d.items.as_ref(), mode, &mut out)?;
                }
                if let Some(t) = &src.service_account_token {
                    let key = format!("{}/{}", v.name, t.path);
                    let token = self
                        .token(pod, &key, t.audience.as_deref(), t.expiration_seconds)
                        .await?;
                    // Tokens are private to the pod: 0600 unless the volume says otherwise.
                    let m = p.default_mode.map(|m| (m as u32) & 0o777).unwrap_or(0o600);
                    out.insert(t.path.clone(), (token.into_bytes(), m));
                }
            }
            // ca.crt from the kube-root-ca.crt ConfigMap is what a real kubelet projects; make sure
            // it is the cluster CA even if the publisher has not run yet.
            if !out.contains_key("ca.crt")
                && v.name.starts_with("kube-api-access-")
                && !self.ctx.ca_pem.is_empty()
            {
                out.insert(
                    "ca.crt".into(),
                    (self.ctx.ca_pem.clone().into_bytes(), mode),
                );
            }
            return Ok(Some(out));
        }
        Ok(None)
    }

    fn downward_items(
        &self,
        pod: &Pod,
        items: Option<&Vec<k8s_openapi::api::core::v1::DownwardAPIVolumeFile>>,
        mode: u32,
        out: &mut Payload,
    ) -> anyhow::Result<()> {
        let ip = self.ip.map(|i| i.to_string()).unwrap_or_default();
        for it in items.into_iter().flatten() {
            let value = if let Some(f) = &it.field_ref {
                env::field_value(pod, &ip, &f.field_path)?
            } else {
                "0".to_string()
            };
            let m = it.mode.map(|m| (m as u32) & 0o777).unwrap_or(mode);
            out.insert(it.path.clone(), (value.into_bytes(), m));
        }
        Ok(())
    }

    async fn token(
        &mut self,
        pod: &Pod,
        key: &str,
        audience: Option<&str>,
        expiration: Option<i64>,
    ) -> anyhow::Result<String> {
        if let Some(t) = self.tokens.get(key)
            && Instant::now() < t.refresh_at
        {
            return Ok(t.token.clone());
        }
        let sa = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into());
        let audiences: Vec<&str> = audience.filter(|a| !a.is_empty()).into_iter().collect();
        let tr: TokenRequest = serde_json::from_value(json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {
                "audiences": audiences,
                "expirationSeconds": expiration.unwrap_or(3600).max(600),
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.name, "uid": self.uid},
            },
        }))
        .context("build TokenRequest")?;
        let api: Api<ServiceAccount> = Api::namespaced(self.ctx.client.clone(), &self.ns);
        let resp = api
            .create_token_request(&sa, &PostParams::default(), &tr)
            .await
            .with_context(|| format!("TokenRequest for serviceaccount {}/{sa}", self.ns))?;
        let status = resp.status.context("TokenRequest returned no status")?;
        let token = status.token.context("TokenRequest returned no token")?;
        let now = Timestamp::now();
        let ttl = status
            .expiration_timestamp
            .map(|t| t.0.duration_since(now).as_secs())
            .unwrap_or(600)
            .max(60) as u64;
        let refresh = Duration::from_secs((ttl * 8 / 10).min(24 * 3600));
        info!(pod = %self.key(), serviceaccount = %sa, refresh_in = ?refresh, "service-account token issued");
        self.tokens.insert(
            key.to_string(),
            Token {
                token: token.clone(),
                refresh_at: Instant::now() + refresh,
            },
        );
        Ok(token)
    }

    // ---------------------------------------------------------------- process

    async fn start(&mut self, pod: &Pod) -> anyhow::Result<()> {
        let Some(Plan::Run { binary }) = &self.plan else {
            bail!("pod is not runnable");
        };
        let binary = binary.clone();
        let c = first_container(pod).context("no container")?.clone();
        let ip = self.ip.context("no pod IP")?.to_string();
        let mounts = self.mount_map(pod);

        let mut base = BTreeMap::new();
        let mut path = String::new();
        for d in &self.ctx.args.bin_dirs {
            path.push_str(&d.to_string_lossy());
            path.push(':');
        }
        path.push_str("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
        base.insert("PATH".to_string(), path);
        base.insert("HOSTNAME".to_string(), self.name.clone());
        base.insert("HOME".to_string(), self.dir.to_string_lossy().into_owned());
        let (h, p) = (&self.ctx.api_host, self.ctx.api_port);
        base.insert("KUBERNETES_SERVICE_HOST".into(), h.clone());
        base.insert("KUBERNETES_SERVICE_PORT".into(), p.to_string());
        base.insert("KUBERNETES_SERVICE_PORT_HTTPS".into(), p.to_string());
        base.insert("KUBERNETES_PORT".into(), format!("tcp://{h}:{p}"));
        for name in &self.ctx.args.pass_env {
            if let Ok(v) = std::env::var(name) {
                base.insert(name.clone(), v);
            }
        }
        let mut vars = env::resolve_env(&self.ctx.client, pod, &c, &ip, base).await?;
        vars.insert(BIND_IP_ENV.to_string(), ip.clone());
        if self.sa_mount_host_dir(pod).is_some() && !vars.contains_key("KUBECONFIG") {
            vars.insert(
                "KUBECONFIG".into(),
                self.dir.join("kubeconfig").to_string_lossy().into_owned(),
            );
        }
        for v in vars.values_mut() {
            *v = env::rewrite_paths(v, &mounts);
        }
        let args: Vec<String> = c
            .command
            .iter()
            .flatten()
            .skip(1)
            .chain(c.args.iter().flatten())
            .map(|a| env::rewrite_paths(&env::expand(a, &vars), &mounts))
            .collect();
        let workdir = c
            .working_dir
            .as_deref()
            .map(|w| PathBuf::from(env::rewrite_paths(w, &mounts)))
            .filter(|p| p.is_dir())
            .unwrap_or_else(|| self.dir.clone());

        std::fs::create_dir_all(&self.dir)?;
        let log_path = self.dir.join(format!("{}.log", c.name));
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("open {}", log_path.display()))?;
        {
            use std::io::Write as _;
            let _ = writeln!(
                log,
                "{}{} start #{}: {} {:?} (pod IP {ip})",
                logs::HEADER_PREFIX,
                Timestamp::now(),
                self.restart_count + i32::from(self.last_term.is_some()),
                binary.display(),
                args
            );
        }
        let resolv = match crate::net::resolv_conf(
            pod,
            self.ctx.args.cluster_dns,
            &self.ctx.args.cluster_domain,
        ) {
            Some(text) => {
                let path = self.dir.join("resolv.conf");
                std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
                Some(crate::net::ResolvMount::new(&path)?)
            }
            None => None,
        };
        // Output goes through pipes so each line gets the time it was read (CRI records, see
        // logs.rs); the copiers end when the process and its children close the pipes.
        let log = Arc::new(std::sync::Mutex::new(log));
        let mut cmd = tokio::process::Command::new(&binary);
        cmd.args(&args)
            .env_clear()
            .envs(&vars)
            .current_dir(&workdir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: only async-signal-safe libc calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // own process group (so signals reach the whole tree) and die with the kubelet
                libc::setpgid(0, 0);
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if let Some(r) = &resolv {
                    r.apply()?;
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawn {}", binary.display()))?;
        if let Some(out) = child.stdout.take() {
            tokio::spawn(logs::copy_stream(out, "stdout", log.clone()));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(logs::copy_stream(err, "stderr", log));
        }
        let pid = child.id().map(|p| p as i32).unwrap_or(0);
        if self.last_term.is_some() {
            self.restart_count += 1;
        }
        info!(pod = %self.key(), pid, %ip, restart = self.restart_count, "process started");
        self.proc = Some(Proc {
            child,
            pid,
            started_at: Timestamp::now().to_string(),
            started: Instant::now(),
        });
        self.waiting = None;
        self.ready = false;
        self.probe_ok = 0;
        self.probe_fail = 0;
        let delay = c
            .readiness_probe
            .as_ref()
            .and_then(|p| p.initial_delay_seconds)
            .unwrap_or(0)
            .max(0) as u64;
        self.next_probe = Instant::now() + Duration::from_secs(delay);
        let live_delay = c
            .liveness_probe
            .as_ref()
            .and_then(|p| p.initial_delay_seconds)
            .unwrap_or(0)
            .max(0) as u64;
        self.live_fail = 0;
        self.next_live = Instant::now() + Duration::from_secs(live_delay);
        let msg = format!("Started container {} (process {pid}, pod IP {ip})", c.name);
        self.event(pod, "Normal", "Started", &msg).await;
        Ok(())
    }

    async fn check_exit(&mut self, pod: &Pod) {
        let Some(p) = self.proc.as_mut() else { return };
        let status = match p.child.try_wait() {
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(e) => {
                warn!(pod = %self.key(), error = %e, "cannot poll process");
                return;
            }
        };
        use std::os::unix::process::ExitStatusExt as _;
        let code = status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
        let ran = p.started.elapsed();
        let term = Term {
            exit_code: code,
            signal: status.signal(),
            reason: if code == 0 { "Completed" } else { "Error" },
            started_at: p.started_at.clone(),
            finished_at: Timestamp::now().to_string(),
        };
        let pid = p.pid;
        self.proc = None;
        self.ready = false;
        self.last_term = Some(term);
        let policy = pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into());
        let restart = match policy.as_str() {
            "Never" => false,
            "OnFailure" => code != 0,
            _ => true,
        };
        warn!(pod = %self.key(), pid, exit_code = code, ?ran, restart, "process exited");
        if !restart {
            self.terminal = Some(if code == 0 { "Succeeded" } else { "Failed" });
            return;
        }
        if ran > Duration::from_secs(10) {
            self.backoff = Duration::from_secs(1);
        }
        self.next_start = Instant::now() + self.backoff;
        let name = first_container(pod)
            .map(|c| c.name.clone())
            .unwrap_or_default();
        let msg = format!(
            "Back-off {:?} restarting failed container {name} (exit code {code}; log {})",
            self.backoff,
            self.dir.join(format!("{name}.log")).display()
        );
        self.waiting = Some(("CrashLoopBackOff".into(), msg.clone()));
        self.event(pod, "Warning", "BackOff", &msg).await;
        self.backoff =
            (self.backoff * 2).min(Duration::from_secs(self.ctx.args.max_backoff_secs.max(1)));
    }

    async fn probe(&mut self, pod: &Pod) {
        self.liveness(pod).await;
        if self.proc.is_none() {
            self.ready = false;
            return;
        }
        let Some(c) = first_container(pod) else {
            return;
        };
        let Some(pr) = c.readiness_probe.clone() else {
            self.ready = true;
            return;
        };
        if Instant::now() < self.next_probe {
            return;
        }
        let period = pr.period_seconds.unwrap_or(10).clamp(1, 2) as u64;
        self.next_probe = Instant::now() + Duration::from_secs(period);
        if pr.exec.is_some() && self.emitted.insert("exec-probe".into()) {
            warn!(pod = %self.key(), "exec readiness probes are not run by process-kubelet; treated as success");
        }
        let ip = self.ip.map(|i| i.to_string()).unwrap_or_default();
        match probe::run(&pr, c, &ip).await {
            Ok(()) => {
                self.probe_fail = 0;
                self.probe_ok += 1;
                if self.probe_ok >= pr.success_threshold.unwrap_or(1).max(1) && !self.ready {
                    info!(pod = %self.key(), "readiness probe succeeded: pod is Ready");
                    self.ready = true;
                }
            }
            Err(msg) => {
                self.probe_ok = 0;
                self.probe_fail += 1;
                let threshold = pr.failure_threshold.unwrap_or(3).max(1);
                if self.probe_fail == threshold || (self.ready && self.probe_fail >= threshold) {
                    if self.ready {
                        info!(pod = %self.key(), %msg, "readiness probe failing: pod is not Ready");
                    }
                    self.ready = false;
                    self.event(
                        pod,
                        "Warning",
                        "Unhealthy",
                        &format!("Readiness probe failed: {msg}"),
                    )
                    .await;
                }
            }
        }
    }

    /// Liveness probe: `failureThreshold` consecutive failures kill the process (SIGTERM, grace,
    /// SIGKILL); it is then restarted like after a crash.
    async fn liveness(&mut self, pod: &Pod) {
        if self.proc.is_none() || Instant::now() < self.next_live {
            return;
        }
        let Some(c) = first_container(pod) else {
            return;
        };
        let Some(pr) = c.liveness_probe.clone() else {
            return;
        };
        let period = pr.period_seconds.unwrap_or(10).max(1) as u64;
        self.next_live = Instant::now() + Duration::from_secs(period);
        let ip = self.ip.map(|i| i.to_string()).unwrap_or_default();
        match probe::run(&pr, c, &ip).await {
            Ok(()) => self.live_fail = 0,
            Err(msg) => {
                self.live_fail += 1;
                self.event(
                    pod,
                    "Warning",
                    "Unhealthy",
                    &format!("Liveness probe failed: {msg}"),
                )
                .await;
                if self.live_fail >= pr.failure_threshold.unwrap_or(3).max(1) {
                    let name = c.name.clone();
                    self.event(
                        pod,
                        "Normal",
                        "Killing",
                        &format!("Container {name} failed liveness probe, will be restarted"),
                    )
                    .await;
                    let grace = pod
                        .spec
                        .as_ref()
                        .and_then(|s| s.termination_grace_period_seconds)
                        .unwrap_or(30)
                        .max(1) as u64;
                    self.stop(Duration::from_secs(grace)).await;
                    self.check_exit(pod).await;
                }
            }
        }
    }

    /// SIGTERM to the process group, up to `grace` to exit, then SIGKILL.
    async fn stop(&mut self, grace: Duration) {
        let key = self.key();
        let Some(p) = self.proc.as_mut() else {
            return;
        };
        if p.pid > 0 {
            // SAFETY: plain kill(2) on our own child's process group.
            unsafe {
                libc::kill(-p.pid, libc::SIGTERM);
            }
        }
        match tokio::time::timeout(grace, p.child.wait()).await {
            Ok(_) => info!(pod = %key, pid = p.pid, "process stopped"),
            Err(_) => {
                warn!(pod = %key, pid = p.pid, ?grace, "process ignored SIGTERM: SIGKILL");
                if p.pid > 0 {
                    // SAFETY: as above.
                    unsafe {
                        libc::kill(-p.pid, libc::SIGKILL);
                    }
                }
                let _ = p.child.kill().await;
            }
        }
        // stray members of the group
        if p.pid > 0 {
            // SAFETY: as above.
            unsafe {
                libc::kill(-p.pid, libc::SIGKILL);
            }
        }
        self.ready = false;
    }

    /// Runs the container's preStop hook (sleep or httpGet; exec is skipped), bounded by `grace`.
    /// Returns the time it took.
    async fn pre_stop(&self, pod: &Pod, grace: Duration) -> Duration {
        let started = Instant::now();
        let Some(c) = first_container(pod) else {
            return Duration::ZERO;
        };
        let Some(h) = c.lifecycle.as_ref().and_then(|l| l.pre_stop.clone()) else {
            return Duration::ZERO;
        };
        if let Some(sl) = &h.sleep {
            let d = Duration::from_secs(sl.seconds.max(0) as u64).min(grace);
            info!(pod = %self.key(), ?d, "preStop sleep");
            tokio::time::sleep(d).await;
        } else if h.http_get.is_some() || h.tcp_socket.is_some() {
            let pr = k8s_openapi::api::core::v1::Probe {
                http_get: h.http_get.clone(),
                tcp_socket: h.tcp_socket.clone(),
                timeout_seconds: Some(grace.as_secs().clamp(1, 30) as i32),
                ..Default::default()
            };
            let ip = self.ip.map(|i| i.to_string()).unwrap_or_default();
            if let Err(e) = probe::run(&pr, c, &ip).await {
                warn!(pod = %self.key(), error = %e, "preStop hook failed");
            }
        } else if h.exec.is_some() {
            warn!(pod = %self.key(), "exec preStop hooks are not run by process-kubelet");
        }
        started.elapsed()
    }

    async fn release_ip(&mut self) {
        let Some(ip) = self.ip.take() else {
            return;
        };
        if self.ctx.manage_addresses
            && let Err(e) = crate::net::del_address(ip).await
        {
            warn!(pod = %self.key(), error = %e, "cannot remove pod IP from lo");
        }
        if let Ok(mut ipam) = self.ctx.ipam.lock() {
            ipam.release(ip);
        }
    }

    async fn cleanup(&mut self) {
        self.release_ip().await;
        if let Err(e) = std::fs::remove_dir_all(&self.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(pod = %self.key(), error = %e, "cannot remove pod state dir");
        }
    }

    async fn terminate(&mut self, pod: &Pod) {
        let grace = pod
            .metadata
            .deletion_grace_period_seconds
            .or_else(|| {
                pod.spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
            })
            .unwrap_or(30)
            .max(0) as u64;
        if self.proc.is_some() {
            let name = first_container(pod)
                .map(|c| c.name.clone())
                .unwrap_or_default();
            self.event(
                pod,
                "Normal",
                "Killing",
                &format!("Stopping container {name}"),
            )
            .await;
            // Not ready while terminating.
            self.ready = false;
            self.waiting = None;
            self.report_status(pod).await;
            let grace = Duration::from_secs(grace.max(1));
            let spent = self.pre_stop(pod, grace).await;
            self.stop(grace.saturating_sub(spent).max(Duration::from_secs(1)))
                .await;
        }
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(self.uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match self.pods().delete(&self.name, &dp).await {
            Ok(_) => info!(pod = %self.key(), "pod terminated and deleted"),
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => warn!(pod = %self.key(), error = %e, "final pod delete failed"),
        }
        self.cleanup().await;
    }

    // ---------------------------------------------------------------- status

    fn cond(
        &mut self,
        type_: &str,
        ok: bool,
        reason: Option<&str>,
        message: Option<&str>,
    ) -> Value {
        let status = if ok { "True" } else { "False" };
        let entry = self
            .conds
            .entry(type_.to_string())
            .or_insert_with(|| (status.to_string(), Timestamp::now().to_string()));
        if entry.0 != status {
            *entry = (status.to_string(), Timestamp::now().to_string());
        }
        let mut c = json!({"type": type_, "status": status, "lastProbeTime": null, "lastTransitionTime": entry.1});
        if let Some(r) = reason {
            c["reason"] = json!(r);
        }
        if let Some(m) = message {
            c["message"] = json!(m);
        }
        c
    }

    fn build_status(&mut self, pod: &Pod) -> Value {
        let Some(c) = first_container(pod) else {
            return json!({});
        };
        let cname = c.name.clone();
        let image = c.image.clone().unwrap_or_default();
        let unsupported = match &self.plan {
            Some(Plan::Unsupported { reason, message }) => {
                Some((reason.to_string(), message.clone()))
            }
            _ => None,
        };
        let running = self.proc.is_some();
        let ready = running && self.ready;
        let phase = if unsupported.is_some() {
            "Pending"
        } else if let Some(t) = self.terminal {
            t
        } else if running || self.last_term.is_some() {
            "Running"
        } else {
            "Pending"
        };
        let state = if let Some(p) = &self.proc {
            json!({"running": {"startedAt": p.started_at}})
        } else if let Some((reason, message)) = &unsupported {
            json!({"waiting": {"reason": reason, "message": message}})
        } else if let (Some(_), Some(t)) = (self.terminal, &self.last_term) {
            term_json(t)
        } else if let Some((reason, message)) = &self.waiting {
            json!({"waiting": {"reason": reason, "message": message}})
        } else {
            json!({"waiting": {"reason": "ContainerCreating"}})
        };
        let last_state = match (&self.last_term, self.terminal) {
            (Some(t), None) => term_json(t),
            _ => json!({}),
        };
        let not_ready_msg = format!("containers with unready status: [{cname}]");
        let mut conditions =
            vec![self.cond("PodReadyToStartContainers", self.ip.is_some(), None, None)];
        conditions.push(self.cond("Initialized", true, None, None));
        if let Some((reason, message)) = &unsupported {
            conditions.push(self.cond("Ready", false, Some(reason), Some(message)));
            conditions.push(self.cond("ContainersReady", false, Some(reason), Some(message)));
        } else if ready {
            conditions.push(self.cond("Ready", true, None, None));
            conditions.push(self.cond("ContainersReady", true, None, None));
        } else {
            conditions.push(self.cond(
                "Ready",
                false,
                Some("ContainersNotReady"),
                Some(&not_ready_msg),
            ));
            conditions.push(self.cond(
                "ContainersReady",
                false,
                Some("ContainersNotReady"),
                Some(&not_ready_msg),
            ));
        }
        conditions.push(self.cond("PodScheduled", true, None, None));
        let container_id = self.proc.as_ref().map(|p| format!("process://{}", p.pid));
        let mut cs = json!({
            "name": cname,
            "image": image,
            "imageID": "",
            "ready": ready,
            "started": running,
            "restartCount": self.restart_count,
            "state": state,
            "lastState": last_state,
        });
        if let Some(id) = container_id {
            cs["containerID"] = json!(id);
        }
        let mut status = json!({
            "phase": phase,
            "conditions": conditions,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "startTime": self.start_time,
            "containerStatuses": [cs],
            "qosClass": pod.status.as_ref().and_then(|s| s.qos_class.clone()).unwrap_or_else(|| "BestEffort".into()),
        });
        if let Some(ip) = self.ip {
            status["podIP"] = json!(ip.to_string());
            status["podIPs"] = json!([{"ip": ip.to_string()}]);
        }
        if let Some((reason, message)) = &unsupported {
            status["reason"] = json!(reason);
            status["message"] = json!(message);
        }
        if let Some(g) = pod.metadata.generation {
            status["observedGeneration"] = json!(g);
        }
        status
    }

    async fn report_status(&mut self, pod: &Pod) {
        let status = self.build_status(pod);
        if self.last_status.as_ref() == Some(&status) {
            return;
        }
        let patch = json!({"status": status});
        match self
            .pods()
            .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => self.last_status = Some(status),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => warn!(pod = %self.key(), error = %e, "pod status update failed"),
        }
    }
}

fn term_json(t: &Term) -> Value {
    let mut v = json!({"terminated": {
        "exitCode": t.exit_code,
        "reason": t.reason,
        "startedAt": t.started_at,
        "finishedAt": t.finished_at,
    }});
    if let Some(s) = t.signal {
        v["terminated"]["signal"] = json!(s);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partnergate_images() {
        let names = vec!["partnergate".to_string()];
        for ok in [
            "partnergate/partnergate:0.1.0",
            "partnergate/partnergate:test",
            "registry.example.com:5000/team/partnergate:1",
            "ghcr.io/x/partnergate@sha256:abcd",
            "partnergate",
        ] {
            assert!(is_partnergate_image(ok, &names), "{ok}");
        }
        for bad in [
            "nginx",
            "nginx:1.27",
            "partnergate/nginx:1",
            "registry:5000/partnergate-x:1",
            "partnergate:5000/nginx",
        ] {
            assert!(!is_partnergate_image(bad, &names), "{bad}");
        }
    }
}
