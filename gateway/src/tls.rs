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

/// Verifies a next hop's certificate per its TLS level. One verifier for all levels so the
/// failure reason (untrusted chain, name mismatch) is worded the same everywhere.
#[derive(Debug)]
pub struct NextHopVerifier {
    level: TlsLevel,
    anchors: Anchors,
    /// The name (or `*.` pattern) required under DomainValidation.
    name: String,
    algs: WebPkiSupportedAlgorithms,
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
            let ok = if let Ok(ip) = self.name.parse::<std::net::IpAddr>() {
                webpki::EndEntityCert::try_from(end_entity)
                    .and_then(|ee| {
                        ee.verify_is_valid_for_subject_name(&ServerName::IpAddress(ip.into()))
                    })
                    .is_ok()
            } else {
                CertInfo::from_der(end_entity)
                    .map(|i| i.names.iter().any(|n| name_matches(&self.name, n)))
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
    name: String,
    client_cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = provider();
    let verifier = Arc::new(NextHopVerifier {
        level,
        anchors,
        name,
        algs: provider.signature_verification_algorithms,
    });
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
