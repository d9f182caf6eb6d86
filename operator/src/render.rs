//! The render: a pure, deterministic function from the connector set and the referenced
//! Secret/ConfigMap data to the gateway's connectors file, the PEM material bundle, a content
//! hash and one outcome per connector.
//!
//! Nothing here talks to the API server or reads the clock: the controller fetches what
//! [`references`] names, passes it in as [`Objects`], and passes `now` for expiry checks.
//!
//! Rules (docs/partnerconnector.md):
//! - disabled connectors are left out and take part in nothing (Accepted=False/Disabled);
//! - each connector is validated on its own with the gateway's `ConnectorsFile::validate`;
//!   an invalid one is left out (Accepted=False/Invalid);
//! - among the valid ones, two claiming the same key conflict: the oldest (creationTimestamp,
//!   then namespace/name) keeps it, the other is left out (Accepted=False/Conflicted). Keys
//!   follow the claiming rules of section 3, including rule 4: a connector identified by IP or
//!   certificate with restrictToIPRanges/restrictToCertificate guards each of its domains
//!   (but `*`), so two such connectors guarding the same domain conflict;
//! - a connector whose referenced Secret/ConfigMap (or key) is missing or does not parse is left
//!   out (ResolvedRefs=False/SecretNotFound or InvalidCertificate); an expired certificate is
//!   reported (ResolvedRefs=False/CertificateExpired) but the connector stays in, so its rules
//!   keep being enforced (the gateway then refuses what the expired material cannot verify);
//! - the file is compact JSON without the fields equal to the gateway's defaults, and never
//!   larger than [`MAX_CONNECTORS_FILE_BYTES`] (a ConfigMap holds at most 1 MiB): when the
//!   connectors do not all fit, the oldest are kept (the same order as conflicts, so a
//!   connector never loses its place to a younger one) and the others are left out with
//!   [`Outcome::left_out`] saying why (Programmed=False/ConfigTooLarge), rather than a file the
//!   API server refuses, which would leave every change unserved;
//! - the same holds for the TLS material (trust bundles, client certificates and keys): its
//!   files (keys and bytes) never add up to more than [`MAX_MATERIAL_BYTES`] (a Secret holds at
//!   most 1 MiB); a connector whose new files would not fit is left out the same way, with a
//!   message naming the material Secret, and [`Rendered::over_limit`] says which limit bit.

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use ipnet::IpNet;
use partnergate_core::config as gw;
use partnergate_crds::{
    CertificateStatus, Direction, IdentifyBy, MinTlsVersion, OutboundPolicyMode, OutboundTls,
    PartnerConnector, SenderAuthentication, TrustBundle,
};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::certs::{self, CertInfo};

/// Kind of a referenced object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RefKind {
    Secret,
    ConfigMap,
}

/// A referenced Secret or ConfigMap.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub kind: RefKind,
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn secret(namespace: &str, name: &str) -> Self {
        ObjectKey {
            kind: RefKind::Secret,
            namespace: namespace.into(),
            name: name.into(),
        }
    }
    pub fn config_map(namespace: &str, name: &str) -> Self {
        ObjectKey {
            kind: RefKind::ConfigMap,
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            RefKind::Secret => "Secret",
            RefKind::ConfigMap => "ConfigMap",
        };
        write!(f, "{kind} {}/{}", self.namespace, self.name)
    }
}

/// Data of the referenced objects that exist: key → bytes (Secret `data`, ConfigMap `data` as
/// UTF-8 and `binaryData`).
pub type Objects = BTreeMap<ObjectKey, BTreeMap<String, Vec<u8>>>;

/// Every Secret/ConfigMap a connector references (in its own namespace).
pub fn references(pc: &PartnerConnector) -> Vec<ObjectKey> {
    let ns = pc.metadata.namespace.as_deref().unwrap_or_default();
    let mut out = Vec::new();
    let mut bundle = |tb: &TrustBundle| {
        if let Some(r) = &tb.secret_ref {
            out.push(ObjectKey::secret(ns, &r.name));
        }
        if let Some(r) = &tb.config_map_ref {
            out.push(ObjectKey::config_map(ns, &r.name));
        }
    };
    if let Some(tb) = pc
        .spec
        .inbound
        .as_ref()
        .and_then(|i| i.certificate.as_ref())
        .and_then(|c| c.trust_bundle.as_ref())
    {
        bundle(tb);
    }
    if let Some(o) = &pc.spec.outbound {
        if let Some(tb) = &o.trust_bundle {
            bundle(tb);
        }
        if let Some(cc) = &o.client_certificate {
            out.push(ObjectKey::secret(ns, &cc.secret_ref.name));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The Accepted verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acceptance {
    Accepted,
    Disabled,
    Invalid(String),
    /// Lost a conflict to `winner` (`namespace/name`) over `key`.
    Conflicted {
        winner: String,
        key: String,
    },
}

/// The ResolvedRefs verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    Resolved,
    NotFound(String),
    InvalidCertificate(String),
    Expired(String),
}

/// What happened to one connector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub acceptance: Acceptance,
    pub resolution: Resolution,
    /// Whether it is in the rendered connectors file.
    pub included: bool,
    /// Certificates found in its references (for `status.certificates`).
    pub certificates: Vec<CertificateStatus>,
    /// Certificates within 14 days of expiry (for Warning events): "Secret ns/x key: subject".
    pub expiring: Vec<String>,
    /// Accepted and resolved but left out because the connectors file would exceed
    /// [`MAX_CONNECTORS_FILE_BYTES`]: the message, with the sizes.
    pub left_out: Option<String>,
}

/// The render's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// `connectors.json` bytes (compact JSON, trailing newline), at most
    /// [`MAX_CONNECTORS_FILE_BYTES`].
    pub connectors_json: Vec<u8>,
    /// Hex sha256 of `connectors_json`: the gateway reports it as `configHash`.
    pub hash: String,
    /// PEM files by name (`<first 16 hex of sha256>.pem`).
    pub material: BTreeMap<String, Vec<u8>>,
    /// Outcome by connector key (`namespace/name`).
    pub outcomes: BTreeMap<String, Outcome>,
    /// The limits that left connectors out, if any (for the log line naming the object).
    pub over_limit: Vec<Limit>,
}

/// A size limit of a rendered object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// The connectors file, [`MAX_CONNECTORS_FILE_BYTES`] (its ConfigMap).
    ConnectorsFile,
    /// The material files, [`MAX_MATERIAL_BYTES`] (its Secret).
    Material,
}

/// The API server refuses a ConfigMap whose data (keys and values together) exceeds 1 MiB.
pub const CONFIGMAP_DATA_LIMIT: usize = 1024 * 1024;
/// Largest connectors file rendered: the ConfigMap's limit less room for its key, the only
/// other thing in that ConfigMap's data.
pub const MAX_CONNECTORS_FILE_BYTES: usize = CONFIGMAP_DATA_LIMIT - 1024;

/// The API server refuses a Secret whose data (keys and values, before base64) exceeds 1 MiB.
pub const SECRET_DATA_LIMIT: usize = 1024 * 1024;
/// Largest material bundle rendered, keys and bytes counted: the material Secret holds nothing
/// else.
pub const MAX_MATERIAL_BYTES: usize = SECRET_DATA_LIMIT;

/// Material files by name.
type Files = BTreeMap<String, Vec<u8>>;

/// How the message of a connector left out for the material's limit begins.
pub const MATERIAL_LEFT_OUT: &str = "the gateway's TLS material Secret";

/// Bytes a set of files takes in a Secret's or ConfigMap's data.
pub fn data_size(files: &BTreeMap<String, Vec<u8>>) -> usize {
    files.iter().map(|(k, v)| k.len() + v.len()).sum()
}

/// Days before expiry that give a Warning.
pub const EXPIRY_WARNING_DAYS: i64 = 14;

/// Content-addressed PEM file name.
pub fn pem_file_name(bytes: &[u8]) -> String {
    let digest = hex::encode(Sha256::digest(bytes));
    format!("{}.pem", &digest[..16])
}

/// Hex sha256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Resolved material of one connector, before it is added to the bundle.
#[derive(Default)]
struct Resolved {
    files: BTreeMap<String, Vec<u8>>,
    trust_bundle_file: Option<PathBuf>,
    client_certificate: Option<gw::CertificateFiles>,
    certificates: Vec<CertificateStatus>,
    infos: Vec<(String, CertInfo)>,
    /// Trust bundles all of whose certificates have expired / expired client certificates.
    expired: Vec<String>,
}

enum RefError {
    NotFound(String),
    Invalid(String),
}

fn lookup<'a>(objects: &'a Objects, key: &ObjectKey, data_key: &str) -> Result<&'a [u8], RefError> {
    let data = objects
        .get(key)
        .ok_or_else(|| RefError::NotFound(format!("{key} not found")))?;
    data.get(data_key)
        .map(Vec::as_slice)
        .ok_or_else(|| RefError::NotFound(format!("{key} has no key {data_key:?}")))
}

fn cert_status(key: &ObjectKey, data_key: &str, info: &CertInfo) -> CertificateStatus {
    let (secret, config_map) = match key.kind {
        RefKind::Secret => (key.name.clone(), String::new()),
        RefKind::ConfigMap => (String::new(), key.name.clone()),
    };
    CertificateStatus {
        secret,
        config_map,
        key: data_key.to_string(),
        subject: info.subject.clone(),
        not_after: info.not_after_rfc3339(),
    }
}

fn resolve(
    pc: &PartnerConnector,
    objects: &Objects,
    now: OffsetDateTime,
) -> Result<Resolved, RefError> {
    let ns = pc.metadata.namespace.as_deref().unwrap_or_default();
    let mut r = Resolved::default();

    let trust_bundle = match pc.spec.direction {
        Direction::Inbound => pc
            .spec
            .inbound
            .as_ref()
            .and_then(|i| i.certificate.as_ref())
            .and_then(|c| c.trust_bundle.as_ref()),
        Direction::Outbound => pc
            .spec
            .outbound
            .as_ref()
            .and_then(|o| o.trust_bundle.as_ref()),
    };
    if let Some(tb) = trust_bundle {
        let (key, data_key) = match (&tb.secret_ref, &tb.config_map_ref) {
            (Some(s), _) => (ObjectKey::secret(ns, &s.name), s.key.as_str()),
            (None, Some(c)) => (ObjectKey::config_map(ns, &c.name), c.key.as_str()),
            (None, None) => {
                return Err(RefError::Invalid(
                    "trustBundle names neither secretRef nor configMapRef".into(),
                ));
            }
        };
        let pem = lookup(objects, &key, data_key)?;
        let infos = certs::parse_pem_certificates(pem)
            .map_err(|e| RefError::Invalid(format!("{key} key {data_key:?}: {e}")))?;
        if infos.iter().all(|c| c.not_after <= now) {
            r.expired.push(format!(
                "{key} key {data_key:?}: every certificate has expired"
            ));
        }
        for info in infos {
            r.certificates.push(cert_status(&key, data_key, &info));
            r.infos.push((format!("{key} key {data_key:?}"), info));
        }
        let name = pem_file_name(pem);
        r.trust_bundle_file = Some(PathBuf::from(&name));
        r.files.insert(name, pem.to_vec());
    }

    if let Some(cc) = pc
        .spec
        .outbound
        .as_ref()
        .and_then(|o| o.client_certificate.as_ref())
    {
        let key = ObjectKey::secret(ns, &cc.secret_ref.name);
        let crt = lookup(objects, &key, "tls.crt")?;
        let tls_key = lookup(objects, &key, "tls.key")?;
        let infos = certs::parse_pem_certificates(crt)
            .map_err(|e| RefError::Invalid(format!("{key} key \"tls.crt\": {e}")))?;
        if !certs::has_private_key(tls_key) {
            return Err(RefError::Invalid(format!(
                "{key} key \"tls.key\" holds no PEM private key"
            )));
        }
        if let Some(leaf) = infos.first()
            && leaf.not_after <= now
        {
            r.expired.push(format!(
                "{key}: client certificate {} expired at {}",
                leaf.subject,
                leaf.not_after_rfc3339()
            ));
        }
        // status lists the leaf (the chain's intermediates are not the user's concern)
        if let Some(leaf) = infos.into_iter().next() {
            r.certificates.push(cert_status(&key, "tls.crt", &leaf));
            r.infos.push((format!("{key} key \"tls.crt\""), leaf));
        }
        let crt_name = pem_file_name(crt);
        let key_name = pem_file_name(tls_key);
        r.client_certificate = Some(gw::CertificateFiles {
            cert_file: PathBuf::from(&crt_name),
            key_file: PathBuf::from(&key_name),
        });
        r.files.insert(crt_name, crt.to_vec());
        r.files.insert(key_name, tls_key.to_vec());
    }
    Ok(r)
}

enum GatewayConnector {
    In(gw::InboundConnector),
    Out(gw::OutboundConnector),
}

/// The connector as the gateway sees it, with material paths from `r` (or none when the
/// references are unresolved: used to validate the spec alone).
fn to_gateway(pc: &PartnerConnector, r: Option<&Resolved>) -> Result<GatewayConnector, String> {
    let name = pc.key();
    let generation = pc.metadata.generation.unwrap_or(0);
    let domains = pc.spec.domains.clone();
    match pc.spec.direction {
        Direction::Inbound => {
            let i = pc
                .spec
                .inbound
                .as_ref()
                .ok_or("spec.inbound is required when spec.direction is Inbound")?;
            let mut ranges = Vec::new();
            for (n, s) in i.sender_ip_ranges.iter().enumerate() {
                let net: IpNet = s.parse().map_err(|_| {
                    format!("spec.inbound.senderIPRanges[{n}]: {s:?} is not a CIDR range")
                })?;
                ranges.push(net);
            }
            Ok(GatewayConnector::In(gw::InboundConnector {
                name,
                generation,
                domains,
                identify_by: match i.identify_by {
                    IdentifyBy::SenderDomain => gw::IdentifyBy::SenderDomain,
                    IdentifyBy::SenderIp => gw::IdentifyBy::SenderIp,
                    IdentifyBy::Certificate => gw::IdentifyBy::Certificate,
                },
                sender_ip_ranges: ranges,
                require_tls: i.require_tls,
                min_tls_version: match i.min_tls_version {
                    MinTlsVersion::Tls12 => gw::MinTlsVersion::Tls12,
                    MinTlsVersion::Tls13 => gw::MinTlsVersion::Tls13,
                },
                certificate: i.certificate.as_ref().map(|c| gw::CertificateRule {
                    subject_name: c.subject_name.clone(),
                    trust_bundle_file: r.and_then(|r| r.trust_bundle_file.clone()),
                }),
                restrict_to_ip_ranges: i.restrict_to_ip_ranges,
                restrict_to_certificate: i.restrict_to_certificate,
                sender_authentication: match i.sender_authentication {
                    SenderAuthentication::None => gw::SenderAuthentication::None,
                    SenderAuthentication::Spf => gw::SenderAuthentication::Spf,
                    SenderAuthentication::Dkim => gw::SenderAuthentication::Dkim,
                    SenderAuthentication::Dmarc => gw::SenderAuthentication::Dmarc,
                },
            }))
        }
        Direction::Outbound => {
            let o = pc
                .spec
                .outbound
                .as_ref()
                .ok_or("spec.outbound is required when spec.direction is Outbound")?;
            Ok(GatewayConnector::Out(gw::OutboundConnector {
                name,
                generation,
                domains,
                smart_hosts: o.smart_hosts.clone(),
                use_mx: o.use_mx,
                tls: match o.tls {
                    OutboundTls::Opportunistic => gw::TlsLevel::Opportunistic,
                    OutboundTls::EncryptionOnly => gw::TlsLevel::EncryptionOnly,
                    OutboundTls::CertificateValidation => gw::TlsLevel::CertificateValidation,
                    OutboundTls::DomainValidation => gw::TlsLevel::DomainValidation,
                },
                tls_domain: o.tls_domain.clone(),
                trust_bundle_file: r.and_then(|r| r.trust_bundle_file.clone()),
                client_certificate: r.and_then(|r| r.client_certificate.clone()),
                dane: policy_mode(o.dane),
                mta_sts: policy_mode(o.mta_sts),
            }))
        }
    }
}

fn policy_mode(m: OutboundPolicyMode) -> gw::PolicyMode {
    match m {
        OutboundPolicyMode::None => gw::PolicyMode::None,
        OutboundPolicyMode::Opportunistic => gw::PolicyMode::Opportunistic,
        OutboundPolicyMode::Mandatory => gw::PolicyMode::Mandatory,
    }
}

/// Validates one connector on its own with the gateway's rules; the first error, if any,
/// with the gateway's field path translated to the CRD's.
fn validate_alone(pc: &PartnerConnector) -> Result<(), String> {
    let file = match to_gateway(pc, None)? {
        GatewayConnector::In(c) => gw::ConnectorsFile {
            inbound: vec![c],
            outbound: vec![],
        },
        GatewayConnector::Out(c) => gw::ConnectorsFile {
            inbound: vec![],
            outbound: vec![c],
        },
    };
    let errors = file.validate();
    if errors.is_empty() {
        return Ok(());
    }
    let msgs: Vec<String> = errors
        .iter()
        .map(|e| {
            let path = e
                .path
                .replacen("inbound[0].domains", "spec.domains", 1)
                .replacen("outbound[0].domains", "spec.domains", 1)
                .replacen("inbound[0].", "spec.inbound.", 1)
                .replacen("outbound[0].", "spec.outbound.", 1);
            format!("{path}: {}", e.message)
        })
        .collect();
    Err(msgs.join("; "))
}

/// The keys a connector claims (section 3 of the design: identical keys conflict).
pub fn claim_keys(pc: &PartnerConnector) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    match pc.spec.direction {
        Direction::Inbound => {
            let Some(i) = &pc.spec.inbound else {
                return keys;
            };
            // Rule 4 (the gateway's `policy::claim`): the restriction guards the partner's
            // domains whatever identifies it. SenderDomain connectors claim their domains by
            // rule 3 already; `*` is not guarded.
            let restricted = i.restrict_to_ip_ranges || i.restrict_to_certificate;
            if restricted && i.identify_by != IdentifyBy::SenderDomain {
                for d in pc.spec.domains.iter().filter(|d| d.as_str() != "*") {
                    keys.insert(format!(
                        "restricted sender domain {}",
                        d.to_ascii_lowercase()
                    ));
                }
            }
            match i.identify_by {
                IdentifyBy::Certificate => {
                    if let Some(c) = &i.certificate {
                        keys.insert(format!(
                            "certificate subjectName {}",
                            c.subject_name.to_ascii_lowercase()
                        ));
                    }
                }
                IdentifyBy::SenderIp => {
                    for r in &i.sender_ip_ranges {
                        // normalise so 203.0.113.7/24 and 203.0.113.0/24 are the same range
                        let norm = r
                            .parse::<IpNet>()
                            .map(|n| n.trunc().to_string())
                            .unwrap_or_else(|_| r.clone());
                        keys.insert(format!("senderIPRange {norm}"));
                    }
                }
                IdentifyBy::SenderDomain => {
                    for d in &pc.spec.domains {
                        keys.insert(format!("inbound sender domain {}", d.to_ascii_lowercase()));
                    }
                }
            }
        }
        Direction::Outbound => {
            for d in &pc.spec.domains {
                keys.insert(format!(
                    "outbound recipient domain {}",
                    d.to_ascii_lowercase()
                ));
            }
        }
    }
    keys
}

fn age_order(pc: &PartnerConnector) -> impl Ord {
    let ts = pc.metadata.creation_timestamp.clone();
    (
        ts.is_none(),
        ts,
        pc.metadata.namespace.clone().unwrap_or_default(),
        pc.metadata.name.clone().unwrap_or_default(),
    )
}

/// Renders the connector set. Deterministic: the same input gives the same bytes, whatever
/// the order of `connectors`.
/// `connectors` may be the objects or what points at them (the controller passes its store's
/// `Arc`s: no copy of every connector per render).
pub fn render<C: Borrow<PartnerConnector>>(
    connectors: &[C],
    objects: &Objects,
    now: OffsetDateTime,
) -> Rendered {
    render_within(connectors, objects, now, MAX_CONNECTORS_FILE_BYTES)
}

/// [`render`] with the largest file allowed as a parameter (tests use a small one).
pub fn render_within<C: Borrow<PartnerConnector>>(
    connectors: &[C],
    objects: &Objects,
    now: OffsetDateTime,
    max_bytes: usize,
) -> Rendered {
    render_with_limits(connectors, objects, now, max_bytes, MAX_MATERIAL_BYTES)
}

/// [`render`] with both limits as parameters.
pub fn render_with_limits<C: Borrow<PartnerConnector>>(
    connectors: &[C],
    objects: &Objects,
    now: OffsetDateTime,
    max_bytes: usize,
    max_material: usize,
) -> Rendered {
    let mut sorted: Vec<&PartnerConnector> = connectors.iter().map(Borrow::borrow).collect();
    sorted.sort_by_cached_key(|pc| age_order(pc));

    let mut outcomes = BTreeMap::new();
    let mut claimed: BTreeMap<String, String> = BTreeMap::new();
    let mut file = gw::ConnectorsFile::default();
    // Included connectors in age order, with their material files.
    let mut by_age: Vec<(String, BTreeMap<String, Vec<u8>>)> = Vec::new();

    for pc in sorted {
        let name = pc.key();
        let mut outcome = Outcome {
            acceptance: Acceptance::Accepted,
            resolution: Resolution::Resolved,
            included: false,
            certificates: vec![],
            expiring: vec![],
            left_out: None,
        };

        // References are resolved for every connector, so status.certificates is useful even
        // on a disabled or conflicted one.
        let resolved = resolve(pc, objects, now);
        match &resolved {
            Ok(r) => {
                outcome.certificates = r.certificates.clone();
                let infos: Vec<CertInfo> = r.infos.iter().map(|(_, c)| c.clone()).collect();
                for c in certs::expiring_within(&infos, now, EXPIRY_WARNING_DAYS) {
                    if let Some((place, _)) = r.infos.iter().find(|(_, i)| i == c) {
                        outcome.expiring.push(format!(
                            "{place}: certificate {} expires at {}",
                            c.subject,
                            c.not_after_rfc3339()
                        ));
                    }
                }
                if !r.expired.is_empty() {
                    outcome.resolution = Resolution::Expired(r.expired.join("; "));
                }
            }
            Err(RefError::NotFound(m)) => outcome.resolution = Resolution::NotFound(m.clone()),
            Err(RefError::Invalid(m)) => {
                outcome.resolution = Resolution::InvalidCertificate(m.clone())
            }
        }

        if !pc.spec.enabled {
            outcome.acceptance = Acceptance::Disabled;
        } else if let Err(m) = validate_alone(pc) {
            outcome.acceptance = Acceptance::Invalid(m);
        } else {
            let keys = claim_keys(pc);
            if let Some((key, winner)) = keys
                .iter()
                .find_map(|k| claimed.get(k).map(|w| (k.clone(), w.clone())))
            {
                outcome.acceptance = Acceptance::Conflicted { winner, key };
            } else {
                for k in keys {
                    claimed.insert(k, name.clone());
                }
            }
        }

        if outcome.acceptance == Acceptance::Accepted
            && let Ok(r) = &resolved
            && let Ok(gc) = to_gateway(pc, Some(r))
        {
            match gc {
                GatewayConnector::In(c) => file.inbound.push(c),
                GatewayConnector::Out(c) => file.outbound.push(c),
            }
            by_age.push((name.clone(), r.files.clone()));
            outcome.included = true;
        }
        outcomes.insert(name, outcome);
    }

    file.inbound.sort_by(|a, b| a.name.cmp(&b.name));
    file.outbound.sort_by(|a, b| a.name.cmp(&b.name));

    // Belt and braces: each connector passed validation alone; if the whole set does not
    // (it cannot today: names are unique), drop the offenders rather than ship a file the
    // gateway would refuse.
    let errors = file.validate();
    if !errors.is_empty() {
        let mut bad = BTreeSet::new();
        for e in &errors {
            let idx = |p: &str| {
                e.path
                    .strip_prefix(p)
                    .and_then(|rest| rest.split(']').next())
                    .and_then(|n| n.parse::<usize>().ok())
            };
            if let Some(i) = idx("inbound[") {
                if let Some(c) = file.inbound.get(i) {
                    bad.insert(c.name.clone());
                }
            } else if let Some(i) = idx("outbound[")
                && let Some(c) = file.outbound.get(i)
            {
                bad.insert(c.name.clone());
            }
        }
        file.inbound.retain(|c| !bad.contains(&c.name));
        file.outbound.retain(|c| !bad.contains(&c.name));
        for name in bad {
            if let Some(o) = outcomes.get_mut(&name) {
                o.included = false;
                o.acceptance =
                    Acceptance::Invalid("refused by the gateway's config validation".into());
            }
        }
    }

    let over_limit = fit(&mut file, &by_age, &mut outcomes, max_bytes, max_material);
    let mut material = BTreeMap::new();
    for (name, files) in &by_age {
        if outcomes.get(name).is_some_and(|o| o.included) {
            material.extend(files.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
    }

    let mut connectors_json = serde_json::to_vec(&file).unwrap_or_default();
    connectors_json.push(b'\n');
    let hash = sha256_hex(&connectors_json);
    Rendered {
        connectors_json,
        hash,
        material,
        outcomes,
        over_limit,
    }
}

/// Keeps the connectors file within `max_bytes` and the material within `max_material`: the
/// included connectors are taken oldest first (`by_age`), each kept when its entry and the
/// material files it adds (files are content-addressed, so shared ones count once) still fit;
/// the others are left out with a message. Returns the limits that left some out.
fn fit(
    file: &mut gw::ConnectorsFile,
    by_age: &[(String, BTreeMap<String, Vec<u8>>)],
    outcomes: &mut BTreeMap<String, Outcome>,
    max_bytes: usize,
    max_material: usize,
) -> Vec<Limit> {
    // Compact JSON: the frame, each connector and a comma before all but the first of each
    // list (counted for every one: an upper bound), and the trailing newline.
    const FRAME: usize = r#"{"inbound":[],"outbound":[]}"#.len() + 1;
    let mut sizes: BTreeMap<&str, usize> = BTreeMap::new();
    for c in &file.inbound {
        sizes.insert(
            &c.name,
            serde_json::to_vec(c).map_or(usize::MAX / 4, |v| v.len()) + 1,
        );
    }
    for c in &file.outbound {
        sizes.insert(
            &c.name,
            serde_json::to_vec(c).map_or(usize::MAX / 4, |v| v.len()) + 1,
        );
    }
    // dropped by the whole-file validation: neither in the file nor in the material
    let candidates: Vec<(&str, usize, &Files)> = by_age
        .iter()
        .filter_map(|(name, files)| sizes.get(name.as_str()).map(|&s| (name.as_str(), s, files)))
        .collect();
    let needed = FRAME + sizes.values().sum::<usize>();
    let needed_material = {
        let mut all = BTreeMap::new();
        for (_, _, files) in &candidates {
            all.extend(files.iter().map(|(k, v)| (k.as_str(), v.len())));
        }
        all.iter().map(|(k, v)| k.len() + v).sum::<usize>()
    };
    if needed <= max_bytes && needed_material <= max_material {
        return vec![];
    }
    let (mut used, mut used_material) = (FRAME, 0);
    let mut kept_files: BTreeSet<&str> = BTreeSet::new();
    // name → (its entry's size, the material it would add, which limit it did not fit)
    let mut left_out: BTreeMap<String, (usize, usize, Limit)> = BTreeMap::new();
    for &(name, size, files) in &candidates {
        let adds: usize = files
            .iter()
            .filter(|(k, _)| !kept_files.contains(k.as_str()))
            .map(|(k, v)| k.len() + v.len())
            .sum();
        if used + size > max_bytes {
            left_out.insert(name.to_string(), (size, adds, Limit::ConnectorsFile));
        } else if used_material + adds > max_material {
            left_out.insert(name.to_string(), (size, adds, Limit::Material));
        } else {
            used += size;
            used_material += adds;
            kept_files.extend(files.keys().map(String::as_str));
        }
    }
    let (kept, total) = (candidates.len() - left_out.len(), candidates.len());
    file.inbound.retain(|c| !left_out.contains_key(&c.name));
    file.outbound.retain(|c| !left_out.contains_key(&c.name));
    let mut hit = vec![];
    for (name, (size, adds, limit)) in left_out {
        if !hit.contains(&limit) {
            hit.push(limit);
        }
        if let Some(o) = outcomes.get_mut(&name) {
            o.included = false;
            o.left_out = Some(match limit {
                Limit::ConnectorsFile => format!(
                    "the gateway's connectors file would be {needed} bytes with every accepted \
                     connector, over the {max_bytes}-byte limit (a ConfigMap holds at most \
                     {CONFIGMAP_DATA_LIMIT} bytes); the oldest {kept} of {total} connectors are \
                     served and this one ({size} bytes) is left out until older ones are removed"
                ),
                Limit::Material => format!(
                    "{MATERIAL_LEFT_OUT} would hold {needed_material} bytes of \
                     certificates and keys with every accepted connector, over the \
                     {max_material}-byte limit (a Secret holds at most {SECRET_DATA_LIMIT} \
                     bytes); the oldest {kept} of {total} connectors are served and this one \
                     ({adds} bytes of material) is left out until older ones are removed"
                ),
            });
        }
    }
    hit.sort_by_key(|l| *l as u8);
    hit
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::testing::self_signed;
    use crate::fixtures::{connector, inbound_cert, inbound_ip, outbound};
    use time::Duration;

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
    }

    fn objects_with_ca(ns: &str, name: &str, key: &str, pem: &str) -> Objects {
        let mut o = Objects::new();
        o.insert(
            ObjectKey::secret(ns, name),
            BTreeMap::from([(key.to_string(), pem.as_bytes().to_vec())]),
        );
        o
    }

    #[test]
    fn renders_inbound_with_trust_bundle() {
        let (ca, _) = self_signed(
            "Contoso CA",
            now() - Duration::days(10),
            now() + Duration::days(365),
        );
        let pc = inbound_cert("mail", "contoso", 1, "mail.contoso.com", Some("contoso-ca"));
        let objects = objects_with_ca("mail", "contoso-ca", "ca.crt", &ca);
        let r = render(std::slice::from_ref(&pc), &objects, now());
        let o = &r.outcomes["mail/contoso"];
        assert_eq!(o.acceptance, Acceptance::Accepted);
        assert_eq!(o.resolution, Resolution::Resolved);
        assert!(o.included);
        assert_eq!(o.certificates.len(), 1);
        assert_eq!(o.certificates[0].secret, "contoso-ca");
        assert_eq!(o.certificates[0].subject, "CN=Contoso CA");
        let file: gw::ConnectorsFile = serde_json::from_slice(&r.connectors_json).unwrap();
        assert!(file.validate().is_empty());
        assert_eq!(file.inbound.len(), 1);
        let pem_name = pem_file_name(ca.as_bytes());
        assert_eq!(pem_name.len(), 16 + 4);
        assert_eq!(
            file.inbound[0]
                .certificate
                .as_ref()
                .unwrap()
                .trust_bundle_file,
            Some(PathBuf::from(&pem_name))
        );
        assert_eq!(r.material[&pem_name], ca.as_bytes());
        assert_eq!(r.hash, sha256_hex(&r.connectors_json));
        assert_eq!(file.inbound[0].generation, 1);
        assert_eq!(file.inbound[0].name, "mail/contoso");
    }

    #[test]
    fn deterministic_whatever_the_order() {
        let a = inbound_ip("mail", "a", 1, &["203.0.113.0/24"]);
        let b = outbound("mail", "b", 2, &["fabrikam.com"], &["smtp.fabrikam.com:25"]);
        let c = connector("other", "c", 1, &["contoso.com"]);
        let r1 = render(&[a.clone(), b.clone(), c.clone()], &Objects::new(), now());
        let r2 = render(&[c, b, a], &Objects::new(), now());
        assert_eq!(r1, r2);
        let file: gw::ConnectorsFile = serde_json::from_slice(&r1.connectors_json).unwrap();
        assert_eq!(file.inbound.len(), 2);
        assert_eq!(file.outbound.len(), 1);
        // an empty set renders too
        let empty = render::<PartnerConnector>(&[], &Objects::new(), now());
        assert_eq!(
            serde_json::from_slice::<gw::ConnectorsFile>(&empty.connectors_json).unwrap(),
            gw::ConnectorsFile::default()
        );
    }

    #[test]
    fn renders_sender_authentication() {
        let mut a = connector("mail", "a", 1, &["contoso.com"]);
        if let Some(i) = a.spec.inbound.as_mut() {
            i.sender_authentication = SenderAuthentication::Dmarc;
        }
        let b = connector("mail", "b", 1, &["fabrikam.com"]);
        let r = render(&[a, b], &Objects::new(), now());
        let file: gw::ConnectorsFile = serde_json::from_slice(&r.connectors_json).unwrap();
        let auth = |name: &str| {
            file.inbound
                .iter()
                .find(|c| c.name == name)
                .map(|c| c.sender_authentication)
        };
        assert_eq!(auth("mail/a"), Some(gw::SenderAuthentication::Dmarc));
        assert_eq!(auth("mail/b"), Some(gw::SenderAuthentication::None));
    }

    #[test]
    fn hash_changes_with_generation() {
        let a1 = connector("mail", "a", 1, &["contoso.com"]);
        let a2 = connector("mail", "a", 2, &["contoso.com"]);
        assert_ne!(
            render(&[a1], &Objects::new(), now()).hash,
            render(&[a2], &Objects::new(), now()).hash
        );
    }

    #[test]
    fn conflicts_keep_the_oldest() {
        let mut old = connector("mail", "old", 1, &["contoso.com", "*.contoso.com"]);
        let mut young = connector("aaa", "young", 1, &["contoso.com"]);
        crate::fixtures::created(&mut old, 1000);
        crate::fixtures::created(&mut young, 2000);
        let r = render(&[young.clone(), old.clone()], &Objects::new(), now());
        assert_eq!(r.outcomes["mail/old"].acceptance, Acceptance::Accepted);
        match &r.outcomes["aaa/young"].acceptance {
            Acceptance::Conflicted { winner, key } => {
                assert_eq!(winner, "mail/old");
                assert!(key.contains("contoso.com"), "{key}");
            }
            other => panic!("{other:?}"),
        }
        assert!(!r.outcomes["aaa/young"].included);

        // same timestamp: namespace/name decides
        crate::fixtures::created(&mut young, 1000);
        let r = render(&[old, young], &Objects::new(), now());
        assert_eq!(r.outcomes["aaa/young"].acceptance, Acceptance::Accepted);
        assert!(matches!(
            r.outcomes["mail/old"].acceptance,
            Acceptance::Conflicted { .. }
        ));
    }

    #[test]
    fn conflict_keys_per_identification() {
        // same IP range written differently
        let mut a = inbound_ip("mail", "a", 1, &["203.0.113.0/24"]);
        let mut b = inbound_ip("mail", "b", 1, &["203.0.113.9/24", "198.51.100.0/24"]);
        crate::fixtures::created(&mut a, 1);
        crate::fixtures::created(&mut b, 2);
        let r = render(&[a.clone(), b], &Objects::new(), now());
        assert!(matches!(
            r.outcomes["mail/b"].acceptance,
            Acceptance::Conflicted { .. }
        ));
        // overlapping but not identical ranges don't conflict (longest prefix wins)
        let mut c = inbound_ip("mail", "c", 1, &["203.0.113.0/25"]);
        crate::fixtures::created(&mut c, 3);
        let r = render(&[a.clone(), c], &Objects::new(), now());
        assert_eq!(r.outcomes["mail/c"].acceptance, Acceptance::Accepted);
        // SenderIP connector and SenderDomain connector with the same domains don't conflict
        let d = connector("mail", "d", 1, &["example.com"]);
        let r = render(&[a, d], &Objects::new(), now());
        assert_eq!(r.outcomes["mail/d"].acceptance, Acceptance::Accepted);
        // same certificate subject, case-insensitively
        let mut e = inbound_cert("mail", "e", 1, "mail.contoso.com", None);
        let mut f = inbound_cert("mail", "f", 1, "MAIL.contoso.com", None);
        crate::fixtures::created(&mut e, 1);
        crate::fixtures::created(&mut f, 2);
        let r = render(&[e, f], &Objects::new(), now());
        assert!(matches!(
            r.outcomes["mail/f"].acceptance,
            Acceptance::Conflicted { .. }
        ));
        // inbound and outbound for the same domain don't conflict
        let g = connector("mail", "g", 1, &["fabrikam.com"]);
        let h = outbound("mail", "h", 1, &["fabrikam.com"], &["smtp.fabrikam.com"]);
        let r = render(&[g, h], &Objects::new(), now());
        assert!(r.outcomes.values().all(|o| o.included));
        // two outbound for the same recipient domain do
        let mut i = outbound("mail", "i", 1, &["fabrikam.com"], &["a.fabrikam.com"]);
        let mut j = outbound("mail", "j", 1, &["FABRIKAM.com"], &["b.fabrikam.com"]);
        crate::fixtures::created(&mut i, 1);
        crate::fixtures::created(&mut j, 2);
        let r = render(&[i, j], &Objects::new(), now());
        assert!(matches!(
            r.outcomes["mail/j"].acceptance,
            Acceptance::Conflicted { .. }
        ));
    }

    /// Rule 4 keys: two connectors whose restrictions guard the same sender domain conflict,
    /// the oldest keeps it (ARCHITECTURE section 3).
    #[test]
    fn restricted_domains_conflict_keep_the_oldest() {
        let restricted = |name: &str, ranges: &[&str], domains: &[&str], created: i64| {
            let mut pc = inbound_ip("mail", name, 1, ranges);
            pc.spec.domains = domains.iter().map(|d| d.to_string()).collect();
            if let Some(i) = pc.spec.inbound.as_mut() {
                i.restrict_to_ip_ranges = true;
            }
            crate::fixtures::created(&mut pc, created);
            pc
        };
        let old = restricted("old", &["127.0.77.0/24"], &["tailspin.test"], 1);
        let young = restricted(
            "young",
            &["192.0.2.0/24"],
            &["Tailspin.test", "other.test"],
            2,
        );
        let r = render(&[young.clone(), old.clone()], &Objects::new(), now());
        assert_eq!(r.outcomes["mail/old"].acceptance, Acceptance::Accepted);
        match &r.outcomes["mail/young"].acceptance {
            Acceptance::Conflicted { winner, key } => {
                assert_eq!(winner, "mail/old");
                assert_eq!(key, "restricted sender domain tailspin.test");
            }
            other => panic!("{other:?}"),
        }
        assert!(!r.outcomes["mail/young"].included);
        // Same creationTimestamp: namespace/name decides, whatever the input order.
        let twin = restricted("aaa", &["198.51.100.0/24"], &["tailspin.test"], 1);
        for set in [[old.clone(), twin.clone()], [twin.clone(), old.clone()]] {
            let r = render(&set, &Objects::new(), now());
            assert_eq!(r.outcomes["mail/aaa"].acceptance, Acceptance::Accepted);
            assert!(matches!(
                r.outcomes["mail/old"].acceptance,
                Acceptance::Conflicted { .. }
            ));
        }
        // restrictToCertificate guards too, for a Certificate connector.
        let mut cert = inbound_cert("mail", "cert", 1, "mail.tailspin.test", None);
        cert.spec.domains = vec!["tailspin.test".into()];
        if let Some(i) = cert.spec.inbound.as_mut() {
            i.restrict_to_certificate = true;
        }
        crate::fixtures::created(&mut cert, 3);
        let r = render(&[old.clone(), cert.clone()], &Objects::new(), now());
        assert!(matches!(
            r.outcomes["mail/cert"].acceptance,
            Acceptance::Conflicted { .. }
        ));
        // No conflict: different domains, `*`, an unrestricted connector, or a SenderDomain
        // connector (rule 3 outranks rule 4, so there is nothing ambiguous).
        let other = restricted("other", &["192.0.2.0/24"], &["other.test"], 4);
        let star1 = restricted("star1", &["203.0.113.0/25"], &["*"], 5);
        let star2 = restricted("star2", &["203.0.113.128/25"], &["*"], 6);
        let mut plain = inbound_ip("mail", "plain", 1, &["198.51.100.0/25"]);
        plain.spec.domains = vec!["tailspin.test".into()];
        if let Some(i) = plain.spec.inbound.as_mut() {
            i.restrict_to_ip_ranges = false;
        }
        crate::fixtures::created(&mut plain, 7);
        let mut by_domain = connector("mail", "by-domain", 1, &["tailspin.test"]);
        if let Some(i) = by_domain.spec.inbound.as_mut() {
            i.restrict_to_ip_ranges = true;
            i.sender_ip_ranges = vec!["198.51.100.128/25".into()];
        }
        crate::fixtures::created(&mut by_domain, 8);
        let r = render(
            &[old, other, star1, star2, plain, by_domain],
            &Objects::new(),
            now(),
        );
        for (name, o) in &r.outcomes {
            assert_eq!(o.acceptance, Acceptance::Accepted, "{name}");
        }
    }

    /// The connectors of tests/bench/operator.sh (gen-objects.py): Inbound, SenderDomain,
    /// requireTls, one domain each, created one second apart.
    fn bench_connectors(n: usize) -> Vec<PartnerConnector> {
        (0..n)
            .map(|i| {
                let name = format!("p{i:04}");
                let mut pc = connector("partners", &name, 1, &[&format!("{name}.test")]);
                crate::fixtures::created(&mut pc, 1_700_000_000 + i as i64);
                pc
            })
            .collect()
    }

    /// Issue 17: past ~2,800 such connectors the pretty file with every default (~374 bytes
    /// each) no longer fit a ConfigMap; the compact file holds 10,000 of them.
    #[test]
    fn ten_thousand_bench_connectors_fit_one_configmap() {
        let n = 10_000;
        let r = render(&bench_connectors(n), &Objects::new(), now());
        let per = r.connectors_json.len() / n;
        eprintln!(
            "{n} bench connectors: connectors.json {} bytes, {per} bytes per connector",
            r.connectors_json.len()
        );
        assert!(
            r.outcomes
                .values()
                .all(|o| o.included && o.left_out.is_none())
        );
        assert!(r.connectors_json.len() <= MAX_CONNECTORS_FILE_BYTES);
        assert!(per <= 80, "{per} bytes per connector");
        let file: gw::ConnectorsFile = serde_json::from_slice(&r.connectors_json).unwrap();
        assert_eq!(file.inbound.len(), n);
        assert!(file.inbound[0].require_tls);
        assert_eq!(file.inbound[0].generation, 1);
        assert_eq!(r.hash, sha256_hex(&r.connectors_json));
    }

    /// Issue 17: when the file cannot hold every connector, the oldest are served, the others
    /// are left out saying why (sizes, limit), and the file stays within the limit. Connectors
    /// left out for other reasons take no room.
    #[test]
    fn over_the_limit_the_oldest_are_served_and_the_rest_say_why() {
        let mut pcs = bench_connectors(20);
        // an older connector that loses a conflict and a disabled one use no room
        let mut conflicted = connector("partners", "z-dup", 1, &["p0000.test"]);
        crate::fixtures::created(&mut conflicted, 1_600_000_000);
        let mut disabled = connector("partners", "z-off", 1, &["off.test"]);
        disabled.spec.enabled = false;
        crate::fixtures::created(&mut disabled, 1_600_000_000);
        pcs.push(conflicted);
        pcs.push(disabled);
        let all = render(&pcs, &Objects::new(), now());
        assert!(
            all.outcomes["partners/z-dup"].included,
            "older: keeps the domain"
        );
        let one = all.connectors_json.len() / 20;
        let limit = one * 12;
        let r = render_within(&pcs, &Objects::new(), now(), limit);
        assert!(
            r.connectors_json.len() <= limit,
            "{} > {limit}",
            r.connectors_json.len()
        );
        let file: gw::ConnectorsFile = serde_json::from_slice(&r.connectors_json).unwrap();
        let kept: Vec<&str> = file.inbound.iter().map(|c| c.name.as_str()).collect();
        assert!(kept.len() >= 9 && kept.len() < 20, "{kept:?}");
        // the oldest (z-dup, then p0001, p0002, ...: p0000 lost its domain to z-dup) are kept
        let mut want = vec!["partners/z-dup".to_string()];
        want.extend((1..kept.len()).map(|i| format!("partners/p{i:04}")));
        want.sort();
        assert_eq!(kept, want);
        for (name, o) in &r.outcomes {
            if name == "partners/z-off" || name == "partners/p0000" {
                assert_ne!(o.acceptance, Acceptance::Accepted, "{name}");
                assert!(!o.included && o.left_out.is_none(), "{name}");
            } else if kept.contains(&name.as_str()) {
                assert!(o.included && o.left_out.is_none(), "{name}");
            } else {
                assert_eq!(o.acceptance, Acceptance::Accepted, "{name}");
                assert!(!o.included, "{name}");
                let m = o.left_out.as_deref().unwrap_or_default();
                assert!(m.contains(&format!("over the {limit}-byte limit")), "{m}");
                assert!(m.contains("1048576 bytes"), "{m}");
                assert!(
                    m.contains(&format!("the oldest {} of 20", kept.len())),
                    "{m}"
                );
            }
        }
        // deterministic whatever the input order
        pcs.reverse();
        assert_eq!(render_within(&pcs, &Objects::new(), now(), limit), r);
    }

    /// The TLS material Secret is bound by the API server's 1 MiB like the ConfigMap: 80
    /// connectors with a 17 KiB trust bundle each (1.3 MiB) get the oldest served and the others
    /// left out saying why, not a Secret the API server refuses (which left every later change
    /// unserved). Written to compile against the render before the guard, to fail there.
    #[test]
    fn material_over_the_secret_limit_keeps_the_oldest_and_the_rest_say_why() {
        let valid =
            |cn: &str| self_signed(cn, now() - Duration::days(1), now() + Duration::days(365)).0;
        let filler = valid("Filler CA").repeat(30);
        let mut objects = Objects::new();
        let mut pcs = vec![];
        for i in 0..80 {
            let name = format!("p{i:02}");
            let secret = format!("{name}-ca");
            let mut pc = inbound_cert(
                "partners",
                &name,
                1,
                &format!("mail.{name}.test"),
                Some(&secret),
            );
            pc.spec.domains = vec![format!("{name}.test")];
            crate::fixtures::created(&mut pc, 1_700_000_000 + i);
            let bundle = format!("{}{filler}", valid(&format!("Partner {i} CA")));
            objects.insert(
                ObjectKey::secret("partners", &secret),
                BTreeMap::from([("ca.crt".to_string(), bundle.into_bytes())]),
            );
            pcs.push(pc);
        }
        let r = render(&pcs, &objects, now());
        let size: usize = r.material.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(
            size <= 1024 * 1024,
            "material of {size} bytes is over a Secret's 1 MiB"
        );

        let file: gw::ConnectorsFile = serde_json::from_slice(&r.connectors_json).unwrap();
        let served: Vec<&str> = file.inbound.iter().map(|c| c.name.as_str()).collect();
        assert!(served.len() >= 40 && served.len() < 80, "{served:?}");
        // p00, p01, ... are the oldest: the first ones are served, every one with its file
        for (i, (name, o)) in r.outcomes.iter().enumerate() {
            if i < served.len() {
                assert_eq!(served[i], name);
                assert!(o.included && o.left_out.is_none(), "{name}");
                let bundle = file.inbound[i]
                    .certificate
                    .as_ref()
                    .unwrap()
                    .trust_bundle_file
                    .as_ref();
                let bundle = bundle.unwrap().to_str().unwrap();
                assert!(r.material.contains_key(bundle), "{name}: {bundle} missing");
            } else {
                assert_eq!(o.acceptance, Acceptance::Accepted, "{name}");
                assert!(!o.included, "{name}");
                let m = o.left_out.as_deref().unwrap_or_default();
                assert!(m.contains("TLS material Secret"), "{name}: {m:?}");
                assert!(m.contains("1048576 bytes"), "{m}");
                assert!(
                    m.contains(&format!("the oldest {} of 80", served.len())),
                    "{m}"
                );
            }
        }
        // deterministic whatever the input order
        pcs.reverse();
        assert_eq!(render(&pcs, &objects, now()), r);
    }

    /// Both limits at once: each connector is kept only when it fits both, and over_limit
    /// names the limits that left some out.
    #[test]
    fn over_limit_names_the_limits_that_left_connectors_out() {
        let pcs = bench_connectors(5);
        let r = render(&pcs, &Objects::new(), now());
        assert!(r.over_limit.is_empty());
        let r = render_within(&pcs, &Objects::new(), now(), r.connectors_json.len() - 10);
        assert_eq!(r.over_limit, [Limit::ConnectorsFile]);
        let (ca, _) = self_signed(
            "Partner CA",
            now() - Duration::days(1),
            now() + Duration::days(365),
        );
        let pc = inbound_cert("mail", "contoso", 1, "mail.contoso.com", Some("contoso-ca"));
        let objects = objects_with_ca("mail", "contoso-ca", "ca.crt", &ca);
        let r = render_with_limits(
            std::slice::from_ref(&pc),
            &objects,
            now(),
            MAX_CONNECTORS_FILE_BYTES,
            ca.len(),
        );
        assert_eq!(r.over_limit, [Limit::Material], "the key counts too");
        assert!(r.material.is_empty());
        let r = render_with_limits(
            std::slice::from_ref(&pc),
            &objects,
            now(),
            MAX_CONNECTORS_FILE_BYTES,
            ca.len() + 20,
        );
        assert!(r.over_limit.is_empty() && r.outcomes["mail/contoso"].included);
    }

    #[test]
    fn disabled_is_left_out_and_claims_nothing() {
        let mut old = connector("mail", "old", 1, &["contoso.com"]);
        old.spec.enabled = false;
        let mut young = connector("mail", "young", 1, &["contoso.com"]);
        crate::fixtures::created(&mut old, 1);
        crate::fixtures::created(&mut young, 2);
        let r = render(&[old, young], &Objects::new(), now());
        assert_eq!(r.outcomes["mail/old"].acceptance, Acceptance::Disabled);
        assert!(!r.outcomes["mail/old"].included);
        assert!(r.outcomes["mail/young"].included);
    }

    #[test]
    fn invalid_is_left_out_without_breaking_others() {
        // what CEL would refuse, should it get past (e.g. CRD installed without validation)
        let mut bad = inbound_ip("mail", "bad", 1, &["not-a-cidr"]);
        bad.spec.domains = vec!["bad domain".into()];
        let mut bad2 = connector("mail", "bad2", 1, &["contoso.com"]);
        bad2.spec.inbound = None;
        let good = connector("mail", "good", 1, &["fabrikam.com"]);
        let r = render(&[bad, bad2, good], &Objects::new(), now());
        match &r.outcomes["mail/bad"].acceptance {
            Acceptance::Invalid(m) => assert!(m.contains("spec.inbound.senderIPRanges[0]"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            r.outcomes["mail/bad2"].acceptance,
            Acceptance::Invalid(_)
        ));
        assert!(r.outcomes["mail/good"].included);
        let file: gw::ConnectorsFile = serde_json::from_slice(&r.connectors_json).unwrap();
        assert_eq!(file.inbound.len(), 1);
    }

    #[test]
    fn invalid_domain_names_the_field() {
        let mut bad = connector("mail", "bad", 1, &["ok.com"]);
        bad.spec.domains.push("a_b.com".into());
        let r = render(&[bad], &Objects::new(), now());
        match &r.outcomes["mail/bad"].acceptance {
            Acceptance::Invalid(m) => assert!(m.starts_with("spec.domains[1]"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn missing_and_invalid_refs() {
        let pc = inbound_cert("mail", "c", 1, "mail.contoso.com", Some("contoso-ca"));
        let r = render(std::slice::from_ref(&pc), &Objects::new(), now());
        let o = &r.outcomes["mail/c"];
        assert_eq!(o.acceptance, Acceptance::Accepted);
        assert!(
            matches!(&o.resolution, Resolution::NotFound(m) if m.contains("Secret mail/contoso-ca not found"))
        );
        assert!(!o.included);

        let objects = objects_with_ca("mail", "contoso-ca", "other", "x");
        let r = render(std::slice::from_ref(&pc), &objects, now());
        assert!(
            matches!(&r.outcomes["mail/c"].resolution, Resolution::NotFound(m) if m.contains("no key \"ca.crt\""))
        );

        let objects = objects_with_ca("mail", "contoso-ca", "ca.crt", "garbage");
        let r = render(std::slice::from_ref(&pc), &objects, now());
        assert!(matches!(
            &r.outcomes["mail/c"].resolution,
            Resolution::InvalidCertificate(_)
        ));
        assert!(!r.outcomes["mail/c"].included);
    }

    #[test]
    fn expired_and_expiring() {
        let pc = inbound_cert("mail", "c", 1, "mail.contoso.com", Some("contoso-ca"));
        let (old, _) = self_signed(
            "Old CA",
            now() - Duration::days(400),
            now() - Duration::days(1),
        );
        let r = render(
            std::slice::from_ref(&pc),
            &objects_with_ca("mail", "contoso-ca", "ca.crt", &old),
            now(),
        );
        let o = &r.outcomes["mail/c"];
        assert!(matches!(o.resolution, Resolution::Expired(_)));
        assert!(o.included, "expired material keeps the rules enforced");

        let (soon, _) = self_signed(
            "Soon CA",
            now() - Duration::days(400),
            now() + Duration::days(3),
        );
        let bundle = format!("{old}{soon}");
        let r = render(
            std::slice::from_ref(&pc),
            &objects_with_ca("mail", "contoso-ca", "ca.crt", &bundle),
            now(),
        );
        let o = &r.outcomes["mail/c"];
        assert_eq!(
            o.resolution,
            Resolution::Resolved,
            "one CA in the bundle is in date"
        );
        assert_eq!(o.certificates.len(), 2);
        assert_eq!(o.expiring.len(), 1);
        assert!(o.expiring[0].contains("CN=Soon CA"));
    }

    /// Issue 15: dane/mtaSts reach the gateway's connectors file; an IP-literal smart host
    /// with DANE is refused by the gateway's own rules (Accepted=False, Invalid) when a CRD
    /// without CEL lets it through.
    #[test]
    fn outbound_tls_policy_modes_are_rendered_and_checked() {
        let mut ok = outbound("mail", "fab", 1, &["fabrikam.com"], &["smtp.fabrikam.com"]);
        if let Some(o) = ok.spec.outbound.as_mut() {
            o.dane = partnergate_crds::OutboundPolicyMode::Mandatory;
        }
        let mut mx = outbound("mail", "adatum", 1, &["adatum.com"], &[]);
        if let Some(o) = mx.spec.outbound.as_mut() {
            o.use_mx = true;
            o.mta_sts = partnergate_crds::OutboundPolicyMode::Opportunistic;
        }
        let mut bad = outbound("mail", "litware", 1, &["litware.com"], &["[192.0.2.10]:25"]);
        if let Some(o) = bad.spec.outbound.as_mut() {
            o.dane = partnergate_crds::OutboundPolicyMode::Opportunistic;
        }
        let r = render(&[ok, mx, bad], &Objects::new(), now());
        let file: gw::ConnectorsFile = serde_json::from_slice(&r.connectors_json).unwrap();
        let names: Vec<&str> = file.outbound.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["mail/adatum", "mail/fab"]);
        assert_eq!(file.outbound[0].mta_sts, gw::PolicyMode::Opportunistic);
        assert_eq!(file.outbound[0].dane, gw::PolicyMode::None);
        assert_eq!(file.outbound[1].dane, gw::PolicyMode::Mandatory);
        let msg = format!("{:?}", r.outcomes["mail/litware"]);
        assert!(msg.contains("spec.outbound.smartHosts[0]"), "{msg}");
    }

    #[test]
    fn outbound_client_certificate() {
        let (crt, key) = self_signed(
            "relay.example.org",
            now() - Duration::days(1),
            now() + Duration::days(90),
        );
        let mut pc = outbound("mail", "fab", 4, &["fabrikam.com"], &["smtp.fabrikam.com"]);
        if let Some(o) = pc.spec.outbound.as_mut() {
            o.client_certificate = Some(partnergate_crds::ClientCertificate {
                secret_ref: partnergate_crds::SecretName {
                    name: "client-tls".into(),
                },
            });
        }
        let mut objects = Objects::new();
        objects.insert(
            ObjectKey::secret("mail", "client-tls"),
            BTreeMap::from([
                ("tls.crt".to_string(), crt.as_bytes().to_vec()),
                ("tls.key".to_string(), key.as_bytes().to_vec()),
            ]),
        );
        let r = render(std::slice::from_ref(&pc), &objects, now());
        let file: gw::ConnectorsFile = serde_json::from_slice(&r.connectors_json).unwrap();
        let cc = file.outbound[0].client_certificate.as_ref().unwrap();
        assert_eq!(r.material[cc.cert_file.to_str().unwrap()], crt.as_bytes());
        assert_eq!(r.material[cc.key_file.to_str().unwrap()], key.as_bytes());
        assert_eq!(
            r.outcomes["mail/fab"].certificates[0].subject,
            "CN=relay.example.org"
        );
        assert_eq!(
            references(&pc),
            vec![ObjectKey::secret("mail", "client-tls")]
        );
        // key missing
        objects.values_mut().for_each(|d| {
            d.remove("tls.key");
        });
        let r = render(std::slice::from_ref(&pc), &objects, now());
        assert!(matches!(
            r.outcomes["mail/fab"].resolution,
            Resolution::NotFound(_)
        ));
    }
}
