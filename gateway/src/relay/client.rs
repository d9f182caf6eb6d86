//! One SMTP client connection to a next hop (upstream, an Outbound connector's smart host or an
//! MX host), with the hop's TLS level enforced and never downgraded. It knows nothing of
//! transactions: [`super::transaction`] decides what is sent over which connection.

use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::config::{Timeouts, TlsLevel};
use crate::live_config::{NextHop, NextHopHost};
use crate::policy::TlsVersion;
use crate::reply::Reply;
use crate::reply::next_hop::{tls_failure, tls_policy_not_met, unreachable};
use crate::stream::Conn;
use crate::tls_policy::engine::Prepared;

/// Longest reply line we accept from a next hop (RFC 5321 says 512; be lenient).
const MAX_REPLY_LINE: usize = 4096;
const MAX_REPLY_LINES: usize = 100;
const WRITE_CHUNK: usize = 32 * 1024;

/// One reply from a next hop. Parsed by hand rather than with smtp-proto's `ResponseReceiver`
/// because we need every line's text for mirroring and a bounded, timed read from a tokio
/// stream; the grammar (`ddd-text` … `ddd text`) is three lines of code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HopReply {
    pub code: u16,
    pub esc: Option<[u16; 3]>,
    pub lines: Vec<String>,
}

impl HopReply {
    /// The reply to send our client: same code and enhanced code (a class default when the
    /// next hop has none), the next hop's text.
    pub fn mirror(&self, default_detail: [u16; 2]) -> Reply {
        let esc = self
            .esc
            .unwrap_or([self.code / 100, default_detail[0], default_detail[1]]);
        let esc = if (2..=5).contains(&(self.code / 100)) && self.code / 100 != 3 {
            esc
        } else {
            [0, 0, 0]
        };
        Reply::owned(self.code, esc, self.lines.join("\n"))
    }
}

/// Splits an `x.y.z ` enhanced status code off a reply line's text.
fn split_esc(text: &str) -> (Option<[u16; 3]>, &str) {
    let (head, rest) = text.split_once(' ').unwrap_or((text, ""));
    let parts: Vec<&str> = head.split('.').collect();
    if parts.len() == 3 {
        let nums: Vec<Option<u16>> = parts.iter().map(|p| p.parse().ok()).collect();
        if let [Some(a), Some(b), Some(c)] = nums[..]
            && (2..=5).contains(&a)
        {
            return (Some([a, b, c]), rest);
        }
    }
    (None, text)
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Capabilities {
    /// RFC 2920: MAIL and the first RCPT of a transaction go out in one write.
    pub pipelining: bool,
    pub starttls: bool,
    pub size: bool,
    pub eightbit: bool,
    pub smtputf8: bool,
    pub requiretls: bool,
}

pub struct HopConnection {
    conn: Conn<TcpStream>,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    pub label: String,
    pub caps: Capabilities,
    pub tls: Option<TlsVersion>,
    /// The next hop's leaf certificate, when TLS is up.
    pub peer_cert: Option<rustls_pki_types::CertificateDer<'static>>,
    /// Which host (and address) this connection went to, for logs and probes.
    pub peer: String,
    /// The next hop's certificate was authenticated, chain and name: DomainValidation, DANE or
    /// MTA-STS enforce (what REQUIRETLS needs, RFC 8689 4.2.1).
    pub authenticated: bool,
    /// The TLS policy that applied: `dane`, `mta-sts` or `none`.
    pub policy: &'static str,
    /// What the policy lookups found (connectors with a DANE/MTA-STS mode).
    pub policy_detail: Option<String>,
    reply_timeout: Duration,
    data_end_timeout: Duration,
}

/// `host:port`, with an IPv6 literal in brackets.
pub fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The targets of an MX-routed hop for one recipient domain, best first; the error is the
/// recipient's reply.
pub async fn mx_hosts(
    hop: &NextHop,
    domain: &str,
    resolver: &crate::mx::MxResolver,
) -> Result<Vec<NextHopHost>, Reply> {
    let Some(mx) = &hop.mx else {
        return Err(unreachable(&hop.label, "MX routing is not configured"));
    };
    let (hosts, security) = resolver
        .resolve_with(domain, hop.validates_mx())
        .await
        .map_err(|e| {
            tracing::warn!(next_hop = %hop.label, domain, error = %e, "MX lookup failed");
            match e {
                crate::mx::MxError::Bogus => {
                    crate::tls_policy::engine::count(&hop.label, "dane", "deferred");
                    e.reply(domain)
                }
                // A connector with a TLS policy defers as its policy lookups do.
                crate::mx::MxError::Timeout(_) if hop.policy.is_some() => {
                    tls_policy_not_met(&hop.label, &format!("{domain}: {e}"))
                }
                _ => e.reply(domain),
            }
        })?;
    let mut targets = Vec::new();
    let mut why = Vec::new();
    for h in &hosts {
        if let Some(e) = &h.error {
            why.push(e.clone());
        }
        for ip in &h.addrs {
            match mx.host(hop.level, &h.name, *ip, domain, security) {
                Ok(t) => targets.push(t),
                Err(e) => why.push(format!("{}: {e}", h.name)),
            }
        }
    }
    if targets.is_empty() {
        return Err(unreachable(
            &hop.label,
            &format!("no usable MX host for {domain} ({})", why.join("; ")),
        ));
    }
    Ok(targets)
}

/// Why [`HopConnection::open_qualifying`] found no connection.
#[derive(Debug)]
pub struct OpenError {
    pub reply: Reply,
    /// Every target reached was refused by the qualification (none failed otherwise).
    pub refused: bool,
}

/// Counts and logs how an MTA-STS testing policy fared on one connection: a testing failure
/// (at most one per connection, whatever went wrong first), else a success.
fn record_policy_outcome(label: &str, host: &str, p: &Prepared, failure: Option<String>) {
    let failure = failure
        .or_else(|| p.testing_failure.clone())
        .or_else(|| p.verifier.as_ref().and_then(|v| v.testing_failure()));
    match failure {
        Some(why) if p.testing => {
            crate::tls_policy::engine::count(label, p.policy, "testing_failure");
            tracing::warn!(next_hop = label, host, reason = %why, "MTA-STS testing: the policy would have refused this delivery; delivering anyway");
        }
        _ if p.policy != "none" => crate::tls_policy::engine::count(label, p.policy, "success"),
        _ => {}
    }
}

impl HopConnection {
    /// Opens a connection to the first target of `hop` that greets us and meets its TLS level.
    pub async fn open(hop: &NextHop, helo: &str, t: &Timeouts) -> Result<HopConnection, Reply> {
        if hop.hosts.is_empty() {
            let why = if hop.use_mx {
                "MX routing needs the recipient domain"
            } else {
                "no smart hosts configured"
            };
            return Err(unreachable(&hop.label, why));
        }
        Self::open_hosts(hop, &hop.hosts, helo, t).await
    }

    /// Tries `targets` in order: the next one on connect failure, a non-220 greeting or a TLS
    /// failure. The error is the last target's.
    pub async fn open_hosts(
        hop: &NextHop,
        targets: &[NextHopHost],
        helo: &str,
        t: &Timeouts,
    ) -> Result<HopConnection, Reply> {
        Self::open_qualifying(hop, targets, helo, t, &|_| None)
            .await
            .map_err(|e| e.reply)
    }

    /// Like [`HopConnection::open_hosts`], and a connection `qualifies` refuses (its reply) is
    /// closed for the next target (RFC 8689 4.2.1: the next MX host that offers REQUIRETLS).
    /// The error is the refusal only when no target failed otherwise (one that failed, e.g.
    /// was unreachable, might qualify later: its temporary error is returned).
    pub async fn open_qualifying(
        hop: &NextHop,
        targets: &[NextHopHost],
        helo: &str,
        t: &Timeouts,
        qualifies: &(dyn Fn(&HopConnection) -> Option<Reply> + Sync),
    ) -> Result<HopConnection, OpenError> {
        let mut failed = None;
        let mut refused = None;
        for target in targets {
            match Self::open_host(hop, target, helo, t).await {
                Ok(c) => match qualifies(&c) {
                    None => return Ok(c),
                    Some(reply) => {
                        tracing::warn!(next_hop = %hop.label, host = %target.host, addr = ?target.addr, port = target.port, reply = %reply, "next hop does not qualify; trying the next one");
                        c.quit().await;
                        refused = Some(reply);
                    }
                },
                Err(reply) => {
                    tracing::warn!(next_hop = %hop.label, host = %target.host, addr = ?target.addr, port = target.port, reply = %reply, "next hop attempt failed");
                    failed = Some(reply);
                }
            }
        }
        Err(match (failed, refused) {
            (Some(reply), _) => OpenError {
                reply,
                refused: false,
            },
            (None, Some(reply)) => OpenError {
                reply,
                refused: true,
            },
            (None, None) => OpenError {
                reply: unreachable(&hop.label, "no usable host"),
                refused: false,
            },
        })
    }

    async fn open_host(
        hop: &NextHop,
        target: &NextHopHost,
        helo: &str,
        t: &Timeouts,
    ) -> Result<HopConnection, Reply> {
        let secs = Duration::from_secs(t.next_hop_secs);
        let where_ = match target.addr {
            Some(ip) => format!("{}[{ip}]:{}", target.host, target.port),
            None => host_port(&target.host, target.port),
        };
        let connect = async {
            match target.addr {
                Some(ip) => TcpStream::connect(std::net::SocketAddr::new(ip, target.port)).await,
                None => TcpStream::connect((target.host.as_str(), target.port)).await,
            }
        };
        // The policy is decided before connecting: a deferred host is never connected to.
        let prepared = match &hop.policy {
            Some(p) => Some(p.prepare(&hop.label, target).await?),
            None => None,
        };
        let require_tls = prepared.as_ref().is_some_and(|p| p.require_tls);
        let policy = prepared.as_ref().map_or("none", |p| p.policy);
        let tcp = match timeout(secs, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(unreachable(
                    &hop.label,
                    &format!("connect to {where_} failed ({e})"),
                ));
            }
            Err(_) => {
                return Err(unreachable(
                    &hop.label,
                    &format!("connect to {where_} timed out"),
                ));
            }
        };
        let _ = tcp.set_nodelay(true);
        let mut c = HopConnection {
            conn: Conn::Plain(tcp),
            rbuf: Vec::new(),
            wbuf: Vec::new(),
            label: hop.label.clone(),
            caps: Capabilities::default(),
            tls: None,
            peer_cert: None,
            peer: where_.clone(),
            authenticated: false,
            policy,
            policy_detail: prepared.as_ref().map(|p| p.detail.clone()),
            reply_timeout: secs,
            data_end_timeout: Duration::from_secs(t.next_hop_data_end_secs),
        };
        let lost = |e: std::io::Error| unreachable(&hop.label, &format!("{where_}: {e}"));
        let greeting = c.read_reply().await.map_err(lost)?;
        if greeting.code != 220 {
            return Err(unreachable(
                &hop.label,
                &format!("{where_} greeted with {}", greeting.code),
            ));
        }
        c.ehlo(helo).await.map_err(lost)?;
        if hop.level == TlsLevel::None && !require_tls {
            if let Some(p) = prepared.as_ref().filter(|p| p.testing) {
                record_policy_outcome(
                    &hop.label,
                    &target.host,
                    p,
                    Some("the connector's tls level is None: no STARTTLS".into()),
                );
            }
            return Ok(c);
        }
        if !c.caps.starttls {
            if hop.level == TlsLevel::Opportunistic && !require_tls {
                // RFC 8461 testing: plaintext is a failure the policy would not allow.
                if let Some(p) = prepared.as_ref().filter(|p| p.testing) {
                    record_policy_outcome(
                        &hop.label,
                        &target.host,
                        p,
                        Some(format!("{where_} does not offer STARTTLS")),
                    );
                }
                return Ok(c);
            }
            if require_tls {
                crate::tls_policy::engine::count(&hop.label, policy, "failure");
                return Err(tls_policy_not_met(
                    &hop.label,
                    &format!("{where_} does not offer STARTTLS ({policy} requires TLS)"),
                ));
            }
            return Err(tls_failure(
                &hop.label,
                &format!("{where_} does not offer STARTTLS"),
            ));
        }
        c.send(b"STARTTLS\r\n").await.map_err(lost)?;
        let r = c.read_reply().await.map_err(lost)?;
        if r.code != 220 {
            return Err(tls_failure(
                &hop.label,
                &format!("{where_} refused STARTTLS with {}", r.code),
            ));
        }
        let Conn::Plain(tcp) = c.conn.take_inner() else {
            return Err(unreachable(&hop.label, "internal state error"));
        };
        // Anything the server sent after its 220 is not trusted (the client-side twin of
        // CVE-2011-0411).
        c.rbuf.clear();
        // Under a DANE or MTA-STS policy the SNI is the MX host (RFC 7672 2.2.3, RFC 8461
        // 4.2); otherwise the name configured for the host, as before the policies.
        let sni = if prepared.as_ref().is_some_and(|p| p.tls.is_some()) {
            target.host.clone()
        } else {
            target.server_name.clone()
        };
        let name = ServerName::try_from(sni)
            .map_err(|_| tls_failure(&hop.label, "invalid TLS server name"))?;
        let config = prepared
            .as_ref()
            .and_then(|p| p.tls.clone())
            .unwrap_or_else(|| target.tls.clone());
        let connector = tokio_rustls::TlsConnector::from(config);
        let tls = match timeout(
            Duration::from_secs(t.tls_handshake_secs),
            connector.connect(name, tcp),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                if let Some(why) = prepared
                    .as_ref()
                    .and_then(|p| p.verifier.as_ref())
                    .and_then(|v| v.failure())
                {
                    crate::tls_policy::engine::count(&hop.label, policy, "failure");
                    tracing::warn!(next_hop = %hop.label, host = %target.host, policy, reason = %why, "TLS policy: certificate refused");
                    return Err(tls_policy_not_met(&hop.label, &format!("{where_}: {why}")));
                }
                if prepared.is_some() {
                    crate::tls_policy::engine::count(&hop.label, policy, "failure");
                }
                return Err(tls_failure(
                    &hop.label,
                    &format!("{where_}: {}", crate::tls::describe_tls_error(&e)),
                ));
            }
            Err(_) => {
                return Err(tls_failure(
                    &hop.label,
                    &format!("{where_}: handshake timed out"),
                ));
            }
        };
        c.tls = match tls.get_ref().1.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => Some(TlsVersion::Tls13),
            Some(rustls::ProtocolVersion::TLSv1_2) => Some(TlsVersion::Tls12),
            _ => return Err(tls_failure(&hop.label, "TLS below 1.2")),
        };
        c.peer_cert = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .map(|cert| cert.clone().into_owned());
        c.conn = Conn::ClientTls(Box::new(tls));
        // RFC 8689 4.2.1: only a checked name authenticates; CertificateValidation checks the
        // chain alone.
        c.authenticated = match &prepared {
            Some(p) => p.authenticated,
            None => hop.level == TlsLevel::DomainValidation,
        };
        if let Some(p) = &prepared {
            record_policy_outcome(&hop.label, &target.host, p, None);
            tracing::info!(next_hop = %hop.label, host = %target.host, policy, detail = %p.detail, "TLS policy applied");
        }
        c.ehlo(helo).await.map_err(lost)?;
        Ok(c)
    }

    async fn ehlo(&mut self, helo: &str) -> std::io::Result<()> {
        self.send(format!("EHLO {helo}\r\n").as_bytes()).await?;
        let r = self.read_reply().await?;
        if r.code != 250 {
            self.send(format!("HELO {helo}\r\n").as_bytes()).await?;
            let r = self.read_reply().await?;
            if r.code != 250 {
                return Err(std::io::Error::other(format!(
                    "HELO refused with {}",
                    r.code
                )));
            }
            self.caps = Capabilities::default();
            return Ok(());
        }
        // A keyword check over the lines we already split; smtp-proto's EhloResponse parser
        // would need the raw bytes re-assembled for no gain.
        let mut caps = Capabilities::default();
        for line in r.lines.iter().skip(1) {
            let kw = line
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_ascii_uppercase();
            match kw.as_str() {
                "PIPELINING" => caps.pipelining = true,
                "STARTTLS" => caps.starttls = true,
                "SIZE" => caps.size = true,
                "8BITMIME" => caps.eightbit = true,
                "SMTPUTF8" => caps.smtputf8 = true,
                "REQUIRETLS" => caps.requiretls = true,
                _ => {}
            }
        }
        self.caps = caps;
        Ok(())
    }

    /// Queues a command to go out with the next [`HopConnection::send`] or flush (RFC 2920).
    pub fn queue(&mut self, bytes: &[u8]) {
        self.wbuf.extend_from_slice(bytes);
    }

    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.wbuf.extend_from_slice(bytes);
        self.flush().await
    }

    pub async fn flush(&mut self) -> std::io::Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let fut = async {
            self.conn.write_all(&self.wbuf).await?;
            self.conn.flush().await
        };
        match timeout(self.reply_timeout, fut).await {
            Ok(r) => {
                self.wbuf.clear();
                r
            }
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "write timed out",
            )),
        }
    }

    /// Buffered write for DATA; flushed in chunks so the message is streamed, not held.
    pub async fn write_data(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.wbuf.extend_from_slice(bytes);
        if self.wbuf.len() >= WRITE_CHUNK {
            self.flush().await?;
        }
        Ok(())
    }

    pub async fn read_reply(&mut self) -> std::io::Result<HopReply> {
        let t = self.reply_timeout;
        self.read_reply_within(t).await
    }

    async fn read_reply_within(&mut self, t: Duration) -> std::io::Result<HopReply> {
        match timeout(t, self.read_reply_inner()).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "reply timed out",
            )),
        }
    }

    async fn read_reply_inner(&mut self) -> std::io::Result<HopReply> {
        let mut lines = Vec::new();
        let mut esc = None;
        loop {
            let line = self.read_line().await?;
            let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed reply");
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches(['\r', '\n']);
            if text.len() < 3 || !text.is_char_boundary(3) {
                return Err(bad());
            }
            let code: u16 = text[..3].parse().map_err(|_| bad())?;
            let sep = text.as_bytes().get(3).copied().unwrap_or(b' ');
            let rest = text.get(4..).unwrap_or("");
            let (e, t) = split_esc(rest);
            if esc.is_none() {
                esc = e;
            }
            lines.push(t.to_string());
            if lines.len() > MAX_REPLY_LINES {
                return Err(bad());
            }
            if sep != b'-' {
                if !(200..600).contains(&code) {
                    return Err(bad());
                }
                return Ok(HopReply { code, esc, lines });
            }
        }
    }

    async fn read_line(&mut self) -> std::io::Result<Vec<u8>> {
        loop {
            if let Some(i) = self.rbuf.iter().position(|b| *b == b'\n') {
                return Ok(self.rbuf.drain(..=i).collect());
            }
            if self.rbuf.len() > MAX_REPLY_LINE {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "reply line too long",
                ));
            }
            let mut tmp = [0u8; 4096];
            let n = self.conn.read(&mut tmp).await?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed",
                ));
            }
            self.rbuf.extend_from_slice(&tmp[..n]);
        }
    }

    /// Sends a command and reads its reply.
    pub async fn command(&mut self, line: &str) -> std::io::Result<HopReply> {
        self.send(line.as_bytes()).await?;
        self.read_reply().await
    }

    /// Ends DATA with the terminator and waits (longer) for the final reply.
    pub async fn finish_data(&mut self) -> std::io::Result<HopReply> {
        self.wbuf.extend_from_slice(b".\r\n");
        self.flush().await?;
        let t = self.data_end_timeout;
        self.read_reply_within(t).await
    }

    /// Polite close; errors do not matter any more.
    pub async fn quit(mut self) {
        let _ = timeout(Duration::from_secs(5), async {
            if self.send(b"QUIT\r\n").await.is_ok() {
                let _ = self.read_reply().await;
            }
            let _ = self.conn.shutdown().await;
        })
        .await;
    }

    /// Drops the connection without ending DATA, so the next hop discards the partial message.
    pub fn abort(self) {
        drop(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enhanced_codes_are_split_and_mirrored() {
        assert_eq!(split_esc("5.7.1 denied"), (Some([5, 7, 1]), "denied"));
        assert_eq!(split_esc("hello"), (None, "hello"));
        assert_eq!(split_esc("1.2.3 x"), (None, "1.2.3 x"));
        let r = HopReply {
            code: 550,
            esc: None,
            lines: vec!["no such user".into()],
        };
        assert_eq!(r.mirror([1, 1]).to_string(), "550 5.1.1 no such user");
        let r = HopReply {
            code: 452,
            esc: Some([4, 2, 2]),
            lines: vec!["full".into()],
        };
        assert_eq!(r.mirror([0, 0]).esc_string(), "4.2.2");
    }
}
