//! rustls configurations: the gateway's STARTTLS server side (client certificate requested,
//! never required) and the client side towards next hops, one verifier per TLS level.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::certs::{Anchors, CertInfo, name_matches, verify_chain};

use crate::config::TlsLevel;

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Requests a client certificate and accepts any chain at handshake time: whether the chain is
/// trusted, and by which bundle, depends on the connector that later claims the transaction, so
/// the rules check it after MAIL FROM. Handshake signatures are still verified, so a presented
/// certificate always proves possession of its key.
#[derive(Debug)]
pub struct AcceptAnyClientCert {
    algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AcceptAnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Empty hints: the client sends whatever certificate it has.
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let provider = provider();
    let verifier = Arc::new(AcceptAnyClientCert {
        algs: provider.signature_verification_algorithms,
    });
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(VERSIONS)
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| format!("server certificate and key do not fit together: {e}"))?;
    Ok(Arc::new(cfg))
}

/// The name a next hop's certificate must carry under DomainValidation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameRule {
    /// `tlsDomain` or the host: RFC 6125 match of this name or `*.` pattern.
    Pattern(String),
    /// `useMX` without `tlsDomain`: the recipient domain itself or any name under it
    /// (Postfix `secure` with its default `nexthop, dot-nexthop`), so an MX host name from an
    /// unauthenticated DNS answer is never what the certificate is checked against.
    DomainOrSubdomain(String),
}

impl NameRule {
    /// Whether one certificate name (possibly `*.` wildcard) satisfies the rule.
    pub fn matches(&self, cert_name: &str) -> bool {
        match self {
            NameRule::Pattern(p) => name_matches(p, cert_name),
            NameRule::DomainOrSubdomain(d) => {
                let d = d.trim_end_matches('.').to_ascii_lowercase();
                let c = cert_name.trim_end_matches('.').to_ascii_lowercase();
                // A wildcard certificate covers names under its base, which are under `d`
                // when the base is `d` or under it; `*.com` covers no one domain's names.
                let c = match c.strip_prefix("*.") {
                    Some(base) if base.contains('.') => base.to_string(),
                    Some(_) => return false,
                    None if c.contains('*') => return false,
                    None => c,
                };
                c == d || c.ends_with(&format!(".{d}"))
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            NameRule::Pattern(p) => p.clone(),
            NameRule::DomainOrSubdomain(d) => format!("{d} or a name under it"),
        }
    }
}

/// Verifies a next hop's certificate per its TLS level. One verifier for all levels so the
/// failure reason (untrusted chain, name mismatch) is worded the same everywhere.
#[derive(Debug)]
pub struct NextHopVerifier {
    level: TlsLevel,
    anchors: Anchors,
    /// The name required under DomainValidation.
    name: NameRule,
    algs: WebPkiSupportedAlgorithms,
}

impl NextHopVerifier {
    pub fn new(level: TlsLevel, anchors: Anchors, name: NameRule) -> NextHopVerifier {
        NextHopVerifier {
            level,
            anchors,
            name,
            algs: provider().signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for NextHopVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.level {
            TlsLevel::None | TlsLevel::Opportunistic | TlsLevel::EncryptionOnly => {
                return Ok(ServerCertVerified::assertion());
            }
            TlsLevel::CertificateValidation | TlsLevel::DomainValidation => {}
        }
        let mut chain = vec![end_entity.clone().into_owned()];
        chain.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        verify_chain(&chain, &self.anchors, false).map_err(|e| {
            rustls::Error::InvalidCertificate(match e {
                webpki::Error::CertExpired { .. } => CertificateError::Expired,
                webpki::Error::CertNotValidYet { .. } => CertificateError::NotValidYet,
                _ => CertificateError::UnknownIssuer,
            })
        })?;
        if self.level == TlsLevel::DomainValidation {
            let ip = match &self.name {
                NameRule::Pattern(p) => p.parse::<std::net::IpAddr>().ok(),
                NameRule::DomainOrSubdomain(_) => None,
            };
            let ok = if let Some(ip) = ip {
                webpki::EndEntityCert::try_from(end_entity)
                    .and_then(|ee| {
                        ee.verify_is_valid_for_subject_name(&ServerName::IpAddress(ip.into()))
                    })
                    .is_ok()
            } else {
                CertInfo::from_der(end_entity)
                    .map(|i| i.names.iter().any(|n| self.name.matches(n)))
                    .unwrap_or(false)
            };
            if !ok {
                return Err(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName,
                ));
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Client config for one next hop. `name` is what DomainValidation checks.
pub fn client_config(
    level: TlsLevel,
    anchors: Anchors,
    name: NameRule,
    client_cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    client_config_with(
        Arc::new(NextHopVerifier::new(level, anchors, name)),
        client_cert,
    )
}

/// Client config for one next hop with any certificate verifier (the TLS policies' ones).
pub fn client_config_with(
    verifier: Arc<dyn ServerCertVerifier>,
    client_cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(VERSIONS)
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let cfg = match client_cert {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| format!("client certificate and key do not fit together: {e}"))?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(cfg))
}

/// Words for a failed next-hop handshake, used in `451 4.7.5` replies.
pub fn describe_tls_error(e: &std::io::Error) -> String {
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    match inner {
        Some(rustls::Error::InvalidCertificate(CertificateError::NotValidForName)) => {
            "certificate name mismatch".into()
        }
        Some(rustls::Error::InvalidCertificate(CertificateError::Expired)) => {
            "certificate expired".into()
        }
        Some(rustls::Error::InvalidCertificate(_)) => "untrusted certificate chain".into(),
        Some(rustls::Error::PeerIncompatible(_)) | Some(rustls::Error::AlertReceived(_)) => {
            "TLS handshake failed (TLS below 1.2 or no common cipher)".into()
        }
        Some(other) => format!("TLS handshake failed: {other}"),
        None => format!("TLS handshake failed: {e}"),
    }
}

#[cfg(test)]
mod name_rule_tests {
    use super::NameRule;

    /// Issue 15: under DomainValidation with useMX the certificate must name the recipient
    /// domain or a name under it (Postfix `secure`: nexthop, dot-nexthop).
    #[test]
    fn recipient_domain_or_subdomain() {
        let r = NameRule::DomainOrSubdomain("partner.test".into());
        for ok in [
            "partner.test",
            "mx1.partner.test",
            "a.b.partner.test",
            "*.partner.test",
            "*.eu.partner.test",
            "MX1.Partner.Test.",
        ] {
            assert!(r.matches(ok), "{ok}");
        }
        for bad in [
            "mx.attacker.test",
            "partner.test.attacker.test",
            "xpartner.test",
            "*.test",
            "*",
            "mx*.partner.test",
        ] {
            assert!(!r.matches(bad), "{bad}");
        }
        assert!(NameRule::Pattern("*.partner.test".into()).matches("mx1.partner.test"));
        assert!(!NameRule::Pattern("*.partner.test".into()).matches("a.b.partner.test"));
    }
}
