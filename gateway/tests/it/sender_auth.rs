//! Sender authentication (issue 16) against real parts: SPF, DKIM and DMARC records served by
//! a real authoritative DNS server (Knot, support::dns) on the test's loopback block, mail
//! signed by a real signer (dkimpy's `dkimsign`), the real gateway binary with
//! `dnsResolver` pointed at that server, and a recording sink as the organisation's server.
//! Each case asserts the reply, what the sink received (Authentication-Results,
//! X-Partnergate-Connector) and the `partnergate_sender_auth_total` series.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::dns::{DnsServer, Zone};
use crate::support::opendkim::OpenDkim;
use crate::support::postfix::PostfixOptions;
use crate::support::wire::Wire;
use crate::support::{
    Fixture, Postfix, Recorded, Reply, SinkOptions, connector_header, connectors, inbound,
    require_tool,
};

const WAIT: Duration = Duration::from_secs(30);

/// An RSA key for `sel._domainkey.<domain>`: the PEM file dkimsign reads and the TXT record.
struct DkimKey {
    pem: PathBuf,
    record: String,
}

fn dkim_key(dir: &Path, name: &str) -> DkimKey {
    let pem = dir.join(format!("{name}.pem"));
    let ok = Command::new(require_tool("openssl"))
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&pem)
        .stderr(Stdio::null())
        .status()
        .expect("openssl genpkey");
    assert!(ok.success());
    let der = Command::new("openssl")
        .args(["pkey", "-pubout", "-outform", "DER", "-in"])
        .arg(&pem)
        .output()
        .expect("openssl pkey");
    let b64 = base64(&der.stdout);
    // TXT strings are at most 255 octets: split the key.
    let chunks: Vec<String> = format!("v=DKIM1; k=rsa; p={b64}")
        .as_bytes()
        .chunks(200)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect();
    DkimKey {
        pem,
        record: format!("sel._domainkey TXT {}", chunks.join(" ")),
    }
}

fn base64(bytes: &[u8]) -> String {
    let mut child = Command::new("openssl")
        .args(["base64", "-A"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("openssl base64");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(bytes)
        .expect("write");
    let out = child.wait_with_output().expect("base64 output");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// dkimpy's `dkimsign`: the signed message (DKIM-Signature prepended), relaxed/relaxed.
fn sign(message: &[u8], domain: &str, key: &DkimKey) -> Vec<u8> {
    let mut child = Command::new(require_tool("dkimsign"))
        .args(["--hcanon", "relaxed", "--bcanon", "relaxed", "sel", domain])
        .arg(&key.pem)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run dkimsign");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = message.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().expect("dkimsign output");
    writer.join().expect("join").expect("write to dkimsign");
    assert!(out.status.success(), "dkimsign failed");
    assert!(out.stdout.starts_with(b"DKIM-Signature:"), "not signed");
    // dkimsign folds with bare LF: the wire needs CRLF.
    let mut crlf = Vec::with_capacity(out.stdout.len() + 64);
    let mut prev = 0u8;
    for &b in &out.stdout {
        if b == b'\n' && prev != b'\r' {
            crlf.push(b'\r');
        }
        crlf.push(b);
        prev = b;
    }
    crlf
}

fn message(from: &str, subject: &str, body: &str) -> Vec<u8> {
    format!(
        "From: <{from}>\r\nTo: <bob@example.org>\r\nSubject: {subject}\r\nMessage-ID: <{subject}@t>\r\n\r\n{body}"
    )
    .into_bytes()
}

/// The world of one test: DNS zones, keys, the gateway (fleet `patch`) and the sink.
struct World {
    f: Fixture,
    _dns: DnsServer,
    _dir: tempfile::TempDir,
    contoso: DkimKey,
    other: DkimKey,
    /// The client address SPF authorizes; `client(1)` is not authorized.
    good: Ipv4Addr,
    bad: Ipv4Addr,
}

fn world(fleet: Value, inbound_connectors: Vec<Value>) -> World {
    let dir = tempfile::tempdir().expect("tempdir");
    let contoso = dkim_key(dir.path(), "contoso");
    let other = dkim_key(dir.path(), "other");
    let mut dns_addr = None;
    let mut keep = None;
    let f = Fixture::build(
        SinkOptions::default(),
        |net, s| {
            let good = net.client(0);
            let c_spf = format!("@ TXT \"v=spf1 ip4:{good} -all\"");
            let s_spf = format!("@ TXT \"v=spf1 ip4:{good} ~all\"");
            let dns = DnsServer::start(
                net.ip(53),
                vec![
                    Zone::unsigned(
                        "contoso.test",
                        &[&c_spf, &contoso.record, "_dmarc TXT \"v=DMARC1; p=reject\""],
                    ),
                    Zone::unsigned("other.test", &[&c_spf, &other.record]),
                    Zone::unsigned("soft.test", &[&s_spf]),
                    // A domain anyone could register: SPF, a DKIM key and a DMARC record of
                    // its own, so its mail passes DMARC for itself.
                    Zone::unsigned(
                        "attacker.test",
                        &[&c_spf, &other.record, "_dmarc TXT \"v=DMARC1; p=none\""],
                    ),
                    Zone::servfail("temp.test"),
                ],
            );
            dns_addr = Some(dns.addr);
            keep = Some(dns);
            let mut patch = json!({"dnsResolver": dns_addr.map(|a| a.to_string())});
            crate::support::merge_json(&mut patch, &fleet);
            s.fleet(patch)
        },
        |_, _| connectors(inbound_connectors),
    );
    let good = f.net.client(0);
    let bad = f.net.client(1);
    World {
        f,
        _dns: keep.expect("dns started"),
        _dir: dir,
        contoso,
        other,
        good,
        bad,
    }
}

/// A partner connector for `domains` requiring `auth`, plaintext allowed (the client is Wire).
fn partner(name: &str, domains: &[&str], auth: &str) -> Value {
    inbound(
        name,
        domains,
        json!({"requireTls": false, "senderAuthentication": auth}),
    )
}

/// What one transaction got: the reply to MAIL FROM and, if it went on, to the final dot.
struct Outcome {
    mail: Option<Reply>,
    end: Option<Reply>,
}

impl World {
    fn send(&self, client: Ipv4Addr, mail_from: &str, data: &[u8]) -> Outcome {
        let (mut w, g) = Wire::connect(self.f.gw.smtp, Some(client));
        assert_eq!(g.map(|g| g.code), Some(220));
        w.send(b"EHLO partner.test\r\n");
        assert_eq!(w.read_reply(WAIT).map(|r| r.code), Some(250));
        w.send(format!("MAIL FROM:<{mail_from}>\r\n").as_bytes());
        let mail = w.read_reply(WAIT);
        if mail.as_ref().map(|r| r.code) != Some(250) {
            return Outcome { mail, end: None };
        }
        w.send(b"RCPT TO:<bob@example.org>\r\nDATA\r\n");
        assert_eq!(w.read_reply(WAIT).map(|r| r.code), Some(250));
        assert_eq!(w.read_reply(WAIT).map(|r| r.code), Some(354));
        let mut wire = Vec::with_capacity(data.len() + 1024);
        for line in data.split_inclusive(|b| *b == b'\n') {
            if line.starts_with(b".") {
                wire.push(b'.');
            }
            wire.extend_from_slice(line);
        }
        if !wire.ends_with(b"\r\n") {
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(b".\r\n");
        w.send(&wire);
        let end = w.read_reply(Duration::from_secs(120));
        w.send(b"QUIT\r\n");
        Outcome { mail, end }
    }

    fn metric(&self, connector: &str, mechanism: &str, result: &str) -> u64 {
        let (_, body) = self.f.gw.get("/metrics");
        let series = format!(
            "partnergate_sender_auth_total{{connector=\"{connector}\",mechanism=\"{mechanism}\",result=\"{result}\"}} "
        );
        body.lines()
            .find_map(|l| l.strip_prefix(&series))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The single message the sink got.
    fn delivered(&self) -> Recorded {
        let m = self.f.sink.wait_messages(1);
        assert_eq!(m.len(), 1, "expected one message at the sink");
        m[0].clone()
    }
}

#[track_caller]
fn assert_code(r: &Option<Reply>, expected: &str) {
    let got = r.as_ref().map(|r| r.summary()).unwrap_or_default();
    assert!(
        got.starts_with(expected),
        "expected {expected}, got {got:?}"
    );
}

/// Our Authentication-Results (authserv-id = the fleet hostname `gateway.test`).
#[track_caller]
fn our_auth_results(m: &Recorded) -> String {
    let ours: Vec<String> = m
        .header_values("Authentication-Results")
        .into_iter()
        .filter(|v| v.starts_with("gateway.test"))
        .collect();
    assert_eq!(
        ours.len(),
        1,
        "expected our one A-R header in:\n{}",
        m.headers()
    );
    ours[0].clone()
}

#[test]
fn spf_pass_fail_softfail_temperror_at_mail_from() {
    let w = world(
        json!({}),
        vec![partner(
            "mail/contoso",
            &["contoso.test", "soft.test", "temp.test"],
            "SPF",
        )],
    );
    let body = message("a@contoso.test", "spf", "hello\r\n");
    // pass: the client address is in contoso.test's SPF record.
    let o = w.send(w.good, "a@contoso.test", &body);
    assert_code(&o.mail, "250");
    assert_code(&o.end, "250");
    let m = w.delivered();
    let ar = our_auth_results(&m);
    assert!(
        ar.contains("spf=pass") && ar.contains("smtp.mailfrom=a@contoso.test"),
        "{ar}"
    );
    assert!(
        connector_header(&m).contains("auth=spf:pass"),
        "{}",
        connector_header(&m)
    );
    assert_eq!(w.metric("mail/contoso", "spf", "pass"), 1);
    // fail (-all), softfail (~all): refused at MAIL FROM when SPF is required.
    assert_code(&w.send(w.bad, "a@contoso.test", &body).mail, "550 5.7.23");
    assert_eq!(w.metric("mail/contoso", "spf", "fail"), 1);
    assert_code(&w.send(w.bad, "a@soft.test", &body).mail, "550 5.7.23");
    assert_eq!(w.metric("mail/contoso", "spf", "softfail"), 1);
    // temperror (the zone answers SERVFAIL): 451, never a pass.
    assert_code(&w.send(w.good, "a@temp.test", &body).mail, "451 4.7.24");
    assert_eq!(w.metric("mail/contoso", "spf", "temperror"), 1);
    assert_eq!(w.f.sink.messages().len(), 1, "nothing else relayed");
    let log = w.f.gw.wait_log(&["\"auth\":\"spf:fail\""]);
    assert!(log.contains("\"rule\":\"spf\""), "{log}");
}

#[test]
fn dkim_pass_and_a_message_altered_after_signing_is_not_relayed() {
    let w = world(
        json!({}),
        vec![partner(
            "mail/contoso",
            &["contoso.test", "temp.test"],
            "DKIM",
        )],
    );
    let signed = sign(
        &message("a@contoso.test", "dkim", "signed body\r\nline two\r\n"),
        "contoso.test",
        &w.contoso,
    );
    // The client is not in SPF: DKIM alone is asked for.
    let o = w.send(w.bad, "a@contoso.test", &signed);
    assert_code(&o.end, "250");
    let m = w.delivered();
    let ar = our_auth_results(&m);
    assert!(
        ar.contains("dkim=pass") && ar.contains("contoso.test header.s=sel"),
        "{ar}"
    );
    assert!(connector_header(&m).contains("auth=dkim:pass"));
    assert_eq!(w.metric("mail/contoso", "dkim", "pass"), 1);

    // Body modified after signing: the header signature verifies (stamped pass before the
    // body), the body hash does not: no final dot at the sink, 550 5.7.1.
    let mut body_changed = signed.clone();
    let at = body_changed.len() - b"line two\r\n".len();
    body_changed.splice(at..at + 4, b"LINE".iter().copied());
    let o = w.send(w.bad, "a@contoso.test", &body_changed);
    assert_code(&o.end, "550 5.7.1");
    assert_eq!(w.metric("mail/contoso", "dkim", "fail"), 1);
    let log = w.f.gw.wait_log(&["\"rule\":\"dkimBodyHash\""]);
    assert!(log.contains("\"auth\":\"dkim:fail\""), "{log}");

    // Header modified after signing (Subject is signed): 550 5.7.1 before the body.
    let text = String::from_utf8(signed.clone()).expect("utf-8");
    let header_changed = text.replace("Subject: dkim", "Subject: DKIM!").into_bytes();
    let o = w.send(w.bad, "a@contoso.test", &header_changed);
    assert_code(&o.end, "550 5.7.1");
    assert_eq!(w.metric("mail/contoso", "dkim", "fail"), 2);
    // The signer's key cannot be looked up (its zone answers SERVFAIL): 451, never a pass.
    let temp = sign(
        &message("a@temp.test", "t", "x\r\n"),
        "temp.test",
        &w.contoso,
    );
    assert_code(&w.send(w.bad, "a@temp.test", &temp).end, "451 4.7.5");
    assert_eq!(w.metric("mail/contoso", "dkim", "temperror"), 1);
    // Each refusal was decided (and the next hop's transaction dropped without its final
    // dot) before the client got its reply, so nothing more can reach the sink.
    assert_eq!(
        w.f.sink.messages().len(),
        1,
        "only the intact message was relayed"
    );
}

/// The partner's real MTA: Postfix relaying to the gateway through an OpenDKIM milter that
/// signs for contoso.test. The client address is not in SPF, so DMARC passes on the DKIM
/// signature alone.
#[test]
fn postfix_with_opendkim_as_the_partner_mta_passes_dmarc_by_dkim() {
    let w = world(
        json!({}),
        vec![partner("mail/contoso", &["contoso.test"], "DMARC")],
    );
    let milter = OpenDkim::start(w.f.net.ip(30), "contoso.test", "sel", &w.contoso.pem);
    let mut opts = PostfixOptions::new(w.bad, w.f.gw.smtp);
    opts.tls_level = "may".into();
    opts.milter = Some(milter.addr);
    let pf = Postfix::start(opts);
    let id = pf.submit(
        "a@contoso.test",
        "bob@example.org",
        "From: <a@contoso.test>\r\nTo: <bob@example.org>\r\nSubject: via postfix\r\n\r\nsigned by opendkim\r\n",
    );
    let d = pf.wait_delivery(&id, "bob@example.org");
    assert_eq!(d.status, "sent", "{}\n{}", d.line, milter.output());
    let m = w.delivered();
    assert!(
        m.header_values("DKIM-Signature")
            .iter()
            .any(|v| v.contains("d=contoso.test")),
        "not signed by OpenDKIM:\n{}",
        m.headers()
    );
    let ar = our_auth_results(&m);
    assert!(
        ar.contains("spf=fail") && ar.contains("dkim=pass") && ar.contains("dmarc=pass"),
        "{ar}"
    );
    assert!(connector_header(&m).contains("auth=dmarc:pass"));
    assert_eq!(w.metric("mail/contoso", "dmarc", "pass"), 1);
    assert_eq!(w.metric("mail/contoso", "spf", "fail"), 1);
}

#[test]
fn dmarc_aligned_via_spf_via_dkim_and_unaligned() {
    let w = world(
        json!({}),
        vec![partner(
            "mail/partner",
            &["contoso.test", "other.test"],
            "DMARC",
        )],
    );
    // Aligned via SPF only: unsigned, MAIL FROM contoso.test from an SPF-authorized address.
    let o = w.send(
        w.good,
        "a@contoso.test",
        &message("a@contoso.test", "viaspf", "x\r\n"),
    );
    assert_code(&o.end, "250");
    let ar = our_auth_results(&w.delivered());
    assert!(
        ar.contains("spf=pass") && ar.contains("dkim=none") && ar.contains("dmarc=pass"),
        "{ar}"
    );
    // Aligned via DKIM only: the envelope is other.test (SPF passes, not aligned with From:
    // contoso.test), the signature is contoso.test's.
    let signed = sign(
        &message("a@contoso.test", "viadkim", "y\r\n"),
        "contoso.test",
        &w.contoso,
    );
    let o = w.send(w.good, "bounce@other.test", &signed);
    assert_code(&o.end, "250");
    let msgs = w.f.sink.wait_messages(2);
    let ar = our_auth_results(&msgs[1]);
    assert!(
        ar.contains("dkim=pass") && ar.contains("dmarc=pass"),
        "{ar}"
    );
    assert!(connector_header(&msgs[1]).contains("auth=dmarc:pass"));
    // Unaligned: SPF passes for other.test and other.test signs, From: is contoso.test.
    let signed = sign(
        &message("a@contoso.test", "unaligned", "z\r\n"),
        "other.test",
        &w.other,
    );
    let o = w.send(w.good, "bounce@other.test", &signed);
    assert_code(&o.end, "550 5.7.26");
    assert_eq!(w.metric("mail/partner", "dmarc", "pass"), 2);
    assert_eq!(w.metric("mail/partner", "dmarc", "fail"), 1);
    w.f.gw
        .wait_log(&["\"rule\":\"dmarc\"", "\"outcome\":\"rejected\""]);
    // Refused before the reply, without a final dot at the next hop: nothing more arrives.
    assert_eq!(w.f.sink.messages().len(), 2);
}

#[test]
fn unclaimed_mail_enforces_p_reject_and_forged_authentication_results_are_stripped() {
    let w = world(
        json!({"unclaimedSenderAuthentication": "EnforceDmarcReject"}),
        vec![],
    );
    // contoso.test publishes p=reject; other.test (the envelope) is not aligned: refused.
    let o = w.send(
        w.good,
        "bounce@other.test",
        &message("a@contoso.test", "spoof", "x\r\n"),
    );
    assert_code(&o.end, "550 5.7.26");
    assert_eq!(w.metric("none", "dmarc", "fail"), 1);
    // other.test publishes no DMARC: stamped only. The client's own Authentication-Results
    // claiming our authserv-id are removed; another host's are kept.
    let forged = b"Authentication-Results: gateway.test; dmarc=pass header.from=other.test\r\nAuthentication-Results: (c) GATEWAY.TEST;\r\n\tdkim=pass\r\nAuthentication-Results: mx.elsewhere.test; spf=pass\r\nFrom: <a@other.test>\r\nSubject: forged\r\n\r\nbody\r\n";
    let o = w.send(w.good, "a@other.test", forged);
    assert_code(&o.end, "250");
    let m = w.delivered();
    let all = m.header_values("Authentication-Results");
    assert_eq!(all.len(), 2, "ours and mx.elsewhere.test's: {all:?}");
    let ours = our_auth_results(&m);
    assert!(
        ours.contains("dmarc=none") && ours.contains("spf=pass"),
        "{ours}"
    );
    assert!(all.iter().any(|v| v.starts_with("mx.elsewhere.test")));
    assert!(connector_header(&m).contains("auth=dmarc:none"));
    assert_eq!(w.metric("none", "dmarc", "none"), 1);
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

/// A 20 MiB signed message is verified while it streams: the gateway's peak RSS grows by far
/// less than the message (it is never held whole).
#[test]
fn twenty_mib_signed_message_streams_with_bounded_memory() {
    let w = world(
        json!({}),
        vec![partner("mail/contoso", &["contoso.test"], "DKIM")],
    );
    let line = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\r\n";
    let body = line.repeat(20 * 1024 * 1024 / line.len());
    let signed = sign(
        &message("a@contoso.test", "big", &body),
        "contoso.test",
        &w.contoso,
    );
    // Warm up (first session, resolver, TLS-free path) so the figure is the message's.
    let small = sign(
        &message("a@contoso.test", "small", "x\r\n"),
        "contoso.test",
        &w.contoso,
    );
    assert_code(&w.send(w.bad, "a@contoso.test", &small).end, "250");
    let before = vm_hwm_kib(w.f.gw.pid());
    let o = w.send(w.bad, "a@contoso.test", &signed);
    assert_code(&o.end, "250");
    let after = vm_hwm_kib(w.f.gw.pid());
    let msgs = w.f.sink.wait_messages(2);
    let ar = our_auth_results(&msgs[1]);
    assert!(ar.contains("dkim=pass"), "{ar}");
    assert!(msgs[1].data.len() > 20 * 1000 * 1000);
    eprintln!(
        "20 MiB signed message: gateway VmHWM {before} KiB before, {after} KiB after (+{} KiB)",
        after.saturating_sub(before)
    );
    // Generous: buffering the message whole would add at least its 20 MiB.
    assert!(
        after.saturating_sub(before) < 10 * 1024,
        "peak RSS grew by {} KiB for a 20 MiB message",
        after - before
    );
    assert_eq!(w.metric("mail/contoso", "dkim", "pass"), 2);
}

/// A header section over `limits.maxHeaderSize` is not held whole: it is streamed on, DKIM and
/// DMARC evaluate to `permerror`, and the message (unclaimed, `Stamp`) is still delivered
/// intact; where DKIM is required it is refused.
#[test]
fn header_section_over_the_hold_limit_is_streamed_as_permerror() {
    let w = world(
        json!({"unclaimedSenderAuthentication": "Stamp", "limits": {"maxHeaderSize": 1024}}),
        vec![partner("mail/contoso", &["contoso.test"], "DKIM")],
    );
    let padding: String = (0..40)
        .map(|i| format!("X-Pad-{i}: {}\r\n", "p".repeat(60)))
        .collect();
    let big = format!("{padding}From: <a@other.test>\r\nSubject: big\r\n\r\nbody line\r\n");
    let o = w.send(w.good, "a@other.test", big.as_bytes());
    assert_code(&o.end, "250");
    let m = w.delivered();
    let ar = our_auth_results(&m);
    assert!(
        ar.contains("dkim=permerror") && ar.contains("dmarc=permerror"),
        "{ar}"
    );
    assert!(m.text().ends_with("\r\n\r\nbody line\r\n"), "body intact");
    assert_eq!(m.header_values("X-Pad-39").len(), 1, "every header relayed");
    // Required DKIM cannot pass on a header section that was not evaluated.
    let signed = sign(
        &format!("{padding}From: <a@contoso.test>\r\nSubject: big\r\n\r\nx\r\n").into_bytes(),
        "contoso.test",
        &w.contoso,
    );
    assert_code(&w.send(w.good, "a@contoso.test", &signed).end, "550 5.7.1");
    assert_eq!(w.metric("none", "dkim", "permerror"), 1);
}

/// The DKIM-Signature field(s) a signed message starts with.
fn signature_fields(signed: &[u8]) -> Vec<u8> {
    let text = String::from_utf8(signed.to_vec()).expect("utf-8");
    let at = text.find("\r\nFrom:").expect("From: after the signature") + 2;
    signed[..at].to_vec()
}

/// Inserts `line` just before the empty line that ends the header section.
fn before_empty_line(msg: &[u8], line: &str) -> Vec<u8> {
    let text = String::from_utf8(msg.to_vec()).expect("utf-8");
    let at = text.find("\r\n\r\n").expect("empty line") + 2;
    format!("{}{line}{}", &text[..at], &text[at..]).into_bytes()
}

/// Regression (review finding 1): a line without a colon before the empty line ends
/// mail-auth's header section but not ours, so a replayed signed message with text injected
/// there kept `dkim=pass` while the next hop read the text as body (or as more headers).
/// Such a section is not evaluated: permerror, refused where DKIM is required.
#[test]
fn a_line_without_a_colon_in_the_header_section_is_not_stamped_pass() {
    let w = world(
        json!({"unclaimedSenderAuthentication": "Stamp"}),
        vec![partner("mail/contoso", &["contoso.test"], "DKIM")],
    );
    let signed = sign(
        &message("a@contoso.test", "replay", "original body\r\n"),
        "contoso.test",
        &w.contoso,
    );
    let injected = before_empty_line(&signed, "Pay invoice 42 to account 666 today\r\n");
    let o = w.send(w.bad, "a@contoso.test", &injected);
    assert_code(&o.end, "550 5.7.1");
    let log =
        w.f.gw
            .wait_log(&["\"rule\":\"dkim\"", "\"auth\":\"dkim:permerror\""]);
    assert!(log.contains("malformed header section"), "{log}");
    assert!(w.f.sink.messages().is_empty(), "nothing relayed");
    // Unclaimed (Stamp): delivered, stamped permerror, never pass.
    let other = sign(
        &message("a@other.test", "replay2", "original body\r\n"),
        "other.test",
        &w.other,
    );
    let injected = before_empty_line(&other, "injected text\r\n");
    assert_code(&w.send(w.good, "a@other.test", &injected).end, "250");
    let ar = our_auth_results(&w.delivered());
    assert!(
        ar.contains("dkim=permerror") && !ar.contains("dkim=pass"),
        "{ar}"
    );
}

/// Regression (review finding 2): `senderAuthentication: DMARC` was met by a DMARC pass of
/// any From: domain — an attacker's own domain, signed with its own key.
#[test]
fn dmarc_connector_refuses_a_pass_for_a_from_domain_outside_the_partners() {
    let w = world(
        json!({}),
        vec![partner("mail/contoso", &["contoso.test"], "DMARC")],
    );
    // MAIL FROM contoso.test (claims the connector, SPF passes but is not aligned with
    // From:), From: attacker.test signed by attacker.test: DMARC passes for attacker.test.
    let signed = sign(
        &message("ceo@attacker.test", "spoof", "x\r\n"),
        "attacker.test",
        &w.other,
    );
    let o = w.send(w.good, "a@contoso.test", &signed);
    assert_code(&o.end, "550 5.7.26");
    let log = w.f.gw.wait_log(&["\"rule\":\"dmarcFromDomain\""]);
    assert!(log.contains("attacker.test"), "{log}");
    assert!(w.f.sink.messages().is_empty(), "nothing relayed");
    // The partner's own From: domain still passes.
    let signed = sign(
        &message("a@contoso.test", "own", "x\r\n"),
        "contoso.test",
        &w.contoso,
    );
    assert_code(&w.send(w.bad, "a@contoso.test", &signed).end, "250");
}

/// Regression (review finding 3): under `EnforceDmarcReject` a p=reject From: domain could be
/// dodged with a second From: field, a line parsers disagree on, or a header section over
/// `limits.maxHeaderSize`.
#[test]
fn unclaimed_p_reject_is_not_dodged_by_the_header_section_shape() {
    let w = world(
        json!({"unclaimedSenderAuthentication": "EnforceDmarcReject", "limits": {"maxHeaderSize": 1024}}),
        vec![],
    );
    let two_from = b"From: <ceo@contoso.test>\r\nFrom: <a@other.test>\r\nSubject: two\r\n\r\nx\r\n";
    assert_code(
        &w.send(w.good, "bounce@other.test", two_from).end,
        "550 5.7.26",
    );
    let hidden = b"Subject: hidden\r\nnot a header\r\nFrom: <ceo@contoso.test>\r\n\r\nx\r\n";
    assert_code(
        &w.send(w.good, "bounce@other.test", hidden).end,
        "550 5.7.26",
    );
    // Obsolete syntax (white space before the colon): a From: to readers, another field to
    // the DKIM/DMARC library.
    let obs = b"From : <ceo@contoso.test>\r\nSubject: obs\r\n\r\nx\r\n";
    assert_code(&w.send(w.good, "bounce@other.test", obs).end, "550 5.7.26");
    let no_address = b"From: ceo at contoso.test\r\nSubject: none\r\n\r\nx\r\n";
    assert_code(
        &w.send(w.good, "bounce@other.test", no_address).end,
        "550 5.7.26",
    );
    let padding: String = (0..20)
        .map(|i| format!("X-Pad-{i}: {}\r\n", "p".repeat(60)))
        .collect();
    let big = format!("{padding}From: <ceo@contoso.test>\r\nSubject: big\r\n\r\nx\r\n");
    assert_code(
        &w.send(w.good, "bounce@other.test", big.as_bytes()).end,
        "552 5.3.4",
    );
    w.f.gw.wait_log(&["\"rule\":\"dmarcReject\"", "552"]);
    assert!(w.f.sink.messages().is_empty(), "nothing relayed");
    // A well-formed message of a domain without p=reject still passes through.
    let ok = message("a@other.test", "fine", "x\r\n");
    assert_code(&w.send(w.good, "a@other.test", &ok).end, "250");
}

/// Regression (review finding 4): a stale signature (over an earlier body) above a current
/// one took the body-hash slot's claim: the current signature failed before the body and the
/// stale one, stamped pass, refused the message at the end — whatever the plan, Stamp too.
#[test]
fn a_stale_signature_neither_hides_a_current_one_nor_refuses_good_mail() {
    let w = world(
        json!({"unclaimedSenderAuthentication": "Stamp"}),
        vec![partner(
            "mail/partner",
            &["contoso.test", "soft.test"],
            "DMARC",
        )],
    );
    let stale = sign(
        &message("a@contoso.test", "stale", "first version\r\n"),
        "other.test",
        &w.other,
    );
    let stale_sig = signature_fields(&stale);
    let current = sign(
        &message("a@contoso.test", "stale", "edited version\r\n"),
        "contoso.test",
        &w.contoso,
    );
    let mut msg = stale_sig;
    msg.extend_from_slice(&current);
    // Required DMARC, SPF not aligned (soft.test): the current contoso signature decides.
    let o = w.send(w.good, "bounce@soft.test", &msg);
    assert_code(&o.end, "250");
    let m = w.delivered();
    let ar = our_auth_results(&m);
    let parts: Vec<&str> = ar.split(';').map(str::trim).collect();
    assert!(
        parts
            .iter()
            .any(|p| p.starts_with("dkim=pass") && p.contains("contoso.test header.s=sel")),
        "{ar}"
    );
    assert!(
        parts
            .iter()
            .any(|p| p.starts_with("dkim=neutral") && p.contains("other.test header.s=sel")),
        "the stale signature: {ar}"
    );
    assert!(ar.contains("dmarc=pass"), "{ar}");
    assert!(connector_header(&m).contains("auth=dmarc:pass"));
    // Unclaimed (Stamp): never refused; nothing before the body is stamped pass.
    let o = w.send(w.good, "bounce@other.test", &msg);
    assert_code(&o.end, "250");
    let msgs = w.f.sink.wait_messages(2);
    let ar = our_auth_results(&msgs[1]);
    assert!(
        !ar.contains("dkim=pass") && !ar.contains("dmarc=pass") && ar.contains("dkim=neutral"),
        "{ar}"
    );
    // Logged and counted: the final results, the body's verdict included.
    assert_eq!(w.metric("none", "dmarc", "pass"), 1);
    assert_eq!(
        w.metric("none", "dkim", "pass"),
        0,
        "other.test's signature broke"
    );
}

/// Regression (review finding 8): SPF that is only evaluated ran at every MAIL FROM, so a
/// client looping MAIL/RSET made the gateway query DNS per command. It now runs at DATA.
#[test]
fn spf_not_required_is_not_evaluated_per_mail_from() {
    let w = world(json!({"unclaimedSenderAuthentication": "Stamp"}), vec![]);
    let (mut c, g) = Wire::connect(w.f.gw.smtp, Some(w.good));
    assert_eq!(g.map(|g| g.code), Some(220));
    c.send(b"EHLO partner.test\r\n");
    assert_eq!(c.read_reply(WAIT).map(|r| r.code), Some(250));
    for _ in 0..5 {
        c.send(b"MAIL FROM:<a@other.test>\r\n");
        assert_eq!(c.read_reply(WAIT).map(|r| r.code), Some(250));
        c.send(b"RSET\r\n");
        assert_eq!(c.read_reply(WAIT).map(|r| r.code), Some(250));
    }
    c.send(b"QUIT\r\n");
    assert_eq!(c.read_reply(WAIT).map(|r| r.code), Some(221));
    // A transaction that reaches DATA is evaluated (once).
    let o = w.send(
        w.good,
        "a@other.test",
        &message("a@other.test", "s", "x\r\n"),
    );
    assert_code(&o.end, "250");
    assert!(our_auth_results(&w.delivered()).contains("spf=pass"));
    assert_eq!(w.metric("none", "spf", "pass"), 1);
}

/// An authoritative DNS server for `slow.test` that answers every query correctly but only
/// after `delay_ms` (python3, one thread per query): a slow server, not a dead one.
struct SlowDns {
    child: std::process::Child,
}

impl Drop for SlowDns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const SLOW_DNS: &str = r#"
import socket, struct, sys, threading, time
ip, delay, includes = sys.argv[1], float(sys.argv[2]) / 1000, int(sys.argv[3])
records = {"slow.test": "v=spf1 " + " ".join(f"include:i{n}.slow.test" for n in range(includes)) + " -all"}
for n in range(includes):
    records[f"i{n}.slow.test"] = "v=spf1 -all"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((ip, 53))
print("ready", flush=True)
def answer(q, peer):
    time.sleep(delay)
    i, labels = 12, []
    while q[i]:
        labels.append(q[i + 1:i + 1 + q[i]].decode().lower()); i += 1 + q[i]
    qtype = struct.unpack(">H", q[i + 1:i + 3])[0]
    question = q[12:i + 5]
    txt = records.get(".".join(labels))
    if txt is not None and qtype == 16:
        data = txt.encode()
        rdata = b"".join(bytes([len(data[k:k + 255])]) + data[k:k + 255] for k in range(0, len(data), 255))
        ans = b"\xc0\x0c" + struct.pack(">HHIH", 16, 1, 60, len(rdata)) + rdata
        head = struct.pack(">HHHHHH", struct.unpack(">H", q[:2])[0], 0x8580, 1, 1, 0, 0)
    else:
        rcode = 0 if txt is not None else 3
        ans = b""
        head = struct.pack(">HHHHHH", struct.unpack(">H", q[:2])[0], 0x8580 | rcode, 1, 0, 0, 0)
    s.sendto(head + question + ans, peer)
while True:
    q, peer = s.recvfrom(4096)
    threading.Thread(target=answer, args=(q, peer), daemon=True).start()
"#;

fn slow_dns(ip: Ipv4Addr, delay_ms: u64, includes: usize) -> SlowDns {
    use std::io::BufRead;
    let mut child = Command::new(require_tool("python3"))
        .args(["-c", SLOW_DNS])
        .arg(ip.to_string())
        .arg(delay_ms.to_string())
        .arg(includes.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("ready line");
    assert_eq!(line.trim(), "ready");
    SlowDns { child }
}

/// Regression (review finding 6): SPF had no deadline of its own, and `mail-auth` turns an
/// evaluation that takes 20 s into a `permerror` of its lookup limit — a slow DNS server
/// made required SPF refuse mail for good (`550 5.7.24`). Now the step ends at the deadline
/// (2 × the 3 s query timeout here) as `temperror`: `451 4.7.24`, the sender retries.
#[test]
fn slow_dns_gives_spf_temperror_not_permerror() {
    let mut dns = None;
    let f = Fixture::build(
        SinkOptions::default(),
        |net, s| {
            // 2.5 s per answer, 9 includes: every query answers within its 3 s timeout, the
            // whole evaluation takes 25 s.
            dns = Some(slow_dns(net.ip(53), 2500, 9));
            s.fleet(json!({
                "dnsResolver": net.ip(53).to_string(),
                "timeouts": {"nextHopSecs": 3}
            }))
        },
        |_, _| connectors(vec![partner("mail/slow", &["slow.test"], "SPF")]),
    );
    let _dns = dns.expect("dns started");
    let (mut w, g) = Wire::connect(f.gw.smtp, Some(f.net.client(0)));
    assert_eq!(g.map(|g| g.code), Some(220));
    w.send(b"EHLO partner.test\r\n");
    assert_eq!(w.read_reply(WAIT).map(|r| r.code), Some(250));
    w.send(b"MAIL FROM:<a@slow.test>\r\n");
    assert_code(&w.read_reply(Duration::from_secs(60)), "451 4.7.24");
    f.gw.wait_log(&["\"auth\":\"spf:temperror\""]);
}

/// Regression (review finding 10): a message refused because the body broke the DKIM pass
/// its DMARC pass rested on was logged and counted as `dmarc:pass`.
#[test]
fn dmarc_refused_for_a_broken_body_is_logged_and_counted_as_fail() {
    let w = world(
        json!({}),
        vec![partner("mail/contoso", &["contoso.test"], "DMARC")],
    );
    let signed = sign(
        &message("a@contoso.test", "broken", "signed body\r\n"),
        "contoso.test",
        &w.contoso,
    );
    let text = String::from_utf8(signed).expect("utf-8");
    let altered = text.replace("signed body", "SIGNED BODY").into_bytes();
    // SPF fails (client not authorized): the DMARC pass rests on the DKIM signature alone.
    assert_code(&w.send(w.bad, "a@contoso.test", &altered).end, "550 5.7.26");
    let log = w.f.gw.wait_log(&["\"rule\":\"dkimBodyHash\""]);
    assert!(log.contains("\"auth\":\"dmarc:fail\""), "{log}");
    assert_eq!(w.metric("mail/contoso", "dmarc", "fail"), 1);
    assert_eq!(w.metric("mail/contoso", "dmarc", "pass"), 0);
    assert!(w.f.sink.messages().is_empty(), "nothing relayed");
}
