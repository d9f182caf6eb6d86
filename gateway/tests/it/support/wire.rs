//! A byte-exact scripted SMTP client for hostile sessions: it sends packets verbatim (plaintext
//! or inside TLS), never waits for a reply between packets unless told to, keeps every byte the
//! server sent, and parses the replies at the end. Large packets are written in chunks with the
//! replies drained in between, so a server answering a huge pipelined batch never deadlocks
//! against us.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;

use super::smtp::{ClientTls, Reply, Stream, connect_from};

/// One scripted connection.
pub struct Wire {
    stream: Option<Stream>,
    /// Every byte received so far (plaintext and decrypted TLS, in order).
    pub received: Vec<u8>,
    /// How many bytes of `received` were consumed by [`Wire::read_reply`].
    consumed: usize,
    /// The connection reached EOF (or a reset).
    pub eof: bool,
    /// A write failed (the server had closed the connection).
    pub write_failed: bool,
}

const CHUNK: usize = 16 * 1024;

impl Wire {
    /// Connects from `local` and reads the greeting (guard: 20 s).
    pub fn connect(addr: SocketAddr, local: Option<Ipv4Addr>) -> (Wire, Option<Reply>) {
        let mut w = Wire::connect_silent(addr, local);
        let g = w.read_reply(Duration::from_secs(20));
        (w, g)
    }

    /// Connects from `local` and reads the greeting; connection errors are returned.
    pub fn try_connect(
        addr: SocketAddr,
        local: Option<Ipv4Addr>,
    ) -> std::io::Result<(Wire, Option<Reply>)> {
        let s = connect_from(addr, local)?;
        let _ = s.set_nodelay(true);
        let mut w = Wire {
            stream: Some(Stream::Plain(s)),
            received: Vec::new(),
            consumed: 0,
            eof: false,
            write_failed: false,
        };
        let g = w.read_reply(Duration::from_secs(10));
        Ok((w, g))
    }

    /// Connects from `local` without reading anything (TCP_NODELAY on, so each
    /// [`Wire::send`] is its own segment).
    pub fn connect_silent(addr: SocketAddr, local: Option<Ipv4Addr>) -> Wire {
        let s = connect_from(addr, local).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        let _ = s.set_nodelay(true);
        Wire {
            stream: Some(Stream::Plain(s)),
            received: Vec::new(),
            consumed: 0,
            eof: false,
            write_failed: false,
        }
    }

    fn set_timeout(&self, d: Duration) {
        if let Some(s) = &self.stream {
            let _ = s
                .tcp()
                .set_read_timeout(Some(d.max(Duration::from_millis(1))));
        }
    }

    /// Reads what is available within `wait`; returns false at EOF.
    fn pump(&mut self, wait: Duration) -> bool {
        if self.eof {
            return false;
        }
        self.set_timeout(wait);
        let mut buf = [0u8; 16 * 1024];
        let Some(s) = self.stream.as_mut() else {
            return false;
        };
        match s.read(&mut buf) {
            Ok(0) => {
                self.eof = true;
                false
            }
            Ok(n) => {
                self.received.extend_from_slice(&buf[..n]);
                true
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                true
            }
            Err(_) => {
                self.eof = true;
                false
            }
        }
    }

    /// Sends bytes verbatim (in chunks, draining replies in between). Write errors are
    /// remembered, not fatal: a server may legitimately close mid-script.
    pub fn send(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(CHUNK) {
            if self.write_failed || self.eof {
                self.write_failed = true;
                return;
            }
            let Some(s) = self.stream.as_mut() else {
                return;
            };
            if s.write_all(chunk).is_err() {
                self.write_failed = true;
                return;
            }
            if bytes.len() > CHUNK {
                self.pump(Duration::from_millis(2));
            }
        }
    }

    /// The next complete reply in what was received, reading more for up to `wait`.
    pub fn read_reply(&mut self, wait: Duration) -> Option<Reply> {
        let start = Instant::now();
        loop {
            if let Some((reply, used)) = parse_one(&self.received[self.consumed..]) {
                self.consumed += used;
                return Some(reply);
            }
            let left = wait.saturating_sub(start.elapsed());
            if left.is_zero() || !self.pump(left.min(Duration::from_millis(500))) {
                // One last parse after EOF.
                if let Some((reply, used)) = parse_one(&self.received[self.consumed..]) {
                    self.consumed += used;
                    return Some(reply);
                }
                return None;
            }
        }
    }

    /// Reads until EOF (guard `wait`); returns every reply not consumed yet.
    pub fn read_to_end(&mut self, wait: Duration) -> Vec<Reply> {
        let start = Instant::now();
        while !self.eof && start.elapsed() < wait {
            self.pump(Duration::from_millis(200));
        }
        self.rest()
    }

    /// Every complete reply not consumed yet.
    pub fn rest(&mut self) -> Vec<Reply> {
        let mut out = Vec::new();
        while let Some((reply, used)) = parse_one(&self.received[self.consumed..]) {
            self.consumed += used;
            out.push(reply);
        }
        out
    }

    /// Bytes received after the last parsed reply (a partial line, or junk).
    pub fn unparsed(&self) -> &[u8] {
        &self.received[self.consumed..]
    }

    /// TLS handshake on the plaintext stream (after the server's 220 was read).
    pub fn handshake(&mut self, tls: &ClientTls) -> Result<(), String> {
        let Some(Stream::Plain(mut tcp)) = self.stream.take() else {
            return Err("handshake on a stream that is not plaintext".into());
        };
        let _ = tcp.set_read_timeout(Some(Duration::from_secs(20)));
        let name = ServerName::try_from(tls.server_name.clone()).expect("server name");
        let mut conn =
            rustls::ClientConnection::new(Arc::new(tls.config()), name).expect("client conn");
        while conn.is_handshaking() {
            match conn.complete_io(&mut tcp) {
                // Not an error (see `Stream::read`).
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.eof = true;
                    return Err(format!("TLS handshake failed: {e}"));
                }
                Ok(_) => {}
            }
        }
        self.stream = Some(Stream::Tls(Box::new(rustls::StreamOwned::new(conn, tcp))));
        Ok(())
    }

    /// Sends raw bytes on the TCP socket under any TLS layer (e.g. junk after STARTTLS).
    pub fn send_tcp(&mut self, bytes: &[u8]) {
        if let Some(s) = self.stream.as_mut() {
            let mut tcp = s.tcp();
            if tcp.write_all(bytes).is_err() {
                self.write_failed = true;
            }
        }
    }
}

/// Parses one complete (possibly multi-line) reply at the start of `buf`.
fn parse_one(buf: &[u8]) -> Option<(Reply, usize)> {
    let mut lines = Vec::new();
    let mut pos = 0;
    loop {
        let nl = buf[pos..].iter().position(|b| *b == b'\n')?;
        let mut line = &buf[pos..pos + nl];
        pos += nl + 1;
        if line.last() == Some(&b'\r') {
            line = &line[..line.len() - 1];
        }
        let line = String::from_utf8_lossy(line).into_owned();
        let last = line.len() < 4 || line.as_bytes()[3] != b'-';
        lines.push(line);
        if last {
            return Reply::parse(&lines)
                .or_else(|| {
                    Some(Reply {
                        code: 0,
                        lines: lines.clone(),
                    })
                })
                .map(|r| (r, pos));
        }
    }
}
