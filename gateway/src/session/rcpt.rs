//! RCPT TO: the policy decides whether the recipient may be relayed and over which route
//! (relaying denied, a route other than the pinned one, too many recipients); the transaction's
//! relay side then asks that route's next hop and its reply is mirrored.

use std::borrow::Cow;

use smtp_proto::RcptTo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{Decision, Flow, Session, outcome};
use crate::policy;
use crate::relay::route_label;
use crate::reply::fixed;

fn rcpt_params_unsupported(r: &RcptTo<Cow<'_, str>>) -> bool {
    r.orcpt.is_some() || r.flags != 0 || r.rrvs != 0
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub(super) async fn rcpt(&mut self, to: RcptTo<Cow<'_, str>>) -> Flow {
        let Some(mut tx) = self.tx.take() else {
            return self.error(&fixed::NEED_MAIL);
        };
        if rcpt_params_unsupported(&to) {
            self.tx = Some(tx);
            return self.error(&fixed::UNSUPPORTED_PARAM);
        }
        if !to.address.is_ascii() && !tx.relay.envelope().smtputf8 {
            self.tx = Some(tx);
            return self.error(&fixed::NEED_SMTPUTF8);
        }
        let rt = self.rt.clone();
        let connector = tx.decision.connector.clone();
        let connector = connector.as_deref().unwrap_or("none");
        let decision = policy::decide_recipient(
            &rt.fleet,
            &rt.connectors,
            tx.decision.internal,
            &to.address,
            tx.relay.pinned(),
            tx.relay.ledger().len(),
        );
        let route = match decision {
            Ok(r) => r,
            Err(refusal) => {
                self.refuse(connector, &refusal, "RCPT TO refused");
                self.tx = Some(tx);
                return Flow::Continue;
            }
        };
        // Boxed: the next-hop dialogue (connect, TLS, RCPT) is a large future; inline it would
        // be part of every idle session's task.
        let reply = Box::pin(tx.relay.recipient(&rt, &mut self.pool, &route, &to.address)).await;
        let counted = self.route_connector(&tx.decision, &route);
        let tls_policy = tx.relay.tls_policy();
        self.tx = Some(tx);
        let label = route_label(&rt, &route);
        self.ctx
            .metrics
            .next_hop_recipient(&counted, outcome(&reply, "accepted"));
        let d = Decision {
            connector,
            rule: "recipient",
            outcome: if reply.is_positive() {
                "accepted"
            } else {
                "refused_by_next_hop"
            },
            reply: Some(&reply),
            next_hop: Some(&label),
            tls_policy,
            ..Decision::default()
        };
        self.log_decision(d, "RCPT TO decided");
        self.reply(&reply);
        Flow::Continue
    }
}
