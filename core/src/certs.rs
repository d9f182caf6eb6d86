//! Facts about one X.509 certificate ([`CertInfo`]), read the same way by both binaries: the
//! gateway reports its own and its next hops' certificates in `/status` and matches a client
//! certificate's names against connector rules; the operator reports Secrets' certificates in
//! `status.certificates` and warns before they expire. Parsing only: chain verification stays
//! in the gateway (rustls-webpki).

use ::time::OffsetDateTime;
use ::time::format_description::well_known::Rfc3339;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::pem::Pem;
use x509_parser::prelude::FromDer;

/// What we report about one certificate (status, logs, connector rules).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub subject: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// SAN dNSNames, or the subject CNs when the certificate has no dNSName (RFC 6125 6.4.4).
    /// Unfiltered: a caller that writes them anywhere checks them first.
    pub names: Vec<String>,
}

impl CertInfo {
    /// Parses one DER-encoded certificate.
    pub fn from_der(der: &[u8]) -> Result<CertInfo, String> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| format!("bad certificate: {e}"))?;
        Ok(CertInfo::of(&cert))
    }

    fn of(cert: &X509Certificate<'_>) -> CertInfo {
        let mut names = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for n in &san.value.general_names {
                if let GeneralName::DNSName(d) = n {
                    names.push(d.to_string());
                }
            }
        }
        if names.is_empty() {
            for cn in cert.subject().iter_common_name() {
                if let Ok(s) = cn.as_str() {
                    names.push(s.to_string());
                }
            }
        }
        let validity = cert.validity();
        CertInfo {
            subject: cert.subject().to_string(),
            not_before: validity.not_before.to_datetime(),
            not_after: validity.not_after.to_datetime(),
            names,
        }
    }

    pub fn not_after_rfc3339(&self) -> String {
        rfc3339(self.not_after)
    }
}

pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// Every certificate in a PEM blob, in order. Fails when a PEM block that should hold a
/// certificate does not parse, or when there is no certificate at all. Non-certificate blocks
/// (keys, parameters) are skipped.
pub fn parse_pem_certificates(pem: &[u8]) -> Result<Vec<CertInfo>, String> {
    let mut out = Vec::new();
    for (i, block) in Pem::iter_from_buffer(pem).enumerate() {
        let block = match block {
            Ok(b) => b,
            // iter_from_buffer reports trailing garbage / end of input as an error: stop at the
            // first error once certificates were found, fail otherwise.
            Err(e) if out.is_empty() => return Err(format!("PEM block {i} does not parse: {e}")),
            Err(_) => break,
        };
        if block.label != "CERTIFICATE" {
            continue;
        }
        let cert = block
            .parse_x509()
            .map_err(|e| format!("certificate {i} does not parse: {e}"))?;
        out.push(CertInfo::of(&cert));
    }
    if out.is_empty() {
        return Err("no PEM certificate found".into());
    }
    Ok(out)
}

/// Whether a PEM blob holds a private key block.
pub fn has_private_key(pem: &[u8]) -> bool {
    Pem::iter_from_buffer(pem)
        .map_while(Result::ok)
        .any(|b| b.label.ends_with("PRIVATE KEY"))
}

/// Certificates within `days` of expiry (not yet expired).
pub fn expiring_within(certs: &[CertInfo], now: OffsetDateTime, days: i64) -> Vec<&CertInfo> {
    let horizon = now + ::time::Duration::days(days);
    certs
        .iter()
        .filter(|c| c.not_after > now && c.not_after <= horizon)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair};
    use time::Duration;

    fn self_signed(
        sans: &[&str],
        cn: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> (rcgen::Certificate, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.not_before = not_before;
        params.not_after = not_after;
        (params.self_signed(&key).unwrap(), key)
    }

    #[test]
    fn parses_subject_and_expiry() {
        let now = OffsetDateTime::now_utc();
        let (cert, key) = self_signed(
            &["ca.contoso.com"],
            "ca.contoso.com",
            now - Duration::days(1),
            now + Duration::days(10),
        );
        let pem = cert.pem();
        let key = key.serialize_pem();
        let certs = parse_pem_certificates(pem.as_bytes()).unwrap();
        assert_eq!(certs.len(), 1);
        assert_eq!(certs[0].subject, "CN=ca.contoso.com");
        assert_eq!(
            certs[0].not_after.unix_timestamp(),
            (now + Duration::days(10)).unix_timestamp()
        );
        assert_eq!(expiring_within(&certs, now, 14).len(), 1);
        assert_eq!(expiring_within(&certs, now, 5).len(), 0);
        assert!(has_private_key(key.as_bytes()));
        assert!(!has_private_key(pem.as_bytes()));
        // a bundle of two
        let (cert2, _) = self_signed(&["b"], "b", now, now + Duration::days(100));
        let both = format!("{pem}{}", cert2.pem());
        assert_eq!(parse_pem_certificates(both.as_bytes()).unwrap().len(), 2);
    }

    #[test]
    fn names_are_sans_or_else_common_names_and_pem_and_der_agree() {
        let now = OffsetDateTime::now_utc();
        let (cert, _) = self_signed(
            &["mail.contoso.com", "mx.contoso.com"],
            "ignored.contoso.com",
            now,
            now + Duration::days(1),
        );
        let der = CertInfo::from_der(cert.der()).unwrap();
        assert_eq!(der.names, ["mail.contoso.com", "mx.contoso.com"]);
        assert_eq!(
            parse_pem_certificates(cert.pem().as_bytes()).unwrap(),
            vec![der]
        );
        let (cert, _) = self_signed(&[], "cn-only.contoso.com", now, now + Duration::days(1));
        assert_eq!(
            CertInfo::from_der(cert.der()).unwrap().names,
            ["cn-only.contoso.com"]
        );
        assert!(CertInfo::from_der(b"not a certificate").is_err());
    }

    #[test]
    fn refuses_garbage() {
        assert!(parse_pem_certificates(b"hello").is_err());
        assert!(parse_pem_certificates(b"").is_err());
        let bad = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(parse_pem_certificates(bad.as_bytes()).is_err());
    }
}
