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
//!
//! The second ledger (issue 11) is per recipient: transactions of 3–5 recipients mixing two
//! routes (the upstream sink for example.org, an Outbound smart-host sink for partner.test,
//! internal senders), a recipient of the other route getting `452 4.5.3` and going into a
//! later transaction, while the test kills the next hop of a transaction between two of its
//! accepted RCPTs (the held connection dies; the next RCPT must replay or fail, never drop the
//! first) and in the middle of DATA. Checked: 0 acknowledged-but-missing recipients,
//! duplicates ≤ recipients in the lost-reply window, 0 recipients at the sink of another route.

use std::collections::{BTreeMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::wire::Wire;
use crate::support::{
    ClientTls, Fixture, Gateway, GatewaySpec, Net, Pki, Recorded, Sink, SinkOptions, connectors,
    inbound,
};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use serde_json::json;

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

fn reason(r: Option<crate::support::Reply>) -> String {
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
                crate::support::wait_for(Duration::from_secs(10), "a message mid-DATA", || {
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
                crate::support::wait_for(
                    Duration::from_secs(15),
                    "the rotated certificate",
                    || {
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
                    },
                );
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

// ---------------------------------------------------------------------------------------------
// Per-recipient ledger over mixed-route transactions (issue 11).

const MIXED_N: usize = 60;
const MIXED_SENDERS: usize = 4;
const ORG: &str = "example.org";
const PARTNER: &str = "partner.test";

/// The faults, in order: a kill between two accepted RCPTs or in the middle of DATA, of the
/// upstream (0) or the partner (1) next hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    BetweenRcpts(usize),
    MidData(usize),
}

const FAULTS: [Fault; 6] = [
    Fault::BetweenRcpts(0),
    Fault::MidData(1),
    Fault::BetweenRcpts(1),
    Fault::MidData(0),
    Fault::BetweenRcpts(0),
    Fault::BetweenRcpts(1),
];

fn fault_code(f: Fault) -> u8 {
    match f {
        Fault::BetweenRcpts(r) => 1 + r as u8,
        Fault::MidData(r) => 3 + r as u8,
    }
}

fn route_of(rcpt: &str) -> usize {
    usize::from(!rcpt.ends_with(&format!("@{ORG}")))
}

#[derive(Default)]
struct Mixed {
    /// Message id -> recipients not acknowledged yet.
    pending: Mutex<BTreeMap<usize, Vec<String>>>,
    queue: Mutex<VecDeque<usize>>,
    /// (id, recipient) -> attempts it took.
    acked: Mutex<BTreeMap<(usize, String), usize>>,
    attempts: Mutex<BTreeMap<(usize, String), usize>>,
    /// Recipients whose transaction got no 250 after the final dot was sent.
    uncertain: AtomicUsize,
    reasons: Mutex<BTreeMap<String, usize>>,
    /// The fault the slow sender should set up next (`fault_code`), 0: none.
    want: AtomicU8,
    /// The slow sender is paused at that fault.
    paused: AtomicU8,
    /// Every message id sent (the shared ones and the slow sender's).
    all: Mutex<Vec<usize>>,
    faults_done: AtomicBool,
}

/// Recipients the upstream refuses with 550 (never in the ledger): on the first attempt of
/// every fourth shared message one goes first, followed by a partner.test recipient, which
/// must then not travel over the upstream's connection.
fn nobody(id: usize) -> Option<String> {
    (id < MIXED_N && id % 4 == 3).then(|| format!("nobody.m{id}@{ORG}"))
}

fn upstream_options() -> SinkOptions {
    SinkOptions {
        reject_rcpt: (0..MIXED_N)
            .filter_map(nobody)
            .map(|a| (a, "550 5.1.1 no such user".to_string()))
            .collect(),
        ..SinkOptions::default()
    }
}

fn mixed_recipients(id: usize) -> Vec<String> {
    // 3–5 recipients: all but one of the route `id % 2`, the odd one at position `id % n`.
    let n = 3 + id % 3;
    let (major, minor) = if id.is_multiple_of(2) {
        (ORG, PARTNER)
    } else {
        (PARTNER, ORG)
    };
    (0..n)
        .map(|k| {
            let domain = if k == id % n { minor } else { major };
            format!("m{id}r{k}@{domain}")
        })
        .collect()
}

fn mixed_id(m: &Recorded) -> Option<usize> {
    let v = m.header_values("Message-ID");
    v.first()?
        .strip_prefix("<mixed-")?
        .strip_suffix("@ledger.test>")?
        .parse()
        .ok()
}

/// One transaction for message `id` to `rcpts` (in this order). Returns the recipients the
/// gateway accepted and whether the final dot got 250 (`Some(true)`), something else after the
/// dot was sent (`Some(false)`: uncertain), or failed before it (`None`), with a reason.
fn mixed_attempt(
    gw: SocketAddr,
    ip: Ipv4Addr,
    id: usize,
    rcpts: &[String],
    slow: Option<&Mixed>,
) -> (Vec<String>, Option<bool>, String) {
    let (mut w, g) = match Wire::try_connect(gw, Some(ip)) {
        Ok(x) => x,
        Err(e) => return (vec![], None, format!("connect: {}", e.kind())),
    };
    if g.as_ref().map(|g| g.code) != Some(220) {
        return (vec![], None, format!("greeting {}", reason(g)));
    }
    let pre = (|| {
        w.send(b"EHLO sender.example.org\r\n");
        expect(&mut w, 250)?;
        w.send(format!("MAIL FROM:<m{id}@{ORG}>\r\n").as_bytes());
        expect(&mut w, 250)
    })();
    if let Err(e) = pre {
        return (vec![], None, e);
    }
    let want = slow.map_or(0, |l| l.want.load(Ordering::SeqCst));
    let mut accepted: Vec<String> = Vec::new();
    let mut paused_between = false;
    let mut why = String::new();
    for (i, r) in rcpts.iter().enumerate() {
        w.send(format!("RCPT TO:<{r}>\r\n").as_bytes());
        match w.read_reply(Duration::from_secs(15)) {
            Some(rep) if rep.code == 250 => accepted.push(r.clone()),
            other => why = format!("rcpt: {}", reason(other)),
        }
        // The slow sender stops between its first accepted RCPT and two more of the same
        // route, so the test can kill that route's next hop under the held connection (the
        // RCPT after the kill finds it dead; the one after that could open a new one).
        if let Some(l) = slow
            && accepted.len() == 1
            && !paused_between
            && want == fault_code(Fault::BetweenRcpts(route_of(&accepted[0])))
            && rcpts
                .iter()
                .skip(i + 1)
                .take(2)
                .filter(|n| route_of(n) == route_of(&accepted[0]))
                .count()
                == 2
        {
            paused_between = true;
            l.paused.store(want, Ordering::SeqCst);
            std::thread::sleep(Duration::from_secs(1));
            l.paused.store(0, Ordering::SeqCst);
        }
    }
    if accepted.is_empty() {
        w.send(b"QUIT\r\n");
        return (accepted, None, why);
    }
    w.send(b"DATA\r\n");
    if let Err(e) = expect(&mut w, 354) {
        w.send(b"QUIT\r\n");
        return (accepted, None, format!("data: {e}"));
    }
    let head = format!(
        "Message-ID: <mixed-{id}@ledger.test>\r\nSubject: mixed {id}\r\nFrom: <m{id}@{ORG}>\r\n\r\n"
    );
    w.send(head.as_bytes());
    if let Some(l) = slow
        && want == fault_code(Fault::MidData(route_of(&accepted[0])))
    {
        l.paused.store(want, Ordering::SeqCst);
        std::thread::sleep(Duration::from_secs(1));
        l.paused.store(0, Ordering::SeqCst);
    }
    w.send(format!("body of message {id}\r\n").repeat(20).as_bytes());
    if w.write_failed || w.eof {
        return (accepted, None, "connection lost mid-DATA".into());
    }
    w.send(b".\r\n");
    let end = w.read_reply(Duration::from_secs(20));
    w.send(b"QUIT\r\n");
    match end {
        Some(r) if r.code == 250 => (accepted, Some(true), String::new()),
        other => (
            accepted,
            Some(false),
            format!("end of data: {}", reason(other)),
        ),
    }
}

/// Sends one attempt of message `id` (its pending recipients, `first_route`'s first when
/// given) and books the outcome.
fn mixed_send_one(
    gw: SocketAddr,
    ip: Ipv4Addr,
    id: usize,
    first_route: Option<usize>,
    slow: bool,
    ledger: &Mixed,
) {
    let Some(mut rcpts) = ledger.pending.lock().expect("lock").get(&id).cloned() else {
        return;
    };
    if let Some(r) = first_route {
        rcpts.sort_by_key(|a| route_of(a) != r);
    }
    let first_attempt = rcpts.first().is_some_and(|r| {
        !ledger
            .attempts
            .lock()
            .expect("lock")
            .contains_key(&(id, r.clone()))
    });
    for r in &rcpts {
        *ledger
            .attempts
            .lock()
            .expect("lock")
            .entry((id, r.clone()))
            .or_default() += 1;
    }
    if first_attempt && let Some(n) = nobody(id) {
        rcpts.insert(0, n);
    }
    let (accepted, end, why) = mixed_attempt(gw, ip, id, &rcpts, slow.then_some(ledger));
    match end {
        Some(true) => {
            let mut pending = ledger.pending.lock().expect("lock");
            let attempts = ledger.attempts.lock().expect("lock");
            let mut acked = ledger.acked.lock().expect("lock");
            for r in &accepted {
                acked.insert((id, r.clone()), attempts[&(id, r.clone())]);
            }
            if let Some(p) = pending.get_mut(&id) {
                p.retain(|r| !accepted.contains(r));
                if p.is_empty() {
                    pending.remove(&id);
                }
            }
        }
        Some(false) => {
            ledger.uncertain.fetch_add(accepted.len(), Ordering::SeqCst);
        }
        None => {}
    }
    if !why.is_empty() {
        *ledger.reasons.lock().expect("lock").entry(why).or_default() += 1;
    }
}

/// A regular sender: the shared messages until all of them are acknowledged.
fn mixed_sender(gw: SocketAddr, ip: Ipv4Addr, ledger: Arc<Mixed>) {
    let start = Instant::now();
    loop {
        let Some(id) = ledger.queue.lock().expect("lock").pop_front() else {
            return;
        };
        assert!(
            start.elapsed() < Duration::from_secs(150),
            "not every recipient acknowledged after 150 s"
        );
        mixed_send_one(gw, ip, id, None, false, &ledger);
        if ledger.pending.lock().expect("lock").contains_key(&id) {
            ledger.queue.lock().expect("lock").push_back(id);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The slow sender: for each wanted fault a new message of that route's majority (4 or 5
/// recipients), sent until acknowledged; pauses where the fault is wanted.
fn slow_mixed_sender(gw: SocketAddr, ip: Ipv4Addr, ledger: Arc<Mixed>) {
    let start = Instant::now();
    let mut own: VecDeque<usize> = VecDeque::new();
    let mut next = 1000;
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(150),
            "the slow sender's recipients not acknowledged after 150 s"
        );
        let want = ledger.want.load(Ordering::SeqCst);
        let route = match want {
            1 | 3 => Some(0),
            2 | 4 => Some(1),
            _ => None,
        };
        let id = match route {
            Some(r) => {
                // Even ids have example.org as majority, odd ones partner.test; id % 3 != 0
                // gives 4 or 5 recipients.
                while next % 2 != r || next % 3 == 0 {
                    next += 1;
                }
                let id = next;
                next += 1;
                ledger
                    .pending
                    .lock()
                    .expect("lock")
                    .insert(id, mixed_recipients(id));
                ledger.all.lock().expect("lock").push(id);
                id
            }
            None => match own.pop_front() {
                Some(id) => id,
                None if ledger.faults_done.load(Ordering::SeqCst) => return,
                None => {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            },
        };
        mixed_send_one(gw, ip, id, route, true, &ledger);
        if ledger.pending.lock().expect("lock").contains_key(&id) {
            own.push_back(id);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn no_acknowledged_recipient_is_lost_in_mixed_route_transactions() {
    let net = Net::new();
    let pki = Pki::generate();
    // sinks[0]: the upstream (example.org), sinks[1]: the partner's smart host.
    let mut sinks = [
        Some(Sink::start_with(net.sink_ip(), upstream_options())),
        Some(Sink::start(net.ip(3))),
    ];
    let addrs = [
        sinks[0].as_ref().expect("sink").addr,
        sinks[1].as_ref().expect("sink").addr,
    ];
    let gw = Gateway::start(
        net.gateway_ip(),
        &pki,
        GatewaySpec::new(
            addrs[0],
            json!({"inbound": [], "outbound": [{
                "name": "partners/ledger", "generation": 1, "domains": [PARTNER],
                "smartHosts": [format!("[{}]:{}", addrs[1].ip(), addrs[1].port())],
                "tls": "Opportunistic",
            }]}),
        )
        .fleet(json!({"internalSenders": {"ipRanges": [net.cidr()]}})),
    );
    let started = Instant::now();
    let ledger = Arc::new(Mixed::default());
    for id in 0..MIXED_N {
        ledger
            .pending
            .lock()
            .expect("lock")
            .insert(id, mixed_recipients(id));
        ledger.queue.lock().expect("lock").push_back(id);
        ledger.all.lock().expect("lock").push(id);
    }
    let gw_addr = gw.smtp;
    let mut threads = Vec::new();
    for n in 0..=MIXED_SENDERS {
        let ip = net.client(n as u8);
        let ledger = ledger.clone();
        threads.push(std::thread::spawn(move || {
            if n == MIXED_SENDERS {
                slow_mixed_sender(gw_addr, ip, ledger)
            } else {
                mixed_sender(gw_addr, ip, ledger)
            }
        }));
    }
    let mut recorded: Vec<(usize, Recorded)> = Vec::new();
    let mut kills = Vec::new();
    for fault in FAULTS {
        let code = fault_code(fault);
        ledger.want.store(code, Ordering::SeqCst);
        crate::support::wait_for(
            Duration::from_secs(60),
            &format!("the slow sender at {fault:?}"),
            || (ledger.paused.load(Ordering::SeqCst) == code).then_some(()),
        );
        ledger.want.store(0, Ordering::SeqCst);
        let route = match fault {
            Fault::BetweenRcpts(r) | Fault::MidData(r) => r,
        };
        // Kill the hop (every connection to it drops) and bring it back at once, while the
        // slow sender is still paused: the held connection is dead, the hop is up again.
        let old = sinks[route].take().expect("sink");
        recorded.extend(old.kill().into_iter().map(|m| (route, m)));
        let opts = if route == 0 {
            upstream_options()
        } else {
            SinkOptions::default()
        };
        sinks[route] = Some(Sink::start_at(addrs[route], opts));
        kills.push(fault);
        crate::support::wait_for(Duration::from_secs(10), "the slow sender to go on", || {
            (ledger.paused.load(Ordering::SeqCst) == 0).then_some(())
        });
    }
    ledger.faults_done.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().expect("sender thread");
    }
    for (route, s) in sinks.iter_mut().enumerate() {
        recorded.extend(
            s.take()
                .expect("sink")
                .kill()
                .into_iter()
                .map(|m| (route, m)),
        );
    }

    let acked = ledger.acked.lock().expect("lock").clone();
    let mut at_sink: BTreeMap<(usize, String), usize> = BTreeMap::new();
    let mut wrong_route = Vec::new();
    let mut unknown = 0;
    for (route, m) in &recorded {
        let Some(id) = mixed_id(m) else {
            unknown += 1;
            continue;
        };
        for r in &m.rcpt_to {
            if route_of(r) != *route {
                wrong_route.push(format!("{r} (message {id}) at the sink of route {route}"));
            }
            *at_sink.entry((id, r.clone())).or_default() += 1;
        }
    }
    let all = ledger.all.lock().expect("lock").clone();
    let total: usize = all.iter().map(|id| mixed_recipients(*id).len()).sum();
    let missing: Vec<&(usize, String)> =
        acked.keys().filter(|k| !at_sink.contains_key(k)).collect();
    let duplicates: usize = at_sink.values().map(|c| c - 1).sum();
    let uncertain = ledger.uncertain.load(Ordering::SeqCst);
    let attempts: usize = ledger.attempts.lock().expect("lock").values().sum();
    println!(
        "mixed ledger: {} messages, {total} recipients, {} acknowledged after {attempts} recipient attempts \
         ({uncertain} in the lost-reply window); sinks: {} messages recorded, {} recipient copies, \
         {} acknowledged-but-missing, {duplicates} duplicates, {} at a next hop of another route, {unknown} unknown; \
         faults: {kills:?}; total {:?}",
        all.len(),
        acked.len(),
        recorded.len(),
        at_sink.values().sum::<usize>(),
        missing.len(),
        wrong_route.len(),
        started.elapsed()
    );
    println!("retry reasons: {:?}", ledger.reasons.lock().expect("lock"));
    assert_eq!(kills.len(), FAULTS.len(), "every fault was injected");
    assert!(
        missing.is_empty(),
        "recipients acknowledged (250 to RCPT and to the final dot) but not at their next hop: {missing:?}"
    );
    assert!(
        wrong_route.is_empty(),
        "recipients at the next hop of another route: {wrong_route:?}"
    );
    assert_eq!(unknown, 0, "messages at a sink without a ledger ID");
    assert_eq!(
        acked.len(),
        total,
        "every recipient is eventually acknowledged"
    );
    assert!(
        duplicates <= uncertain,
        "{duplicates} duplicate recipients but only {uncertain} in the lost-reply window"
    );
}
