//! Hot reload (ARCHITECTURE section 1, issue 2): a plain rewrite and a kubelet `..data` symlink
//! swap of the connectors file while a session is open. The open session finishes on the config
//! it started with, a new session sees the new one, nothing is dropped; a broken file keeps the
//! last good config and is reported in /status. Filesystem events alone (periodic check off)
//! trigger reloads, including a rewrite made the moment `/readyz` first answers 200 (readiness
//! means the files are being watched).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::support::gateway::connectors_bytes;
use crate::support::{
    Fixture, Python, SinkOptions, SmtpConn, connectors, inbound, message, sha256_hex, wait_for,
};
use serde_json::{Value, json};

const ALICE: &str = "alice@contoso.com";
const DANA: &str = "dana@fabrikam.example";
const BOB: &str = "bob@example.org";

fn contoso(generation: i64) -> Value {
    connectors(vec![inbound(
        "mail/contoso",
        &["contoso.com"],
        json!({"requireTls": false, "generation": generation}),
    )])
}

fn fabrikam(generation: i64) -> Value {
    connectors(vec![inbound(
        "mail/fabrikam",
        &["fabrikam.example"],
        json!({"requireTls": false, "generation": generation}),
    )])
}

fn reject_unclaimed(kubelet: bool) -> Fixture {
    reject_unclaimed_with(kubelet, false)
}

/// `events_only`: the periodic check runs once an hour, so a reload within the tests' guards
/// can only come from a filesystem event.
fn reject_unclaimed_with(kubelet: bool, events_only: bool) -> Fixture {
    Fixture::build(
        SinkOptions::default(),
        move |_, s| {
            let s = s.fleet(json!({"defaultInbound": "Reject"}));
            let s = if kubelet { s.kubelet() } else { s };
            if events_only {
                s.reload_by_events_only()
            } else {
                s
            }
        },
        |_, _| contoso(1),
    )
}

fn names_and_generations(status: &Value) -> Vec<(String, i64)> {
    status["connectors"]
        .as_array()
        .unwrap_or_else(|| panic!("/status has no connectors array: {status}"))
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap_or("").to_string(),
                c["generation"].as_i64().unwrap_or(-1),
            )
        })
        .collect()
}

/// The shared body of both reload tests: `swap` installs the fabrikam config.
fn open_session_survives_reload(f: &mut Fixture, swap: impl FnOnce(&mut crate::support::Gateway)) {
    let old_hash = f.gw.expected_hash();
    assert_eq!(
        f.gw.status()["configHash"].as_str(),
        Some(old_hash.as_str())
    );

    // Session A starts on the contoso config.
    let (mut a, _) = SmtpConn::connect(f.gw.smtp, Some(f.net.client(0)));
    a.cmd("EHLO a.client.test");

    swap(&mut f.gw);
    let new_hash = sha256_hex(&connectors_bytes(&fabrikam(2)));
    assert_eq!(f.gw.expected_hash(), new_hash);
    let status = f.gw.wait_config_hash(&new_hash);
    assert_eq!(
        names_and_generations(&status),
        [("mail/fabrikam".to_string(), 2)]
    );
    assert!(status["lastReloadError"].is_null(), "{status}");

    // Session A is still open and still on the old config.
    assert_eq!(a.cmd("NOOP").code, 250, "session A survived the reload");
    let t = a.send_mail(ALICE, &[BOB], &message(ALICE, BOB, "old session", &[]));
    t.assert_delivered("session A, contoso, old config");
    let r = a.cmd(&format!("MAIL FROM:<{DANA}>"));
    assert_eq!(
        r.code, 550,
        "session A still has the old config (no fabrikam): {r}"
    );
    a.cmd("RSET");
    a.quit();

    // A new session sees the new config.
    let t = Python::new(f.gw.smtp).send(ALICE, &[BOB], &message(ALICE, BOB, "new session", &[]));
    t.assert_refused("550 5.7.1", "new session, contoso no longer a partner");
    let t = Python::new(f.gw.smtp).send(DANA, &[BOB], &message(DANA, BOB, "fabrikam", &[]));
    t.assert_delivered("new session, fabrikam");

    let m = f.sink.wait_messages(2);
    assert_eq!(m.len(), 2);
    assert_eq!(m[0].mail_from, ALICE);
    assert_eq!(m[1].mail_from, DANA);
    assert!(crate::support::connector_header(&m[1]).contains("mail/fabrikam"));
}

#[test]
fn rewrite_mid_session_old_session_keeps_old_config() {
    let mut f = reject_unclaimed(false);
    open_session_survives_reload(&mut f, |gw| gw.rewrite_connectors(&fabrikam(2)));
}

#[test]
fn kubelet_symlink_swap_mid_session_old_session_keeps_old_config() {
    let mut f = reject_unclaimed(true);
    open_session_survives_reload(&mut f, |gw| gw.kubelet_swap_connectors(&fabrikam(2)));
    // A second swap (the watcher survives the removal of the old timestamped directory).
    f.gw.kubelet_swap_connectors(&contoso(3));
    let status = f.gw.wait_config_hash(&f.gw.expected_hash());
    assert_eq!(
        names_and_generations(&status),
        [("mail/contoso".to_string(), 3)]
    );
    let t = Python::new(f.gw.smtp).send(ALICE, &[BOB], &message(ALICE, BOB, "third", &[]));
    t.assert_delivered("contoso again after the second swap");
}

#[test]
fn filesystem_events_alone_trigger_reloads() {
    // A plain rewrite, as an editor or a config-management tool would do it.
    let mut plain = reject_unclaimed_with(false, true);
    plain.gw.rewrite_connectors(&fabrikam(2));
    let status = plain.gw.wait_config_hash(&plain.gw.expected_hash());
    assert_eq!(
        names_and_generations(&status),
        [("mail/fabrikam".to_string(), 2)]
    );
    // The kubelet's atomic `..data` swap, twice (the second after the watched directory's old
    // timestamped directory is gone).
    let mut kubelet = reject_unclaimed_with(true, true);
    for (generation, next) in [(2, fabrikam(2)), (3, contoso(3))] {
        kubelet.gw.kubelet_swap_connectors(&next);
        let status = kubelet.gw.wait_config_hash(&kubelet.gw.expected_hash());
        assert_eq!(status["connectors"][0]["generation"], generation);
    }
    let t = Python::new(kubelet.gw.smtp).send(ALICE, &[BOB], &message(ALICE, BOB, "events", &[]));
    t.assert_delivered("contoso after two event-driven swaps");
}

/// Busy-loop threads competing with the gateway for the CPU (stopped when dropped), so its
/// start-up tasks interleave in as many orders as the scheduler allows.
struct CpuLoad {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl CpuLoad {
    fn start(n: usize) -> CpuLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                })
            })
            .collect();
        CpuLoad { stop, threads }
    }
}

impl Drop for CpuLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The gateway binary on the fixture's files, periodic check off; killed when dropped.
struct Bare(Child);

impl Bare {
    fn spawn(gw: &crate::support::Gateway, log: &std::path::Path) -> Bare {
        let out = std::fs::File::create(log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = Command::new(crate::support::gateway::BIN)
            .arg("--fleet")
            .arg(&gw.fleet_path)
            .arg("--connectors")
            .arg(&gw.connectors_path)
            .env("PARTNERGATE_RELOAD_POLL_SECS", "3600")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn partnergate-gateway");
        Bare(child)
    }
}

impl Drop for Bare {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Issue 12 item 5: `/readyz` answered 200 before the watcher had registered its inotify
/// watches, so a rewrite made right then was never loaded (with the periodic check off). Each
/// round starts the binary, polls `/readyz` as fast as it can, rewrites the connectors file the
/// moment it answers 200 and requires the new config to go live, under CPU load.
#[test]
fn rewrite_right_after_readiness_is_always_loaded() {
    const ROUNDS: i64 = 30;
    let mut f = reject_unclaimed_with(false, true);
    // The fixture's own process only wrote the files and found the ports; the rounds run their own.
    f.gw.signal("TERM");
    wait_for(
        Duration::from_secs(60),
        "the fixture gateway to exit",
        || f.gw.exited(),
    );
    let _load = CpuLoad::start(3);
    for round in 0..ROUNDS {
        let log = f.gw.dir().join(format!("round-{round}.log"));
        let gw = Bare::spawn(&f.gw, &log);
        // Not `wait_for`: its 50 ms between polls would give the watcher time to catch up.
        let start = std::time::Instant::now();
        while !matches!(
            crate::support::gateway::http_get(f.gw.admin, "/readyz"),
            Ok((200, _))
        ) {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "round {round}: not ready after 30 s; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let generation = round + 2;
        let next = if round % 2 == 0 {
            fabrikam(generation)
        } else {
            contoso(generation)
        };
        f.gw.rewrite_connectors(&next);
        let hash = f.gw.expected_hash();
        let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            f.gw.wait_config_hash(&hash)
        }));
        let status = loaded.unwrap_or_else(|_| {
            panic!(
                "round {round}: a rewrite right after readiness was never loaded; gateway log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        assert_eq!(status["connectors"][0]["generation"], generation);
        drop(gw);
    }
}

#[test]
fn broken_connectors_file_keeps_last_good_config_and_reports_it() {
    let mut f = reject_unclaimed(false);
    let good_hash = f.gw.expected_hash();
    for broken in [
        "{\"inbound\": [ this is not json",
        // Valid JSON, invalid config: SenderIP without ranges.
        "{\"inbound\": [{\"name\": \"mail/x\", \"domains\": [\"x.example\"], \"identifyBy\": \"SenderIP\"}]}",
    ] {
        std::fs::write(&f.gw.connectors_path, broken).expect("write broken");
        let status = wait_for(
            Duration::from_secs(15),
            "lastReloadError in /status",
            || {
                let s = f.gw.status();
                (!s["lastReloadError"].is_null()).then_some(s)
            },
        );
        assert_eq!(
            status["configHash"].as_str(),
            Some(good_hash.as_str()),
            "the last good config stays live: {status}"
        );
        let t = Python::new(f.gw.smtp).send(ALICE, &[BOB], &message(ALICE, BOB, "still", &[]));
        t.assert_delivered("old config still in force");
        // Fix it again so the next broken write is a change.
        f.gw.rewrite_connectors(&contoso(1));
        f.gw.wait_config_hash(&good_hash);
        wait_for(Duration::from_secs(15), "lastReloadError cleared", || {
            f.gw.status()["lastReloadError"].is_null().then_some(())
        });
    }
    assert!(f.gw.exited().is_none(), "the gateway keeps running");
}

#[test]
fn missing_pem_material_keeps_last_good_config_until_it_appears() {
    let mut f = reject_unclaimed(false);
    let good_hash = f.gw.expected_hash();
    // A bundle the material directory does not have yet (named by content, like the operator):
    // the Contoso CA with a trailing newline, so its name differs from the one already there.
    let extra = format!("{}\n", f.pki.contoso_ca_pem);
    let name = crate::support::pki::material_name(&extra);
    let next = connectors(vec![inbound(
        "mail/contoso",
        &["contoso.com"],
        json!({"requireTls": false, "generation": 2,
               "certificate": {"subjectName": "mail.contoso.com", "trustBundleFile": name}}),
    )]);
    f.gw.rewrite_connectors(&next);
    let new_hash = f.gw.expected_hash();
    wait_for(
        Duration::from_secs(15),
        "the gateway to notice the missing PEM (lastReloadError or a log line naming it)",
        || {
            let s = f.gw.status();
            (!s["lastReloadError"].is_null() || !f.gw.log_lines_with(&[&name]).is_empty())
                .then_some(())
        },
    );
    assert_eq!(
        f.gw.status()["configHash"].as_str(),
        Some(good_hash.as_str()),
        "not consistent yet: the last good config stays"
    );
    // The Secret volume catches up; the next change makes the config consistent.
    std::fs::write(f.gw.material_dir().join(&name), &extra).expect("write material");
    f.gw.rewrite_connectors(&next);
    let status = f.gw.wait_config_hash(&new_hash);
    assert_eq!(
        names_and_generations(&status),
        [("mail/contoso".to_string(), 2)]
    );
}
