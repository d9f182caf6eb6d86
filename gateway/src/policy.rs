//! The decisions of ARCHITECTURE section 3/4 as pure functions of (fleet, connector set, session
//! facts, envelope). No I/O: the session gathers facts, calls these, and writes the reply.
//!
//! Invariants: envelope domains are compared only in their UTS-46 A-label form (lower case, no
//! root dot), so every Unicode spelling of a partner's domain meets the same connector; the
//! addresses themselves are never rewritten (the session relays them as the client sent them).
//! Claiming is deterministic: on equal rank the connector earlier in the connectors file wins.
//! Sessions claim through [`IndexedConnectors`] (hash lookups built at load); [`claim`] is the
//! linear reference, and both run the same rule functions, so they cannot rank differently.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;

use crate::certs::name_matches;
use crate::config::{
    ConnectorsFile, DefaultInbound, FleetSettings, IdentifyBy, InboundConnector, InternalSenders,
    MinTlsVersion,
};
use crate::reply::{Reply, fixed};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    Tls12,
    Tls13,
}

impl TlsVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsVersion::Tls12 => "1.2",
            TlsVersion::Tls13 => "1.3",
        }
    }
}

pub fn tls_str(v: Option<TlsVersion>) -> &'static str {
    v.map_or("none", TlsVersion::as_str)
}

/// What the rules need to know about the client certificate. A trait so the rules stay pure:
/// the session's implementation verifies chains lazily, tests use a table.
pub trait CertFacts {
    /// SAN dNSNames (or CN when there is no SAN).
    fn names(&self) -> &[String];
    fn subject(&self) -> &str;
    /// Whether the chain verifies against this bundle (`None` = public web PKI roots).
    fn trusted_by(&self, bundle: Option<&Path>) -> bool;
}

/// Session facts at MAIL FROM.
#[derive(Clone, Copy)]
pub struct Facts<'a> {
    pub client_ip: IpAddr,
    pub tls: Option<TlsVersion>,
    pub cert: Option<&'a dyn CertFacts>,
}

/// Which rule produced a refusal; the names appear in logs and in the `rule` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    SenderDomain,
    RequireTls,
    MinTlsVersion,
    RestrictToIpRanges,
    RestrictToCertificate,
    DefaultInbound,
    RelayingDenied,
    RouteSplit,
    TooManyRecipients,
    InvalidDomain,
}

impl Rule {
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::SenderDomain => "senderDomain",
            Rule::RequireTls => "requireTls",
            Rule::MinTlsVersion => "minTlsVersion",
            Rule::RestrictToIpRanges => "restrictToIPRanges",
            Rule::RestrictToCertificate => "restrictToCertificate",
            Rule::DefaultInbound => "defaultInbound",
            Rule::RelayingDenied => "relayingDenied",
            Rule::RouteSplit => "routeSplit",
            Rule::TooManyRecipients => "maxRecipients",
            Rule::InvalidDomain => "invalidDomain",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub rule: Rule,
    pub reply: Reply,
}

fn refuse(rule: Rule, code: u16, esc: [u16; 3], text: String) -> Refusal {
    Refusal {
        rule,
        reply: Reply::owned(code, esc, text),
    }
}

/// Result of the MAIL FROM decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderDecision {
    /// Name of the claiming Inbound connector.
    pub connector: Option<String>,
    /// The verified client-certificate name that matched the connector's `subjectName`.
    pub verified_name: Option<String>,
    /// The client is one of the fleet's internal senders.
    pub internal: bool,
    /// `Err` = refuse MAIL FROM with this reply.
    pub outcome: Result<(), Refusal>,
}

/// An address whose domain has no UTS-46 A-label form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidDomain;

/// The domain of an address as connectors and `acceptedDomains` are written: UTS-46 ToASCII
/// (A-labels, lower case), without the root dot. `Ok(None)` for the null reverse-path `<>`
/// (and a path without `@`).
///
/// UTS-46 maps fullwidth letters, the ideographic full stop and other dot forms, and upper
/// case, so `bücher.test`, `ｃｏｎｔｏｓｏ.test` and `contoso。test` meet the connector for
/// `xn--bcher-kva.test` / `contoso.test`. Flags: nontransitional, hyphens not position-checked
/// (real names have `--` in 3rd/4th place), DNS lengths verified, and the WHATWG URL deny list
/// for ASCII (spaces, controls, `%#/:<>?@[\]^|`); other ASCII (an `_`) passes as before: it
/// can never equal a connector's LDH pattern, so it can only meet `*`. Address literals
/// (`[192.0.2.1]`) are not names and are kept as written.
pub fn address_domain(address: &str) -> Result<Option<String>, InvalidDomain> {
    let Some((_, domain)) = address.rsplit_once('@') else {
        return Ok(None);
    };
    let domain = domain.trim();
    if domain.starts_with('[') {
        return Ok(Some(domain.to_ascii_lowercase()));
    }
    let ascii = idna::uts46::Uts46::new()
        .to_ascii(
            domain.as_bytes(),
            idna::uts46::AsciiDenyList::URL,
            idna::uts46::Hyphens::Allow,
            idna::uts46::DnsLength::VerifyAllowRootDot,
        )
        .map_err(|_| InvalidDomain)?;
    let d = ascii.strip_suffix('.').unwrap_or(&ascii);
    if d.is_empty() {
        return Err(InvalidDomain);
    }
    Ok(Some(d.to_string()))
}

/// How specifically a domain pattern matches: exact beats any wildcard, a longer wildcard beats
/// a shorter one, `*` is last. `*.example.com` covers every subdomain depth but not
/// `example.com` itself. `None` = no match.
pub fn domain_match(pattern: &str, domain: &str) -> Option<(u8, usize)> {
    // Patterns are validated ASCII LDH names and `domain` is already lowercased, so an ASCII
    // case-insensitive comparison is exact; it spares lowercasing every connector's patterns
    // into new strings on every MAIL FROM (the bench's profile showed ~1,000 allocations per
    // transaction with 1,000 connectors). Bytes, not str slicing: callers pass the A-label
    // form, but the function stays total on any UTF-8.
    let p = pattern.trim_end_matches('.');
    if p == "*" {
        return Some((0, 0));
    }
    let d = domain.as_bytes();
    if let Some(base) = p.strip_prefix("*.") {
        let b = base.as_bytes();
        let matches = d.len() > b.len() + 1
            && d[d.len() - b.len()..].eq_ignore_ascii_case(b)
            && d[d.len() - b.len() - 1] == b'.';
        return matches.then_some((1, base.len()));
    }
    p.as_bytes().eq_ignore_ascii_case(d).then_some((2, p.len()))
}

fn best_domain_match(patterns: &[String], domain: &str) -> Option<(u8, usize)> {
    patterns
        .iter()
        .filter_map(|p| domain_match(p, domain))
        .max()
}

/// The certificate name that matches `subject_name` if the chain is trusted by the connector's
/// bundle.
fn verified_cert_name(c: &InboundConnector, facts: &Facts) -> Option<String> {
    let rule = c.certificate.as_ref()?;
    let cert = facts.cert?;
    if !cert.trusted_by(rule.trust_bundle_file.as_deref()) {
        return None;
    }
    cert.names()
        .iter()
        .find(|n| name_matches(&rule.subject_name, n))
        .cloned()
}

/// Whether a connector's restrictions guard its `domains` at claiming rule 4. SenderDomain
/// connectors need not: rule 3 already gives them every domain they match.
fn guards_domains(c: &InboundConnector) -> bool {
    c.identify_by != IdentifyBy::SenderDomain
        && (c.restrict_to_ip_ranges || c.restrict_to_certificate)
}

/// Finds the connector that claims the transaction: Certificate > SenderIP > SenderDomain >
/// restricting connectors by domain (section 3 rules 1-4), most specific first. Ties go to the
/// earlier connector in the file; the operator never renders two connectors with the same
/// claim key (it keeps the oldest), so ties only arise in hand-written files.
///
/// This is the reference: a scan of every connector. Sessions claim through
/// [`IndexedConnectors::claim`], which feeds the same rule functions only the few connectors
/// its index names (a superset of the winner), so both always agree.
pub fn claim<'c>(
    connectors: &'c [InboundConnector],
    facts: &Facts,
    sender_domain: Option<&str>,
) -> Option<&'c InboundConnector> {
    claim_by_certificate(connectors.iter(), facts)
        .or_else(|| claim_by_ip(connectors.iter(), facts))
        .or_else(|| claim_by_domain(connectors.iter(), sender_domain))
        .or_else(|| claim_guarded(connectors.iter(), sender_domain?))
}

// The four rules over any sequence of candidates in file order. Each checks everything about
// a candidate itself (its identifyBy, its patterns), so a superset of the matching connectors
// gives the same answer as all of them, as long as it holds the winner and keeps file order.

/// Rule 1, Certificate: an exact subjectName beats a wildcard one.
fn claim_by_certificate<'c>(
    candidates: impl Iterator<Item = &'c InboundConnector>,
    facts: &Facts,
) -> Option<&'c InboundConnector> {
    let mut best: Option<(bool, &InboundConnector)> = None;
    for c in candidates.filter(|c| c.identify_by == IdentifyBy::Certificate) {
        if verified_cert_name(c, facts).is_some() {
            let exact = c
                .certificate
                .as_ref()
                .is_some_and(|r| !r.subject_name.starts_with("*."));
            if best.is_none_or(|(b, _)| exact && !b) {
                best = Some((exact, c));
            }
        }
    }
    best.map(|(_, c)| c)
}

/// Rule 2, SenderIP: longest prefix.
fn claim_by_ip<'c>(
    candidates: impl Iterator<Item = &'c InboundConnector>,
    facts: &Facts,
) -> Option<&'c InboundConnector> {
    let mut best: Option<(u8, &InboundConnector)> = None;
    for c in candidates.filter(|c| c.identify_by == IdentifyBy::SenderIp) {
        let len = c
            .sender_ip_ranges
            .iter()
            .filter(|n| n.contains(&facts.client_ip))
            .map(|n| n.prefix_len())
            .max();
        if let Some(len) = len
            && best.is_none_or(|(b, _)| len > b)
        {
            best = Some((len, c));
        }
    }
    best.map(|(_, c)| c)
}

/// Rule 3, SenderDomain. The null sender (bounces) has no domain: only `*` can claim it.
fn claim_by_domain<'c>(
    candidates: impl Iterator<Item = &'c InboundConnector>,
    sender_domain: Option<&str>,
) -> Option<&'c InboundConnector> {
    let mut best: Option<((u8, usize), &InboundConnector)> = None;
    for c in candidates.filter(|c| c.identify_by == IdentifyBy::SenderDomain) {
        let rank = match sender_domain {
            Some(d) => best_domain_match(&c.domains, d),
            None => c.domains.iter().any(|p| p == "*").then_some((0, 0)),
        };
        if let Some(rank) = rank
            && best.is_none_or(|(b, _)| rank > b)
        {
            best = Some((rank, c));
        }
    }
    best.map(|(_, c)| c)
}

/// Rule 4: a connector restricted to IP ranges or a certificate guards its partner's domains
/// whatever identifies it (Exchange's RestrictDomainsToIPAddresses): mail from those domains
/// that rules 1-3 left unclaimed is claimed here, so the restriction refuses it. `*` names
/// no partner domain: guarding it would turn one connector into a fleet-wide reject.
fn claim_guarded<'c>(
    candidates: impl Iterator<Item = &'c InboundConnector>,
    domain: &str,
) -> Option<&'c InboundConnector> {
    let mut best: Option<((u8, usize), &InboundConnector)> = None;
    for c in candidates.filter(|c| guards_domains(c)) {
        let rank = c
            .domains
            .iter()
            .filter(|p| p.as_str() != "*")
            .filter_map(|p| domain_match(p, domain))
            .max();
        if let Some(rank) = rank
            && best.is_none_or(|(b, _)| rank > b)
        {
            best = Some((rank, c));
        }
    }
    best.map(|(_, c)| c)
}

/// The connectors file with an index for claiming, built once per config load, so a MAIL
/// FROM costs a few hash lookups whatever the number of connectors (issue 17: the scan cost
/// ~20 % of the gateway's CPU at 1,000 connectors).
///
/// Invariant: for every rule, the index yields a set of candidates that holds the connector
/// the linear [`claim`] would pick; the rule functions then rank those candidates exactly as
/// the scan does. Each key stores only the earliest connector with that key: a later one can
/// never win (equal rank, later in the file). `policy::tests::index_claims_like_the_scan`
/// checks the equivalence on generated connector sets.
pub struct IndexedConnectors {
    file: ConnectorsFile,
    index: ClaimIndex,
}

impl std::ops::Deref for IndexedConnectors {
    type Target = ConnectorsFile;
    fn deref(&self) -> &ConnectorsFile {
        &self.file
    }
}

impl From<ConnectorsFile> for IndexedConnectors {
    fn from(file: ConnectorsFile) -> Self {
        IndexedConnectors {
            index: ClaimIndex::new(&file.inbound),
            file,
        }
    }
}

impl IndexedConnectors {
    /// Same answer as [`claim`] over `self.inbound`.
    pub fn claim(&self, facts: &Facts, sender_domain: Option<&str>) -> Option<&InboundConnector> {
        let pick = |ids: &[u32]| candidates(&self.file.inbound, ids);
        let ix = &self.index;
        if let Some(cert) = facts.cert
            && ix.certificate_count > 0
        {
            let ids = ix.certificate_candidates(cert);
            if let Some(c) = claim_by_certificate(pick(&ids), facts) {
                return Some(c);
            }
        }
        if let Some(i) = ix.ip_candidate(facts.client_ip)
            && let Some(c) = claim_by_ip(pick(&[i]), facts)
        {
            return Some(c);
        }
        let lowered;
        let domain = match sender_domain {
            // Patterns are keyed in ASCII lower case; envelope domains already are (UTS-46),
            // so this copies only for callers that pass something else.
            Some(d) if d.bytes().any(|b| b.is_ascii_uppercase()) => {
                lowered = d.to_ascii_lowercase();
                Some(lowered.as_str())
            }
            d => d,
        };
        let ids = match domain {
            Some(d) => ix.sender_domain.candidates(d),
            None => ix.null_sender.into_iter().collect(),
        };
        if let Some(c) = claim_by_domain(pick(&ids), sender_domain) {
            return Some(c);
        }
        let d = domain?;
        claim_guarded(pick(&ix.guarded.candidates(d)), sender_domain?)
    }
}

fn candidates<'c>(
    all: &'c [InboundConnector],
    ids: &[u32],
) -> impl Iterator<Item = &'c InboundConnector> + use<'c> {
    // Collected, so the ids' buffer can go; at most a handful.
    let picked: Vec<&InboundConnector> = ids.iter().filter_map(|&i| all.get(i as usize)).collect();
    picked.into_iter()
}

/// Domain patterns by key, lower case, root dots trimmed as [`domain_match`] trims them.
#[derive(Default)]
struct DomainIndex {
    exact: HashMap<Box<str>, u32>,
    /// `*.base` by `base`.
    wildcard: HashMap<Box<str>, u32>,
    star: Option<u32>,
}

impl DomainIndex {
    /// Connectors must be inserted in file order (the first one per key is kept).
    fn insert(&mut self, pattern: &str, id: u32) {
        let p = pattern.trim_end_matches('.');
        if p == "*" {
            self.star.get_or_insert(id);
        } else if let Some(base) = p.strip_prefix("*.") {
            self.wildcard
                .entry(base.to_ascii_lowercase().into())
                .or_insert(id);
        } else {
            self.exact
                .entry(p.to_ascii_lowercase().into())
                .or_insert(id);
        }
    }

    /// Every connector whose pattern can match `domain` (ASCII lower case), in file order:
    /// the exact name, `*.` + every proper suffix after a dot, and `*`.
    fn candidates(&self, domain: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        ids.extend(self.exact.get(domain));
        if !self.wildcard.is_empty() {
            // `*.base` needs at least one byte before the dot (domain_match's length test).
            for (i, _) in domain.match_indices('.').filter(|(i, _)| *i > 0) {
                ids.extend(self.wildcard.get(&domain[i + 1..]));
            }
        }
        ids.extend(self.star);
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// SenderIP ranges by prefix length (longest first), then by network address.
#[derive(Default)]
struct IpIndex {
    v4: Vec<(u8, HashMap<u32, u32>)>,
    v6: Vec<(u8, HashMap<u128, u32>)>,
}

fn mask4(addr: u32, len: u8) -> u32 {
    addr & u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
}

fn mask6(addr: u128, len: u8) -> u128 {
    addr & u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
}

fn by_len<K: std::hash::Hash + Eq>(
    table: &mut Vec<(u8, HashMap<K, u32>)>,
    len: u8,
) -> &mut HashMap<K, u32> {
    let at = match table.iter().position(|(l, _)| *l <= len) {
        Some(at) if table[at].0 == len => at,
        Some(at) => {
            table.insert(at, (len, HashMap::new()));
            at
        }
        None => {
            table.push((len, HashMap::new()));
            table.len() - 1
        }
    };
    &mut table[at].1
}

impl IpIndex {
    fn insert(&mut self, net: &ipnet::IpNet, id: u32) {
        match net {
            ipnet::IpNet::V4(n) => {
                let key = mask4(n.addr().to_bits(), n.prefix_len());
                by_len(&mut self.v4, n.prefix_len())
                    .entry(key)
                    .or_insert(id);
            }
            ipnet::IpNet::V6(n) => {
                let key = mask6(n.addr().to_bits(), n.prefix_len());
                by_len(&mut self.v6, n.prefix_len())
                    .entry(key)
                    .or_insert(id);
            }
        }
    }

    /// The earliest connector with the longest range holding `ip`: the rule-2 winner.
    fn lookup(&self, ip: IpAddr) -> Option<u32> {
        match ip {
            IpAddr::V4(a) => self
                .v4
                .iter()
                .find_map(|(len, m)| m.get(&mask4(a.to_bits(), *len)).copied()),
            IpAddr::V6(a) => self
                .v6
                .iter()
                .find_map(|(len, m)| m.get(&mask6(a.to_bits(), *len)).copied()),
        }
    }
}

/// A name as [`crate::certs::name_matches`] compares it.
fn cert_key(name: &str) -> String {
    name.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// The keys under which a subject name or certificate name can meet its match:
/// `name_matches` pairs equal names, a wildcard with a name one label under its base, or two
/// wildcards with equal bases, so a name is filed under itself and its parent, and `*.base`
/// under `base`.
fn cert_keys(name: &str) -> impl Iterator<Item = String> {
    let n = cert_key(name);
    let (whole, parent) = match n.strip_prefix("*.") {
        Some(base) => (None, Some(base.to_string())),
        None => {
            let parent = n.split_once('.').map(|(_, rest)| rest.to_string());
            (Some(n), parent)
        }
    };
    whole.into_iter().chain(parent)
}

#[derive(Default)]
struct ClaimIndex {
    certificate_count: usize,
    /// Certificate connectors by [`cert_keys`] of their subjectName: every one, since trust
    /// is decided per connector (bundle) at claim time.
    certificate: HashMap<String, Vec<u32>>,
    ip: IpIndex,
    sender_domain: DomainIndex,
    /// The earliest SenderDomain connector with the pattern `*` as written.
    null_sender: Option<u32>,
    /// Rule 4: the domains of restricting non-SenderDomain connectors, `*` as written left out.
    guarded: DomainIndex,
}

impl ClaimIndex {
    fn new(connectors: &[InboundConnector]) -> Self {
        let mut ix = ClaimIndex::default();
        for (id, c) in (0u32..).zip(connectors) {
            match c.identify_by {
                IdentifyBy::Certificate => {
                    if let Some(rule) = &c.certificate {
                        ix.certificate_count += 1;
                        for key in cert_keys(&rule.subject_name) {
                            let ids = ix.certificate.entry(key).or_default();
                            if ids.last() != Some(&id) {
                                ids.push(id);
                            }
                        }
                    }
                }
                IdentifyBy::SenderIp => {
                    for net in &c.sender_ip_ranges {
                        ix.ip.insert(net, id);
                    }
                }
                IdentifyBy::SenderDomain => {
                    for p in &c.domains {
                        ix.sender_domain.insert(p, id);
                        if p == "*" {
                            ix.null_sender.get_or_insert(id);
                        }
                    }
                }
            }
            if guards_domains(c) {
                for p in c.domains.iter().filter(|p| p.as_str() != "*") {
                    ix.guarded.insert(p, id);
                }
            }
        }
        ix
    }

    fn certificate_candidates(&self, cert: &dyn CertFacts) -> Vec<u32> {
        let mut ids: Vec<u32> = cert
            .names()
            .iter()
            .flat_map(|n| cert_keys(n))
            .filter_map(|k| self.certificate.get(&k))
            .flatten()
            .copied()
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    fn ip_candidate(&self, ip: IpAddr) -> Option<u32> {
        self.ip.lookup(ip)
    }
}

pub fn is_internal(internal: &InternalSenders, facts: &Facts) -> bool {
    if internal
        .ip_ranges
        .iter()
        .any(|n| n.contains(&facts.client_ip))
    {
        return true;
    }
    let Some(cert) = facts.cert else {
        return false;
    };
    if internal.certificate_names.is_empty() {
        return false;
    }
    let named = cert.names().iter().any(|n| {
        internal
            .certificate_names
            .iter()
            .any(|p| name_matches(p, n))
    });
    named && cert.trusted_by(internal.trust_bundle_file.as_deref())
}

/// The section 3 rule table for a claiming connector; first failure wins.
fn connector_rules(
    c: &InboundConnector,
    facts: &Facts,
    sender_domain: Option<&str>,
    verified_name: Option<&str>,
) -> Result<(), Refusal> {
    let by_ip_or_cert = c.identify_by != IdentifyBy::SenderDomain;
    // The null sender (a bounce) carries no domain to check; RFC 5321 4.5.5 requires that
    // bounces be accepted, so only the transport rules below apply to it.
    if by_ip_or_cert
        && let Some(domain) = sender_domain
        && best_domain_match(&c.domains, domain).is_none()
    {
        return Err(refuse(
            Rule::SenderDomain,
            550,
            [5, 7, 1],
            format!(
                "Sender domain {domain} is not allowed for partner connector {}",
                c.name
            ),
        ));
    }
    if c.require_tls && facts.tls.is_none() {
        return Err(refuse(
            Rule::RequireTls,
            530,
            [5, 7, 0],
            "Must issue a STARTTLS command first".into(),
        ));
    }
    if let Some(v) = facts.tls {
        let need = match c.min_tls_version {
            MinTlsVersion::Tls12 => TlsVersion::Tls12,
            MinTlsVersion::Tls13 => TlsVersion::Tls13,
        };
        if v < need {
            return Err(refuse(
                Rule::MinTlsVersion,
                550,
                [5, 7, 1],
                format!(
                    "TLS {} is below the minimum TLS {} required for partner connector {}",
                    v.as_str(),
                    need.as_str(),
                    c.name
                ),
            ));
        }
    }
    if c.restrict_to_ip_ranges
        && !c
            .sender_ip_ranges
            .iter()
            .any(|n| n.contains(&facts.client_ip))
    {
        return Err(refuse(
            Rule::RestrictToIpRanges,
            550,
            [5, 7, 1],
            format!(
                "Client IP {} is outside the IP ranges of partner connector {}",
                facts.client_ip, c.name
            ),
        ));
    }
    if c.restrict_to_certificate && verified_name.is_none() {
        let why = match facts.cert {
            None => "no client certificate was presented",
            Some(cert) => {
                let bundle = c
                    .certificate
                    .as_ref()
                    .and_then(|r| r.trust_bundle_file.as_deref());
                if !cert.trusted_by(bundle) {
                    "the client certificate is not trusted"
                } else {
                    "the client certificate name does not match"
                }
            }
        };
        return Err(refuse(
            Rule::RestrictToCertificate,
            550,
            [5, 7, 1],
            format!(
                "Partner connector {} requires a valid client certificate: {why}",
                c.name
            ),
        ));
    }
    Ok(())
}

/// The MAIL FROM decision: claim, then the claiming connector's rules, or the fleet default.
pub fn decide_sender(
    fleet: &FleetSettings,
    connectors: &IndexedConnectors,
    facts: &Facts,
    sender: &str,
) -> SenderDecision {
    let internal = is_internal(&fleet.internal_senders, facts);
    let Ok(domain) = address_domain(sender) else {
        // No rule can be applied to a domain that has no canonical form.
        return SenderDecision {
            connector: None,
            verified_name: None,
            internal,
            outcome: Err(Refusal {
                rule: Rule::InvalidDomain,
                reply: fixed::BAD_SENDER_DOMAIN,
            }),
        };
    };
    match connectors.claim(facts, domain.as_deref()) {
        Some(c) => {
            let verified_name = verified_cert_name(c, facts);
            let outcome = connector_rules(c, facts, domain.as_deref(), verified_name.as_deref());
            SenderDecision {
                connector: Some(c.name.clone()),
                verified_name,
                internal,
                outcome,
            }
        }
        None => {
            // Internal senders are the organisation itself, not unrecognised partners.
            let outcome = if fleet.default_inbound == DefaultInbound::Reject && !internal {
                Err(refuse(
                    Rule::DefaultInbound,
                    550,
                    [5, 7, 1],
                    "Sender is not a recognised partner".into(),
                ))
            } else {
                Ok(())
            };
            SenderDecision {
                connector: None,
                verified_name: None,
                internal,
                outcome,
            }
        }
    }
}

/// Where an accepted recipient's mail goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Route {
    Upstream,
    /// Index into `ConnectorsFile::outbound` of the config the session started with.
    Outbound(usize),
    /// A `useMX` Outbound connector (index as above) and the recipient domain (A-label form)
    /// whose MX hosts are the next hop: recipients of other domains need another transaction.
    OutboundMx(usize, String),
}

impl Route {
    /// The Outbound connector index, if any.
    pub fn outbound_index(&self) -> Option<usize> {
        match self {
            Route::Upstream => None,
            Route::Outbound(i) | Route::OutboundMx(i, _) => Some(*i),
        }
    }
}

/// The RCPT TO decision. `route` is the route fixed by an earlier recipient of this
/// transaction, `accepted` how many recipients were accepted so far.
pub fn decide_recipient(
    fleet: &FleetSettings,
    connectors: &ConnectorsFile,
    internal: bool,
    recipient: &str,
    route: Option<&Route>,
    accepted: usize,
) -> Result<Route, Refusal> {
    let denied = || {
        refuse(
            Rule::RelayingDenied,
            550,
            [5, 7, 1],
            "Relaying denied: recipient domain is not accepted here".into(),
        )
    };
    let domain = match address_domain(recipient) {
        Ok(Some(d)) => d,
        Ok(None) => return Err(denied()),
        Err(InvalidDomain) => {
            return Err(Refusal {
                rule: Rule::InvalidDomain,
                reply: fixed::BAD_RCPT_DOMAIN,
            });
        }
    };
    let wanted = if best_domain_match(&fleet.accepted_domains, &domain).is_some() {
        Route::Upstream
    } else if internal {
        let best = connectors
            .outbound
            .iter()
            .enumerate()
            .filter_map(|(i, c)| best_domain_match(&c.domains, &domain).map(|r| (r, i)))
            .fold(None::<((u8, usize), usize)>, |acc, (r, i)| match acc {
                Some((br, _)) if br >= r => acc,
                _ => Some((r, i)),
            });
        match best {
            Some((_, i)) if connectors.outbound.get(i).is_some_and(|c| c.use_mx) => {
                Route::OutboundMx(i, domain)
            }
            Some((_, i)) => Route::Outbound(i),
            None => return Err(denied()),
        }
    } else {
        return Err(denied());
    };
    if let Some(r) = route
        && *r != wanted
    {
        return Err(Refusal {
            rule: Rule::RouteSplit,
            reply: fixed::ROUTE_SPLIT,
        });
    }
    if accepted >= fleet.limits.max_recipients {
        return Err(Refusal {
            rule: Rule::TooManyRecipients,
            reply: fixed::TOO_MANY_RECIPIENTS,
        });
    }
    Ok(wanted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CertificateRule, OutboundConnector};
    use std::path::PathBuf;

    struct TestCert {
        names: Vec<String>,
        trusted: Vec<Option<PathBuf>>,
    }

    impl CertFacts for TestCert {
        fn names(&self) -> &[String] {
            &self.names
        }
        fn subject(&self) -> &str {
            "CN=test"
        }
        fn trusted_by(&self, bundle: Option<&Path>) -> bool {
            self.trusted.contains(&bundle.map(Path::to_path_buf))
        }
    }

    fn cert(names: &[&str], trusted: &[Option<&str>]) -> TestCert {
        TestCert {
            names: names.iter().map(|s| s.to_string()).collect(),
            trusted: trusted.iter().map(|t| t.map(PathBuf::from)).collect(),
        }
    }

    fn fleet() -> FleetSettings {
        serde_json::from_str(
            r#"{"hostname":"gw.example.org",
                "serverCertificate":{"certFile":"c","keyFile":"k"},
                "acceptedDomains":["example.org","*.example.org"],
                "internalSenders":{"ipRanges":["10.0.0.0/8"],"certificateNames":["relay.example.org"]},
                "upstream":{"host":"127.0.0.1"}}"#,
        )
        .unwrap()
    }

    fn inbound(name: &str, domains: &[&str]) -> InboundConnector {
        InboundConnector {
            name: name.into(),
            generation: 1,
            domains: domains.iter().map(|s| s.to_string()).collect(),
            identify_by: IdentifyBy::SenderDomain,
            sender_ip_ranges: vec![],
            require_tls: false,
            min_tls_version: MinTlsVersion::Tls12,
            certificate: None,
            restrict_to_ip_ranges: false,
            restrict_to_certificate: false,
            sender_authentication: Default::default(),
        }
    }

    fn by_ip(name: &str, domains: &[&str], ranges: &[&str]) -> InboundConnector {
        let mut c = inbound(name, domains);
        c.identify_by = IdentifyBy::SenderIp;
        c.sender_ip_ranges = ranges.iter().map(|r| r.parse().unwrap()).collect();
        c
    }

    fn by_cert(
        name: &str,
        domains: &[&str],
        subject: &str,
        bundle: Option<&str>,
    ) -> InboundConnector {
        let mut c = inbound(name, domains);
        c.identify_by = IdentifyBy::Certificate;
        c.certificate = Some(CertificateRule {
            subject_name: subject.into(),
            trust_bundle_file: bundle.map(PathBuf::from),
        });
        c
    }

    fn facts<'a>(ip: &str, tls: Option<TlsVersion>, cert: Option<&'a dyn CertFacts>) -> Facts<'a> {
        Facts {
            client_ip: ip.parse().unwrap(),
            tls,
            cert,
        }
    }

    fn file(inbound: Vec<InboundConnector>) -> ConnectorsFile {
        ConnectorsFile {
            inbound,
            outbound: vec![],
        }
    }

    fn set(inbound: Vec<InboundConnector>) -> IndexedConnectors {
        file(inbound).into()
    }

    /// The tables below call `claim` on plain slices: this asks both the scan and the index
    /// and insists they agree, so every table row also checks the index.
    fn claim<'c>(
        cs: &'c [InboundConnector],
        facts: &Facts,
        domain: Option<&str>,
    ) -> Option<&'c InboundConnector> {
        let scanned = super::claim(cs, facts, domain);
        let indexed = set(cs.to_vec());
        assert_eq!(
            indexed.claim(facts, domain).map(|c| &c.name),
            scanned.map(|c| &c.name),
            "index and scan disagree for {domain:?} from {}",
            facts.client_ip
        );
        scanned
    }

    fn code(d: &SenderDecision) -> Option<(u16, String, Rule)> {
        d.outcome
            .as_ref()
            .err()
            .map(|r| (r.reply.code, r.reply.esc_string(), r.rule))
    }

    const TLS13: Option<TlsVersion> = Some(TlsVersion::Tls13);
    const TLS12: Option<TlsVersion> = Some(TlsVersion::Tls12);

    #[test]
    fn sender_domain_claims_exact_over_wildcard_over_star() {
        let cs = vec![
            inbound("star", &["*"]),
            inbound("short", &["*.contoso.com"]),
            inbound("long", &["*.eu.contoso.com"]),
            inbound("exact", &["mail.eu.contoso.com"]),
        ];
        let f = facts("192.0.2.1", None, None);
        let name = |d: &str| claim(&cs, &f, Some(d)).map(|c| c.name.as_str());
        assert_eq!(name("mail.eu.contoso.com"), Some("exact"));
        assert_eq!(name("x.eu.contoso.com"), Some("long"));
        assert_eq!(name("eu.contoso.com"), Some("short"));
        assert_eq!(name("contoso.com"), Some("star"));
        assert_eq!(claim(&cs, &f, None).map(|c| c.name.as_str()), Some("star"));
        let no_star = &cs[1..];
        assert_eq!(claim(no_star, &f, Some("fabrikam.com")), None);
        assert_eq!(claim(no_star, &f, None), None);
    }

    #[test]
    fn sender_ip_claims_longest_prefix_v4_and_v6() {
        let cs = vec![
            by_ip("wide", &["*"], &["203.0.113.0/24", "2001:db8::/32"]),
            by_ip("narrow", &["*"], &["203.0.113.128/25", "2001:db8:1::/48"]),
        ];
        let name = |ip: &str| claim(&cs, &facts(ip, None, None), None).map(|c| c.name.as_str());
        assert_eq!(name("203.0.113.200"), Some("narrow"));
        assert_eq!(name("203.0.113.5"), Some("wide"));
        assert_eq!(name("2001:db8:1::25"), Some("narrow"));
        assert_eq!(name("2001:db8:2::25"), Some("wide"));
        assert_eq!(name("2001:db9::1"), None);
        assert_eq!(name("198.51.100.1"), None);
    }

    #[test]
    fn certificate_beats_ip_beats_domain() {
        let c = cert(&["mail.contoso.com"], &[Some("ca.pem")]);
        let cs = vec![
            inbound("domain", &["contoso.com"]),
            by_ip("ip", &["contoso.com"], &["203.0.113.0/24"]),
            by_cert("cert", &["contoso.com"], "mail.contoso.com", Some("ca.pem")),
        ];
        let with_cert = facts("203.0.113.9", TLS13, Some(&c));
        let claimed = |f: &Facts| claim(&cs, f, Some("contoso.com")).map(|c| c.name.clone());
        assert_eq!(claimed(&with_cert).as_deref(), Some("cert"));
        assert_eq!(
            claimed(&facts("203.0.113.9", TLS13, None)).as_deref(),
            Some("ip")
        );
        assert_eq!(
            claimed(&facts("198.51.100.9", TLS13, None)).as_deref(),
            Some("domain")
        );
        // An untrusted chain or a wrong name does not claim by certificate.
        let untrusted = cert(&["mail.contoso.com"], &[None]);
        assert_eq!(
            claimed(&facts("203.0.113.9", TLS13, Some(&untrusted))).as_deref(),
            Some("ip")
        );
        let wrong = cert(&["mx.fabrikam.com"], &[Some("ca.pem")]);
        assert_eq!(
            claimed(&facts("203.0.113.9", TLS13, Some(&wrong))).as_deref(),
            Some("ip")
        );
    }

    #[test]
    fn certificate_exact_subject_beats_wildcard_and_public_roots_default() {
        let c = cert(&["mail.contoso.com"], &[None]);
        let cs = vec![
            by_cert("wild", &["*"], "*.contoso.com", None),
            by_cert("exact", &["*"], "mail.contoso.com", None),
        ];
        let f = facts("192.0.2.1", TLS13, Some(&c));
        assert_eq!(claim(&cs, &f, None).map(|c| c.name.as_str()), Some("exact"));
        let wild = cert(&["mx9.contoso.com"], &[None]);
        let f = facts("192.0.2.1", TLS13, Some(&wild));
        assert_eq!(claim(&cs, &f, None).map(|c| c.name.as_str()), Some("wild"));
    }

    #[test]
    fn row1_sender_domain_not_allowed_for_ip_or_cert_identified() {
        let cs = set(vec![by_ip(
            "mail/contoso",
            &["contoso.com", "*.contoso.com"],
            &["203.0.113.0/24"],
        )]);
        let f = facts("203.0.113.9", TLS13, None);
        let d = decide_sender(&fleet(), &cs, &f, "a@fabrikam.com");
        assert_eq!(code(&d), Some((550, "5.7.1".into(), Rule::SenderDomain)));
        assert_eq!(d.connector.as_deref(), Some("mail/contoso"));
        assert!(
            decide_sender(&fleet(), &cs, &f, "a@contoso.com")
                .outcome
                .is_ok()
        );
        assert!(
            decide_sender(&fleet(), &cs, &f, "a@x.contoso.com")
                .outcome
                .is_ok()
        );
        assert!(
            decide_sender(&fleet(), &cs, &f, "").outcome.is_ok(),
            "bounces pass"
        );
        let star = set(vec![by_ip("mail/any", &["*"], &["203.0.113.0/24"])]);
        assert!(
            decide_sender(&fleet(), &star, &f, "a@fabrikam.com")
                .outcome
                .is_ok()
        );
        let c = cert(&["mail.contoso.com"], &[None]);
        let cs = set(vec![by_cert(
            "mail/c",
            &["contoso.com"],
            "mail.contoso.com",
            None,
        )]);
        let f = facts("192.0.2.1", TLS13, Some(&c));
        let d = decide_sender(&fleet(), &cs, &f, "a@fabrikam.com");
        assert_eq!(code(&d), Some((550, "5.7.1".into(), Rule::SenderDomain)));
    }

    #[test]
    fn row2_require_tls() {
        let mut c = inbound("mail/contoso", &["contoso.com"]);
        c.require_tls = true;
        let cs = set(vec![c]);
        let d = decide_sender(
            &fleet(),
            &cs,
            &facts("192.0.2.1", None, None),
            "a@contoso.com",
        );
        assert_eq!(code(&d), Some((530, "5.7.0".into(), Rule::RequireTls)));
        let text = d.outcome.unwrap_err().reply.text;
        assert_eq!(text, "Must issue a STARTTLS command first");
        let d = decide_sender(
            &fleet(),
            &cs,
            &facts("192.0.2.1", TLS12, None),
            "a@contoso.com",
        );
        assert!(d.outcome.is_ok());
    }

    #[test]
    fn row3_min_tls_version() {
        let mut c = inbound("mail/contoso", &["contoso.com"]);
        c.require_tls = true;
        c.min_tls_version = MinTlsVersion::Tls13;
        let cs = set(vec![c]);
        let d = decide_sender(
            &fleet(),
            &cs,
            &facts("192.0.2.1", TLS12, None),
            "a@contoso.com",
        );
        assert_eq!(code(&d), Some((550, "5.7.1".into(), Rule::MinTlsVersion)));
        let d = decide_sender(
            &fleet(),
            &cs,
            &facts("192.0.2.1", TLS13, None),
            "a@contoso.com",
        );
        assert!(d.outcome.is_ok());
        // Rule order: plaintext fails requireTls first.
        let d = decide_sender(
            &fleet(),
            &cs,
            &facts("192.0.2.1", None, None),
            "a@contoso.com",
        );
        assert_eq!(code(&d).map(|c| c.2), Some(Rule::RequireTls));
    }

    #[test]
    fn row4_restrict_to_ip_ranges_v4_and_v6() {
        let mut c = inbound("mail/contoso", &["contoso.com"]);
        c.restrict_to_ip_ranges = true;
        c.sender_ip_ranges = vec![
            "203.0.113.0/24".parse().unwrap(),
            "2001:db8:1::/48".parse().unwrap(),
        ];
        let cs = set(vec![c]);
        for (ip, ok) in [
            ("203.0.113.7", true),
            ("198.51.100.7", false),
            ("2001:db8:1:ffff::1", true),
            ("2001:db8:2::1", false),
            ("::ffff:198.51.100.7", false),
        ] {
            let d = decide_sender(&fleet(), &cs, &facts(ip, TLS13, None), "a@contoso.com");
            if ok {
                assert!(d.outcome.is_ok(), "{ip}");
            } else {
                assert_eq!(
                    code(&d),
                    Some((550, "5.7.1".into(), Rule::RestrictToIpRanges)),
                    "{ip}"
                );
            }
        }
    }

    #[test]
    fn row5_restrict_to_certificate() {
        let mut c = inbound("mail/contoso", &["contoso.com"]);
        c.restrict_to_certificate = true;
        c.certificate = Some(CertificateRule {
            subject_name: "*.contoso.com".into(),
            trust_bundle_file: Some("ca.pem".into()),
        });
        let cs = set(vec![c]);
        let ok = cert(&["mx1.contoso.com"], &[Some("ca.pem")]);
        let untrusted = cert(&["mx1.contoso.com"], &[None]);
        let wrong_name = cert(&["mx1.fabrikam.com"], &[Some("ca.pem")]);
        let run = |c: Option<&dyn CertFacts>| {
            decide_sender(
                &fleet(),
                &cs,
                &facts("192.0.2.1", TLS13, c),
                "a@contoso.com",
            )
        };
        let d = run(Some(&ok));
        assert!(d.outcome.is_ok());
        assert_eq!(d.verified_name.as_deref(), Some("mx1.contoso.com"));
        for (c, why) in [
            (None, "no client certificate"),
            (Some(&untrusted as &dyn CertFacts), "not trusted"),
            (Some(&wrong_name as &dyn CertFacts), "does not match"),
        ] {
            let d = run(c);
            let r = d.outcome.unwrap_err();
            assert_eq!((r.reply.code, r.rule), (550, Rule::RestrictToCertificate));
            assert!(r.reply.text.contains(why), "{}", r.reply.text);
        }
    }

    #[test]
    fn row6_default_inbound_reject() {
        let mut f = fleet();
        f.default_inbound = DefaultInbound::Reject;
        let cs = set(vec![inbound("mail/contoso", &["contoso.com"])]);
        let d = decide_sender(&f, &cs, &facts("192.0.2.1", TLS13, None), "a@fabrikam.com");
        assert_eq!(code(&d), Some((550, "5.7.1".into(), Rule::DefaultInbound)));
        assert_eq!(d.connector, None);
        // Accept (the default) lets it through; internal senders are never "unrecognised".
        assert!(
            decide_sender(
                &fleet(),
                &cs,
                &facts("192.0.2.1", None, None),
                "a@fabrikam.com"
            )
            .outcome
            .is_ok()
        );
        let d = decide_sender(&f, &cs, &facts("10.1.2.3", None, None), "a@example.org");
        assert!(d.outcome.is_ok() && d.internal);
    }

    #[test]
    fn rule_order_first_failure_wins() {
        let mut c = by_ip("mail/contoso", &["contoso.com"], &["203.0.113.0/24"]);
        c.require_tls = true;
        c.restrict_to_certificate = true;
        c.certificate = Some(CertificateRule {
            subject_name: "mail.contoso.com".into(),
            trust_bundle_file: None,
        });
        let cs = set(vec![c]);
        let f = facts("203.0.113.1", None, None);
        let d = decide_sender(&fleet(), &cs, &f, "a@fabrikam.com");
        assert_eq!(code(&d).map(|c| c.2), Some(Rule::SenderDomain));
        let d = decide_sender(&fleet(), &cs, &f, "a@contoso.com");
        assert_eq!(code(&d).map(|c| c.2), Some(Rule::RequireTls));
        let f = facts("203.0.113.1", TLS13, None);
        let d = decide_sender(&fleet(), &cs, &f, "a@contoso.com");
        assert_eq!(code(&d).map(|c| c.2), Some(Rule::RestrictToCertificate));
    }

    #[test]
    fn row7_relaying_denied_and_routes() {
        let f = fleet();
        let mut cs = file(vec![]);
        cs.outbound.push(OutboundConnector {
            name: "mail/fabrikam".into(),
            generation: 1,
            domains: vec!["fabrikam.com".into()],
            smart_hosts: vec!["smtp.fabrikam.com:25".into()],
            use_mx: false,
            tls: crate::config::TlsLevel::DomainValidation,
            tls_domain: None,
            trust_bundle_file: None,
            client_certificate: None,
            dane: Default::default(),
            mta_sts: Default::default(),
        });
        cs.outbound.push(OutboundConnector {
            name: "mail/any".into(),
            domains: vec!["*".into()],
            ..cs.outbound[0].clone()
        });
        let r = |internal: bool, rcpt: &str| decide_recipient(&f, &cs, internal, rcpt, None, 0);
        assert_eq!(r(false, "u@example.org"), Ok(Route::Upstream));
        assert_eq!(r(false, "u@Sub.Example.org"), Ok(Route::Upstream));
        let denied = r(false, "u@fabrikam.com").unwrap_err();
        assert_eq!(
            (denied.reply.code, denied.reply.esc_string(), denied.rule),
            (550, "5.7.1".into(), Rule::RelayingDenied)
        );
        assert_eq!(r(true, "u@fabrikam.com"), Ok(Route::Outbound(0)));
        assert_eq!(r(true, "u@elsewhere.net"), Ok(Route::Outbound(1)));
        assert_eq!(r(true, "u@example.org"), Ok(Route::Upstream));
        assert!(r(false, "postmaster").is_err());
        // Internal without any outbound connector for the domain: denied.
        let empty = set(vec![]);
        assert!(decide_recipient(&f, &empty, true, "u@elsewhere.net", None, 0).is_err());
        // Internal by verified certificate name.
        let c = cert(&["relay.example.org"], &[None]);
        assert!(is_internal(
            &f.internal_senders,
            &facts("192.0.2.1", TLS13, Some(&c))
        ));
        let c = cert(&["relay.example.org"], &[Some("x")]);
        assert!(!is_internal(
            &f.internal_senders,
            &facts("192.0.2.1", TLS13, Some(&c))
        ));
    }

    #[test]
    fn route_split_and_recipient_limit() {
        let mut f = fleet();
        f.limits.max_recipients = 2;
        let mut cs = file(vec![]);
        cs.outbound.push(OutboundConnector {
            name: "mail/fabrikam".into(),
            generation: 1,
            domains: vec!["fabrikam.com".into()],
            smart_hosts: vec!["smtp.fabrikam.com".into()],
            use_mx: false,
            tls: crate::config::TlsLevel::Opportunistic,
            tls_domain: None,
            trust_bundle_file: None,
            client_certificate: None,
            dane: Default::default(),
            mta_sts: Default::default(),
        });
        let split = decide_recipient(&f, &cs, true, "u@fabrikam.com", Some(&Route::Upstream), 1)
            .unwrap_err();
        assert_eq!(
            (split.reply.code, split.reply.esc_string(), split.rule),
            (452, "4.5.3".into(), Rule::RouteSplit)
        );
        let limit = decide_recipient(&f, &cs, true, "u@example.org", Some(&Route::Upstream), 2)
            .unwrap_err();
        assert_eq!(
            (limit.reply.code, limit.rule),
            (452, Rule::TooManyRecipients)
        );
        assert!(
            decide_recipient(&f, &cs, true, "u@example.org", Some(&Route::Upstream), 1).is_ok()
        );
    }

    #[test]
    fn domain_matching() {
        assert_eq!(domain_match("contoso.com", "contoso.com"), Some((2, 11)));
        assert_eq!(
            domain_match("*.contoso.com", "a.b.contoso.com"),
            Some((1, 11))
        );
        assert_eq!(domain_match("*.contoso.com", "contoso.com"), None);
        assert_eq!(domain_match("*.contoso.com", "xcontoso.com"), None);
        assert_eq!(domain_match("*", "anything"), Some((0, 0)));
        assert_eq!(
            domain_match("*.Contoso.COM", "mail.contoso.com"),
            Some((1, 11))
        );
        assert_eq!(domain_match("Contoso.COM", "contoso.com"), Some((2, 11)));
        assert_eq!(domain_match("*.contoso.com", ".contoso.com"), None);
        assert_eq!(
            domain_match("*.contoso.com", "bücher.contoso.com"),
            Some((1, 11))
        );
        assert_eq!(domain_match("contoso.com", "contosö.com"), None);
        assert_eq!(
            address_domain("User@Contoso.COM"),
            Ok(Some("contoso.com".into()))
        );
        assert_eq!(address_domain(""), Ok(None));
    }

    /// Section 3: "Domains (sender and recipient) are compared after UTS-46 normalisation to
    /// A-labels".
    #[test]
    fn uts46_normalisation_of_envelope_domains() {
        for (address, want) in [
            ("ceo@bücher.test", "xn--bcher-kva.test"),
            ("ceo@BÜCHER.test", "xn--bcher-kva.test"),
            ("ceo@xn--bcher-kva.test", "xn--bcher-kva.test"),
            ("ceo@ｃｏｎｔｏｓｏ.test", "contoso.test"),
            ("ceo@contoso。test", "contoso.test"),
            ("ceo@contoso．test", "contoso.test"),
            ("ceo@contoso｡test", "contoso.test"),
            ("ceo@Contoso.Test.", "contoso.test"),
            ("ceo@contoso.test。", "contoso.test"),
            ("x@ｅｘａｍｐｌｅ.org", "example.org"),
            ("x@exаmple.org", "xn--exmple-4nf.org"), // Cyrillic а: another domain
            ("x@ab--cd.test", "ab--cd.test"),
            ("x@under_score.test", "under_score.test"),
            ("x@[192.0.2.1]", "[192.0.2.1]"),
            // A sharp s stays (nontransitional), so it is not "ss".
            ("x@straße.test", "xn--strae-oqa.test"),
        ] {
            assert_eq!(
                address_domain(address),
                Ok(Some(want.to_string())),
                "{address}"
            );
        }
        for bad in [
            "x@",
            "x@.",
            "x@a..b",
            "x@xn--a.test",     // not valid Punycode
            "x@xn--ls8h-.test", // hyphen after a Punycode label's end
            "x@exa mple.org",
            "x@exa%mple.org",
            "x@exa\u{0}mple.org",
            "x@a\u{200d}b.test", // ZWJ outside a joining context
            "x@\u{0660}.\u{06f0}.test",
            &format!("x@{}.test", "a".repeat(64)),
        ] {
            assert_eq!(address_domain(bad), Err(InvalidDomain), "{bad:?}");
        }
        assert_eq!(address_domain("postmaster"), Ok(None));
    }

    /// Section 3, UTS-46 clause: Unicode spellings claim the same connector as the ASCII form,
    /// so its rules apply (here requireTls on a plaintext session).
    #[test]
    fn unicode_forms_of_a_partner_domain_claim_its_connector() {
        let mut bucher = inbound("mail/bucher", &["xn--bcher-kva.test"]);
        bucher.require_tls = true;
        let mut contoso = inbound("mail/contoso", &["contoso.test"]);
        contoso.require_tls = true;
        let cs = set(vec![bucher, contoso]);
        let plain = facts("192.0.2.1", None, None);
        for (sender, connector) in [
            ("ceo@bücher.test", "mail/bucher"),
            ("ceo@BÜCHER.TEST", "mail/bucher"),
            ("ceo@ｃｏｎｔｏｓｏ.test", "mail/contoso"),
            ("ceo@contoso。test", "mail/contoso"),
            ("ceo@contoso.test", "mail/contoso"),
        ] {
            let d = decide_sender(&fleet(), &cs, &plain, sender);
            assert_eq!(d.connector.as_deref(), Some(connector), "{sender}");
            assert_eq!(
                code(&d),
                Some((530, "5.7.0".into(), Rule::RequireTls)),
                "{sender}"
            );
        }
        let d = decide_sender(&fleet(), &cs, &plain, "ceo@bucher.test");
        assert_eq!((d.connector, d.outcome), (None, Ok(())), "another domain");
    }

    /// Section 3: "an address whose domain is not valid IDNA is refused (553 5.1.7)"; the
    /// recipient counterpart is 553 5.1.3.
    #[test]
    fn invalid_idna_is_refused_553() {
        let cs = set(vec![inbound("mail/any", &["*"])]);
        let f = facts("10.1.2.3", TLS13, None); // internal: nothing else would refuse
        let d = decide_sender(&fleet(), &cs, &f, "ceo@xn--a.test");
        assert_eq!(code(&d), Some((553, "5.1.7".into(), Rule::InvalidDomain)));
        assert_eq!(
            d.connector, None,
            "nothing claims a domain without a canonical form"
        );
        assert!(decide_sender(&fleet(), &cs, &f, "").outcome.is_ok());
        let r =
            decide_recipient(&fleet(), &cs, true, "bob@xn--a.example.org", None, 0).unwrap_err();
        assert_eq!(
            (r.reply.code, r.reply.esc_string(), r.rule),
            (553, "5.1.3".into(), Rule::InvalidDomain)
        );
    }

    /// Row 7 with UTS-46: recipient domains are normalised before the accepted-domains check
    /// and the Outbound match; an MX route carries the A-label domain (what DNS is asked).
    #[test]
    fn recipient_domains_are_normalised_before_the_relay_check() {
        let f = fleet();
        let mut cs = file(vec![]);
        cs.outbound.push(OutboundConnector {
            name: "mail/bucher".into(),
            generation: 1,
            domains: vec!["xn--bcher-kva.test".into()],
            smart_hosts: vec![],
            use_mx: true,
            tls: crate::config::TlsLevel::Opportunistic,
            tls_domain: None,
            trust_bundle_file: None,
            client_certificate: None,
            dane: Default::default(),
            mta_sts: Default::default(),
        });
        let r = |internal: bool, rcpt: &str| decide_recipient(&f, &cs, internal, rcpt, None, 0);
        for ours in [
            "x@ｅｘａｍｐｌｅ.org",
            "x@example。org",
            "x@ＥＵ.example.org",
        ] {
            assert_eq!(r(false, ours), Ok(Route::Upstream), "{ours}");
        }
        for theirs in ["x@exаmple.org", "x@example.org.evil.test"] {
            assert_eq!(
                r(false, theirs).map_err(|e| e.rule),
                Err(Rule::RelayingDenied)
            );
        }
        assert_eq!(
            r(true, "x@BÜCHER.test"),
            Ok(Route::OutboundMx(0, "xn--bcher-kva.test".into()))
        );
        assert_eq!(
            r(false, "x@bücher.test").map_err(|e| e.rule),
            Err(Rule::RelayingDenied)
        );
    }

    /// Section 3 rule 4: a connector with restrictToIPRanges / restrictToCertificate claims
    /// mail from its `domains` that rules 1-3 leave unclaimed, whatever its identifyBy.
    #[test]
    fn rule4_restrictions_guard_the_domains_whatever_identifies() {
        let mut ip_restricted = by_ip("mail/tailspin", &["tailspin.test"], &["127.0.77.0/24"]);
        ip_restricted.restrict_to_ip_ranges = true;
        let mut cert_restricted = by_ip("mail/contoso", &["*.contoso.test"], &["203.0.113.0/24"]);
        cert_restricted.restrict_to_certificate = true;
        cert_restricted.certificate = Some(CertificateRule {
            subject_name: "mail.contoso.test".into(),
            trust_bundle_file: Some("ca.pem".into()),
        });
        let mut cert_id = by_cert(
            "mail/fabrikam",
            &["fabrikam.test"],
            "mx.fabrikam.test",
            Some("ca.pem"),
        );
        cert_id.restrict_to_certificate = true;
        let mut unrestricted = by_ip("mail/northwind", &["northwind.test"], &["198.51.100.0/24"]);
        unrestricted.require_tls = false;
        let mut star = by_ip("mail/any", &["*"], &["192.0.2.0/28"]);
        star.restrict_to_ip_ranges = true;
        let cs = set(vec![
            ip_restricted,
            cert_restricted,
            cert_id,
            unrestricted,
            star,
        ]);
        let good_contoso = cert(&["mail.contoso.test"], &[Some("ca.pem")]);
        let good_fabrikam = cert(&["mx.fabrikam.test"], &[Some("ca.pem")]);
        let untrusted = cert(&["mx.fabrikam.test"], &[None]);
        type Row<'a> = (
            &'a str,
            Option<&'a dyn CertFacts>,
            &'a str,
            Option<&'a str>,
            Option<Rule>,
        );
        let rows: [Row; 12] = [
            // The issue's case: from outside the ranges, claimed at rule 4 and refused.
            (
                "127.0.0.5",
                None,
                "x@tailspin.test",
                Some("mail/tailspin"),
                Some(Rule::RestrictToIpRanges),
            ),
            (
                "127.0.0.5",
                None,
                "x@TAILSPIN.test",
                Some("mail/tailspin"),
                Some(Rule::RestrictToIpRanges),
            ),
            // From inside: rule 2 claims and the restriction passes.
            (
                "127.0.77.9",
                None,
                "x@tailspin.test",
                Some("mail/tailspin"),
                None,
            ),
            // restrictToCertificate guards *.contoso.test for a SenderIP connector.
            (
                "127.0.0.5",
                None,
                "x@eu.contoso.test",
                Some("mail/contoso"),
                Some(Rule::RestrictToCertificate),
            ),
            (
                "127.0.0.5",
                Some(&good_contoso),
                "x@eu.contoso.test",
                Some("mail/contoso"),
                None,
            ),
            ("127.0.0.5", None, "x@contoso.test", None, None), // *.x does not cover x
            // ... and fabrikam.test for a Certificate connector.
            (
                "127.0.0.5",
                None,
                "x@fabrikam.test",
                Some("mail/fabrikam"),
                Some(Rule::RestrictToCertificate),
            ),
            (
                "127.0.0.5",
                Some(&untrusted),
                "x@fabrikam.test",
                Some("mail/fabrikam"),
                Some(Rule::RestrictToCertificate),
            ),
            (
                "127.0.0.5",
                Some(&good_fabrikam),
                "x@fabrikam.test",
                Some("mail/fabrikam"),
                None,
            ),
            // No restriction: nothing to guard, the domain stays unclaimed elsewhere.
            ("127.0.0.5", None, "x@northwind.test", None, None),
            // `*` guards nothing, and bounces have no domain to guard.
            ("127.0.0.5", None, "x@elsewhere.test", None, None),
            ("127.0.0.5", None, "", None, None),
        ];
        for (i, (ip, c, sender, connector, rule)) in rows.into_iter().enumerate() {
            let d = decide_sender(&fleet(), &cs, &facts(ip, TLS13, c), sender);
            assert_eq!(
                d.connector.as_deref(),
                connector,
                "row {i}: {sender} from {ip}"
            );
            assert_eq!(code(&d).map(|c| c.2), rule, "row {i}: {sender} from {ip}");
            if rule.is_some() {
                assert_eq!(
                    code(&d).map(|c| (c.0, c.1)),
                    Some((550, "5.7.1".into())),
                    "row {i}"
                );
            }
        }
    }

    /// Rule 4 sits below rules 1-3, picks the most specific pattern, and breaks ties by file
    /// order (the operator never renders a tie: it keeps the oldest connector).
    #[test]
    fn rule4_has_lowest_precedence_and_is_deterministic() {
        let mut guard = by_ip("mail/guard", &["contoso.test"], &["203.0.113.0/24"]);
        guard.restrict_to_ip_ranges = true;
        let domain_claim = inbound("mail/contoso", &["contoso.test"]);
        let cs = vec![guard.clone(), domain_claim];
        let f = facts("198.51.100.1", TLS13, None);
        let name =
            |cs: &[InboundConnector], d: &str| claim(cs, &f, Some(d)).map(|c| c.name.clone());
        assert_eq!(
            name(&cs, "contoso.test").as_deref(),
            Some("mail/contoso"),
            "rule 3 first"
        );
        let mut wide = by_ip("mail/wide", &["*.test"], &["192.0.2.0/24"]);
        wide.restrict_to_ip_ranges = true;
        let mut twin = guard.clone();
        twin.name = "mail/twin".into();
        let cs = vec![wide.clone(), guard.clone(), twin.clone()];
        assert_eq!(
            name(&cs, "contoso.test").as_deref(),
            Some("mail/guard"),
            "exact beats *.test"
        );
        assert_eq!(name(&cs, "other.test").as_deref(), Some("mail/wide"));
        let cs = vec![twin, guard, wide];
        assert_eq!(
            name(&cs, "contoso.test").as_deref(),
            Some("mail/twin"),
            "tie: first in file"
        );
    }

    /// splitmix64: seedable, enough to draw connector sets and messages.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn chance(&mut self, percent: u64) -> bool {
            self.next() % 100 < percent
        }
        fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
            &items[self.below(items.len())]
        }
    }

    /// Labels as connectors write them (A-labels) with the Unicode spellings a client may send.
    const LABELS: [(&str, &[&str]); 8] = [
        ("contoso", &["contoso", "CONTOSO", "ｃｏｎｔｏｓｏ"]),
        ("fabrikam", &["fabrikam", "Fabrikam"]),
        ("eu", &["eu", "EU"]),
        ("mail", &["mail"]),
        ("a", &["a", "A"]),
        ("xn--bcher-kva", &["bücher", "BÜCHER", "xn--bcher-kva"]),
        ("xn--strae-oqa", &["straße", "xn--strae-oqa"]),
        ("test", &["test", "TEST"]),
    ];

    /// A domain of 1-4 labels as label indexes; few labels, so patterns and senders collide.
    fn gen_domain(r: &mut Rng) -> Vec<usize> {
        (0..1 + r.below(4)).map(|_| r.below(LABELS.len())).collect()
    }

    fn a_label(d: &[usize]) -> String {
        d.iter().map(|&l| LABELS[l].0).collect::<Vec<_>>().join(".")
    }

    /// The same domain as a client may spell it: Unicode labels, other case, other full stops.
    fn spelled(r: &mut Rng, d: &[usize]) -> String {
        let mut out = String::new();
        for (i, &l) in d.iter().enumerate() {
            if i > 0 {
                out.push_str(r.pick::<&str>(&[".", ".", ".", "。", "．"]));
            }
            out.push_str(r.pick::<&str>(LABELS[l].1));
        }
        out
    }

    /// A pattern as the config may hold it; mostly valid, sometimes in upper case or with a
    /// root dot (domain_match trims it), which the index must treat the same way.
    fn gen_pattern(r: &mut Rng) -> String {
        let mut p = match r.below(10) {
            0 => "*".to_string(),
            1..=4 => format!("*.{}", a_label(&gen_domain(r))),
            _ => a_label(&gen_domain(r)),
        };
        if r.chance(10) {
            p = p.to_ascii_uppercase();
        }
        if r.chance(5) {
            p.push('.');
        }
        p
    }

    fn gen_cert_name(r: &mut Rng) -> String {
        let mut n = match r.below(6) {
            0 => format!("*.{}", a_label(&gen_domain(r))),
            1 => "192.0.2.7".to_string(),
            _ => a_label(&gen_domain(r)),
        };
        if r.chance(10) {
            n = n.to_ascii_uppercase();
        }
        if r.chance(5) {
            n.push('.');
        }
        n
    }

    const BUNDLES: [Option<&str>; 3] = [None, Some("a.pem"), Some("b.pem")];

    /// Addresses from small pools so ranges overlap and hold the clients: IPv4, IPv6 and an
    /// IPv4-mapped IPv6 address (which no IPv4 range holds).
    fn gen_ip(r: &mut Rng) -> IpAddr {
        match r.below(5) {
            0 | 1 => IpAddr::from([192, 0, 2, r.below(16) as u8]),
            2 => IpAddr::from([198, 51, r.below(2) as u8, r.below(16) as u8]),
            3 => {
                let low = r.below(8) as u16;
                IpAddr::from([0x2001, 0xdb8, 0, r.below(2) as u16, 0, 0, 0, low * 4])
            }
            _ => IpAddr::from([0, 0, 0, 0, 0, 0xffff, 0xc000, 0x0200 + r.below(16) as u16]),
        }
    }

    fn gen_net(r: &mut Rng) -> ipnet::IpNet {
        let ip = gen_ip(r);
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len = match r.below(8) {
            0..=3 => max,
            4 | 5 => max - r.below(4) as u8,
            6 => max - r.below(24) as u8,
            _ => r.below(max as usize + 1) as u8,
        };
        // Host bits are left set on purpose: a range written as 192.0.2.5/24 holds 192.0.2.0/24.
        ipnet::IpNet::new(ip, len).unwrap()
    }

    fn gen_connector(r: &mut Rng, i: usize) -> InboundConnector {
        let domains = (0..r.below(4)).map(|_| gen_pattern(r)).collect();
        let mut c = inbound(&format!("c{i}"), &[]);
        c.domains = domains;
        c.identify_by = *r.pick(&[
            IdentifyBy::SenderDomain,
            IdentifyBy::SenderIp,
            IdentifyBy::Certificate,
        ]);
        c.sender_ip_ranges = (0..r.below(3)).map(|_| gen_net(r)).collect();
        c.certificate =
            (c.identify_by == IdentifyBy::Certificate || r.chance(30)).then(|| CertificateRule {
                subject_name: gen_cert_name(r),
                trust_bundle_file: r.pick(&BUNDLES).map(PathBuf::from),
            });
        c.restrict_to_ip_ranges = r.chance(30);
        c.restrict_to_certificate = r.chance(20);
        c
    }

    /// Section 3 claiming rules 1-4: the index gives the same connector as the scan, on
    /// generated connector sets (every identifyBy, exact/`*.`/`*` patterns in any case, root
    /// dots, IPv4/IPv6 ranges of every length with host bits set, exact/wildcard/IP subject
    /// names with several bundles, both restrictions) and messages (Unicode and IDN spellings
    /// of the domains through `address_domain`, the null sender, client certificates with
    /// several names and partial trust). POLICY_INDEX_SEED picks another seed.
    #[test]
    fn index_claims_like_the_scan() {
        let seed = std::env::var("POLICY_INDEX_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(17u64);
        let mut by_rule = [0usize; 5];
        for set_no in 0..400u64 {
            let mut r = Rng(seed ^ set_no.wrapping_mul(0xA24B_AED4_963E_E407));
            let n = r.below(60);
            let cs: Vec<InboundConnector> = (0..n).map(|i| gen_connector(&mut r, i)).collect();
            let indexed = set(cs.clone());
            for msg in 0..50 {
                let names: Vec<String> =
                    (0..1 + r.below(2)).map(|_| gen_cert_name(&mut r)).collect();
                let trusted: Vec<Option<PathBuf>> = BUNDLES
                    .iter()
                    .filter(|_| r.chance(60))
                    .map(|b| b.map(PathBuf::from))
                    .collect();
                let client_cert = TestCert { names, trusted };
                let cert: Option<&dyn CertFacts> = r.chance(40).then_some(&client_cert as _);
                let f = Facts {
                    client_ip: gen_ip(&mut r),
                    tls: TLS13,
                    cert,
                };
                let sender = match r.below(10) {
                    0 => String::new(),
                    _ => {
                        let d = gen_domain(&mut r);
                        format!("u@{}", spelled(&mut r, &d))
                    }
                };
                let Ok(domain) = address_domain(&sender) else {
                    continue;
                };
                // Sessions pass the A-label form; other callers may not: upper case too.
                let domain = match domain {
                    Some(d) if r.chance(10) => Some(d.to_ascii_uppercase()),
                    d => d,
                };
                let domain = domain.as_deref();
                let scanned = super::claim(&cs, &f, domain);
                assert_eq!(
                    indexed.claim(&f, domain).map(|c| &c.name),
                    scanned.map(|c| &c.name),
                    "seed {seed}, set {set_no}, message {msg}: {sender:?} from {} with {:?}\n{cs:#?}",
                    f.client_ip,
                    cert.map(|c| c.names()),
                );
                let rule = if claim_by_certificate(cs.iter(), &f).is_some() {
                    0
                } else if claim_by_ip(cs.iter(), &f).is_some() {
                    1
                } else if claim_by_domain(cs.iter(), domain).is_some() {
                    2
                } else if scanned.is_some() {
                    3
                } else {
                    4
                };
                by_rule[rule] += 1;
            }
        }
        // The generator must reach every rule (and leave some mail unclaimed), or the
        // comparison above proves little.
        assert!(
            by_rule.iter().all(|&n| n > 100),
            "claims by rule 1, 2, 3, 4, none: {by_rule:?}"
        );
    }
}
