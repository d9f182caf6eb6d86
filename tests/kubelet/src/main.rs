//! `process-kubelet`: test-support kubelet that runs partnergate Pods as local processes.
//!
//! No container runtime exists on the test machines, so this kubelet registers a Node, watches
//! the Pods bound to it and runs each partnergate Pod's first container as a child process of
//! a local binary (looked up by `command[0]` in `--bin-dir`), bound to a pod IP of `--pod-cidr`
//! (a /32 on `lo` inside 10.244.0.0/16, see net.rs). See README.md in this directory for the contract with the binaries and the
//! deviations from a real kubelet.

mod api;
mod env;
mod events;
mod ipam;
mod logs;
mod net;
mod node;
mod pod;
mod probe;
mod volumes;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use base64::Engine as _;
use clap::Parser;
use futures::StreamExt as _;
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Pod;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher;
use kube::{Api, Client, Config};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

/// Command line of the process kubelet.
#[derive(Parser, Debug, Clone)]
#[command(name = "process-kubelet", version, about)]
pub struct Args {
    /// Kubeconfig of the kubelet (an admin or node identity).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: PathBuf,
    /// Name of the Node to register.
    #[arg(long, default_value = "local-node")]
    pub node_name: String,
    /// Directory for per-pod state: `<state-dir>/pods/<ns>_<name>/{volumes/,<container>.log}`.
    #[arg(long)]
    pub state_dir: PathBuf,
    /// Directories searched (in order) for the binary named by a container's `command[0]`.
    #[arg(long = "bin-dir", required = true)]
    pub bin_dirs: Vec<PathBuf>,
    /// Pod IPs are allocated from this range. Inside 10.244.0.0/16 each pod IP is added to `lo`
    /// as a /32 (needs CAP_NET_ADMIN and the `unreachable` guard route of tests/cluster/up.sh);
    /// inside 127.0.0.0/8 nothing is added.
    #[arg(long, default_value = "10.244.0.0/24")]
    pub pod_cidr: Ipv4Net,
    /// Cluster DNS server (the kube-dns Service IP). When set, ClusterFirst pods resolve through
    /// it: their process gets a mount namespace with its own /etc/resolv.conf.
    #[arg(long)]
    pub cluster_dns: Option<std::net::Ipv4Addr>,
    /// Cluster domain of the search path written to pods' resolv.conf.
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// Image repositories whose last path component equals one of these names are run as
    /// local processes (`partnergate/partnergate:0.1.0`, `ghcr.io/x/partnergate@sha256:...`).
    #[arg(long = "image-name", default_value = "partnergate")]
    pub image_names: Vec<String>,
    /// Environment variables of the kubelet passed through to every pod process (e.g.
    /// RUST_LOG, RUST_BACKTRACE). Pods otherwise start from a clean environment.
    #[arg(long = "pass-env")]
    pub pass_env: Vec<String>,
    /// Upper bound of the restart back-off of crashing processes, in seconds.
    #[arg(long, default_value_t = 20)]
    pub max_backoff_secs: u64,
    /// Rewrite container mount paths found inside ConfigMap/Secret file contents (UTF-8 files
    /// only) to the materialised directories, like args and env values are rewritten.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub rewrite_file_contents: bool,
    /// Port of the kubelet API (HTTPS on 127.0.0.1, the Node's InternalIP): what the
    /// apiserver calls for `kubectl logs`. Reported as `daemonEndpoints.kubeletEndpoint.Port`.
    /// 0 = no API (then --ca-cert-file/--ca-key-file are not needed).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// Cluster CA certificate (PEM): issues the API's serving certificate and must have
    /// issued every client's certificate (the apiserver's --kubelet-client-certificate).
    #[arg(long, requires = "ca_key_file")]
    pub ca_cert_file: Option<PathBuf>,
    /// Key of --ca-cert-file (PEM, PKCS#8), used once at start to sign the serving certificate.
    #[arg(long, requires = "ca_cert_file")]
    pub ca_key_file: Option<PathBuf>,
}

/// State shared by the node loop, the pod manager and the pod workers.
pub struct Ctx {
    pub client: Client,
    pub args: Args,
    /// Host part of the apiserver URL as pods should reach it (KUBERNETES_SERVICE_HOST).
    pub api_host: String,
    /// Port of the apiserver URL (KUBERNETES_SERVICE_PORT).
    pub api_port: u16,
    /// The apiserver URL, e.g. `https://127.0.0.1:16443`.
    pub api_url: String,
    /// Cluster CA bundle (PEM) from the kubeconfig, written as `ca.crt` next to SA tokens.
    pub ca_pem: String,
    pub ipam: Mutex<ipam::Ipam>,
    /// Pod IPs are /32 addresses on `lo` that the kubelet adds and removes (10.244/16 range).
    pub manage_addresses: bool,
    /// Server version (`v1.36.3`), reported as the kubelet version.
    pub kube_version: String,
}

fn der_to_pem(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

async fn build_ctx(mut args: Args) -> anyhow::Result<Arc<Ctx>> {
    // Pods run with their own working directory: make every path absolute.
    let cwd = std::env::current_dir().context("current dir")?;
    for d in args.bin_dirs.iter_mut() {
        *d = std::fs::canonicalize(&*d).unwrap_or_else(|_| cwd.join(&*d));
    }
    args.state_dir =
        std::fs::canonicalize(&args.state_dir).unwrap_or_else(|_| cwd.join(&args.state_dir));
    let manage_addresses = net::manages_addresses(args.pod_cidr)?;
    if manage_addresses && !net::guard_present(args.pod_cidr).await? {
        bail!(
            "no `unreachable` route covers --pod-cidr {}: packets to unassigned pod IPs could leave \
             the machine (tests/cluster/up.sh adds `ip route add unreachable {}`)",
            args.pod_cidr,
            net::POD_SUPERNET
        );
    }
    if args.pod_cidr.prefix_len() > 29 {
        bail!(
            "--pod-cidr {} is too small (need at least a /29)",
            args.pod_cidr
        );
    }
    let kubeconfig = Kubeconfig::read_from(&args.kubeconfig)
        .with_context(|| format!("read kubeconfig {}", args.kubeconfig.display()))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .context("load kubeconfig")?;
    let api_host = config
        .cluster_url
        .host()
        .context("apiserver URL has no host")?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let api_port = config.cluster_url.port_u16().unwrap_or(443);
    let api_url = format!(
        "https://{}:{}",
        config.cluster_url.host().unwrap_or(""),
        api_port
    );
    let ca_pem: String = config
        .root_cert
        .as_ref()
        .map(|certs| certs.iter().map(|c| der_to_pem(c)).collect())
        .unwrap_or_default();
    let client = Client::try_from(config).context("build client")?;
    let kube_version = match client.apiserver_version().await {
        Ok(v) => v.git_version,
        Err(e) => {
            warn!(error = %e, "cannot read apiserver version");
            "v0.0.0".to_string()
        }
    };
    let ipam = ipam::Ipam::new(args.pod_cidr);
    Ok(Arc::new(Ctx {
        client,
        args,
        api_host,
        api_port,
        api_url,
        ca_pem,
        ipam: Mutex::new(ipam),
        manage_addresses,
        kube_version,
    }))
}

struct WorkerHandle {
    tx: watch::Sender<Option<Pod>>,
    handle: tokio::task::JoinHandle<()>,
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => info!("SIGTERM received"),
                _ = i.recv() => info!("SIGINT received"),
            }
        }
        _ => {
            warn!("cannot install signal handlers; running until killed");
            futures::future::pending::<()>().await;
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    std::fs::create_dir_all(args.state_dir.join("pods"))
        .with_context(|| format!("create {}", args.state_dir.display()))?;
    let ctx = build_ctx(args).await?;
    info!(
        node = %ctx.args.node_name,
        apiserver = %ctx.api_url,
        pod_cidr = %ctx.args.pod_cidr,
        version = %ctx.kube_version,
        "process kubelet starting"
    );

    if ctx.args.port != 0 {
        let (Some(cert), Some(key)) = (&ctx.args.ca_cert_file, &ctx.args.ca_key_file) else {
            bail!("--port needs --ca-cert-file and --ca-key-file (the cluster CA)");
        };
        let (cert, key) = api::load_ca(cert, key)?;
        let tls = api::tls_config(&cert, &key, &ctx.args.node_name)?;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], ctx.args.port));
        api::serve(ctx.clone(), addr, tls).await?;
    }
    if ctx.manage_addresses {
        // A crashed kubelet's pod IPs (its processes died with it: PR_SET_PDEATHSIG).
        let n = net::flush_range(ctx.args.pod_cidr).await?;
        if n > 0 {
            info!(addresses = n, "removed stale pod IPs from lo");
        }
    }
    node::register(&ctx).await?;
    let node_task = tokio::spawn(node::heartbeat_loop(ctx.clone()));

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<String>();
    let mut workers: HashMap<String, WorkerHandle> = HashMap::new();
    let mut init_seen: Option<HashSet<String>> = None;

    let pods: Api<Pod> = Api::all(ctx.client.clone());
    let selector = format!("spec.nodeName={}", ctx.args.node_name);
    let stream = watcher(pods, watcher::Config::default().fields(&selector)).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let shutdown = shutdown_signal();
    let mut shutdown = std::pin::pin!(shutdown);

    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(uid) = done_rx.recv() => {
                if let Some(w) = workers.get(&uid) && w.handle.is_finished() {
                    workers.remove(&uid);
                }
            }
            ev = stream.next() => {
                let Some(ev) = ev else {
                    warn!("pod watch stream ended");
                    break;
                };
                match ev {
                    Err(e) => warn!(error = %e, "pod watch error (retrying)"),
                    Ok(watcher::Event::Init) => init_seen = Some(HashSet::new()),
                    Ok(watcher::Event::InitDone) => {
                        if let Some(seen) = init_seen.take() {
                            for (uid, w) in &workers {
                                if !seen.contains(uid) {
                                    let _ = w.tx.send(None);
                                }
                            }
                        }
                    }
                    Ok(watcher::Event::InitApply(p)) | Ok(watcher::Event::Apply(p)) => {
                        let Some(uid) = p.metadata.uid.clone() else { continue };
                        if let Some(seen) = init_seen.as_mut() {
                            seen.insert(uid.clone());
                        }
                        match workers.get(&uid) {
                            Some(w) if !w.handle.is_finished() => {
                                let _ = w.tx.send(Some(p));
                            }
                            _ => {
                                let (tx, rx) = watch::channel(Some(p));
                                let handle = tokio::spawn(pod::run(
                                    ctx.clone(),
                                    rx,
                                    shutdown_rx.clone(),
                                    done_tx.clone(),
                                    uid.clone(),
                                ));
                                workers.insert(uid, WorkerHandle { tx, handle });
                            }
                        }
                    }
                    Ok(watcher::Event::Delete(p)) => {
                        if let Some(uid) = p.metadata.uid.as_ref()
                            && let Some(w) = workers.get(uid)
                        {
                            let _ = w.tx.send(None);
                        }
                    }
                }
            }
        }
    }

    info!(
        pods = workers.len(),
        "shutting down: stopping all pod processes"
    );
    let _ = shutdown_tx.send(true);
    for (_, w) in workers.drain() {
        if tokio::time::timeout(Duration::from_secs(15), w.handle)
            .await
            .is_err()
        {
            warn!("a pod worker did not stop within 15s");
        }
    }
    node_task.abort();
    if ctx.manage_addresses {
        match net::flush_range(ctx.args.pod_cidr).await {
            Ok(n) => info!(addresses = n, "removed pod IPs from lo"),
            Err(e) => warn!(error = %e, "cannot remove pod IPs from lo"),
        }
    }
    info!("process kubelet stopped");
    Ok(())
}
