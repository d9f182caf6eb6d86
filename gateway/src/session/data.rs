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
//! way as a bare LF: no final dot at the next hop. SPF that is evaluated but not required is
//! looked up here, before 354 (see `session::mail`). DATA lines are borrowed from the read
//! buffer, never copied; the header section is held once ([`HeaderBlock`]).
//!
//! Forwarding: the filter still judges every line, but consecutive forwarded lines of one read
//! are one contiguous range of the read buffer, handed to the next hop in one write (a dropped
//! line or the end of the read ends the range). The next hop receives exactly the bytes it got
//! when each line was written on its own, however the client's bytes were split into reads
//! (`tests::every_read_split_forwards_the_same_bytes`).

use std::ops::Range;

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

/// Adds the forwarded line at `line` (a range of the read buffer) to `run`, the forwarded bytes
/// not yet written. Returns the previous run when the line does not follow it (a dropped line
/// lies between): that run must be written first.
fn join(run: &mut Range<usize>, line: Range<usize>) -> Option<Range<usize>> {
    if (*run).is_empty() {
        *run = line;
        None
    } else if run.end == line.start {
        run.end = line.end;
        None
    } else {
        Some(std::mem::replace(run, line))
    }
}

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

/// The partner's `domains` of the claiming connector, when it sets `senderAuthentication`.
fn partner_domains<'a>(
    rt: &'a crate::live_config::LiveConfig,
    auth: &TxAuth,
) -> Option<&'a [String]> {
    auth.partner
        .and_then(|i| rt.connectors.inbound.get(i))
        .map(|c| c.domains.as_slice())
}

/// The DKIM and DMARC results: as stamped before the body (`stamped`: a pass no refusal
/// backs is not claimed, see [`verdict::mark_stamped_passes`]), or final once the body is
/// hashed.
fn outcomes(
    auth: &TxAuth,
    r: &MessageResults,
    sender_domain: &str,
    partner: Option<&[String]>,
    stamped: bool,
) -> (Option<Outcome>, Option<Outcome>) {
    let sigs: Vec<verdict::SignatureResult>;
    let view = if stamped {
        sigs = r
            .signatures
            .iter()
            .cloned()
            .map(|mut s| {
                if s.outcome == Outcome::Pass && !s.stamped_pass {
                    s.outcome = Outcome::Neutral;
                }
                s
            })
            .collect();
        &sigs
    } else {
        &r.signatures
    };
    let dkim = r.dkim_decided.or_else(|| {
        auth.plan
            .dkim
            .then(|| verdict::dkim_for_sender(view, sender_domain, partner))
    });
    let dmarc = r.dmarc.as_ref().map(|d| {
        if stamped && verdict::dmarc_pass_rests_on_unstamped(d, &r.signatures) {
            Outcome::None
        } else if stamped {
            d.outcome
        } else {
            verdict::dmarc_after_body(d, &r.signatures)
        }
    });
    (dkim, dmarc)
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
        partner: Option<&[String]>,
        connector: &str,
    ) -> (Stamp, MessageResults, Option<Refusal>) {
        let plan = auth.plan;
        let helo = self.helo.clone().unwrap_or_default();
        let env = self.auth_envelope(sender, &helo);
        let results = evaluate::message(
            &self.rt.auth,
            &plan,
            &env,
            auth.spf.as_ref(),
            logical,
            partner,
        )
        .await;
        let refusal = verdict::message_refusal(
            &plan,
            &results.signatures,
            results.dkim_decided,
            results.dmarc.as_ref(),
            results.problem,
            env.spf_domain(),
            partner,
            connector,
        );
        let (dkim, dmarc) = outcomes(auth, &results, env.spf_domain(), partner, true);
        let spf = auth.spf.as_ref().map(|s| Outcome::spf(s.result()));
        let stamp = Stamp {
            header: results.header.clone(),
            token: verdict::auth_token(&plan, spf, dkim, dmarc),
        };
        (stamp, results, refusal)
    }

    /// Counts the final DKIM and DMARC results (SPF was counted when evaluated).
    fn count_message_auth(&self, connector: &str, dkim: Option<Outcome>, dmarc: Option<Outcome>) {
        if let Some(dkim) = dkim {
            self.ctx
                .metrics
                .sender_auth(connector, "dkim", dkim.as_str());
        }
        if let Some(d) = dmarc {
            self.ctx.metrics.sender_auth(connector, "dmarc", d.as_str());
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
            mut auth,
        } = tx;
        let plan = auth.plan;
        // Only sender authentication needs it after the relay takes the envelope.
        let sender = if plan.is_off() {
            String::new()
        } else {
            relay.envelope().sender.clone()
        };
        // SPF that is evaluated but not required waits for DATA (see session::mail).
        if plan.spf && auth.spf.is_none() {
            auth.spf = Some(self.spf_for(&connector, &sender).await);
        }
        // Borrowed from this session's config, which outlives the transaction.
        let config = self.rt.clone();
        let partner = partner_domains(&config, &auth);
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
        // Forwarded lines of the current read not yet written (see the file's header).
        let mut run: Range<usize> = 0..0;
        loop {
            let pending = &self.rbuf[self.rpos..];
            if let Some(i) = pending.iter().position(|b| *b == b'\n') {
                // Borrowed, not copied: only `&self` is used until the next read.
                let start = self.rpos;
                self.rpos += i + 1;
                let line = &self.rbuf[start..self.rpos];
                let was_headers = filter.in_headers();
                match filter.push_line(line) {
                    Action::End => break,
                    Action::Drop => continue,
                    Action::Forward => {}
                }
                if let Some(mut block) = held.take() {
                    debug_assert!(
                        run.is_empty(),
                        "nothing is forwarded while headers are held"
                    );
                    let ends = was_headers && !filter.in_headers();
                    if !ends && block.push(line) {
                        held = Some(block);
                        continue;
                    }
                    // The header section is complete, or too large to hold: decide now.
                    let logical = ends.then(|| block.logical());
                    let (stamp, r, refusal) = self
                        .decide_message(&auth, &sender, logical, partner, &connector)
                        .await;
                    if refusal.is_none() {
                        transfer
                            .write(&self.trace_headers(&decision, &route, Some(&stamp)))
                            .await;
                        for piece in block.wire_pieces() {
                            transfer.write(piece).await;
                        }
                        run = start..self.rpos;
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
                    h.write(line.strip_prefix(b".").unwrap_or(line));
                }
                if let Some(before) = join(&mut run, start..self.rpos) {
                    transfer.write(&self.rbuf[before]).await;
                }
                continue;
            }
            // The read buffer may move or be reused by the next read.
            let done = std::mem::replace(&mut run, 0..0);
            if !done.is_empty() {
                transfer.write(&self.rbuf[done]).await;
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
        if filter.error.is_none() && !run.is_empty() {
            transfer.write(&self.rbuf[run]).await;
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
        if let Some(mut block) = held.take() {
            // DATA ended inside the header section: a message without a body.
            let (stamp, r, refusal) = self
                .decide_message(&auth, &sender, Some(block.logical()), partner, &connector)
                .await;
            if refusal.is_none() {
                transfer
                    .write(&self.trace_headers(&decision, &route, Some(&stamp)))
                    .await;
                for piece in block.wire_pieces() {
                    transfer.write(piece).await;
                }
            }
            hashes = Some(BodyHashes::new(r.slots.iter().copied()));
            auth_refusal = refusal;
            results = Some(r);
        }
        if auth_refusal.is_none()
            && let (Some(h), Some(r)) = (hashes.take(), results.as_mut())
        {
            let v = verdict::body_verdict(&r.signatures, &h.finish());
            if !v.broken_stamped.is_empty() {
                auth_refusal = Some(verdict::body_changed_refusal(&plan, &v.broken_stamped));
            }
            r.signatures = v.signatures;
        }
        // Logged and counted: the final results, the body's verdict included.
        let token = results.as_ref().and_then(|r| {
            let helo = self.helo.clone().unwrap_or_default();
            let env = self.auth_envelope(&sender, &helo);
            let (dkim, dmarc) = outcomes(&auth, r, env.spf_domain(), partner, false);
            self.count_message_auth(&connector, dkim, dmarc);
            let spf = auth.spf.as_ref().map(|s| Outcome::spf(s.result()));
            verdict::auth_token(&plan, spf, dkim, dmarc)
        });
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

#[cfg(test)]
mod tests {
    //! The DATA path against the line-at-a-time reference: one in-memory session per way of
    //! splitting the client's bytes into reads, relaying to a recording next hop on loopback.

    use std::collections::VecDeque;
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};

    use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
    use tokio::sync::watch;

    use super::super::{Session, SessionCtx};
    use crate::data::{Action, DataFilter};
    use crate::live_config::LiveConfig;
    use crate::metrics::Metrics;

    /// The client: every read returns (at most) the next chunk, so the chunks are the
    /// session's read boundaries; replies are kept.
    struct Chunked {
        chunks: VecDeque<Vec<u8>>,
        replies: Arc<Mutex<Vec<u8>>>,
    }

    impl AsyncRead for Chunked {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            if let Some(chunk) = self.chunks.front_mut() {
                let n = chunk.len().min(buf.remaining());
                buf.put_slice(&chunk[..n]);
                chunk.drain(..n);
                if chunk.is_empty() {
                    self.chunks.pop_front();
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Chunked {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.replies.lock().unwrap().extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A next hop that accepts everything and records each message's DATA bytes (wire form,
    /// without the final dot) once it is terminated.
    async fn next_hop() -> (std::net::SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let messages = got.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let messages = messages.clone();
                tokio::spawn(async move {
                    let (r, mut w) = s.into_split();
                    let mut r = BufReader::new(r);
                    let _ = w.write_all(b"220 hop\r\n").await;
                    let mut line = Vec::new();
                    loop {
                        line.clear();
                        if r.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let reply: &[u8] = match &line[..4.min(line.len())] {
                            b"EHLO" => b"250-hop\r\n250 8BITMIME\r\n",
                            b"QUIT" => b"221 bye\r\n",
                            b"DATA" => {
                                let _ = w.write_all(b"354 go\r\n").await;
                                let mut data = Vec::new();
                                loop {
                                    line.clear();
                                    if r.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
                                        return;
                                    }
                                    if line == b".\r\n" {
                                        break;
                                    }
                                    data.extend_from_slice(&line);
                                }
                                messages.lock().unwrap().push(data);
                                b"250 2.0.0 queued\r\n"
                            }
                            _ => b"250 ok\r\n",
                        };
                        if w.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, got)
    }

    fn config(dir: &std::path::Path, hop: std::net::SocketAddr) -> Arc<LiveConfig> {
        super::super::test_config::live_config(
            dir,
            serde_json::json!({
                "upstream": {"host": hop.ip().to_string(), "port": hop.port(), "tls": "None"},
            }),
        )
    }

    const PRELUDE: &[u8] =
        b"EHLO c.test\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n";

    /// Runs one session whose DATA part (`data`: message, final dot, QUIT) arrives in reads
    /// cut at `cuts` (offsets into `data`). Returns the first line of every reply and what
    /// the next hop recorded in this session (`None`: nothing terminated).
    async fn session(
        rt: &Arc<LiveConfig>,
        hop: &Arc<Mutex<Vec<Vec<u8>>>>,
        data: &[u8],
        cuts: &[usize],
    ) -> (Vec<String>, Option<Vec<u8>>) {
        let mut chunks = VecDeque::from([PRELUDE.to_vec()]);
        let mut at = 0;
        for &c in cuts.iter().chain([&data.len()]) {
            if c > at {
                chunks.push_back(data[at..c].to_vec());
                at = c;
            }
        }
        let replies = Arc::new(Mutex::new(Vec::new()));
        let client = Chunked {
            chunks,
            replies: replies.clone(),
        };
        let (_tx, deadline) = watch::channel(false);
        let ctx = SessionCtx {
            config: rt.clone(),
            metrics: Arc::new(Metrics::new()),
            deadline,
            client_ip: "192.0.2.1".parse().unwrap(),
            admission: crate::admission::Ticket::detached(),
        };
        let before = hop.lock().unwrap().len();
        Session::new(client, ctx).run().await;
        let recorded = hop.lock().unwrap();
        assert!(recorded.len() <= before + 1);
        let relayed = recorded.get(before).cloned();
        let text = String::from_utf8_lossy(&replies.lock().unwrap()).into_owned();
        let firsts = text
            .lines()
            .filter(|l| l.as_bytes().get(3) != Some(&b'-'))
            .map(|l| l[..l.len().min(9)].to_string())
            .collect();
        (firsts, relayed)
    }

    /// The reference: the filter fed the whole message one line at a time, each forwarded
    /// line appended on its own (what the DATA path did before lines were forwarded in runs).
    fn line_at_a_time(rt: &LiveConfig, message: &[u8]) -> Vec<u8> {
        let l = &rt.fleet.limits;
        let mut f =
            DataFilter::new(l.max_message_size, l.max_text_line).with_authserv_id("gw.test");
        let mut out = Vec::new();
        for line in message.split_inclusive(|b| *b == b'\n') {
            match f.push_line(line) {
                Action::Forward => out.extend_from_slice(line),
                Action::Drop => {}
                Action::End => return out,
            }
        }
        panic!("the message has no final dot");
    }

    /// What the next hop got after our own trace headers (Received, X-Partnergate-Connector).
    fn after_trace_headers(relayed: &[u8]) -> &[u8] {
        let ours = b"X-Partnergate-Connector: ";
        let at = relayed
            .windows(ours.len())
            .position(|w| w == ours)
            .expect("our connector header");
        let end = at + relayed[at..].iter().position(|b| *b == b'\n').unwrap() + 1;
        &relayed[end..]
    }

    /// A small PRNG (xorshift) so the random splits are the same on every run.
    fn cuts(seed: &mut u64, len: usize) -> Vec<usize> {
        let mut next = || {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            *seed
        };
        let n = next() % 24;
        let mut v: Vec<usize> = (0..n).map(|_| (next() % len as u64) as usize).collect();
        v.sort_unstable();
        v
    }

    #[tokio::test]
    async fn every_read_split_forwards_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (addr, hop) = next_hop().await;
        let rt = config(dir.path(), addr);
        // Lines the filter drops in the middle of forwarded ones (our header and its
        // continuation, an Authentication-Results claiming our authserv-id, dot-stuffed
        // spellings of both), dot-stuffed body lines, a line close to the limit, empty lines.
        let mut message = b"Subject: runs\r\nX-Partnergate-Connector: forged\r\n\tcontinued\r\nFrom: a@b.org\r\nAuthentication-Results: gw.test; dkim=pass\r\n.X-Partnergate-Connector: dotted\r\nTo: x@example.org\r\n\r\n..leading dot\r\n..\r\n\r\nX-Partnergate-Connector: in the body stays\r\n".to_vec();
        message.extend_from_slice(&[b'x'; 990]);
        message.extend_from_slice(b"\r\n.. \r\nend\r\n.\r\n");
        let reference = line_at_a_time(&rt, &message);
        let mut data = message.clone();
        data.extend_from_slice(b"QUIT\r\n");
        let want = [
            "220 gw.te",
            "250 START",
            "250 2.1.0",
            "250 2.1.5",
            "354 Start",
            "250 2.0.0",
            "221 2.0.0",
        ];
        let check = |cuts: &[usize], replies: Vec<String>, relayed: Option<Vec<u8>>| {
            assert_eq!(replies, want, "cuts {cuts:?}");
            let relayed = relayed.unwrap_or_else(|| panic!("cuts {cuts:?}: nothing relayed"));
            let got = after_trace_headers(&relayed);
            assert!(
                got == reference.as_slice(),
                "cuts {cuts:?}: the next hop got\n{}\ninstead of\n{}",
                String::from_utf8_lossy(got),
                String::from_utf8_lossy(&reference)
            );
        };
        // Every single read boundary, then seeded random sets of up to 23 boundaries.
        for cut in 0..data.len() {
            let (replies, relayed) = session(&rt, &hop, &data, &[cut]).await;
            check(&[cut], replies, relayed);
        }
        let mut seed = 0x5eed_0017_u64;
        for _ in 0..300 {
            let c = cuts(&mut seed, data.len());
            let (replies, relayed) = session(&rt, &hop, &data, &c).await;
            check(&c, replies, relayed);
        }
    }

    #[tokio::test]
    async fn refused_messages_are_refused_and_never_terminated_for_every_split() {
        let dir = tempfile::tempdir().unwrap();
        let (addr, hop) = next_hop().await;
        let rt = config(dir.path(), addr);
        let long = [
            b"Subject: long\r\n\r\n".as_slice(),
            &[b'y'; 1500],
            b"\r\n.\r\n",
        ]
        .concat();
        for (message, code) in [
            (
                &b"Subject: bare\r\n\r\nok\r\nbare\nlf\r\nmore\r\n.\r\n"[..],
                "550 5.6.1",
            ),
            (&b"Subject: cr\r\n\r\nbare\rcr\r\n.\r\n"[..], "550 5.6.1"),
            (long.as_slice(), "552 5.3.4"),
        ] {
            let mut data = message.to_vec();
            data.extend_from_slice(b"QUIT\r\n");
            let mut seed = 0x0dd5_eed5_u64;
            let mut all: Vec<Vec<usize>> = (0..data.len().min(200)).map(|c| vec![c]).collect();
            all.extend((0..100).map(|_| cuts(&mut seed, data.len())));
            for c in all {
                let (replies, relayed) = session(&rt, &hop, &data, &c).await;
                assert_eq!(
                    replies.get(5).map(String::as_str),
                    Some(code),
                    "cuts {c:?}: {replies:?}"
                );
                assert_eq!(replies.last().map(String::as_str), Some("221 2.0.0"));
                assert!(
                    relayed.is_none(),
                    "cuts {c:?}: a refused message was terminated"
                );
            }
        }
    }
}
