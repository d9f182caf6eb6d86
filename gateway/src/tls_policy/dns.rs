//! DNSSEC-validated TLSA lookups for DANE (RFC 7672 2.2) on the validating resolver of
//! [`crate::mx::MxResolver`], and the classification of hickory's answers and errors into
//! [`DaneState`].
//!
//! Invariant: only an answer whose every TLSA record hickory proved `Secure` yields records;
//! a `Bogus` proof anywhere, or hickory's "DNSSEC validation failed" error, is `Bogus`;
//! an unsigned (insecure) answer is `Insecure` even when it carries records, so a forged
//! unsigned TLSA record never authenticates anything. Fail closed: only a proof of
//! `Insecure` counts as insecure; an `Indeterminate` one (the resolver could not tell) is a
//! failed lookup, which defers, never a reason to drop DANE. A secure RRset whose records are
//! all unusable is `Unusable` (STARTTLS still mandatory, RFC 7672 2.2), not "no records".

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

/// The DNSSEC proof of a negative answer (hickory's NSEC/NSEC3 classification), if the error
/// is one.
pub fn denial_proof(e: &NetError) -> Option<Proof> {
    match e {
        NetError::Dns(DnsError::Nsec { proof, .. }) => Some(*proof),
        _ => None,
    }
}

/// What the proofs of one RRset (or of its denial) say about it, failing closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    Secure,
    /// Proven insecure: no chain of trust reaches the name.
    Insecure,
    /// The resolver could not decide: treated as a failed lookup.
    Indeterminate,
    Bogus,
}

/// Combines the proofs of an RRset's records: any bogus is bogus, any indeterminate is
/// indeterminate, all secure is secure, otherwise (some proven insecure) insecure. An empty set
/// has nothing proven and is indeterminate.
pub fn security(proofs: impl IntoIterator<Item = Proof>) -> Security {
    let (mut any, mut bogus, mut indeterminate, mut insecure) = (false, false, false, false);
    for p in proofs {
        any = true;
        match p {
            Proof::Secure => {}
            Proof::Insecure => insecure = true,
            Proof::Bogus => bogus = true,
            Proof::Indeterminate => indeterminate = true,
        }
    }
    if bogus {
        Security::Bogus
    } else if indeterminate || !any {
        Security::Indeterminate
    } else if insecure {
        Security::Insecure
    } else {
        Security::Secure
    }
}

/// Classifies the TLSA records of an answer by their proofs.
pub fn classify(records: Vec<(Proof, Tlsa)>) -> DaneState {
    if records.is_empty() {
        return DaneState::NoRecords;
    }
    match security(records.iter().map(|(p, _)| *p)) {
        Security::Bogus => {
            return DaneState::Bogus("a TLSA record failed DNSSEC validation".into());
        }
        Security::Indeterminate => {
            return DaneState::Failed(
                "the DNSSEC status of the TLSA records is indeterminate".into(),
            );
        }
        Security::Insecure => return DaneState::Insecure,
        Security::Secure => {}
    }
    let usable: Vec<Tlsa> = records
        .into_iter()
        .map(|(_, t)| t)
        .filter(Tlsa::usable)
        .collect();
    if usable.is_empty() {
        DaneState::Unusable
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
        Err(e) if denial_proof(&e).is_some() => match denial_proof(&e).map(|p| security([p])) {
            Some(Security::Secure) => DaneState::NoRecords,
            Some(Security::Insecure) => DaneState::Insecure,
            _ => DaneState::Failed(format!(
                "{name}: the DNSSEC status of the denial is indeterminate ({e})"
            )),
        },
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
        // RFC 7672 2.2: a secure RRset of unusable records still mandates STARTTLS.
        assert_eq!(classify(vec![(Proof::Secure, t(1))]), DaneState::Unusable);
        assert_eq!(classify(vec![(Proof::Insecure, t(3))]), DaneState::Insecure);
        // Fail closed: "could not tell" is a failed lookup, not "insecure".
        assert!(matches!(
            classify(vec![(Proof::Indeterminate, t(3))]),
            DaneState::Failed(_)
        ));
        assert!(matches!(
            classify(vec![(Proof::Secure, t(3)), (Proof::Indeterminate, t(3))]),
            DaneState::Failed(_)
        ));
        assert_eq!(
            classify(vec![(Proof::Secure, t(3)), (Proof::Insecure, t(3))]),
            DaneState::Insecure
        );
        assert!(matches!(
            classify(vec![(Proof::Secure, t(3)), (Proof::Bogus, t(3))]),
            DaneState::Bogus(_)
        ));
    }

    #[test]
    fn proofs_combine_failing_closed() {
        use Proof::*;
        assert_eq!(security([Secure, Secure]), Security::Secure);
        assert_eq!(security([Secure, Insecure]), Security::Insecure);
        assert_eq!(security([Insecure, Indeterminate]), Security::Indeterminate);
        assert_eq!(security([Indeterminate]), Security::Indeterminate);
        assert_eq!(security([Secure, Bogus, Indeterminate]), Security::Bogus);
        assert_eq!(security([]), Security::Indeterminate);
    }
}
