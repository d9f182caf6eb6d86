//! The rustls certificate verifier of one next hop host under a TLS policy ([`super::Plan`]):
//! DANE replaces the level's certificate checks by the TLSA match; MTA-STS enforce adds its own
//! (chain to the MTA-STS roots, a name valid for the MX host) to the level's; MTA-STS testing
//! evaluates its checks and only records a failure.
//!
//! Invariant: why a check failed is kept in the verifier (`failure`, `testing_failure`) so the
//! `451 4.7.5` reply, the log line and the metric name the policy and its reason, not rustls'
//! generic wording. Handshake signatures are always verified.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use super::dane::{self, Tlsa};
use crate::certs::{Anchors, CertInfo, name_matches, verify_chain};
use crate::tls::NextHopVerifier;

#[derive(Debug)]
pub enum Check {
    Dane {
        records: Vec<Tlsa>,
        /// Reference names for DANE-TA.
        names: Vec<String>,
    },
    MtaSts {
        /// The level's verifier, which must pass as well.
        level: NextHopVerifier,
        roots: Anchors,
        mx_host: String,
        enforce: bool,
    },
}

#[derive(Debug)]
pub struct PolicyVerifier {
    check: Check,
    algs: WebPkiSupportedAlgorithms,
    failure: Mutex<Option<String>>,
    testing_failure: Mutex<Option<String>>,
}

impl PolicyVerifier {
    pub fn new(check: Check) -> Arc<PolicyVerifier> {
        Arc::new(PolicyVerifier {
            check,
            algs: crate::tls::provider().signature_verification_algorithms,
            failure: Mutex::new(None),
            testing_failure: Mutex::new(None),
        })
    }

    /// Why the policy refused the certificate, if it did.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }

    /// Why an MTA-STS testing policy would have refused the certificate.
    pub fn testing_failure(&self) -> Option<String> {
        self.testing_failure.lock().ok().and_then(|f| f.clone())
    }

    fn fail(&self, why: String) -> rustls::Error {
        if let Ok(mut f) = self.failure.lock() {
            *f = Some(why.clone());
        }
        rustls::Error::General(why)
    }
}

/// The MTA-STS certificate checks (RFC 8461 4.2): a chain to `roots` and a name valid for the
/// MX host.
fn sts_check(
    chain: &[CertificateDer<'static>],
    roots: &Anchors,
    mx_host: &str,
) -> Result<(), String> {
    verify_chain(chain, roots, false).map_err(|e| format!("untrusted certificate chain ({e})"))?;
    let names = chain
        .first()
        .and_then(|c| CertInfo::from_der(c).ok())
        .map(|i| i.names)
        .unwrap_or_default();
    if names.iter().any(|n| name_matches(mx_host, n)) {
        Ok(())
    } else {
        Err(format!(
            "certificate name mismatch (MTA-STS needs {mx_host}; certificate has {})",
            names.join(", ")
        ))
    }
}

impl ServerCertVerifier for PolicyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = vec![end_entity.clone().into_owned()];
        chain.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        match &self.check {
            Check::Dane { records, names } => {
                dane::check(records, &chain, names, now)
                    .map_err(|e| self.fail(format!("DANE: {e}")))?;
                Ok(ServerCertVerified::assertion())
            }
            Check::MtaSts {
                level,
                roots,
                mx_host,
                enforce,
            } => {
                let sts = sts_check(&chain, roots, mx_host);
                match sts {
                    Err(e) if *enforce => return Err(self.fail(format!("MTA-STS: {e}"))),
                    Err(e) => {
                        if let Ok(mut f) = self.testing_failure.lock() {
                            *f = Some(e);
                        }
                    }
                    Ok(()) => {}
                }
                level.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            }
        }
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
