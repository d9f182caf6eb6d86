//! MAIL FROM: syntax and parameter checks, then the sender decision (which connector claims
//! the transaction and whether its rules are met) from the pure policy. Nothing is sent to a
//! next hop yet: that happens at the first RCPT the policy allows.

use std::borrow::Cow;

use smtp_proto::MailFrom;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{Decision, Flow, Session, Transaction};
use crate::policy;
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
    pub(super) fn mail(&mut self, from: MailFrom<Cow<'_, str>>) -> Flow {
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
                let d = Decision {
                    connector,
                    rule: "claim",
                    outcome: "accepted",
                    internal: Some(decision.internal),
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
                });
                self.reply(&fixed::SENDER_OK);
            }
        }
        Flow::Continue
    }
}
