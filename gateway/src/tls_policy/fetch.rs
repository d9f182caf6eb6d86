//! MTA-STS discovery and policy fetch (RFC 8461 3), and the policy cache shared by every
//! session of the gateway process (it outlives config reloads: a policy is the partner's, not
//! ours).
//!
//! Invariants: the policy host is `mta-sts.<domain>` on port 443 (`tlsPolicy.mtaStsPort`, for
//! tests), its certificate verified
//! against the fleet's `tlsPolicy.mtaStsRootsFile` (or the public roots) and its name; only a
//! `200` with a `text/plain` body of at most `mtaStsMaxPolicyBytes` counts, redirects are not
//! followed (RFC 8461 3.3), and the whole fetch is bounded by `mtaStsFetchTimeoutSecs`. The
//! policy host's addresses pass the same `allowPrivateMxAddresses` screen as MX hosts. A cached
//! policy is used until its `max_age` runs out, and replaced only when the TXT record's `id`
//! changes and the new policy fetches and parses (RFC 8461 5.1). A failed fetch is retried after
//! a minute at the earliest.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;

use super::mta_sts::{StsPolicy, parse_policy, pick_record};
use crate::certs::Anchors;
use crate::mx::MxResolver;

/// What the lookup found for a recipient domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StsLookup {
    /// No `_mta-sts` record and nothing cached.
    NoPolicy,
    Policy(Arc<StsPolicy>),
    /// A record exists, the fetch failed and nothing is cached.
    Failed(String),
}

struct Cached {
    id: String,
    policy: Arc<StsPolicy>,
    expires: Instant,
}

static CACHE: LazyLock<Mutex<HashMap<String, Cached>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// Failed fetches, by domain and record id, with the error: the same failure is answered from
/// here for [`RETRY_AFTER`], so a domain whose policy host is down costs one fetch, not one per
/// MX address tried (each up to the fetch timeout).
static FAILED: LazyLock<Mutex<HashMap<FailureKey, (Instant, String)>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// (domain, TXT record id).
type FailureKey = (String, String);

const RETRY_AFTER: Duration = Duration::from_secs(60);

fn recent_failure(domain: &str, id: &str) -> Option<String> {
    let mut failed = FAILED.lock().ok()?;
    let now = Instant::now();
    failed.retain(|_, (at, _)| now.duration_since(*at) < RETRY_AFTER);
    failed
        .get(&(domain.to_string(), id.to_string()))
        .map(|(_, e)| e.clone())
}

fn remember_failure(domain: &str, id: &str, error: &str) {
    if let Ok(mut failed) = FAILED.lock()
        && failed.len() < MAX_CACHED
    {
        failed.insert(
            (domain.to_string(), id.to_string()),
            (Instant::now(), error.to_string()),
        );
    }
}

/// Entries kept at most (the oldest-expiring is dropped first): domains are the partners'
/// of Outbound connectors, so this bounds memory against a flood of distinct recipient domains
/// under a `*` connector.
const MAX_CACHED: usize = 10_000;

/// The fetch settings of one loaded config.
pub struct StsFetcher {
    pub roots: Anchors,
    pub max_bytes: usize,
    pub timeout: Duration,
    /// The fleet's `tlsPolicy.mtaStsPort` (443).
    pub port: u16,
    pub resolver: Arc<MxResolver>,
}

/// Aborts the HTTP connection task when the fetch ends in any way, also when the fetch future
/// is dropped by its timeout, so no task outlives its fetch.
struct AbortOnDrop(tokio::task::JoinHandle<Result<(), hyper::Error>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl std::fmt::Debug for StsFetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StsFetcher")
            .field("max_bytes", &self.max_bytes)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

fn cached(domain: &str, id: Option<&str>) -> Option<Arc<StsPolicy>> {
    let cache = CACHE.lock().ok()?;
    let c = cache.get(domain)?;
    (c.expires > Instant::now() && id.is_none_or(|id| id == c.id)).then(|| c.policy.clone())
}

fn store(domain: &str, id: String, policy: Arc<StsPolicy>) {
    let Ok(mut cache) = CACHE.lock() else {
        return;
    };
    if cache.len() >= MAX_CACHED && !cache.contains_key(domain) {
        let now = Instant::now();
        cache.retain(|_, c| c.expires > now);
        if cache.len() >= MAX_CACHED
            && let Some(k) = cache
                .iter()
                .min_by_key(|(_, c)| c.expires)
                .map(|(k, _)| k.clone())
        {
            cache.remove(&k);
        }
    }
    let expires = Instant::now() + Duration::from_secs(policy.max_age);
    cache.insert(
        domain.to_string(),
        Cached {
            id,
            policy,
            expires,
        },
    );
}

impl StsFetcher {
    /// The policy of `domain` (lower-case A-label form).
    pub async fn policy(&self, domain: &str) -> StsLookup {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let deadline = self.resolver.deadline();
        let txt = tokio::time::timeout(deadline, self.resolver.txt(&format!("_mta-sts.{domain}")))
            .await
            .unwrap_or(Err(crate::mx::MxError::Timeout(deadline.as_secs())));
        let txts = match txt {
            Ok(t) => t,
            Err(e) => {
                // RFC 8461 5.1: a failed TXT lookup keeps a cached policy in force.
                return match cached(&domain, None) {
                    Some(p) => StsLookup::Policy(p),
                    None => StsLookup::Failed(format!("_mta-sts TXT lookup: {e}")),
                };
            }
        };
        let Some(record) = pick_record(txts.iter().map(String::as_str)) else {
            return match cached(&domain, None) {
                Some(p) => StsLookup::Policy(p),
                None => StsLookup::NoPolicy,
            };
        };
        if let Some(p) = cached(&domain, Some(&record.id)) {
            return StsLookup::Policy(p);
        }
        if let Some(e) = recent_failure(&domain, &record.id) {
            return match cached(&domain, None) {
                Some(p) => StsLookup::Policy(p),
                None => StsLookup::Failed(e),
            };
        }
        let fetched = match tokio::time::timeout(self.timeout, self.fetch(&domain)).await {
            Ok(r) => r,
            Err(_) => Err("policy fetch timed out".into()),
        };
        match fetched {
            Ok(p) => {
                let p = Arc::new(p);
                tracing::info!(domain, id = %record.id, mode = p.mode.as_str(), max_age = p.max_age, "MTA-STS policy fetched");
                store(&domain, record.id, p.clone());
                StsLookup::Policy(p)
            }
            Err(e) => {
                tracing::warn!(domain, error = %e, "MTA-STS policy fetch failed");
                remember_failure(&domain, &record.id, &e);
                // RFC 8461 5.1: an unexpired cached policy stays in force.
                match cached(&domain, None) {
                    Some(p) => StsLookup::Policy(p),
                    None => StsLookup::Failed(e),
                }
            }
        }
    }

    async fn fetch(&self, domain: &str) -> Result<StsPolicy, String> {
        let host = format!("mta-sts.{domain}");
        let addrs = self
            .resolver
            .usable_addresses(&host)
            .await
            .map_err(|e| format!("{host}: {e}"))?;
        let Some(ip) = addrs.first() else {
            return Err(format!("{host} has no usable address"));
        };
        let port = self.port;
        let tcp = tokio::net::TcpStream::connect((*ip, port))
            .await
            .map_err(|e| format!("connect to {host}[{ip}]:{port}: {e}"))?;
        let mut roots = rustls::RootCertStore::empty();
        roots.roots.extend(self.roots.iter().cloned());
        let mut cfg = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("{host}: {}", crate::tls::describe_tls_error(&e)))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("{host}: HTTP: {e}"))?;
        let _driver = AbortOnDrop(tokio::spawn(conn));
        let req = http::Request::get("/.well-known/mta-sts.txt")
            .header(http::header::HOST, &host)
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        // `_driver` lives until this block is done (or dropped by the fetch timeout).
        async {
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| format!("{host}: HTTP: {e}"))?;
            if resp.status() != http::StatusCode::OK {
                return Err(format!(
                    "{host} answered HTTP {} (only 200 counts; redirects are not followed)",
                    resp.status().as_u16()
                ));
            }
            let ctype = resp
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_ascii_lowercase();
            if !ctype.starts_with("text/plain") {
                return Err(format!(
                    "{host}: policy media type is {ctype:?}, not text/plain"
                ));
            }
            let body = Limited::new(resp.into_body(), self.max_bytes)
                .collect()
                .await
                .map_err(|_| format!("{host}: policy larger than {} bytes", self.max_bytes))?
                .to_bytes();
            let text =
                std::str::from_utf8(&body).map_err(|_| format!("{host}: policy is not UTF-8"))?;
            parse_policy(text).map_err(|e| format!("{host}: bad policy: {e}"))
        }
        .await
    }
}
