//! The log writer (gateway/src/telemetry.rs, issue 17): sessions never wait for stderr, lines
//! that do not fit the queue are dropped and counted, and a SIGTERM loses no queued line.
//!
//! The test stops reading the gateway's stderr, as a stalled log collector would. With the
//! former synchronous writer the sessions then blocked in `write(2)` once the pipe was full
//! (about 150 messages' decision lines), so both tests sent more messages than that.

use std::time::Duration;

use crate::support::wire::Wire;
use crate::support::{Fixture, SinkOptions, connectors, wait_for};

/// More decision lines (three per message, a few hundred bytes each) than a pipe holds.
const MESSAGES: usize = 300;

/// Sends `n` messages over one session; every one must be answered `250` (guard: 20 s per
/// reply, which a session blocked on its log line never gives).
fn send_messages(f: &Fixture, n: usize) {
    let (mut w, g) = Wire::connect(f.gw.smtp, None);
    assert_eq!(g.map(|g| g.code), Some(220));
    w.send(b"EHLO c.test\r\n");
    let r = w.read_reply(Duration::from_secs(20));
    assert_eq!(r.map(|r| r.code), Some(250));
    for i in 0..n {
        w.send(b"MAIL FROM:<alice@contoso.com>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n");
        for code in [250, 250, 354] {
            let r = w.read_reply(Duration::from_secs(20));
            assert_eq!(r.as_ref().map(|r| r.code), Some(code), "message {i}: {r:?}");
        }
        w.send(format!("Subject: m{i}\r\n\r\nbody {i}\r\n.\r\n").as_bytes());
        let r = w.read_reply(Duration::from_secs(20));
        assert_eq!(
            r.as_ref().map(|r| r.code),
            Some(250),
            "message {i} not answered while the log reader is stalled: {r:?}"
        );
    }
    w.send(b"QUIT\r\n");
    let _ = w.read_to_end(Duration::from_secs(20));
}

fn dropped(f: &Fixture) -> u64 {
    let (code, body) = f.gw.get("/metrics");
    assert_eq!(code, 200);
    body.lines()
        .find_map(|l| l.strip_prefix("partnergate_log_lines_dropped_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("partnergate_log_lines_dropped_total missing:\n{body}"))
}

#[test]
fn a_stalled_log_reader_never_blocks_sessions_and_dropped_lines_are_counted() {
    let f = Fixture::build(
        SinkOptions::default(),
        |_, s| s.log_buffer_lines(64),
        |_, _| connectors(vec![]),
    );
    f.gw.pause_logs();
    send_messages(&f, MESSAGES);
    assert_eq!(f.sink.wait_messages(MESSAGES).len(), MESSAGES);
    let lost = dropped(&f);
    f.gw.resume_logs();
    // 3 lines per message, 64 queued, the pipe and our reader's buffer hold the rest.
    assert!(
        lost > 0,
        "with a 64-line queue and the reader stalled, lines must have been dropped"
    );
}

#[test]
fn decision_lines_queued_before_a_sigterm_are_written_before_exit() {
    let mut f = Fixture::start(connectors(vec![]));
    f.gw.pause_logs();
    send_messages(&f, MESSAGES);
    assert_eq!(f.sink.wait_messages(MESSAGES).len(), MESSAGES);
    f.gw.signal("TERM");
    // The reader comes back only after the signal: what the queue held must still be written.
    std::thread::sleep(Duration::from_millis(200));
    f.gw.resume_logs();
    let status = f.gw.wait_exit();
    assert!(status.success(), "exit status {status}");
    wait_for(
        Duration::from_secs(10),
        "the gateway's last log line",
        || f.gw.log_lines_with(&["\"stopped\""]).pop(),
    );
    let done = f.gw.log_lines_with(&["message done"]);
    assert_eq!(
        done.len(),
        MESSAGES,
        "every message's decision line, the last one before SIGTERM included"
    );
}
