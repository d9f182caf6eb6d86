//! The `mail-auth` authenticator of one loaded config, on the fleet's `dnsResolver` (or the
//! system resolver), built on first use inside the tokio runtime. A resolver that cannot be
//! built makes every check `temperror` (never a pass), and so does a step that outlives
//! [`AuthResolver::deadline`].

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use mail_auth::MessageAuthenticator;

/// Tries per DNS query.
const ATTEMPTS: u32 = 2;

/// Below the 20 s after which `mail-auth`'s SPF lookup limit reports `permerror` (a refusal
/// for good), so a slow DNS server gives `temperror` first.
pub const MAX_DEADLINE: Duration = Duration::from_secs(15);

pub struct AuthResolver {
    server: Option<SocketAddr>,
    timeout: Duration,
    deadline: Duration,
    inner: OnceLock<Result<MessageAuthenticator, String>>,
}

impl std::fmt::Debug for AuthResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthResolver")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

impl AuthResolver {
    /// `server`: the fleet's `dnsResolver`, already validated; `None` = system resolver.
    pub fn new(server: Option<SocketAddr>, timeout: Duration) -> AuthResolver {
        AuthResolver {
            server,
            timeout,
            deadline: (timeout * ATTEMPTS).min(MAX_DEADLINE),
            inner: OnceLock::new(),
        }
    }

    /// How long one step (SPF; DKIM and DMARC of one message) may take: one lookup's timeout
    /// times its attempts, at most [`MAX_DEADLINE`]. Past it the step is `temperror` (451).
    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    pub fn get(&self) -> Result<&MessageAuthenticator, String> {
        self.inner
            .get_or_init(|| build(self.server, self.timeout).map(MessageAuthenticator))
            .as_ref()
            .map_err(Clone::clone)
    }
}

fn build(server: Option<SocketAddr>, timeout: Duration) -> Result<TokioResolver, String> {
    let provider = TokioRuntimeProvider::default();
    let mut builder = match server {
        Some(addr) => {
            let mut udp = ConnectionConfig::udp();
            udp.port = addr.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = addr.port();
            let ns = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
            let mut b = TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, vec![], vec![ns]),
                provider,
            );
            // An explicit DNS server is the only source of answers.
            b.options_mut().use_hosts_file = ResolveHosts::Never;
            b
        }
        None => TokioResolver::builder(provider)
            .map_err(|e| format!("cannot read the system resolver configuration: {e}"))?,
    };
    let opts = builder.options_mut();
    opts.timeout = timeout;
    opts.attempts = ATTEMPTS as usize;
    builder
        .build()
        .map_err(|e| format!("cannot build the DNS resolver: {e}"))
}
