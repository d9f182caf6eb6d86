//! Hostile SMTP corpus (issue 8, item 1): scripted sessions over raw TCP and TLS, one table row
//! each (name, transport, packets, every reply expected in order, what may reach the sink).
//!
//! Every row runs on its own connection from its own source address against one gateway, so the
//! rows run in parallel and the sink's messages are attributed to a row by the client address
//! in the gateway's `Received:` header. A row fails unless the gateway sent exactly the listed
//! replies (code + enhanced code, and text where given) and nothing else, and the sink got
//! exactly what the row allows. All failures are collected and reported together.
//!
//! Expectation strings are reply prefixes (`"550 5.6.11"`); `"250 2.1.5*100"` means 100 such
//! replies in a row. The greeting (and, for TLS rows, the EHLO/STARTTLS set-up) is not listed.
//!
//! Anchors: CVE-2011-0411 (STARTTLS command injection), CVE-2023-51764 (SMTP smuggling),
//! RFC 5321 4.5.3.1 (line limits), RFC 2920 (pipelining), RFC 3030 (BDAT), RFC 6531 (SMTPUTF8),
//! RFC 1870 (SIZE), RFC 5746 (renegotiation).

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::wire::Wire;
use crate::support::{ClientTls, Fixture, Recorded, Reply, SinkOptions, connectors};
use serde_json::json;

/// One scripted step.
#[derive(Clone)]
enum Step {
    /// Bytes sent verbatim (inside TLS once it is up).
    Send(Vec<u8>),
    /// Read replies until the `220 2.0.0` to STARTTLS, require that nothing follows it in
    /// plaintext, then do the TLS handshake.
    Tls,
    /// Bytes written on the TCP socket underneath TLS (plaintext injected into the TLS stream).
    Tcp(Vec<u8>),
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Read the greeting, then run the steps in plaintext.
    Plain,
    /// Send the first step before reading the greeting (an early talker).
    Early,
    /// EHLO, STARTTLS and the handshake first (not listed in the expectations).
    Tls,
}

/// What the sink may receive from the row's session.
#[derive(Clone, Copy)]
enum SinkExp {
    Nothing,
    One,
    /// Exactly one message, checked further.
    Check(fn(&Recorded) -> Result<(), String>),
}

struct Case {
    name: &'static str,
    mode: Mode,
    steps: Vec<Step>,
    expect: Vec<&'static str>,
    sink: SinkExp,
}

fn s(b: impl AsRef<[u8]>) -> Step {
    Step::Send(b.as_ref().to_vec())
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// EHLO, MAIL, RCPT, DATA of an ordinary transaction, pipelined.
const TX: &[u8] =
    b"EHLO c.test\r\nMAIL FROM:<alice@contoso.com>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n";
/// TLS rows: EHLO was sent in the set-up, but STARTTLS resets the session: EHLO again.
const TLS_TX: &[u8] = TX;
/// The replies to [`TX`].
const TXR: [&str; 4] = ["250", "250 2.1.0", "250 2.1.5", "354"];

fn ex(parts: &[&[&'static str]]) -> Vec<&'static str> {
    parts.concat()
}

fn case(
    name: &'static str,
    mode: Mode,
    steps: Vec<Step>,
    expect: Vec<&'static str>,
    sink: SinkExp,
) -> Case {
    Case {
        name,
        mode,
        steps,
        expect,
        sink,
    }
}

/// A ClientHello as a TLS client would send it first thing, with every LF byte changed so the
/// row is deterministic (the gateway does not parse it; only the bytes' shape matters).
fn client_hello() -> Vec<u8> {
    let pki_free = rustls::RootCertStore::empty();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(pki_free)
    .with_no_client_auth();
    let mut conn = rustls::ClientConnection::new(
        Arc::new(cfg),
        rustls::pki_types::ServerName::try_from("gateway.test").expect("name"),
    )
    .expect("client");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("write_tls");
    }
    for b in out.iter_mut() {
        if *b == b'\n' {
            *b = 0x0b;
        }
    }
    assert!(out.len() < 512, "a ClientHello of {} bytes", out.len());
    out
}

fn one_connector_header(m: &Recorded, want: &str) -> Result<(), String> {
    let v = m.header_values("X-Partnergate-Connector");
    if v.len() != 1 || v[0] != want {
        return Err(format!(
            "expected exactly one X-Partnergate-Connector: {want}, got {v:?} in\n{}",
            m.headers()
        ));
    }
    let h = m.headers().to_ascii_lowercase();
    if h.contains("forged") || h.contains("partner/contoso") {
        return Err(format!("a forged value survived:\n{}", m.headers()));
    }
    Ok(())
}

fn spoof_plain(m: &Recorded) -> Result<(), String> {
    one_connector_header(m, "none; tls=none; cert=none")
}

fn spoof_tls(m: &Recorded) -> Result<(), String> {
    one_connector_header(m, "none; tls=1.3; cert=none")
}

fn smuggled_text_is_data(m: &Recorded) -> Result<(), String> {
    let t = m.text();
    if !t.contains("MAIL FROM:<smuggled@contoso.com>") {
        return Err(format!(
            "the would-be commands are not in the message text:\n{t}"
        ));
    }
    if m.mail_from != "alice@contoso.com" || m.rcpt_to != ["bob@example.org"] {
        return Err(format!(
            "envelope changed: {} -> {:?}",
            m.mail_from, m.rcpt_to
        ));
    }
    Ok(())
}

fn nul_kept(m: &Recorded) -> Result<(), String> {
    if m.data.windows(3).any(|w| w == b"a\0b") {
        Ok(())
    } else {
        Err(format!("NUL byte not relayed verbatim: {:?}", m.text()))
    }
}

fn table() -> Vec<Case> {
    use Mode::{Early, Plain, Tls};
    use SinkExp::{Check, Nothing, One};
    let smuggled: &[u8] = b"MAIL FROM:<smuggled@contoso.com>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\nSubject: smuggled\r\n\r\nsmuggled\r\n";
    let rcpts_ok: Vec<u8> = (0..10_000)
        .flat_map(|i| format!("RCPT TO:<r{i}@example.org>\r\n").into_bytes())
        .collect();
    let rcpts_denied: Vec<u8> = (0..10_000)
        .flat_map(|i| format!("RCPT TO:<r{i}@relay-target.test>\r\n").into_bytes())
        .collect();
    let hello = client_hello();
    let hello3 = cat(&[&hello, &hello, &hello]);
    let x = |n: usize| "x".repeat(n);
    let noop512 = format!("NOOP {}\r\n", x(512 - 7));
    let noop513 = format!("NOOP {}\r\n", x(513 - 7));
    let text1000 = format!("Subject: l\r\n\r\n{}\r\n.\r\nQUIT\r\n", x(998));
    let text1001 = format!("Subject: l\r\n\r\n{}\r\n.\r\nQUIT\r\n", x(999));
    let big = format!(
        "Subject: big\r\n\r\n{}.\r\nQUIT\r\n",
        format!("{}\r\n", x(98)).repeat(700)
    );
    vec![
        // --- STARTTLS command injection (CVE-2011-0411) ---
        case("starttls: MAIL/RCPT/DATA pipelined in the STARTTLS packet", Plain, vec![s(b"EHLO c.test\r\nSTARTTLS\r\nMAIL FROM:<inj@contoso.com>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"), Step::Tls, s(b"RCPT TO:<bob@example.org>\r\nQUIT\r\n")], vec!["250", "220 2.0.0", "503 5.5.1 Need MAIL", "221 2.0.0"], Nothing),
        case("starttls: injected EHLO does not count, EHLO required again", Plain, vec![s(b"EHLO c.test\r\nSTARTTLS\r\nEHLO injected.test\r\n"), Step::Tls, s(b"MAIL FROM:<alice@contoso.com>\r\nQUIT\r\n")], vec!["250", "220 2.0.0", "503 5.5.1 Send EHLO", "221 2.0.0"], Nothing),
        case("starttls: injection in a second packet before the handshake", Plain, vec![s(b"EHLO c.test\r\nSTARTTLS\r\n"), s(b"MAIL FROM:<inj@contoso.com>\r\nRCPT TO:<bob@example.org>\r\n")], vec!["250", "220 2.0.0"], Nothing),
        case("starttls: injection split mid-command across packets", Plain, vec![s(b"EHLO c.test\r\nSTARTTLS\r\nMAIL FR"), s(b"OM:<inj@contoso.com>\r\n")], vec!["250", "220 2.0.0"], Nothing),
        case("starttls: garbage instead of a ClientHello", Plain, vec![s(b"EHLO c.test\r\nSTARTTLS\r\n"), s(b"\x00\xff\xfegarbage\x16\x03\x01\x00\x05hello\r\nQUIT\r\n")], vec!["250", "220 2.0.0"], Nothing),
        case("starttls: plaintext injected under the TLS layer", Tls, vec![Step::Tcp(b"MAIL FROM:<inj@contoso.com>\r\nQUIT\r\n".to_vec())], vec![], Nothing),
        case("starttls: STARTTLS inside TLS", Tls, vec![s(b"STARTTLS\r\nQUIT\r\n")], vec!["503 5.5.1 TLS already active", "221 2.0.0"], Nothing),
        case("starttls: before EHLO", Plain, vec![s(b"STARTTLS\r\nQUIT\r\n")], vec!["503 5.5.1 Send EHLO", "221 2.0.0"], Nothing),
        // --- SMTP smuggling (CVE-2023-51764): only <CRLF>.<CRLF> ends DATA ---
        case("smuggling: <LF>.<LF>", Plain, vec![s(TX), s(cat(&[b"Subject: s\r\n\r\nhi\n.\n", smuggled, b".\r\nQUIT\r\n"]))], ex(&[&TXR, &["550 5.6.11", "221 2.0.0"]]), Nothing),
        case("smuggling: <CR>.<CR>", Plain, vec![s(TX), s(b"Subject: s\r\n\r\nhi\r.\rMAIL FROM:<smuggled@contoso.com>\rRCPT TO:<victim@example.org>\rDATA\rsmuggled\r.\r\r\n.\r\nQUIT\r\n")], ex(&[&TXR, &["550 5.6.11", "221 2.0.0"]]), Nothing),
        case("smuggling: <LF>.<CR><LF>", Plain, vec![s(TX), s(cat(&[b"Subject: s\r\n\r\nhi\n.\r\n", smuggled, b".\r\nQUIT\r\n"]))], ex(&[&TXR, &["550 5.6.11", "221 2.0.0"]]), Nothing),
        case("smuggling: <CR><LF>.<LF>", Plain, vec![s(TX), s(cat(&[b"Subject: s\r\n\r\nhi\r\n.\n", smuggled, b".\r\nQUIT\r\n"]))], ex(&[&TXR, &["550 5.6.11", "221 2.0.0"]]), Nothing),
        case("smuggling: <CR>.<CR><LF>", Plain, vec![s(TX), s(cat(&[b"Subject: s\r\n\r\nhi\r.\r\n", smuggled, b".\r\nQUIT\r\n"]))], ex(&[&TXR, &["550 5.6.11", "221 2.0.0"]]), Nothing),
        case("smuggling: <CR><LF>.<CR> then commands", Plain, vec![s(TX), s(cat(&[b"Subject: s\r\n\r\nhi\r\n.\r", smuggled, b".\r\nQUIT\r\n"]))], ex(&[&TXR, &["550 5.6.11", "221 2.0.0"]]), Nothing),
        case("smuggling: <LF>.<LF> split across packets", Plain, vec![s(TX), s(b"Subject: s\r\n\r\nhi\n"), s(b".\n"), s(cat(&[smuggled, b".\r\nQUIT\r\n"]))], ex(&[&TXR, &["550 5.6.11", "221 2.0.0"]]), Nothing),
        case("smuggling: bare-LF message never terminated: DATA timeout", Plain, vec![s(TX), s(b"Subject: s\n\nhi\n.\nQUIT\n")], ex(&[&TXR, &["421 4.4.2"]]), Nothing),
        case("smuggling: NUL before the dot is data, one message", Plain, vec![s(TX), s(cat(&[b"Subject: s\r\n\r\nhi\r\n\0.\r\n", smuggled, b".\r\nQUIT\r\n"]))], ex(&[&TXR, &["250 2.0.0", "221 2.0.0"]]), Check(smuggled_text_is_data)),
        case("smuggling: <CRLF><SP>.<CRLF> is data, one message", Plain, vec![s(TX), s(cat(&[b"Subject: s\r\n\r\nhi\r\n .\r\n", smuggled, b".\r\nQUIT\r\n"]))], ex(&[&TXR, &["250 2.0.0", "221 2.0.0"]]), Check(smuggled_text_is_data)),
        case("smuggling: stuffed <CRLF>..<CRLF> is data, one message", Plain, vec![s(TX), s(cat(&[b"Subject: s\r\n\r\nhi\r\n..\r\n", smuggled, b".\r\nQUIT\r\n"]))], ex(&[&TXR, &["250 2.0.0", "221 2.0.0"]]), Check(smuggled_text_is_data)),
        case("smuggling: <LF>.<LF> inside TLS", Tls, vec![s(TLS_TX), s(cat(&[b"Subject: s\r\n\r\nhi\n.\n", smuggled, b".\r\nQUIT\r\n"]))], ex(&[&TXR, &["550 5.6.11", "221 2.0.0"]]), Nothing),
        // --- NUL bytes ---
        case("nul: in the MAIL address", Plain, vec![s(b"EHLO c.test\r\nMAIL FROM:<a\0b@contoso.com>\r\nQUIT\r\n")], vec!["250", "501 5.1.7", "221 2.0.0"], Nothing),
        case("nul: in the RCPT address", Plain, vec![s(b"EHLO c.test\r\nMAIL FROM:<alice@contoso.com>\r\nRCPT TO:<bob\0@example.org>\r\nQUIT\r\n")], vec!["250", "250 2.1.0", "501 5.1.3", "221 2.0.0"], Nothing),
        case("nul: inside the verb", Plain, vec![s(b"EH\0LO c.test\r\nQUIT\r\n")], vec!["500 5.5.1", "221 2.0.0"], Nothing),
        case("nul: in message data is relayed verbatim", Plain, vec![s(TX), s(b"Subject: nul\r\n\r\na\0b\r\n.\r\nQUIT\r\n")], ex(&[&TXR, &["250 2.0.0", "221 2.0.0"]]), Check(nul_kept)),
        case("nul: in a command inside TLS", Tls, vec![s(b"EHLO c.test\r\nMAIL FROM:<\0@contoso.com>\r\nQUIT\r\n")], vec!["250", "501 5.1.7", "221 2.0.0"], Nothing),
        // --- line limits (RFC 5321 4.5.3.1) ---
        case("limits: 512-octet command line is accepted", Plain, vec![s(cat(&[noop512.as_bytes(), b"QUIT\r\n"]))], vec!["250 2.0.0", "221 2.0.0"], Nothing),
        case("limits: 513-octet command line is refused", Plain, vec![s(cat(&[noop513.as_bytes(), b"NOOP\r\nQUIT\r\n"]))], vec!["500 5.5.2", "250 2.0.0", "221 2.0.0"], Nothing),
        case("limits: 100 kB line without LF, then a command", Plain, vec![s(x(100_000)), s(b"\r\nNOOP\r\nQUIT\r\n")], vec!["500 5.5.2", "250 2.0.0", "221 2.0.0"], Nothing),
        case("limits: over-long line inside TLS", Tls, vec![s(cat(&[noop513.as_bytes(), b"QUIT\r\n"]))], vec!["500 5.5.2", "221 2.0.0"], Nothing),
        case("limits: 1000-octet text line is relayed", Plain, vec![s(TX), s(&text1000)], ex(&[&TXR, &["250 2.0.0", "221 2.0.0"]]), One),
        case("limits: 1001-octet text line refuses the message", Plain, vec![s(TX), s(&text1001)], ex(&[&TXR, &["552 5.3.4", "221 2.0.0"]]), Nothing),
        case("limits: 1 MB text line without LF", Plain, vec![s(TX), s(x(1 << 20)), s(b"\r\n.\r\nQUIT\r\n")], ex(&[&TXR, &["552 5.3.4", "221 2.0.0"]]), Nothing),
        case("limits: message over maxMessageSize", Plain, vec![s(TX), s(&big)], ex(&[&TXR, &["552 5.3.4", "221 2.0.0"]]), Nothing),
        case("limits: 10,000 RCPTs to an accepted domain", Plain, vec![s(b"EHLO c.test\r\nMAIL FROM:<alice@contoso.com>\r\n"), s(&rcpts_ok), s(b"RSET\r\nQUIT\r\n")], vec!["250", "250 2.1.0", "250 2.1.5*100", "452 4.5.3*9900", "250 2.0.0", "221 2.0.0"], Nothing),
        case("limits: 10,000 RCPTs to a relay target", Plain, vec![s(b"EHLO c.test\r\nMAIL FROM:<alice@contoso.com>\r\n"), s(&rcpts_denied), s(b"QUIT\r\n")], vec!["250", "250 2.1.0", "550 5.7.1*10000", "221 2.0.0"], Nothing),
        case("limits: 10 refused commands close the session", Plain, vec![s(b"FOO\r\n".repeat(12))], vec!["500 5.5.1*10", "421 4.7.0 Too many errors"], Nothing),
        // --- sequence: pipelining before EHLO, DATA without RCPT, BDAT ---
        case("sequence: a transaction pipelined before EHLO", Plain, vec![s(b"MAIL FROM:<alice@contoso.com>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\nQUIT\r\n")], vec!["503 5.5.1 Send EHLO", "503 5.5.1 Need MAIL", "503 5.5.1 Need MAIL", "221 2.0.0"], Nothing),
        case("sequence: early talker (everything before the greeting)", Early, vec![s(b"MAIL FROM:<alice@contoso.com>\r\nRCPT TO:<bob@example.org>\r\nQUIT\r\n")], vec!["220 gateway.test", "503 5.5.1 Send EHLO", "503 5.5.1 Need MAIL", "221 2.0.0"], Nothing),
        case("sequence: MAIL before EHLO inside TLS", Tls, vec![s(b"MAIL FROM:<alice@contoso.com>\r\nQUIT\r\n")], vec!["503 5.5.1 Send EHLO", "221 2.0.0"], Nothing),
        case("sequence: DATA without RCPT", Plain, vec![s(b"EHLO c.test\r\nMAIL FROM:<alice@contoso.com>\r\nDATA\r\nQUIT\r\n")], vec!["250", "250 2.1.0", "554 5.5.1", "221 2.0.0"], Nothing),
        case("sequence: DATA after only refused RCPTs", Plain, vec![s(b"EHLO c.test\r\nMAIL FROM:<alice@contoso.com>\r\nRCPT TO:<v@relay-target.test>\r\nDATA\r\nQUIT\r\n")], vec!["250", "250 2.1.0", "550 5.7.1", "554 5.5.1", "221 2.0.0"], Nothing),
        case("sequence: DATA without MAIL", Plain, vec![s(b"EHLO c.test\r\nDATA\r\nQUIT\r\n")], vec!["250", "503 5.5.1 Need MAIL", "221 2.0.0"], Nothing),
        case("sequence: nested MAIL", Plain, vec![s(b"EHLO c.test\r\nMAIL FROM:<alice@contoso.com>\r\nMAIL FROM:<eve@contoso.com>\r\nQUIT\r\n")], vec!["250", "250 2.1.0", "503 5.5.1 Nested MAIL", "221 2.0.0"], Nothing),
        case("sequence: BDAT without CHUNKING, chunk read as commands", Plain, vec![s(b"EHLO c.test\r\nMAIL FROM:<alice@contoso.com>\r\nRCPT TO:<bob@example.org>\r\nBDAT 27 LAST\r\nRCPT TO:<v@relay-target.test>\r\nQUIT\r\n")], vec!["250", "250 2.1.0", "250 2.1.5", "502 5.5.1", "550 5.7.1", "221 2.0.0"], Nothing),
        case("sequence: AUTH, ETRN and VRFY refused", Plain, vec![s(b"EHLO c.test\r\nAUTH PLAIN AGFAYQ==\r\nETRN example.org\r\nVRFY bob\r\nQUIT\r\n")], vec!["250", "502 5.5.1", "502 5.5.1", "502 5.5.1", "221 2.0.0"], Nothing),
        // --- invalid UTF-8 / SMTPUTF8 ---
        case("utf8: UTF-8 address with SMTPUTF8 is relayed", Plain, vec![s("EHLO c.test\r\nMAIL FROM:<jörg@contoso.com> SMTPUTF8\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"), s("Subject: ü\r\n\r\nhi\r\n.\r\nQUIT\r\n")], ex(&[&TXR, &["250 2.0.0", "221 2.0.0"]]), One),
        case("utf8: invalid UTF-8 in EHLO", Plain, vec![s(b"EHLO \xff\xfe.test\r\nQUIT\r\n")], vec!["250 gateway.test", "221 2.0.0"], Nothing),
        case("utf8: invalid UTF-8 in message data (8BITMIME) is relayed", Plain, vec![s(TX), s(b"Subject: 8bit\r\n\r\n\xff\xfe\r\n.\r\nQUIT\r\n")], ex(&[&TXR, &["250 2.0.0", "221 2.0.0"]]), One),
        // --- MAIL/RCPT parameter abuse (RFC 1870 and friends) ---
        case("params: SIZE=99999999999999999999 (overflow)", Plain, vec![s(b"EHLO c.test\r\nMAIL FROM:<alice@contoso.com> SIZE=99999999999999999999\r\nQUIT\r\n")], vec!["250", "501 5.5.4 Invalid SIZE", "221 2.0.0"], Nothing),
        case("params: SIZE over the limit", Plain, vec![s(b"EHLO c.test\r\nMAIL FROM:<alice@contoso.com> SIZE=65537\r\nQUIT\r\n")], vec!["250", "552 5.3.4", "221 2.0.0"], Nothing),
        case("params: SIZE=-1", Plain, vec![s(b"EHLO c.test\r\nMAIL FROM:<alice@contoso.com> SIZE=-1\r\nQUIT\r\n")], vec!["250", "501 5.5.4", "221 2.0.0"], Nothing),
        case("params: duplicate SIZE, second over the limit", Plain, vec![s(b"EHLO c.test\r\nMAIL FROM:<alice@contoso.com> SIZE=10 SIZE=99999999\r\nQUIT\r\n")], vec!["250", "552 5.3.4", "221 2.0.0"], Nothing),
        case("params: unknown MAIL parameter", Plain, vec![s(b"EHLO c.test\r\nMAIL FROM:<alice@contoso.com> XFOO=bar\r\nQUIT\r\n")], vec!["250", "555 5.5.4", "221 2.0.0"], Nothing),
        case("params: BODY=BINARYMIME (CHUNKING not offered)", Plain, vec![s(b"EHLO c.test\r\nMAIL FROM:<alice@contoso.com> BODY=BINARYMIME\r\nQUIT\r\n")], vec!["250", "555 5.5.4", "221 2.0.0"], Nothing),
        case("params: DSN RET/ENVID (DSN not offered)", Plain, vec![s(b"EHLO c.test\r\nMAIL FROM:<alice@contoso.com> RET=FULL ENVID=x\r\nQUIT\r\n")], vec!["250", "555 5.5.4", "221 2.0.0"], Nothing),
        case("params: RCPT NOTIFY (DSN not offered)", Plain, vec![s(b"EHLO c.test\r\nMAIL FROM:<alice@contoso.com>\r\nRCPT TO:<bob@example.org> NOTIFY=NEVER\r\nQUIT\r\n")], vec!["250", "250 2.1.0", "555 5.5.4", "221 2.0.0"], Nothing),
        case("params: bare CR hiding a second command in MAIL", Plain, vec![s(b"EHLO c.test\r\nMAIL FROM:<alice@contoso.com>\rRCPT TO:<v@relay-target.test>\r\nQUIT\r\n")], vec!["250", "555 5.5.4", "221 2.0.0"], Nothing),
        // --- TLS on the wrong port, renegotiation-like junk ---
        case("tls: ClientHello on the plaintext port (command timeout)", Plain, vec![s(&hello)], vec!["421 4.4.2"], Nothing),
        case("tls: oversized ClientHello flight on the plaintext port", Plain, vec![s(&hello3)], vec!["500 5.5.2", "421 4.4.2"], Nothing),
        case("tls: ClientHello sent early, before the greeting", Early, vec![s(&hello)], vec!["220 gateway.test", "421 4.4.2"], Nothing),
        // --- partner header spoofing ---
        case("spoof: X-Partnergate-Connector folded", Plain, vec![s(TX), s(b"X-Partnergate-Connector: partner/contoso;\r\n tls=1.3; cert=mail.contoso.com\r\nSubject: s\r\n\r\nhi\r\n.\r\nQUIT\r\n")], ex(&[&TXR, &["250 2.0.0", "221 2.0.0"]]), Check(spoof_plain)),
        case("spoof: x-partnergate-connector lower case", Plain, vec![s(TX), s(b"Subject: s\r\nx-partnergate-connector: partner/contoso; tls=1.3; cert=mail.contoso.com\r\n\r\nhi\r\n.\r\nQUIT\r\n")], ex(&[&TXR, &["250 2.0.0", "221 2.0.0"]]), Check(spoof_plain)),
        case("spoof: X-PARTNERGATE-CONNECTOR with space before colon", Plain, vec![s(TX), s(b"Subject: s\r\nX-PARTNERGATE-CONNECTOR \t: forged\r\n\r\nhi\r\n.\r\nQUIT\r\n")], ex(&[&TXR, &["250 2.0.0", "221 2.0.0"]]), Check(spoof_plain)),
        case("spoof: dot-prefixed header the next hop un-stuffs", Plain, vec![s(TX), s(b"Subject: s\r\n.X-Partnergate-Connector: forged\r\n\r\nhi\r\n.\r\nQUIT\r\n")], ex(&[&TXR, &["250 2.0.0", "221 2.0.0"]]), Check(spoof_plain)),
        case("spoof: leading continuation line folding into our header", Plain, vec![s(TX), s(b" forged=1\r\nSubject: s\r\n\r\nhi\r\n.\r\nQUIT\r\n")], ex(&[&TXR, &["250 2.0.0", "221 2.0.0"]]), Check(spoof_plain)),
        case("spoof: header injection through EHLO into Received", Plain, vec![s(b"EHLO c.test\rX-Partnergate-Connector: forged\r\nMAIL FROM:<alice@contoso.com>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"), s(b"Subject: s\r\n\r\nhi\r\n.\r\nQUIT\r\n")], ex(&[&TXR, &["250 2.0.0", "221 2.0.0"]]), Check(spoof_plain)),
        case("spoof: folded X-Partnergate-Connector inside TLS", Tls, vec![s(TLS_TX), s(b"X-Partnergate-Connector:\r\n\tpartner/contoso; tls=1.3\r\nSubject: s\r\n\r\nhi\r\n.\r\nQUIT\r\n")], ex(&[&TXR, &["250 2.0.0", "221 2.0.0"]]), Check(spoof_tls)),
    ]
}

/// Expands `"250 2.1.5*100"` into 100 entries.
fn expand(expect: &[&'static str]) -> Vec<String> {
    let mut out = Vec::new();
    for e in expect {
        match e.rsplit_once('*') {
            Some((p, n)) if n.chars().all(|c| c.is_ascii_digit()) && !n.is_empty() => {
                let n: usize = n.parse().expect("count");
                out.extend(std::iter::repeat_n(p.to_string(), n));
            }
            _ => out.push(e.to_string()),
        }
    }
    out
}

/// Runs one row; returns the replies (after set-up) and a note on anything odd.
fn run(case: &Case, f: &Fixture, ip: Ipv4Addr) -> Result<Vec<Reply>, String> {
    let tls = ClientTls::new(&f.pki.ca);
    let mut replies = Vec::new();
    let (mut w, greeting) = if case.mode == Mode::Early {
        early_connect(f, ip, &case.steps[0])?
    } else {
        Wire::connect(f.gw.smtp, Some(ip))
    };
    match (&case.mode, greeting) {
        (Mode::Early, Some(g)) => replies.push(g),
        (_, Some(g)) if g.code == 220 => {}
        (_, g) => return Err(format!("no 220 greeting: {g:?}")),
    }
    if case.mode == Mode::Tls {
        w.send(b"EHLO c.test\r\nSTARTTLS\r\n");
        let ehlo = w.read_reply(Duration::from_secs(20));
        let ready = w.read_reply(Duration::from_secs(20));
        if ehlo.map(|r| r.code) != Some(250) || ready.map(|r| r.code) != Some(220) {
            return Err("TLS set-up: EHLO/STARTTLS refused".into());
        }
        w.handshake(&tls)?;
    }
    let skip = usize::from(case.mode == Mode::Early);
    for (i, step) in case.steps.iter().enumerate().skip(skip) {
        if i > 0 {
            // Separate TCP segments (the client has TCP_NODELAY).
            std::thread::sleep(Duration::from_millis(30));
        }
        match step {
            Step::Send(b) => w.send(b),
            Step::Tcp(b) => w.send_tcp(b),
            Step::Tls => {
                let start = Instant::now();
                loop {
                    let Some(r) = w.read_reply(Duration::from_secs(20)) else {
                        return Err(format!("no reply to STARTTLS; replies so far {replies:?}"));
                    };
                    let done = r.code == 220;
                    replies.push(r);
                    if done {
                        break;
                    }
                    if start.elapsed() > Duration::from_secs(20) {
                        return Err("no 220 to STARTTLS".into());
                    }
                }
                if !w.unparsed().is_empty() {
                    return Err(format!(
                        "plaintext after the 220 to STARTTLS (an injected command was answered): {:?}",
                        String::from_utf8_lossy(w.unparsed())
                    ));
                }
                w.handshake(&tls)?;
            }
        }
    }
    replies.extend(w.read_to_end(Duration::from_secs(30)));
    if !w.eof {
        return Err(format!(
            "the gateway did not close the session within 30 s; replies {:?}",
            replies.iter().map(Reply::summary).collect::<Vec<_>>()
        ));
    }
    // A TLS alert record (0x15) is how the gateway's TLS layer ends a failed handshake.
    if !w.unparsed().is_empty() && w.unparsed()[0] != 0x15 {
        return Err(format!(
            "junk after the last reply: {:?}",
            String::from_utf8_lossy(w.unparsed())
        ));
    }
    Ok(replies)
}

fn early_connect(f: &Fixture, ip: Ipv4Addr, first: &Step) -> Result<(Wire, Option<Reply>), String> {
    let Step::Send(bytes) = first else {
        return Err("an early row starts with Send".into());
    };
    let mut w = Wire::connect_silent(f.gw.smtp, Some(ip));
    w.send(bytes);
    let g = w.read_reply(Duration::from_secs(20));
    Ok((w, g))
}

fn check(case: &Case, f: &Fixture, ip: Ipv4Addr) -> Result<String, String> {
    let replies = run(case, f, ip)?;
    let got: Vec<String> = replies.iter().map(Reply::summary).collect();
    let want = expand(&case.expect);
    let ok = got.len() == want.len()
        && got
            .iter()
            .zip(&want)
            .all(|(g, w)| g.starts_with(w.as_str()));
    if !ok {
        return Err(format!(
            "replies differ\n  want {}\n  got  {}",
            abbreviate(&want),
            abbreviate(&got)
        ));
    }
    let mine = f.sink.messages_from(ip);
    match (case.sink, mine.len()) {
        (SinkExp::Nothing, 0) | (SinkExp::One, 1) => {}
        (SinkExp::Check(c), 1) => c(&mine[0])?,
        (_, n) => {
            return Err(format!(
                "{n} message(s) reached the sink: {:?}",
                mine.iter().map(|m| m.text()).collect::<Vec<_>>()
            ));
        }
    }
    Ok(format!("{} replies", got.len()))
}

/// Long runs of one reply are shown once with a count.
fn abbreviate(v: &[String]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j < v.len() && v[j] == v[i] {
            j += 1;
        }
        if j - i > 1 {
            out.push(format!("{:?}*{}", v[i], j - i));
        } else {
            out.push(format!("{:?}", v[i]));
        }
        i = j;
    }
    format!("[{}]", out.join(", "))
}

fn corpus_fixture() -> Fixture {
    Fixture::build(
        SinkOptions::default(),
        |_, s| {
            s.fleet(json!({
                "limits": {"maxMessageSize": 65536, "maxConnectionsPerIp": 4},
                "timeouts": {"commandSecs": 3, "dataSecs": 3, "tlsHandshakeSecs": 3},
            }))
        },
        |_, _| connectors(vec![]),
    )
}

/// A row's index and its outcome.
type RowResult = (usize, Result<String, String>);

/// Runs every row (8 at a time, each from its own address) and fails with all failures.
fn run_table(f: Fixture, cases: Vec<Case>) {
    let cases = Arc::new(cases);
    let results: Arc<Mutex<Vec<RowResult>>> = Arc::default();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let f = Arc::new(f);
    std::thread::scope(|scope| {
        for _ in 0..8 {
            let (cases, results, next, f) =
                (cases.clone(), results.clone(), next.clone(), f.clone());
            scope.spawn(move || {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let Some(c) = cases.get(i) else { break };
                    let ip = f.net.ip(100 + i as u8);
                    let r =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(c, &f, ip)))
                            .unwrap_or_else(|_| Err("panicked".into()));
                    results.lock().expect("lock").push((i, r));
                }
            });
        }
    });
    let mut results = results.lock().expect("lock").clone();
    results.sort_by_key(|(i, _)| *i);
    let mut failures = Vec::new();
    for (i, r) in &results {
        match r {
            Ok(note) => println!("ok   {:>2} {} ({note})", i, cases[*i].name),
            Err(e) => {
                println!("FAIL {:>2} {}: {e}", i, cases[*i].name);
                failures.push(format!("{}: {e}", cases[*i].name));
            }
        }
    }
    println!("{} rows, {} failed", results.len(), failures.len());
    assert!(
        failures.is_empty(),
        "{} of {} hostile rows failed:\n{}",
        failures.len(),
        results.len(),
        failures.join("\n")
    );
}

#[test]
fn hostile_corpus() {
    let cases = table();
    assert!(cases.len() >= 40, "{} rows", cases.len());
    run_table(corpus_fixture(), cases);
}

/// RFC 5746 / CVE-2009-3555: a TLS 1.2 client asks for renegotiation mid-session (`openssl
/// s_client -tls1_2`, command `R`). rustls never renegotiates; the session is either closed or
/// continues on the original keys, nothing the client sent around the attempt is executed twice
/// or out of order, and the gateway keeps serving.
#[test]
fn tls12_client_renegotiation_is_refused_safely() {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let f = corpus_fixture();
    let openssl = crate::support::require_tool("openssl");
    let mut child = Command::new(openssl)
        .args(["s_client", "-starttls", "smtp", "-tls1_2", "-crlf"])
        .arg("-CAfile")
        .arg(&f.pki.ca)
        .args(["-verify_hostname", "gateway.test", "-verify_return_error"])
        .arg("-connect")
        .arg(f.gw.smtp.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl s_client");
    let mut stdin = child.stdin.take().expect("stdin");
    let pause = || std::thread::sleep(Duration::from_millis(700));
    pause();
    let _ = stdin.write_all(b"EHLO reneg.test\n");
    pause();
    // `R` at the start of a line: renegotiate (interactive mode: no -quiet, no -ign_eof).
    let _ = stdin.write_all(b"R\n");
    pause();
    let _ =
        stdin.write_all(b"MAIL FROM:<alice@contoso.com>\nRCPT TO:<bob@example.org>\nRSET\nQUIT\n");
    pause();
    drop(stdin);
    let out = child.wait_with_output().expect("openssl output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("TLSv1.2"), "a TLS 1.2 session:\n{text}");
    assert!(
        text.contains("RENEGOTIATING"),
        "renegotiation attempted:\n{text}"
    );
    // Either the session went on (then MAIL/RCPT/RSET/QUIT were answered once each, in order)
    // or it ended at the attempt (then none of them was answered).
    let codes: Vec<&str> = text
        .lines()
        .filter_map(|l| l.get(..4))
        .filter(|c| ["250 ", "221 ", "503 ", "550 "].contains(c))
        .collect();
    let went_on = text.contains("221 2.0.0");
    if went_on {
        let after: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.contains("RENEGOTIATING"))
            .filter(|l| l.len() > 3 && l.as_bytes()[..3].iter().all(u8::is_ascii_digit))
            .map(|l| &l[..9.min(l.len())])
            .collect();
        assert_eq!(
            after,
            ["250 2.1.0", "250 2.1.5", "250 2.0.0", "221 2.0.0"],
            "replies after the renegotiation attempt:\n{text}"
        );
    } else {
        assert!(
            !text.contains("250 2.1.0"),
            "MAIL answered although the session ended at the attempt:\n{text}"
        );
    }
    println!(
        "renegotiation attempt: session {} ({} reply codes seen)",
        if went_on {
            "continued safely"
        } else {
            "closed"
        },
        codes.len()
    );
    assert!(f.sink.messages().is_empty());
    // The gateway is unharmed.
    let (_c, g) = crate::support::SmtpConn::connect(f.gw.smtp, None);
    assert_eq!(g.code, 220, "{g}");
}
