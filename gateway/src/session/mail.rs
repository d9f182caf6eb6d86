//! MAIL FROM: syntax and parameter checks, then the sender decision (which connector claims
//! the transaction and whether its rules are met) from the pure policy, then SPF when the
//! sender-authentication plan requires it (`550 5.7.23` when not passed). SPF that is only
//! evaluated (DMARC, `Stamp`) waits for DATA, so a client looping MAIL/RSET cannot make the
//! gateway query DNS per command; a session evaluates one (sender, HELO) pair once. Nothing
//! is sent to a next hop yet: that happens at the first RCPT the policy allows.

use std::borrow::Cow;

use smtp_proto::MailFrom;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{Decision, Flow, Session, SpfCache, Transaction, TxAuth};
use crate::auth::evaluate::{self, Envelope as AuthEnvelope};
use crate::auth::verdict::{self, Outcome};
use crate::auth::{Enforce, Plan};
use crate::policy::{self, SenderDecision};
use crate::relay::{Envelope, RelayTransaction};
use crate::reply::fixed;

fn mail_params_unsupported(m: &MailFrom<Cow<'_, str>>) -> bool {
    let allowed = smtp_proto::MAIL_BODY_7BIT
        | smtp_proto::MAIL_BODY_8BITMIME
        | smtp_proto::MAIL_SMTPUTF8
        | smtp_proto::MAIL_REQUIRETLS;
    m.flags & !allowed != 0
        || m.trans_id.is_some()
        || m.by != 0
        || m.env_id.is_some()
        || m.solicit.is_some()
        || m.mtrk.is_some()
        || m.hold_for != 0
        || m.hold_until != 0
        || m.mt_priority != 0
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// The sender-authentication plan of an accepted sender decision, and the index of the
    /// claiming connector when it sets `senderAuthentication`.
    fn auth_plan(&self, decision: &SenderDecision) -> (Plan, Option<usize>) {
        let claimed = decision.connector.as_ref().map(|name| {
            self.rt
                .sender_auth
                .get(name)
                .map_or((Default::default(), None), |(s, i)| (*s, Some(*i)))
        });
        let plan = Plan::for_transaction(
            claimed.map(|c| c.0),
            decision.internal,
            self.rt.fleet.unclaimed_sender_authentication,
        );
        (plan, claimed.and_then(|c| c.1))
    }

    /// SPF for `sender` from this session's HELO, evaluated once per (sender, HELO) pair per
    /// session and counted under `connector` each time it is used.
    pub(super) async fn spf_for(&mut self, connector: &str, sender: &str) -> mail_auth::SpfOutput {
        let helo = self.helo.clone().unwrap_or_default();
        let out = match &self.spf_cache {
            Some(c) if c.sender == sender && c.helo == helo => c.out.clone(),
            _ => {
                let rt = self.rt.clone();
                let env = AuthEnvelope {
                    ip: self.ctx.client_ip,
                    helo: &helo,
                    sender,
                    host: &rt.fleet.hostname,
                };
                // Boxed: DNS lookups make a large future, only needed when SPF is evaluated.
                let out = Box::pin(evaluate::spf(&rt.auth, &env)).await;
                self.spf_cache = Some(SpfCache {
                    sender: sender.to_string(),
                    helo: helo.clone(),
                    out: out.clone(),
                });
                out
            }
        };
        self.ctx
            .metrics
            .sender_auth(connector, "spf", Outcome::spf(out.result()).as_str());
        out
    }

    /// Required SPF: `Err` when not passed (refused, logged, counted).
    async fn check_spf(
        &mut self,
        plan: &Plan,
        connector: &str,
        sender: &str,
    ) -> Result<Option<mail_auth::SpfOutput>, ()> {
        if plan.enforce != Enforce::Spf {
            return Ok(None);
        }
        let out = self.spf_for(connector, sender).await;
        let outcome = Outcome::spf(out.result());
        let helo = self.helo.clone().unwrap_or_default();
        let env = AuthEnvelope {
            ip: self.ctx.client_ip,
            helo: &helo,
            sender,
            host: "",
        };
        let token = format!("spf:{}", outcome.as_str());
        match verdict::spf_refusal(plan, outcome, env.spf_domain()) {
            None => Ok(Some(out)),
            Some(r) => {
                let d = Decision {
                    connector,
                    rule: r.rule,
                    outcome: "rejected",
                    reply: Some(&r.reply),
                    auth: Some(&token),
                    ..Decision::default()
                };
                self.log_decision(d, "MAIL FROM refused: sender authentication");
                self.ctx.metrics.rejection(connector, r.rule);
                self.ctx.metrics.message(
                    connector,
                    "inbound",
                    super::outcome(&r.reply, "accepted"),
                );
                self.reply(&r.reply);
                Err(())
            }
        }
    }

    pub(super) async fn mail(&mut self, from: MailFrom<Cow<'_, str>>) -> Flow {
        if self.helo.is_none() {
            return self.error(&fixed::HELO_FIRST);
        }
        if self.tx.is_some() {
            return self.error(&fixed::NESTED_MAIL);
        }
        if mail_params_unsupported(&from) {
            return self.error(&fixed::UNSUPPORTED_PARAM);
        }
        // REQUIRETLS is advertised only after STARTTLS (RFC 8689 4.1).
        if from.flags & smtp_proto::MAIL_REQUIRETLS != 0 && self.tls.is_none() {
            return self.error(&fixed::UNSUPPORTED_PARAM);
        }
        if !from.address.is_ascii() && from.flags & smtp_proto::MAIL_SMTPUTF8 == 0 {
            return self.error(&fixed::NEED_SMTPUTF8);
        }
        if from.size as u64 > self.rt.fleet.limits.max_message_size {
            self.reply(&fixed::MESSAGE_TOO_BIG);
            return Flow::Continue;
        }
        let rt = self.rt.clone();
        let decision =
            policy::decide_sender(&rt.fleet, &rt.connectors, &self.facts(), &from.address);
        let connector = decision.connector.as_deref().unwrap_or("none");
        match &decision.outcome {
            Err(refusal) => {
                self.refuse(connector, refusal, "MAIL FROM refused");
                self.ctx.metrics.message(connector, "inbound", "rejected");
            }
            Ok(()) => {
                let (plan, partner) = self.auth_plan(&decision);
                let Ok(spf) = self.check_spf(&plan, connector, &from.address).await else {
                    return Flow::Continue;
                };
                let token = spf
                    .as_ref()
                    .map(|s| format!("spf:{}", Outcome::spf(s.result()).as_str()));
                let d = Decision {
                    connector,
                    rule: "claim",
                    outcome: "accepted",
                    internal: Some(decision.internal),
                    auth: token.as_deref(),
                    ..Decision::default()
                };
                self.log_decision(d, "MAIL FROM accepted");
                let envelope = Envelope {
                    sender: from.address.to_string(),
                    size: from.size,
                    eightbit: from.flags & smtp_proto::MAIL_BODY_8BITMIME != 0,
                    smtputf8: from.flags & smtp_proto::MAIL_SMTPUTF8 != 0,
                    requiretls: from.flags & smtp_proto::MAIL_REQUIRETLS != 0,
                };
                self.ctx.admission.in_transaction();
                self.tx = Some(Transaction {
                    decision,
                    relay: RelayTransaction::new(envelope),
                    auth: TxAuth { plan, spf, partner },
                });
                self.reply(&fixed::SENDER_OK);
            }
        }
        Flow::Continue
    }
}
