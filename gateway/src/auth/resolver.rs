//! The `mail-auth` authenticator of one loaded config, on the fleet's `dnsResolver` (or the
//! system resolver), built on first use inside the tokio runtime. A resolver that cannot be
//! built makes every check `temperror` (never a pass), and so does a step that outlives
//! [`AuthResolver::deadline`].

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use mail_auth::MessageAuthenticator;

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
            deadline: (timeout * crate::mx::DNS_ATTEMPTS).min(MAX_DEADLINE),
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
            .get_or_init(|| {
                crate::mx::build(self.server, self.timeout, None).map(MessageAuthenticator)
            })
            .as_ref()
            .map_err(Clone::clone)
    }
}
