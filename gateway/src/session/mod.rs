//! One SMTP session as a state machine over the phases greeting → EHLO → (STARTTLS → EHLO) →
//! MAIL → RCPT* → DATA, generic over the byte stream so tests and the fuzzer drive it in memory.
//!
//! One file per phase, as in Stalwart's `smtp::inbound`: [`io`] (line reading, RFC 2920 reply
//! batching, read and write deadlines), [`ehlo`], [`starttls`], [`mail`], [`rcpt`], [`data`].
//! This file holds the session state and the command dispatch. The session decides (policy)
//! and replies; everything that goes to a next hop goes through the transaction's
//! [`RelayTransaction`] and the session's [`IdlePool`], never a connection of its own.
//!
//! A session mostly waits (issue 17: RSS per idle session): the large futures that run only now
//! and then (DATA, the next-hop dialogue and its reset, the TLS handshake, SPF) are boxed where
//! they are awaited, so an idle session's task holds the session and its wait, nothing more.

mod data;
mod ehlo;
mod io;
mod mail;
mod rcpt;
mod starttls;

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use smtp_proto::Request;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use crate::certs::PeerCert;
use crate::live_config::LiveConfig;
use crate::metrics::Metrics;
use crate::policy::{self, CertFacts, Facts, Route, SenderDecision, TlsVersion, tls_str};
use crate::relay::{IdlePool, RelayTransaction, route_label};
use crate::reply::{Reply, fixed};
use crate::stream::Conn;

static SESSION_IDS: AtomicU64 = AtomicU64::new(1);

/// Everything a session gets from the server.
pub struct SessionCtx {
    pub config: Arc<LiveConfig>,
    pub metrics: Arc<Metrics>,
    /// Becomes true when the shutdown grace period is over.
    pub deadline: watch::Receiver<bool>,
    pub client_ip: IpAddr,
    /// The session's connection slot: shed signal, stress timeout, MAIL FROM reached.
    pub admission: crate::admission::Ticket,
}

enum Flow {
    Continue,
    Close,
}

/// One transaction: the sender decision (policy), its sender authentication and its next-hop
/// side.
struct Transaction {
    decision: SenderDecision,
    relay: RelayTransaction,
    auth: TxAuth,
}

/// What sender authentication decided at MAIL FROM ([`crate::auth`]).
struct TxAuth {
    plan: crate::auth::Plan,
    /// The SPF result: decided at MAIL FROM when required, else at DATA (when the plan
    /// evaluates SPF).
    spf: Option<mail_auth::SpfOutput>,
    /// Index in `connectors.inbound` of the claiming connector that sets
    /// `senderAuthentication` (its `domains` bound what counts).
    partner: Option<usize>,
}

/// The last SPF result of this session, by (MAIL FROM address, HELO name): a client looping
/// MAIL/RSET with the same identity costs one evaluation, not one per command.
struct SpfCache {
    sender: String,
    helo: String,
    out: mail_auth::SpfOutput,
}

pub struct Session<S> {
    conn: Conn<S>,
    rbuf: Vec<u8>,
    rpos: usize,
    out: Vec<u8>,
    ctx: SessionCtx,
    rt: Arc<LiveConfig>,
    id: String,
    helo: Option<String>,
    esmtp: bool,
    tls: Option<TlsVersion>,
    cert: Option<Arc<PeerCert>>,
    errors: usize,
    tx: Option<Transaction>,
    /// Next-hop connections kept between transactions of this session.
    pool: IdlePool,
    /// Discarding the rest of an over-long command line.
    skipping_line: bool,
    spf_cache: Option<SpfCache>,
}

/// One SMTP decision for the `decision` log target: the fields every decision line carries
/// are filled in by [`Session::log_decision`]; these are the ones that vary.
#[derive(Default)]
struct Decision<'a> {
    connector: &'a str,
    rule: &'a str,
    outcome: &'a str,
    reply: Option<&'a Reply>,
    next_hop: Option<&'a str>,
    recipients: Option<usize>,
    internal: Option<bool>,
    error: Option<&'a str>,
    /// The outbound TLS policy of the next hop connection (`dane`, `mta-sts`, `none`).
    tls_policy: Option<&'a str>,
    /// Sender authentication mechanism and result, e.g. `spf:fail`, `dmarc:pass`.
    auth: Option<&'a str>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub fn new(stream: S, ctx: SessionCtx) -> Session<S> {
        let rt = ctx.config.clone();
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
            pool: IdlePool::default(),
            skipping_line: false,
            spf_cache: None,
        }
    }

    fn reply(&mut self, r: &Reply) {
        r.write_to(&mut self.out);
    }

    fn cert_subject(&self) -> String {
        self.cert
            .as_ref()
            .map_or_else(|| "none".to_string(), |c| c.info.subject.clone())
    }

    /// The one place decision lines are written: session, client IP, TLS version and
    /// certificate subject on every line, whatever the phase.
    fn log_decision(&self, d: Decision<'_>, message: &str) {
        tracing::info!(target: "decision", session = %self.id, client_ip = %self.ctx.client_ip,
            connector = d.connector, rule = d.rule, tls = tls_str(self.tls),
            cert_subject = %self.cert_subject(), outcome = d.outcome,
            reply = d.reply.map(tracing::field::display), next_hop = d.next_hop,
            recipients = d.recipients, internal = d.internal, error = d.error,
            tls_policy = d.tls_policy, auth = d.auth, "{message}");
    }

    fn facts(&self) -> Facts<'_> {
        Facts {
            client_ip: self.ctx.client_ip,
            tls: self.tls,
            cert: self.cert.as_deref().map(|c| c as &dyn CertFacts),
        }
    }

    /// Runs the session to its end. Callers that keep the session in a task of their own
    /// should use [`Session::serve`]: an async fn's by-value argument takes room twice in its
    /// future (the argument and the local it is moved to), here a whole `Session` per task.
    pub async fn run(mut self) {
        self.serve().await;
    }

    /// Runs the session to its end, the session itself living wherever the caller keeps it.
    pub async fn serve(&mut self) {
        let greeting = format!("220 {} ESMTP partnergate\r\n", self.rt.fleet.hostname);
        self.out.extend_from_slice(greeting.as_bytes());
        loop {
            let line = match self.next_command().await {
                Ok(l) => l,
                Err(io::ReadError::Timeout) => {
                    self.reply(&fixed::TIMEOUT);
                    break;
                }
                Err(io::ReadError::Shutdown) => {
                    self.reply(&fixed::SHUTTING_DOWN);
                    break;
                }
                Err(io::ReadError::Shed) => {
                    self.reply(&crate::admission::SHED_REPLY);
                    break;
                }
                Err(io::ReadError::Closed) => {
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
        self.close().await;
        if let Some(tx) = self.tx.take() {
            tx.relay.close();
        }
        self.pool.close();
    }

    fn count_error(&mut self) -> Flow {
        self.errors += 1;
        if self.errors >= self.rt.fleet.limits.max_errors {
            self.reply(&fixed::TOO_MANY_ERRORS);
            let d = Decision {
                connector: "none",
                rule: "maxErrors",
                outcome: "closed",
                ..Decision::default()
            };
            self.log_decision(d, "too many errors");
            return Flow::Close;
        }
        Flow::Continue
    }

    /// The connector a transaction's mail is counted and stamped under: the claiming Inbound
    /// connector, else the Outbound connector the route goes to, else `none`.
    fn route_connector(&self, decision: &SenderDecision, route: &Route) -> String {
        match (&decision.connector, route) {
            (Some(c), _) => c.clone(),
            (None, Route::Outbound(_) | Route::OutboundMx(..)) => route_label(&self.rt, route),
            (None, Route::Upstream) => "none".into(),
        }
    }

    /// A policy refusal of MAIL or RCPT: logged, counted by rule, answered.
    fn refuse(&mut self, connector: &str, refusal: &policy::Refusal, message: &str) {
        let d = Decision {
            connector,
            rule: refusal.rule.as_str(),
            outcome: "rejected",
            reply: Some(&refusal.reply),
            ..Decision::default()
        };
        self.log_decision(d, message);
        self.ctx.metrics.rejection(connector, refusal.rule.as_str());
        self.reply(&refusal.reply);
    }

    fn error(&mut self, r: &Reply) -> Flow {
        self.reply(r);
        self.count_error()
    }

    /// Ends the open transaction, if any; its next-hop connection is reset and kept.
    async fn end_tx(&mut self) {
        if let Some(end) = self.end_tx_boxed() {
            end.await;
        }
    }

    /// The reset of the open transaction's next hop, boxed: it is a large future, and inline
    /// it would be part of every session's task for its whole life (EHLO, STARTTLS and RSET
    /// await it). Built outside the async fn so the moved-out transaction takes no room in it.
    fn end_tx_boxed(&mut self) -> Option<Pin<Box<impl Future<Output = ()> + Send + '_>>> {
        let tx = self.tx.take()?;
        Some(Box::pin(tx.relay.end(&mut self.pool)))
    }

    async fn command(&mut self, line: &[u8]) -> Flow {
        // smtp-proto replaces invalid UTF-8 with U+FFFD: such an address would be relayed
        // altered, so it is a syntax error.
        let utf8 = std::str::from_utf8(line).is_ok();
        let req = match Request::parse(&mut line.iter()) {
            Ok(r) => r,
            Err(e) => return self.error(&parse_error_reply(e)),
        };
        match req {
            Request::Ehlo { host } => self.ehlo(&host, true).await,
            Request::Helo { host } => self.ehlo(&host, false).await,
            Request::StartTls => self.starttls().await,
            Request::Mail { .. } if !utf8 => self.error(&fixed::BAD_SENDER),
            Request::Rcpt { .. } if !utf8 => self.error(&fixed::BAD_RCPT),
            Request::Mail { from } => self.mail(from).await,
            Request::Rcpt { to } => self.rcpt(to).await,
            // Boxed: the DATA path is the largest future of the session; inline it would be
            // part of every idle session's task. One allocation per message.
            Request::Data => Box::pin(self.data()).await,
            Request::Rset => {
                self.end_tx().await;
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
}

/// How a reply ends up for the metrics and the decision log: `positive` (e.g. `relayed`,
/// `accepted`) for 2xx/3xx, `tempfail` for 4xx, `rejected` for 5xx.
fn outcome(reply: &Reply, positive: &'static str) -> &'static str {
    if reply.is_positive() {
        positive
    } else if reply.is_transient() {
        "tempfail"
    } else {
        "rejected"
    }
}

fn parse_error_reply(e: smtp_proto::Error) -> Reply {
    match e {
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
    }
}

/// The loaded config the session's unit tests (here and in data.rs) run on.
#[cfg(test)]
pub(super) mod test_config {
    use std::sync::Arc;

    use crate::live_config::{ConfigPaths, LiveConfig, load};

    /// A config loaded from `dir`: a fresh self-signed certificate for gw.test, accepted domain
    /// example.org, no connectors, and `fleet`'s top-level keys on top.
    pub fn live_config(dir: &std::path::Path, fleet: serde_json::Value) -> Arc<LiveConfig> {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["gw.test".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.join("c.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("k.pem"), key.serialize_pem()).unwrap();
        let mut base = serde_json::json!({
            "hostname": "gw.test",
            "serverCertificate": {"certFile": "c.pem", "keyFile": "k.pem"},
            "acceptedDomains": ["example.org"],
        });
        if let (Some(b), serde_json::Value::Object(extra)) = (base.as_object_mut(), fleet) {
            b.extend(extra);
        }
        std::fs::write(dir.join("fleet.json"), base.to_string()).unwrap();
        std::fs::write(dir.join("connectors.json"), "{}").unwrap();
        Arc::new(
            load(&ConfigPaths {
                fleet: dir.join("fleet.json"),
                connectors: dir.join("connectors.json"),
            })
            .unwrap(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn live_config(dir: &std::path::Path) -> Arc<LiveConfig> {
        test_config::live_config(
            dir,
            serde_json::json!({
                "limits": {"maxErrors": 4, "maxMessageSize": 1000},
                "upstream": {"host": "127.0.0.1", "port": 1, "tls": "None"},
            }),
        )
    }

    fn ctx(dir: &std::path::Path, deadline: watch::Receiver<bool>) -> SessionCtx {
        SessionCtx {
            config: live_config(dir),
            metrics: Arc::new(Metrics::new()),
            deadline,
            client_ip: "192.0.2.1".parse().unwrap(),
            admission: crate::admission::Ticket::detached(),
        }
    }

    /// Runs one session over an in-memory pipe; returns the first line of every reply.
    async fn talk(input: &[u8]) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let (_tx, deadline) = watch::channel(false);
        let ctx = ctx(dir.path(), deadline);
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

    /// An idle session's task holds its `serve` future for hours: the large futures that run
    /// only now and then (DATA, the next-hop dialogue, its reset, the TLS handshake, SPF) are
    /// boxed, so they take room only while they run. Inline they made it 14 KiB (issue 17).
    #[tokio::test]
    async fn idle_session_future_stays_small() {
        let dir = tempfile::tempdir().unwrap();
        let (_tx, deadline) = watch::channel(false);
        let (_client, server) = tokio::io::duplex(1024);
        let mut session = Session::new(server, ctx(dir.path(), deadline));
        let size = std::mem::size_of_val(&session.serve());
        assert!(size <= 4096, "the session's future is {size} bytes");
    }

    /// Between transactions, a session waiting for its next command holds no buffer: the read
    /// and reply buffers are given back while the read waits, and come back when bytes arrive.
    #[tokio::test]
    async fn idle_session_gives_its_buffers_back() {
        let dir = tempfile::tempdir().unwrap();
        let (_tx, deadline) = watch::channel(false);
        let (mut client, server) = tokio::io::duplex(4096);
        let mut session = Session::new(server, ctx(dir.path(), deadline));
        client.write_all(b"EHLO c.test\r\n").await.unwrap();
        let line = session.next_command().await.ok().flatten().unwrap();
        assert!(matches!(session.command(&line).await, Flow::Continue));
        {
            let mut next = std::pin::pin!(session.next_command());
            let pending = std::future::poll_fn(|cx| {
                std::task::Poll::Ready(next.as_mut().poll(cx).is_pending())
            })
            .await;
            assert!(pending, "no command was sent yet");
        }
        assert_eq!((session.rbuf.capacity(), session.out.capacity()), (0, 0));
        client.write_all(b"NOOP\r\n").await.unwrap();
        let line = session.next_command().await.ok().flatten().unwrap();
        assert_eq!(line, b"NOOP\r\n");
        let mut reply = [0u8; 9];
        client.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"250-gw.te");
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
