//! SMTP replies and transcripts common to every client, plus a raw synchronous SMTP client
//! (TCP, optional STARTTLS with rustls) for the tests that need exact control of the bytes.

use std::fmt;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::CertPair;

/// One SMTP reply, possibly multi-line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Each line without the code and separator.
    pub lines: Vec<String>,
}

impl Reply {
    /// Parses reply lines as received (`250-first`, `250 last`).
    pub fn parse(raw: &[String]) -> Option<Reply> {
        let last = raw.last()?;
        let code = last.get(..3)?.parse().ok()?;
        let lines = raw
            .iter()
            .map(|l| l.get(4..).unwrap_or("").to_string())
            .collect();
        Some(Reply { code, lines })
    }

    /// `"550 5.7.1 text"` of the first line (how the code is usually quoted).
    pub fn summary(&self) -> String {
        format!(
            "{} {}",
            self.code,
            self.lines.first().map(String::as_str).unwrap_or("")
        )
    }

    pub fn text(&self) -> String {
        self.lines.join("\n")
    }

    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    /// Does `expected` ("550", "550 5.7.1", "530 5.7.0 Must issue") prefix this reply?
    pub fn matches(&self, expected: &str) -> bool {
        self.summary().starts_with(expected)
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, l) in self.lines.iter().enumerate() {
            let sep = if i + 1 == self.lines.len() { ' ' } else { '-' };
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}{}{}", self.code, sep, l)?;
        }
        Ok(())
    }
}

/// Asserts that `reply` starts with `expected` (code, enhanced code, optional text prefix).
#[track_caller]
pub fn assert_reply(reply: &Reply, expected: &str, context: &str) {
    assert!(
        reply.matches(expected),
        "{context}: expected a reply starting with {expected:?}, got {:?}",
        reply.to_string()
    );
}

/// What a client said and what the server answered, in order. The greeting is the reply to the
/// command `""`.
#[derive(Debug, Clone, Default)]
pub struct Transcript {
    pub steps: Vec<(String, Reply)>,
    /// Everything the client program printed (for failure messages).
    pub raw: String,
}

impl Transcript {
    /// The reply to the first command starting with `prefix` (case-insensitive), e.g.
    /// `"MAIL FROM"`, `"RCPT TO"`, `"DATA"`, `"."`.
    pub fn reply_to(&self, prefix: &str) -> Option<&Reply> {
        self.replies_to(prefix).into_iter().next()
    }

    pub fn replies_to(&self, prefix: &str) -> Vec<&Reply> {
        let p = prefix.to_ascii_uppercase();
        self.steps
            .iter()
            .filter(|(c, _)| c.to_ascii_uppercase().starts_with(&p))
            .map(|(_, r)| r)
            .collect()
    }

    /// The first reply of 400 or above.
    pub fn first_failure(&self) -> Option<&Reply> {
        self.steps.iter().map(|(_, r)| r).find(|r| r.code >= 400)
    }

    /// The reply to the end of DATA (`.`), if the client got that far.
    pub fn data_end(&self) -> Option<&Reply> {
        self.reply_to(".")
    }

    /// Asserts the first failure starts with `expected`.
    #[track_caller]
    pub fn assert_refused(&self, expected: &str, context: &str) {
        match self.first_failure() {
            Some(r) => assert!(
                r.matches(expected),
                "{context}: expected the first failure to be {expected:?}, got {:?}\n{}",
                r.to_string(),
                self.raw
            ),
            None => panic!(
                "{context}: expected a {expected:?} refusal, every reply was positive\n{}",
                self.raw
            ),
        }
    }

    /// Asserts the message was accepted: no failure and a 250 to the end of DATA.
    #[track_caller]
    pub fn assert_delivered(&self, context: &str) {
        if let Some(r) = self.first_failure() {
            panic!(
                "{context}: expected delivery, got {:?}\n{}",
                r.to_string(),
                self.raw
            );
        }
        match self.data_end() {
            Some(r) if r.code == 250 => {}
            other => panic!(
                "{context}: expected 250 after DATA's final dot, got {other:?}\n{}",
                self.raw
            ),
        }
    }
}

/// TLS settings for the raw client.
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub ca: std::path::PathBuf,
    pub server_name: String,
    pub client_cert: Option<CertPair>,
    /// `Some("1.2")` or `Some("1.3")` to allow only that version.
    pub version: Option<&'static str>,
}

impl ClientTls {
    pub fn new(ca: &Path) -> ClientTls {
        ClientTls {
            ca: ca.to_path_buf(),
            server_name: "gateway.test".into(),
            client_cert: None,
            version: None,
        }
    }

    pub fn with_cert(mut self, pair: &CertPair) -> ClientTls {
        self.client_cert = Some(pair.clone());
        self
    }

    pub fn config(&self) -> rustls::ClientConfig {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let versions: &[&'static rustls::SupportedProtocolVersion] = match self.version {
            Some("1.2") => &[&rustls::version::TLS12],
            Some("1.3") => &[&rustls::version::TLS13],
            _ => rustls::DEFAULT_VERSIONS,
        };
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&self.ca).expect("read CA file") {
            roots.add(c.expect("CA PEM")).expect("add CA");
        }
        let b = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .expect("TLS versions")
            .with_root_certificates(roots);
        match &self.client_cert {
            Some(pair) => {
                let certs = CertificateDer::pem_file_iter(&pair.cert)
                    .expect("client cert")
                    .collect::<Result<Vec<_>, _>>()
                    .expect("client cert PEM");
                let key = PrivateKeyDer::from_pem_file(&pair.key).expect("client key");
                b.with_client_auth_cert(certs, key).expect("client auth")
            }
            None => b.with_no_client_auth(),
        }
    }
}

/// A client connection before or after STARTTLS (shared by [`SmtpConn`] and `wire::Wire`).
pub(super) enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    pub(super) fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => &s.sock,
        }
    }
    /// A read, retried when interrupted: with a read timeout set (`SO_RCVTIMEO`) the kernel
    /// never restarts `recv` after a signal or a stop/continue, even for `SA_RESTART`
    /// handlers, and a loaded CI box made it fail with EINTR ~200 ms into a wait for a reply
    /// the gateway had sent ("no reply to RCPT", once in about 100 runs).
    pub(super) fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let r = match self {
                Stream::Plain(s) => s.read(buf),
                Stream::Tls(s) => s.read(buf),
            };
            match r {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }
    pub(super) fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.write_all(buf).and_then(|_| s.flush()),
            Stream::Tls(s) => s.write_all(buf).and_then(|_| s.flush()),
        }
    }
}

/// A raw synchronous SMTP connection (all reads guarded by a 20 s timeout).
pub struct SmtpConn {
    stream: Option<Stream>,
    buf: Vec<u8>,
    pub transcript: Transcript,
    /// TLS version negotiated, after [`SmtpConn::starttls`].
    pub tls_version: Option<String>,
    /// Why the last read gave up ("EOF", or the error and how long the read waited), for
    /// failure messages.
    last_read_end: Option<String>,
}

/// Connects from `local` (a 127.x address) when given.
pub fn connect_from(addr: SocketAddr, local: Option<Ipv4Addr>) -> std::io::Result<TcpStream> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let s = rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4()?;
        if let Some(ip) = local {
            sock.bind(SocketAddr::from((ip, 0)))?;
        }
        tokio::time::timeout(Duration::from_secs(10), sock.connect(addr))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timeout"))?
    })?;
    let s = s.into_std()?;
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    Ok(s)
}

impl SmtpConn {
    /// Connects without reading the greeting.
    pub fn connect_raw(addr: SocketAddr, local: Option<Ipv4Addr>) -> SmtpConn {
        let s = connect_from(addr, local).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        SmtpConn {
            stream: Some(Stream::Plain(s)),
            buf: Vec::new(),
            transcript: Transcript::default(),
            tls_version: None,
            last_read_end: None,
        }
    }

    /// Connects and reads the greeting (returned in the transcript as the reply to `""`).
    pub fn connect(addr: SocketAddr, local: Option<Ipv4Addr>) -> (SmtpConn, Reply) {
        let mut c = SmtpConn::connect_raw(addr, local);
        let r = c.read_reply().expect("greeting");
        c.transcript.steps.push((String::new(), r.clone()));
        (c, r)
    }

    pub fn set_read_timeout(&mut self, d: Duration) {
        let tcp = match self.stream.as_ref().expect("stream") {
            Stream::Plain(s) => s,
            Stream::Tls(s) => &s.sock,
        };
        tcp.set_read_timeout(Some(d)).expect("set timeout");
    }

    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.as_mut().expect("stream").write_all(bytes)
    }

    /// Reads one reply; `None` at EOF (or on a read error such as a reset).
    pub fn read_reply(&mut self) -> Option<Reply> {
        let mut lines = Vec::new();
        loop {
            let line = self.read_line()?;
            let last = line.len() < 4 || line.as_bytes()[3] != b'-';
            lines.push(line);
            if last {
                return Reply::parse(&lines);
            }
        }
    }

    /// Reads one CRLF-terminated line; `None` at EOF.
    pub fn read_line(&mut self) -> Option<String> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Some(String::from_utf8_lossy(&line).into_owned());
            }
            let mut chunk = [0u8; 4096];
            let started = std::time::Instant::now();
            match self.stream.as_mut()?.read(&mut chunk) {
                Ok(0) => {
                    self.last_read_end = Some(format!("EOF after {:?}", started.elapsed()));
                    return None;
                }
                Err(e) => {
                    self.last_read_end = Some(format!(
                        "read error {:?} ({e}) after {:?}",
                        e.kind(),
                        started.elapsed()
                    ));
                    return None;
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// True when the server closed the connection (EOF or reset) within the read timeout.
    pub fn is_closed(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut chunk = [0u8; 1];
        match self.stream.as_mut().map(|s| s.read(&mut chunk)) {
            None | Some(Ok(0)) => true,
            Some(Ok(_)) => {
                self.buf.push(chunk[0]);
                false
            }
            Some(Err(e)) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    }

    /// Sends one command line (CRLF added) and reads its reply.
    pub fn cmd(&mut self, line: &str) -> Reply {
        self.try_cmd(line).unwrap_or_else(|| {
            panic!(
                "no reply to {line:?} ({}); transcript: {:?}",
                self.last_read_end.as_deref().unwrap_or("?"),
                self.transcript
            )
        })
    }

    pub fn try_cmd(&mut self, line: &str) -> Option<Reply> {
        if let Err(e) = self.send_raw(format!("{line}\r\n").as_bytes()) {
            self.last_read_end = Some(format!("sending it failed: {:?} ({e})", e.kind()));
            return None;
        }
        let r = self.read_reply()?;
        self.transcript.steps.push((line.to_string(), r.clone()));
        Some(r)
    }

    /// Sends DATA, then `body` (already CRLF-terminated, dot-stuffed by the caller), then the
    /// terminator, returning (reply to DATA, reply to the final dot).
    pub fn data(&mut self, body: &str) -> (Reply, Option<Reply>) {
        let r = self.cmd("DATA");
        if r.code != 354 {
            return (r, None);
        }
        self.send_raw(body.as_bytes()).expect("send body");
        self.send_raw(b".\r\n").expect("send dot");
        let end = self.read_reply();
        if let Some(e) = &end {
            self.transcript.steps.push((".".into(), e.clone()));
        }
        (r, end)
    }

    /// Bytes received but not yet consumed as a reply.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    /// Sends STARTTLS, expects 220 and performs the handshake. Returns the 220 reply; panics on
    /// a handshake failure (use [`SmtpConn::try_starttls`] to observe one).
    pub fn starttls(&mut self, tls: &ClientTls) -> Reply {
        let r = self.cmd("STARTTLS");
        assert_eq!(r.code, 220, "STARTTLS refused: {r}");
        self.handshake(tls).expect("TLS handshake");
        r
    }

    /// TLS handshake on the current plaintext stream (after the 220 was read).
    pub fn handshake(&mut self, tls: &ClientTls) -> Result<(), String> {
        let Some(Stream::Plain(mut tcp)) = self.stream.take() else {
            panic!("handshake on a stream that is not plaintext");
        };
        let name = ServerName::try_from(tls.server_name.clone()).expect("server name");
        let mut conn =
            rustls::ClientConnection::new(Arc::new(tls.config()), name).expect("client conn");
        while conn.is_handshaking() {
            match conn.complete_io(&mut tcp) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("TLS handshake failed: {e}")),
                Ok(_) => {}
            }
        }
        self.tls_version = conn.protocol_version().map(|v| format!("{v:?}"));
        self.stream = Some(Stream::Tls(Box::new(rustls::StreamOwned::new(conn, tcp))));
        Ok(())
    }

    /// EHLO + MAIL + RCPTs + DATA; stops at the first refusal. Returns the transcript part.
    pub fn send_mail(&mut self, from: &str, to: &[&str], body: &str) -> Transcript {
        let start = self.transcript.steps.len();
        let mail = self.cmd(&format!("MAIL FROM:<{from}>"));
        if mail.is_positive() {
            let mut any = false;
            for t in to {
                any |= self.cmd(&format!("RCPT TO:<{t}>")).is_positive();
            }
            if any {
                self.data(body);
            }
        }
        Transcript {
            steps: self.transcript.steps[start..].to_vec(),
            raw: format!("{:#?}", &self.transcript.steps[start..]),
        }
    }

    pub fn quit(mut self) {
        let _ = self.try_cmd("QUIT");
    }
}

/// A small RFC 5322 message with CRLF line ends.
pub fn message(from: &str, to: &str, subject: &str, extra_headers: &[&str]) -> String {
    let mut m = format!("From: <{from}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n");
    for h in extra_headers {
        m.push_str(h);
        m.push_str("\r\n");
    }
    m.push_str("Message-ID: <");
    m.push_str(&subject.replace(' ', "-"));
    m.push_str("@partnergate.test>\r\n\r\nHello from the partnergate tests.\r\n");
    m
}

/// Injects one message into a peer MTA listening on `listen` (the way a local submitter would)
/// and returns its final `250` reply, which carries the MTA's queue id. `mta` names it in
/// failures, with `log()` (its log) attached.
pub fn inject(
    listen: SocketAddr,
    mta: &str,
    log: impl Fn() -> String,
    from: &str,
    to: &str,
    body: &str,
) -> Reply {
    let (mut c, greeting) = SmtpConn::connect(listen, None);
    assert_eq!(greeting.code, 220, "{mta} greeting: {greeting}");
    c.cmd("EHLO submitter.contoso.com");
    let t = c.send_mail(from, &[to], body);
    let end = t
        .data_end()
        .cloned()
        .unwrap_or_else(|| panic!("{mta} refused the injected message: {t:?}\n{}", log()));
    assert_eq!(end.code, 250, "{mta} queued the message: {end}");
    c.quit();
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wait for a reply that the process being stopped and continued interrupts (EINTR:
    /// the socket has a read timeout) still gets the reply. Before `Stream::read` retried,
    /// `read_reply` gave `None` here ("no reply").
    #[test]
    fn a_read_interrupted_by_stop_and_continue_still_gets_the_reply() {
        let net = super::super::Net::new();
        let listener = std::net::TcpListener::bind((net.ip(1), 0)).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            std::thread::sleep(Duration::from_millis(1500));
            s.write_all(b"220 late but here\r\n").expect("write");
            std::thread::sleep(Duration::from_millis(200));
        });
        let mut c = SmtpConn::connect_raw(addr, Some(net.client(0)));
        // Stop and continue this whole process while the client waits in recv.
        let pid = std::process::id();
        let mut kicker = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("sleep 0.5; kill -STOP {pid}; kill -CONT {pid}"))
            .spawn()
            .expect("spawn sh");
        let reply = c.read_reply();
        kicker.wait().expect("wait sh");
        server.join().expect("server thread");
        assert_eq!(
            reply.map(|r| r.summary()),
            Some("220 late but here".to_string()),
            "{:?}",
            c.last_read_end
        );
    }
}
