//! The DNS-backed checks, with `mail-auth`: SPF (at MAIL FROM, or at DATA when not enforced),
//! DKIM and DMARC once the header section is complete, and the Authentication-Results header
//! (RFC 8601) that stamps them. Each step runs within [`AuthResolver::deadline`]; past it the
//! result is `temperror`.
//!
//! DKIM is verified from the held header section alone: `mail-auth` is given each
//! signature's claimed body hash in place of the body's (its `AuthenticatedMessage` fields are
//! public in 0.13), one signature at a time, so it checks the header hash, the key record and
//! `i=`; the body is then hashed incrementally ([`super::body`]) and each claim judged at the
//! end of DATA. Invariant: the stamp says `dkim=pass` (and `dmarc=pass` resting on it) only
//! for signatures whose broken body hash refuses the message; others are stamped `neutral`.
//! Why: see [`super::body`].

use std::net::IpAddr;
use std::time::Instant;

use mail_auth::common::crypto::HashAlgorithm;
use mail_auth::dmarc::Policy;
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{
    AuthenticatedMessage, AuthenticationResults, DkimOutput, DmarcResult, SpfOutput, SpfResult,
};

use super::body::Slot;
use super::headers::{self, HeaderProblem};
use super::plan::Plan;
use super::resolver::AuthResolver;
use super::verdict::{self, DmarcSummary, Outcome, SignatureResult};

/// At most this many DKIM-Signature headers are verified (each costs DNS lookups); the rest
/// are ignored (RFC 6376 6.1 lets a verifier limit them), so a header section full of
/// signatures cannot make one message cost hundreds of queries.
pub const MAX_SIGNATURES: usize = 5;

/// Keeps the first [`MAX_SIGNATURES`] signatures (the ones nearest the top, added last).
pub fn limit_signatures(msg: &mut AuthenticatedMessage<'_>) {
    msg.dkim_headers.truncate(MAX_SIGNATURES);
}

/// The envelope facts SPF and DMARC need.
pub struct Envelope<'a> {
    pub ip: IpAddr,
    pub helo: &'a str,
    /// The MAIL FROM address; empty for the null reverse-path.
    pub sender: &'a str,
    /// The fleet hostname: SPF's receiving host and the authserv-id.
    pub host: &'a str,
}

impl Envelope<'_> {
    /// The domain SPF checked and DMARC aligns with: the sender's, or HELO's for `<>`.
    pub fn spf_domain(&self) -> &str {
        match self.sender.rsplit_once('@') {
            Some((_, d)) if !d.is_empty() => d,
            _ => self.helo,
        }
    }
}

/// SPF for the MAIL FROM identity (the HELO identity for `<>`), RFC 7208, within the
/// resolver's deadline ([`AuthResolver::deadline`]): past it the result is `temperror` (451),
/// never a `permerror` (550) — `mail-auth` turns a slow lookup chain (20 s) into a permerror
/// of its lookup limit, which would refuse mail for good because a DNS server was slow.
pub async fn spf(resolver: &AuthResolver, env: &Envelope<'_>) -> SpfOutput {
    let temperror =
        || SpfOutput::new(env.spf_domain().to_string()).with_result(SpfResult::TempError);
    let auth = match resolver.get() {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "SPF: no DNS resolver");
            return temperror();
        }
    };
    let params = if env.sender.is_empty() {
        SpfParameters::verify_ehlo(env.ip, env.helo, env.host)
    } else {
        SpfParameters::verify_mail_from(env.ip, env.helo, env.host, env.sender)
    };
    let deadline = resolver.deadline();
    let started = Instant::now();
    match tokio::time::timeout(deadline, auth.verify_spf(params)).await {
        Ok(out) if out.result() == SpfResult::PermError && started.elapsed() >= deadline => {
            temperror()
        }
        Ok(out) => out,
        Err(_) => {
            tracing::warn!(domain = env.spf_domain(), "SPF: deadline passed");
            temperror()
        }
    }
}

/// What the end of the header section decided.
#[derive(Debug, Clone)]
pub struct MessageResults {
    /// Each DKIM signature's result before the body (`pass`: header hash and key verified, the
    /// body hash it claims still to be checked).
    pub signatures: Vec<SignatureResult>,
    /// The body hashes to compute while the body streams.
    pub slots: Vec<Slot>,
    pub dmarc: Option<DmarcSummary>,
    /// The DKIM result when it was decided without signatures (no resolver, deadline passed,
    /// header section not evaluated); else `None` and it is derived from `signatures`.
    pub dkim_decided: Option<Outcome>,
    /// Why the header section was not evaluated as it stands.
    pub problem: Option<HeaderProblem>,
    /// `Authentication-Results: …\r\n`.
    pub header: String,
}

/// The Authentication-Results header for SPF alone (no message checks).
pub fn spf_header(env: &Envelope<'_>, spf: &SpfOutput) -> String {
    let ar = AuthenticationResults::new(env.host)
        .with_spf_mailfrom_result(spf, env.ip, env.sender, env.helo);
    format!("Authentication-Results: {ar}\r\n")
}

/// The comment our stamp carries for a result that rests on a body not yet seen.
const NOT_VERIFIED: &str = "(body hash not verified at stamping time)";

/// DKIM and DMARC over the held header section (`logical`: un-stuffed, ending with the empty
/// line; `None`: over `limits.maxHeaderSize`). `partner`: the claiming connector's `domains`
/// (`None` for unclaimed mail), which bound the signers that count for `senderAuthentication:
/// DKIM`.
pub async fn message(
    resolver: &AuthResolver,
    plan: &Plan,
    env: &Envelope<'_>,
    spf: Option<&SpfOutput>,
    logical: Option<&[u8]>,
    partner: Option<&[String]>,
) -> MessageResults {
    let deadline = resolver.deadline();
    let decided = tokio::time::timeout(
        deadline,
        message_inner(resolver, plan, env, spf, logical, partner),
    )
    .await;
    match decided {
        Ok(r) => r,
        Err(_) => {
            tracing::warn!(domain = env.spf_domain(), "DKIM/DMARC: deadline passed");
            undecided(
                plan,
                env,
                spf,
                Outcome::TempError,
                "DNS deadline passed",
                None,
            )
        }
    }
}

/// Results when the message checks could not run: every one of them is `outcome`.
fn undecided(
    plan: &Plan,
    env: &Envelope<'_>,
    spf: Option<&SpfOutput>,
    outcome: Outcome,
    why: &str,
    problem: Option<HeaderProblem>,
) -> MessageResults {
    let mut ar = AuthenticationResults::new(env.host);
    if let Some(spf) = spf {
        ar = ar.with_spf_mailfrom_result(spf, env.ip, env.sender, env.helo);
    }
    let mut extra = String::new();
    if plan.dkim {
        extra.push_str(&format!(";\r\n\tdkim={} ({why})", outcome.as_str()));
    }
    if plan.dmarc {
        extra.push_str(&format!(";\r\n\tdmarc={} ({why})", outcome.as_str()));
    }
    MessageResults {
        signatures: Vec::new(),
        slots: Vec::new(),
        dmarc: plan.dmarc.then(|| DmarcSummary {
            outcome,
            domain: String::new(),
            policy_reject: false,
            spf_aligned: false,
        }),
        dkim_decided: plan.dkim.then_some(outcome),
        problem,
        header: format!("Authentication-Results: {ar}{extra}\r\n"),
    }
}

async fn message_inner(
    resolver: &AuthResolver,
    plan: &Plan,
    env: &Envelope<'_>,
    spf: Option<&SpfOutput>,
    logical: Option<&[u8]>,
    partner: Option<&[String]>,
) -> MessageResults {
    let auth = match resolver.get() {
        Ok(a) => a,
        Err(_) => return undecided(plan, env, spf, Outcome::TempError, "no DNS resolver", None),
    };
    let Some(logical) = logical else {
        let p = HeaderProblem::OverLimit;
        return undecided(plan, env, spf, Outcome::PermError, p.reason(), Some(p));
    };
    // Our own reading first, then mail-auth's must end the section exactly where ours does:
    // a section the two read differently is not evaluated (see HeaderProblem::Malformed).
    let mut problem = headers::check_section(logical);
    let parsed = match problem {
        Some(HeaderProblem::Malformed) => None,
        _ => AuthenticatedMessage::parse(logical).filter(|m| m.body_offset() == logical.len()),
    };
    let Some(mut msg) = parsed else {
        let p = HeaderProblem::Malformed;
        return undecided(plan, env, spf, Outcome::PermError, p.reason(), Some(p));
    };
    // The From: fields mail-auth read must be the ones a reader sees (it skips `From :`).
    let theirs = msg
        .headers
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case(b"from"))
        .count();
    if theirs != headers::from_fields(logical) {
        let p = HeaderProblem::Malformed;
        return undecided(plan, env, spf, Outcome::PermError, p.reason(), Some(p));
    }
    let mut from_domains: Vec<&str> = msg
        .from
        .iter()
        .filter_map(|f| f.rsplit_once('@').map(|(_, d)| d))
        .collect();
    from_domains.dedup();
    if from_domains.len() > 1 {
        problem = Some(HeaderProblem::MultipleFrom);
    } else if from_domains.is_empty() && theirs > 0 && problem.is_none() {
        problem = Some(HeaderProblem::FromNotParsable);
    }
    limit_signatures(&mut msg);
    let from = msg.from.first().cloned().unwrap_or_default();

    // Each signature is verified on its own against the body hash it claims (`verify_dkim`
    // compares a signature's `bh=` with the message's hash for its (c, a, l) slot, and two
    // signatures of one slot may claim different hashes: a stale one and a current one).
    // The body is then hashed once per slot and each claim judged at the end of DATA.
    let singles: Vec<AuthenticatedMessage<'_>> = if plan.dkim {
        let mut v = Vec::with_capacity(msg.dkim_headers.len().max(1));
        if msg.errors.is_empty() && msg.dkim_headers.is_empty() {
            // No signature: nothing to verify.
        } else if msg.dkim_headers.is_empty() {
            let mut one = msg.clone();
            one.body_hashes.clear();
            v.push(one);
        }
        for (i, h) in msg.dkim_headers.iter().enumerate() {
            let mut one = msg.clone();
            if i > 0 {
                // Malformed signatures are reported once.
                one.errors.clear();
            }
            let s = &h.header;
            one.body_hashes = vec![(s.cb, HashAlgorithm::from(s.a), s.l, s.bh.clone())];
            one.dkim_headers = vec![h.clone()];
            v.push(one);
        }
        v
    } else {
        Vec::new()
    };
    let mut dkim_outputs: Vec<DkimOutput<'_>> = Vec::new();
    for one in &singles {
        dkim_outputs.extend(auth.verify_dkim(one).await);
    }
    let mut signatures: Vec<SignatureResult> = dkim_outputs
        .iter()
        .map(|o| {
            let (domain, slot, body_hash) = o.signature().map_or_else(
                || {
                    (
                        String::new(),
                        (Default::default(), HashAlgorithm::Sha256, 0),
                        Vec::new(),
                    )
                },
                |s| {
                    (
                        s.d.to_ascii_lowercase(),
                        (s.cb, HashAlgorithm::from(s.a), s.l),
                        s.bh.clone(),
                    )
                },
            );
            SignatureResult {
                domain,
                outcome: Outcome::dkim(o.result()),
                slot,
                body_hash,
                aligned: false,
                stamped_pass: false,
            }
        })
        .collect();

    let dmarc = if plan.dmarc {
        let default_spf = SpfOutput::new(env.spf_domain().to_string());
        let spf_out = spf.unwrap_or(&default_spf);
        let out = auth
            .verify_dmarc(DmarcParameters::new(
                &msg,
                &dkim_outputs,
                env.spf_domain(),
                spf_out,
            ))
            .await;
        let spf_aligned = *out.spf_result() == DmarcResult::Pass;
        if *out.dkim_result() == DmarcResult::Pass && !spf_aligned {
            // Which signatures the DKIM half of the pass rests on: each alone (the DMARC
            // record is in the resolver's cache by now).
            for (i, o) in dkim_outputs.iter().enumerate() {
                if signatures[i].outcome != Outcome::Pass {
                    continue;
                }
                let alone = auth
                    .verify_dmarc(DmarcParameters::new(
                        &msg,
                        std::slice::from_ref(o),
                        env.spf_domain(),
                        spf_out,
                    ))
                    .await;
                signatures[i].aligned = *alone.dkim_result() == DmarcResult::Pass;
            }
        }
        Some((out, spf_aligned))
    } else {
        None
    };
    let summary = dmarc.as_ref().map(|(out, spf_aligned)| DmarcSummary {
        outcome: Outcome::dmarc(&out.result()),
        domain: out.domain().to_ascii_lowercase(),
        policy_reject: out.policy() == Policy::Reject,
        spf_aligned: *spf_aligned,
    });
    // Which pre-body passes the decision rests on: only those are stamped `pass` (and a body
    // that breaks one refuses the message); the others are stamped `neutral`.
    verdict::mark_stamped_passes(
        plan,
        &mut signatures,
        summary.as_ref(),
        env.spf_domain(),
        partner,
    );

    let mut ar = AuthenticationResults::new(env.host);
    if let Some(spf) = spf {
        ar = ar.with_spf_mailfrom_result(spf, env.ip, env.sender, env.helo);
    }
    let mut extra = String::new();
    if plan.dkim {
        if dkim_outputs.is_empty() {
            extra.push_str(";\r\n\tdkim=none");
        }
        for (o, s) in dkim_outputs.iter().zip(&signatures) {
            let part = AuthenticationResults::new("")
                .with_dkim_result(o, &from)
                .to_string();
            if s.outcome == Outcome::Pass && !s.stamped_pass {
                extra.push_str(&part.replacen(
                    "dkim=pass",
                    &format!("dkim=neutral {NOT_VERIFIED}"),
                    1,
                ));
            } else {
                extra.push_str(&part);
            }
        }
    }
    if let (Some((out, _)), Some(sum)) = (&dmarc, &summary) {
        let part = AuthenticationResults::new("")
            .with_dmarc_result(out)
            .to_string();
        if verdict::dmarc_pass_rests_on_unstamped(sum, &signatures) {
            // A pass only an unverified body could confirm, which no refusal backs: not
            // claimed (RFC 7489 results have no neutral; `none` makes a reader apply no
            // policy, where `fail` could make it reject good mail).
            extra.push_str(&part.replacen("dmarc=pass", &format!("dmarc=none {NOT_VERIFIED}"), 1));
        } else {
            extra.push_str(&part);
        }
    }
    let mut slots: Vec<Slot> = Vec::new();
    for s in signatures.iter().filter(|s| s.outcome == Outcome::Pass) {
        if !slots.contains(&s.slot) {
            slots.push(s.slot);
        }
    }
    MessageResults {
        signatures,
        slots,
        dmarc: summary,
        dkim_decided: None,
        problem,
        header: format!("Authentication-Results: {ar}{extra}\r\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_max_signatures_are_verified() {
        let mut raw = String::new();
        for i in 0..(MAX_SIGNATURES + 3) {
            raw.push_str(&format!(
                "DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=d{i}.example; s=s; h=from; bh=AAAA; b=AAAA\r\n"
            ));
        }
        raw.push_str("From: a@example.org\r\n\r\n");
        let mut msg = AuthenticatedMessage::parse(raw.as_bytes()).unwrap();
        assert_eq!(msg.dkim_headers.len(), MAX_SIGNATURES + 3);
        limit_signatures(&mut msg);
        assert_eq!(msg.dkim_headers.len(), MAX_SIGNATURES);
        assert_eq!(msg.dkim_headers[0].header.d, "d0.example");
    }
}
