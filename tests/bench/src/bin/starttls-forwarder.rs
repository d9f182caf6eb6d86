//! starttls-forwarder: the limit row of `make bench` (issue 17), the speed of light for an
//! inline STARTTLS relay on this machine. It does the gateway's transport work and nothing
//! else: accept, greet, answer EHLO/HELO (offering STARTTLS) and STARTTLS, complete the TLS
//! handshake (configured like the gateway's: TLS 1.3 and 1.2, client certificate requested,
//! not required), connect to the next hop, swallow its greeting, then copy bytes both ways
//! until either side closes. No SMTP parsing after the handshake, no policy, no logging.
//!
//!     starttls-forwarder --listen 127.0.0.16:2716 --next-hop 127.0.0.11:2711 \
//!         --cert server.crt --key server.key
//!
//! Invariant: nothing the client sent before the handshake reaches the TLS session (the read
//! buffer is dropped at STARTTLS, as the gateway does for CVE-2011-0411).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

#[derive(Parser, Debug)]
#[command(
    name = "starttls-forwarder",
    about = "bare STARTTLS-then-copy forwarder (the bench's limit row)"
)]
struct Args {
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long)]
    next_hop: SocketAddr,
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    /// Worker threads (default: tokio's default, one per CPU, like the gateway)
    #[arg(long)]
    threads: Option<usize>,
}

const IDLE: Duration = Duration::from_secs(60);

/// The plaintext part: greeting, EHLO, STARTTLS. `Ok(false)` when the client quit first.
async fn plaintext(tcp: &mut TcpStream) -> Result<bool> {
    let mut lines = BufReader::new(&mut *tcp);
    lines
        .get_mut()
        .write_all(b"220 forwarder.bench.test ESMTP\r\n")
        .await?;
    let mut line = String::new();
    loop {
        line.clear();
        let n = tokio::time::timeout(IDLE, lines.read_line(&mut line)).await??;
        if n == 0 {
            return Ok(false);
        }
        let verb = line
            .get(..4)
            .map(|v| v.to_ascii_uppercase())
            .unwrap_or_default();
        let reply: &[u8] = match verb.as_str() {
            "EHLO" => b"250-forwarder.bench.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n",
            "HELO" => b"250 forwarder.bench.test\r\n",
            "STAR" => {
                // Whatever was pipelined behind STARTTLS is dropped with the reader.
                lines
                    .get_mut()
                    .write_all(b"220 2.0.0 Ready to start TLS\r\n")
                    .await?;
                return Ok(true);
            }
            "QUIT" => {
                lines.get_mut().write_all(b"221 2.0.0 Bye\r\n").await?;
                return Ok(false);
            }
            "NOOP" | "RSET" => b"250 2.0.0 OK\r\n",
            _ => b"530 5.7.0 Must issue a STARTTLS command first\r\n",
        };
        lines.get_mut().write_all(reply).await?;
    }
}

/// Connects to the next hop and reads its (possibly multi-line) greeting.
async fn next_hop(addr: SocketAddr) -> Result<TcpStream> {
    let mut tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let _ = tcp.set_nodelay(true);
    let mut reader = BufReader::new(&mut tcp);
    let mut line = String::new();
    loop {
        line.clear();
        if tokio::time::timeout(IDLE, reader.read_line(&mut line)).await?? == 0 {
            bail!("{addr} closed before its greeting");
        }
        if !line.starts_with("220") {
            bail!("{addr} greeted with {line:?}");
        }
        if line.as_bytes().get(3) != Some(&b'-') {
            break;
        }
    }
    // The next hop speaks only after the client's EHLO, so nothing is left in the reader.
    Ok(tcp)
}

async fn session(mut tcp: TcpStream, acceptor: TlsAcceptor, hop: SocketAddr) -> Result<()> {
    if !plaintext(&mut tcp).await? {
        return Ok(());
    }
    let mut tls = tokio::time::timeout(IDLE, acceptor.accept(tcp)).await??;
    let mut upstream = match next_hop(hop).await {
        Ok(u) => u,
        Err(e) => {
            let _ = tls.write_all(b"421 4.4.2 next hop unavailable\r\n").await;
            return Err(e);
        }
    };
    tokio::io::copy_bidirectional(&mut tls, &mut upstream).await?;
    Ok(())
}

async fn run(args: Args) -> Result<()> {
    let cfg = partnergate_bench::server_config(&args.cert, &args.key, true)?;
    let acceptor = TlsAcceptor::from(cfg);
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    eprintln!(
        "starttls-forwarder: listening on {}, next hop {}",
        args.listen, args.next_hop
    );
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                eprintln!("starttls-forwarder: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let hop = args.next_hop;
        tokio::spawn(async move {
            let _ = session(tcp, acceptor, hop).await;
        });
    }
}

fn main() {
    let args = Args::parse();
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.threads {
        b.worker_threads(n.max(1));
    }
    let rt = match b.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("starttls-forwarder: runtime: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = rt.block_on(run(args)) {
        eprintln!("starttls-forwarder: {e:#}");
        std::process::exit(1);
    }
}
