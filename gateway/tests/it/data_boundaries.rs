//! Where DATA ends when the client's bytes arrive in awkward pieces (found while writing the
//! DATA fuzz target, gateway/fuzz/fuzz_targets/data.rs, property 3).
//!
//! An over-long text line is handed to the filter in fragments once more than `maxTextLine`
//! octets are buffered without an LF. If such a fragment ends with the line's CR and the LF
//! arrives in the next read, the filter sees the LF alone ("bare LF", previous line not
//! CRLF-terminated), so the `.` line that follows is not taken as the end of data although the
//! wire holds `<CRLF>.<CRLF>`. The client then waits for a reply that never comes (the DATA
//! timeout ends the session with `421 4.4.2`) and its next commands are swallowed as data.

use std::time::Duration;

use crate::support::wire::Wire;
use crate::support::{Fixture, SinkOptions, connectors};
use serde_json::json;

#[test]
fn crlf_dot_crlf_after_an_overlong_line_split_between_cr_and_lf_ends_data() {
    let f = Fixture::build(
        SinkOptions::default(),
        |_, s| s.fleet(json!({"timeouts": {"dataSecs": 3}})),
        |_, _| connectors(vec![]),
    );
    let (mut w, g) = Wire::connect(f.gw.smtp, None);
    assert_eq!(g.map(|g| g.code), Some(220));
    w.send(
        b"EHLO c.test\r\nMAIL FROM:<alice@contoso.com>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n",
    );
    for code in [250, 250, 250, 354] {
        let r = w.read_reply(Duration::from_secs(20));
        assert_eq!(r.as_ref().map(|r| r.code), Some(code), "{r:?}");
    }
    // 1,500 octets and the CR in one segment; the LF and the terminator in the next.
    let mut first = b"Subject: long\r\n\r\n".to_vec();
    first.extend(std::iter::repeat_n(b'a', 1500));
    first.push(b'\r');
    w.send(&first);
    std::thread::sleep(Duration::from_millis(500));
    w.send(b"\n.\r\nNOOP\r\nQUIT\r\n");
    let replies = w.read_to_end(Duration::from_secs(20));
    let got: Vec<String> = replies.iter().map(|r| r.summary()).collect();
    assert!(
        got.len() == 3
            && got[0].starts_with("552 5.3.4")
            && got[1].starts_with("250 2.0.0")
            && got[2].starts_with("221 2.0.0"),
        "expected 552 5.3.4 (line too long) to the <CRLF>.<CRLF>, then NOOP and QUIT answered; got {got:?}"
    );
    assert!(f.sink.messages().is_empty());
}
