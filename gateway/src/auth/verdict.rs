//! From results to what the session does: the `auth=` token of X-Partnergate-Connector, and
//! the refusal (reply and rule) when a required check does not pass. Pure, so every branch of
//! the reply table in docs/gateway.md is a unit test.

use mail_auth::{DkimResult, DmarcResult, SpfResult};

use super::body::Slot;
use super::plan::{Enforce, Plan};
use crate::reply::{Reply, auth as replies};

/// RFC 8601 result words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail,
    SoftFail,
    Neutral,
    None,
    TempError,
    PermError,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail => "fail",
            Outcome::SoftFail => "softfail",
            Outcome::Neutral => "neutral",
            Outcome::None => "none",
            Outcome::TempError => "temperror",
            Outcome::PermError => "permerror",
        }
    }

    pub fn spf(r: SpfResult) -> Outcome {
        match r {
            SpfResult::Pass => Outcome::Pass,
            SpfResult::Fail => Outcome::Fail,
            SpfResult::SoftFail => Outcome::SoftFail,
            SpfResult::Neutral => Outcome::Neutral,
            SpfResult::TempError => Outcome::TempError,
            SpfResult::PermError => Outcome::PermError,
            SpfResult::None => Outcome::None,
        }
    }

    pub fn dkim(r: &DkimResult) -> Outcome {
        match r {
            DkimResult::Pass => Outcome::Pass,
            DkimResult::Neutral(_) => Outcome::Neutral,
            DkimResult::Fail(_) => Outcome::Fail,
            DkimResult::PermError(_) => Outcome::PermError,
            DkimResult::TempError(_) => Outcome::TempError,
            DkimResult::None => Outcome::None,
        }
    }

    pub fn dmarc(r: &DmarcResult) -> Outcome {
        match r {
            DmarcResult::Pass => Outcome::Pass,
            DmarcResult::Fail(_) => Outcome::Fail,
            DmarcResult::TempError(_) => Outcome::TempError,
            DmarcResult::PermError(_) => Outcome::PermError,
            DmarcResult::None => Outcome::None,
        }
    }
}

/// One DKIM signature's result as stamped before the body, and what the body must hash to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureResult {
    pub domain: String,
    pub outcome: Outcome,
    pub slot: Slot,
    /// The `bh=` the signature claims.
    pub body_hash: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmarcSummary {
    pub outcome: Outcome,
    /// The From: domain.
    pub domain: String,
    pub policy_reject: bool,
}

/// A refusal: reply and the rule it is counted and logged under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reply: Reply,
    pub rule: &'static str,
}

/// At MAIL FROM, for `senderAuthentication: SPF`.
pub fn spf_refusal(plan: &Plan, spf: Outcome, domain: &str) -> Option<Refusal> {
    if plan.enforce != Enforce::Spf {
        return None;
    }
    let reply = match spf {
        Outcome::Pass => return None,
        Outcome::TempError => replies::spf_temperror(domain),
        Outcome::PermError => replies::spf_permerror(domain),
        other => replies::spf_failed(other.as_str(), domain),
    };
    Some(Refusal { reply, rule: "spf" })
}

/// `d=` may vouch for the envelope sender's domain: the same, a parent or a subdomain.
fn related(d: &str, sender_domain: &str) -> bool {
    let d = d.trim_end_matches('.').to_ascii_lowercase();
    let s = sender_domain.trim_end_matches('.').to_ascii_lowercase();
    !d.is_empty() && (d == s || s.ends_with(&format!(".{d}")) || d.ends_with(&format!(".{s}")))
}

/// The DKIM result that counts for `senderAuthentication: DKIM`: a pass of a signature whose
/// domain is related to the envelope sender's (any other signer proves nothing about the
/// partner), else a temperror if a lookup failed, else fail (signed) or none (unsigned).
pub fn dkim_for_sender(signatures: &[SignatureResult], sender_domain: &str) -> Outcome {
    let mine = || {
        signatures
            .iter()
            .filter(|s| related(&s.domain, sender_domain))
    };
    if mine().any(|s| s.outcome == Outcome::Pass) {
        Outcome::Pass
    } else if mine().any(|s| s.outcome == Outcome::TempError) {
        Outcome::TempError
    } else if signatures.is_empty() {
        Outcome::None
    } else {
        Outcome::Fail
    }
}

/// At the end of the header section, for DKIM, DMARC and unclaimed `p=reject`. `dkim`: the
/// DKIM result when it was decided without signatures (no resolver: `temperror`; header
/// section not evaluated: `permerror`), else `None` and it is derived from `signatures`.
pub fn message_refusal(
    plan: &Plan,
    signatures: &[SignatureResult],
    dkim: Option<Outcome>,
    dmarc: Option<&DmarcSummary>,
    sender_domain: &str,
) -> Option<Refusal> {
    match plan.enforce {
        Enforce::Nothing | Enforce::Spf => None,
        Enforce::Dkim => {
            let outcome = dkim.unwrap_or_else(|| dkim_for_sender(signatures, sender_domain));
            let reply = match outcome {
                Outcome::Pass => return None,
                Outcome::TempError => replies::temperror("DKIM"),
                Outcome::PermError if signatures.is_empty() => {
                    replies::dkim_failed("the header section could not be evaluated (permerror)")
                }
                Outcome::None => replies::dkim_failed(&format!(
                    "the message has no DKIM signature of {sender_domain}"
                )),
                _ => {
                    replies::dkim_failed(&format!("no DKIM signature of {sender_domain} verifies"))
                }
            };
            Some(Refusal {
                reply,
                rule: "dkim",
            })
        }
        Enforce::Dmarc => {
            let (outcome, domain) =
                dmarc.map_or((Outcome::None, ""), |d| (d.outcome, d.domain.as_str()));
            let reply = match outcome {
                Outcome::Pass => return None,
                Outcome::TempError => replies::temperror("DMARC"),
                Outcome::None if domain.is_empty() => {
                    replies::dmarc_failed("the message", "no single From: domain")
                }
                Outcome::None => {
                    replies::dmarc_failed(domain, "the domain publishes no DMARC policy")
                }
                // Not evaluated (header section over the limit) or a broken record.
                Outcome::PermError => replies::dmarc_failed(
                    if domain.is_empty() {
                        "the message"
                    } else {
                        domain
                    },
                    "permanent error (permerror)",
                ),
                _ => replies::dmarc_failed(domain, "no SPF or DKIM pass aligned with From:"),
            };
            Some(Refusal {
                reply,
                rule: "dmarc",
            })
        }
        Enforce::DmarcReject => {
            let d = dmarc?;
            let reply = match d.outcome {
                // The policy may be p=reject; whether it is cannot be known: never a pass.
                Outcome::TempError => replies::temperror("DMARC"),
                Outcome::Fail if d.policy_reject => {
                    replies::dmarc_failed(&d.domain, "failed, and the domain's policy is p=reject")
                }
                _ => return None,
            };
            Some(Refusal {
                reply,
                rule: "dmarcReject",
            })
        }
    }
}

/// At the end of DATA: the signatures stamped `pass` whose claimed body hash is not what the
/// body hashed to. Any such domain means the stamp would lie, so the message is refused.
pub fn broken_passes<'a>(
    signatures: &'a [SignatureResult],
    computed: &[(Slot, Vec<u8>)],
) -> Vec<&'a str> {
    signatures
        .iter()
        .filter(|s| s.outcome == Outcome::Pass)
        .filter(|s| {
            computed
                .iter()
                .find(|(slot, _)| *slot == s.slot)
                .is_none_or(|(_, h)| *h != s.body_hash)
        })
        .map(|s| s.domain.as_str())
        .collect()
}

/// The refusal for a stamped DKIM pass the body broke.
pub fn body_changed_refusal(plan: &Plan, domains: &[&str]) -> Refusal {
    let why = format!(
        "the body does not match the DKIM signature of {} (altered after signing)",
        domains.join(", ")
    );
    match plan.enforce {
        Enforce::Dmarc | Enforce::DmarcReject => Refusal {
            reply: replies::dmarc_failed(domains.first().copied().unwrap_or(""), &why),
            rule: "dkimBodyHash",
        },
        _ => Refusal {
            reply: replies::dkim_failed(&why),
            rule: "dkimBodyHash",
        },
    }
}

/// `auth=<mechanism>:<result>` for X-Partnergate-Connector: the required mechanism, else the
/// strongest evaluated one.
pub fn auth_token(
    plan: &Plan,
    spf: Option<Outcome>,
    dkim: Option<Outcome>,
    dmarc: Option<Outcome>,
) -> Option<String> {
    let pick = match plan.enforce {
        Enforce::Spf => ("spf", spf),
        Enforce::Dkim => ("dkim", dkim),
        _ if plan.dmarc => ("dmarc", dmarc),
        _ if plan.dkim => ("dkim", dkim),
        _ => ("spf", spf),
    };
    if plan.is_off() {
        return None;
    }
    Some(format!(
        "{}:{}",
        pick.0,
        pick.1.unwrap_or(Outcome::None).as_str()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{SenderAuthentication as S, UnclaimedSenderAuthentication as U};
    use mail_auth::common::crypto::HashAlgorithm;
    use mail_auth::dkim::Canonicalization;

    const SLOT: Slot = (Canonicalization::Relaxed, HashAlgorithm::Sha256, 0);

    fn sig(domain: &str, outcome: Outcome) -> SignatureResult {
        SignatureResult {
            domain: domain.into(),
            outcome,
            slot: SLOT,
            body_hash: vec![1, 2, 3],
        }
    }

    fn plan(s: S) -> Plan {
        Plan::for_transaction(Some(s), false, U::None)
    }

    fn code(r: Option<Refusal>) -> Option<String> {
        r.map(|r| format!("{} {}", r.reply.code, r.reply.esc_string()))
    }

    #[test]
    fn spf_table() {
        let p = plan(S::Spf);
        assert_eq!(code(spf_refusal(&p, Outcome::Pass, "a.example")), None);
        for o in [
            Outcome::Fail,
            Outcome::SoftFail,
            Outcome::Neutral,
            Outcome::None,
        ] {
            assert_eq!(
                code(spf_refusal(&p, o, "a.example")).as_deref(),
                Some("550 5.7.23")
            );
        }
        assert_eq!(
            code(spf_refusal(&p, Outcome::PermError, "a")).as_deref(),
            Some("550 5.7.24")
        );
        assert_eq!(
            code(spf_refusal(&p, Outcome::TempError, "a")).as_deref(),
            Some("451 4.7.24")
        );
        // Evaluated but not required: never refused.
        let stamp = Plan::for_transaction(None, false, U::Stamp);
        assert_eq!(code(spf_refusal(&stamp, Outcome::Fail, "a")), None);
    }

    #[test]
    fn dkim_table_counts_only_the_senders_domain() {
        let p = plan(S::Dkim);
        let r = |sigs: &[SignatureResult]| {
            code(message_refusal(&p, sigs, None, None, "contoso.example"))
        };
        assert_eq!(r(&[sig("contoso.example", Outcome::Pass)]), None);
        assert_eq!(r(&[sig("mail.contoso.example", Outcome::Pass)]), None);
        assert_eq!(
            r(&[sig("evil.example", Outcome::Pass)]).as_deref(),
            Some("550 5.7.1")
        );
        assert_eq!(
            r(&[sig("notcontoso.example", Outcome::Pass)]).as_deref(),
            Some("550 5.7.1")
        );
        assert_eq!(r(&[]).as_deref(), Some("550 5.7.1"));
        assert_eq!(
            r(&[sig("contoso.example", Outcome::Fail)]).as_deref(),
            Some("550 5.7.1")
        );
        assert_eq!(
            r(&[sig("contoso.example", Outcome::TempError)]).as_deref(),
            Some("451 4.7.5")
        );
        // Decided without signatures: no resolver is a DNS error (451), never a 5xx.
        let decided = |o| code(message_refusal(&p, &[], Some(o), None, "contoso.example"));
        assert_eq!(decided(Outcome::TempError).as_deref(), Some("451 4.7.5"));
        assert_eq!(decided(Outcome::PermError).as_deref(), Some("550 5.7.1"));
    }

    #[test]
    fn dmarc_and_unclaimed_reject_tables() {
        let d = |outcome, reject| DmarcSummary {
            outcome,
            domain: "contoso.example".into(),
            policy_reject: reject,
        };
        let p = plan(S::Dmarc);
        let r =
            |x: Option<&DmarcSummary>| code(message_refusal(&p, &[], None, x, "contoso.example"));
        assert_eq!(r(Some(&d(Outcome::Pass, false))), None);
        assert_eq!(
            r(Some(&d(Outcome::Fail, false))).as_deref(),
            Some("550 5.7.26")
        );
        assert_eq!(
            r(Some(&d(Outcome::None, false))).as_deref(),
            Some("550 5.7.26")
        );
        assert_eq!(r(None).as_deref(), Some("550 5.7.26"));
        assert_eq!(
            r(Some(&d(Outcome::TempError, false))).as_deref(),
            Some("451 4.7.5")
        );
        let u = Plan::for_transaction(None, false, U::EnforceDmarcReject);
        let r =
            |x: Option<&DmarcSummary>| code(message_refusal(&u, &[], None, x, "contoso.example"));
        assert_eq!(
            r(Some(&d(Outcome::Fail, true))).as_deref(),
            Some("550 5.7.26")
        );
        assert_eq!(
            r(Some(&d(Outcome::Fail, false))),
            None,
            "p=none/quarantine: stamped only"
        );
        assert_eq!(r(Some(&d(Outcome::Pass, true))), None);
        assert_eq!(
            r(Some(&d(Outcome::TempError, false))).as_deref(),
            Some("451 4.7.5")
        );
        let s = Plan::for_transaction(None, false, U::Stamp);
        assert_eq!(
            code(message_refusal(
                &s,
                &[],
                None,
                Some(&d(Outcome::Fail, true)),
                "x"
            )),
            None
        );
    }

    #[test]
    fn a_stamped_pass_the_body_breaks_is_found() {
        let sigs = [
            sig("a.example", Outcome::Pass),
            sig("b.example", Outcome::Fail),
        ];
        assert!(broken_passes(&sigs, &[(SLOT, vec![1, 2, 3])]).is_empty());
        assert_eq!(broken_passes(&sigs, &[(SLOT, vec![9])]), ["a.example"]);
        assert_eq!(
            broken_passes(&sigs, &[]),
            ["a.example"],
            "no hash computed: no pass"
        );
        let r = body_changed_refusal(&plan(S::Dmarc), &["a.example"]);
        assert_eq!(r.reply.esc, [5, 7, 26]);
        assert_eq!(
            body_changed_refusal(&plan(S::Dkim), &["a"]).reply.esc,
            [5, 7, 1]
        );
    }

    #[test]
    fn auth_token_names_the_required_mechanism() {
        let pass = Some(Outcome::Pass);
        let fail = Some(Outcome::Fail);
        assert_eq!(
            auth_token(&plan(S::Spf), pass, None, None).as_deref(),
            Some("spf:pass")
        );
        assert_eq!(
            auth_token(&plan(S::Dkim), None, fail, None).as_deref(),
            Some("dkim:fail")
        );
        assert_eq!(
            auth_token(&plan(S::Dmarc), fail, pass, pass).as_deref(),
            Some("dmarc:pass")
        );
        assert_eq!(auth_token(&Plan::OFF, pass, pass, pass), None);
    }
}
