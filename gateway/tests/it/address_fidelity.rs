//! Envelope addresses reach the next hop as the client sent them, or are refused (issue 8,
//! items 1 and 4). smtp-proto's parser dequotes local parts and turns invalid UTF-8 into
//! U+FFFD; relaying the parsed value would hand the upstream a *different* address:
//!
//! - `"user@evil.test"@example.org` relayed as `user@evil.test@example.org` (two unquoted `@`:
//!   sendmail and Postfix may resolve it to evil.test — an open relay through the upstream, which
//!   usually trusts the gateway);
//! - `<\xff@contoso.com>` relayed as `<\u{FFFD}@contoso.com>`;
//! - a non-ASCII address without `SMTPUTF8` (RFC 6531 3.4: refuse with `553 5.6.7`, as Postfix
//!   does) relayed to a next hop that was never told.

use crate::support::{Fixture, SmtpConn, connectors, message};

fn fixture() -> Fixture {
    Fixture::start(connectors(vec![]))
}

/// Sends EHLO, the MAIL line and the RCPT line as raw bytes; returns the two replies.
fn mail_rcpt(
    f: &Fixture,
    mail: &[u8],
    rcpt: &[u8],
) -> (crate::support::Reply, Option<crate::support::Reply>) {
    let (mut c, _) = SmtpConn::connect(f.gw.smtp, None);
    c.cmd("EHLO client.test");
    c.send_raw(&[mail, b"\r\n"].concat()).expect("send");
    let m = c.read_reply().expect("reply to MAIL");
    if m.code != 250 || rcpt.is_empty() {
        c.quit();
        return (m, None);
    }
    c.send_raw(&[rcpt, b"\r\n"].concat()).expect("send");
    let r = c.read_reply().expect("reply to RCPT");
    if r.code == 250 {
        let (_, end) = c.data(&message("a@contoso.com", "b@example.org", "fidelity", &[]));
        assert_eq!(end.map(|e| e.code), Some(250));
    }
    c.quit();
    (m, Some(r))
}

#[test]
fn quoted_local_parts_reach_the_upstream_still_quoted() {
    let f = fixture();
    let rows: &[&str] = &[
        "\"user@evil.test\"@example.org",
        "\"user\\\"@evil.test\"@example.org",
        "\"a b\"@example.org",
    ];
    let mut failures = Vec::new();
    for (i, rcpt) in rows.iter().enumerate() {
        let (_, r) = mail_rcpt(
            &f,
            b"MAIL FROM:<alice@contoso.com>",
            format!("RCPT TO:<{rcpt}>").as_bytes(),
        );
        let r = r.expect("RCPT reply");
        if r.code != 250 {
            failures.push(format!("{rcpt}: refused {r}"));
            continue;
        }
        let m = f.sink.wait_messages(i + 1);
        if m[i].rcpt_to != [*rcpt] {
            failures.push(format!(
                "RCPT TO:<{rcpt}> reached the upstream as {:?}",
                m[i].rcpt_to
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn addresses_must_be_valid_utf8_and_declared_with_smtputf8() {
    let f = fixture();
    let rows: &[(&[u8], &[u8], &str)] = &[
        (b"MAIL FROM:<\xff\xfe@contoso.com>", b"", "501 5.1.7"),
        (b"MAIL FROM:<a\xc3@contoso.com> SMTPUTF8", b"", "501 5.1.7"),
        (
            b"MAIL FROM:<alice@contoso.com> SMTPUTF8",
            b"RCPT TO:<b\xff@example.org>",
            "501 5.1.3",
        ),
        ("MAIL FROM:<jörg@contoso.com>".as_bytes(), b"", "553 5.6.7"),
        (
            b"MAIL FROM:<alice@contoso.com>",
            "RCPT TO:<jörg@example.org>".as_bytes(),
            "553 5.6.7",
        ),
    ];
    let mut failures = Vec::new();
    for (mail, rcpt, want) in rows {
        let (m, r) = mail_rcpt(&f, mail, rcpt);
        let got = if rcpt.is_empty() { Some(m) } else { r };
        let ok = got.as_ref().is_some_and(|g| g.matches(want));
        if !ok {
            failures.push(format!(
                "{:?} / {:?}: expected {want}, got {:?}",
                String::from_utf8_lossy(mail),
                String::from_utf8_lossy(rcpt),
                got.map(|g| g.to_string())
            ));
        }
    }
    let relayed: Vec<_> = f
        .sink
        .messages()
        .iter()
        .map(|m| (m.mail_from.clone(), m.rcpt_to.clone()))
        .collect();
    assert!(
        failures.is_empty() && relayed.is_empty(),
        "{}\nrelayed to the upstream: {relayed:?}",
        failures.join("\n")
    );
}
