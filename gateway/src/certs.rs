//! Certificate material: PEM loading (rustls-pki-types `PemObject`), client-certificate chain
//! verification with rustls-webpki, and RFC 6125 name matching between a configured pattern and
//! a certificate's names. The facts we report about a certificate ([`CertInfo`]) are parsed in
//! partnergate-core, the same way the operator parses them.
//!
//! Invariant: a client certificate's names ([`PeerCert`]) are DNS names only ([`is_dns_name`]);
//! anything else in a SAN is ignored for matching and never reaches a header.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, TrustAnchor, UnixTime};

/// What we report about one certificate; parsed in partnergate-core, as the operator does.
pub use partnergate_core::certs::CertInfo;

/// Trust anchors of one bundle. `Arc<[..]>` so sessions share them without copying.
pub type Anchors = Arc<[TrustAnchor<'static>]>;

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&bytes).collect();
    let certs = certs.map_err(|e| format!("{}: not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no CERTIFICATE found", path.display()));
    }
    for c in &certs {
        CertInfo::from_der(c).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    // Never echo key bytes: the error names the file only.
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|_| format!("{}: no usable PEM private key found", path.display()))
}

pub fn load_anchors(path: &Path) -> Result<Anchors, String> {
    let certs = load_certs(path)?;
    let mut anchors = Vec::with_capacity(certs.len());
    for c in &certs {
        let a = webpki::anchor_from_trusted_cert(c)
            .map_err(|e| format!("{}: not usable as a trust anchor: {e}", path.display()))?;
        anchors.push(a.to_owned());
    }
    Ok(anchors.into())
}

pub fn public_roots() -> Anchors {
    webpki_roots::TLS_SERVER_ROOTS.to_vec().into()
}

fn normalise(name: &str) -> String {
    name.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// A DNS name a client certificate may be known by: LDH labels of 1 to 63 characters (no
/// leading or trailing hyphen), an optional `*` as the whole left-most label, an optional
/// trailing dot, at most 253 characters.
pub fn is_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return false;
    }
    let rest = name.strip_prefix("*.").unwrap_or(name);
    !rest.is_empty()
        && rest.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// RFC 6125 matching of a configured name or `*.` pattern against one certificate name (which
/// may itself be a `*.` wildcard). Wildcards cover exactly one left-most label; partial-label
/// wildcards (`f*.example.com`) are not honoured, as RFC 6125 6.4.3 allows.
pub fn name_matches(pattern: &str, cert_name: &str) -> bool {
    let p = normalise(pattern);
    let c = normalise(cert_name);
    if p.is_empty() || c.is_empty() {
        return false;
    }
    let one_label_under = |name: &str, base: &str| -> bool {
        name.split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && label != "*" && rest == base)
    };
    match (p.strip_prefix("*."), c.strip_prefix("*.")) {
        (None, None) => p == c && !c.contains('*'),
        // A wildcard certificate must cover at least two labels (no `*.com`).
        (None, Some(cbase)) => cbase.contains('.') && one_label_under(&p, cbase),
        (Some(pbase), None) => !c.contains('*') && one_label_under(&c, pbase),
        (Some(pbase), Some(cbase)) => pbase == cbase,
    }
}

/// Verifies `chain` (leaf first) against `anchors`. Partner MTAs commonly present their server
/// certificate as client certificate, and public CAs have stopped adding the clientAuth EKU, so
/// serverAuth is accepted too.
pub fn verify_chain(
    chain: &[CertificateDer<'static>],
    anchors: &[TrustAnchor<'static>],
    client: bool,
) -> Result<(), webpki::Error> {
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Err(webpki::Error::BadDer);
    };
    let ee = webpki::EndEntityCert::try_from(leaf)?;
    let now = UnixTime::now();
    let try_usage = |usage: webpki::KeyUsage| {
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map(|_| ())
    };
    if client {
        match try_usage(webpki::KeyUsage::client_auth()) {
            Err(webpki::Error::RequiredEkuNotFoundContext(_)) => {
                try_usage(webpki::KeyUsage::server_auth())
            }
            other => other,
        }
    } else {
        try_usage(webpki::KeyUsage::server_auth())
    }
}

/// The trust bundles a config refers to, keyed by their resolved absolute path (the loader
/// rewrites the config's bundle fields to that key, so two files with the same relative name
/// under different roots never share an entry); `None` = public web PKI roots.
#[derive(Debug, Clone)]
pub struct TrustStore {
    pub bundles: HashMap<PathBuf, Anchors>,
    pub public: Anchors,
}

impl TrustStore {
    pub fn anchors(&self, bundle: Option<&Path>) -> Option<&Anchors> {
        match bundle {
            None => Some(&self.public),
            Some(p) => self.bundles.get(p),
        }
    }
}

/// The client certificate a session received, with chain verification done lazily per bundle
/// (a config may hold many bundles; a session needs one or two) and cached.
#[derive(Debug)]
pub struct PeerCert {
    pub chain: Vec<CertificateDer<'static>>,
    pub info: CertInfo,
    store: Arc<TrustStore>,
    cache: Mutex<HashMap<Option<PathBuf>, bool>>,
}

impl PeerCert {
    pub fn new(chain: Vec<CertificateDer<'static>>, store: Arc<TrustStore>) -> Option<PeerCert> {
        let mut info = CertInfo::from_der(chain.first()?).ok()?;
        // A matched name is written into the `X-Partnergate-Connector` header: a SAN carrying
        // CR/LF, spaces or other bytes could end or forge headers, so it never becomes a name.
        info.names.retain(|n| is_dns_name(n));
        Some(PeerCert {
            chain,
            info,
            store,
            cache: Mutex::new(HashMap::new()),
        })
    }
}

impl crate::policy::CertFacts for PeerCert {
    fn names(&self) -> &[String] {
        &self.info.names
    }

    fn subject(&self) -> &str {
        &self.info.subject
    }

    fn trusted_by(&self, bundle: Option<&Path>) -> bool {
        let key = bundle.map(Path::to_path_buf);
        if let Ok(cache) = self.cache.lock()
            && let Some(v) = cache.get(&key)
        {
            return *v;
        }
        let ok = match self.store.anchors(bundle) {
            Some(anchors) => verify_chain(&self.chain, anchors, true).is_ok(),
            None => false,
        };
        if let Ok(mut cache) = self.cache.lock() {
            cache.insert(key, ok);
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6125_names() {
        assert!(name_matches("mail.contoso.com", "mail.contoso.com"));
        assert!(name_matches("mail.contoso.com", "MAIL.Contoso.com."));
        assert!(!name_matches("mail.contoso.com", "smtp.contoso.com"));
        assert!(name_matches("mail.contoso.com", "*.contoso.com"));
        assert!(!name_matches("a.mail.contoso.com", "*.contoso.com"));
        assert!(!name_matches("contoso.com", "*.contoso.com"));
        assert!(!name_matches("contoso.com", "*.com"));
        assert!(name_matches("*.contoso.com", "mx1.contoso.com"));
        assert!(!name_matches("*.contoso.com", "a.b.contoso.com"));
        assert!(!name_matches("*.contoso.com", "contoso.com"));
        assert!(name_matches("*.contoso.com", "*.contoso.com"));
        assert!(!name_matches("*.contoso.com", "*.fabrikam.com"));
        assert!(!name_matches("mail.contoso.com", "m*.contoso.com"));
        assert!(!name_matches("", "x"));
    }

    #[test]
    fn only_dns_names_are_names() {
        for ok in [
            "mail.contoso.com",
            "MX-1.Contoso.com.",
            "*.contoso.com",
            "localhost",
            "xn--bcher-kva.test",
        ] {
            assert!(is_dns_name(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "*.",
            "*",
            "a\r\nX-Injected: yes\r\nb.contoso.com",
            "mail.contoso.com\r\n",
            "mail contoso.com",
            "mail..contoso.com",
            ".contoso.com",
            "-mail.contoso.com",
            "mail-.contoso.com",
            "a.*.contoso.com",
            "m*.contoso.com",
            "mail_1.contoso.com",
            "bücher.test",
            "mail.contoso.com\0",
        ] {
            assert!(!is_dns_name(bad), "{bad:?}");
        }
        assert!(is_dns_name(&format!("{}.com", "a".repeat(63))));
        assert!(!is_dns_name(&format!("{}.com", "a".repeat(64))));
    }

    #[test]
    fn chain_verification_with_private_ca() {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf_params = CertificateParams::new(vec!["mail.contoso.com".to_string()]).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();

        let ca_der = ca.der().clone();
        let anchor = webpki::anchor_from_trusted_cert(&ca_der)
            .unwrap()
            .to_owned();
        let chain = vec![leaf.der().clone()];
        assert!(verify_chain(&chain, &[anchor], true).is_ok());
        assert!(verify_chain(&chain, &public_roots(), true).is_err());
        let info = CertInfo::from_der(&chain[0]).unwrap();
        assert_eq!(info.names, ["mail.contoso.com"]);
    }
}
