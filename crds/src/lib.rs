//! PartnerConnector custom resource types (`partnergate.io/v1alpha1`).
//!
//! The schema is generated from these types by kube's derive: doc comments become the
//! `description` of each field (what `kubectl explain` shows), serde defaults become schema
//! `default`s (applied by the apiserver), and `#[x_kube(validation = ...)]` attributes become
//! CEL `x-kubernetes-validations` so invalid connectors are refused at `kubectl apply` with a
//! message that names the field.
//!
//! `crdgen` writes the CRD to `crds/partnerconnector.yaml`; a test fails when that file
//! differs from these types.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use serde::{Deserialize, Serialize};

/// API group of the PartnerConnector CRD.
pub const GROUP: &str = "partnergate.io";
/// Version of the PartnerConnector CRD.
pub const VERSION: &str = "v1alpha1";

/// Domain pattern accepted in `domains`, `certificate.subjectName` and `tlsDomain`
/// (`example.com` or `*.example.com`; `domains` also accepts a lone `*`). Same grammar as the
/// gateway's `validate_domain_pattern`.
pub const DOMAIN_REGEX: &str = r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$";

/// Partner organisation connector: how mail from a partner is identified and checked
/// (Inbound), or how mail to a partner is routed and protected (Outbound).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "partnergate.io",
    version = "v1alpha1",
    kind = "PartnerConnector",
    plural = "partnerconnectors",
    singular = "partnerconnector",
    namespaced,
    shortname = "pc",
    category = "partnergate",
    status = "PartnerConnectorStatus",
    doc = "PartnerConnector: a mail connector with a partner organisation, enforced by the partnergate gateway fleet.",
    printcolumn = r#"{"name":"Direction","type":"string","jsonPath":".spec.direction"}"#,
    printcolumn = r#"{"name":"Domains","type":"string","jsonPath":".spec.domains"}"#,
    printcolumn = r#"{"name":"TLS","type":"string","jsonPath":".status.tls","description":"TLS requirement: Inbound requireTls/minTlsVersion, Outbound TLS level"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(
    validation = Rule::new("self.direction != 'Inbound' || has(self.inbound)")
        .message("spec.inbound is required when spec.direction is Inbound")
        .field_path(".inbound"),
    validation = Rule::new("self.direction != 'Inbound' || !has(self.outbound)")
        .message("spec.outbound must not be set when spec.direction is Inbound")
        .field_path(".outbound"),
    validation = Rule::new("self.direction != 'Outbound' || has(self.outbound)")
        .message("spec.outbound is required when spec.direction is Outbound")
        .field_path(".outbound"),
    validation = Rule::new("self.direction != 'Outbound' || !has(self.inbound)")
        .message("spec.inbound must not be set when spec.direction is Outbound")
        .field_path(".inbound")
)]
#[serde(rename_all = "camelCase")]
pub struct PartnerConnectorSpec {
    /// Whether the connector is in force. `false` leaves it out of the gateway config, as if it
    /// did not exist; its status then says Accepted=False, reason Disabled.
    #[serde(default = "default_true")]
    pub enabled: bool,

    /// Inbound: mail from the partner to the organisation. Outbound: mail from the
    /// organisation to the partner.
    pub direction: Direction,

    /// The partner's domains. Inbound: envelope sender (MAIL FROM) domains; Outbound: recipient
    /// domains routed through this connector. `example.com` matches that domain only,
    /// `*.example.com` its subdomains, `*` any domain. Write internationalised domains as
    /// A-labels (`xn--bcher-kva.example`): envelope domains are normalised with UTS-46 before
    /// matching, so `bücher.example` and fullwidth or ideographic-dot spellings match too.
    /// An Inbound connector with restrictToIPRanges or restrictToCertificate also guards these
    /// domains (all but `*`) whatever identifyBy says; two connectors guarding the same domain
    /// conflict and the younger is not accepted.
    #[schemars(length(min = 1, max = 256), inner(length(max = 253)))]
    #[x_kube(
        validation = Rule::new(r"self.all(d, d == '*' || d.matches('^(\\*\\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$'))")
            .message("spec.domains: each entry must be a domain (example.com), a wildcard (*.example.com) or *")
    )]
    pub domains: Vec<String>,

    /// Rules for mail from the partner. Required when direction is Inbound, forbidden
    /// otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound: Option<InboundSpec>,

    /// Routing and TLS for mail to the partner. Required when direction is Outbound,
    /// forbidden otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound: Option<OutboundSpec>,
}

fn default_true() -> bool {
    true
}

/// Direction of mail flow a connector governs.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum Direction {
    /// Partner → organisation.
    Inbound,
    /// Organisation → partner.
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "Inbound",
            Direction::Outbound => "Outbound",
        }
    }
}

/// How the gateway recognises that a transaction comes from this partner.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum IdentifyBy {
    /// The envelope sender's domain is one of `domains`.
    #[default]
    SenderDomain,
    /// The client IP is inside `senderIPRanges` (longest prefix wins).
    #[serde(rename = "SenderIP")]
    SenderIp,
    /// The verified client certificate matches `certificate.subjectName`.
    Certificate,
}

/// Lowest TLS version accepted from the partner.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum MinTlsVersion {
    /// TLS 1.2 or newer.
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    Tls13,
}

/// How the partner's identity must be authenticated beyond the connector's own rules.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum SenderAuthentication {
    /// Nothing beyond the connector's rules.
    #[default]
    None,
    /// SPF must pass for the envelope sender (`550 5.7.23` at MAIL FROM otherwise).
    #[serde(rename = "SPF")]
    Spf,
    /// A DKIM signature whose domain is the envelope sender's domain (or a parent or
    /// subdomain of it) must verify (`550 5.7.1` otherwise).
    #[serde(rename = "DKIM")]
    Dkim,
    /// DMARC must pass: SPF or DKIM aligned with the From: header's domain (RFC 7489;
    /// `550 5.7.26` otherwise).
    #[serde(rename = "DMARC")]
    Dmarc,
}

/// Rules for mail from the partner.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("!(has(self.requireTls) && !self.requireTls && has(self.minTlsVersion) && self.minTlsVersion == '1.3')")
        .message("spec.inbound.minTlsVersion \"1.3\" needs requireTls: true (with requireTls false a sender can skip TLS altogether)")
        .field_path(".minTlsVersion"),
    validation = Rule::new("!((has(self.identifyBy) && self.identifyBy == 'SenderIP') || (has(self.restrictToIPRanges) && self.restrictToIPRanges)) || (has(self.senderIPRanges) && size(self.senderIPRanges) > 0)")
        .message("spec.inbound.senderIPRanges is required when identifyBy is SenderIP or restrictToIPRanges is true")
        .field_path(".senderIPRanges"),
    validation = Rule::new("!((has(self.identifyBy) && self.identifyBy == 'Certificate') || (has(self.restrictToCertificate) && self.restrictToCertificate)) || has(self.certificate)")
        .message("spec.inbound.certificate.subjectName is required when identifyBy is Certificate or restrictToCertificate is true")
        .field_path(".certificate")
)]
#[serde(rename_all = "camelCase")]
pub struct InboundSpec {
    /// Which fact identifies the partner: SenderDomain (envelope sender domain in `domains`),
    /// SenderIP (client IP in `senderIPRanges`) or Certificate (verified client certificate
    /// matching `certificate.subjectName`).
    #[serde(default)]
    pub identify_by: IdentifyBy,

    /// The partner's sending IP ranges in CIDR notation (`203.0.113.0/24`, `2001:db8::/48`).
    /// Required with identifyBy SenderIP or restrictToIPRanges.
    #[serde(
        rename = "senderIPRanges",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    #[schemars(length(max = 256), inner(length(max = 64)))]
    #[x_kube(
        validation = Rule::new("self.all(r, isCIDR(r))")
            .message("spec.inbound.senderIPRanges: each entry must be a CIDR range such as 203.0.113.0/24 or 2001:db8::/48")
    )]
    pub sender_ip_ranges: Vec<String>,

    /// Refuse the partner's mail unless it arrives over STARTTLS
    /// (`530 5.7.0 Must issue a STARTTLS command first`).
    #[serde(default = "default_true")]
    pub require_tls: bool,

    /// Lowest TLS version accepted from the partner: "1.2" or "1.3". "1.3" needs requireTls:
    /// true (with requireTls false a sender could skip TLS altogether, so the minimum would
    /// only refuse senders that do use TLS 1.2).
    #[serde(default)]
    pub min_tls_version: MinTlsVersion,

    /// The client certificate the partner presents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<InboundCertificate>,

    /// Refuse mail claimed by this connector when the client IP is outside `senderIPRanges`.
    /// Whatever identifyBy says, the connector then also claims mail from its `domains` (all
    /// but `*`) that no other connector claims, so mail from those domains sent from any
    /// other address is refused (`550 5.7.1`), as Exchange's RestrictDomainsToIPAddresses.
    #[serde(rename = "restrictToIPRanges", default)]
    pub restrict_to_ip_ranges: bool,

    /// Refuse mail claimed by this connector without a client certificate that is trusted by
    /// `certificate.trustBundle` and matches `certificate.subjectName`. Whatever identifyBy
    /// says, the connector then also claims mail from its `domains` (all but `*`) that no other
    /// connector claims, so those domains cannot be used without the certificate.
    #[serde(default)]
    pub restrict_to_certificate: bool,

    /// How the partner's identity must be authenticated beyond these rules: None (default),
    /// SPF, DKIM or DMARC. The result is stamped in an Authentication-Results header and in
    /// X-Partnergate-Connector (`auth=dmarc:pass`); a check that does not pass refuses the
    /// mail, a DNS error gives `451` (the sender retries).
    #[serde(default)]
    pub sender_authentication: SenderAuthentication,
}

/// The partner's client certificate.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InboundCertificate {
    /// Name the certificate must carry (`mail.contoso.com` or `*.contoso.com`), matched per
    /// RFC 6125 against its DNS subjectAltNames (the subject CN only when it has none). A
    /// wildcard needs two labels or more after `*.` (`*.com` is refused).
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(
        validation = Rule::new(r"self.matches('^(\\*\\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$')")
            .message("spec.inbound.certificate.subjectName must be a domain name (mail.example.com) or wildcard (*.example.com)"),
        validation = Rule::new("!self.startsWith('*.') || self.substring(2).contains('.')")
            .message("spec.inbound.certificate.subjectName: a wildcard needs two labels or more after *. (*.example.com, not *.com)")
    )]
    pub subject_name: String,

    /// CA certificates the partner's certificate must chain to. Default: the public web PKI
    /// roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_bundle: Option<TrustBundle>,
}

/// A PEM CA bundle held in a Secret or a ConfigMap in the connector's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(
    validation = Rule::new("has(self.secretRef) != has(self.configMapRef)")
        .message("trustBundle: set exactly one of secretRef or configMapRef")
)]
#[serde(rename_all = "camelCase")]
pub struct TrustBundle {
    /// Secret holding the PEM bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<KeyRef>,
    /// ConfigMap holding the PEM bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_ref: Option<KeyRef>,
}

/// A key of a Secret or ConfigMap in the connector's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyRef {
    /// Name of the Secret or ConfigMap.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key holding the PEM data.
    #[serde(default = "default_ca_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_ca_key() -> String {
    "ca.crt".to_string()
}

/// Routing and TLS for mail to the partner.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("(has(self.smartHosts) && size(self.smartHosts) > 0) || (has(self.useMX) && self.useMX)")
        .message("spec.outbound: set smartHosts or useMX: true")
        .field_path(".smartHosts"),
    validation = Rule::new("!(has(self.smartHosts) && size(self.smartHosts) > 0 && has(self.useMX) && self.useMX)")
        .message("spec.outbound: smartHosts and useMX: true are mutually exclusive")
        .field_path(".useMX"),
    validation = Rule::new("!has(self.tlsDomain) || !has(self.tls) || self.tls == 'DomainValidation'")
        .message("spec.outbound.tlsDomain is only allowed with tls: DomainValidation")
        .field_path(".tlsDomain"),
    validation = Rule::new("!has(self.dane) || self.dane == 'None' || !has(self.smartHosts) || self.smartHosts.all(h, !h.startsWith('['))")
        .message("spec.outbound.dane needs host names (smartHosts by name or useMX: true), not IP literals: TLSA records are looked up by name")
        .field_path(".dane"),
    validation = Rule::new("!has(self.mtaSts) || self.mtaSts == 'None' || (has(self.useMX) && self.useMX)")
        .message("spec.outbound.mtaSts needs useMX: true (an MTA-STS policy lists the recipient domain's MX hosts)")
        .field_path(".mtaSts")
)]
#[serde(rename_all = "camelCase")]
pub struct OutboundSpec {
    /// The partner's mail servers, tried in order: `host`, `host:port`, `[ip]` or `[ip]:port`
    /// (port 25 by default). Either this or useMX.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(max = 260)))]
    #[x_kube(
        validation = Rule::new(r"self.all(h, h.matches('^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*(:[0-9]{1,5})?$') || (h.matches('^\\[[0-9A-Fa-f:.]+\\](:[0-9]{1,5})?$') && isIP(h.substring(1, h.indexOf(']')))))")
            .message("spec.outbound.smartHosts: each entry must be host, host:port, [ip] or [ip]:port")
    )]
    pub smart_hosts: Vec<String>,

    /// Deliver to the recipient domain's MX hosts instead of smart hosts.
    #[serde(rename = "useMX", default)]
    pub use_mx: bool,

    /// TLS strictness towards the partner; a level that is not met is never downgraded (the
    /// recipient gets `451 4.7.5`). Opportunistic: STARTTLS if offered, no verification.
    /// EncryptionOnly: STARTTLS required, no verification. CertificateValidation: the chain
    /// must verify against trustBundle or the public roots. DomainValidation: chain verified
    /// and the name matches tlsDomain (default: the smart host's or MX host's name).
    #[serde(default)]
    pub tls: OutboundTls,

    /// Name the partner's certificate must match under DomainValidation (`smtp.fabrikam.com`
    /// or `*.fabrikam.com`; a wildcard needs two labels or more after `*.`, so `*.com` is
    /// refused). Default: the host name connected to. Only with DomainValidation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(
        validation = Rule::new(r"self.matches('^(\\*\\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$')")
            .message("spec.outbound.tlsDomain must be a domain name (smtp.example.com) or wildcard (*.example.com)"),
        validation = Rule::new("!self.startsWith('*.') || self.substring(2).contains('.')")
            .message("spec.outbound.tlsDomain: a wildcard needs two labels or more after *. (*.example.com, not *.com)")
    )]
    pub tls_domain: Option<String>,

    /// Private CA the partner's certificate must chain to (CertificateValidation and
    /// DomainValidation). Default: the public web PKI roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_bundle: Option<TrustBundle>,

    /// Client certificate presented to the partner: a `kubernetes.io/tls` Secret (keys
    /// `tls.crt` and `tls.key`) in the connector's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<ClientCertificate>,

    /// DANE (RFC 7672): authenticate the partner's servers by TLSA records in DNSSEC-signed
    /// DNS. None (default): not looked up. Opportunistic: enforced when the partner publishes
    /// TLSA records, otherwise the tls level applies. Mandatory: a next hop without secure TLSA
    /// records is deferred (`451 4.7.5`). A bogus (failed DNSSEC) answer always defers.
    #[serde(default, skip_serializing_if = "OutboundPolicyMode::is_none")]
    pub dane: OutboundPolicyMode,

    /// MTA-STS (RFC 8461), with useMX only: the recipient domain's published policy (MX names,
    /// enforce/testing) is applied. None (default): not looked up. Opportunistic: enforced when
    /// the domain publishes a policy. Mandatory: a domain without an enforce policy is deferred
    /// (`451 4.7.5`). DANE, when it applies to a host, wins over MTA-STS.
    #[serde(default, skip_serializing_if = "OutboundPolicyMode::is_none")]
    pub mta_sts: OutboundPolicyMode,
}

/// How a DNS-published TLS policy (DANE, MTA-STS) applies to an Outbound connector.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum OutboundPolicyMode {
    /// Not looked up.
    #[default]
    None,
    /// Enforced when the partner publishes a policy.
    Opportunistic,
    /// Required; deferred when the partner publishes none.
    Mandatory,
}

impl OutboundPolicyMode {
    pub fn is_none(&self) -> bool {
        *self == OutboundPolicyMode::None
    }
}

/// TLS level towards the partner's mail servers.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum OutboundTls {
    /// STARTTLS if offered, no verification.
    Opportunistic,
    /// STARTTLS required, no verification.
    EncryptionOnly,
    /// STARTTLS required, chain verified against trustBundle or public roots.
    CertificateValidation,
    /// Chain verified and name matches tlsDomain (or the host).
    #[default]
    DomainValidation,
}

impl OutboundTls {
    pub fn as_str(self) -> &'static str {
        match self {
            OutboundTls::Opportunistic => "Opportunistic",
            OutboundTls::EncryptionOnly => "EncryptionOnly",
            OutboundTls::CertificateValidation => "CertificateValidation",
            OutboundTls::DomainValidation => "DomainValidation",
        }
    }
}

/// A client certificate Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientCertificate {
    /// A `kubernetes.io/tls` Secret (keys `tls.crt`, `tls.key`), e.g. written by cert-manager.
    pub secret_ref: SecretName,
}

/// A Secret in the connector's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretName {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Observed state, written by the operator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PartnerConnectorStatus {
    /// metadata.generation the status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Accepted (spec valid, not conflicted), ResolvedRefs (referenced Secrets/ConfigMaps exist,
    /// parse and are in date), Programmed (live on every ready gateway pod) and Ready (all three).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// Summary of the TLS requirement (shown by `kubectl get pc`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<String>,

    /// Gateway pods that are ready, and how many of them run this connector's generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateways: Option<GatewaysStatus>,

    /// Each certificate found in the referenced Secrets/ConfigMaps.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<CertificateStatus>,

    /// Latest TLS probe of each of an Outbound connector's next hops, as reported by the
    /// gateways.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub validation: Vec<ValidationStatus>,
}

/// Gateway pod counts.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewaysStatus {
    /// Ready gateway pods.
    pub ready: i32,
    /// Ready gateway pods whose live config holds this connector's current generation.
    pub programmed: i32,
}

/// A certificate found in a referenced Secret or ConfigMap.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CertificateStatus {
    /// Name of the Secret holding the certificate (empty for a ConfigMap).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub secret: String,
    /// Name of the ConfigMap holding the certificate (empty for a Secret).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub config_map: String,
    /// Key within the Secret/ConfigMap.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key: String,
    /// Subject distinguished name.
    pub subject: String,
    /// Expiry, RFC 3339.
    pub not_after: String,
}

/// Result of one TLS probe of a next hop.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ValidationStatus {
    /// The probed next hop (`host:port`).
    pub host: String,
    /// When the probe ran, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// Success or Failure.
    pub result: String,
    /// Negotiated TLS version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_version: Option<String>,
    /// Subject of the next hop's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_subject: Option<String>,
    /// Expiry of the next hop's certificate, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_not_after: Option<String>,
    /// Why the probe failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For connectors with a DANE or MTA-STS mode: the policy that authenticated the host
    /// (`dane`, `mta-sts`, `none`) and what was found (TLSA records, MTA-STS mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

/// Condition types.
pub mod condition {
    pub const ACCEPTED: &str = "Accepted";
    pub const RESOLVED_REFS: &str = "ResolvedRefs";
    pub const PROGRAMMED: &str = "Programmed";
    pub const READY: &str = "Ready";
}

/// Condition reasons (CamelCase constants).
pub mod reason {
    // Accepted
    pub const ACCEPTED: &str = "Accepted";
    pub const INVALID: &str = "Invalid";
    pub const CONFLICTED: &str = "Conflicted";
    pub const DISABLED: &str = "Disabled";
    // ResolvedRefs
    pub const RESOLVED_REFS: &str = "ResolvedRefs";
    pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
    pub const INVALID_CERTIFICATE: &str = "InvalidCertificate";
    pub const CERTIFICATE_EXPIRED: &str = "CertificateExpired";
    // Programmed
    pub const PROGRAMMED: &str = "Programmed";
    pub const PENDING: &str = "Pending";
    pub const NO_GATEWAYS: &str = "NoGateways";
    /// Accepted and resolved, but the gateway's connectors file (one ConfigMap, at most
    /// 1 MiB) has no room left for it: older connectors are served first.
    pub const CONFIG_TOO_LARGE: &str = "ConfigTooLarge";
    // Ready
    pub const READY: &str = "Ready";
    pub const NOT_READY: &str = "NotReady";
}

/// The CRD, with descriptions reflowed: doc comments wrap at 100 columns, which `kubectl
/// explain` would show as hard line breaks. Single newlines become spaces; blank lines (paragraph
/// breaks) stay.
pub fn crd() -> CustomResourceDefinition {
    let crd = PartnerConnector::crd();
    let Ok(mut value) = serde_json::to_value(&crd) else {
        return crd;
    };
    reflow_descriptions(&mut value);
    serde_json::from_value(value).unwrap_or(crd)
}

fn reflow_descriptions(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, child) in map.iter_mut() {
                match child {
                    serde_json::Value::String(s) if k == "description" => {
                        *s = s
                            .split("\n\n")
                            .map(|para| {
                                para.split('\n')
                                    .map(str::trim)
                                    .collect::<Vec<_>>()
                                    .join(" ")
                            })
                            .collect::<Vec<_>>()
                            .join("\n\n");
                    }
                    _ => reflow_descriptions(child),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(reflow_descriptions),
        _ => {}
    }
}

/// The CRD as YAML, exactly as `crdgen` writes it to `crds/partnerconnector.yaml`.
pub fn crd_yaml() -> Result<String, serde_norway::Error> {
    let body = serde_norway::to_string(&crd())?;
    Ok(format!(
        "# Generated by `cargo run -p partnergate-crds --bin crdgen` from crds/src/lib.rs; do not edit.\n{body}"
    ))
}

impl PartnerConnector {
    /// `namespace/name`, the connector's name in the gateway config.
    pub fn key(&self) -> String {
        format!(
            "{}/{}",
            self.metadata.namespace.as_deref().unwrap_or_default(),
            self.metadata.name.as_deref().unwrap_or_default()
        )
    }
}
