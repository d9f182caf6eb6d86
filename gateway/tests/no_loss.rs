//! No-loss ledger (issue 8, item 3). Senders push N messages with unique IDs through the gateway
//! (plaintext and STARTTLS, one of them pausing for a second in the middle of DATA) and retry
//! anything that did not get `250` to the final dot, while the test:
//!
//! - kills the recording sink (the upstream) while a message is mid-DATA, and restarts it,
//!   twice;
//! - stops the gateway with SIGTERM and restarts it, twice;
//! - rewrites the connectors file 100 times, each one confirmed live in `/status` (100 reloads);
//! - rotates the server certificate three times (to certificates of a second CA and back).
//!
//! Then the sender's ledger is compared with everything every sink incarnation recorded:
//! every 250'd message is at the sink, every message eventually arrives, and duplicates are
//! counted (they can only come from the lost-reply window: the sink had the message but the
//! sender never saw the 250, so duplicates ≤ such uncertain attempts).

mod support;

use std::collections::{BTreeMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use serde_json::json;
use support::wire::Wire;
use support::{ClientTls, Fixture, Recorded, Sink, SinkOptions, connectors, inbound};

const N: usize = 200;
const SENDERS: usize = 6;
/// Connector rewrites during the run, each waited for until live.
const RELOADS: u64 = 100;

enum Outcome {
    Acked,
    /// Failed before the final dot was sent: the sink cannot have the message.
    Failed(String),
    /// The final dot was sent but no 250 came back: the sink may have it.
    Uncertain(String),
}

#[derive(Default)]
struct Ledger {
    queue: Mutex<VecDeque<usize>>,
    /// id -> attempts it took, for acknowledged messages.
    acked: Mutex<BTreeMap<usize, usize>>,
    attempts: Mutex<BTreeMap<usize, usize>>,
    failed: AtomicUsize,
    uncertain: AtomicUsize,
    reasons: Mutex<BTreeMap<String, usize>>,
    /// The slow sender is between the two halves of a message body.
    mid_data: AtomicBool,
    mid_data_failures: AtomicUsize,
}

fn id_of(m: &Recorded) -> Option<usize> {
    let v = m.header_values("Message-ID");
    let s = v.first()?;
    s.strip_prefix("<ledger-")?
        .strip_suffix("@ledger.test>")?
        .parse()
        .ok()
}

fn reason(r: Option<support::Reply>) -> String {
    match r {
        Some(r) => format!(
            "{} {}",
            r.code,
            r.lines.first().map_or("", |l| &l[..l.len().min(9)])
        ),
        None => "no reply".into(),
    }
}

fn expect(w: &mut Wire, code: u16) -> Result<(), String> {
    let r = w.read_reply(Duration::from_secs(15));
    if r.as_ref().map(|r| r.code) == Some(code) {
        Ok(())
    } else {
        Err(reason(r))
    }
}

fn attempt(
    gw: SocketAddr,
    ip: Ipv4Addr,
    tls: Option<&ClientTls>,
    id: usize,
    slow: bool,
    ledger: &Ledger,
) -> Outcome {
    let (mut w, g) = match Wire::try_connect(gw, Some(ip)) {
        Ok(x) => x,
        Err(e) => return Outcome::Failed(format!("connect: {}", e.kind())),
    };
    if g.as_ref().map(|g| g.code) != Some(220) {
        return Outcome::Failed(format!("greeting {}", reason(g)));
    }
    let pre = (|| {
        w.send(b"EHLO ledger.test\r\n");
        expect(&mut w, 250)?;
        if let Some(tls) = tls {
            w.send(b"STARTTLS\r\n");
            expect(&mut w, 220)?;
            w.handshake(tls)?;
            w.send(b"EHLO ledger.test\r\n");
            expect(&mut w, 250)?;
        }
        w.send(b"MAIL FROM:<alice@contoso.com>\r\n");
        expect(&mut w, 250)?;
        w.send(b"RCPT TO:<bob@example.org>\r\n");
        expect(&mut w, 250)?;
        w.send(b"DATA\r\n");
        expect(&mut w, 354)
    })();
    if let Err(e) = pre {
        return Outcome::Failed(e);
    }
    let head = format!(
        "Message-ID: <ledger-{id:03}@ledger.test>\r\nSubject: ledger {id}\r\nFrom: <alice@contoso.com>\r\n\r\n"
    );
    w.send(head.as_bytes());
    if slow {
        ledger.mid_data.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_secs(1));
        ledger.mid_data.store(false, Ordering::SeqCst);
    } else {
        std::thread::sleep(Duration::from_millis(10));
    }
    w.send(format!("body of message {id}\r\n").repeat(20).as_bytes());
    if w.write_failed || w.eof {
        return Outcome::Failed("connection lost mid-DATA".into());
    }
    w.send(b".\r\n");
    let end = w.read_reply(Duration::from_secs(20));
    w.send(b"QUIT\r\n");
    match end {
        Some(r) if r.code == 250 => Outcome::Acked,
        other => Outcome::Uncertain(format!("end of data: {}", reason(other))),
    }
}

fn sender(
    n: usize,
    gw: SocketAddr,
    ip: Ipv4Addr,
    tls: Option<ClientTls>,
    slow: bool,
    ledger: Arc<Ledger>,
) {
    let start = Instant::now();
    while ledger.acked.lock().expect("lock").len() < N {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "sender {n}: not every message acknowledged after 120 s"
        );
        let Some(id) = ledger.queue.lock().expect("lock").pop_front() else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        *ledger.attempts.lock().expect("lock").entry(id).or_default() += 1;
        match attempt(gw, ip, tls.as_ref(), id, slow, &ledger) {
            Outcome::Acked => {
                let a = ledger.attempts.lock().expect("lock")[&id];
                ledger.acked.lock().expect("lock").insert(id, a);
                // Pace the senders so the messages spread over the fault window.
                std::thread::sleep(Duration::from_millis(1100));
            }
            Outcome::Failed(r) => retry(&ledger, id, r, false, slow),
            Outcome::Uncertain(r) => retry(&ledger, id, r, true, slow),
        }
    }
}

/// Counts a failed attempt and queues the message again.
fn retry(ledger: &Ledger, id: usize, r: String, uncertain: bool, slow: bool) {
    if uncertain {
        ledger.uncertain.fetch_add(1, Ordering::SeqCst);
    } else {
        ledger.failed.fetch_add(1, Ordering::SeqCst);
    }
    if slow && (r.contains("mid-DATA") || uncertain) {
        ledger.mid_data_failures.fetch_add(1, Ordering::SeqCst);
    }
    *ledger.reasons.lock().expect("lock").entry(r).or_default() += 1;
    ledger.queue.lock().expect("lock").push_back(id);
    // Back off like an MTA queue would (briefly: this is a test).
    std::thread::sleep(Duration::from_millis(300));
}

/// A second CA and two server certificates from it for `gateway.test`.
fn rotation_pairs() -> (String, Vec<(String, String)>) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "partnergate rotation CA");
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("key")).expect("CA");
    let pairs = (0..2)
        .map(|i| {
            let key = KeyPair::generate().expect("key");
            let mut p = CertificateParams::new(vec!["gateway.test".to_string()]).expect("params");
            p.distinguished_name
                .push(DnType::CommonName, format!("gateway.test rotated {i}"));
            let cert = p.signed_by(&key, &ca).expect("sign");
            (cert.pem(), key.serialize_pem())
        })
        .collect();
    (ca.pem(), pairs)
}

fn write_pair(cert: &Path, key: &Path, pair: &(String, String)) {
    // Key first, then certificate: between the two writes the pair does not match and the
    // reload must fail and keep the last good config.
    std::fs::write(key, &pair.1).expect("write key");
    std::fs::write(cert, &pair.0).expect("write cert");
}

#[test]
fn no_acknowledged_message_is_lost_under_faults() {
    let mut f = Fixture::build(
        SinkOptions::default(),
        |_, s| s.fleet(json!({"limits": {"maxConnectionsPerIp": 50}})),
        |_, _| connectors(vec![]),
    );
    let started = Instant::now();
    let (rot_ca, rot_pairs) = rotation_pairs();
    let bundle = f.pki.dir().join("ledger-bundle.crt");
    std::fs::write(&bundle, format!("{}{}", f.pki.ca_pem, rot_ca)).expect("bundle");
    let original = (f.pki.server.cert_pem.clone(), f.pki.server.key_pem.clone());

    let ledger = Arc::new(Ledger::default());
    ledger.queue.lock().expect("lock").extend(0..N);
    let gw = f.gw.smtp;
    let mut threads = Vec::new();
    for n in 0..=SENDERS {
        let ip = f.net.client(n as u8);
        let tls = (n % 2 == 1).then(|| ClientTls::new(&bundle));
        let slow = n == SENDERS;
        let ledger = ledger.clone();
        threads.push(std::thread::spawn(move || {
            sender(n, gw, ip, tls, slow, ledger)
        }));
    }

    let sink_addr = f.sink.addr;
    let mut recorded: Vec<Recorded> = Vec::new();
    let mut sink_kills = 0;
    let mut reloads = 0;
    let mut rotations = 0;
    let mut restarts = Vec::new();
    for step in 1..=RELOADS {
        std::thread::sleep(Duration::from_millis(250));
        let c = connectors(vec![inbound(
            "ledger/unrelated",
            &[&format!("unrelated-{step}.test")],
            json!({"generation": step, "requireTls": false}),
        )]);
        f.gw.rewrite_connectors(&c);
        // Every rewrite is a reload the gateway really made, not one folded into the next.
        f.gw.wait_config_hash(&f.gw.expected_hash());
        reloads += 1;
        match step {
            15 | 60 => {
                // Kill the upstream while the slow sender is in the middle of DATA.
                support::wait_for(Duration::from_secs(10), "a message mid-DATA", || {
                    ledger.mid_data.load(Ordering::SeqCst).then_some(())
                });
                let placeholder = Sink::start(f.net.ip(250));
                let old = std::mem::replace(&mut f.sink, placeholder);
                recorded.extend(old.kill());
                sink_kills += 1;
                std::thread::sleep(Duration::from_millis(1100));
                let placeholder = std::mem::replace(
                    &mut f.sink,
                    Sink::start_at(sink_addr, SinkOptions::default()),
                );
                drop(placeholder.kill());
            }
            30 | 70 | 95 => {
                let pair = match step {
                    30 => &rot_pairs[0],
                    70 => &rot_pairs[1],
                    _ => &original,
                };
                write_pair(&f.pki.server.cert, &f.pki.server.key, pair);
                rotations += 1;
                // The new certificate is live before the next fault.
                let want = match step {
                    30 => Some("rotated 0"),
                    70 => Some("rotated 1"),
                    _ => None,
                };
                support::wait_for(Duration::from_secs(15), "the rotated certificate", || {
                    let st = f.gw.status();
                    let subject = st["certificates"]
                        .as_array()?
                        .iter()
                        .find(|c| c["file"] == "server")?["subject"]
                        .as_str()?
                        .to_string();
                    match want {
                        Some(w) => subject.contains(w),
                        None => !subject.contains("rotated"),
                    }
                    .then_some(())
                });
            }
            45 | 85 => {
                let status = f.gw.restart();
                restarts.push(status);
            }
            _ => {}
        }
    }
    let faults_done = started.elapsed();
    let acked_during_faults = ledger.acked.lock().expect("lock").len();
    for t in threads {
        t.join().expect("sender thread");
    }
    // The last config is live (the reloads went through the restarts).
    let hash = f.gw.expected_hash();
    f.gw.wait_config_hash(&hash);
    recorded.extend(f.sink.messages());

    let acked = ledger.acked.lock().expect("lock").clone();
    let mut at_sink: BTreeMap<usize, usize> = BTreeMap::new();
    let mut unknown = 0;
    for m in &recorded {
        match id_of(m) {
            Some(id) => *at_sink.entry(id).or_default() += 1,
            None => unknown += 1,
        }
    }
    let duplicates: usize = at_sink.values().map(|c| c - 1).sum();
    let attempts: usize = ledger.attempts.lock().expect("lock").values().sum();
    let uncertain = ledger.uncertain.load(Ordering::SeqCst);
    println!(
        "ledger: {N} messages, {} acknowledged, {attempts} attempts ({} failed before the dot, {uncertain} uncertain after it); \
         sink: {} recorded over {} incarnations, {duplicates} duplicates, {unknown} unknown; \
         faults: {sink_kills} sink kills mid-DATA ({} slow-sender attempts cut), {} gateway restarts ({restarts:?}), \
         {reloads} connector rewrites, {rotations} certificate rotations; faults over {faults_done:?} \
         ({acked_during_faults} acknowledged by then), total {:?}",
        acked.len(),
        ledger.failed.load(Ordering::SeqCst),
        recorded.len(),
        sink_kills + 1,
        ledger.mid_data_failures.load(Ordering::SeqCst),
        restarts.len(),
        started.elapsed()
    );
    println!("retry reasons: {:?}", ledger.reasons.lock().expect("lock"));

    assert_eq!(acked.len(), N, "every message is eventually acknowledged");
    let lost: Vec<usize> = acked
        .keys()
        .filter(|id| !at_sink.contains_key(id))
        .copied()
        .collect();
    assert!(lost.is_empty(), "250'd but not at the sink: {lost:?}");
    assert_eq!(unknown, 0, "messages at the sink without a ledger ID");
    assert!(
        duplicates <= uncertain,
        "{duplicates} duplicates but only {uncertain} attempts in the lost-reply window"
    );
    for s in &restarts {
        assert!(s.success(), "the gateway exits 0 after SIGTERM: {s}");
    }
    assert!(
        ledger.mid_data_failures.load(Ordering::SeqCst) >= sink_kills,
        "each sink kill cut a message in the middle of DATA"
    );
}
