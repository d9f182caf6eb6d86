//! `partnergate-gateway`: run the SMTP gateway, check config files, print JSON Schemas, or probe
//! an SMTP server's STARTTLS.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::{Parser, Subcommand};
use partnergate_gateway::config::{ConnectorsFile, FleetSettings, TlsLevel};
use partnergate_gateway::live_config::{ConfigPaths, NextHop, NextHopHost, load};
use partnergate_gateway::server::State;
use partnergate_gateway::{
    admin, config, metrics, relay, reload, server, telemetry, tls, validation,
};

#[derive(Parser)]
#[command(
    name = "partnergate-gateway",
    version,
    about = "SMTP gateway enforcing partner connectors",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    files: Option<Files>,
}

#[derive(clap::Args, Clone)]
struct Files {
    /// Fleet settings file (JSON).
    #[arg(long, env = "PARTNERGATE_FLEET")]
    fleet: PathBuf,
    /// Connectors file (JSON), rendered by the operator.
    #[arg(long, env = "PARTNERGATE_CONNECTORS")]
    connectors: PathBuf,
}

impl Files {
    fn paths(&self) -> ConfigPaths {
        ConfigPaths {
            fleet: self.fleet.clone(),
            connectors: self.connectors.clone(),
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default when no subcommand is given).
    Run(Files),
    /// Validate both files and load every PEM file; print each error as `path: message`.
    Check(Files),
    /// Print the JSON Schemas of the fleet settings and connectors files.
    Schema,
    /// Connect, EHLO, optionally STARTTLS; exit 0 when the server behaves.
    Probe {
        #[arg(long)]
        host: String,
        #[arg(long, default_value_t = 25)]
        port: u16,
        /// Require STARTTLS and complete the handshake.
        #[arg(long)]
        starttls: bool,
        /// Name the certificate must match (default: --host); only checked with --ca.
        #[arg(long)]
        tls_server_name: Option<String>,
        /// CA bundle (PEM); when given, the chain and name are verified.
        #[arg(long)]
        ca: Option<PathBuf>,
        #[arg(long, default_value_t = 10)]
        timeout_secs: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Schema) => schema(),
        Some(Command::Check(files)) => check(&files.paths()),
        Some(Command::Run(files)) => run(files.paths()),
        Some(Command::Probe {
            host,
            port,
            starttls,
            tls_server_name,
            ca,
            timeout_secs,
        }) => probe(host, port, starttls, tls_server_name, ca, timeout_secs),
        None => match cli.files {
            Some(files) => run(files.paths()),
            None => {
                eprintln!("usage: partnergate-gateway --fleet FILE --connectors FILE (see --help)");
                ExitCode::from(2)
            }
        },
    }
}

fn schema() -> ExitCode {
    let doc = serde_json::json!({
        "fleetSettings": schemars::schema_for!(FleetSettings),
        "connectorsFile": schemars::schema_for!(ConnectorsFile),
    });
    match serde_json::to_string_pretty(&doc) {
        Ok(s) => {
            println!("{s}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn check(paths: &ConfigPaths) -> ExitCode {
    match load(paths) {
        Ok(rt) => {
            println!(
                "ok: {} inbound, {} outbound connectors, config hash {}",
                rt.connectors.inbound.len(),
                rt.connectors.outbound.len(),
                rt.hash
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in errors {
                println!("{e}");
            }
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// Seconds between the periodic config checks that back up filesystem events; tests raise it
/// to prove that events alone reload.
const RELOAD_POLL_ENV: &str = "PARTNERGATE_RELOAD_POLL_SECS";

fn reload_poll_interval() -> Result<Duration, String> {
    match std::env::var_os(RELOAD_POLL_ENV) {
        None => Ok(Duration::from_secs(1)),
        Some(v) => match v.to_str().map(str::parse::<u64>) {
            Some(Ok(s)) if s >= 1 => Ok(Duration::from_secs(s)),
            _ => Err(format!(
                "{RELOAD_POLL_ENV}: expected whole seconds >= 1, got {v:?}"
            )),
        },
    }
}

fn run(paths: ConfigPaths) -> ExitCode {
    let log = match telemetry::init() {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let code = run_logged(paths);
    // After the runtime is gone (every session ended or cut off): the log writer drains its
    // queue, so the decision lines of the last messages before a SIGTERM reach stderr.
    drop(log);
    code
}

fn run_logged(paths: ConfigPaths) -> ExitCode {
    let reload_poll = match reload_poll_interval() {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, "invalid environment");
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    // Before the load: a change made while it runs must still count as a change for the watcher.
    let loaded_files = reload::fingerprint(&paths);
    let rt = match load(&paths) {
        Ok(rt) => rt,
        Err(errors) => {
            for e in &errors {
                tracing::error!(path = %e.path, error = %e.message, "invalid configuration");
                eprintln!("{e}");
            }
            return ExitCode::FAILURE;
        }
    };
    let tokio_rt = match runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    tokio_rt.block_on(serve(paths, rt, reload_poll, loaded_files))
}

async fn serve(
    paths: ConfigPaths,
    rt: partnergate_gateway::live_config::LiveConfig,
    reload_poll: Duration,
    loaded_files: reload::Fingerprint,
) -> ExitCode {
    let metrics = Arc::new(metrics::Metrics::new());
    metrics.set_certificates(&rt.certificates);
    metrics.set_limits(&rt.fleet.limits);
    metrics.reload("success");
    let bind_ip = bind_ip_from_env();
    let listen = config::with_bind_ip(rt.fleet.listen, bind_ip);
    let admin_listen = config::with_bind_ip(rt.fleet.admin_listen, bind_ip);
    tracing::info!(config_hash = %rt.hash, inbound = rt.connectors.inbound.len(), outbound = rt.connectors.outbound.len(), "config loaded");
    let state = Arc::new(State::new(Arc::new(rt), metrics));

    let admin_listener = match tokio::net::TcpListener::bind(admin_listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(address = %admin_listen, error = %e, "cannot bind admin port");
            return ExitCode::FAILURE;
        }
    };
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(address = %listen, error = %e, "cannot bind SMTP port");
            return ExitCode::FAILURE;
        }
    };
    // The watches are registered before the listener starts (which turns /readyz to 200): a
    // change made the moment the gateway reports ready must not go unnoticed.
    if let Some(watcher) =
        reload::Watcher::start(paths, state.clone(), reload_poll, loaded_files).await
    {
        tokio::spawn(watcher.run());
    }
    tracing::info!(smtp = %listen, admin = %admin_listen, "listening");
    tokio::spawn(admin::serve(admin_listener, state.clone()));
    tokio::spawn(validation::run(state.clone()));

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (deadline_tx, deadline_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(server::serve(listener, state.clone(), stop_rx, deadline_rx));

    wait_for_signal().await;
    tracing::info!("shutting down: no new connections, sessions may finish");
    state.shutting_down.store(true, Ordering::SeqCst);
    let _ = stop_tx.send(true);
    let _ = server.await;
    let grace = Duration::from_secs(state.config.load().fleet.timeouts.shutdown_grace_secs);
    let drained = async {
        while state.active.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    if tokio::time::timeout(grace, drained).await.is_err() {
        tracing::info!(
            sessions = state.active.load(Ordering::SeqCst),
            "grace period over: closing sessions with 421 4.3.2"
        );
        let _ = deadline_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while state.active.load(Ordering::SeqCst) > 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
    }
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn probe(
    host: String,
    port: u16,
    starttls: bool,
    tls_server_name: Option<String>,
    ca: Option<PathBuf>,
    timeout_secs: u64,
) -> ExitCode {
    let (level, anchors) = match (&ca, starttls) {
        (_, false) => (TlsLevel::None, partnergate_gateway::certs::public_roots()),
        (None, true) => (
            TlsLevel::EncryptionOnly,
            partnergate_gateway::certs::public_roots(),
        ),
        (Some(ca), true) => match partnergate_gateway::certs::load_anchors(ca) {
            Ok(a) => (TlsLevel::DomainValidation, a),
            Err(e) => {
                println!("error: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let name = tls_server_name.unwrap_or_else(|| host.clone());
    let tls = match tls::client_config(level, anchors, tls::NameRule::Pattern(name.clone()), None) {
        Ok(t) => t,
        Err(e) => {
            println!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let hop = NextHop {
        label: format!("{host}:{port}"),
        level,
        hosts: vec![NextHopHost {
            host,
            port,
            addr: None,
            tls,
            server_name: name,
            domain: None,
            mx_security: partnergate_gateway::mx::MxSecurity::Unchecked,
        }],
        use_mx: false,
        mx: None,
        policy: None,
    };
    let timeouts = partnergate_gateway::config::Timeouts {
        next_hop_secs: timeout_secs,
        tls_handshake_secs: timeout_secs,
        ..Default::default()
    };
    let tokio_rt = match runtime() {
        Ok(r) => r,
        Err(e) => {
            println!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    tokio_rt.block_on(async move {
        match relay::HopConnection::open(&hop, "probe.partnergate.invalid", &timeouts).await {
            Ok(c) => {
                let tls = c
                    .tls
                    .map_or("no TLS".to_string(), |v| format!("TLSv{}", v.as_str()));
                println!("ok: {} answered EHLO, {tls}", hop.label);
                c.quit().await;
                ExitCode::SUCCESS
            }
            Err(reply) => {
                println!("error: {}", reply.text);
                ExitCode::FAILURE
            }
        }
    })
}

/// `PARTNERGATE_BIND_IP`: the pod IP to listen on instead of the unspecified address. Set by the
/// test substrate's process kubelet, where every pod shares the host's network namespace.
fn bind_ip_from_env() -> Option<std::net::IpAddr> {
    let value = std::env::var("PARTNERGATE_BIND_IP").ok()?;
    match value.parse() {
        Ok(ip) => Some(ip),
        Err(_) => {
            tracing::warn!(value = %value, "PARTNERGATE_BIND_IP is not an IP address; ignored");
            None
        }
    }
}
