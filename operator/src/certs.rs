//! Certificate facts for status (`status.certificates`) and expiry checks: the parsing lives in
//! partnergate-core, shared with the gateway; this module adds test certificates.

pub use partnergate_core::certs::{
    CertInfo, expiring_within, has_private_key, parse_pem_certificates,
};

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
