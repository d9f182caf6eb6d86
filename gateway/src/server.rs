//! The SMTP listener: connection limits (total and per client IP), optional PROXY protocol v2
//! from trusted proxies, and graceful shutdown.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::proxy;
use crate::reply::fixed;
use crate::runtime::Runtime;
use crate::session::{Session, SessionCtx};

/// Process-wide state shared by the listener, the admin port and the reload watcher.
pub struct State {
    pub config: ArcSwap<Runtime>,
    pub metrics: Arc<Metrics>,
    pub listening: AtomicBool,
    pub shutting_down: AtomicBool,
    pub last_reload_error: Mutex<Option<String>>,
    pub active: AtomicUsize,
    /// Latest connector validation probe results.
    pub validation: crate::validation::Validation,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

impl State {
    pub fn new(runtime: Arc<Runtime>, metrics: Arc<Metrics>) -> State {
        State {
            config: ArcSwap::new(runtime),
            metrics,
            listening: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            last_reload_error: Mutex::new(None),
            active: AtomicUsize::new(0),
            validation: crate::validation::Validation::default(),
            per_ip: Mutex::new(HashMap::new()),
        }
    }
}

/// Holds one connection slot; releasing it on drop keeps the counts right on every exit path.
struct Slot {
    state: Arc<State>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.state.active.fetch_sub(1, Ordering::SeqCst);
        self.state.metrics.sessions_active.dec();
        if let Ok(mut m) = self.state.per_ip.lock()
            && let Some(n) = m.get_mut(&self.ip)
        {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

fn take_slot(state: &Arc<State>, ip: IpAddr, total: usize, per_ip: usize) -> Option<Slot> {
    let mut m = state.per_ip.lock().ok()?;
    let n = m.entry(ip).or_insert(0);
    if *n >= per_ip || state.active.load(Ordering::SeqCst) >= total {
        if *n == 0 {
            m.remove(&ip);
        }
        return None;
    }
    *n += 1;
    state.active.fetch_add(1, Ordering::SeqCst);
    state.metrics.sessions_active.inc();
    Some(Slot {
        state: state.clone(),
        ip,
    })
}

/// Accepts until `stop` turns true.
pub async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    mut stop: watch::Receiver<bool>,
    deadline: watch::Receiver<bool>,
) {
    state.listening.store(true, Ordering::SeqCst);
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, peer)) => {
                    let state = state.clone();
                    let deadline = deadline.clone();
                    tokio::spawn(async move { handle(tcp, peer, state, deadline).await });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            r = stop.changed() => {
                if r.is_err() || *stop.borrow() {
                    break;
                }
            }
        }
    }
    state.listening.store(false, Ordering::SeqCst);
}

async fn read_proxy_header(tcp: &mut TcpStream) -> Option<Option<SocketAddr>> {
    let mut fixed_part = [0u8; proxy::HEADER_LEN];
    tcp.read_exact(&mut fixed_part).await.ok()?;
    let len = proxy::parse_fixed(&fixed_part).ok()?;
    let mut rest = vec![0u8; len];
    tcp.read_exact(&mut rest).await.ok()?;
    proxy::source(&fixed_part, &rest).ok()
}

async fn handle(
    mut tcp: TcpStream,
    peer: SocketAddr,
    state: Arc<State>,
    deadline: watch::Receiver<bool>,
) {
    let runtime = state.config.load_full();
    let _ = tcp.set_nodelay(true);
    let mut client = peer.ip();
    if runtime
        .fleet
        .trusted_proxies
        .iter()
        .any(|n| n.contains(&peer.ip()))
    {
        let secs = Duration::from_secs(runtime.fleet.timeouts.tls_handshake_secs);
        match tokio::time::timeout(secs, read_proxy_header(&mut tcp)).await {
            Ok(Some(Some(addr))) => client = addr.ip(),
            Ok(Some(None)) => {}
            _ => {
                tracing::info!(target: "decision", client_ip = %peer.ip(), rule = "proxyProtocol", outcome = "closed", "invalid or missing PROXY v2 header from trusted proxy");
                return;
            }
        }
    }
    // IPv4-mapped IPv6 addresses (dual-stack listeners) are matched as IPv4.
    if let IpAddr::V6(v6) = client
        && let Some(v4) = v6.to_ipv4_mapped()
    {
        client = IpAddr::V4(v4);
    }
    let limits = &runtime.fleet.limits;
    let Some(_slot) = take_slot(
        &state,
        client,
        limits.max_connections,
        limits.max_connections_per_ip,
    ) else {
        let mut out = Vec::new();
        fixed::TOO_MANY_CONNECTIONS.write_to(&mut out);
        let _ = tcp.write_all(&out).await;
        let _ = tcp.shutdown().await;
        tracing::info!(target: "decision", client_ip = %client, rule = "maxConnections", outcome = "rejected", "connection limit reached");
        return;
    };
    state.metrics.sessions.inc();
    let ctx = SessionCtx {
        runtime,
        metrics: state.metrics.clone(),
        deadline,
        client_ip: client,
    };
    Session::new(tcp, ctx).run().await;
}
