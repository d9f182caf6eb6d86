//! DNSSEC-validated TLSA lookups for DANE (RFC 7672 2.2) on the validating resolver of
//! [`crate::mx::MxResolver`], and the classification of hickory's answers and errors into
//! [`DaneState`].
//!
//! Invariant: only an answer whose every TLSA record hickory proved `Secure` yields records;
//! a `Bogus` proof anywhere, or hickory's "DNSSEC validation failed" error, is `Bogus`;
//! an unsigned (insecure) answer is `Insecure` even when it carries records, so a forged
//! unsigned TLSA record never authenticates anything.

use hickory_resolver::TokioResolver;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::dnssec::Proof;
use hickory_resolver::proto::rr::{RData, RecordType};

use super::DaneState;
use super::dane::Tlsa;

/// hickory's error for a failed DNSSEC validation.
pub fn is_bogus(e: &NetError) -> bool {
    match e {
        NetError::Dns(DnsError::DnssecBogus) => true,
        NetError::Dns(DnsError::Nsec { proof, .. }) => *proof == Proof::Bogus,
        _ => false,
    }
}

/// A negative answer hickory classified by its NSEC proof (insecure or indeterminate).
pub fn is_denial(e: &NetError) -> bool {
    matches!(e, NetError::Dns(DnsError::Nsec { .. })) && !is_bogus(e)
}

/// Classifies the TLSA records of an answer by their proofs.
pub fn classify(records: Vec<(Proof, Tlsa)>) -> DaneState {
    if records.iter().any(|(p, _)| *p == Proof::Bogus) {
        return DaneState::Bogus("a TLSA record failed DNSSEC validation".into());
    }
    if records.is_empty() {
        return DaneState::NoRecords;
    }
    if records.iter().any(|(p, _)| *p != Proof::Secure) {
        return DaneState::Insecure;
    }
    let usable: Vec<Tlsa> = records
        .into_iter()
        .map(|(_, t)| t)
        .filter(Tlsa::usable)
        .collect();
    if usable.is_empty() {
        DaneState::NoRecords
    } else {
        DaneState::Secure(usable)
    }
}

/// The TLSA records at `_<port>._tcp.<host>`.
pub async fn tlsa(resolver: &TokioResolver, host: &str, port: u16) -> DaneState {
    let name = format!("_{port}._tcp.{}.", host.trim_end_matches('.'));
    match resolver.lookup(name.as_str(), RecordType::TLSA).await {
        Ok(l) => classify(
            l.answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::TLSA(t) => Some((
                        r.proof,
                        Tlsa {
                            usage: u8::from(t.cert_usage),
                            selector: u8::from(t.selector),
                            matching: u8::from(t.matching),
                            data: t.cert_data.clone(),
                        },
                    )),
                    _ => None,
                })
                .collect(),
        ),
        Err(e) if is_bogus(&e) => DaneState::Bogus(format!("{name}: {e}")),
        Err(e) if is_denial(&e) => DaneState::Insecure,
        Err(e) if e.is_no_records_found() || e.is_nx_domain() => DaneState::NoRecords,
        Err(e) => DaneState::Failed(format!("{name}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(usage: u8) -> Tlsa {
        Tlsa {
            usage,
            selector: 1,
            matching: 1,
            data: vec![7; 32],
        }
    }

    #[test]
    fn proofs_classify_answers() {
        assert_eq!(classify(vec![]), DaneState::NoRecords);
        assert_eq!(
            classify(vec![(Proof::Secure, t(3)), (Proof::Secure, t(1))]),
            DaneState::Secure(vec![t(3)])
        );
        assert_eq!(classify(vec![(Proof::Secure, t(1))]), DaneState::NoRecords);
        assert_eq!(classify(vec![(Proof::Insecure, t(3))]), DaneState::Insecure);
        assert_eq!(
            classify(vec![(Proof::Indeterminate, t(3))]),
            DaneState::Insecure
        );
        assert!(matches!(
            classify(vec![(Proof::Secure, t(3)), (Proof::Bogus, t(3))]),
            DaneState::Bogus(_)
        ));
    }
}
