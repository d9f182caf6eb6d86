//! ARCHITECTURE section 4 (contract), session hardening: STARTTLS command injection
//! (CVE-2011-0411), SMTP smuggling (CVE-2023-51764), line limits, connection limits, timeouts,
//! VRFY/EXPN, RFC 2920 pipelining, advertised extensions. These need exact control of the
//! bytes on the wire, so most use the raw client; TLS is real (rustls / openssl).

use std::time::Duration;

use crate::support::{
    ClientTls, Fixture, SinkOptions, SmtpConn, assert_reply, connectors, message,
};
use serde_json::json;

const ALICE: &str = "alice@contoso.com";
const BOB: &str = "bob@example.org";

fn plain_fixture(fleet: serde_json::Value) -> Fixture {
    Fixture::build(
        SinkOptions::default(),
        move |_, s| s.fleet(fleet),
        |_, _| connectors(vec![]),
    )
}

/// Reads replies until EOF or a 2 s silence; returns them.
fn drain(c: &mut SmtpConn) -> Vec<crate::support::Reply> {
    c.set_read_timeout(Duration::from_secs(2));
    std::iter::from_fn(|| c.read_reply()).collect()
}

#[test]
fn commands_pipelined_after_starttls_are_never_executed() {
    let f = plain_fixture(json!({}));
    let (mut c, _) = SmtpConn::connect(f.gw.smtp, None);
    c.cmd("EHLO client.test");
    // STARTTLS and an injected transaction in the same packet.
    c.send_raw(
        b"STARTTLS\r\nMAIL FROM:<injected@contoso.com>\r\nRCPT TO:<injected@example.org>\r\n",
    )
    .expect("send");
    let r = c.read_reply().expect("reply to STARTTLS");
    assert_eq!(r.code, 220, "STARTTLS accepted: {r}");
    assert!(
        c.pending().is_empty(),
        "the gateway answered the injected plaintext: {:?}",
        String::from_utf8_lossy(c.pending())
    );
    // Any plaintext reply to the injected commands would break the handshake.
    c.handshake(&ClientTls::new(&f.pki.ca))
        .expect("TLS handshake right after 220");
    c.set_read_timeout(Duration::from_millis(800));
    assert!(
        c.read_line().is_none(),
        "the gateway sent something unprompted after the handshake (a reply to an injected command)"
    );
    c.set_read_timeout(Duration::from_secs(20));
    let ehlo = c.cmd("EHLO client.test");
    assert_eq!(ehlo.code, 250, "{ehlo}");
    assert!(
        ehlo.lines.iter().any(|l| l.starts_with("PIPELINING")),
        "this is the EHLO reply, not a late reply to an injected command: {ehlo}"
    );
    let r = c.cmd(&format!("RCPT TO:<{BOB}>"));
    assert_eq!(
        r.code, 503,
        "RCPT without MAIL must be a bad sequence: the injected MAIL was executed? {r}"
    );
    let t = c.send_mail(ALICE, &[BOB], &message(ALICE, BOB, "after tls", &[]));
    t.assert_delivered("a real transaction after STARTTLS");
    c.quit();
    let m = f.sink.wait_messages(1);
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].mail_from, ALICE);
    assert_eq!(m[0].rcpt_to, [BOB]);
}

#[test]
fn bare_lf_in_data_is_refused_and_nothing_relayed() {
    let f = plain_fixture(json!({}));
    let (mut c, _) = SmtpConn::connect(f.gw.smtp, None);
    c.cmd("EHLO client.test");
    c.cmd(&format!("MAIL FROM:<{ALICE}>"));
    c.cmd(&format!("RCPT TO:<{BOB}>"));
    assert_eq!(c.cmd("DATA").code, 354);
    c.send_raw(b"Subject: bare lf\r\n\r\nline one\nline two\r\n.\r\n")
        .expect("send");
    let r = c.read_reply().expect("reply to the end of DATA");
    assert!(r.code >= 500, "bare LF must be refused, got {r}");
    c.quit();
    assert!(f.sink.messages().is_empty(), "{:?}", f.sink.messages());
}

#[test]
fn smtp_smuggling_with_lf_dot_lf_is_refused_and_nothing_relayed() {
    let f = plain_fixture(json!({}));
    let (mut c, _) = SmtpConn::connect(f.gw.smtp, None);
    c.cmd("EHLO client.test");
    c.cmd(&format!("MAIL FROM:<{ALICE}>"));
    c.cmd(&format!("RCPT TO:<{BOB}>"));
    assert_eq!(c.cmd("DATA").code, 354);
    // "\n.\r\n" is not the end of DATA; the smuggled transaction is message text.
    c.send_raw(
        b"Subject: outer\r\n\r\nhello\r\n\n.\r\n\
          MAIL FROM:<smuggled@contoso.com>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n\
          Subject: smuggled\r\n\r\nsmuggled body\r\n.\r\n",
    )
    .expect("send");
    let replies = drain(&mut c);
    assert!(
        !replies.is_empty() && replies[0].code >= 500,
        "the message with a bare LF is refused as a whole: {replies:?}"
    );
    assert_eq!(
        replies.len(),
        1,
        "exactly one reply (to the real end of DATA); more means the smuggled commands ran: {replies:?}"
    );
    assert!(f.sink.messages().is_empty(), "{:?}", f.sink.messages());
}

#[test]
fn bare_cr_in_data_is_refused_and_nothing_relayed() {
    let f = plain_fixture(json!({}));
    let (mut c, _) = SmtpConn::connect(f.gw.smtp, None);
    c.cmd("EHLO client.test");
    c.cmd(&format!("MAIL FROM:<{ALICE}>"));
    c.cmd(&format!("RCPT TO:<{BOB}>"));
    assert_eq!(c.cmd("DATA").code, 354);
    c.send_raw(b"Subject: bare cr\r\n\r\nline one\rline two\r\n.\r\n")
        .expect("send");
    // The line with the bare CR still ends in CRLF, so the next ".\r\n" is <CRLF>.<CRLF>.
    let r = c
        .read_reply()
        .expect("a reply to <CRLF>.<CRLF> after a line with a bare CR (none within 20 s)");
    assert!(r.code >= 500, "bare CR must be refused, got {r}");
    assert!(f.sink.messages().is_empty());
}

#[test]
fn overlong_command_and_text_lines_are_refused() {
    let f = plain_fixture(json!({}));
    let (mut c, _) = SmtpConn::connect(f.gw.smtp, None);
    c.cmd("EHLO client.test");
    let long = format!("MAIL FROM:<{}@contoso.com>", "a".repeat(600));
    let r = c.cmd(&long);
    assert!(
        r.code >= 500,
        "a {}-octet command line: {r}",
        long.len() + 2
    );
    // The session is still usable.
    c.cmd(&format!("MAIL FROM:<{ALICE}>"));
    c.cmd(&format!("RCPT TO:<{BOB}>"));
    assert_eq!(c.cmd("DATA").code, 354);
    let body = format!("Subject: long line\r\n\r\n{}\r\n", "x".repeat(1200));
    c.send_raw(body.as_bytes()).expect("send");
    c.send_raw(b".\r\n").expect("send");
    let r = c.read_reply().expect("reply to the end of DATA");
    assert!(r.code >= 500, "a 1202-octet text line: {r}");
    assert!(f.sink.messages().is_empty());
}

#[test]
fn connections_per_ip_over_the_limit_get_421_470() {
    let f = plain_fixture(json!({"limits": {"maxConnectionsPerIp": 2}}));
    let ip = f.net.client(0);
    let (a, ga) = SmtpConn::connect(f.gw.smtp, Some(ip));
    let (_b, gb) = SmtpConn::connect(f.gw.smtp, Some(ip));
    assert_eq!((ga.code, gb.code), (220, 220));
    let (mut third, g) = SmtpConn::connect(f.gw.smtp, Some(ip));
    assert_reply(&g, "421 4.7.0", "third connection from one IP");
    assert!(third.is_closed(), "closed after 421");
    let (_other, g) = SmtpConn::connect(f.gw.smtp, Some(f.net.client(1)));
    assert_eq!(g.code, 220, "another IP is not affected: {g}");
    // A slot frees up when a connection ends.
    a.quit();
    crate::support::wait_for(Duration::from_secs(10), "a free per-IP slot", || {
        let (_c, g) = SmtpConn::connect(f.gw.smtp, Some(ip));
        (g.code == 220).then_some(())
    });
}

#[test]
fn connections_over_the_total_limit_get_421_470() {
    let f = plain_fixture(json!({"limits": {"maxConnections": 2}}));
    let (_a, ga) = SmtpConn::connect(f.gw.smtp, Some(f.net.client(0)));
    let (_b, gb) = SmtpConn::connect(f.gw.smtp, Some(f.net.client(1)));
    assert_eq!((ga.code, gb.code), (220, 220));
    let (_c, g) = SmtpConn::connect(f.gw.smtp, Some(f.net.client(2)));
    assert_reply(&g, "421 4.7.0", "connection over the total limit");
}

#[test]
fn idle_command_timeout_gives_421_442() {
    let f = plain_fixture(json!({"timeouts": {"commandSecs": 1}}));
    let (mut c, _) = SmtpConn::connect(f.gw.smtp, None);
    c.cmd("EHLO client.test");
    // The read timeout (20 s) is only a guard.
    let r = c.read_reply().expect("a 421 before the connection closes");
    assert_reply(&r, "421 4.4.2", "command timeout");
    assert!(c.is_closed(), "closed after the timeout");
}

#[test]
fn data_timeout_gives_421_442_and_nothing_relayed() {
    let f = plain_fixture(json!({"timeouts": {"dataSecs": 1}}));
    let (mut c, _) = SmtpConn::connect(f.gw.smtp, None);
    c.cmd("EHLO client.test");
    c.cmd(&format!("MAIL FROM:<{ALICE}>"));
    c.cmd(&format!("RCPT TO:<{BOB}>"));
    assert_eq!(c.cmd("DATA").code, 354);
    c.send_raw(b"Subject: stalled\r\n\r\nfirst line\r\n")
        .expect("send");
    let r = c.read_reply().expect("a 421 before the connection closes");
    assert_reply(&r, "421 4.4.2", "DATA timeout");
    assert!(f.sink.messages().is_empty());
}

#[test]
fn vrfy_and_expn_are_refused() {
    let f = plain_fixture(json!({}));
    let (mut c, _) = SmtpConn::connect(f.gw.smtp, None);
    c.cmd("EHLO client.test");
    for cmd in ["VRFY postmaster", "VRFY <bob@example.org>", "EXPN staff"] {
        let r = c.cmd(cmd);
        assert!(r.code >= 500, "{cmd}: {r}");
        assert!(!r.text().contains("bob@example.org"), "{cmd}: {r}");
    }
    assert_eq!(c.cmd("NOOP").code, 250, "the session goes on");
}

#[test]
fn pipelined_transaction_gets_replies_in_order() {
    let f = plain_fixture(json!({}));
    let (mut c, _) = SmtpConn::connect(f.gw.smtp, None);
    let ehlo = c.cmd("EHLO client.test");
    assert!(ehlo.lines.iter().any(|l| l == "PIPELINING"), "{ehlo}");
    c.send_raw(
        format!(
            "MAIL FROM:<{ALICE}>\r\nRCPT TO:<{BOB}>\r\nRCPT TO:<carol@example.org>\r\nDATA\r\n"
        )
        .as_bytes(),
    )
    .expect("send group");
    let codes: Vec<u16> = (0..4)
        .map(|_| c.read_reply().expect("pipelined reply").code)
        .collect();
    assert_eq!(codes, [250, 250, 250, 354]);
    c.send_raw(message(ALICE, BOB, "pipelined", &[]).as_bytes())
        .expect("send body");
    c.send_raw(b".\r\nQUIT\r\n").expect("send end");
    let end = c.read_reply().expect("end of DATA");
    assert_eq!(end.code, 250, "{end}");
    assert_eq!(c.read_reply().map(|r| r.code), Some(221));
    assert_eq!(
        f.sink.wait_messages(1)[0].rcpt_to,
        [BOB, "carol@example.org"]
    );
}

#[test]
fn ehlo_advertises_extensions_and_starttls_only_once() {
    let f = plain_fixture(json!({"limits": {"maxMessageSize": 1048576}}));
    let (mut c, greeting) = SmtpConn::connect(f.gw.smtp, None);
    assert!(
        greeting.summary().starts_with("220 gateway.test"),
        "{greeting}"
    );
    let ehlo = c.cmd("EHLO client.test");
    for ext in [
        "STARTTLS",
        "PIPELINING",
        "SIZE 1048576",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
    ] {
        assert!(
            ehlo.lines.iter().any(|l| l.trim() == ext),
            "EHLO lacks {ext}: {ehlo}"
        );
    }
    c.starttls(&ClientTls::new(&f.pki.ca));
    let ehlo = c.cmd("EHLO client.test");
    assert!(
        !ehlo.lines.iter().any(|l| l.trim() == "STARTTLS"),
        "STARTTLS offered again inside TLS: {ehlo}"
    );
    let r = c.cmd("STARTTLS");
    assert_eq!(r.code, 503, "{r}");
    // SMTPUTF8 and 8BITMIME are accepted as MAIL parameters.
    let r = c.cmd("MAIL FROM:<jörg@contoso.com> SMTPUTF8 BODY=8BITMIME");
    assert_eq!(r.code, 250, "{r}");
}

#[test]
fn tls_below_1_2_is_refused_at_handshake() {
    let f = plain_fixture(json!({}));
    let openssl = crate::support::require_tool("openssl");
    let out = std::process::Command::new(openssl)
        .args([
            "s_client",
            "-starttls",
            "smtp",
            "-tls1_1",
            "-cipher",
            "DEFAULT@SECLEVEL=0",
        ])
        .arg("-connect")
        .arg(f.gw.smtp.to_string())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "TLS 1.1 handshake succeeded:\n{text}"
    );
    assert!(
        text.contains("Cipher is (NONE)") && text.contains("alert"),
        "the server refused the handshake with an alert:\n{text}"
    );
}
