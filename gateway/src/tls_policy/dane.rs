//! DANE for SMTP (RFC 7672, RFC 7671), the pure part: which TLSA records are usable, and
//! whether a presented certificate chain matches them. No DNS here ([`super::dns`] looks the
//! records up and says whether they are DNSSEC-secure).
//!
//! Invariants (RFC 7672 3.1): only DANE-TA(2) and DANE-EE(3) are usable for SMTP, with
//! selectors Cert(0)/SPKI(1) and matching Full(0)/SHA2-256(1)/SHA2-512(2); PKIX-TA/PKIX-EE and
//! unknown parameters are ignored. A DANE-EE match authenticates the server by its key alone:
//! names and validity dates are not checked. A DANE-TA match needs the matched certificate in
//! the presented chain, a valid chain from the leaf to it (dates checked), and a leaf name that
//! matches one of the reference names (the MX host or smart host name).

use rustls_pki_types::{CertificateDer, UnixTime};
use sha2::{Digest, Sha256, Sha512};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::certs::name_matches;

/// One TLSA record's fields (RFC 6698 2.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tlsa {
    pub usage: u8,
    pub selector: u8,
    pub matching: u8,
    pub data: Vec<u8>,
}

impl std::fmt::Display for Tlsa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} {} {}",
            self.usage,
            self.selector,
            self.matching,
            hex::encode(&self.data)
        )
    }
}

pub const DANE_TA: u8 = 2;
pub const DANE_EE: u8 = 3;

impl Tlsa {
    /// Usable for SMTP per RFC 7672 3.1.
    pub fn usable(&self) -> bool {
        matches!(self.usage, DANE_TA | DANE_EE) && self.selector <= 1 && self.matching <= 2
    }
}

/// How the chain was authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaneMatch {
    EndEntity,
    /// Index in the presented chain of the certificate that matched a DANE-TA record.
    TrustAnchor(usize),
}

fn selected(cert: &[u8], selector: u8) -> Option<&[u8]> {
    match selector {
        0 => Some(cert),
        1 => X509Certificate::from_der(cert)
            .ok()
            .map(|(_, c)| c.tbs_certificate.subject_pki.raw),
        _ => None,
    }
}

/// Whether `cert` (DER) matches `rec`'s selector/matching/data.
pub fn cert_matches(rec: &Tlsa, cert: &[u8]) -> bool {
    let Some(content) = selected(cert, rec.selector) else {
        return false;
    };
    match rec.matching {
        0 => content == rec.data.as_slice(),
        1 => Sha256::digest(content).as_slice() == rec.data.as_slice(),
        2 => Sha512::digest(content).as_slice() == rec.data.as_slice(),
        _ => false,
    }
}

/// Checks a presented chain (leaf first) against the usable records among `records`.
/// `names`: reference identifiers for DANE-TA (RFC 7672 3.2.3).
pub fn check(
    records: &[Tlsa],
    chain: &[CertificateDer<'_>],
    names: &[String],
    now: UnixTime,
) -> Result<DaneMatch, String> {
    let Some((leaf, rest)) = chain.split_first() else {
        return Err("no certificate presented".into());
    };
    let usable: Vec<&Tlsa> = records.iter().filter(|r| r.usable()).collect();
    if usable.is_empty() {
        return Err("no usable TLSA record (only DANE-TA(2)/DANE-EE(3) count for SMTP)".into());
    }
    if usable
        .iter()
        .any(|r| r.usage == DANE_EE && cert_matches(r, leaf))
    {
        return Ok(DaneMatch::EndEntity);
    }
    let mut why = "no TLSA record matches the presented certificates".to_string();
    for (i, ta) in rest.iter().enumerate() {
        if !usable
            .iter()
            .any(|r| r.usage == DANE_TA && cert_matches(r, ta))
        {
            continue;
        }
        match verify_to(leaf, &rest[..i], ta, now) {
            Ok(()) => {}
            Err(e) => {
                why = format!("chain does not verify to the DANE-TA certificate: {e}");
                continue;
            }
        }
        let cert_names = crate::certs::CertInfo::from_der(leaf)
            .map(|i| i.names)
            .unwrap_or_default();
        if names
            .iter()
            .any(|n| cert_names.iter().any(|c| name_matches(n, c)))
        {
            return Ok(DaneMatch::TrustAnchor(i + 1));
        }
        why = format!(
            "certificate name mismatch (DANE-TA needs {}; certificate has {})",
            names.join(" or "),
            cert_names.join(", ")
        );
    }
    Err(why)
}

fn verify_to(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    ta: &CertificateDer<'_>,
    now: UnixTime,
) -> Result<(), webpki::Error> {
    let anchor = webpki::anchor_from_trusted_cert(ta)?;
    let ee = webpki::EndEntityCert::try_from(leaf)?;
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &[anchor],
        intermediates,
        now,
        webpki::KeyUsage::server_auth(),
        None,
        None,
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

    struct Chain {
        leaf: CertificateDer<'static>,
        ca: CertificateDer<'static>,
        leaf_spki: Vec<u8>,
    }

    fn chain(names: &[&str], expired: bool) -> Chain {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
        if expired {
            p.not_before = rcgen::date_time_ymd(2000, 1, 1);
            p.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }
        let leaf = p.signed_by(&key, &issuer).unwrap();
        Chain {
            leaf: leaf.der().clone(),
            ca: ca_cert.der().clone(),
            leaf_spki: selected(leaf.der(), 1).unwrap().to_vec(),
        }
    }

    fn rec(usage: u8, selector: u8, matching: u8, content: &[u8]) -> Tlsa {
        let data = match matching {
            0 => content.to_vec(),
            1 => Sha256::digest(content).to_vec(),
            _ => Sha512::digest(content).to_vec(),
        };
        Tlsa {
            usage,
            selector,
            matching,
            data,
        }
    }

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    /// DANE-EE, every selector/matching pair: the leaf's key authenticates, whatever its names
    /// and dates say.
    #[test]
    fn dane_ee_ignores_names_and_expiry() {
        let c = chain(&["other.example"], true);
        let presented = [c.leaf.clone(), c.ca.clone()];
        for selector in 0..=1u8 {
            for matching in 0..=2u8 {
                let content: &[u8] = if selector == 0 { &c.leaf } else { &c.leaf_spki };
                let r = rec(3, selector, matching, content);
                assert_eq!(
                    check(
                        &[r],
                        &presented,
                        &names(&["mx.partner.test"]),
                        UnixTime::now()
                    ),
                    Ok(DaneMatch::EndEntity),
                    "3 {selector} {matching}"
                );
            }
        }
        let wrong = chain(&["mx.partner.test"], false);
        let r = rec(3, 1, 1, &wrong.leaf_spki);
        assert!(
            check(
                &[r],
                &presented,
                &names(&["mx.partner.test"]),
                UnixTime::now()
            )
            .is_err()
        );
    }

    /// DANE-TA: the TA must be in the chain, the chain must verify to it (dates checked) and
    /// the leaf must carry the reference name.
    #[test]
    fn dane_ta_checks_chain_and_name() {
        let c = chain(&["mx.partner.test"], false);
        let presented = [c.leaf.clone(), c.ca.clone()];
        let want = names(&["mx.partner.test"]);
        for matching in 0..=2u8 {
            let r = rec(2, 0, matching, &c.ca);
            assert_eq!(
                check(&[r], &presented, &want, UnixTime::now()),
                Ok(DaneMatch::TrustAnchor(1))
            );
        }
        let r = rec(2, 0, 1, &c.ca);
        let e = check(
            std::slice::from_ref(&r),
            &presented,
            &names(&["mx.other.test"]),
            UnixTime::now(),
        );
        assert!(e.unwrap_err().contains("name mismatch"));
        // The TA only as a record, not in the chain: nothing to anchor to.
        assert!(
            check(
                std::slice::from_ref(&r),
                std::slice::from_ref(&c.leaf),
                &want,
                UnixTime::now()
            )
            .is_err()
        );
        let old = chain(&["mx.partner.test"], true);
        let r_old = rec(2, 0, 1, &old.ca);
        let e = check(&[r_old], &[old.leaf, old.ca], &want, UnixTime::now()).unwrap_err();
        assert!(e.contains("does not verify"), "{e}");
        // A DANE-TA record matching the leaf itself is not a trust anchor.
        let r_leaf = rec(2, 0, 1, &c.leaf);
        assert!(check(&[r_leaf], &presented, &want, UnixTime::now()).is_err());
    }

    #[test]
    fn pkix_usages_and_unknown_parameters_are_unusable() {
        let c = chain(&["mx.partner.test"], false);
        let presented = [c.leaf.clone(), c.ca.clone()];
        for r in [
            rec(1, 0, 1, &c.leaf),
            rec(0, 0, 1, &c.ca),
            Tlsa {
                usage: 3,
                selector: 2,
                matching: 1,
                data: vec![0; 32],
            },
            Tlsa {
                usage: 3,
                selector: 0,
                matching: 3,
                data: vec![0; 32],
            },
        ] {
            assert!(!r.usable(), "{r}");
            let e = check(
                &[r],
                &presented,
                &names(&["mx.partner.test"]),
                UnixTime::now(),
            );
            assert!(e.unwrap_err().contains("no usable"));
        }
    }
}
