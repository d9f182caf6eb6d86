//! The live config ([`LiveConfig`]): both files parsed and validated, every PEM file loaded,
//! rustls configs built, each route resolved to a [`NextHop`] and its [`NextHopHost`]s. One
//! immutable value per successful load; sessions hold the `Arc` they started with.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::certs::{
    Anchors, CertInfo, TrustStore, load_anchors, load_certs, load_key, public_roots,
};
use crate::config::{
    CertificateFiles, ConnectorsFile, FieldError, FleetSettings, PolicyMode, TlsLevel,
    parse_smart_host,
};
use crate::tls::NameRule;

/// The two files the gateway is started with.
#[derive(Debug, Clone)]
pub struct ConfigPaths {
    pub fleet: PathBuf,
    pub connectors: PathBuf,
}

/// One next hop host with its TLS client config (the DomainValidation name can differ per host).
#[derive(Debug, Clone)]
pub struct NextHopHost {
    pub host: String,
    pub port: u16,
    /// The address to connect to, when already resolved (MX hosts); otherwise `host` is
    /// resolved by the system resolver at connect time.
    pub addr: Option<std::net::IpAddr>,
    pub tls: Arc<rustls::ClientConfig>,
    /// SNI / name sent in the handshake.
    pub server_name: String,
    /// MX hosts: the recipient domain they were looked up for (MTA-STS, DomainValidation).
    pub domain: Option<String>,
    /// MX hosts: whether the MX answer was DNSSEC-validated (DANE).
    pub mx_security: crate::mx::MxSecurity,
}

/// A resolved route: where its mail goes (hosts tried in order) and how strictly its TLS is
/// checked. Built from `upstream` (config's [`crate::config::UpstreamSettings`]) or an
/// Outbound connector; [`crate::relay::HopConnection`] is one connection to one of its hosts.
#[derive(Debug, Clone)]
pub struct NextHop {
    /// Label for logs and replies: `upstream` or the Outbound connector's name.
    pub label: String,
    pub level: TlsLevel,
    pub hosts: Vec<NextHopHost>,
    pub use_mx: bool,
    /// For `useMX` connectors: what is needed to build a TLS config per MX host.
    pub mx: Option<Arc<MxTls>>,
    /// Outbound connectors with a DANE or MTA-STS mode.
    pub policy: Option<Arc<crate::tls_policy::engine::HopPolicy>>,
}

impl NextHop {
    /// Whether the MX lookup must be DNSSEC-validated (DANE on).
    pub fn validates_mx(&self) -> bool {
        self.policy
            .as_ref()
            .is_some_and(|p| p.dane != crate::config::PolicyMode::None)
    }
}

/// TLS material of a `useMX` connector; the DomainValidation name is `tlsDomain` or, by
/// default, the recipient domain or a name under it (never the MX host's name, which an
/// unauthenticated DNS answer supplied), so configs are built per host after the MX lookup.
pub struct MxTls {
    pub anchors: Anchors,
    pub tls_domain: Option<String>,
    pub client_cert: Option<(
        Vec<rustls_pki_types::CertificateDer<'static>>,
        rustls_pki_types::PrivateKeyDer<'static>,
    )>,
    pub port: u16,
}

impl std::fmt::Debug for MxTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MxTls")
            .field("tls_domain", &self.tls_domain)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl MxTls {
    /// The next hop host for one address of one MX host.
    /// `domain`: the recipient domain the MX lookup was for.
    pub fn host(
        &self,
        level: TlsLevel,
        host: &str,
        addr: std::net::IpAddr,
        domain: &str,
        mx_security: crate::mx::MxSecurity,
    ) -> Result<NextHopHost, String> {
        let rule = match &self.tls_domain {
            Some(n) => NameRule::Pattern(n.clone()),
            None => NameRule::DomainOrSubdomain(domain.to_string()),
        };
        let tls = crate::tls::client_config(
            level,
            self.anchors.clone(),
            rule,
            self.client_cert
                .as_ref()
                .map(|(c, k)| (c.clone(), k.clone_key())),
        )?;
        Ok(NextHopHost {
            host: host.to_string(),
            port: self.port,
            addr: Some(addr),
            tls,
            // As before the TLS policies: a non-wildcard tlsDomain, else the MX host. Under a
            // DANE or MTA-STS policy the client sends the MX host name instead (RFC 7672
            // 2.2.3, RFC 8461 4.2): relay::client.
            server_name: sni_name(self.tls_domain.as_deref().unwrap_or(host), host),
            domain: Some(domain.to_string()),
            mx_security,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertStatus {
    /// `server`, `upstream`, or the file name as written in the config.
    pub file: String,
    pub subject: String,
    pub not_after: i64,
}

/// One successful load of both files, everything a session needs to decide and relay.
pub struct LiveConfig {
    pub fleet: FleetSettings,
    /// The connectors file with its claiming index (derefs to the [`ConnectorsFile`]).
    pub connectors: crate::policy::IndexedConnectors,
    /// Hex sha256 of the connectors file bytes.
    pub hash: String,
    pub loaded_at: OffsetDateTime,
    pub server_tls: Arc<rustls::ServerConfig>,
    pub trust: Arc<TrustStore>,
    pub upstream: NextHop,
    /// Same order as `connectors.outbound`.
    pub outbound: Vec<NextHop>,
    pub certificates: Vec<CertStatus>,
    /// DNS resolver for `useMX` connectors (built on first use).
    pub resolver: Arc<crate::mx::MxResolver>,
    /// SPF/DKIM/DMARC on the same `dnsResolver` (built on first use).
    pub auth: Arc<crate::auth::resolver::AuthResolver>,
    /// `senderAuthentication` of the Inbound connectors that set one other than None, and
    /// their index in `connectors.inbound` (whose `domains` bound the signers and From:
    /// domains that count), by name: looked up once per claimed transaction, so the cost
    /// does not grow with the number of connectors.
    pub sender_auth:
        std::collections::HashMap<String, (crate::config::SenderAuthentication, usize)>,
}

impl std::fmt::Debug for LiveConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveConfig")
            .field("hash", &self.hash)
            .field("loaded_at", &self.loaded_at)
            .finish_non_exhaustive()
    }
}

fn err(path: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        path: path.into(),
        message: message.into(),
    }
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// The key of a client-certificate trust bundle: its path resolved against `root` and made
/// absolute (a relative fleet path would otherwise depend on how the gateway was started).
fn bundle_key(root: &Path, written: &Path) -> PathBuf {
    let full = resolve(root, written);
    std::path::absolute(&full).unwrap_or(full)
}

/// Directory fleet-file paths are relative to.
pub fn fleet_base(paths: &ConfigPaths) -> PathBuf {
    paths
        .fleet
        .parent()
        .map(Path::to_path_buf)
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Where connector PEM paths are resolved: `materialDir` (relative to the fleet file's
/// directory) or the connectors file's directory.
pub fn material_dir(fleet: &FleetSettings, paths: &ConfigPaths) -> PathBuf {
    let base = fleet_base(paths);
    match &fleet.material_dir {
        Some(d) => resolve(&base, d),
        None => {
            let d = fleet.material_dir_for(&paths.connectors);
            if d.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                d
            }
        }
    }
}

/// Parses both files without reading PEM material.
pub fn parse_files(
    paths: &ConfigPaths,
) -> Result<(FleetSettings, ConnectorsFile, Vec<u8>), Vec<FieldError>> {
    let mut errors = Vec::new();
    let fleet_path = paths.fleet.display().to_string();
    let conn_path = paths.connectors.display().to_string();
    let fleet = match std::fs::read(&paths.fleet) {
        Ok(b) => match serde_json::from_slice::<FleetSettings>(&b) {
            Ok(f) => Some(f),
            Err(e) => {
                errors.push(err(fleet_path, format!("invalid fleet settings: {e}")));
                None
            }
        },
        Err(e) => {
            errors.push(err(fleet_path, format!("cannot read: {e}")));
            None
        }
    };
    let connectors = match std::fs::read(&paths.connectors) {
        Ok(b) => match serde_json::from_slice::<ConnectorsFile>(&b) {
            Ok(c) => Some((c, b)),
            Err(e) => {
                errors.push(err(conn_path, format!("invalid connectors file: {e}")));
                None
            }
        },
        Err(e) => {
            errors.push(err(conn_path, format!("cannot read: {e}")));
            None
        }
    };
    if let Some(f) = &fleet {
        errors.extend(f.validate());
    }
    if let Some((c, _)) = &connectors {
        errors.extend(c.validate());
    }
    match (fleet, connectors) {
        (Some(f), Some((c, bytes))) if errors.is_empty() => Ok((f, c, bytes)),
        _ => Err(errors),
    }
}

fn load_pair(
    base: &Path,
    files: &CertificateFiles,
    field: &str,
    errors: &mut Vec<FieldError>,
) -> Option<(
    Vec<rustls_pki_types::CertificateDer<'static>>,
    rustls_pki_types::PrivateKeyDer<'static>,
)> {
    let chain = load_certs(&resolve(base, &files.cert_file))
        .map_err(|e| errors.push(err(format!("{field}.certFile"), e)))
        .ok();
    let key = load_key(&resolve(base, &files.key_file))
        .map_err(|e| errors.push(err(format!("{field}.keyFile"), e)))
        .ok();
    Some((chain?, key?))
}

fn earliest(file: String, chain: &[rustls_pki_types::CertificateDer<'_>]) -> Option<CertStatus> {
    chain
        .iter()
        .filter_map(|c| CertInfo::from_der(c).ok())
        .min_by_key(|i| i.not_after)
        .map(|i| CertStatus {
            file,
            subject: i.subject,
            not_after: i.not_after.unix_timestamp(),
        })
}

/// Loads everything; every problem is returned with its field path.
pub fn load(paths: &ConfigPaths) -> Result<LiveConfig, Vec<FieldError>> {
    let (mut fleet, mut connectors, bytes) = parse_files(paths)?;
    let mut errors = Vec::new();
    let base = fleet_base(paths);
    let material = material_dir(&fleet, paths);
    let mut certificates = Vec::new();

    let server_tls = match load_pair(
        &base,
        &fleet.server_certificate,
        "serverCertificate",
        &mut errors,
    ) {
        Some((chain, key)) => {
            certificates.extend(earliest("server".into(), &chain[..1]));
            match crate::tls::server_config(chain, key) {
                Ok(c) => Some(c),
                Err(e) => {
                    errors.push(err("serverCertificate", e));
                    None
                }
            }
        }
        None => None,
    };

    // Trust bundles named by rules that check client certificates, keyed by the resolved path:
    // the internal-senders bundle is relative to the fleet file, connector bundles to
    // materialDir, so one relative name can mean two files. The config's fields are rewritten
    // to that key, which is what the policy asks the store for.
    let mut bundles: HashMap<PathBuf, Anchors> = HashMap::new();
    let mut want =
        |slot: &mut PathBuf, root: &Path, field: String, errors: &mut Vec<FieldError>| {
            let written = slot.display().to_string();
            let full = bundle_key(root, slot);
            *slot = full.clone();
            if bundles.contains_key(&full) {
                return;
            }
            match load_anchors(&full) {
                Ok(a) => {
                    if let Ok(chain) = load_certs(&full) {
                        certificates.extend(earliest(written, &chain));
                    }
                    bundles.insert(full, a);
                }
                Err(e) => errors.push(err(field, e)),
            }
        };
    if let Some(b) = &mut fleet.internal_senders.trust_bundle_file {
        want(
            b,
            &base,
            "internalSenders.trustBundleFile".into(),
            &mut errors,
        );
    }
    for (i, c) in connectors.inbound.iter_mut().enumerate() {
        if let Some(b) = c
            .certificate
            .as_mut()
            .and_then(|r| r.trust_bundle_file.as_mut())
        {
            want(
                b,
                &material,
                format!("inbound[{i}].certificate.trustBundleFile"),
                &mut errors,
            );
        }
    }
    let public = public_roots();

    let hop_anchors = |bundle: &Option<PathBuf>,
                       root: &Path,
                       field: &str,
                       errors: &mut Vec<FieldError>|
     -> Anchors {
        match bundle {
            None => public.clone(),
            Some(b) => load_anchors(&resolve(root, b)).unwrap_or_else(|e| {
                errors.push(err(field, e));
                public.clone()
            }),
        }
    };

    // Upstream.
    let up = &fleet.upstream;
    let anchors = hop_anchors(
        &up.trust_bundle_file,
        &base,
        "upstream.trustBundleFile",
        &mut errors,
    );
    let client_cert = up
        .client_certificate
        .as_ref()
        .and_then(|c| load_pair(&base, c, "upstream.clientCertificate", &mut errors));
    if let Some((chain, _)) = &client_cert {
        certificates.extend(earliest("upstream-client".into(), chain));
    }
    let name = up.tls_domain.clone().unwrap_or_else(|| up.host.clone());
    let upstream = match crate::tls::client_config(
        up.tls,
        anchors,
        NameRule::Pattern(name.clone()),
        client_cert,
    ) {
        Ok(tls) => Some(NextHop {
            label: "upstream".into(),
            level: up.tls,
            hosts: vec![NextHopHost {
                host: up.host.clone(),
                port: up.port,
                addr: None,
                tls,
                server_name: sni_name(&name, &up.host),
                domain: None,
                mx_security: crate::mx::MxSecurity::Unchecked,
            }],
            use_mx: false,
            mx: None,
            policy: None,
        }),
        Err(e) => {
            errors.push(err("upstream", e));
            None
        }
    };

    // DNS (MX, DANE) and MTA-STS, shared by the Outbound connectors.
    let tp = &fleet.tls_policy;
    let trust_anchor = tp
        .dnssec_trust_anchor_file
        .as_ref()
        .map(|f| resolve(&base, f));
    if let Some(f) = &trust_anchor
        && let Err(e) = hickory_resolver::proto::dnssec::TrustAnchors::from_file(f)
    {
        errors.push(err(
            "tlsPolicy.dnssecTrustAnchorFile",
            format!("cannot read DNSKEY records from {}: {e}", f.display()),
        ));
    }
    let sts_roots = hop_anchors(
        &tp.mta_sts_roots_file,
        &base,
        "tlsPolicy.mtaStsRootsFile",
        &mut errors,
    );
    let resolver = Arc::new(
        crate::mx::MxResolver::new(
            fleet
                .dns_resolver
                .as_deref()
                .and_then(|r| crate::config::parse_dns_resolver(r).ok()),
            std::time::Duration::from_secs(fleet.timeouts.next_hop_secs.clamp(1, 10)),
            fleet.allow_private_mx_addresses.clone(),
        )
        .with_trust_anchor(trust_anchor),
    );
    let sts = Arc::new(crate::tls_policy::fetch::StsFetcher {
        roots: sts_roots,
        max_bytes: tp.mta_sts_max_policy_bytes,
        timeout: std::time::Duration::from_secs(tp.mta_sts_fetch_timeout_secs),
        port: tp.mta_sts_port,
        resolver: resolver.clone(),
    });

    // Outbound connectors.
    let mut outbound = Vec::new();
    for (i, c) in connectors.outbound.iter().enumerate() {
        let p = format!("outbound[{i}]");
        let anchors = hop_anchors(
            &c.trust_bundle_file,
            &material,
            &format!("{p}.trustBundleFile"),
            &mut errors,
        );
        let client_cert = c.client_certificate.as_ref().and_then(|cc| {
            load_pair(
                &material,
                cc,
                &format!("{p}.clientCertificate"),
                &mut errors,
            )
        });
        let mut hosts = Vec::new();
        let mx = c.use_mx.then(|| {
            Arc::new(MxTls {
                anchors: anchors.clone(),
                tls_domain: c.tls_domain.clone(),
                client_cert: client_cert
                    .as_ref()
                    .map(|(c, k)| (c.clone(), k.clone_key())),
                port: 25,
            })
        });
        // useMX wins over smartHosts (the CRD allows only one of them).
        let smart_hosts: &[String] = if c.use_mx { &[] } else { &c.smart_hosts };
        for h in smart_hosts {
            let Ok((host, port)) = parse_smart_host(h) else {
                continue;
            };
            let name = c.tls_domain.clone().unwrap_or_else(|| host.clone());
            match crate::tls::client_config(
                c.tls,
                anchors.clone(),
                NameRule::Pattern(name.clone()),
                client_cert
                    .as_ref()
                    .map(|(c, k)| (c.clone(), k.clone_key())),
            ) {
                Ok(tls) => hosts.push(NextHopHost {
                    server_name: sni_name(&name, &host),
                    host,
                    port,
                    addr: None,
                    tls,
                    domain: None,
                    mx_security: crate::mx::MxSecurity::Unchecked,
                }),
                Err(e) => errors.push(err(format!("{p}.smartHosts"), e)),
            }
        }
        let policy = (c.dane != PolicyMode::None || c.mta_sts != PolicyMode::None).then(|| {
            Arc::new(crate::tls_policy::engine::HopPolicy {
                dane: c.dane,
                mta_sts: c.mta_sts,
                level: c.tls,
                anchors: anchors.clone(),
                tls_domain: c.tls_domain.clone(),
                client_cert: client_cert
                    .as_ref()
                    .map(|(c, k)| (c.clone(), k.clone_key())),
                resolver: resolver.clone(),
                sts: sts.clone(),
            })
        });
        outbound.push(NextHop {
            label: c.name.clone(),
            level: c.tls,
            hosts,
            use_mx: c.use_mx,
            mx,
            policy,
        });
    }

    let dns_server = fleet
        .dns_resolver
        .as_deref()
        .and_then(|r| crate::config::parse_dns_resolver(r).ok());
    let auth = Arc::new(crate::auth::resolver::AuthResolver::new(
        dns_server,
        std::time::Duration::from_secs(fleet.timeouts.next_hop_secs.clamp(1, 10)),
    ));
    let sender_auth = connectors
        .inbound
        .iter()
        .enumerate()
        .filter(|(_, c)| c.sender_authentication != crate::config::SenderAuthentication::None)
        .map(|(i, c)| (c.name.clone(), (c.sender_authentication, i)))
        .collect();

    match (server_tls, upstream) {
        (Some(server_tls), Some(upstream)) if errors.is_empty() => Ok(LiveConfig {
            fleet,
            // Built after the trust-bundle paths were rewritten: the index keeps only
            // positions, claiming reads the connectors themselves.
            connectors: connectors.into(),
            hash: hex::encode(Sha256::digest(&bytes)),
            loaded_at: OffsetDateTime::now_utc(),
            server_tls,
            trust: Arc::new(TrustStore { bundles, public }),
            upstream,
            outbound,
            certificates,
            resolver,
            auth,
            sender_auth,
        }),
        _ => Err(errors),
    }
}

/// The name sent as SNI: the DomainValidation name unless it is a wildcard pattern, then the
/// host.
fn sni_name(name: &str, host: &str) -> String {
    if name.starts_with("*.") {
        host.to_string()
    } else {
        name.to_string()
    }
}

/// Every file a config depends on, for the reload watcher.
pub fn watched_files(paths: &ConfigPaths) -> Vec<PathBuf> {
    let mut files = vec![paths.fleet.clone(), paths.connectors.clone()];
    let Ok((fleet, connectors, _)) = parse_files(paths) else {
        return files;
    };
    let base = fleet_base(paths);
    let material = material_dir(&fleet, paths);
    files.push(resolve(&base, &fleet.server_certificate.cert_file));
    files.push(resolve(&base, &fleet.server_certificate.key_file));
    for b in fleet
        .internal_senders
        .trust_bundle_file
        .iter()
        .chain(fleet.upstream.trust_bundle_file.iter())
    {
        files.push(resolve(&base, b));
    }
    for f in fleet
        .tls_policy
        .dnssec_trust_anchor_file
        .iter()
        .chain(fleet.tls_policy.mta_sts_roots_file.iter())
    {
        files.push(resolve(&base, f));
    }
    if let Some(c) = &fleet.upstream.client_certificate {
        files.push(resolve(&base, &c.cert_file));
        files.push(resolve(&base, &c.key_file));
    }
    for c in &connectors.inbound {
        if let Some(b) = c
            .certificate
            .as_ref()
            .and_then(|r| r.trust_bundle_file.as_ref())
        {
            files.push(resolve(&material, b));
        }
    }
    for c in &connectors.outbound {
        if let Some(b) = &c.trust_bundle_file {
            files.push(resolve(&material, b));
        }
        if let Some(cc) = &c.client_certificate {
            files.push(resolve(&material, &cc.cert_file));
            files.push(resolve(&material, &cc.key_file));
        }
    }
    files
}
