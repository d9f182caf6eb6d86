//! The two files the gateway reads, as Rust types: fleet settings (rendered by Helm from the
//! chart's values) and connectors (rendered by the operator from PartnerConnector resources).
//!
//! These types are the single definition shared with the operator, which serialises
//! [`ConnectorsFile`] and relies on [`ConnectorsFile::validate`] to refuse anything the gateway
//! would refuse. JSON Schemas are generated from them (`partnergate-gateway schema`).
//!
//! Both files are JSON. Paths inside the connectors file (trust bundles, client certificates)
//! are relative to the fleet's `materialDir` (default: the connectors file's directory); the
//! operator names them by content hash so a new connectors file never points at an old file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Fleet-wide settings, the same for every gateway pod.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FleetSettings {
    /// SMTP listener address.
    #[serde(default = "defaults::listen")]
    pub listen: SocketAddr,
    /// Admin HTTP listener (/healthz, /readyz, /metrics, /status).
    #[serde(default = "defaults::admin_listen")]
    pub admin_listen: SocketAddr,
    /// Name announced in the greeting, EHLO reply and Received: header.
    pub hostname: String,
    /// The gateway's own server certificate for STARTTLS (PEM files).
    pub server_certificate: CertificateFiles,
    /// Domains the organisation receives mail for. Inbound recipients outside these are
    /// refused unless the sender is an internal sender relaying outbound.
    #[serde(default)]
    pub accepted_domains: Vec<String>,
    /// Senders allowed to relay to partner (Outbound connector) domains.
    #[serde(default)]
    pub internal_senders: InternalSenders,
    /// The organisation's mail server: next hop for accepted inbound mail.
    pub upstream: UpstreamSettings,
    /// What happens to mail no Inbound connector claims.
    #[serde(default)]
    pub default_inbound: DefaultInbound,
    /// Where PEM files named in the connectors file live; default: the connectors file's
    /// directory.
    #[serde(default)]
    pub material_dir: Option<PathBuf>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Peers allowed to send a PROXY protocol v2 header; empty = PROXY protocol off.
    #[serde(default)]
    pub trusted_proxies: Vec<IpNet>,
    /// How often Outbound connectors' next hops are probed (seconds, jittered ±10 %); 0 = off.
    #[serde(default = "defaults::validation_interval_secs")]
    pub validation_interval_secs: u64,
    /// DNS server for the MX lookups of `useMX` connectors: `ip` or `ip:port` (IPv6 as
    /// `[ip]:port`), queried over UDP and TCP. Default: the system resolver (/etc/resolv.conf).
    #[serde(default)]
    pub dns_resolver: Option<String>,
    /// Non-public address ranges (loopback, RFC 1918, ULA, link-local, CGNAT, documentation,
    /// …) that the MX answers of `useMX` connectors may point at and be connected to. Default:
    /// none, so a partner's DNS cannot aim the gateway at internal services.
    #[serde(default)]
    pub allow_private_mx_addresses: Vec<IpNet>,
    /// DANE and MTA-STS for Outbound connectors that enable them (docs/gateway.md, "Outbound
    /// TLS policies").
    #[serde(default)]
    pub tls_policy: TlsPolicySettings,
    /// What is checked for mail no Inbound connector claims (internal senders are never
    /// checked): nothing, SPF/DKIM/DMARC evaluated and stamped, or that plus refusing mail
    /// whose sender domain publishes DMARC `p=reject` and fails it. Uses `dnsResolver`.
    #[serde(default)]
    pub unclaimed_sender_authentication: UnclaimedSenderAuthentication,
}

/// How the sender of mail a connector claims must be authenticated beyond the connector's own
/// rules (docs/partnerconnector.md, "Sender authentication").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum SenderAuthentication {
    /// Nothing is evaluated (the connector's rules alone decide).
    #[default]
    None,
    /// SPF must pass for the envelope sender (decided at MAIL FROM).
    #[serde(rename = "SPF")]
    Spf,
    /// A DKIM signature of the sender's domain must verify (decided while DATA streams).
    #[serde(rename = "DKIM")]
    Dkim,
    /// DMARC (RFC 7489) must pass: an SPF or DKIM pass aligned with the From: domain.
    #[serde(rename = "DMARC")]
    Dmarc,
}

impl SenderAuthentication {
    pub fn is_none(&self) -> bool {
        *self == SenderAuthentication::None
    }
}

/// The fleet-level default for unclaimed mail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum UnclaimedSenderAuthentication {
    /// Nothing is evaluated.
    #[default]
    None,
    /// SPF, DKIM and DMARC are evaluated and stamped (Authentication-Results); nothing is
    /// refused for their results.
    Stamp,
    /// As `Stamp`, and mail failing DMARC whose domain publishes `p=reject` is refused
    /// (`550 5.7.26`); a DNS error deciding it gives `451`.
    EnforceDmarcReject,
}

/// Fleet settings of the outbound TLS policies (DANE, MTA-STS). Defaults suit the public
/// internet; tests point them at a private DNSSEC zone and a private CA.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TlsPolicySettings {
    /// DNSSEC trust anchors for DANE: a file of DNSKEY records in zone-file syntax (relative to
    /// the fleet file). Default: the root zone's KSKs built into the resolver.
    pub dnssec_trust_anchor_file: Option<PathBuf>,
    /// CA bundle (PEM) that MTA-STS policy servers' HTTPS certificates must chain to, and that
    /// an MX host under an MTA-STS policy must chain to. Default: public web PKI roots.
    pub mta_sts_roots_file: Option<PathBuf>,
    /// TCP port of the MTA-STS policy host (RFC 8461 says 443; other values are for tests).
    pub mta_sts_port: u16,
    /// Longest MTA-STS policy body accepted, in octets (RFC 8461 suggests 64 KiB).
    pub mta_sts_max_policy_bytes: usize,
    /// Time allowed for one policy fetch (connect, TLS, request, body), in seconds.
    pub mta_sts_fetch_timeout_secs: u64,
}

impl Default for TlsPolicySettings {
    fn default() -> Self {
        TlsPolicySettings {
            dnssec_trust_anchor_file: None,
            mta_sts_roots_file: None,
            mta_sts_port: 443,
            mta_sts_max_policy_bytes: 64 * 1024,
            mta_sts_fetch_timeout_secs: 60,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CertificateFiles {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InternalSenders {
    /// Client IP ranges of the organisation's own mail servers.
    #[serde(default)]
    pub ip_ranges: Vec<IpNet>,
    /// Verified client-certificate names (RFC 6125 patterns) of internal senders.
    #[serde(default)]
    pub certificate_names: Vec<String>,
    /// CA bundle that internal senders' client certificates must chain to; default: public
    /// web PKI roots.
    #[serde(default)]
    pub trust_bundle_file: Option<PathBuf>,
}

/// The fleet's `upstream`: the organisation's mail server and its TLS requirement, as written
/// in the fleet file (the gateway resolves it into a `live_config::NextHop`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpstreamSettings {
    /// Host name or IP address.
    pub host: String,
    #[serde(default = "defaults::smtp_port")]
    pub port: u16,
    #[serde(default)]
    pub tls: TlsLevel,
    /// Name the certificate must match under DomainValidation; default: `host`.
    #[serde(default)]
    pub tls_domain: Option<String>,
    /// CA bundle for CertificateValidation/DomainValidation; default: public web PKI roots.
    #[serde(default)]
    pub trust_bundle_file: Option<PathBuf>,
    /// Client certificate presented to the next hop.
    #[serde(default)]
    pub client_certificate: Option<CertificateFiles>,
}

/// TLS strictness towards a next hop. A required level that is not met is never downgraded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum TlsLevel {
    /// Plaintext only (upstream on a trusted network, tests).
    None,
    /// STARTTLS if offered, no verification.
    Opportunistic,
    /// STARTTLS required, no verification.
    EncryptionOnly,
    /// STARTTLS required, chain verified against the trust bundle or public roots.
    CertificateValidation,
    /// Chain verified and name matches `tlsDomain` (or the host).
    #[default]
    DomainValidation,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum DefaultInbound {
    /// Mail no connector claims is accepted (subject to accepted domains).
    #[default]
    Accept,
    /// Mail no connector claims gets `550 5.7.1`.
    Reject,
}

/// Limits, all in one place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Limits {
    /// Largest message in octets (advertised as SIZE).
    pub max_message_size: u64,
    /// Recipients per transaction.
    pub max_recipients: usize,
    /// Concurrent connections in total.
    pub max_connections: usize,
    /// Concurrent connections from one client IP.
    pub max_connections_per_ip: usize,
    /// Longest command line in octets including CRLF (RFC 5321 says 512).
    pub max_command_line: usize,
    /// Longest DATA text line in octets including CRLF (RFC 5321 says 1000).
    pub max_text_line: usize,
    /// Commands refused in one session before it is closed.
    pub max_errors: usize,
    /// Percent of `maxConnections` only internal senders (`internalSenders.ipRanges`) and
    /// Inbound connectors' `senderIPRanges` may use, so a flood from elsewhere cannot take
    /// every slot.
    pub reserved_connections_percent: usize,
    /// Percent of `maxConnections` in use from which the listener is under stress: sessions
    /// before MAIL FROM get `timeouts.stressCommandSecs`.
    pub stress_percent: usize,
    /// IPv6 clients are counted per prefix of this length by `maxConnectionsPerIp` (one
    /// subscriber usually holds a whole /64).
    pub ipv6_prefix_length: u8,
    /// Largest header section (octets) held back while DKIM/DMARC are evaluated; the rest of
    /// a larger one is streamed and DKIM/DMARC evaluate to `permerror`.
    pub max_header_size: usize,
}

/// Timeouts in seconds, all in one place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Timeouts {
    /// Waiting for the next command.
    pub command_secs: u64,
    /// Waiting for the next chunk of DATA.
    pub data_secs: u64,
    /// TLS handshake after STARTTLS.
    pub tls_handshake_secs: u64,
    /// Connecting to and each reply from the next hop.
    pub next_hop_secs: u64,
    /// The next hop's reply to the final "." of DATA (RFC 5321 suggests 10 minutes).
    pub next_hop_data_end_secs: u64,
    /// After SIGTERM, how long sessions may finish before `421 4.3.2`.
    pub shutdown_grace_secs: u64,
    /// Waiting for a command before MAIL FROM while the listener is under stress
    /// (`limits.stressPercent`); the shorter of this and `commandSecs` applies.
    pub stress_command_secs: u64,
    /// A full listener sheds the oldest session that has not reached MAIL FROM to admit a new
    /// client, once that session is at least this old.
    pub shed_after_secs: u64,
}

mod defaults {
    use std::net::SocketAddr;

    pub fn listen() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], 2525))
    }
    pub fn admin_listen() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], 8080))
    }
    pub fn smtp_port() -> u16 {
        25
    }
    pub fn validation_interval_secs() -> u64 {
        600
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: 25 * 1024 * 1024,
            max_recipients: 100,
            max_connections: 1000,
            max_connections_per_ip: 20,
            max_command_line: 512,
            max_text_line: 1000,
            max_errors: 10,
            reserved_connections_percent: 10,
            stress_percent: 80,
            ipv6_prefix_length: 64,
            // Postfix's header_size_limit: a header section past it is truncated by the
            // organisation's own MTA anyway. Held once per session in DATA, so the worst case
            // is this × maxConnections (100 MiB at the defaults, within the chart's pod limit;
            // 256 KiB before, held twice, could pass it).
            max_header_size: 100 * 1024,
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            command_secs: 300,
            data_secs: 180,
            tls_handshake_secs: 30,
            next_hop_secs: 60,
            next_hop_data_end_secs: 600,
            shutdown_grace_secs: 30,
            stress_command_secs: 10,
            shed_after_secs: 5,
        }
    }
}

/// The resolved connector set, rendered by the operator.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectorsFile {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inbound: Vec<InboundConnector>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbound: Vec<OutboundConnector>,
}

/// Which fact identifies the partner an Inbound connector is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum IdentifyBy {
    #[default]
    SenderDomain,
    #[serde(rename = "SenderIP")]
    SenderIp,
    Certificate,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize, JsonSchema,
)]
pub enum MinTlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InboundConnector {
    /// `namespace/name` of the PartnerConnector.
    pub name: String,
    /// metadata.generation of the PartnerConnector this was rendered from.
    #[serde(default, skip_serializing_if = "is_default")]
    pub generation: i64,
    /// Partner domains (envelope sender); `*.x` wildcards, `*` = any.
    pub domains: Vec<String>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub identify_by: IdentifyBy,
    /// Also accepted as `senderIPRanges`, the CRD's spelling.
    #[serde(
        default,
        alias = "senderIPRanges",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub sender_ip_ranges: Vec<IpNet>,
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub require_tls: bool,
    #[serde(default, skip_serializing_if = "is_default")]
    pub min_tls_version: MinTlsVersion,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateRule>,
    /// Also accepted as `restrictToIPRanges`, the CRD's spelling.
    #[serde(
        default,
        alias = "restrictToIPRanges",
        skip_serializing_if = "is_default"
    )]
    pub restrict_to_ip_ranges: bool,
    #[serde(default, skip_serializing_if = "is_default")]
    pub restrict_to_certificate: bool,
    /// How the partner's identity must be authenticated beyond these rules. Left out of the
    /// file when `None`, so a gateway older than the setting (which refuses unknown fields)
    /// still loads a connectors file that does not use it.
    #[serde(default, skip_serializing_if = "SenderAuthentication::is_none")]
    pub sender_authentication: SenderAuthentication,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CertificateRule {
    /// RFC 6125 name (or `*.` pattern) the client certificate must carry.
    pub subject_name: String,
    /// CA bundle file (relative to materialDir); default: public web PKI roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_bundle_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutboundConnector {
    pub name: String,
    #[serde(default, skip_serializing_if = "is_default")]
    pub generation: i64,
    /// Recipient domains routed through this connector.
    pub domains: Vec<String>,
    /// `host:port` or `[ip]:port`, tried in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub smart_hosts: Vec<String>,
    /// Route by the recipient domain's MX records instead of smart hosts. Also accepted as
    /// `useMX`, the CRD's spelling.
    #[serde(default, alias = "useMX", skip_serializing_if = "is_default")]
    pub use_mx: bool,
    #[serde(default, skip_serializing_if = "is_default")]
    pub tls: TlsLevel,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_domain: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_bundle_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<CertificateFiles>,
    /// DANE (RFC 7672) for this connector's next hops.
    #[serde(default, skip_serializing_if = "is_default")]
    pub dane: PolicyMode,
    /// MTA-STS (RFC 8461) for this connector's recipient domains (`useMX` only).
    #[serde(default, skip_serializing_if = "is_default")]
    pub mta_sts: PolicyMode,
}

/// How a DNS-published TLS policy (DANE, MTA-STS) applies to an Outbound connector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum PolicyMode {
    /// Not looked up; the connector's `tls` level alone applies.
    #[default]
    None,
    /// Enforced when the partner publishes it; otherwise the `tls` level applies.
    Opportunistic,
    /// Required: a next hop without a usable policy is deferred (`451 4.7.5`).
    Mandatory,
}

fn default_true() -> bool {
    true
}

// The connectors file leaves out every field equal to its deserialisation default (the file
// must fit a ConfigMap: about 1 MiB for 10,000 connectors), so each `skip_serializing_if`
// below pairs with the field's `default`.
fn is_true(b: &bool) -> bool {
    *b
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// Replaces an unspecified listen IP (`0.0.0.0`, `::`) with `bind_ip`, keeping the port.
/// Explicit addresses are left alone.
pub fn with_bind_ip(addr: SocketAddr, bind_ip: Option<std::net::IpAddr>) -> SocketAddr {
    match bind_ip {
        Some(ip) if addr.ip().is_unspecified() => SocketAddr::new(ip, addr.port()),
        _ => addr,
    }
}

/// One problem in a config file, with the JSON path of the field it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Checks a domain pattern: `*`, `*.example.com` or `example.com` (LDH labels, no trailing
/// dot). Written by hand because the patterns are ours, not a DNS name type any crate models.
pub fn validate_domain_pattern(pattern: &str) -> Result<(), String> {
    if pattern == "*" {
        return Ok(());
    }
    let name = pattern.strip_prefix("*.").unwrap_or(pattern);
    if name.is_empty() || name.len() > 253 {
        return Err(format!("{pattern:?} is not a domain name"));
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !ok {
            return Err(format!(
                "{pattern:?} is not a domain pattern (expected example.com, *.example.com or *)"
            ));
        }
    }
    Ok(())
}

/// Checks a certificate name (`tlsDomain`, `internalSenders.certificateNames`,
/// `certificate.subjectName`): an IP address, a DNS name, or a `*.` wildcard over at least two
/// labels. `*.com` or `*.test` would accept a certificate for any name under a top-level
/// domain, and a lone `*` any certificate at all. (Wildcards over multi-label public suffixes
/// such as `*.co.uk` are not detected: that needs the public suffix list.)
pub fn validate_certificate_name(name: &str) -> Result<(), String> {
    if name.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    if name == "*" {
        return Err(
            "a lone * would match any certificate; name the host (mail.example.com) \
             or its domain (*.example.com)"
                .into(),
        );
    }
    validate_domain_pattern(name)?;
    if let Some(base) = name.strip_prefix("*.")
        && !base.contains('.')
    {
        return Err(format!(
            "{name:?} is a wildcard over a single label (a whole top-level domain); a \
             certificate name wildcard needs at least two labels after \"*.\" (*.example.com)"
        ));
    }
    Ok(())
}

fn check_certificate_name(errors: &mut Vec<FieldError>, path: String, name: &str) {
    if let Err(message) = validate_certificate_name(name) {
        errors.push(FieldError { path, message });
    }
}

fn check_domains(errors: &mut Vec<FieldError>, path: &str, domains: &[String]) {
    if domains.is_empty() {
        errors.push(FieldError {
            path: path.to_string(),
            message: "must list at least one domain".into(),
        });
    }
    for (i, d) in domains.iter().enumerate() {
        if let Err(message) = validate_domain_pattern(d) {
            errors.push(FieldError {
                path: format!("{path}[{i}]"),
                message,
            });
        }
    }
}

/// Parses a `dnsResolver` value: `ip`, `ip:port` or `[ipv6]:port` (port default 53).
pub fn parse_dns_resolver(s: &str) -> Result<SocketAddr, String> {
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    s.parse::<SocketAddr>()
        .map_err(|_| format!("{s:?} is not an IP address or ip:port"))
}

/// Checks a smart host: `host`, `host:port`, `[ip]` or `[ip]:port`.
pub fn parse_smart_host(s: &str) -> Result<(String, u16), String> {
    let bad = || format!("{s:?} is not host:port or [ip]:port");
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (ip, after) = rest.split_once(']').ok_or_else(bad)?;
        ip.parse::<std::net::IpAddr>().map_err(|_| bad())?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse::<u16>().map_err(|_| bad())?,
            None if after.is_empty() => 25,
            None => return Err(bad()),
        };
        (ip.to_string(), port)
    } else {
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().map_err(|_| bad())?),
            None => (s, 25),
        };
        validate_domain_pattern(host).map_err(|_| bad())?;
        if host.starts_with('*') {
            return Err(bad());
        }
        (host.to_string(), port)
    };
    if port == 0 {
        return Err(bad());
    }
    Ok((host, port))
}

impl FleetSettings {
    /// Every problem found, each with its field path. Does not read files.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self.hostname.trim().is_empty() {
            errors.push(FieldError {
                path: "hostname".into(),
                message: "must not be empty".into(),
            });
        }
        for (i, d) in self.accepted_domains.iter().enumerate() {
            if let Err(message) = validate_domain_pattern(d) {
                errors.push(FieldError {
                    path: format!("acceptedDomains[{i}]"),
                    message,
                });
            }
        }
        if self.upstream.host.trim().is_empty() {
            errors.push(FieldError {
                path: "upstream.host".into(),
                message: "must not be empty".into(),
            });
        }
        if self.upstream.tls_domain.is_some() && self.upstream.tls != TlsLevel::DomainValidation {
            errors.push(FieldError {
                path: "upstream.tlsDomain".into(),
                message: "is only used with tls: DomainValidation".into(),
            });
        }
        if let Some(name) = &self.upstream.tls_domain {
            check_certificate_name(&mut errors, "upstream.tlsDomain".into(), name);
        }
        for (i, name) in self.internal_senders.certificate_names.iter().enumerate() {
            check_certificate_name(
                &mut errors,
                format!("internalSenders.certificateNames[{i}]"),
                name,
            );
        }
        let tp = &self.tls_policy;
        if tp.mta_sts_port == 0 {
            errors.push(FieldError {
                path: "tlsPolicy.mtaStsPort".into(),
                message: "must be at least 1".into(),
            });
        }
        if tp.mta_sts_max_policy_bytes == 0 {
            errors.push(FieldError {
                path: "tlsPolicy.mtaStsMaxPolicyBytes".into(),
                message: "must be at least 1".into(),
            });
        }
        if tp.mta_sts_fetch_timeout_secs == 0 {
            errors.push(FieldError {
                path: "tlsPolicy.mtaStsFetchTimeoutSecs".into(),
                message: "must be at least 1".into(),
            });
        }
        if let Some(r) = &self.dns_resolver
            && let Err(message) = parse_dns_resolver(r)
        {
            errors.push(FieldError {
                path: "dnsResolver".into(),
                message,
            });
        }
        let l = &self.limits;
        for (name, value, min) in [
            ("limits.maxCommandLine", l.max_command_line, 512),
            ("limits.maxTextLine", l.max_text_line, 1000),
            ("limits.maxRecipients", l.max_recipients, 1),
            ("limits.maxConnections", l.max_connections, 1),
            ("limits.maxConnectionsPerIp", l.max_connections_per_ip, 1),
            ("limits.maxHeaderSize", l.max_header_size, 1024),
        ] {
            if value < min {
                errors.push(FieldError {
                    path: name.into(),
                    message: format!("must be at least {min}"),
                });
            }
        }
        if l.max_message_size == 0 {
            errors.push(FieldError {
                path: "limits.maxMessageSize".into(),
                message: "must be at least 1".into(),
            });
        }
        for (name, value, range) in [
            (
                "limits.reservedConnectionsPercent",
                l.reserved_connections_percent,
                0..=100,
            ),
            ("limits.stressPercent", l.stress_percent, 1..=100),
            (
                "limits.ipv6PrefixLength",
                usize::from(l.ipv6_prefix_length),
                1..=128,
            ),
        ] {
            if !range.contains(&value) {
                errors.push(FieldError {
                    path: name.into(),
                    message: format!("must be between {} and {}", range.start(), range.end()),
                });
            }
        }
        let t = &self.timeouts;
        for (name, value) in [
            ("timeouts.commandSecs", t.command_secs),
            ("timeouts.dataSecs", t.data_secs),
            ("timeouts.tlsHandshakeSecs", t.tls_handshake_secs),
            ("timeouts.nextHopSecs", t.next_hop_secs),
            ("timeouts.nextHopDataEndSecs", t.next_hop_data_end_secs),
            ("timeouts.stressCommandSecs", t.stress_command_secs),
        ] {
            if value == 0 {
                errors.push(FieldError {
                    path: name.into(),
                    message: "must be at least 1".into(),
                });
            }
        }
        errors
    }

    /// The directory connector PEM paths are relative to.
    pub fn material_dir_for(&self, connectors_file: &Path) -> PathBuf {
        match &self.material_dir {
            Some(dir) => dir.clone(),
            None => connectors_file
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from(".")),
        }
    }
}

impl ConnectorsFile {
    /// Every problem found, each with its field path. Does not read files.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let mut names = std::collections::HashSet::new();
        for (i, c) in self.inbound.iter().enumerate() {
            let p = format!("inbound[{i}]");
            if !names.insert(("in", c.name.as_str())) {
                errors.push(FieldError {
                    path: format!("{p}.name"),
                    message: format!("duplicate connector name {:?}", c.name),
                });
            }
            check_domains(&mut errors, &format!("{p}.domains"), &c.domains);
            let needs_ranges = c.identify_by == IdentifyBy::SenderIp || c.restrict_to_ip_ranges;
            if needs_ranges && c.sender_ip_ranges.is_empty() {
                errors.push(FieldError {
                    path: format!("{p}.senderIPRanges"),
                    message: "required when identifyBy is SenderIP or restrictToIPRanges is set"
                        .into(),
                });
            }
            let needs_cert = c.identify_by == IdentifyBy::Certificate || c.restrict_to_certificate;
            match &c.certificate {
                None if needs_cert => errors.push(FieldError {
                    path: format!("{p}.certificate.subjectName"),
                    message:
                        "required when identifyBy is Certificate or restrictToCertificate is set"
                            .into(),
                }),
                Some(cert) => check_certificate_name(
                    &mut errors,
                    format!("{p}.certificate.subjectName"),
                    &cert.subject_name,
                ),
                None => {}
            }
            // With requireTls false a sender can skip TLS altogether, so a minimum version
            // would refuse only the senders that do use TLS: refused as incoherent rather
            // than silently reinterpreted (docs/partnerconnector.md).
            if !c.require_tls && c.min_tls_version > MinTlsVersion::Tls12 {
                errors.push(FieldError {
                    path: format!("{p}.minTlsVersion"),
                    message: "\"1.3\" needs requireTls: true (with requireTls false a sender \
                              can skip TLS altogether, so the minimum would only refuse \
                              senders that use TLS 1.2)"
                        .into(),
                });
            }
        }
        for (i, c) in self.outbound.iter().enumerate() {
            let p = format!("outbound[{i}]");
            if !names.insert(("out", c.name.as_str())) {
                errors.push(FieldError {
                    path: format!("{p}.name"),
                    message: format!("duplicate connector name {:?}", c.name),
                });
            }
            check_domains(&mut errors, &format!("{p}.domains"), &c.domains);
            if c.smart_hosts.is_empty() && !c.use_mx {
                errors.push(FieldError {
                    path: format!("{p}.smartHosts"),
                    message: "list at least one smart host or set useMX".into(),
                });
            }
            for (j, h) in c.smart_hosts.iter().enumerate() {
                if let Err(message) = parse_smart_host(h) {
                    errors.push(FieldError {
                        path: format!("{p}.smartHosts[{j}]"),
                        message,
                    });
                }
            }
            if c.tls_domain.is_some() && c.tls != TlsLevel::DomainValidation {
                errors.push(FieldError {
                    path: format!("{p}.tlsDomain"),
                    message: "is only used with tls: DomainValidation".into(),
                });
            }
            if let Some(name) = &c.tls_domain {
                check_certificate_name(&mut errors, format!("{p}.tlsDomain"), name);
            }
            check_policy_modes(&mut errors, &p, c);
        }
        errors
    }
}

/// The impossible combinations of DANE/MTA-STS with routing and TLS levels (the CRD's CEL rules
/// say the same).
fn check_policy_modes(errors: &mut Vec<FieldError>, p: &str, c: &OutboundConnector) {
    if c.dane != PolicyMode::None {
        // TLSA records are published for host names; an IP literal has no `_25._tcp` name.
        for (j, h) in c.smart_hosts.iter().enumerate() {
            if h.starts_with('[') {
                errors.push(FieldError {
                    path: format!("{p}.smartHosts[{j}]"),
                    message: "DANE needs host names (TLSA records are looked up by name), not \
                              IP literals"
                        .into(),
                });
            }
        }
        if c.tls == TlsLevel::None {
            errors.push(FieldError {
                path: format!("{p}.dane"),
                message: "DANE needs TLS (tls must not be None)".into(),
            });
        }
    }
    if c.mta_sts != PolicyMode::None && !c.use_mx {
        errors.push(FieldError {
            path: format!("{p}.mtaSts"),
            message: "MTA-STS applies to MX delivery: it needs useMX (a policy lists the \
                      domain's MX hosts)"
                .into(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gateway older than `senderAuthentication` refuses unknown fields: a connector that
    /// does not use it must not carry it.
    #[test]
    fn sender_authentication_none_is_left_out_of_the_file() {
        let mut c: InboundConnector = serde_json::from_value(serde_json::json!({
            "name": "mail/contoso",
            "domains": ["contoso.example"]
        }))
        .unwrap();
        let v = serde_json::to_value(&c).unwrap();
        assert!(v.get("senderAuthentication").is_none(), "{v}");
        c.sender_authentication = SenderAuthentication::Dmarc;
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["senderAuthentication"], "DMARC");
        assert_eq!(serde_json::from_value::<InboundConnector>(v).unwrap(), c);
    }

    #[test]
    fn bind_ip_replaces_only_unspecified_addresses() {
        let pod: std::net::IpAddr = "127.0.10.5".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:2525".parse().unwrap();
        let any6: SocketAddr = "[::]:8080".parse().unwrap();
        let explicit: SocketAddr = "127.0.0.9:2525".parse().unwrap();
        assert_eq!(with_bind_ip(any, Some(pod)).to_string(), "127.0.10.5:2525");
        assert_eq!(with_bind_ip(any6, Some(pod)).to_string(), "127.0.10.5:8080");
        assert_eq!(with_bind_ip(explicit, Some(pod)), explicit);
        assert_eq!(with_bind_ip(any, None), any);
    }

    #[test]
    fn admission_settings_are_validated() {
        let mut f: FleetSettings = serde_json::from_value(serde_json::json!({
            "hostname": "gw.test",
            "serverCertificate": {"certFile": "c", "keyFile": "k"},
            "upstream": {"host": "mail.test"},
        }))
        .unwrap();
        assert!(f.validate().is_empty());
        f.limits.reserved_connections_percent = 101;
        f.limits.stress_percent = 0;
        f.limits.ipv6_prefix_length = 0;
        f.timeouts.stress_command_secs = 0;
        let paths: Vec<String> = f.validate().into_iter().map(|e| e.path).collect();
        assert_eq!(
            paths,
            [
                "limits.reservedConnectionsPercent",
                "limits.stressPercent",
                "limits.ipv6PrefixLength",
                "timeouts.stressCommandSecs"
            ]
        );
    }

    #[test]
    fn domain_patterns() {
        for ok in [
            "*",
            "example.com",
            "*.example.com",
            "a-b.example",
            "xn--bcher-kva.example",
        ] {
            assert!(validate_domain_pattern(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "*.",
            "a..b",
            "-a.com",
            "a_b.com",
            "ex ample.com",
            "**.a",
            "a.*.com",
        ] {
            assert!(validate_domain_pattern(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn smart_hosts() {
        assert_eq!(
            parse_smart_host("smtp.example.com:2525").unwrap(),
            ("smtp.example.com".into(), 2525)
        );
        assert_eq!(
            parse_smart_host("smtp.example.com").unwrap(),
            ("smtp.example.com".into(), 25)
        );
        assert_eq!(
            parse_smart_host("[192.0.2.10]:2525").unwrap(),
            ("192.0.2.10".into(), 2525)
        );
        assert_eq!(
            parse_smart_host("[2001:db8::1]").unwrap(),
            ("2001:db8::1".into(), 25)
        );
        for bad in [
            "[nope]:25",
            "host:0",
            "host:x",
            "*.example.com:25",
            "[::1]x",
        ] {
            assert!(parse_smart_host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn certificate_names() {
        for ok in [
            "mail.example.com",
            "*.example.com",
            "*.eu.example.com",
            "Mail.Example.COM",
            "localhost",
            "192.0.2.10",
            "2001:db8::25",
        ] {
            assert!(validate_certificate_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "*", "*.com", "*.test", "*.", "a.*.com", "**.com", "bad name", "",
        ] {
            assert!(validate_certificate_name(bad).is_err(), "{bad}");
        }
    }

    /// Review finding: `tlsDomain`, `upstream.tlsDomain` and `internalSenders.certificateNames`
    /// (and `certificate.subjectName`) accepted `*.com`.
    #[test]
    fn single_label_wildcards_are_refused_naming_the_field() {
        let file: ConnectorsFile = serde_json::from_str(
            r#"{"inbound":[{"name":"mail/contoso","domains":["contoso.com"],
                            "certificate":{"subjectName":"*.com"}},
                           {"name":"mail/ok","domains":["ok.com"],
                            "certificate":{"subjectName":"*.ok.com"}}],
                "outbound":[{"name":"mail/fabrikam","domains":["fabrikam.com"],"useMX":true,
                             "tls":"DomainValidation","tlsDomain":"*.test"},
                            {"name":"mail/any","domains":["any.com"],"useMX":true,
                             "tls":"DomainValidation","tlsDomain":"*"},
                            {"name":"mail/good","domains":["good.com"],"useMX":true,
                             "tls":"DomainValidation","tlsDomain":"*.mx.good.com"}]}"#,
        )
        .unwrap();
        let errors = file.validate();
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "inbound[0].certificate.subjectName",
                "outbound[0].tlsDomain",
                "outbound[1].tlsDomain"
            ]
        );
        assert!(errors[0].message.contains("single label"), "{}", errors[0]);

        let mut fleet: FleetSettings = serde_json::from_str(
            r#"{"hostname":"gw.example.org","serverCertificate":{"certFile":"c","keyFile":"k"},
                "internalSenders":{"certificateNames":["relay.example.org","*.com","*.relays.example.org"]},
                "upstream":{"host":"mail.example.org","tlsDomain":"*.org"}}"#,
        )
        .unwrap();
        let paths: Vec<String> = fleet.validate().into_iter().map(|e| e.path).collect();
        assert_eq!(
            paths,
            ["upstream.tlsDomain", "internalSenders.certificateNames[1]"]
        );
        fleet.upstream.tls_domain = Some("*.example.org".into());
        fleet.internal_senders.certificate_names.remove(1);
        assert_eq!(fleet.validate(), []);
    }

    /// Review finding: requireTls false with minTlsVersion "1.3" accepted plaintext but
    /// refused TLS 1.2. The combination is refused; "1.2" (the floor the gateway has anyway)
    /// stays valid with requireTls false.
    #[test]
    fn min_tls_13_needs_require_tls() {
        let file = |require: bool, min: &str| -> Vec<FieldError> {
            serde_json::from_value::<ConnectorsFile>(serde_json::json!({"inbound": [{
                "name": "mail/contoso", "domains": ["contoso.com"],
                "requireTls": require, "minTlsVersion": min}]}))
            .unwrap()
            .validate()
        };
        let e = file(false, "1.3");
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].path, "inbound[0].minTlsVersion");
        assert!(e[0].message.contains("requireTls"), "{}", e[0]);
        assert_eq!(file(true, "1.3"), []);
        assert_eq!(file(false, "1.2"), []);
        assert_eq!(file(true, "1.2"), []);
    }

    /// Issue 15: DANE needs host names, MTA-STS needs useMX; the defaults are None.
    #[test]
    fn policy_mode_combinations() {
        let file: ConnectorsFile = serde_json::from_value(serde_json::json!({"outbound": [
            {"name": "mail/a", "domains": ["a.test"], "smartHosts": ["[192.0.2.1]:25", "mx.a.test"], "dane": "Mandatory"},
            {"name": "mail/b", "domains": ["b.test"], "smartHosts": ["mx.b.test"], "mtaSts": "Opportunistic"},
            {"name": "mail/c", "domains": ["c.test"], "useMX": true, "dane": "Opportunistic", "mtaSts": "Mandatory"},
            {"name": "mail/d", "domains": ["d.test"], "smartHosts": ["mx.d.test"]}
        ]}))
        .unwrap();
        let paths: Vec<String> = file.validate().into_iter().map(|e| e.path).collect();
        assert_eq!(paths, ["outbound[0].smartHosts[0]", "outbound[1].mtaSts"]);
        assert_eq!(file.outbound[3].dane, PolicyMode::None);
        assert_eq!(file.outbound[3].mta_sts, PolicyMode::None);
    }

    /// Issue 17: the operator's connectors file must fit a ConfigMap, so fields equal to their
    /// deserialisation default are left out; reading the file back gives the same connectors.
    #[test]
    fn connector_defaults_are_skipped_and_read_back_equal() {
        let inbound = InboundConnector {
            name: "partners/p0001".into(),
            generation: 0,
            domains: vec!["p0001.test".into()],
            identify_by: IdentifyBy::default(),
            sender_ip_ranges: vec![],
            require_tls: default_true(),
            min_tls_version: MinTlsVersion::default(),
            certificate: None,
            restrict_to_ip_ranges: false,
            restrict_to_certificate: false,
            sender_authentication: SenderAuthentication::default(),
        };
        let outbound = OutboundConnector {
            name: "partners/o0001".into(),
            generation: 0,
            domains: vec!["o0001.test".into()],
            smart_hosts: vec![],
            use_mx: false,
            tls: TlsLevel::default(),
            tls_domain: None,
            trust_bundle_file: None,
            client_certificate: None,
            dane: PolicyMode::default(),
            mta_sts: PolicyMode::default(),
        };
        let file = ConnectorsFile {
            inbound: vec![inbound.clone()],
            outbound: vec![outbound.clone()],
        };
        let text = serde_json::to_string(&file).unwrap();
        assert_eq!(
            text,
            r#"{"inbound":[{"name":"partners/p0001","domains":["p0001.test"]}],"outbound":[{"name":"partners/o0001","domains":["o0001.test"]}]}"#
        );
        assert_eq!(serde_json::from_str::<ConnectorsFile>(&text).unwrap(), file);
        assert_eq!(
            serde_json::to_string(&ConnectorsFile::default()).unwrap(),
            "{}"
        );

        // Every field away from its default is written and read back.
        let full = ConnectorsFile {
            inbound: vec![InboundConnector {
                generation: 7,
                identify_by: IdentifyBy::Certificate,
                sender_ip_ranges: vec!["192.0.2.0/24".parse().unwrap()],
                require_tls: false,
                min_tls_version: MinTlsVersion::Tls13,
                certificate: Some(CertificateRule {
                    subject_name: "mail.p0001.test".into(),
                    trust_bundle_file: Some("ab.pem".into()),
                }),
                restrict_to_ip_ranges: true,
                restrict_to_certificate: true,
                sender_authentication: SenderAuthentication::Dmarc,
                ..inbound
            }],
            outbound: vec![OutboundConnector {
                generation: 7,
                smart_hosts: vec!["smtp.o0001.test:2525".into()],
                use_mx: true,
                tls: TlsLevel::None,
                tls_domain: Some("mx.o0001.test".into()),
                trust_bundle_file: Some("cd.pem".into()),
                client_certificate: Some(CertificateFiles {
                    cert_file: "ef.pem".into(),
                    key_file: "01.pem".into(),
                }),
                dane: PolicyMode::Mandatory,
                mta_sts: PolicyMode::Opportunistic,
                ..outbound
            }],
        };
        let text = serde_json::to_string(&full).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["inbound"][0].as_object().unwrap().len(), 11, "{text}");
        assert_eq!(
            value["outbound"][0].as_object().unwrap().len(),
            11,
            "{text}"
        );
        assert_eq!(value["inbound"][0]["requireTls"], false);
        assert_eq!(serde_json::from_str::<ConnectorsFile>(&text).unwrap(), full);
        // A certificate rule without a trust bundle leaves the file name out.
        let rule = CertificateRule {
            subject_name: "x.test".into(),
            trust_bundle_file: None,
        };
        assert_eq!(
            serde_json::to_string(&rule).unwrap(),
            r#"{"subjectName":"x.test"}"#
        );
    }

    #[test]
    fn connector_errors_name_fields() {
        let file: ConnectorsFile = serde_json::from_str(
            r#"{"inbound":[{"name":"mail/contoso","domains":["bad domain"],"identifyBy":"SenderIP"}],
                "outbound":[{"name":"mail/fabrikam","domains":["fabrikam.com"],"tls":"Opportunistic","tlsDomain":"x.com"}]}"#,
        )
        .unwrap();
        let paths: Vec<String> = file.validate().into_iter().map(|e| e.path).collect();
        assert_eq!(
            paths,
            [
                "inbound[0].domains[0]",
                "inbound[0].senderIPRanges",
                "outbound[0].smartHosts",
                "outbound[0].tlsDomain"
            ]
        );
    }
}
