//! DATA: the relay transaction sends DATA to the pinned route's next hop (reconnecting and
//! replaying the recipients if the connection was lost), then the message is streamed through
//! the pure [`DataFilter`] with our trace headers in front, and the final `.` is answered only
//! with the next hop's reply. A message the filter refuses is never terminated at the next hop:
//! the connection is dropped without the final dot, so nothing is relayed.

use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite};

use super::io::ReadError;
use super::{Decision, Flow, Session, Transaction, outcome};
use crate::data::{Action, DataError, DataFilter};
use crate::policy::{Route, tls_str};
use crate::relay::route_label;
use crate::reply::{Reply, fixed};

/// Keeps only characters that are safe inside a Received: header comment.
fn header_safe(s: &str) -> String {
    s.chars()
        .take(255)
        .map(|c| {
            if c.is_ascii_alphanumeric() || ".-:[]_".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    fn trace_headers(&self, tx: &Transaction, route: &Route) -> Vec<u8> {
        let f = &self.rt.fleet;
        let helo = header_safe(self.helo.as_deref().unwrap_or("unknown"));
        let proto = match (self.esmtp, self.tls.is_some()) {
            (true, true) => "ESMTPS",
            (true, false) => "ESMTP",
            (false, true) => "SMTPS",
            (false, false) => "SMTP",
        };
        let tls = self
            .tls
            .map(|v| format!(" (TLSv{})", v.as_str()))
            .unwrap_or_default();
        let date = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc2822)
            .unwrap_or_default();
        let connector = self.route_connector(&tx.decision, route);
        let cert = tx
            .decision
            .verified_name
            .clone()
            .unwrap_or_else(|| "none".into());
        format!(
            "Received: from {helo} ([{ip}])\r\n\tby {host} (partnergate) with {proto}{tls}\r\n\tid {id}; {date}\r\nX-Partnergate-Connector: {connector}; tls={t}; cert={cert}\r\n",
            ip = self.ctx.client_ip,
            host = header_safe(&f.hostname),
            id = self.id,
            t = tls_str(self.tls),
        )
        .into_bytes()
    }

    pub(super) async fn data(&mut self) -> Flow {
        let Some(tx) = self.tx.take() else {
            return self.error(&fixed::NEED_MAIL);
        };
        if tx.relay.ledger().is_empty() && !tx.relay.is_broken() {
            self.tx = Some(tx);
            self.reply(&fixed::NO_VALID_RCPT);
            return Flow::Continue;
        }
        let route = tx.relay.pinned().cloned().unwrap_or(Route::Upstream);
        let label = route_label(&self.rt, &route);
        let direction = if route == Route::Upstream {
            "inbound"
        } else {
            "outbound"
        };
        let connector = self.route_connector(&tx.decision, &route);
        let headers = self.trace_headers(&tx, &route);
        let started = Instant::now();
        let rt = self.rt.clone();
        let mut transfer = match tx.relay.start_data(&rt, &mut self.pool).await {
            Ok(t) => t,
            Err(reply) => {
                let outcome = outcome(&reply, "relayed");
                self.ctx.metrics.message(&connector, direction, outcome);
                let d = Decision {
                    connector: &connector,
                    rule: "data",
                    outcome,
                    reply: Some(&reply),
                    next_hop: Some(&label),
                    ..Decision::default()
                };
                self.log_decision(d, "DATA refused");
                self.reply(&reply);
                return Flow::Continue;
            }
        };
        self.reply(&fixed::START_DATA);
        if self.flush().await.is_err() {
            transfer.abort();
            return Flow::Close;
        }
        let limits = &self.rt.fleet.limits;
        let mut filter = DataFilter::new(limits.max_message_size, limits.max_text_line);
        let max_line = limits.max_text_line;
        transfer.write(&headers).await;
        let data_secs = self.rt.fleet.timeouts.data_secs;
        loop {
            let pending = &self.rbuf[self.rpos..];
            if let Some(i) = pending.iter().position(|b| *b == b'\n') {
                let line = &pending[..=i];
                let action = filter.push_line(line);
                if action == Action::Forward {
                    let line = line.to_vec();
                    transfer.write(&line).await;
                }
                self.rpos += i + 1;
                if action == Action::End {
                    break;
                }
                continue;
            }
            if pending.len() > max_line {
                // A trailing CR stays buffered: its LF may come with the next read, and the
                // filter must see that CRLF whole (else a following `.` line is not the end).
                let keep = usize::from(pending.ends_with(b"\r"));
                filter.push_fragment(&pending[..pending.len() - keep]);
                self.rpos = self.rbuf.len() - keep;
            }
            if let Err(e) = self.fill(data_secs).await {
                transfer.abort();
                self.ctx.metrics.message(&connector, direction, "aborted");
                match e {
                    ReadError::Timeout => self.reply(&fixed::TIMEOUT),
                    ReadError::Shutdown => self.reply(&fixed::SHUTTING_DOWN),
                    ReadError::Shed => self.reply(&crate::admission::SHED_REPLY),
                    ReadError::Closed => {}
                }
                return Flow::Close;
            }
        }
        let log_refusal = |this: &Self, rule: &str, reply: &Reply| {
            let d = Decision {
                connector: &connector,
                rule,
                outcome: "rejected",
                reply: Some(reply),
                next_hop: Some(&label),
                ..Decision::default()
            };
            this.log_decision(d, "message refused");
        };
        if let Some(err) = filter.error {
            // Nothing was terminated at the next hop: dropping the connection makes it
            // discard the partial message, so nothing is relayed.
            transfer.abort();
            let (reply, rule) = match err {
                DataError::BareLineEnding => (fixed::BARE_LF_CR, "bareLineEnding"),
                DataError::LineTooLong => (fixed::TEXT_LINE_TOO_LONG, "maxTextLine"),
                DataError::TooBig => (fixed::MESSAGE_TOO_BIG, "maxMessageSize"),
            };
            log_refusal(self, rule, &reply);
            self.ctx.metrics.rejection(&connector, rule);
            self.ctx.metrics.message(&connector, direction, "rejected");
            self.reply(&reply);
            return Flow::Continue;
        }
        let recipients = transfer.recipients();
        let reply = transfer.finish(&mut self.pool).await;
        self.ctx
            .metrics
            .relay_duration
            .observe(started.elapsed().as_secs_f64());
        let outcome = outcome(&reply, "relayed");
        self.ctx.metrics.message(&connector, direction, outcome);
        let d = Decision {
            connector: &connector,
            rule: "data",
            outcome,
            reply: Some(&reply),
            next_hop: Some(&label),
            recipients: Some(recipients),
            ..Decision::default()
        };
        self.log_decision(d, "message done");
        self.reply(&reply);
        Flow::Continue
    }
}
