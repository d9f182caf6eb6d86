//! MX routing for `useMX` Outbound connectors: the recipient domain's MX records in preference
//! order (equal preferences shuffled, RFC 5321 5.1), each MX host's A/AAAA addresses, the
//! domain's own A/AAAA as an implicit MX when it has no MX records, and RFC 7505 null MX.
//!
//! The resolver is hickory's, pointed at the fleet's `dnsResolver` or the system resolver. It is
//! built lazily (inside the tokio runtime) once per loaded config. Connectors with DANE use a
//! second, DNSSEC-validating resolver on the same server (trust anchor: the fleet's
//! `tlsPolicy.dnssecTrustAnchorFile` or the root KSKs), so connectors without DANE keep the
//! plain resolver's behaviour: a validation failure never affects them.
//!
//! Invariant: an MX answer is DNS data the gateway does not control, so an address that is not
//! globally reachable ([`special_purpose`]: loopback, private, ULA, link-local, CGNAT,
//! documentation, multicast, …) is never returned as a target unless the fleet's
//! `allowPrivateMxAddresses` covers it; otherwise a partner's (or a spoofed) DNS answer could aim
//! the gateway at internal services.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use ipnet::IpNet;

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

/// Why a domain has no usable mail exchanger. Callers branch on it: each kind is a different
/// reply class ([`MxError::reply`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MxError {
    /// RFC 7505: the domain says it accepts no mail.
    #[error("null MX: the domain accepts no mail")]
    NullMx,
    /// The domain does not exist, or has neither MX nor A/AAAA records.
    #[error("no mail servers: {0}")]
    NoMailServers(String),
    /// The DNS lookup failed (timeout, SERVFAIL, …): try again later.
    #[error("DNS lookup failed: {0}")]
    Temporary(String),
    /// DNSSEC validation of the MX answer failed (only with the validating resolver).
    #[error("DNSSEC validation of the MX records failed (bogus)")]
    Bogus,
    /// The whole resolution (MX and every host's addresses) took longer than
    /// [`MxResolver::deadline`].
    #[error("DNS lookups did not finish within {0} s")]
    Timeout(u64),
}

/// Whether an MX answer was DNSSEC-validated (RFC 7672 2.2.1: DANE needs a secure MX RRset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MxSecurity {
    /// Looked up with the plain resolver.
    Unchecked,
    Secure,
    Insecure,
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
            MxError::Timeout(_) => Reply::owned(
                451,
                [4, 4, 3],
                format!("MX lookup for {domain} failed: {self}; try again later"),
            ),
            MxError::Temporary(why) => Reply::owned(
                451,
                [4, 4, 3],
                format!("MX lookup for {domain} failed: {why}; try again later"),
            ),
            MxError::Bogus => crate::reply::next_hop::tls_policy_not_met(
                domain,
                "DNSSEC validation of the MX records failed (bogus)",
            ),
        }
    }
}

/// What kind of not-globally-reachable address `ip` is (RFC 6890 special-purpose ranges), or
/// `None` for an ordinary public address. IPv4-mapped and NAT64 (64:ff9b::/96) addresses are
/// judged by the IPv4 address they carry.
pub fn special_purpose(ip: IpAddr) -> Option<&'static str> {
    match ip.to_canonical() {
        IpAddr::V4(a) => {
            let o = a.octets();
            if o[0] == 0 {
                Some("unspecified (0.0.0.0/8)")
            } else if a.is_loopback() {
                Some("loopback")
            } else if a.is_private() {
                Some("private (RFC 1918)")
            } else if o[0] == 100 && o[1] & 0xc0 == 64 {
                Some("shared CGNAT (100.64.0.0/10)")
            } else if a.is_link_local() {
                Some("link-local")
            } else if a.is_documentation() {
                Some("documentation")
            } else if o[..3] == [192, 0, 0] {
                Some("IETF protocol assignment (192.0.0.0/24)")
            } else if o[0] == 198 && o[1] & 0xfe == 18 {
                Some("benchmarking (198.18.0.0/15)")
            } else if a.is_multicast() {
                Some("multicast")
            } else if o[0] >= 240 {
                Some("reserved or broadcast (240.0.0.0/4)")
            } else {
                None
            }
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            if a.is_unspecified() {
                Some("unspecified")
            } else if a.is_loopback() {
                Some("loopback")
            } else if s[0] & 0xfe00 == 0xfc00 {
                Some("unique local (fc00::/7)")
            } else if s[0] & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if s[0] & 0xffc0 == 0xfec0 {
                Some("site-local (fec0::/10)")
            } else if a.is_multicast() {
                Some("multicast")
            } else if (s[0] == 0x2001 && s[1] == 0x0db8) || (s[0] == 0x3fff && s[1] & 0xf000 == 0) {
                Some("documentation")
            } else if s[..4] == [0x100, 0, 0, 0] {
                Some("discard-only (100::/64)")
            } else if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [a, b] = s[6].to_be_bytes();
                let [c, d] = s[7].to_be_bytes();
                special_purpose(IpAddr::from([a, b, c, d]))
            } else {
                None
            }
        }
    }
}

/// The resolver of one loaded config, built on first use.
pub struct MxResolver {
    server: Option<SocketAddr>,
    timeout: Duration,
    /// The fleet's `allowPrivateMxAddresses`.
    allowed: Vec<IpNet>,
    inner: OnceLock<Result<Arc<TokioResolver>, String>>,
    /// The fleet's `tlsPolicy.dnssecTrustAnchorFile`, resolved; `None` = root KSKs.
    trust_anchor: Option<std::path::PathBuf>,
    validating: OnceLock<Result<Arc<TokioResolver>, String>>,
}

impl std::fmt::Debug for MxResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MxResolver")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

/// Tries per DNS query of every resolver [`build`] makes.
pub(crate) const DNS_ATTEMPTS: u32 = 2;

/// The gateway's one way to build a resolver (MX/TLSA lookups here, sender authentication in
/// `auth::resolver`): `server` alone or the system resolver, `timeout` per query, two attempts.
/// `dnssec`: `Some(anchors)` builds a validating resolver.
pub(crate) fn build(
    server: Option<SocketAddr>,
    timeout: Duration,
    dnssec: Option<Arc<hickory_resolver::proto::dnssec::TrustAnchors>>,
) -> Result<TokioResolver, String> {
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
    if let Some(anchors) = dnssec {
        builder = builder.with_trust_anchor(anchors);
    }
    let opts = builder.options_mut();
    opts.timeout = timeout;
    opts.attempts = DNS_ATTEMPTS as usize;
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

/// The security of a validated MX answer from its records' proofs (RFC 7672 2.2.1), failing
/// closed: only a proven-insecure answer is `Insecure`; an indeterminate one is a temporary
/// failure, a bogus one [`MxError::Bogus`].
fn mx_security(
    proofs: impl IntoIterator<Item = hickory_resolver::proto::dnssec::Proof>,
) -> Result<MxSecurity, MxError> {
    use crate::tls_policy::dns::{Security, security};
    match security(proofs) {
        Security::Secure => Ok(MxSecurity::Secure),
        Security::Insecure => Ok(MxSecurity::Insecure),
        Security::Bogus => Err(MxError::Bogus),
        Security::Indeterminate => Err(MxError::Temporary(
            "the DNSSEC status of the MX answer is indeterminate".into(),
        )),
    }
}

impl MxResolver {
    /// `server`: the fleet's `dnsResolver`, already validated; `None` = system resolver.
    /// `allowed`: the fleet's `allowPrivateMxAddresses`.
    pub fn new(server: Option<SocketAddr>, timeout: Duration, allowed: Vec<IpNet>) -> MxResolver {
        MxResolver {
            server,
            timeout,
            allowed,
            inner: OnceLock::new(),
            trust_anchor: None,
            validating: OnceLock::new(),
        }
    }

    /// Sets the DNSSEC trust anchor file of the validating resolver.
    pub fn with_trust_anchor(mut self, file: Option<std::path::PathBuf>) -> MxResolver {
        self.trust_anchor = file;
        self
    }

    /// The DNSSEC-validating resolver (DANE), built on first use.
    pub fn validating(&self) -> Result<Arc<TokioResolver>, String> {
        self.validating
            .get_or_init(|| {
                use hickory_resolver::proto::dnssec::TrustAnchors;
                let anchors = match &self.trust_anchor {
                    Some(f) => TrustAnchors::from_file(f).map_err(|e| {
                        format!("cannot read DNSSEC trust anchor {}: {e}", f.display())
                    })?,
                    None => TrustAnchors::default(),
                };
                build(self.server, self.timeout, Some(Arc::new(anchors))).map(Arc::new)
            })
            .clone()
    }

    /// Splits the addresses of MX host `name` into those that may be connected to (at most
    /// [`MAX_ADDRS_PER_HOST`]) and, when none may, why not.
    fn screen(&self, name: &str, addrs: Vec<IpAddr>) -> (Vec<IpAddr>, Option<String>) {
        let mut usable = Vec::new();
        let mut refused = Vec::new();
        for ip in addrs {
            match special_purpose(ip) {
                Some(kind)
                    if !self
                        .allowed
                        .iter()
                        .any(|n| n.contains(&ip) || n.contains(&ip.to_canonical())) =>
                {
                    tracing::warn!(mx_host = name, address = %ip, kind, "MX address refused: not a public address and not in allowPrivateMxAddresses");
                    refused.push(format!("{ip} is a {kind} address"));
                }
                _ => usable.push(ip),
            }
        }
        usable.truncate(MAX_ADDRS_PER_HOST);
        let why = (usable.is_empty() && !refused.is_empty()).then(|| {
            format!(
                "{name}: {}, refused (not in allowPrivateMxAddresses)",
                refused.join(", ")
            )
        });
        (usable, why)
    }

    fn resolver(&self) -> Result<Arc<TokioResolver>, MxError> {
        self.inner
            .get_or_init(|| build(self.server, self.timeout, None).map(Arc::new))
            .clone()
            .map_err(MxError::Temporary)
    }

    /// The TXT strings at `name` (each record's strings joined), from the plain resolver.
    pub async fn txt(&self, name: &str) -> Result<Vec<String>, MxError> {
        let r = self.resolver()?;
        match r.txt_lookup(format!("{}.", normalise(name))).await {
            Ok(l) => Ok(l
                .answers()
                .iter()
                .filter_map(|rec| match &rec.data {
                    RData::TXT(t) => Some(
                        t.txt_data
                            .iter()
                            .map(|b| String::from_utf8_lossy(b).into_owned())
                            .collect::<String>(),
                    ),
                    _ => None,
                })
                .collect()),
            Err(e) if e.is_no_records_found() || e.is_nx_domain() => Ok(Vec::new()),
            Err(e) => Err(MxError::Temporary(e.to_string())),
        }
    }

    /// The addresses of `host` that may be connected to (the `allowPrivateMxAddresses`
    /// screen of MX hosts), for other hosts named by partner DNS (MTA-STS policy hosts).
    pub async fn usable_addresses(&self, host: &str) -> Result<Vec<IpAddr>, String> {
        let addrs = self.addresses(host).await.map_err(|e| e.to_string())?;
        if addrs.is_empty() {
            return Err("no A/AAAA records".into());
        }
        let (usable, why) = self.screen(host, addrs);
        match why {
            Some(why) => Err(why),
            None => Ok(usable),
        }
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
        self.resolve_with(domain, false).await.map(|(h, _)| h)
    }

    /// The longest one DNS stage before connecting may take: the MX resolution with its
    /// hosts' addresses, a TLSA lookup, an `_mta-sts` TXT lookup. Six times the per-query
    /// timeout (`timeouts.nextHopSecs`, clamped to 1–10 s), i.e. three queries of two
    /// attempts each; a validating lookup chases its DS/DNSKEY records within the same bound.
    pub fn deadline(&self) -> Duration {
        self.timeout * 6
    }

    /// Like [`MxResolver::resolve`]; with `validate` the MX records come from the validating
    /// resolver and the answer says whether they are secure (a bogus answer is an error).
    /// Bounded by [`MxResolver::deadline`] ([`MxError::Timeout`]).
    pub async fn resolve_with(
        &self,
        domain: &str,
        validate: bool,
    ) -> Result<(Vec<MxHost>, MxSecurity), MxError> {
        let deadline = self.deadline();
        tokio::time::timeout(deadline, self.resolve_inner(domain, validate))
            .await
            .unwrap_or(Err(MxError::Timeout(deadline.as_secs())))
    }

    async fn resolve_inner(
        &self,
        domain: &str,
        validate: bool,
    ) -> Result<(Vec<MxHost>, MxSecurity), MxError> {
        let domain = normalise(domain);
        let r = if validate {
            self.validating().map_err(MxError::Temporary)?
        } else {
            self.resolver()?
        };
        let mut security = if validate {
            MxSecurity::Insecure
        } else {
            MxSecurity::Unchecked
        };
        let records: Vec<(u16, String)> = match r.mx_lookup(format!("{domain}.")).await {
            Ok(l) => {
                let answers: Vec<_> = l
                    .answers()
                    .iter()
                    .filter(|rec| matches!(rec.data, RData::MX(_)))
                    .collect();
                if validate && !answers.is_empty() {
                    security = mx_security(answers.iter().map(|r| r.proof))?;
                }
                answers
                    .iter()
                    .filter_map(|rec| match &rec.data {
                        RData::MX(mx) => Some((mx.preference, normalise(&mx.exchange.to_ascii()))),
                        _ => None,
                    })
                    .collect()
            }
            Err(e) if crate::tls_policy::dns::is_bogus(&e) => return Err(MxError::Bogus),
            Err(e) if e.is_nx_domain() => {
                return Err(MxError::NoMailServers(format!("{domain} does not exist")));
            }
            Err(e) if crate::tls_policy::dns::denial_proof(&e).is_some() => {
                // A denial the resolver could not classify is a failed lookup (fail closed);
                // a proven one (secure or insecure) means no MX records.
                let proof = crate::tls_policy::dns::denial_proof(&e);
                mx_security(proof)?;
                Vec::new()
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
            let (addrs, error) = self.screen(&domain, addrs);
            // An implicit MX has no MX RRset to be secure.
            let security = if validate {
                MxSecurity::Insecure
            } else {
                security
            };
            return Ok((
                vec![MxHost {
                    name: domain,
                    preference: 0,
                    addrs,
                    error,
                }],
                security,
            ));
        }
        let mut hosts = Vec::new();
        for (preference, name) in order(records).into_iter().take(MAX_MX_HOSTS) {
            let (addrs, error) = match self.addresses(&name).await {
                Ok(a) if a.is_empty() => (a, Some(format!("{name} has no A/AAAA records"))),
                Ok(a) => self.screen(&name, a),
                Err(e) => (Vec::new(), Some(format!("{name}: {e}"))),
            };
            hosts.push(MxHost {
                name,
                preference,
                addrs,
                error,
            });
        }
        Ok((hosts, security))
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
    fn special_purpose_addresses() {
        for ip in [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.5",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.254",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.254",
            "169.254.169.254",
            "192.0.2.1",
            "198.51.100.7",
            "203.0.113.9",
            "192.0.0.8",
            "198.18.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "2001:db8::25",
            "3fff::1",
            "100::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(special_purpose(ip).is_some(), "{ip} is special-purpose");
        }
        for ip in [
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.1",
            "172.32.0.1",
            "192.0.3.1",
            "198.20.0.1",
            "2a00:1450::1",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(special_purpose(ip), None, "{ip} is public");
        }
    }

    #[test]
    fn private_mx_addresses_are_refused_unless_allowed() {
        let ips = |v: &[&str]| v.iter().map(|s| s.parse::<IpAddr>().unwrap()).collect();
        let strict = MxResolver::new(None, Duration::from_secs(1), vec![]);
        let (usable, why) = strict.screen("mx.test", ips(&["127.0.0.5", "10.0.0.1"]));
        assert!(usable.is_empty());
        let why = why.unwrap();
        assert!(
            why.contains("127.0.0.5 is a loopback address")
                && why.contains("10.0.0.1 is a private (RFC 1918) address")
                && why.contains("allowPrivateMxAddresses"),
            "{why}"
        );
        let (usable, why) = strict.screen("mx.test", ips(&["10.0.0.1", "8.8.8.8"]));
        assert_eq!((usable, why), (ips(&["8.8.8.8"]), None));
        let loopback = MxResolver::new(
            None,
            Duration::from_secs(1),
            vec!["127.0.0.0/8".parse().unwrap()],
        );
        let (usable, why) = loopback.screen(
            "mx.test",
            ips(&["127.0.0.5", "::ffff:127.0.0.6", "10.0.0.1"]),
        );
        assert_eq!(usable, ips(&["127.0.0.5", "::ffff:127.0.0.6"]));
        assert_eq!(why, None);
    }

    #[test]
    fn mx_answers_are_insecure_only_when_proven_insecure() {
        use hickory_resolver::proto::dnssec::Proof;
        assert_eq!(mx_security([Proof::Secure]), Ok(MxSecurity::Secure));
        assert_eq!(
            mx_security([Proof::Secure, Proof::Insecure]),
            Ok(MxSecurity::Insecure)
        );
        assert!(matches!(
            mx_security([Proof::Indeterminate]),
            Err(MxError::Temporary(_))
        ));
        assert!(matches!(
            mx_security([Proof::Secure, Proof::Indeterminate]),
            Err(MxError::Temporary(_))
        ));
        assert_eq!(
            mx_security([Proof::Indeterminate, Proof::Bogus]),
            Err(MxError::Bogus)
        );
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
