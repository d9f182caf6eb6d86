//! MX routing for `useMX` Outbound connectors: the recipient domain's MX records in preference
//! order (equal preferences shuffled, RFC 5321 5.1), each MX host's A/AAAA addresses, the
//! domain's own A/AAAA as an implicit MX when it has no MX records, and RFC 7505 null MX.
//!
//! The resolver is hickory's, pointed at the fleet's `dnsResolver` or the system resolver. It is
//! built lazily (inside the tokio runtime) once per loaded config.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;

use crate::reply::Reply;

/// At most this many MX hosts are tried for one domain, and this many addresses per host.
pub const MAX_MX_HOSTS: usize = 10;
pub const MAX_ADDRS_PER_HOST: usize = 4;

/// One mail exchanger with its addresses (possibly none, when its name did not resolve).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxHost {
    /// Lower-case host name without the trailing dot.
    pub name: String,
    pub preference: u16,
    pub addrs: Vec<IpAddr>,
    /// Why `addrs` is empty, if it is.
    pub error: Option<String>,
}

/// Why a domain has no usable mail exchanger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MxError {
    /// RFC 7505: the domain says it accepts no mail.
    NullMx,
    /// The domain does not exist, or has neither MX nor A/AAAA records.
    NoMailServers(String),
    /// The DNS lookup failed (timeout, SERVFAIL, …): try again later.
    Temporary(String),
}

impl MxError {
    /// The reply a recipient of this domain gets.
    pub fn reply(&self, domain: &str) -> Reply {
        match self {
            MxError::NullMx => Reply::owned(
                556,
                [5, 1, 10],
                format!("Recipient domain {domain} does not accept mail (null MX)"),
            ),
            MxError::NoMailServers(why) => Reply::owned(
                550,
                [5, 4, 4],
                format!("Recipient domain {domain} has no mail servers: {why}"),
            ),
            MxError::Temporary(why) => Reply::owned(
                451,
                [4, 4, 3],
                format!("MX lookup for {domain} failed: {why}; try again later"),
            ),
        }
    }
}

impl std::fmt::Display for MxError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MxError::NullMx => write!(f, "null MX: the domain accepts no mail"),
            MxError::NoMailServers(w) => write!(f, "no mail servers: {w}"),
            MxError::Temporary(w) => write!(f, "DNS lookup failed: {w}"),
        }
    }
}

/// The resolver of one loaded config, built on first use.
pub struct MxResolver {
    server: Option<SocketAddr>,
    timeout: Duration,
    inner: OnceLock<Result<Arc<TokioResolver>, String>>,
}

impl std::fmt::Debug for MxResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MxResolver")
            .field("server", &self.server)
            .finish_non_exhaustive()
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
    opts.attempts = 2;
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    builder
        .build()
        .map_err(|e| format!("cannot build the DNS resolver: {e}"))
}

fn is_root(name: &str) -> bool {
    name.is_empty() || name == "."
}

fn normalise(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// A random u64 from the std hasher's per-process random keys (no RNG dependency needed for
/// shuffling and jitter).
pub fn random_u64(salt: &str) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write(salt.as_bytes());
    if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(d.as_nanos());
    }
    h.finish()
}

/// Sorts by preference, shuffling hosts of equal preference.
fn order(mut hosts: Vec<(u16, String)>) -> Vec<(u16, String)> {
    let mut keyed: Vec<(u16, u64, String)> = hosts
        .drain(..)
        .map(|(p, n)| (p, random_u64(&n), n))
        .collect();
    keyed.sort();
    let mut seen = std::collections::HashSet::new();
    keyed
        .into_iter()
        .filter(|(_, _, n)| seen.insert(n.clone()))
        .map(|(p, _, n)| (p, n))
        .collect()
}

impl MxResolver {
    /// `server`: the fleet's `dnsResolver`, already validated; `None` = system resolver.
    pub fn new(server: Option<SocketAddr>, timeout: Duration) -> MxResolver {
        MxResolver {
            server,
            timeout,
            inner: OnceLock::new(),
        }
    }

    fn resolver(&self) -> Result<Arc<TokioResolver>, MxError> {
        self.inner
            .get_or_init(|| build(self.server, self.timeout).map(Arc::new))
            .clone()
            .map_err(MxError::Temporary)
    }

    /// The addresses of one host name (A and AAAA). `Ok(vec![])` when the name has none.
    pub async fn addresses(&self, host: &str) -> Result<Vec<IpAddr>, MxError> {
        let r = self.resolver()?;
        match r.lookup_ip(format!("{}.", normalise(host))).await {
            Ok(l) => {
                let mut v: Vec<IpAddr> = Vec::new();
                for ip in l.iter() {
                    if !v.contains(&ip) {
                        v.push(ip);
                    }
                }
                Ok(v)
            }
            Err(e) if e.is_no_records_found() => Ok(Vec::new()),
            Err(e) => Err(MxError::Temporary(e.to_string())),
        }
    }

    /// The mail exchangers of `domain`, best first, each with its addresses.
    pub async fn resolve(&self, domain: &str) -> Result<Vec<MxHost>, MxError> {
        let domain = normalise(domain);
        let r = self.resolver()?;
        let records: Vec<(u16, String)> = match r.mx_lookup(format!("{domain}.")).await {
            Ok(l) => l
                .answers()
                .iter()
                .filter_map(|rec| match &rec.data {
                    RData::MX(mx) => Some((mx.preference, normalise(&mx.exchange.to_ascii()))),
                    _ => None,
                })
                .collect(),
            Err(e) if e.is_nx_domain() => {
                return Err(MxError::NoMailServers(format!("{domain} does not exist")));
            }
            Err(e) if e.is_no_records_found() => Vec::new(),
            Err(e) => return Err(MxError::Temporary(e.to_string())),
        };
        if records.len() == 1 && is_root(&records[0].1) {
            return Err(MxError::NullMx);
        }
        let records: Vec<(u16, String)> =
            records.into_iter().filter(|(_, n)| !is_root(n)).collect();
        if records.is_empty() {
            // Implicit MX (RFC 5321 5.1): the domain's own addresses.
            let addrs = self.addresses(&domain).await?;
            if addrs.is_empty() {
                return Err(MxError::NoMailServers(format!(
                    "{domain} has no MX, A or AAAA records"
                )));
            }
            return Ok(vec![MxHost {
                name: domain,
                preference: 0,
                addrs: addrs.into_iter().take(MAX_ADDRS_PER_HOST).collect(),
                error: None,
            }]);
        }
        let mut hosts = Vec::new();
        for (preference, name) in order(records).into_iter().take(MAX_MX_HOSTS) {
            let (addrs, error) = match self.addresses(&name).await {
                Ok(a) if a.is_empty() => (a, Some(format!("{name} has no A/AAAA records"))),
                Ok(a) => (a, None),
                Err(e) => (Vec::new(), Some(format!("{name}: {e}"))),
            };
            hosts.push(MxHost {
                name,
                preference,
                addrs: addrs.into_iter().take(MAX_ADDRS_PER_HOST).collect(),
                error,
            });
        }
        Ok(hosts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_by_preference_without_duplicates() {
        let o = order(vec![
            (20, "b.test".into()),
            (10, "a.test".into()),
            (30, "c.test".into()),
            (10, "a.test".into()),
        ]);
        assert_eq!(
            o,
            vec![
                (10, "a.test".to_string()),
                (20, "b.test".to_string()),
                (30, "c.test".to_string())
            ]
        );
        assert!(is_root("") && is_root(".") && !is_root("a"));
        assert_eq!(normalise("MX1.Example.ORG."), "mx1.example.org");
    }

    #[test]
    fn replies() {
        assert_eq!(
            MxError::NullMx.reply("x.test").to_string(),
            "556 5.1.10 Recipient domain x.test does not accept mail (null MX)"
        );
        assert_eq!(
            MxError::Temporary("timeout".into())
                .reply("x.test")
                .esc_string(),
            "4.4.3"
        );
    }
}
