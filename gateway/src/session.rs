//! One SMTP session as a state machine over the phases greeting → EHLO → (STARTTLS → EHLO) →
//! MAIL → RCPT* → DATA, generic over the byte stream so tests can drive it in memory.
//!
//! Commands are parsed with smtp-proto's `Request::parse` on one complete line at a time; the
//! line itself is cut here because the line limit, the STARTTLS buffer discard and RFC 2920
//! flushing all depend on knowing exactly what is buffered.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use smtp_proto::{MailFrom, RcptTo, Request};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::timeout;

use crate::certs::PeerCert;
use crate::data::{Action, DataError, DataFilter};
use crate::metrics::Metrics;
use crate::policy::{self, CertFacts, Facts, Route, SenderDecision, TlsVersion, tls_str};
use crate::relay::{NextHop, unreachable};
use crate::reply::{Reply, fixed};
use crate::runtime::Runtime;
use crate::stream::Conn;

static SESSION_IDS: AtomicU64 = AtomicU64::new(1);

/// Everything a session gets from the server.
pub struct SessionCtx {
    pub runtime: Arc<Runtime>,
    pub metrics: Arc<Metrics>,
    /// Becomes true when the shutdown grace period is over.
    pub deadline: watch::Receiver<bool>,
    pub client_ip: IpAddr,
}

enum ReadError {
    Timeout,
    Shutdown,
    Closed,
}

enum Flow {
    Continue,
    Close,
}

struct Transaction {
    sender: String,
    decision: SenderDecision,
    size: usize,
    eightbit: bool,
    smtputf8: bool,
    route: Option<Route>,
    hop: Option<NextHop>,
    /// MAIL has been sent to `hop`.
    mail_sent: bool,
    accepted: Vec<String>,
}

pub struct Session<S> {
    conn: Conn<S>,
    rbuf: Vec<u8>,
    rpos: usize,
    out: Vec<u8>,
    ctx: SessionCtx,
    rt: Arc<Runtime>,
    id: String,
    helo: Option<String>,
    esmtp: bool,
    tls: Option<TlsVersion>,
    cert: Option<Arc<PeerCert>>,
    errors: usize,
    tx: Option<Transaction>,
    /// A next-hop connection kept between transactions of this session.
    idle_hop: Option<(Route, NextHop)>,
    /// Discarding the rest of an over-long command line.
    skipping_line: bool,
}

fn mail_params_unsupported(m: &MailFrom<Cow<'_, str>>) -> bool {
    let allowed =
        smtp_proto::MAIL_BODY_7BIT | smtp_proto::MAIL_BODY_8BITMIME | smtp_proto::MAIL_SMTPUTF8;
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

fn rcpt_params_unsupported(r: &RcptTo<Cow<'_, str>>) -> bool {
    r.orcpt.is_some() || r.flags != 0 || r.rrvs != 0
}

/// The address as it goes to the next hop. smtp-proto hands over the local part dequoted, so
/// quote it again unless it is a dot-string (RFC 5321 4.1.2): `"user@evil.test"@example.org`
/// must not become `user@evil.test@example.org`, another address.
fn wire_address(addr: &str) -> Cow<'_, str> {
    let Some((local, domain)) = addr.rsplit_once('@') else {
        return Cow::Borrowed(addr);
    };
    let atext =
        |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii();
    if !local.is_empty()
        && local
            .split('.')
            .all(|atom| !atom.is_empty() && atom.chars().all(atext))
    {
        return Cow::Borrowed(addr);
    }
    let mut q = String::with_capacity(addr.len() + 4);
    q.push('"');
    for c in local.chars() {
        if c == '"' || c == '\\' {
            q.push('\\');
        }
        q.push(c);
    }
    q.push_str("\"@");
    q.push_str(domain);
    Cow::Owned(q)
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

async fn wait_deadline(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow() {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub fn new(stream: S, ctx: SessionCtx) -> Session<S> {
        let rt = ctx.runtime.clone();
        Session {
            conn: Conn::Plain(stream),
            rbuf: Vec::with_capacity(1024),
            rpos: 0,
            out: Vec::with_capacity(512),
            ctx,
            rt,
            id: format!("{:x}", SESSION_IDS.fetch_add(1, Ordering::Relaxed)),
            helo: None,
            esmtp: false,
            tls: None,
            cert: None,
            errors: 0,
            tx: None,
            idle_hop: None,
            skipping_line: false,
        }
    }

    fn reply(&mut self, r: &Reply) {
        r.write_to(&mut self.out);
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let res = self.conn.write_all(&self.out).await;
        self.out.clear();
        res?;
        self.conn.flush().await
    }

    fn cert_subject(&self) -> String {
        self.cert
            .as_ref()
            .map_or_else(|| "none".to_string(), |c| c.info.subject.clone())
    }

    /// Reads more bytes into the buffer, honouring the timeout and the shutdown deadline.
    async fn fill(&mut self, secs: u64) -> Result<(), ReadError> {
        if self.rpos > 0 && self.rpos == self.rbuf.len() {
            self.rbuf.clear();
            self.rpos = 0;
        } else if self.rpos > 64 * 1024 {
            self.rbuf.drain(..self.rpos);
            self.rpos = 0;
        }
        let mut tmp = [0u8; 16 * 1024];
        let mut deadline = self.ctx.deadline.clone();
        let read = timeout(Duration::from_secs(secs), self.conn.read(&mut tmp));
        tokio::select! {
            r = read => match r {
                Ok(Ok(0)) | Ok(Err(_)) => Err(ReadError::Closed),
                Ok(Ok(n)) => {
                    self.rbuf.extend_from_slice(&tmp[..n]);
                    Ok(())
                }
                Err(_) => Err(ReadError::Timeout),
            },
            _ = wait_deadline(&mut deadline) => Err(ReadError::Shutdown),
        }
    }

    /// The next command line (with its LF), `Ok(None)` for an over-long line. Replies are
    /// flushed only when no complete command is buffered: RFC 2920 batching.
    async fn next_command(&mut self) -> Result<Option<Vec<u8>>, ReadError> {
        let limit = self.rt.fleet.limits.max_command_line;
        loop {
            let pending = &self.rbuf[self.rpos..];
            if let Some(i) = pending.iter().position(|b| *b == b'\n') {
                let line = pending[..=i].to_vec();
                self.rpos += i + 1;
                if std::mem::take(&mut self.skipping_line) {
                    continue;
                }
                if line.len() > limit {
                    return Ok(None);
                }
                return Ok(Some(line));
            }
            if pending.len() > limit {
                self.rpos = self.rbuf.len();
                if !self.skipping_line {
                    self.skipping_line = true;
                    return Ok(None);
                }
            }
            if self.flush().await.is_err() {
                return Err(ReadError::Closed);
            }
            let secs = self.rt.fleet.timeouts.command_secs;
            self.fill(secs).await?;
        }
    }

    pub async fn run(mut self) {
        let greeting = format!("220 {} ESMTP partnergate\r\n", self.rt.fleet.hostname);
        self.out.extend_from_slice(greeting.as_bytes());
        loop {
            let line = match self.next_command().await {
                Ok(l) => l,
                Err(ReadError::Timeout) => {
                    self.reply(&fixed::TIMEOUT);
                    break;
                }
                Err(ReadError::Shutdown) => {
                    self.reply(&fixed::SHUTTING_DOWN);
                    break;
                }
                Err(ReadError::Closed) => {
                    self.out.clear();
                    break;
                }
            };
            let flow = match line {
                None => {
                    self.reply(&fixed::LINE_TOO_LONG);
                    self.count_error()
                }
                Some(line) => self.command(&line).await,
            };
            if let Flow::Close = flow {
                break;
            }
        }
        let _ = self.flush().await;
        let _ = self.conn.shutdown().await;
        self.abort_tx().await;
        if let Some((_, hop)) = self.idle_hop.take() {
            hop.quit().await;
        }
    }

    fn count_error(&mut self) -> Flow {
        self.errors += 1;
        if self.errors >= self.rt.fleet.limits.max_errors {
            self.reply(&fixed::TOO_MANY_ERRORS);
            tracing::info!(target: "decision", session = %self.id, client_ip = %self.ctx.client_ip, rule = "maxErrors", outcome = "closed", "too many errors");
            return Flow::Close;
        }
        Flow::Continue
    }

    fn error(&mut self, r: &Reply) -> Flow {
        self.reply(r);
        self.count_error()
    }

    async fn command(&mut self, line: &[u8]) -> Flow {
        // smtp-proto replaces invalid UTF-8 with U+FFFD: such an address would be relayed
        // altered, so it is a syntax error.
        let utf8 = std::str::from_utf8(line).is_ok();
        let parsed = Request::parse(&mut line.iter());
        let req = match parsed {
            Ok(r) => r,
            Err(e) => {
                let r = match e {
                    smtp_proto::Error::UnknownCommand => fixed::UNRECOGNISED,
                    smtp_proto::Error::InvalidSenderAddress => fixed::BAD_SENDER,
                    smtp_proto::Error::InvalidRecipientAddress => fixed::BAD_RCPT,
                    smtp_proto::Error::UnsupportedParameter { .. } => fixed::UNSUPPORTED_PARAM,
                    smtp_proto::Error::InvalidParameter { param } => {
                        Reply::owned(501, [5, 5, 4], format!("Invalid {param} parameter"))
                    }
                    smtp_proto::Error::SyntaxError { syntax } => {
                        Reply::owned(501, [5, 5, 4], format!("Syntax: {syntax}"))
                    }
                    _ => Reply::new(501, [5, 5, 4], "Syntax error"),
                };
                return self.error(&r);
            }
        };
        match req {
            Request::Ehlo { host } => {
                self.abort_tx().await;
                self.helo = Some(host.to_string());
                self.esmtp = true;
                let f = &self.rt.fleet;
                let mut lines = vec![
                    f.hostname.clone(),
                    "PIPELINING".into(),
                    format!("SIZE {}", f.limits.max_message_size),
                    "8BITMIME".into(),
                    "SMTPUTF8".into(),
                    "ENHANCEDSTATUSCODES".into(),
                ];
                if self.tls.is_none() {
                    lines.push("STARTTLS".into());
                }
                let last = lines.len() - 1;
                for (i, l) in lines.iter().enumerate() {
                    let sep = if i == last { ' ' } else { '-' };
                    self.out
                        .extend_from_slice(format!("250{sep}{l}\r\n").as_bytes());
                }
                Flow::Continue
            }
            Request::Helo { host } => {
                self.abort_tx().await;
                self.helo = Some(host.to_string());
                self.esmtp = false;
                let r = format!("250 {}\r\n", self.rt.fleet.hostname);
                self.out.extend_from_slice(r.as_bytes());
                Flow::Continue
            }
            Request::StartTls => self.starttls().await,
            Request::Mail { .. } if !utf8 => self.error(&fixed::BAD_SENDER),
            Request::Rcpt { .. } if !utf8 => self.error(&fixed::BAD_RCPT),
            Request::Mail { from } => self.mail(from),
            Request::Rcpt { to } => self.rcpt(to).await,
            Request::Data => self.data().await,
            Request::Rset => {
                self.abort_tx().await;
                self.reply(&fixed::OK);
                Flow::Continue
            }
            Request::Noop { .. } => {
                self.reply(&fixed::OK);
                Flow::Continue
            }
            Request::Help { .. } => {
                self.reply(&fixed::HELP);
                Flow::Continue
            }
            Request::Quit => {
                self.reply(&fixed::BYE);
                Flow::Close
            }
            Request::Vrfy { .. } | Request::Expn { .. } => self.error(&fixed::VRFY_DISABLED),
            Request::Bdat { .. } => self.error(&fixed::BDAT_NOT_OFFERED),
            Request::Lhlo { .. }
            | Request::Auth { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. } => self.error(&fixed::NOT_IMPLEMENTED),
        }
    }

    async fn starttls(&mut self) -> Flow {
        if self.tls.is_some() {
            return self.error(&fixed::ALREADY_TLS);
        }
        if self.helo.is_none() {
            return self.error(&fixed::HELO_FIRST);
        }
        self.reply(&fixed::READY_TLS);
        if self.flush().await.is_err() {
            return Flow::Close;
        }
        // CVE-2011-0411: whatever the client pipelined after STARTTLS was sent in plaintext and
        // must never be executed inside the TLS session.
        self.rbuf.clear();
        self.rpos = 0;
        self.skipping_line = false;
        let Conn::Plain(plain) = self.conn.take_inner() else {
            return Flow::Close;
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(self.rt.server_tls.clone());
        let secs = Duration::from_secs(self.rt.fleet.timeouts.tls_handshake_secs);
        let tls = match timeout(secs, acceptor.accept(plain)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.ctx.metrics.tls("unknown", "failure");
                tracing::info!(target: "decision", session = %self.id, client_ip = %self.ctx.client_ip, rule = "starttls", outcome = "handshake_failed", error = %e, "TLS handshake failed");
                return Flow::Close;
            }
            Err(_) => {
                self.ctx.metrics.tls("unknown", "timeout");
                return Flow::Close;
            }
        };
        let (_, server) = tls.get_ref();
        let version = match server.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => TlsVersion::Tls13,
            Some(rustls::ProtocolVersion::TLSv1_2) => TlsVersion::Tls12,
            _ => return Flow::Close,
        };
        let chain: Option<Vec<_>> = server
            .peer_certificates()
            .filter(|c| !c.is_empty())
            .map(|c| c.iter().map(|d| d.clone().into_owned()).collect());
        self.cert = chain
            .and_then(|c| PeerCert::new(c, self.rt.trust.clone()))
            .map(Arc::new);
        self.ctx.metrics.tls(version.as_str(), "success");
        self.tls = Some(version);
        self.conn = Conn::ServerTls(Box::new(tls));
        // RFC 3207: the session starts over; EHLO is required again.
        self.helo = None;
        self.esmtp = false;
        self.tx = None;
        tracing::debug!(session = %self.id, tls = version.as_str(), cert_subject = %self.cert_subject(), "STARTTLS done");
        Flow::Continue
    }

    fn facts(&self) -> Facts<'_> {
        Facts {
            client_ip: self.ctx.client_ip,
            tls: self.tls,
            cert: self.cert.as_deref().map(|c| c as &dyn CertFacts),
        }
    }

    fn mail(&mut self, from: MailFrom<Cow<'_, str>>) -> Flow {
        if self.helo.is_none() {
            return self.error(&fixed::HELO_FIRST);
        }
        if self.tx.is_some() {
            return self.error(&fixed::NESTED_MAIL);
        }
        if mail_params_unsupported(&from) {
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
        let connector = decision.connector.clone().unwrap_or_else(|| "none".into());
        match &decision.outcome {
            Err(refusal) => {
                tracing::info!(target: "decision", session = %self.id, client_ip = %self.ctx.client_ip,
                    connector = %connector, rule = refusal.rule.as_str(), tls = tls_str(self.tls),
                    cert_subject = %self.cert_subject(), outcome = "rejected", reply = %refusal.reply, "MAIL FROM refused");
                self.ctx
                    .metrics
                    .rejection(&connector, refusal.rule.as_str());
                self.ctx.metrics.message(&connector, "inbound", "rejected");
                let r = refusal.reply.clone();
                self.reply(&r);
            }
            Ok(()) => {
                tracing::info!(target: "decision", session = %self.id, client_ip = %self.ctx.client_ip,
                    connector = %connector, rule = "claim", tls = tls_str(self.tls),
                    cert_subject = %self.cert_subject(), internal = decision.internal, outcome = "accepted", "MAIL FROM accepted");
                self.tx = Some(Transaction {
                    sender: from.address.to_string(),
                    decision,
                    size: from.size,
                    eightbit: from.flags & smtp_proto::MAIL_BODY_8BITMIME != 0,
                    smtputf8: from.flags & smtp_proto::MAIL_SMTPUTF8 != 0,
                    route: None,
                    hop: None,
                    mail_sent: false,
                    accepted: Vec::new(),
                });
                self.reply(&fixed::SENDER_OK);
            }
        }
        Flow::Continue
    }

    fn route_label(&self, route: &Route) -> String {
        match route {
            Route::Upstream => "upstream".into(),
            Route::Outbound(i) | Route::OutboundMx(i, _) => self
                .rt
                .connectors
                .outbound
                .get(*i)
                .map_or_else(|| "unknown".into(), |c| c.name.clone()),
        }
    }

    async fn rcpt(&mut self, to: RcptTo<Cow<'_, str>>) -> Flow {
        let Some(tx) = self.tx.as_mut() else {
            return self.error(&fixed::NEED_MAIL);
        };
        if rcpt_params_unsupported(&to) {
            return self.error(&fixed::UNSUPPORTED_PARAM);
        }
        if !to.address.is_ascii() && !tx.smtputf8 {
            return self.error(&fixed::NEED_SMTPUTF8);
        }
        let rt = self.rt.clone();
        let decision = policy::decide_recipient(
            &rt.fleet,
            &rt.connectors,
            tx.decision.internal,
            &to.address,
            tx.route.as_ref(),
            tx.accepted.len(),
        );
        let connector = tx
            .decision
            .connector
            .clone()
            .unwrap_or_else(|| "none".into());
        let route = match decision {
            Ok(r) => r,
            Err(refusal) => {
                tracing::info!(target: "decision", session = %self.id, client_ip = %self.ctx.client_ip,
                    connector = %connector, rule = refusal.rule.as_str(), tls = tls_str(self.tls),
                    cert_subject = %self.cert_subject(), outcome = "rejected", reply = %refusal.reply, "RCPT TO refused");
                self.ctx
                    .metrics
                    .rejection(&connector, refusal.rule.as_str());
                self.reply(&refusal.reply);
                return Flow::Continue;
            }
        };
        let reply = self.forward_rcpt(&route, &to.address).await;
        if reply.is_positive()
            && let Some(tx) = self.tx.as_mut()
        {
            tx.accepted.push(to.address.to_string());
            tx.route = Some(route.clone());
        }
        tracing::info!(target: "decision", session = %self.id, client_ip = %self.ctx.client_ip,
            connector = %connector, rule = "recipient", next_hop = %self.route_label(&route), tls = tls_str(self.tls),
            cert_subject = %self.cert_subject(), outcome = if reply.is_positive() { "accepted" } else { "refused_by_next_hop" },
            reply = %reply, "RCPT TO decided");
        self.reply(&reply);
        Flow::Continue
    }

    /// Opens the route's next hop if needed, sends MAIL once, then this RCPT; the reply is the
    /// next hop's.
    async fn forward_rcpt(&mut self, route: &Route, rcpt: &str) -> Reply {
        let rt = self.rt.clone();
        let label = self.route_label(route);
        let Some(tx) = self.tx.as_mut() else {
            return fixed::NEED_MAIL;
        };
        if tx.hop.is_none() {
            let reuse = match self.idle_hop.take() {
                Some((r, hop)) if r == *route => Some(hop),
                Some((_, hop)) => {
                    hop.quit().await;
                    None
                }
                None => None,
            };
            let hop = match reuse {
                Some(h) => h,
                None => {
                    let target = match route {
                        Route::Upstream => Some(&rt.upstream),
                        Route::Outbound(i) | Route::OutboundMx(i, _) => rt.outbound.get(*i),
                    };
                    let Some(target) = target else {
                        return unreachable(&label, "route not configured");
                    };
                    let opened = match route {
                        Route::OutboundMx(_, domain) => {
                            match crate::relay::mx_targets(target, domain, &rt.resolver).await {
                                Ok(targets) => {
                                    NextHop::open_targets(
                                        target,
                                        &targets,
                                        &rt.fleet.hostname,
                                        &rt.fleet.timeouts,
                                    )
                                    .await
                                }
                                Err(r) => Err(r),
                            }
                        }
                        _ => NextHop::open(target, &rt.fleet.hostname, &rt.fleet.timeouts).await,
                    };
                    match opened {
                        Ok(h) => h,
                        Err(r) => return r,
                    }
                }
            };
            tx.hop = Some(hop);
            tx.mail_sent = false;
        }
        let Some(hop) = tx.hop.as_mut() else {
            return fixed::LOCAL_ERROR;
        };
        if !tx.mail_sent {
            let mut cmd = format!("MAIL FROM:<{}>", wire_address(&tx.sender));
            if hop.caps.size && tx.size > 0 {
                cmd.push_str(&format!(" SIZE={}", tx.size));
            }
            if hop.caps.eightbit && tx.eightbit {
                cmd.push_str(" BODY=8BITMIME");
            }
            if hop.caps.smtputf8 && tx.smtputf8 {
                cmd.push_str(" SMTPUTF8");
            }
            cmd.push_str("\r\n");
            match hop.command(&cmd).await {
                Ok(r) if r.is_positive() => tx.mail_sent = true,
                Ok(r) => {
                    if let Some(h) = tx.hop.take() {
                        h.quit().await;
                    }
                    return r.mirror([1, 0]);
                }
                Err(e) => {
                    tx.hop = None;
                    return unreachable(&label, &format!("connection lost ({e})"));
                }
            }
        }
        let Some(hop) = tx.hop.as_mut() else {
            return fixed::LOCAL_ERROR;
        };
        match hop
            .command(&format!("RCPT TO:<{}>\r\n", wire_address(rcpt)))
            .await
        {
            Ok(r) => r.mirror([1, 5]),
            Err(e) => {
                tx.hop = None;
                tx.mail_sent = false;
                unreachable(&label, &format!("connection lost ({e})"))
            }
        }
    }

    /// Ends the transaction; a next hop in a clean state is kept for the next one.
    async fn abort_tx(&mut self) {
        let Some(mut tx) = self.tx.take() else {
            return;
        };
        if let Some(mut hop) = tx.hop.take() {
            if tx.mail_sent {
                match hop.command("RSET\r\n").await {
                    Ok(r) if r.is_positive() => {}
                    _ => return,
                }
            }
            if let Some(route) = tx.route.take() {
                self.idle_hop = Some((route, hop));
            } else {
                hop.quit().await;
            }
        }
    }

    fn trace_headers(&self, tx: &Transaction) -> Vec<u8> {
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
        let connector = match (&tx.decision.connector, &tx.route) {
            (Some(c), _) => c.clone(),
            (None, Some(r @ (Route::Outbound(_) | Route::OutboundMx(..)))) => self.route_label(r),
            _ => "none".into(),
        };
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

    async fn data(&mut self) -> Flow {
        let Some(mut tx) = self.tx.take() else {
            return self.error(&fixed::NEED_MAIL);
        };
        if tx.accepted.is_empty() || tx.hop.is_none() {
            self.tx = Some(tx);
            self.reply(&fixed::NO_VALID_RCPT);
            return Flow::Continue;
        }
        let Some(mut hop) = tx.hop.take() else {
            return Flow::Continue;
        };
        let route = tx.route.clone().unwrap_or(Route::Upstream);
        let label = self.route_label(&route);
        let direction = if route == Route::Upstream {
            "inbound"
        } else {
            "outbound"
        };
        let connector = tx.decision.connector.clone().unwrap_or_else(|| {
            if route == Route::Upstream {
                "none".into()
            } else {
                label.clone()
            }
        });
        let started = Instant::now();
        match hop.command("DATA\r\n").await {
            Ok(r) if r.code == 354 => {}
            Ok(r) => {
                self.reply(&r.mirror([0, 0]));
                tx.hop = Some(hop);
                self.tx = Some(tx);
                self.abort_tx().await;
                return Flow::Continue;
            }
            Err(e) => {
                self.reply(&unreachable(&label, &format!("connection lost ({e})")));
                return Flow::Continue;
            }
        }
        self.reply(&fixed::START_DATA);
        if self.flush().await.is_err() {
            hop.abort();
            return Flow::Close;
        }
        let limits = &self.rt.fleet.limits;
        let mut filter = DataFilter::new(limits.max_message_size, limits.max_text_line);
        let max_line = limits.max_text_line;
        let mut hop_ok = hop.write_data(&self.trace_headers(&tx)).await.is_ok();
        let data_secs = self.rt.fleet.timeouts.data_secs;
        loop {
            let pending = &self.rbuf[self.rpos..];
            if let Some(i) = pending.iter().position(|b| *b == b'\n') {
                let line = &pending[..=i];
                let action = filter.push_line(line);
                if action == Action::Forward && hop_ok {
                    let line = line.to_vec();
                    hop_ok = hop.write_data(&line).await.is_ok();
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
            match self.fill(data_secs).await {
                Ok(()) => {}
                Err(e) => {
                    hop.abort();
                    self.ctx.metrics.message(&connector, direction, "aborted");
                    match e {
                        ReadError::Timeout => self.reply(&fixed::TIMEOUT),
                        ReadError::Shutdown => self.reply(&fixed::SHUTTING_DOWN),
                        ReadError::Closed => {}
                    }
                    return Flow::Close;
                }
            }
        }
        let log_refusal = |this: &Self, rule: &str, reply: &Reply| {
            tracing::info!(target: "decision", session = %this.id, client_ip = %this.ctx.client_ip,
                connector = %connector, rule, tls = tls_str(this.tls), cert_subject = %this.cert_subject(),
                outcome = "rejected", reply = %reply, "message refused");
        };
        if let Some(err) = filter.error {
            // Nothing was terminated upstream: dropping the connection makes the next hop
            // discard the partial message, so nothing is relayed.
            hop.abort();
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
        if !hop_ok {
            hop.abort();
            let reply = unreachable(&label, "connection lost during DATA");
            log_refusal(self, "nextHop", &reply);
            self.ctx.metrics.message(&connector, direction, "tempfail");
            self.reply(&reply);
            return Flow::Continue;
        }
        let reply = match hop.finish_data().await {
            Ok(r) => {
                let reply = r.mirror([0, 0]);
                self.idle_hop = Some((route, hop));
                reply
            }
            Err(e) => {
                hop.abort();
                unreachable(&label, &format!("no reply to end of data ({e})"))
            }
        };
        self.ctx
            .metrics
            .relay_duration
            .observe(started.elapsed().as_secs_f64());
        let outcome = if reply.is_positive() {
            "relayed"
        } else if reply.is_transient() {
            "tempfail"
        } else {
            "rejected"
        };
        self.ctx.metrics.message(&connector, direction, outcome);
        tracing::info!(target: "decision", session = %self.id, client_ip = %self.ctx.client_ip,
            connector = %connector, rule = "data", next_hop = %label, tls = tls_str(self.tls),
            cert_subject = %self.cert_subject(), recipients = tx.accepted.len(), outcome, reply = %reply, "message done");
        self.reply(&reply);
        Flow::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::{ConfigPaths, load};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn runtime(dir: &std::path::Path) -> Arc<Runtime> {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["gw.test".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.join("c.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("k.pem"), key.serialize_pem()).unwrap();
        std::fs::write(
            dir.join("fleet.json"),
            r#"{"hostname":"gw.test","serverCertificate":{"certFile":"c.pem","keyFile":"k.pem"},
                "acceptedDomains":["example.org"],"limits":{"maxErrors":4,"maxMessageSize":1000},
                "upstream":{"host":"127.0.0.1","port":1,"tls":"None"}}"#,
        )
        .unwrap();
        std::fs::write(dir.join("connectors.json"), "{}").unwrap();
        Arc::new(
            load(&ConfigPaths {
                fleet: dir.join("fleet.json"),
                connectors: dir.join("connectors.json"),
            })
            .unwrap(),
        )
    }

    /// Runs one session over an in-memory pipe; returns the first line of every reply.
    async fn talk(input: &[u8]) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let (_tx, deadline) = watch::channel(false);
        let ctx = SessionCtx {
            runtime: runtime(dir.path()),
            metrics: Arc::new(Metrics::new()),
            deadline,
            client_ip: "192.0.2.1".parse().unwrap(),
        };
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(Session::new(server, ctx).run());
        client.write_all(input).await.unwrap();
        let mut out = String::new();
        client.read_to_string(&mut out).await.unwrap();
        task.await.unwrap();
        out.lines()
            .filter(|l| l.as_bytes().get(3) != Some(&b'-'))
            .map(str::to_string)
            .collect()
    }

    fn codes(replies: &[String]) -> Vec<&str> {
        replies.iter().map(|r| &r[..r.len().min(9)]).collect()
    }

    #[tokio::test]
    async fn sequence_and_refused_commands() {
        let r = talk(b"MAIL FROM:<a@b.org>\r\nEHLO c.test\r\nVRFY x\r\nMAIL FROM:<a@b.org> SIZE=5000\r\nMAIL FROM:<a@b.org>\r\nMAIL FROM:<a@b.org>\r\nQUIT\r\n").await;
        assert_eq!(
            codes(&r),
            [
                "220 gw.te",
                "503 5.5.1",
                "250 START",
                "502 5.5.1",
                "552 5.3.4",
                "250 2.1.0",
                "503 5.5.1",
                "221 2.0.0"
            ]
        );
    }

    #[tokio::test]
    async fn relaying_denied_no_recipients_and_unreachable_upstream() {
        let r = talk(b"EHLO c.test\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<x@elsewhere.net>\r\nDATA\r\nRCPT TO:<x@example.org>\r\nBDAT 0 LAST\r\nQUIT\r\n").await;
        assert_eq!(
            codes(&r),
            [
                "220 gw.te",
                "250 START",
                "250 2.1.0",
                "550 5.7.1",
                "554 5.5.1",
                "451 4.4.1",
                "502 5.5.1",
                "221 2.0.0"
            ]
        );
    }

    #[tokio::test]
    async fn long_lines_and_too_many_errors_close() {
        let mut input = b"EHLO c.test\r\n".to_vec();
        input.extend_from_slice(&[b'A'; 600]);
        input.extend_from_slice(b"\r\nNOOP\r\nFOO\r\nBAR\r\nBAZ\r\nNOOP\r\n");
        let r = talk(&input).await;
        assert_eq!(
            codes(&r),
            [
                "220 gw.te",
                "250 START",
                "500 5.5.2",
                "250 2.0.0",
                "500 5.5.1",
                "500 5.5.1",
                "500 5.5.1",
                "421 4.7.0"
            ]
        );
    }

    #[tokio::test]
    async fn starttls_before_ehlo_and_unknown_parameters() {
        let r = talk(b"STARTTLS\r\nEHLO c.test\r\nMAIL FROM:<a@b.org> RET=FULL\r\nQUIT\r\n").await;
        assert_eq!(
            codes(&r),
            [
                "220 gw.te",
                "503 5.5.1",
                "250 STARTTLS",
                "555 5.5.4",
                "221 2.0.0"
            ]
            .map(|s| &s[..s.len().min(9)])
        );
    }
}
