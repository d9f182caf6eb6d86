//! From results to what the session does: the `auth=` token of X-Partnergate-Connector, and
//! the refusal (reply and rule) when a required check does not pass. Pure, so every branch of
//! the reply table in docs/gateway.md is a unit test.

use mail_auth::{DkimResult, DmarcResult, SpfResult};

use super::body::Slot;
use super::headers::HeaderProblem;
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

/// One DKIM signature's result before the body, and what the body must hash to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureResult {
    /// `d=`, lower case.
    pub domain: String,
    pub outcome: Outcome,
    pub slot: Slot,
    /// The `bh=` the signature claims.
    pub body_hash: Vec<u8>,
    /// Alone, this signature's pass would make DMARC's DKIM half pass (aligned with From:).
    pub aligned: bool,
    /// Stamped `dkim=pass` before the body: the decision rests on it, so a body that breaks
    /// it refuses the message. Other pre-body passes are stamped `neutral`.
    pub stamped_pass: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmarcSummary {
    pub outcome: Outcome,
    /// The From: domain (lower case).
    pub domain: String,
    pub policy_reject: bool,
    /// SPF's half of DMARC passed (aligned with From:), so the result does not rest on DKIM.
    pub spf_aligned: bool,
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

fn under(d: &str, base: &str) -> bool {
    d == base
        || (d.len() > base.len() + 1
            && d.ends_with(base)
            && d.as_bytes()[d.len() - base.len() - 1] == b'.')
}

/// Whether a signature of `d=` vouches for the envelope sender's domain `sender` (the HELO
/// name for `<>`) on behalf of a partner whose connector lists `partner` (`None`: unclaimed).
/// `d=` must be the sender's domain or a subdomain of it, or a parent of it — and, for a
/// claimed connector, at or below one of its `domains` (`*.x` counts as `x`): a parent above
/// the partner's own domains (`example`, `co.uk`: a public suffix anyone can register under)
/// and a signer outside them (a null sender's HELO) prove nothing about the partner. A `*`
/// connector has no domain to bound a parent by, so only the sender's domain and its
/// subdomains count there.
pub fn signer_counts(d: &str, sender: &str, partner: Option<&[String]>) -> bool {
    let d = d.trim_end_matches('.').to_ascii_lowercase();
    let s = sender.trim_end_matches('.').to_ascii_lowercase();
    if d.is_empty() || s.is_empty() {
        return false;
    }
    let in_partner = |x: &str| {
        partner.is_some_and(|p| {
            p.iter().any(|pat| {
                let base = pat.trim_end_matches('.');
                let base = base.strip_prefix("*.").unwrap_or(base);
                base != "*" && under(x, &base.to_ascii_lowercase())
            })
        })
    };
    let anyone = partner.is_none_or(|p| p.iter().any(|pat| pat == "*"));
    if under(&d, &s) {
        anyone || in_partner(&d)
    } else {
        under(&s, &d) && in_partner(&d)
    }
}

/// The DKIM result that counts for `senderAuthentication: DKIM`: a pass of a signature that
/// [`signer_counts`], else a temperror if a lookup failed, else fail (signed) or none
/// (unsigned).
pub fn dkim_for_sender(
    signatures: &[SignatureResult],
    sender_domain: &str,
    partner: Option<&[String]>,
) -> Outcome {
    let mine = || {
        signatures
            .iter()
            .filter(|s| signer_counts(&s.domain, sender_domain, partner))
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

/// Marks the pre-body passes the plan's decision rests on (see
/// [`SignatureResult::stamped_pass`]): required DKIM, the signatures that count for the
/// sender; DMARC (required, or unclaimed under a `p=reject` policy), the aligned signatures
/// when SPF gave no aligned pass. Evaluated only (`Stamp`), none: nothing is refused there, so
/// nothing before the body is stamped `pass`.
pub fn mark_stamped_passes(
    plan: &Plan,
    signatures: &mut [SignatureResult],
    dmarc: Option<&DmarcSummary>,
    sender_domain: &str,
    partner: Option<&[String]>,
) {
    let dmarc_rests_on_dkim = dmarc.is_some_and(|d| d.outcome == Outcome::Pass && !d.spf_aligned);
    for s in signatures.iter_mut() {
        s.stamped_pass = s.outcome == Outcome::Pass
            && match plan.enforce {
                Enforce::Dkim => signer_counts(&s.domain, sender_domain, partner),
                Enforce::Dmarc => dmarc_rests_on_dkim && s.aligned,
                Enforce::DmarcReject => {
                    dmarc_rests_on_dkim && s.aligned && dmarc.is_some_and(|d| d.policy_reject)
                }
                Enforce::Nothing | Enforce::Spf => false,
            };
    }
}

/// DMARC passed on DKIM alone and none of the aligned signatures is stamped `pass`: the stamp
/// must not claim a DMARC pass the body could still take back.
pub fn dmarc_pass_rests_on_unstamped(d: &DmarcSummary, signatures: &[SignatureResult]) -> bool {
    d.outcome == Outcome::Pass
        && !d.spf_aligned
        && !signatures.iter().any(|s| s.aligned && s.stamped_pass)
}

/// Whether the From: domain is one of the partner's `domains` (the claim's matching; `*`
/// matches any). DMARC proves who the From: domain is, not that it is this partner's.
fn from_is_partners(domain: &str, partner: Option<&[String]>) -> bool {
    partner.is_none_or(|p| {
        p.iter()
            .any(|pat| crate::policy::domain_match(pat, domain).is_some())
    })
}

/// At the end of the header section, for DKIM, DMARC and unclaimed `p=reject`. `dkim`: the
/// DKIM result when it was decided without signatures (no resolver: `temperror`; header
/// section not evaluated: `permerror`), else `None` and it is derived from `signatures`.
/// `partner`: the claiming connector's `domains`.
#[allow(clippy::too_many_arguments)]
pub fn message_refusal(
    plan: &Plan,
    signatures: &[SignatureResult],
    dkim: Option<Outcome>,
    dmarc: Option<&DmarcSummary>,
    problem: Option<HeaderProblem>,
    sender_domain: &str,
    partner: Option<&[String]>,
    connector: &str,
) -> Option<Refusal> {
    match plan.enforce {
        Enforce::Nothing | Enforce::Spf => None,
        Enforce::Dkim => {
            let outcome =
                dkim.unwrap_or_else(|| dkim_for_sender(signatures, sender_domain, partner));
            let reply = match outcome {
                Outcome::Pass => return None,
                Outcome::TempError => replies::temperror("DKIM"),
                Outcome::PermError if signatures.is_empty() => replies::dkim_failed(&format!(
                    "the header section could not be evaluated (permerror: {})",
                    problem.map_or("not parsable", HeaderProblem::reason)
                )),
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
            if problem == Some(HeaderProblem::MultipleFrom) {
                return Some(Refusal {
                    reply: replies::dmarc_failed(
                        "the message",
                        HeaderProblem::MultipleFrom.reason(),
                    ),
                    rule: "dmarc",
                });
            }
            let (outcome, domain) =
                dmarc.map_or((Outcome::None, ""), |d| (d.outcome, d.domain.as_str()));
            let reply = match outcome {
                Outcome::Pass if from_is_partners(domain, partner) => return None,
                Outcome::Pass => {
                    return Some(Refusal {
                        reply: replies::dmarc_failed(
                            domain,
                            &format!(
                                "the From: domain is not a domain of partner connector {connector}"
                            ),
                        ),
                        rule: "dmarcFromDomain",
                    });
                }
                Outcome::TempError => replies::temperror("DMARC"),
                Outcome::None if domain.is_empty() => {
                    replies::dmarc_failed("the message", "no single From: domain")
                }
                Outcome::None => {
                    replies::dmarc_failed(domain, "the domain publishes no DMARC policy")
                }
                // Not evaluated (header section over the limit or malformed) or a broken
                // record.
                Outcome::PermError => replies::dmarc_failed(
                    if domain.is_empty() {
                        "the message"
                    } else {
                        domain
                    },
                    &format!(
                        "permanent error (permerror{})",
                        problem
                            .map(|p| format!(": {}", p.reason()))
                            .unwrap_or_default()
                    ),
                ),
                _ => replies::dmarc_failed(domain, "no SPF or DKIM pass aligned with From:"),
            };
            Some(Refusal {
                reply,
                rule: "dmarc",
            })
        }
        Enforce::DmarcReject => {
            // A section DMARC cannot judge as it stands could hide a From: of a p=reject
            // domain (a second field, one past a line parsers disagree on, one past the hold
            // limit): refused, since whether its policy is p=reject cannot be known.
            let reply = match problem {
                Some(HeaderProblem::OverLimit) => Some(replies::header_too_large()),
                Some(p) => Some(replies::dmarc_failed("the message", p.reason())),
                None => None,
            };
            if let Some(reply) = reply {
                return Some(Refusal {
                    reply,
                    rule: "dmarcReject",
                });
            }
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

/// The results once the body is hashed: each pre-body pass whose claimed body hash is not
/// what the body hashed to becomes `fail`.
pub struct BodyVerdict {
    pub signatures: Vec<SignatureResult>,
    /// `d=` of the signatures stamped `pass` that the body broke: the stamp would lie, so the
    /// message is refused.
    pub broken_stamped: Vec<String>,
}

pub fn body_verdict(signatures: &[SignatureResult], computed: &[(Slot, Vec<u8>)]) -> BodyVerdict {
    let mut out = signatures.to_vec();
    let mut broken_stamped = Vec::new();
    for s in out.iter_mut().filter(|s| s.outcome == Outcome::Pass) {
        let intact = computed
            .iter()
            .find(|(slot, _)| *slot == s.slot)
            .is_some_and(|(_, h)| *h == s.body_hash);
        if !intact {
            s.outcome = Outcome::Fail;
            if s.stamped_pass {
                broken_stamped.push(s.domain.clone());
            }
        }
    }
    BodyVerdict {
        signatures: out,
        broken_stamped,
    }
}

/// The DMARC result once the body is hashed: a pass that rested on DKIM alone stands only if
/// an aligned signature survived the body.
pub fn dmarc_after_body(d: &DmarcSummary, signatures: &[SignatureResult]) -> Outcome {
    if d.outcome == Outcome::Pass
        && !d.spf_aligned
        && !signatures
            .iter()
            .any(|s| s.aligned && s.outcome == Outcome::Pass)
    {
        Outcome::Fail
    } else {
        d.outcome
    }
}

/// The refusal for a stamped DKIM pass the body broke.
pub fn body_changed_refusal(plan: &Plan, domains: &[String]) -> Refusal {
    let why = format!(
        "the body does not match the DKIM signature of {} (altered after signing)",
        domains.join(", ")
    );
    match plan.enforce {
        Enforce::Dmarc | Enforce::DmarcReject => Refusal {
            reply: replies::dmarc_failed(domains.first().map_or("", String::as_str), &why),
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
            aligned: false,
            stamped_pass: false,
        }
    }

    fn plan(s: S) -> Plan {
        Plan::for_transaction(Some(s), false, U::None)
    }

    fn code(r: Option<Refusal>) -> Option<String> {
        r.map(|r| format!("{} {}", r.reply.code, r.reply.esc_string()))
    }

    fn contoso() -> Vec<String> {
        vec!["contoso.example".into(), "*.contoso.example".into()]
    }

    /// `message_refusal` for a claimed connector of `contoso()`.
    fn refusal(
        p: &Plan,
        sigs: &[SignatureResult],
        dkim: Option<Outcome>,
        dmarc: Option<&DmarcSummary>,
        problem: Option<HeaderProblem>,
        sender_domain: &str,
    ) -> Option<String> {
        let partner = contoso();
        code(message_refusal(
            p,
            sigs,
            dkim,
            dmarc,
            problem,
            sender_domain,
            Some(&partner),
            "mail/contoso",
        ))
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
        let r = |sigs: &[SignatureResult]| refusal(&p, sigs, None, None, None, "contoso.example");
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
        let decided = |o| refusal(&p, &[], Some(o), None, None, "contoso.example");
        assert_eq!(decided(Outcome::TempError).as_deref(), Some("451 4.7.5"));
        assert_eq!(decided(Outcome::PermError).as_deref(), Some("550 5.7.1"));
    }

    /// Finding: a DKIM pass of a signer outside the partner's domains satisfied the connector
    /// (a null sender's HELO name, or a parent above the partner such as a public suffix).
    #[test]
    fn dkim_signers_are_bounded_by_the_partners_domains() {
        let p = plan(S::Dkim);
        // MAIL FROM:<> with HELO attacker.example: the sender domain is the HELO name.
        assert_eq!(
            refusal(
                &p,
                &[sig("attacker.example", Outcome::Pass)],
                None,
                None,
                None,
                "attacker.example"
            )
            .as_deref(),
            Some("550 5.7.1")
        );
        let partner = contoso();
        let c = Some(partner.as_slice());
        assert!(signer_counts("contoso.example", "contoso.example", c));
        assert!(signer_counts("contoso.example", "mail.contoso.example", c));
        assert!(signer_counts("mail.contoso.example", "contoso.example", c));
        // A parent above the partner's domains (a public suffix) proves nothing.
        assert!(!signer_counts("example", "contoso.example", c));
        let uk = vec!["contoso.co.uk".to_string()];
        assert!(!signer_counts("co.uk", "contoso.co.uk", Some(&uk)));
        // `*`: the sender's domain and below only; unclaimed (None) likewise.
        let star = vec!["*".to_string()];
        assert!(signer_counts("a.example", "a.example", Some(&star)));
        assert!(!signer_counts("example", "a.example", Some(&star)));
        assert!(!signer_counts("co.uk", "a.co.uk", None));
        assert!(signer_counts("mail.a.co.uk", "a.co.uk", None));
    }

    fn dm(outcome: Outcome, domain: &str, reject: bool) -> DmarcSummary {
        DmarcSummary {
            outcome,
            domain: domain.into(),
            policy_reject: reject,
            spf_aligned: false,
        }
    }

    #[test]
    fn dmarc_and_unclaimed_reject_tables() {
        let d = |outcome, reject| dm(outcome, "contoso.example", reject);
        let p = plan(S::Dmarc);
        let r = |x: Option<&DmarcSummary>| refusal(&p, &[], None, x, None, "contoso.example");
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
        let r = |x: Option<&DmarcSummary>| {
            code(message_refusal(
                &u,
                &[],
                None,
                x,
                None,
                "contoso.example",
                None,
                "none",
            ))
        };
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
                Some(HeaderProblem::Malformed),
                "x",
                None,
                "none"
            )),
            None
        );
    }

    /// Finding: `senderAuthentication: DMARC` was satisfied by a DMARC pass of any From:
    /// domain.
    #[test]
    fn dmarc_pass_counts_only_for_the_partners_from_domain() {
        let p = plan(S::Dmarc);
        let pass = |domain| dm(Outcome::Pass, domain, false);
        let r = |d: &DmarcSummary| refusal(&p, &[], None, Some(d), None, "contoso.example");
        assert_eq!(r(&pass("contoso.example")), None);
        assert_eq!(r(&pass("news.contoso.example")), None, "*.contoso.example");
        let refused = message_refusal(
            &p,
            &[],
            None,
            Some(&pass("attacker.example")),
            None,
            "contoso.example",
            Some(&contoso()),
            "mail/contoso",
        )
        .expect("refused");
        assert_eq!(refused.reply.code, 550);
        assert_eq!(refused.reply.esc, [5, 7, 26]);
        assert_eq!(refused.rule, "dmarcFromDomain");
        // `*` connectors take any From: domain.
        let star = vec!["*".to_string()];
        assert_eq!(
            code(message_refusal(
                &p,
                &[],
                None,
                Some(&pass("attacker.example")),
                None,
                "x.example",
                Some(&star),
                "mail/any"
            )),
            None
        );
    }

    /// Finding: EnforceDmarcReject accepted what DMARC cannot judge (two From: domains, an
    /// over-limit or malformed header section).
    #[test]
    fn unclaimed_reject_refuses_sections_dmarc_cannot_judge() {
        let u = Plan::for_transaction(None, false, U::EnforceDmarcReject);
        let r = |problem| {
            code(message_refusal(
                &u,
                &[],
                Some(Outcome::PermError),
                Some(&dm(Outcome::None, "", false)),
                Some(problem),
                "other.example",
                None,
                "none",
            ))
        };
        assert_eq!(
            r(HeaderProblem::MultipleFrom).as_deref(),
            Some("550 5.7.26")
        );
        assert_eq!(r(HeaderProblem::Malformed).as_deref(), Some("550 5.7.26"));
        assert_eq!(
            r(HeaderProblem::FromNotParsable).as_deref(),
            Some("550 5.7.26")
        );
        assert_eq!(r(HeaderProblem::OverLimit).as_deref(), Some("552 5.3.4"));
        // Required DMARC refuses several From: fields too.
        assert_eq!(
            refusal(
                &plan(S::Dmarc),
                &[],
                None,
                Some(&dm(Outcome::Pass, "contoso.example", false)),
                Some(HeaderProblem::MultipleFrom),
                "contoso.example"
            )
            .as_deref(),
            Some("550 5.7.26")
        );
    }

    /// Finding: a stale signature stamped pass refused good mail whatever the plan. Only the
    /// passes the decision rests on are stamped `pass`, and only those refuse when broken.
    #[test]
    fn only_deciding_passes_are_stamped_and_refuse_when_the_body_breaks_them() {
        let partner = contoso();
        let c = Some(partner.as_slice());
        let mut list = sig("lists.example", Outcome::Pass);
        list.body_hash = vec![7];
        let mut sigs = vec![sig("contoso.example", Outcome::Pass), list];
        // Required DKIM for contoso: contoso's signature is the deciding one.
        mark_stamped_passes(&plan(S::Dkim), &mut sigs, None, "contoso.example", c);
        assert!(sigs[0].stamped_pass && !sigs[1].stamped_pass);
        // The list's signature is stale (the body hashes to contoso's claim): no refusal.
        let v = body_verdict(&sigs, &[(SLOT, vec![1, 2, 3])]);
        assert!(v.broken_stamped.is_empty());
        assert_eq!(v.signatures[1].outcome, Outcome::Fail);
        assert_eq!(v.signatures[0].outcome, Outcome::Pass);
        // The deciding one broken: refused.
        let v = body_verdict(&sigs, &[(SLOT, vec![7])]);
        assert_eq!(v.broken_stamped, ["contoso.example"]);
        assert_eq!(v.signatures[1].outcome, Outcome::Pass);
        assert_eq!(
            body_changed_refusal(&plan(S::Dkim), &v.broken_stamped)
                .reply
                .esc,
            [5, 7, 1]
        );
        // No hash computed for a slot: no pass.
        assert_eq!(body_verdict(&sigs, &[]).broken_stamped, ["contoso.example"]);
        // Stamp: nothing stamped pass, so nothing refused.
        let stamp = Plan::for_transaction(None, false, U::Stamp);
        mark_stamped_passes(&stamp, &mut sigs, None, "contoso.example", None);
        assert!(sigs.iter().all(|s| !s.stamped_pass));
        assert!(
            body_verdict(&sigs, &[(SLOT, vec![0])])
                .broken_stamped
                .is_empty()
        );
        // DMARC: when SPF is aligned the DKIM passes decide nothing.
        let mut d = dm(Outcome::Pass, "contoso.example", false);
        d.spf_aligned = true;
        sigs[0].aligned = true;
        mark_stamped_passes(&plan(S::Dmarc), &mut sigs, Some(&d), "contoso.example", c);
        assert!(sigs.iter().all(|s| !s.stamped_pass));
        // … when it is not, the aligned pass decides; a broken one makes DMARC fail.
        d.spf_aligned = false;
        mark_stamped_passes(&plan(S::Dmarc), &mut sigs, Some(&d), "contoso.example", c);
        assert!(sigs[0].stamped_pass && !sigs[1].stamped_pass);
        assert!(!dmarc_pass_rests_on_unstamped(&d, &sigs));
        let v = body_verdict(&sigs, &[(SLOT, vec![7])]);
        assert_eq!(dmarc_after_body(&d, &v.signatures), Outcome::Fail);
        assert_eq!(
            body_changed_refusal(&plan(S::Dmarc), &v.broken_stamped)
                .reply
                .esc,
            [5, 7, 26]
        );
        // Unclaimed EnforceDmarcReject without p=reject: nothing would refuse, nothing is
        // stamped pass, and DMARC's pass is not claimed before the body.
        let u = Plan::for_transaction(None, false, U::EnforceDmarcReject);
        mark_stamped_passes(&u, &mut sigs, Some(&d), "contoso.example", None);
        assert!(sigs.iter().all(|s| !s.stamped_pass));
        assert!(dmarc_pass_rests_on_unstamped(&d, &sigs));
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
