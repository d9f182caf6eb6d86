//! DATA: the relay transaction sends DATA to the pinned route's next hop (reconnecting and
//! replaying the recipients if the connection was lost), then the message is streamed through
//! the pure [`DataFilter`] with our trace headers in front, and the final `.` is answered only
//! with the next hop's reply. A message the filter refuses is never terminated at the next hop:
//! the connection is dropped without the final dot, so nothing is relayed.
//!
//! Sender authentication ([`crate::auth`]): when the plan needs DKIM or DMARC, the header
//! section is held back (bounded by `limits.maxHeaderSize`) until it is complete, DKIM and
//! DMARC are decided on it, and only then are our trace headers (with Authentication-Results)
//! and the held headers forwarded; the body streams through incremental body hashes. A
//! required check that fails, or a stamped DKIM pass the body contradicts, is refused the same
//! way as a bare LF: no final dot at the next hop.

use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite};

use super::io::ReadError;
use super::{Decision, Flow, Session, Transaction, TxAuth, outcome};
use crate::auth::body::BodyHashes;
use crate::auth::evaluate::{self, Envelope as AuthEnvelope, MessageResults};
use crate::auth::headers::HeaderBlock;
use crate::auth::verdict::{self, Outcome, Refusal};
use crate::data::{Action, DataError, DataFilter};
use crate::policy::{Route, SenderDecision, tls_str};
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

/// The `auth=` token once DKIM/DMARC are decided (`broken`: a stamped DKIM pass the body
/// contradicted).
fn auth_token(auth: &TxAuth, r: &MessageResults, broken: bool) -> Option<String> {
    let spf = auth.spf.as_ref().map(|s| Outcome::spf(s.result()));
    let dkim = if broken { Some(Outcome::Fail) } else { r.dkim };
    verdict::auth_token(&auth.plan, spf, dkim, r.dmarc.as_ref().map(|d| d.outcome))
}

/// What sender authentication stamps: the Authentication-Results header and the `auth=` token
/// of X-Partnergate-Connector.
struct Stamp {
    header: String,
    token: Option<String>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    fn trace_headers(
        &self,
        decision: &SenderDecision,
        route: &Route,
        stamp: Option<&Stamp>,
    ) -> Vec<u8> {
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
        let connector = self.route_connector(decision, route);
        let cert = decision
            .verified_name
            .clone()
            .unwrap_or_else(|| "none".into());
        let auth_results = stamp.map_or("", |s| s.header.as_str());
        let token = stamp
            .and_then(|s| s.token.as_deref())
            .map(|t| format!("; auth={t}"))
            .unwrap_or_default();
        format!(
            "Received: from {helo} ([{ip}])\r\n\tby {host} (partnergate) with {proto}{tls}\r\n\tid {id}; {date}\r\n{auth_results}X-Partnergate-Connector: {connector}; tls={t}; cert={cert}{token}\r\n",
            ip = self.ctx.client_ip,
            host = header_safe(&f.hostname),
            id = self.id,
            t = tls_str(self.tls),
        )
        .into_bytes()
    }

    fn auth_envelope<'a>(&'a self, sender: &'a str, helo: &'a str) -> AuthEnvelope<'a> {
        AuthEnvelope {
            ip: self.ctx.client_ip,
            helo,
            sender,
            host: &self.rt.fleet.hostname,
        }
    }

    /// The stamp when only SPF is evaluated (decided at MAIL FROM).
    fn spf_stamp(&self, auth: &TxAuth, sender: &str) -> Option<Stamp> {
        let spf = auth.spf.as_ref()?;
        let helo = self.helo.clone().unwrap_or_default();
        let env = self.auth_envelope(sender, &helo);
        Some(Stamp {
            header: evaluate::spf_header(&env, spf),
            token: verdict::auth_token(&auth.plan, Some(Outcome::spf(spf.result())), None, None),
        })
    }

    /// DKIM and DMARC on the complete header section (`None`: over the limit): the stamp, the
    /// results, and the refusal when a required check did not pass.
    async fn decide_message(
        &self,
        auth: &TxAuth,
        sender: &str,
        logical: Option<&[u8]>,
    ) -> (Stamp, MessageResults, Option<Refusal>) {
        let plan = auth.plan;
        let helo = self.helo.clone().unwrap_or_default();
        let env = self.auth_envelope(sender, &helo);
        let results =
            evaluate::message(&self.rt.auth, &plan, &env, auth.spf.as_ref(), logical).await;
        let refusal = verdict::message_refusal(
            &plan,
            &results.signatures,
            results.dkim,
            results.dmarc.as_ref(),
            env.spf_domain(),
        );
        let stamp = Stamp {
            header: results.header.clone(),
            token: auth_token(auth, &results, false),
        };
        (stamp, results, refusal)
    }

    /// Counts the final DKIM and DMARC results (SPF was counted at MAIL FROM).
    fn count_message_auth(&self, connector: &str, r: &MessageResults, broken: bool) {
        if let Some(dkim) = r.dkim {
            let dkim = if broken { Outcome::Fail } else { dkim };
            self.ctx
                .metrics
                .sender_auth(connector, "dkim", dkim.as_str());
        }
        if let Some(d) = &r.dmarc {
            self.ctx
                .metrics
                .sender_auth(connector, "dmarc", d.outcome.as_str());
        }
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
        let Transaction {
            decision,
            relay,
            auth,
        } = tx;
        let plan = auth.plan;
        // Only sender authentication needs it after the relay takes the envelope.
        let sender = if plan.is_off() {
            String::new()
        } else {
            relay.envelope().sender.clone()
        };
        // With DKIM/DMARC our headers wait for the end of the header section.
        let mut held = plan
            .needs_message()
            .then(|| HeaderBlock::new(self.rt.fleet.limits.max_header_size));
        let headers = if held.is_none() {
            let stamp = self.spf_stamp(&auth, &sender);
            self.trace_headers(&decision, &route, stamp.as_ref())
        } else {
            Vec::new()
        };
        let started = Instant::now();
        let rt = self.rt.clone();
        let mut transfer = match relay.start_data(&rt, &mut self.pool).await {
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
        let mut filter = DataFilter::new(limits.max_message_size, limits.max_text_line)
            .with_authserv_id(&self.rt.fleet.hostname);
        let max_line = limits.max_text_line;
        transfer.write(&headers).await;
        let data_secs = self.rt.fleet.timeouts.data_secs;
        let mut hashes: Option<BodyHashes> = None;
        let mut results: Option<MessageResults> = None;
        // A required check failed: nothing more goes to the next hop, which gets no final dot.
        let mut auth_refusal: Option<Refusal> = None;
        loop {
            let pending = &self.rbuf[self.rpos..];
            if let Some(i) = pending.iter().position(|b| *b == b'\n') {
                let line = pending[..=i].to_vec();
                self.rpos += i + 1;
                let was_headers = filter.in_headers();
                match filter.push_line(&line) {
                    Action::End => break,
                    Action::Drop => continue,
                    Action::Forward => {}
                }
                if let Some(mut block) = held.take() {
                    let ends = was_headers && !filter.in_headers();
                    if !ends && block.push(&line) {
                        held = Some(block);
                        continue;
                    }
                    // The header section is complete, or too large to hold: decide now.
                    let logical = ends.then(|| block.logical());
                    let (stamp, r, refusal) = self
                        .decide_message(&auth, &sender, logical.as_deref())
                        .await;
                    if refusal.is_none() {
                        transfer
                            .write(&self.trace_headers(&decision, &route, Some(&stamp)))
                            .await;
                        transfer.write(block.wire()).await;
                        transfer.write(&line).await;
                    }
                    if ends {
                        hashes = Some(BodyHashes::new(r.slots.iter().copied()));
                    }
                    auth_refusal = refusal;
                    results = Some(r);
                    continue;
                }
                if auth_refusal.is_some() {
                    continue;
                }
                if let Some(h) = hashes.as_mut() {
                    // The body as the next hop stores it: one leading dot removed.
                    h.write(line.strip_prefix(b".").unwrap_or(&line));
                }
                transfer.write(&line).await;
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
        let log_refusal = |this: &Self, rule: &str, reply: &Reply, auth: Option<&str>| {
            let d = Decision {
                connector: &connector,
                rule,
                outcome: outcome(reply, "relayed"),
                reply: Some(reply),
                next_hop: Some(&label),
                auth,
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
            log_refusal(self, rule, &reply, None);
            self.ctx.metrics.rejection(&connector, rule);
            self.ctx.metrics.message(&connector, direction, "rejected");
            self.reply(&reply);
            return Flow::Continue;
        }
        if let Some(block) = held.take() {
            // DATA ended inside the header section: a message without a body.
            let logical = block.logical();
            let (stamp, r, refusal) = self.decide_message(&auth, &sender, Some(&logical)).await;
            if refusal.is_none() {
                transfer
                    .write(&self.trace_headers(&decision, &route, Some(&stamp)))
                    .await;
                transfer.write(block.wire()).await;
            }
            hashes = Some(BodyHashes::new(r.slots.iter().copied()));
            auth_refusal = refusal;
            results = Some(r);
        }
        let mut broken = false;
        if auth_refusal.is_none()
            && let (Some(h), Some(r)) = (hashes.take(), results.as_ref())
        {
            let computed = h.finish();
            let domains = verdict::broken_passes(&r.signatures, &computed);
            if !domains.is_empty() {
                broken = true;
                auth_refusal = Some(verdict::body_changed_refusal(&plan, &domains));
            }
        }
        let token = results.as_ref().and_then(|r| auth_token(&auth, r, broken));
        if let Some(r) = &results {
            self.count_message_auth(&connector, r, broken);
        }
        if let Some(refusal) = auth_refusal {
            // As for a bare LF: no final dot, so the next hop discards what it got.
            transfer.abort();
            log_refusal(self, refusal.rule, &refusal.reply, token.as_deref());
            self.ctx.metrics.rejection(&connector, refusal.rule);
            self.ctx
                .metrics
                .message(&connector, direction, outcome(&refusal.reply, "relayed"));
            self.reply(&refusal.reply);
            return Flow::Continue;
        }
        let token = token.or_else(|| self.spf_stamp(&auth, &sender).and_then(|s| s.token));
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
            auth: token.as_deref(),
            ..Decision::default()
        };
        self.log_decision(d, "message done");
        self.reply(&reply);
        Flow::Continue
    }
}
