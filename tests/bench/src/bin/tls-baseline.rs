//! tls-baseline: the TLS limit for the session-rate row. Accepts TCP, completes a TLS handshake
//! with the given certificate (configured like the gateway's STARTTLS server: TLS 1.3 and 1.2,
//! client certificate requested but not required), sends close_notify and closes. Nothing else.
//!
//!     tls-baseline --listen 127.0.0.5:2600 --cert server.crt --key server.key

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

#[derive(Parser, Debug)]
#[command(
    name = "tls-baseline",
    about = "bare tokio-rustls handshake-and-close server"
)]
struct Args {
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    /// Do not send a CertificateRequest (the gateway does send one)
    #[arg(long)]
    no_client_cert_request: bool,
    /// Worker threads (default: tokio's default, one per CPU, like the gateway)
    #[arg(long)]
    threads: Option<usize>,
}

async fn run(args: Args) -> Result<()> {
    let cfg =
        partnergate_bench::server_config(&args.cert, &args.key, !args.no_client_cert_request)?;
    let acceptor = TlsAcceptor::from(cfg);
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    eprintln!("tls-baseline: listening on {}", args.listen);
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                eprintln!("tls-baseline: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            if let Ok(Ok(mut tls)) =
                tokio::time::timeout(Duration::from_secs(30), acceptor.accept(tcp)).await
            {
                let _ = tls.shutdown().await;
            }
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
            eprintln!("tls-baseline: runtime: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = rt.block_on(run(args)) {
        eprintln!("tls-baseline: {e:#}");
        std::process::exit(1);
    }
}
