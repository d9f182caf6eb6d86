//! A recording SMTP sink playing the organisation's mail server (the gateway's upstream). It
//! runs on its own thread with its own tokio runtime, so tests can stay synchronous.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

use super::CertPair;

/// One message the sink accepted.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub mail_from: String,
    pub rcpt_to: Vec<String>,
    /// Message data as received, dot-unstuffed, CRLF line ends, without the final dot.
    pub data: Vec<u8>,
    pub tls: bool,
}

impl Recorded {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }

    /// The header section (up to the first empty line).
    pub fn headers(&self) -> String {
        let t = self.text();
        match t.find("\r\n\r\n") {
            Some(i) => t[..i + 2].to_string(),
            None => t,
        }
    }

    /// Values of every header named `name` (case-insensitive), unfolded.
    pub fn header_values(&self, name: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let mut current: Option<String> = None;
        for line in self.headers().split("\r\n") {
            if line.starts_with(' ') || line.starts_with('\t') {
                if let Some(c) = current.as_mut() {
                    c.push(' ');
                    c.push_str(line.trim());
                }
                continue;
            }
            if let Some(c) = current.take() {
                out.push(c);
            }
            if let Some((n, v)) = line.split_once(':')
                && n.eq_ignore_ascii_case(name)
            {
                current = Some(v.trim().to_string());
            }
        }
        if let Some(c) = current {
            out.push(c);
        }
        out
    }
}

/// How the sink behaves.
#[derive(Debug, Clone, Default)]
pub struct SinkOptions {
    /// Reply to every RCPT with this (e.g. `"550 5.1.1 no such user"`).
    pub rcpt_reply: Option<String>,
    /// Reply with `.1` to RCPT TO addresses equal to `.0`.
    pub reject_rcpt: Vec<(String, String)>,
    /// Reply to the final dot with this instead of 250 (the message is then not recorded).
    pub data_reply: Option<String>,
    /// Offer STARTTLS with this certificate.
    pub starttls: Option<CertPair>,
    /// Offer REQUIRETLS (RFC 8689) once TLS is up.
    pub requiretls: bool,
}

#[derive(Default)]
struct Shared {
    messages: Vec<Recorded>,
    connections: usize,
    transcripts: Vec<String>,
}

/// The running sink; stops when dropped.
pub struct Sink {
    pub addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sink {
    pub fn start(ip: Ipv4Addr) -> Sink {
        Sink::start_with(ip, SinkOptions::default())
    }

    pub fn start_with(ip: Ipv4Addr, opts: SinkOptions) -> Sink {
        Sink::start_at(SocketAddr::from((ip, 0)), opts)
    }

    /// A sink on this exact address (e.g. the address of a sink that was killed, to restart
    /// it where the gateway expects it).
    pub fn start_at(addr: SocketAddr, opts: SinkOptions) -> Sink {
        let std_listener = std::net::TcpListener::bind(addr).expect("bind sink");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("sink addr");
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let tls = opts.starttls.as_ref().map(|pair| {
            let certs = CertificateDer::pem_file_iter(&pair.cert)
                .expect("sink cert")
                .collect::<Result<Vec<_>, _>>()
                .expect("sink cert PEM");
            let key = PrivateKeyDer::from_pem_file(&pair.key).expect("sink key");
            let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("sink TLS config");
            tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
        });
        let ctx = Arc::new(Ctx {
            opts,
            tls,
            shared: shared.clone(),
        });
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("sink runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
                let accept = async {
                    loop {
                        let Ok((sock, _)) = listener.accept().await else {
                            continue;
                        };
                        let ctx = ctx.clone();
                        ctx.shared.lock().expect("lock").connections += 1;
                        tokio::spawn(async move {
                            let _ = serve(sock, ctx).await;
                        });
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stop_rx => {}
                }
            });
        });
        Sink {
            addr,
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    pub fn messages(&self) -> Vec<Recorded> {
        self.shared.lock().expect("lock").messages.clone()
    }

    /// The messages relayed for client `ip`: the gateway's Received: header names the client
    /// as `([ip])`, so tests that share a sink can tell their sessions apart.
    pub fn messages_from(&self, ip: impl std::fmt::Display) -> Vec<Recorded> {
        let tag = format!("([{ip}])");
        self.messages()
            .into_iter()
            .filter(|m| m.text().contains(&tag))
            .collect()
    }

    /// Stops the sink abruptly (every connection is dropped, also mid-DATA: a message whose
    /// final dot was not read is not recorded) and returns what it recorded.
    pub fn kill(mut self) -> Vec<Recorded> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.messages()
    }

    /// How many TCP connections the sink accepted.
    pub fn connections(&self) -> usize {
        self.shared.lock().expect("lock").connections
    }

    /// Each session's commands as the sink saw them (for failure messages).
    pub fn transcripts(&self) -> Vec<String> {
        self.shared.lock().expect("lock").transcripts.clone()
    }

    /// Waits until at least `n` messages are recorded (guard: 20 s) and returns them all.
    pub fn wait_messages(&self, n: usize) -> Vec<Recorded> {
        super::wait_for(
            Duration::from_secs(20),
            &format!("{n} message(s) at the sink"),
            || {
                let m = self.messages();
                (m.len() >= n).then_some(m)
            },
        )
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Ctx {
    opts: SinkOptions,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Mutex<Shared>>,
}

async fn serve(mut sock: tokio::net::TcpStream, ctx: Arc<Ctx>) -> std::io::Result<()> {
    sock.write_all(b"220 sink.test ESMTP partnergate test sink\r\n")
        .await?;
    let mut log = String::new();
    let upgrade = phase(&mut sock, false, &ctx, &mut log).await;
    if matches!(upgrade, Ok(true))
        && let Some(acceptor) = &ctx.tls
    {
        let mut tls = acceptor.accept(sock).await?;
        // The name the client asked for, for tests of the SNI a next hop gets.
        let sni = tls.get_ref().1.server_name().unwrap_or("-").to_string();
        log.push_str(&format!("<TLS, SNI {sni}>\n"));
        let _ = phase(&mut tls, true, &ctx, &mut log).await;
    }
    ctx.shared.lock().expect("lock").transcripts.push(log);
    Ok(())
}

/// One plaintext or TLS phase of a session. `Ok(true)` means STARTTLS was accepted.
async fn phase<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    tls: bool,
    ctx: &Ctx,
    log: &mut String,
) -> std::io::Result<bool> {
    let mut r = BufReader::new(stream);
    let mut from: Option<String> = None;
    let mut rcpts: Vec<String> = Vec::new();
    loop {
        let mut line = Vec::new();
        if r.read_until(b'\n', &mut line).await? == 0 {
            return Ok(false);
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        log.push_str(&text);
        log.push('\n');
        let upper = text.to_ascii_uppercase();
        let reply: String = if upper.starts_with("EHLO") || upper.starts_with("HELO") {
            from = None;
            rcpts.clear();
            let mut s = String::from(
                "250-sink.test\r\n250-PIPELINING\r\n250-SIZE 104857600\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n",
            );
            if ctx.tls.is_some() && !tls {
                s.push_str("250-STARTTLS\r\n");
            }
            if tls && ctx.opts.requiretls {
                s.push_str("250-REQUIRETLS\r\n");
            }
            s.push_str("250 ENHANCEDSTATUSCODES");
            s
        } else if upper.starts_with("STARTTLS") && ctx.tls.is_some() && !tls {
            r.get_mut()
                .write_all(b"220 2.0.0 Ready to start TLS\r\n")
                .await?;
            r.get_mut().flush().await?;
            return Ok(true);
        } else if upper.starts_with("MAIL FROM:") {
            from = Some(angle(&text[10..]));
            rcpts.clear();
            "250 2.1.0 Ok".into()
        } else if upper.starts_with("RCPT TO:") {
            let rcpt = angle(&text[8..]);
            if let Some((_, reply)) = ctx.opts.reject_rcpt.iter().find(|(a, _)| *a == rcpt) {
                reply.clone()
            } else if let Some(reply) = &ctx.opts.rcpt_reply {
                reply.clone()
            } else if from.is_none() {
                "503 5.5.1 need MAIL first".into()
            } else {
                rcpts.push(rcpt);
                "250 2.1.5 Ok".into()
            }
        } else if upper == "DATA" {
            if rcpts.is_empty() {
                "554 5.5.1 no valid recipients".into()
            } else {
                r.get_mut()
                    .write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    .await?;
                r.get_mut().flush().await?;
                let mut data = Vec::new();
                loop {
                    let mut l = Vec::new();
                    if r.read_until(b'\n', &mut l).await? == 0 {
                        return Ok(false);
                    }
                    if l == b".\r\n" {
                        break;
                    }
                    if l.starts_with(b"..") {
                        l.remove(0);
                    }
                    data.extend_from_slice(&l);
                }
                log.push_str(&format!("<{} octets of data>\n", data.len()));
                match &ctx.opts.data_reply {
                    Some(reply) => reply.clone(),
                    None => {
                        let mut sh = ctx.shared.lock().expect("lock");
                        sh.messages.push(Recorded {
                            mail_from: from.clone().unwrap_or_default(),
                            rcpt_to: rcpts.clone(),
                            data,
                            tls,
                        });
                        format!("250 2.0.0 Ok: queued as SINK{}", sh.messages.len())
                    }
                }
            }
        } else if upper == "RSET" {
            from = None;
            rcpts.clear();
            "250 2.0.0 Ok".into()
        } else if upper == "NOOP" {
            "250 2.0.0 Ok".into()
        } else if upper == "QUIT" {
            r.get_mut().write_all(b"221 2.0.0 Bye\r\n").await?;
            r.get_mut().flush().await?;
            return Ok(false);
        } else {
            "502 5.5.2 command not recognized".into()
        };
        r.get_mut().write_all(reply.as_bytes()).await?;
        r.get_mut().write_all(b"\r\n").await?;
        r.get_mut().flush().await?;
    }
}

/// `<a@b> SIZE=1` → `a@b`.
fn angle(s: &str) -> String {
    let s = s.trim();
    match (s.find('<'), s.find('>')) {
        (Some(a), Some(b)) if a < b => s[a + 1..b].to_string(),
        _ => s.split_whitespace().next().unwrap_or("").to_string(),
    }
}
