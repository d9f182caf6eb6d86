//! The SMTP listener: optional PROXY protocol v2 from trusted proxies, admission (connection
//! limits, reserved slots, shedding: see `admission`), and graceful shutdown.
//!
//! Every IP rule here sees the canonical client address: a dual-stack listener reports IPv4
//! clients as `::ffff:a.b.c.d`, which must match IPv4 `trustedProxies`, count as the IPv4
//! client and reach the session as IPv4.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::admission::{Admission, SHED_GRACE};
use crate::live_config::LiveConfig;
use crate::metrics::Metrics;
use crate::proxy;
use crate::reply::fixed;
use crate::session::{Session, SessionCtx};

/// Process-wide state shared by the listener, the admin port and the reload watcher.
pub struct State {
    pub config: ArcSwap<LiveConfig>,
    pub metrics: Arc<Metrics>,
    pub listening: AtomicBool,
    pub shutting_down: AtomicBool,
    pub last_reload_error: Mutex<Option<String>>,
    pub active: AtomicUsize,
    /// Latest connector validation probe results.
    pub validation: crate::validation::Validation,
    pub admission: Arc<Admission>,
}

impl State {
    pub fn new(config: Arc<LiveConfig>, metrics: Arc<Metrics>) -> State {
        State {
            config: ArcSwap::new(config),
            listening: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            last_reload_error: Mutex::new(None),
            active: AtomicUsize::new(0),
            validation: crate::validation::Validation::default(),
            admission: Arc::new(Admission::new(metrics.clone())),
            metrics,
        }
    }
}

/// Counts a live session (shed or not) for shutdown draining and the active-sessions gauge;
/// released on drop, so every exit path keeps the count right.
struct Live(Arc<State>);

impl Live {
    fn new(state: &Arc<State>) -> Live {
        state.active.fetch_add(1, Ordering::SeqCst);
        state.metrics.sessions_active.inc();
        Live(state.clone())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
        self.0.metrics.sessions_active.dec();
    }
}

/// Accept backlog (capped by `net.core.somaxconn`). Listeners are bound with the runtime's
/// default of 128; in a burst of connects (a flood, or many partners at once) the kernel then
/// answers with SYN cookies and drops completed handshakes the full queue has no room for, and
/// in SMTP, where the server speaks first, such a client waits for a greeting that never comes
/// (127 of a burst of 828 idle connects in `slow_clients.rs`).
const ACCEPT_BACKLOG: u32 = 4096;

/// `listener` with [`ACCEPT_BACKLOG`]: `listen()` again on a listening socket only changes its
/// backlog. Done on a duplicate descriptor so that any failure leaves the original as it was.
fn with_backlog(listener: TcpListener) -> TcpListener {
    use std::os::fd::{AsFd, FromRawFd, IntoRawFd};
    let dup = match listener.as_fd().try_clone_to_owned() {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the accept backlog");
            return listener;
        }
    };
    // SAFETY: `dup` is a descriptor of our own, just created and owned by nothing else; the
    // socket takes it over (and closes it when dropped).
    let socket = unsafe { tokio::net::TcpSocket::from_raw_fd(dup.into_raw_fd()) };
    match socket.listen(ACCEPT_BACKLOG) {
        // Dropping the original closes only its descriptor; the socket lives on in `raised`.
        Ok(raised) => raised,
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the accept backlog");
            listener
        }
    }
}

/// Accepts until `stop` turns true.
pub async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    mut stop: watch::Receiver<bool>,
    deadline: watch::Receiver<bool>,
) {
    let listener = with_backlog(listener);
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

/// Whether `peer` may send a PROXY header. The canonical form is what IPv4 ranges match; the
/// raw form still matches a range written as `::ffff:a.b.c.d/n`.
fn is_trusted_proxy(trusted: &[ipnet::IpNet], peer: IpAddr) -> bool {
    let canonical = peer.to_canonical();
    trusted
        .iter()
        .any(|n| n.contains(&canonical) || n.contains(&peer))
}

async fn handle(
    mut tcp: TcpStream,
    peer: SocketAddr,
    state: Arc<State>,
    deadline: watch::Receiver<bool>,
) {
    let config = state.config.load_full();
    let _ = tcp.set_nodelay(true);
    let mut client = peer.ip().to_canonical();
    if is_trusted_proxy(&config.fleet.trusted_proxies, peer.ip()) {
        let secs = Duration::from_secs(config.fleet.timeouts.tls_handshake_secs);
        match tokio::time::timeout(secs, read_proxy_header(&mut tcp)).await {
            Ok(Some(Some(addr))) => client = addr.ip().to_canonical(),
            Ok(Some(None)) => {}
            _ => {
                tracing::info!(target: "decision", client_ip = %client, rule = "proxyProtocol", outcome = "closed", "invalid or missing PROXY v2 header from trusted proxy");
                return;
            }
        }
    }
    let ticket = match state.admission.admit_under(&config, client, Instant::now()) {
        Ok(t) => t,
        Err(refusal) => {
            let mut out = Vec::new();
            fixed::TOO_MANY_CONNECTIONS.write_to(&mut out);
            let _ = tcp.write_all(&out).await;
            let _ = tcp.shutdown().await;
            tracing::info!(target: "decision", client_ip = %client, rule = refusal.rule(), outcome = "rejected", "connection limit reached");
            return;
        }
    };
    let _live = Live::new(&state);
    state.metrics.sessions.inc();
    // A shed session normally notices at its next wait for a command; one that does not (in a
    // TLS handshake, or blocked writing to a client that does not read) is dropped after a
    // grace period. Only sessions before MAIL FROM are shed, so nothing is in flight.
    let shed = ticket.shed();
    let ctx = SessionCtx {
        config,
        metrics: state.metrics.clone(),
        deadline,
        client_ip: client,
        admission: ticket,
    };
    // A local, not moved into `run`: an async fn's by-value argument would take the session's
    // room twice in this task.
    let mut session = Session::new(proxy::Guard::new(tcp, client), ctx);
    let session = session.serve();
    tokio::select! {
        _ = session => {}
        _ = async { shed.await; tokio::time::sleep(SHED_GRACE).await } => {
            tracing::info!(target: "decision", client_ip = %client, rule = "shed", outcome = "dropped", "shed session did not close by itself");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_mapped_peers_match_ipv4_trusted_proxies() {
        let trusted: Vec<ipnet::IpNet> = vec!["127.0.0.0/8".parse().unwrap()];
        let mapped: IpAddr = "::ffff:127.0.0.5".parse().unwrap();
        assert!(is_trusted_proxy(&trusted, mapped));
        assert!(is_trusted_proxy(&trusted, "127.0.0.5".parse().unwrap()));
        assert!(!is_trusted_proxy(
            &trusted,
            "::ffff:10.0.0.5".parse().unwrap()
        ));
        assert!(!is_trusted_proxy(&trusted, "::1".parse().unwrap()));
        let written_mapped: Vec<ipnet::IpNet> = vec!["::ffff:10.0.0.0/104".parse().unwrap()];
        assert!(is_trusted_proxy(
            &written_mapped,
            "::ffff:10.1.2.3".parse().unwrap()
        ));
    }
}
