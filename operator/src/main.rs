//! `partnergate-operator`: see docs/interfaces.md (command line) and docs/operations.md.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Parser;
use kube::Client;
use kube_lease_manager::{LeaseManagerBuilder, LeaseParams};
use partnergate_operator::controller::{self, Settings};
use partnergate_operator::metrics::Metrics;
use partnergate_operator::server::{self, Health};
use partnergate_operator::telemetry;
use tokio::net::TcpListener;

#[derive(Parser, Debug)]
#[command(
    name = "partnergate-operator",
    version,
    about = "Renders partnergate gateway config from PartnerConnector resources and writes their status"
)]
struct Args {
    /// Namespace of the gateway pods, the rendered ConfigMap/Secret and the leader Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "partnergate")]
    gateway_namespace: String,
    /// Label selector of the gateway pods.
    #[arg(
        long,
        env = "PARTNERGATE_GATEWAY_SELECTOR",
        default_value = "app.kubernetes.io/component=gateway,app.kubernetes.io/name=partnergate"
    )]
    gateway_selector: String,
    /// Gateway admin port (/status).
    #[arg(long, env = "PARTNERGATE_GATEWAY_ADMIN_PORT", default_value_t = 8080)]
    gateway_admin_port: u16,
    /// ConfigMap holding connectors.json.
    #[arg(
        long,
        env = "PARTNERGATE_CONNECTORS_CONFIGMAP",
        default_value = "partnergate-connectors"
    )]
    connectors_configmap: String,
    /// Secret holding the connectors' PEM material.
    #[arg(
        long,
        env = "PARTNERGATE_MATERIAL_SECRET",
        default_value = "partnergate-connector-material"
    )]
    material_secret: String,
    /// The gateway's server-certificate Secret (expiry metric and Warning event); empty = none.
    #[arg(
        long,
        env = "PARTNERGATE_SERVER_CERTIFICATE_SECRET",
        default_value = "partnergate-gateway-tls"
    )]
    server_certificate_secret: String,
    /// Comma-separated namespaces to watch for PartnerConnectors; empty = all namespaces.
    #[arg(long, env = "PARTNERGATE_WATCH_NAMESPACES", default_value = "")]
    watch_namespaces: String,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "PARTNERGATE_LISTEN", default_value = "0.0.0.0:8081")]
    listen: std::net::SocketAddr,
    /// Name of the leader-election Lease (in the gateway namespace).
    #[arg(
        long,
        env = "PARTNERGATE_LEASE_NAME",
        default_value = "partnergate-operator"
    )]
    lease_name: String,
    /// Leader identity; default: the pod name (env POD_NAME), else the host name.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Lease duration in seconds (a new leader takes over at most this long after a crash).
    #[arg(long, default_value_t = 15)]
    lease_duration_secs: u64,
    /// Seconds between reads of the gateway pods' /status.
    #[arg(long, default_value_t = 2)]
    poll_interval_secs: u64,
    /// Seconds between full re-renders that re-read every referenced Secret/ConfigMap.
    #[arg(long, default_value_t = 300)]
    resync_secs: u64,
    /// Log format.
    #[arg(long, env = "PARTNERGATE_LOG_FORMAT", default_value = "json", value_parser = ["json", "text"])]
    log_format: String,
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("partnergate-operator-{}", std::process::id()))
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    telemetry::init(args.log_format == "json");

    let identity = args.identity.clone().unwrap_or_else(host_name);
    let settings = Settings {
        gateway_namespace: args.gateway_namespace.clone(),
        gateway_selector: args.gateway_selector.clone(),
        gateway_admin_port: args.gateway_admin_port,
        connectors_configmap: args.connectors_configmap.clone(),
        material_secret: args.material_secret.clone(),
        server_certificate_secret: args.server_certificate_secret.clone(),
        watch_namespaces: args
            .watch_namespaces
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
        poll_interval: Duration::from_secs(args.poll_interval_secs.max(1)),
        debounce: Duration::from_millis(300),
        resync: Duration::from_secs(args.resync_secs.max(10)),
        instance: Some(identity.clone()),
    };

    let metrics = Metrics::new();
    let ready = Arc::new(AtomicBool::new(false));
    // PARTNERGATE_BIND_IP: the pod IP when pods share one network namespace (the test
    // substrate's process kubelet); it replaces an unspecified listen address.
    let bind_ip = std::env::var("PARTNERGATE_BIND_IP")
        .ok()
        .and_then(|v| v.parse().ok());
    let listen = partnergate_core::config::with_bind_ip(args.listen, bind_ip);
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    tracing::info!(listen = %listen, "serving /healthz, /readyz, /metrics");
    let health = Health {
        metrics: metrics.clone(),
        ready: ready.clone(),
    };
    let server_task = tokio::spawn(server::serve(listener, health));

    let client = Client::try_default()
        .await
        .map_err(|e| anyhow::anyhow!("cannot configure the Kubernetes client: {e}"))?;
    client
        .apiserver_version()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the API server: {e}"))?;
    ready.store(true, Ordering::SeqCst);

    let duration = args.lease_duration_secs.max(5);
    let manager = LeaseManagerBuilder::new(client.clone(), &args.lease_name)
        .with_namespace(&args.gateway_namespace)
        .with_parameters(
            LeaseParams::new(identity.clone(), duration, (duration / 3).max(2))
                .with_field_manager(format!("{}-lease", controller::FIELD_MANAGER)),
        )
        .build()
        .await
        .map_err(|e| anyhow::anyhow!("cannot set up leader election: {e}"))?;
    let (mut leader_rx, lease_task) = manager.watch().await;
    tracing::info!(identity = %identity, lease = %args.lease_name, namespace = %args.gateway_namespace, "waiting for leadership");

    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut work: Option<tokio::task::JoinHandle<()>> = None;
    let mut stop_tx: Option<tokio::sync::oneshot::Sender<()>> = None;
    loop {
        let leading = *leader_rx.borrow_and_update();
        metrics.leader.set(i64::from(leading));
        match (leading, work.is_some()) {
            (true, false) => {
                tracing::info!(identity = %identity, "became leader: starting controllers");
                let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                stop_tx = Some(tx);
                let stop = async move {
                    let _ = rx.await;
                };
                work = Some(tokio::spawn(controller::run(
                    client.clone(),
                    settings.clone(),
                    metrics.clone(),
                    stop,
                )));
            }
            (false, true) => {
                tracing::warn!(identity = %identity, "lost leadership: stopping controllers");
                if let Some(w) = work.take() {
                    w.abort();
                }
                stop_tx = None;
            }
            _ => {}
        }
        tokio::select! {
            changed = leader_rx.changed() => {
                if changed.is_err() {
                    tracing::error!("leader election stopped");
                    break;
                }
            }
            _ = &mut shutdown => {
                tracing::info!("shutting down");
                break;
            }
        }
    }

    ready.store(false, Ordering::SeqCst);
    if let Some(tx) = stop_tx.take() {
        let _ = tx.send(());
    }
    if let Some(w) = work.take()
        && tokio::time::timeout(Duration::from_secs(10), w)
            .await
            .is_err()
    {
        tracing::warn!("controllers did not stop within 10 s");
    }
    metrics.leader.set(0);
    // closing the channel makes the lease manager release the Lease so the other replica
    // takes over at once
    drop(leader_rx);
    match tokio::time::timeout(Duration::from_secs(5), lease_task).await {
        Ok(Ok(Ok(_))) => tracing::info!("lease released"),
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "releasing the lease failed"),
        Ok(Err(e)) => tracing::warn!(error = %e, "lease task failed"),
        Err(_) => tracing::warn!("releasing the lease timed out"),
    }
    server_task.abort();
    Ok(())
}
