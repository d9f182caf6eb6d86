//! Slow clients (issue 8, item 5): 2,000 connections that are idle or trickle one byte at a
//! time, spread over 50 source addresses (the per-IP limit is per real client). While they are
//! all connected a legitimate session completes (its duration is printed, not asserted), and
//! every idle session is cut at the configured command timeout with `421 4.4.2`.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use support::{Fixture, SinkOptions, SmtpConn, connectors, message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const IDLE: usize = 1000;
const TRICKLE: usize = 1000;
const SOURCES: usize = 50;
const COMMAND_SECS: u64 = 5;

async fn connect(addr: SocketAddr, local: Ipv4Addr) -> std::io::Result<tokio::net::TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(SocketAddr::from((local, 0)))?;
    tokio::time::timeout(Duration::from_secs(30), sock.connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timeout"))?
}

/// Reads until `needle` appears or EOF (guard 60 s); returns everything read.
async fn read_until(s: &mut tokio::net::TcpStream, needle: &[u8], buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 1024];
    loop {
        if buf.windows(needle.len()).any(|w| w == needle) {
            return true;
        }
        match tokio::time::timeout(Duration::from_secs(60), s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return false,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[derive(Default)]
struct Counts {
    greeted: AtomicUsize,
    refused: AtomicUsize,
    idle_cut_421_442: AtomicUsize,
    idle_other: AtomicUsize,
    trickle_replies: AtomicUsize,
}

/// Raises the soft RLIMIT_NOFILE to at least `want` (the gateway child inherits it); fails
/// the test if the hard limit does not allow it.
fn raise_nofile(want: libc::rlim_t) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut r), 0, "getrlimit");
        if r.rlim_cur < want && r.rlim_max >= want {
            r.rlim_cur = want;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &r), 0, "setrlimit");
        }
    }
    assert!(
        r.rlim_cur >= want,
        "RLIMIT_NOFILE is {} (hard {}); this test needs {want} open files (ulimit -n)",
        r.rlim_cur,
        r.rlim_max
    );
}

#[test]
fn two_thousand_slow_clients_do_not_starve_a_real_session() {
    raise_nofile(8192);
    let f = Fixture::build(
        SinkOptions::default(),
        |_, s| {
            s.fleet(json!({
                "limits": {"maxConnections": 3000, "maxConnectionsPerIp": 50},
                "timeouts": {"commandSecs": COMMAND_SECS},
            }))
        },
        |_, _| connectors(vec![]),
    );
    let gw = f.gw.smtp;
    let sources: Vec<Ipv4Addr> = (0..SOURCES).map(|i| f.net.ip(100 + i as u8)).collect();
    let counts = Arc::new(Counts::default());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let started = Instant::now();
    let mut tasks = Vec::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(200));
    for i in 0..IDLE + TRICKLE {
        let local = sources[i % SOURCES];
        let (counts, stop, gate) = (counts.clone(), stop.clone(), gate.clone());
        tasks.push(rt.spawn(async move {
            let permit = gate.acquire_owned().await.expect("gate");
            let mut s = match connect(gw, local).await {
                Ok(s) => s,
                Err(e) => return Err(format!("connect from {local}: {e}")),
            };
            let mut buf = Vec::new();
            if !read_until(&mut s, b"\r\n", &mut buf).await || !buf.starts_with(b"220 ") {
                counts.refused.fetch_add(1, Ordering::SeqCst);
                return Err(format!("no greeting: {:?}", String::from_utf8_lossy(&buf)));
            }
            drop(permit);
            counts.greeted.fetch_add(1, Ordering::SeqCst);
            buf.clear();
            if i < IDLE {
                // Idle: say nothing; the gateway must cut us at the command timeout.
                let t = Instant::now();
                read_until(&mut s, b"\r\n", &mut buf).await;
                let mut rest = [0u8; 64];
                let eof = matches!(
                    tokio::time::timeout(Duration::from_secs(10), s.read(&mut rest)).await,
                    Ok(Ok(0)) | Ok(Err(_))
                );
                if buf.starts_with(b"421 4.4.2") && eof {
                    counts.idle_cut_421_442.fetch_add(1, Ordering::SeqCst);
                    Ok(t.elapsed())
                } else {
                    counts.idle_other.fetch_add(1, Ordering::SeqCst);
                    Err(format!(
                        "idle client got {:?} (eof {eof})",
                        String::from_utf8_lossy(&buf)
                    ))
                }
            } else {
                // Byte at a time: a NOOP every ~1.2 s, each byte 200 ms apart, until stopped.
                let script = b"NOOP\r\n";
                let mut n = 0usize;
                loop {
                    for b in script {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        if stop.load(Ordering::SeqCst) {
                            return Ok(Duration::ZERO);
                        }
                        if s.write_all(&[*b]).await.is_err() {
                            return Err(format!("trickle write failed after {n} NOOPs"));
                        }
                    }
                    buf.clear();
                    if !read_until(&mut s, b"\r\n", &mut buf).await || !buf.starts_with(b"250 ") {
                        return Err(format!(
                            "trickle NOOP got {:?}",
                            String::from_utf8_lossy(&buf)
                        ));
                    }
                    n += 1;
                    counts.trickle_replies.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    // Wait (guard 120 s) until every slow client holds a session.
    support::wait_for(
        Duration::from_secs(120),
        "2,000 slow clients greeted",
        || {
            let g = counts.greeted.load(Ordering::SeqCst) + counts.refused.load(Ordering::SeqCst);
            (g >= IDLE + TRICKLE).then_some(())
        },
    );
    println!(
        "{} slow clients connected in {:?} ({} refused)",
        counts.greeted.load(Ordering::SeqCst),
        started.elapsed(),
        counts.refused.load(Ordering::SeqCst)
    );
    assert_eq!(
        counts.refused.load(Ordering::SeqCst),
        0,
        "slow clients refused"
    );

    // A real session while they are all there (the idle ones are cut only after COMMAND_SECS).
    let t = Instant::now();
    let (mut c, g) = SmtpConn::connect(gw, Some(f.net.client(0)));
    assert_eq!(g.code, 220, "{g}");
    c.cmd("EHLO real.test");
    let tr = c.send_mail(
        "alice@contoso.com",
        &["bob@example.org"],
        &message(
            "alice@contoso.com",
            "bob@example.org",
            "among the slow",
            &[],
        ),
    );
    tr.assert_delivered("a real session among 2,000 slow clients");
    c.quit();
    let took = t.elapsed();
    println!("legitimate session completed in {took:?} with 2,000 slow clients connected");

    // Idle clients: every one gets 421 4.4.2 and is closed.
    support::wait_for(Duration::from_secs(90), "idle clients cut", || {
        let done = counts.idle_cut_421_442.load(Ordering::SeqCst)
            + counts.idle_other.load(Ordering::SeqCst);
        (done >= IDLE).then_some(())
    });
    stop.store(true, Ordering::SeqCst);
    let results: Vec<Result<Duration, String>> = rt.block_on(async {
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap_or_else(|e| Err(format!("task: {e}"))));
        }
        out
    });
    let idle_times: Vec<Duration> = results[..IDLE]
        .iter()
        .filter_map(|r| r.as_ref().ok().copied())
        .collect();
    let slowest = idle_times.iter().max().copied().unwrap_or_default();
    println!(
        "idle clients cut with 421 4.4.2: {} of {IDLE} (slowest after {slowest:?}; commandSecs {COMMAND_SECS}); trickle NOOPs answered: {}",
        counts.idle_cut_421_442.load(Ordering::SeqCst),
        counts.trickle_replies.load(Ordering::SeqCst)
    );
    let errors: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        errors.is_empty(),
        "{} slow clients misbehaved, e.g. {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert_eq!(counts.idle_cut_421_442.load(Ordering::SeqCst), IDLE);
    assert!(
        idle_times
            .iter()
            .all(|d| *d >= Duration::from_secs(COMMAND_SECS - 1)),
        "an idle session was cut before the command timeout"
    );
    assert!(counts.trickle_replies.load(Ordering::SeqCst) >= TRICKLE);
}
