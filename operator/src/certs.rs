//! PEM certificate parsing for status (`status.certificates`) and expiry checks. Pure.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use x509_parser::pem::Pem;

/// One certificate found in a PEM blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub subject: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl CertInfo {
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
        let validity = cert.validity();
        out.push(CertInfo {
            subject: cert.subject().to_string(),
            not_before: validity.not_before.to_datetime(),
            not_after: validity.not_after.to_datetime(),
        });
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
    let horizon = now + time::Duration::days(days);
    certs
        .iter()
        .filter(|c| c.not_after > now && c.not_after <= horizon)
        .collect()
}

#[cfg(test)]
pub(crate) mod testing {
    //! Test certificates made with rcgen.
    use rcgen::{CertificateParams, DnType, KeyPair};
    use time::OffsetDateTime;

    /// (cert PEM, key PEM) of a self-signed certificate with the given CN and validity.
    pub fn self_signed(
        cn: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> (String, String) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec![cn.to_string()]).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.self_signed(&key).expect("cert");
        (cert.pem(), key.serialize_pem())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::Duration;

    #[test]
    fn parses_subject_and_expiry() {
        let now = OffsetDateTime::now_utc();
        let (pem, key) = testing::self_signed(
            "ca.contoso.com",
            now - Duration::days(1),
            now + Duration::days(10),
        );
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
        let (pem2, _) = testing::self_signed("b", now, now + Duration::days(100));
        let both = format!("{pem}{pem2}");
        assert_eq!(parse_pem_certificates(both.as_bytes()).unwrap().len(), 2);
    }

    #[test]
    fn refuses_garbage() {
        assert!(parse_pem_certificates(b"hello").is_err());
        assert!(parse_pem_certificates(b"").is_err());
        let bad = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(parse_pem_certificates(bad.as_bytes()).is_err());
    }
}
