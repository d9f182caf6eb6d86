//! The SMTP session state machine fed arbitrary byte streams: a real
//! `partnergate_gateway::session::Session` over an in-memory pipe, with a minimal in-process
//! upstream that accepts everything (so RCPT, DATA and the relay path run too). The input is
//! cut into writes at 0xFF bytes (so the fuzzer controls packet boundaries). Properties: no
//! panic, the session ends when the client closes, and everything it writes is well-formed
//! reply lines (`ddd` + space or hyphen + text + CRLF) with a 2xx-5xx code.
#![no_main]

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use partnergate_gateway::metrics::Metrics;
use partnergate_gateway::live_config::{ConfigPaths, LiveConfig, load};
use partnergate_gateway::session::{Session, SessionCtx};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

struct World {
    rt: tokio::runtime::Runtime,
    config: Arc<LiveConfig>,
    metrics: Arc<Metrics>,
    _dir: tempfile::TempDir,
}

/// A next hop that says yes to everything.
async fn upstream(sock: tokio::net::TcpStream) -> std::io::Result<()> {
    let (r, mut w) = sock.into_split();
    let mut r = BufReader::new(r);
    w.write_all(b"220 up ESMTP\r\n").await?;
    let mut line = Vec::new();
    loop {
        line.clear();
        if r.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let up = line.to_ascii_uppercase();
        if up.starts_with(b"EHLO") {
            w.write_all(b"250-up\r\n250-PIPELINING\r\n250-SIZE 100000000\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n").await?;
        } else if up.starts_with(b"DATA") {
            w.write_all(b"354 go\r\n").await?;
            let mut last = Vec::new();
            loop {
                last.clear();
                if r.read_until(b'\n', &mut last).await? == 0 {
                    return Ok(());
                }
                if last == b".\r\n" {
                    break;
                }
            }
            w.write_all(b"250 2.0.0 ok\r\n").await?;
        } else if up.starts_with(b"QUIT") {
            w.write_all(b"221 bye\r\n").await?;
            return Ok(());
        } else {
            w.write_all(b"250 2.0.0 ok\r\n").await?;
        }
    }
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind upstream");
        let port = listener.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("upstream runtime");
            rt.block_on(async move {
                loop {
                    if let Ok((s, _)) = listener.accept().await {
                        tokio::spawn(upstream(s));
                    }
                }
            });
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["gw.test".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        std::fs::write(d.join("c.pem"), cert.pem()).expect("write");
        std::fs::write(d.join("k.pem"), key.serialize_pem()).expect("write");
        let fleet = serde_json::json!({
            "hostname": "gw.test",
            "serverCertificate": {"certFile": "c.pem", "keyFile": "k.pem"},
            "acceptedDomains": ["example.org", "*.example.org"],
            "internalSenders": {"ipRanges": ["192.0.2.0/24"]},
            "limits": {"maxErrors": 20, "maxMessageSize": 20000, "maxRecipients": 5},
            "timeouts": {"commandSecs": 2, "dataSecs": 2, "tlsHandshakeSecs": 1, "nextHopSecs": 2},
            "upstream": {"host": "127.0.0.1", "port": port, "tls": "None"},
        });
        std::fs::write(d.join("fleet.json"), fleet.to_string()).expect("write");
        let connectors = serde_json::json!({
            "inbound": [
                {"name": "p/contoso", "domains": ["contoso.com"], "requireTls": false},
                {"name": "p/tls", "domains": ["tls.example"], "requireTls": true},
            ],
            "outbound": [
                {"name": "o/partner", "domains": ["partner.test"], "smartHosts": [format!("127.0.0.1:{port}")], "tls": "None"},
            ],
        });
        std::fs::write(d.join("connectors.json"), connectors.to_string()).expect("write");
        let config = load(&ConfigPaths {
            fleet: d.join("fleet.json"),
            connectors: d.join("connectors.json"),
        })
        .unwrap_or_else(|e| panic!("fuzz config: {e:?}"));
        World {
            rt,
            config: Arc::new(config),
            metrics: Arc::new(Metrics::new()),
            _dir: dir,
        }
    })
}

fuzz_target!(|input: &[u8]| {
    let w = world();
    // The first byte picks the client address: internal (may use the outbound route) or not.
    let Some((&sel, input)) = input.split_first() else {
        return;
    };
    let ip: IpAddr = if sel & 1 == 0 {
        "192.0.2.7".parse().expect("ip")
    } else {
        "198.51.100.7".parse().expect("ip")
    };
    let out = w.rt.block_on(async {
        let (_tx, deadline) = tokio::sync::watch::channel(false);
        let ctx = SessionCtx {
            config: w.config.clone(),
            metrics: w.metrics.clone(),
            deadline,
            client_ip: ip,
            admission: partnergate_gateway::admission::Ticket::detached(),
        };
        let (client, server) = tokio::io::duplex(64 * 1024);
        let session = tokio::spawn(Session::new(server, ctx).run());
        let (mut rd, mut wr) = tokio::io::split(client);
        let writer = async move {
            for chunk in input.split(|b| *b == 0xff) {
                if wr.write_all(chunk).await.is_err() {
                    break;
                }
                tokio::task::yield_now().await;
            }
            let _ = wr.shutdown().await;
            // Keep the write half alive until the session is done reading.
            wr
        };
        let reader = async move {
            let mut out = Vec::new();
            let _ = rd.read_to_end(&mut out).await;
            out
        };
        let (_, out) = tokio::join!(writer, reader);
        session.await.expect("session task panicked");
        out
    });
    // Everything the gateway wrote is reply lines (the first byte of a TLS alert after a
    // failed STARTTLS handshake is 0x15: stop there).
    let text = match out.iter().position(|b| *b == 0x15) {
        Some(i) => &out[..i],
        None => &out[..],
    };
    for line in text.split_inclusive(|b| *b == b'\n') {
        assert!(line.ends_with(b"\r\n"), "reply line without CRLF: {line:?}");
        assert!(line.len() >= 6, "short reply line: {line:?}");
        assert!(
            line[..3].iter().all(u8::is_ascii_digit),
            "no reply code: {line:?}"
        );
        assert!(
            (b'2'..=b'5').contains(&line[0]),
            "reply code out of range: {line:?}"
        );
        assert!(
            line[3] == b' ' || line[3] == b'-',
            "bad separator: {line:?}"
        );
        let body = &line[..line.len() - 2];
        assert!(!body.contains(&b'\r'), "CR inside a reply line: {line:?}");
    }
});
