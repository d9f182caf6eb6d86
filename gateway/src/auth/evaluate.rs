//! The DNS-backed checks, with `mail-auth`: SPF at MAIL FROM, DKIM and DMARC once the header
//! section is complete, and the Authentication-Results header (RFC 8601) that stamps them.
//!
//! DKIM is verified from the held header section alone: `mail-auth` is given each
//! signature's claimed body hash in place of the body's (its `AuthenticatedMessage` fields are
//! public in 0.13), so it checks the header hash, the key record and `i=`; the body is then
//! hashed incrementally ([`super::body`]) and a claimed hash it contradicts refuses the
//! message. Why: see [`super::body`].

use std::net::IpAddr;

use mail_auth::common::crypto::HashAlgorithm;
use mail_auth::dmarc::Policy;
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{AuthenticatedMessage, AuthenticationResults, SpfOutput, SpfResult};

use super::body::Slot;
use super::plan::Plan;
use super::resolver::AuthResolver;
use super::verdict::{DmarcSummary, Outcome, SignatureResult};

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

/// SPF for the MAIL FROM identity (the HELO identity for `<>`), RFC 7208.
pub async fn spf(resolver: &AuthResolver, env: &Envelope<'_>) -> SpfOutput {
    let auth = match resolver.get() {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "SPF: no DNS resolver");
            return SpfOutput::new(env.spf_domain().to_string()).with_result(SpfResult::TempError);
        }
    };
    let params = if env.sender.is_empty() {
        SpfParameters::verify_ehlo(env.ip, env.helo, env.host)
    } else {
        SpfParameters::verify_mail_from(env.ip, env.helo, env.host, env.sender)
    };
    auth.verify_spf(params).await
}

/// What the end of the header section decided.
#[derive(Debug, Clone)]
pub struct MessageResults {
    pub signatures: Vec<SignatureResult>,
    /// The body hashes to compute while the body streams.
    pub slots: Vec<Slot>,
    pub dmarc: Option<DmarcSummary>,
    /// The DKIM result stamped for the `auth=` token (for the envelope sender's domain).
    pub dkim: Option<Outcome>,
    /// `Authentication-Results: …\r\n`.
    pub header: String,
}

/// The Authentication-Results header for SPF alone (no message checks).
pub fn spf_header(env: &Envelope<'_>, spf: &SpfOutput) -> String {
    let ar = AuthenticationResults::new(env.host)
        .with_spf_mailfrom_result(spf, env.ip, env.sender, env.helo);
    format!("Authentication-Results: {ar}\r\n")
}

/// DKIM and DMARC over the held header section (`logical`: un-stuffed, ending with the empty
/// line). `None` header section (over `limits.maxHeaderSize`): both are `permerror`.
pub async fn message(
    resolver: &AuthResolver,
    plan: &Plan,
    env: &Envelope<'_>,
    spf: Option<&SpfOutput>,
    logical: Option<&[u8]>,
) -> MessageResults {
    let mut ar = AuthenticationResults::new(env.host);
    if let Some(spf) = spf {
        ar = ar.with_spf_mailfrom_result(spf, env.ip, env.sender, env.helo);
    }
    let mut extra = String::new();
    let auth = resolver.get();
    let parsed = logical.and_then(AuthenticatedMessage::parse);
    let (Some(mut msg), Ok(auth)) = (parsed, auth) else {
        // Over the limit, no parsable header, or no resolver: nothing can pass.
        let (outcome, why) = match (logical, resolver.get()) {
            (None, _) => (
                Outcome::PermError,
                "header section over limits.maxHeaderSize",
            ),
            (_, Err(_)) => (Outcome::TempError, "no DNS resolver"),
            _ => (Outcome::PermError, "no parsable header section"),
        };
        if plan.dkim {
            extra.push_str(&format!(";\r\n\tdkim={} ({why})", outcome.as_str()));
        }
        if plan.dmarc {
            extra.push_str(&format!(";\r\n\tdmarc={} ({why})", outcome.as_str()));
        }
        return MessageResults {
            signatures: Vec::new(),
            slots: Vec::new(),
            dmarc: plan.dmarc.then(|| DmarcSummary {
                outcome,
                domain: String::new(),
                policy_reject: false,
            }),
            dkim: plan.dkim.then_some(outcome),
            header: format!("Authentication-Results: {ar}{extra}\r\n"),
        };
    };
    limit_signatures(&mut msg);
    // Each body-hash slot gets the hash its first signature claims: verify_dkim then judges
    // the header hash and key; the body is judged against the same claim at the end of DATA.
    let claims: Vec<(Slot, Vec<u8>)> = msg
        .dkim_headers
        .iter()
        .map(|h| {
            let s = &h.header;
            ((s.cb, HashAlgorithm::from(s.a), s.l), s.bh.clone())
        })
        .collect();
    for (c, h, l, bh) in &mut msg.body_hashes {
        if let Some((_, claim)) = claims.iter().find(|(slot, _)| *slot == (*c, *h, *l)) {
            bh.clone_from(claim);
        }
    }
    let from = msg.from.first().cloned().unwrap_or_default();
    let dkim_outputs = if plan.dkim {
        auth.verify_dkim(&msg).await
    } else {
        Vec::new()
    };
    let signatures: Vec<SignatureResult> = dkim_outputs
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
                        s.d.clone(),
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
            }
        })
        .collect();
    if plan.dkim {
        if dkim_outputs.is_empty() {
            extra.push_str(";\r\n\tdkim=none");
        } else {
            ar = ar.with_dkim_results(&dkim_outputs, &from);
        }
    }
    let dmarc = if plan.dmarc {
        let default_spf = SpfOutput::new(env.spf_domain().to_string());
        let spf = spf.unwrap_or(&default_spf);
        let out = auth
            .verify_dmarc(DmarcParameters::new(
                &msg,
                &dkim_outputs,
                env.spf_domain(),
                spf,
            ))
            .await;
        // After the DKIM part, which `extra` may hold (`dkim=none`).
        extra.push_str(
            &AuthenticationResults::new("")
                .with_dmarc_result(&out)
                .to_string(),
        );
        Some(DmarcSummary {
            outcome: Outcome::dmarc(&out.result()),
            domain: out.domain().to_string(),
            policy_reject: out.policy() == Policy::Reject,
        })
    } else {
        None
    };
    let dkim = plan
        .dkim
        .then(|| super::verdict::dkim_for_sender(&signatures, env.spf_domain()));
    let mut slots: Vec<Slot> = Vec::new();
    for s in signatures.iter().filter(|s| s.outcome == Outcome::Pass) {
        if !slots.contains(&s.slot) {
            slots.push(s.slot);
        }
    }
    MessageResults {
        signatures,
        slots,
        dmarc,
        dkim,
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
