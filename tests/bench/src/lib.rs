//! Shared pieces of the benchmark binaries: PEM loading, rustls client and server
//! configurations, latency summaries.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        bail!("{}: no certificate", path.display());
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// Which TLS versions the client offers.
pub fn versions(v: &str) -> Result<&'static [&'static rustls::SupportedProtocolVersion]> {
    const V13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    const V12: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
    const ANY: &[&rustls::SupportedProtocolVersion] =
        &[&rustls::version::TLS13, &rustls::version::TLS12];
    match v {
        "1.3" => Ok(V13),
        "1.2" => Ok(V12),
        "any" => Ok(ANY),
        other => bail!("--tls-version must be 1.3, 1.2 or any, not {other}"),
    }
}

/// Accepts any server certificate (handshake signatures are still checked).
#[derive(Debug)]
struct NoVerify {
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
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

/// Client configuration: `ca` = verify against that bundle (else no verification), optional
/// client certificate, session resumption off so every session is a full handshake.
pub fn client_config(
    version: &str,
    ca: Option<&Path>,
    client_cert: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions(version)?)
        .map_err(|e| anyhow!("{e}"))?;
    let builder = match ca {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in load_certs(path)? {
                roots
                    .add(c)
                    .map_err(|e| anyhow!("{}: {e}", path.display()))?;
            }
            builder.with_root_certificates(roots)
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify {
                algs: provider.signature_verification_algorithms,
            })),
    };
    let mut cfg = match client_cert {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|e| anyhow!("client certificate: {e}"))?,
        None => builder.with_no_client_auth(),
    };
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// The TLS limit row's server: with `request_client_cert`, exactly the gateway's STARTTLS
/// configuration (`partnergate_gateway::tls::server_config`: TLS 1.3 and 1.2, client
/// certificate requested, never required), so the row measures the gateway's SMTP work and not
/// a different TLS setup; without, the same versions and no client-certificate request.
pub fn server_config(
    cert: &Path,
    key: &Path,
    request_client_cert: bool,
) -> Result<Arc<rustls::ServerConfig>> {
    if request_client_cert {
        return partnergate_gateway::tls::server_config(load_certs(cert)?, load_key(key)?)
            .map_err(|e| anyhow!("server certificate: {e}"));
    }
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions("any")?)
        .map_err(|e| anyhow!("{e}"))?
        .with_no_client_auth()
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| anyhow!("server certificate: {e}"))?;
    Ok(Arc::new(cfg))
}

/// Percentile summary of microsecond samples, reported in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Summary {
    pub count: usize,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

fn pick(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    let idx = rank.clamp(1, sorted.len()) - 1;
    f64::from(sorted[idx]) / 1000.0
}

/// Sorts `samples` (microseconds) in place and summarises them.
pub fn summarize(samples: &mut [u32]) -> Summary {
    samples.sort_unstable();
    let count = samples.len();
    let mean_ms = if count == 0 {
        0.0
    } else {
        samples.iter().map(|&v| f64::from(v)).sum::<f64>() / count as f64 / 1000.0
    };
    Summary {
        count,
        mean_ms,
        p50_ms: pick(samples, 0.50),
        p90_ms: pick(samples, 0.90),
        p99_ms: pick(samples, 0.99),
        p999_ms: pick(samples, 0.999),
        max_ms: samples
            .last()
            .map(|&v| f64::from(v) / 1000.0)
            .unwrap_or(0.0),
    }
}

impl Summary {
    pub fn to_json(&self) -> serde_json::Value {
        let r = |v: f64| (v * 1000.0).round() / 1000.0;
        serde_json::json!({
            "count": self.count,
            "mean": r(self.mean_ms),
            "p50": r(self.p50_ms),
            "p90": r(self.p90_ms),
            "p99": r(self.p99_ms),
            "p999": r(self.p999_ms),
            "max": r(self.max_ms),
        })
    }
}

/// Builds a message of about `size` octets (headers included): CRLF lines, none starting with
/// a dot, ending with CRLF, followed by the end-of-data line.
pub fn build_message(size: usize, from: &str, to: &str) -> Vec<u8> {
    let mut m = format!(
        "From: <{from}>\r\nTo: <{to}>\r\nSubject: partnergate benchmark\r\n\
         Date: Sat, 28 Nov 2026 10:00:00 +0000\r\nMessage-ID: <bench@loadgen.test>\r\n\r\n"
    )
    .into_bytes();
    const LINE: &[u8] =
        b"The quick brown fox jumps over the lazy dog; 0123456789 abcdefghijklmnopqrstuvw";
    while m.len() + 2 < size {
        let room = size - m.len() - 2;
        let take = room.min(LINE.len());
        m.extend_from_slice(&LINE[..take]);
        m.extend_from_slice(b"\r\n");
    }
    if !m.ends_with(b"\r\n") {
        m.extend_from_slice(b"\r\n");
    }
    m.extend_from_slice(b".\r\n");
    m
}

/// The DATA payload for a message read from a file, sent byte for byte otherwise: every line
/// end becomes CRLF (signers such as `dkimsign` write bare LF; relaxed and simple DKIM
/// canonicalization both see CRLF, so the signature still verifies), lines starting with a dot
/// are dot-stuffed (RFC 5321 4.5.2: the receiver removes it again), then the end-of-data line.
pub fn data_from_file(file: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(file.len() + file.len() / 40 + 8);
    let mut at_line_start = true;
    let mut prev = 0u8;
    for &b in file {
        if at_line_start && b == b'.' {
            m.push(b'.');
        }
        if b == b'\n' && prev != b'\r' {
            m.push(b'\r');
        }
        m.push(b);
        at_line_start = b == b'\n';
        prev = b;
    }
    if !m.is_empty() && !m.ends_with(b"\r\n") {
        m.extend_from_slice(b"\r\n");
    }
    m.extend_from_slice(b".\r\n");
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let mut v: Vec<u32> = (1..=1000).map(|i| i * 1000).collect();
        let s = summarize(&mut v);
        assert_eq!(s.count, 1000);
        assert_eq!(s.p50_ms, 500.0);
        assert_eq!(s.p99_ms, 990.0);
        assert_eq!(s.p999_ms, 999.0);
        assert_eq!(s.max_ms, 1000.0);
        assert_eq!(summarize(&mut []).p99_ms, 0.0);
    }

    #[test]
    fn message_shape() {
        for size in [10, 100, 10240, 65536] {
            let m = build_message(size, "a@b.test", "c@d.test");
            assert!(m.ends_with(b"\r\n.\r\n"));
            let body = &m[..m.len() - 3];
            assert!(body.len() >= size.min(body.len()));
            if size > 300 {
                assert!(body.len().abs_diff(size) <= 2, "{size} -> {}", body.len());
            }
            for line in body.split(|&b| b == b'\n') {
                assert!(!line.starts_with(b"."));
            }
            // every LF is preceded by CR
            for (i, &b) in body.iter().enumerate() {
                if b == b'\n' {
                    assert_eq!(body[i - 1], b'\r');
                }
            }
        }
    }

    #[test]
    fn data_from_file_crlf_and_dot_stuffing() {
        assert_eq!(
            data_from_file(b"A: 1\n\n.x\r\nbody\r\n..\nend"),
            b"A: 1\r\n\r\n..x\r\nbody\r\n...\r\nend\r\n.\r\n"
        );
        assert_eq!(data_from_file(b"a\r\n"), b"a\r\n.\r\n");
        assert_eq!(data_from_file(b""), b".\r\n");
    }
}
