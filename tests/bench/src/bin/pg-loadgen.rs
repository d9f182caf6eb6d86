//! pg-loadgen: SMTP load generator for the partnergate benchmarks.
//!
//! Modes (see docs/benchmarks.md):
//! - messages (default): `--sessions N` concurrent sessions; each session sends
//!   `--messages M` messages and QUITs; the run ends after N×M messages, or with `--duration`
//!   when the time is up (sessions are reopened after M messages). `--rate R` switches to open
//!   loop: messages are scheduled R per second and handed to whichever session is free.
//! - `--sessions-only`: connect + EHLO + STARTTLS + QUIT (with `--implicit-tls`: connect + TLS
//!   handshake + wait for the server's close), measuring the session rate.
//! - `--idle N`: opens N sessions (with `--starttls`: TLS, EHLO again), prints a JSON line and
//!   holds them for `--hold` seconds.
//!
//! Output: one JSON line on stdout, one human line on stderr.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use partnergate_bench::{Summary, build_message, client_config, data_from_file, summarize};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Barrier, Mutex, Semaphore, mpsc};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

#[derive(Parser, Debug, Clone)]
#[command(name = "pg-loadgen", about = "SMTP/STARTTLS load generator")]
struct Args {
    /// SMTP server address (ip:port)
    #[arg(long)]
    server: SocketAddr,
    /// Local source address for outgoing connections
    #[arg(long)]
    bind: Option<IpAddr>,
    /// Use STARTTLS after the first EHLO
    #[arg(long)]
    starttls: bool,
    /// TLS immediately after connect, no SMTP (against tls-baseline; implies --sessions-only)
    #[arg(long)]
    implicit_tls: bool,
    /// TLS versions offered: 1.3, 1.2 or any
    #[arg(long, default_value = "1.3")]
    tls_version: String,
    /// Verify the server certificate against this CA bundle (default: no verification)
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Server name sent in SNI and verified with --ca (default: the server IP)
    #[arg(long)]
    server_name: Option<String>,
    /// Client certificate chain (PEM)
    #[arg(long, requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// Client private key (PEM)
    #[arg(long, requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// Concurrent sessions
    #[arg(long, default_value_t = 1)]
    sessions: usize,
    /// Messages per session (with --sessions-only: sessions per worker)
    #[arg(long, default_value_t = 1)]
    messages: u64,
    /// Run for this many seconds instead of a fixed count
    #[arg(long)]
    duration: Option<f64>,
    /// Message size in octets, headers included
    #[arg(long, default_value_t = 10240)]
    size: usize,
    /// Send this file's bytes as every message instead of a generated one (e.g. a message
    /// signed once with dkimpy's `dkimsign`; line ends become CRLF, lines are dot-stuffed;
    /// --size is then ignored)
    #[arg(long)]
    message_file: Option<PathBuf>,
    /// Recipients per message
    #[arg(long, default_value_t = 1)]
    rcpts: usize,
    /// Open loop: schedule this many messages per second
    #[arg(long)]
    rate: Option<f64>,
    /// Send MAIL, RCPT and DATA in one write (PIPELINING)
    #[arg(long)]
    pipelining: bool,
    /// Session rate mode: connect + EHLO + STARTTLS + QUIT
    #[arg(long)]
    sessions_only: bool,
    /// Open this many sessions and hold them
    #[arg(long)]
    idle: Option<usize>,
    /// Seconds to hold idle sessions
    #[arg(long, default_value_t = 600.0)]
    hold: f64,
    /// Concurrent connection attempts in --idle mode
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Envelope sender
    #[arg(long, default_value = "bench@partner.test")]
    from: String,
    /// Recipient domain (recipients are rcptN@DOMAIN)
    #[arg(long, default_value = "example.test")]
    rcpt_domain: String,
    /// EHLO name
    #[arg(long, default_value = "loadgen.test")]
    helo: String,
    /// Per-reply timeout, seconds
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    /// Label copied into the output
    #[arg(long, default_value = "")]
    label: String,
    /// Reload measurement: rename this file onto --swap-to at --swap-at seconds into the run
    #[arg(long, requires_all = ["swap_to", "admin", "expect_hash"])]
    swap_from: Option<PathBuf>,
    #[arg(long)]
    swap_to: Option<PathBuf>,
    /// Gateway admin address polled for /status after the swap
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// configHash expected in /status after the swap
    #[arg(long)]
    expect_hash: Option<String>,
    /// Seconds into the run at which the swap happens
    #[arg(long, default_value_t = 1.0)]
    swap_at: f64,
}

// ---------------------------------------------------------------------------------------------
// Connection

enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Gone,
}

impl Stream {
    async fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.write_all(b).await,
            Stream::Tls(s) => {
                s.write_all(b).await?;
                s.flush().await
            }
            Stream::Gone => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }

    async fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(b).await,
            Stream::Tls(s) => s.read(b).await,
            Stream::Gone => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }
}

#[derive(Debug)]
enum Failure {
    /// Unexpected reply code.
    Code(u16),
    Io(String),
    Timeout,
    Tls(String),
    Connect(String),
}

impl Failure {
    fn key(&self) -> String {
        match self {
            Failure::Code(c) => c.to_string(),
            Failure::Io(k) => format!("io:{k}"),
            Failure::Timeout => "timeout".into(),
            Failure::Tls(e) => format!("tls:{e}"),
            Failure::Connect(k) => format!("connect:{k}"),
        }
    }
}

fn io_fail(e: std::io::Error) -> Failure {
    if e.kind() == std::io::ErrorKind::InvalidData {
        Failure::Tls(e.to_string())
    } else {
        Failure::Io(format!("{:?}", e.kind()))
    }
}

struct Conn {
    s: Stream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    timeout: Duration,
}

impl Conn {
    fn new(s: Stream, timeout: Duration) -> Conn {
        Conn {
            s,
            buf: vec![0; 8192],
            start: 0,
            end: 0,
            timeout,
        }
    }

    async fn send(&mut self, b: &[u8]) -> Result<(), Failure> {
        match tokio::time::timeout(self.timeout, self.s.write_all(b)).await {
            Ok(r) => r.map_err(io_fail),
            Err(_) => Err(Failure::Timeout),
        }
    }

    /// Reads one (possibly multi-line) reply and returns its code.
    async fn reply(&mut self) -> Result<u16, Failure> {
        loop {
            while let Some(pos) = self.buf[self.start..self.end]
                .iter()
                .position(|&b| b == b'\n')
            {
                let line = &self.buf[self.start..self.start + pos + 1];
                self.start += pos + 1;
                if line.len() < 5 {
                    return Err(Failure::Io("short reply line".into()));
                }
                let code = std::str::from_utf8(&line[..3])
                    .ok()
                    .and_then(|c| c.parse::<u16>().ok())
                    .ok_or_else(|| Failure::Io("bad reply code".into()))?;
                if line[3] != b'-' {
                    return Ok(code);
                }
            }
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
            } else if self.end == self.buf.len() {
                if self.start == 0 {
                    return Err(Failure::Io("reply line too long".into()));
                }
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let n = match tokio::time::timeout(self.timeout, self.s.read(&mut self.buf[self.end..]))
                .await
            {
                Ok(r) => r.map_err(io_fail)?,
                Err(_) => return Err(Failure::Timeout),
            };
            if n == 0 {
                return Err(Failure::Io("UnexpectedEof".into()));
            }
            self.end += n;
        }
    }

    async fn expect(&mut self, class: u16) -> Result<(), Failure> {
        let code = self.reply().await?;
        if code / 100 == class {
            Ok(())
        } else {
            Err(Failure::Code(code))
        }
    }

    async fn command(&mut self, cmd: &[u8], class: u16) -> Result<(), Failure> {
        self.send(cmd).await?;
        self.expect(class).await
    }

    /// Reads until the peer closes (or the timeout passes).
    async fn drain_to_eof(&mut self) {
        let mut scratch = [0u8; 512];
        let deadline = Instant::now() + self.timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.s.read(&mut scratch)).await {
                Ok(Ok(n)) if n > 0 => continue,
                _ => return,
            }
        }
    }
}

struct Client {
    args: Args,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    message: Vec<u8>,
    /// "MAIL FROM:<..>\r\n"
    mail: Vec<u8>,
    /// one "RCPT TO:<..>\r\n" per recipient
    rcpts: Vec<Vec<u8>>,
    ehlo: Vec<u8>,
    timeout: Duration,
}

impl Client {
    async fn tcp(&self) -> Result<TcpStream, Failure> {
        let socket = if self.args.server.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| Failure::Connect(format!("{:?}", e.kind())))?;
        if let Some(ip) = self.args.bind {
            socket
                .bind(SocketAddr::new(ip, 0))
                .map_err(|e| Failure::Connect(format!("{:?}", e.kind())))?;
        }
        let s = match tokio::time::timeout(self.timeout, socket.connect(self.args.server)).await {
            Ok(r) => r.map_err(|e| Failure::Connect(format!("{:?}", e.kind())))?,
            Err(_) => return Err(Failure::Timeout),
        };
        let _ = s.set_nodelay(true);
        Ok(s)
    }

    async fn handshake(&self, tcp: TcpStream) -> Result<Stream, Failure> {
        let Some((connector, name)) = &self.tls else {
            return Err(Failure::Tls("no TLS configuration".into()));
        };
        match tokio::time::timeout(self.timeout, connector.connect(name.clone(), tcp)).await {
            Ok(Ok(s)) => Ok(Stream::Tls(Box::new(s))),
            Ok(Err(e)) => Err(Failure::Tls(e.to_string())),
            Err(_) => Err(Failure::Timeout),
        }
    }

    /// connect, greeting, EHLO, and with STARTTLS: STARTTLS, handshake, EHLO again.
    async fn open(&self) -> Result<Conn, Failure> {
        let tcp = self.tcp().await?;
        let mut c = Conn::new(Stream::Plain(tcp), self.timeout);
        c.expect(2).await?;
        c.command(&self.ehlo, 2).await?;
        if self.args.starttls {
            self.starttls(&mut c).await?;
            c.command(&self.ehlo, 2).await?;
        }
        Ok(c)
    }

    async fn starttls(&self, c: &mut Conn) -> Result<(), Failure> {
        c.command(b"STARTTLS\r\n", 2).await?;
        if c.start != c.end {
            return Err(Failure::Io("data after STARTTLS reply".into()));
        }
        let Stream::Plain(tcp) = std::mem::replace(&mut c.s, Stream::Gone) else {
            return Err(Failure::Io("STARTTLS twice".into()));
        };
        c.s = self.handshake(tcp).await?;
        Ok(())
    }

    /// One short session for the session-rate mode.
    async fn short_session(&self) -> Result<Duration, Failure> {
        let t0 = Instant::now();
        let tcp = self.tcp().await?;
        if self.args.implicit_tls {
            let s = self.handshake(tcp).await?;
            let setup = t0.elapsed();
            let mut c = Conn::new(s, self.timeout);
            c.drain_to_eof().await;
            return Ok(setup);
        }
        let mut c = Conn::new(Stream::Plain(tcp), self.timeout);
        c.expect(2).await?;
        c.command(&self.ehlo, 2).await?;
        if self.args.starttls {
            self.starttls(&mut c).await?;
        }
        let setup = t0.elapsed();
        c.command(b"QUIT\r\n", 2).await?;
        Ok(setup)
    }

    /// One transaction. Err only when the session is unusable afterwards.
    async fn transaction(&self, c: &mut Conn) -> Result<Result<(), u16>, Failure> {
        if self.args.pipelining {
            let mut batch = self.mail.clone();
            for r in &self.rcpts {
                batch.extend_from_slice(r);
            }
            batch.extend_from_slice(b"DATA\r\n");
            c.send(&batch).await?;
            let mut refused = None;
            let code = c.reply().await?;
            if code / 100 != 2 {
                refused = Some(code);
            }
            let mut any_rcpt = false;
            for _ in &self.rcpts {
                let code = c.reply().await?;
                if code / 100 == 2 {
                    any_rcpt = true;
                } else if refused.is_none() {
                    refused = Some(code);
                }
            }
            let code = c.reply().await?;
            if code != 354 {
                return Ok(Err(refused.unwrap_or(code)));
            }
            if !any_rcpt {
                return Ok(Err(refused.unwrap_or(code)));
            }
            c.send(&self.message).await?;
            let code = c.reply().await?;
            return Ok(if code / 100 == 2 {
                refused.map_or(Ok(()), Err)
            } else {
                Err(code)
            });
        }
        c.send(&self.mail).await?;
        let code = c.reply().await?;
        if code / 100 != 2 {
            return Ok(Err(code));
        }
        let mut refused = None;
        let mut accepted = 0;
        for r in &self.rcpts {
            c.send(r).await?;
            let code = c.reply().await?;
            if code / 100 == 2 {
                accepted += 1;
            } else if refused.is_none() {
                refused = Some(code);
            }
        }
        if accepted == 0 {
            c.command(b"RSET\r\n", 2).await?;
            return Ok(Err(refused.unwrap_or(0)));
        }
        c.send(b"DATA\r\n").await?;
        let code = c.reply().await?;
        if code != 354 {
            return Ok(Err(code));
        }
        c.send(&self.message).await?;
        let code = c.reply().await?;
        Ok(if code / 100 == 2 {
            refused.map_or(Ok(()), Err)
        } else {
            Err(code)
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Work distribution and statistics

enum Work {
    /// Closed loop, this many units per worker.
    PerWorker(u64),
    /// Closed loop until the deadline.
    Until(Instant),
    /// Open loop: scheduled start times.
    Scheduled(Mutex<mpsc::Receiver<Instant>>),
}

impl Work {
    /// Some(scheduled start) for the next unit, None when done.
    /// `taken` counts the units this worker has had so far.
    async fn next(&self, taken: &mut u64) -> Option<Option<Instant>> {
        *taken += 1;
        match self {
            Work::PerWorker(n) => (*taken <= *n).then_some(None),
            Work::Until(t) => (Instant::now() < *t).then_some(None),
            Work::Scheduled(rx) => rx.lock().await.recv().await.map(Some),
        }
    }
}

#[derive(Default)]
struct Stats {
    ok: u64,
    failed: u64,
    latency_us: Vec<u32>,
    sched_us: Vec<u32>,
    setup_us: Vec<u32>,
    sessions: u64,
    errors: BTreeMap<String, u64>,
}

impl Stats {
    fn error(&mut self, key: String) {
        *self.errors.entry(key).or_insert(0) += 1;
    }

    fn merge(&mut self, o: Stats) {
        self.ok += o.ok;
        self.failed += o.failed;
        self.latency_us.extend(o.latency_us);
        self.sched_us.extend(o.sched_us);
        self.setup_us.extend(o.setup_us);
        self.sessions += o.sessions;
        for (k, v) in o.errors {
            *self.errors.entry(k).or_insert(0) += v;
        }
    }
}

fn us(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

async fn message_worker(
    client: Arc<Client>,
    work: Arc<Work>,
    ready: Option<Arc<Barrier>>,
) -> Stats {
    let mut st = Stats::default();
    let mut conn: Option<Conn> = None;
    let mut on_session = 0u64;
    let mut taken = 0;
    // Open loop: sessions are opened before the schedule starts, so handshakes do not
    // compete with the first scheduled messages.
    if let Some(ready) = ready {
        let t0 = Instant::now();
        match client.open().await {
            Ok(c) => {
                st.setup_us.push(us(t0.elapsed()));
                st.sessions += 1;
                conn = Some(c);
            }
            Err(f) => st.error(f.key()),
        }
        ready.wait().await;
    }
    while let Some(sched) = work.next(&mut taken).await {
        if conn.is_none() {
            let t0 = Instant::now();
            match client.open().await {
                Ok(c) => {
                    st.setup_us.push(us(t0.elapsed()));
                    st.sessions += 1;
                    on_session = 0;
                    conn = Some(c);
                }
                Err(f) => {
                    st.failed += 1;
                    st.error(f.key());
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let t0 = Instant::now();
        match client.transaction(c).await {
            Ok(Ok(())) => {
                let done = Instant::now();
                st.ok += 1;
                st.latency_us.push(us(done - t0));
                if let Some(s) = sched {
                    st.sched_us.push(us(done.saturating_duration_since(s)));
                }
            }
            Ok(Err(code)) => {
                st.failed += 1;
                st.error(code.to_string());
            }
            Err(f) => {
                st.failed += 1;
                st.error(f.key());
                conn = None;
                continue;
            }
        }
        on_session += 1;
        if on_session >= client.args.messages
            && let Some(mut c) = conn.take()
        {
            let _ = c.command(b"QUIT\r\n", 2).await;
        }
    }
    if let Some(mut c) = conn.take() {
        let _ = c.command(b"QUIT\r\n", 2).await;
    }
    st
}

async fn session_worker(client: Arc<Client>, work: Arc<Work>) -> Stats {
    let mut st = Stats::default();
    let mut taken = 0;
    while work.next(&mut taken).await.is_some() {
        match client.short_session().await {
            Ok(setup) => {
                st.ok += 1;
                st.sessions += 1;
                st.setup_us.push(us(setup));
            }
            Err(f) => {
                st.failed += 1;
                st.error(f.key());
            }
        }
    }
    st
}

// ---------------------------------------------------------------------------------------------
// Reload measurement

async fn get_status(admin: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect(admin).await?;
    s.write_all(b"GET /status HTTP/1.0\r\nHost: gateway\r\n\r\n")
        .await?;
    let mut body = Vec::new();
    s.read_to_end(&mut body).await?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Renames `from` onto `to` at `at` and polls /status until it shows `hash`.
async fn swap_and_watch(
    from: PathBuf,
    to: PathBuf,
    admin: SocketAddr,
    hash: String,
    at: Instant,
) -> serde_json::Value {
    tokio::time::sleep_until(at.into()).await;
    let needle = format!("\"configHash\":\"{hash}\"");
    let t0 = Instant::now();
    if let Err(e) = std::fs::rename(&from, &to) {
        return serde_json::json!({"error": format!("rename: {e}")});
    }
    let limit = t0 + Duration::from_secs(30);
    let mut polls = 0u64;
    while Instant::now() < limit {
        polls += 1;
        if let Ok(body) = get_status(admin).await
            && body.contains(&needle)
        {
            let ms = t0.elapsed().as_secs_f64() * 1000.0;
            return serde_json::json!({"swap_to_status_ms": (ms * 100.0).round() / 100.0, "polls": polls});
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    serde_json::json!({"error": "new configHash not seen within 30 s"})
}

// ---------------------------------------------------------------------------------------------

fn human_ms(s: &Summary) -> String {
    format!(
        "p50 {:.3} ms, p99 {:.3} ms, p999 {:.3} ms",
        s.p50_ms, s.p99_ms, s.p999_ms
    )
}

fn errors_json(e: &BTreeMap<String, u64>) -> serde_json::Value {
    serde_json::Value::Object(e.iter().map(|(k, v)| (k.clone(), (*v).into())).collect())
}

async fn run_idle(client: Arc<Client>, n: usize) -> Result<()> {
    let sem = Arc::new(Semaphore::new(client.args.connect_concurrency.max(1)));
    let mut tasks = Vec::with_capacity(n);
    let t0 = Instant::now();
    for _ in 0..n {
        let client = client.clone();
        let sem = sem.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.ok();
            let t = Instant::now();
            client.open().await.map(|c| (c, t.elapsed()))
        }));
    }
    let mut held = Vec::with_capacity(n);
    let mut st = Stats::default();
    for t in tasks {
        match t.await {
            Ok(Ok((c, setup))) => {
                st.setup_us.push(us(setup));
                held.push(c);
            }
            Ok(Err(f)) => st.error(f.key()),
            Err(e) => st.error(format!("task:{e}")),
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let setup = summarize(&mut st.setup_us);
    let out = serde_json::json!({
        "label": client.args.label,
        "mode": "idle",
        "server": client.args.server.to_string(),
        "tls": client.args.starttls,
        "requested": n,
        "open": held.len(),
        "open_s": (elapsed * 1000.0).round() / 1000.0,
        "setup_ms": setup.to_json(),
        "errors": errors_json(&st.errors),
    });
    println!("{out}");
    eprintln!(
        "{}idle: {} of {} sessions open in {:.2} s (setup {}), errors {:?}; holding {} s",
        label_prefix(&client.args.label),
        held.len(),
        n,
        elapsed,
        human_ms(&setup),
        st.errors,
        client.args.hold
    );
    tokio::time::sleep(Duration::from_secs_f64(client.args.hold.max(0.0))).await;
    drop(held);
    Ok(())
}

fn label_prefix(l: &str) -> String {
    if l.is_empty() {
        String::new()
    } else {
        format!("[{l}] ")
    }
}

async fn run(args: Args) -> Result<()> {
    if args.sessions == 0 {
        bail!("--sessions must be at least 1");
    }
    if args.rcpts == 0 {
        bail!("--rcpts must be at least 1");
    }
    let needs_tls = args.starttls || args.implicit_tls;
    let tls = if needs_tls {
        let cfg = client_config(
            &args.tls_version,
            args.ca.as_deref(),
            args.client_cert.as_deref().zip(args.client_key.as_deref()),
        )?;
        let name = args
            .server_name
            .clone()
            .unwrap_or_else(|| args.server.ip().to_string());
        let name = ServerName::try_from(name).context("--server-name")?;
        Some((TlsConnector::from(cfg), name))
    } else {
        None
    };
    let timeout = Duration::from_secs_f64(args.timeout.max(0.001));
    let rcpts = (0..args.rcpts)
        .map(|i| format!("RCPT TO:<rcpt{i}@{}>\r\n", args.rcpt_domain).into_bytes())
        .collect();
    let message = match &args.message_file {
        Some(path) => data_from_file(
            &std::fs::read(path).with_context(|| format!("--message-file {}", path.display()))?,
        ),
        None => build_message(
            args.size,
            &args.from,
            &format!("rcpt0@{}", args.rcpt_domain),
        ),
    };
    let client = Arc::new(Client {
        message,
        mail: format!("MAIL FROM:<{}>\r\n", args.from).into_bytes(),
        rcpts,
        ehlo: format!("EHLO {}\r\n", args.helo).into_bytes(),
        tls,
        timeout,
        args: args.clone(),
    });

    if let Some(n) = args.idle {
        return run_idle(client, n).await;
    }
    let sessions_only = args.sessions_only || args.implicit_tls;
    let total = (args.sessions as u64).saturating_mul(args.messages);

    let mut start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let mut ready = None;
    let mut started = None;
    let work = match (args.rate, args.duration) {
        (Some(rate), dur) => {
            if rate <= 0.0 {
                bail!("--rate must be positive");
            }
            let (tx, rx) = mpsc::channel::<Instant>(1 << 16);
            let count = match dur {
                Some(d) => (d * rate).round() as u64,
                None => total,
            };
            let stop = stop.clone();
            let barrier = Arc::new(Barrier::new(args.sessions + 1));
            ready = Some(barrier.clone());
            let (started_tx, started_rx) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                barrier.wait().await;
                let start = Instant::now();
                let _ = started_tx.send(start);
                let period = 1.0 / rate;
                for i in 0..count {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let at = start + Duration::from_secs_f64(i as f64 * period);
                    tokio::time::sleep_until(at.into()).await;
                    if tx.send(at).await.is_err() {
                        break;
                    }
                }
            });
            started = Some(started_rx);
            Work::Scheduled(Mutex::new(rx))
        }
        (None, Some(d)) => Work::Until(start + Duration::from_secs_f64(d)),
        (None, None) => Work::PerWorker(args.messages),
    };
    let work = Arc::new(work);

    let reload = match (
        &args.swap_from,
        &args.swap_to,
        args.admin,
        &args.expect_hash,
    ) {
        (Some(f), Some(t), Some(a), Some(h)) => Some(tokio::spawn(swap_and_watch(
            f.clone(),
            t.clone(),
            a,
            h.clone(),
            start + Duration::from_secs_f64(args.swap_at),
        ))),
        _ => None,
    };

    let mut handles = Vec::with_capacity(args.sessions);
    for _ in 0..args.sessions {
        let (c, w) = (client.clone(), work.clone());
        handles.push(if sessions_only {
            tokio::spawn(session_worker(c, w))
        } else {
            tokio::spawn(message_worker(c, w, ready.clone()))
        });
    }
    if let Some(rx) = started
        && let Ok(t) = rx.await
    {
        start = t;
    }
    let mut st = Stats::default();
    for h in handles {
        match h.await {
            Ok(s) => st.merge(s),
            Err(e) => st.error(format!("task:{e}")),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    let reload = match reload {
        Some(h) => Some(
            h.await
                .unwrap_or_else(|e| serde_json::json!({"error": e.to_string()})),
        ),
        None => None,
    };

    let lat = summarize(&mut st.latency_us);
    let sched = summarize(&mut st.sched_us);
    let setup = summarize(&mut st.setup_us);
    let rate = st.ok as f64 / elapsed.max(1e-9);
    let tls_mode = if args.implicit_tls {
        "implicit"
    } else if args.starttls {
        "starttls"
    } else {
        "none"
    };
    let mut out = serde_json::json!({
        "label": args.label,
        "mode": if sessions_only { "sessions" } else { "messages" },
        "server": args.server.to_string(),
        "tls": tls_mode,
        "tls_version": if needs_tls { args.tls_version.as_str() } else { "none" },
        "sessions": args.sessions,
        "size": args.size,
        "rcpts": args.rcpts,
        "target_rate": args.rate,
        "elapsed_s": (elapsed * 1000.0).round() / 1000.0,
        "ok": st.ok,
        "failed": st.failed,
        "sessions_opened": st.sessions,
        "setup_ms": setup.to_json(),
        "errors": errors_json(&st.errors),
    });
    let rate_r = (rate * 10.0).round() / 10.0;
    if sessions_only {
        out["sessions_per_s"] = rate_r.into();
    } else {
        out["msg_per_s"] = rate_r.into();
        out["mib_per_s"] =
            ((rate * client.message.len() as f64 / 1048576.0 * 100.0).round() / 100.0).into();
        out["latency_ms"] = lat.to_json();
        if args.rate.is_some() {
            out["sched_latency_ms"] = sched.to_json();
        }
    }
    if let Some(r) = &reload {
        out["reload"] = r.clone();
    }
    println!("{out}");
    let errs = if st.errors.is_empty() {
        "no errors".to_string()
    } else {
        format!("errors {:?}", st.errors)
    };
    if sessions_only {
        eprintln!(
            "{}{:.1} sessions/s ({} ok in {:.2} s, {} concurrent, tls {}); setup {}; {}",
            label_prefix(&args.label),
            rate,
            st.ok,
            elapsed,
            args.sessions,
            tls_mode,
            human_ms(&setup),
            errs
        );
    } else {
        eprintln!(
            "{}{:.1} msg/s ({} ok in {:.2} s, {} sessions, {} B, {} rcpt, tls {}{}); message {}; setup {}; {}{}",
            label_prefix(&args.label),
            rate,
            st.ok,
            elapsed,
            args.sessions,
            client.message.len() - 3,
            args.rcpts,
            tls_mode,
            args.rate
                .map(|r| format!(", open loop {r} msg/s"))
                .unwrap_or_default(),
            human_ms(&lat),
            human_ms(&setup),
            errs,
            reload.map(|r| format!("; reload {r}")).unwrap_or_default()
        );
    }
    Ok(())
}

fn main() {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pg-loadgen: runtime: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = rt.block_on(run(args)) {
        eprintln!("pg-loadgen: {e:#}");
        std::process::exit(2);
    }
}
