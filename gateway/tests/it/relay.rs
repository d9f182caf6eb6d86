//! ARCHITECTURE section 4 (contract): inline relay to the next hop. Accepted mail reaches the
//! sink with the gateway's headers; the next hop's answers are mirrored; an unreachable or
//! insufficiently secure next hop gives 451 and nothing is recorded; limits give 552/452.

use crate::support::net::closed_addr;
use crate::support::{
    Fixture, Python, SinkOptions, SmtpConn, Swaks, connector_header, connectors, contoso_bundle,
    inbound, message,
};
use serde_json::json;
use std::time::Duration;

const ALICE: &str = "alice@contoso.com";
const BOB: &str = "bob@example.org";

fn contoso_by_cert(pki: &crate::support::Pki) -> serde_json::Value {
    connectors(vec![inbound(
        "mail/contoso",
        &["contoso.com"],
        json!({"identifyBy": "Certificate",
               "certificate": {"subjectName": "mail.contoso.com",
                               "trustBundleFile": contoso_bundle(pki)}}),
    )])
}

#[test]
fn starttls_delivery_end_to_end_adds_headers_and_strips_spoofed_ones() {
    let f = Fixture::build(
        SinkOptions::default(),
        |_, s| s,
        |_, pki| contoso_by_cert(pki),
    );
    let t = Swaks::new(f.gw.smtp)
        .local(f.net.client(0))
        .tls()
        .cert(&f.pki.contoso_client)
        .from(ALICE)
        .to(BOB)
        .header("X-Partnergate-Connector: spoofed-by-sender; tls=TLSv1.3; cert=mail.contoso.com")
        .set_header("Subject: end to end")
        .run();
    t.assert_delivered("swaks with STARTTLS and a client certificate");
    let m = f.sink.wait_messages(1);
    assert_eq!(m.len(), 1);
    let m = &m[0];
    assert_eq!(m.mail_from, ALICE);
    assert_eq!(m.rcpt_to, [BOB]);

    let headers = m.headers();
    assert!(
        headers.starts_with("Received:"),
        "the gateway's Received: line comes first:\n{headers}"
    );
    let received = &m.header_values("Received")[0];
    assert!(received.contains("gateway.test"), "{received}");
    assert!(
        received.contains(&f.net.client(0).to_string()),
        "{received}"
    );

    let h = connector_header(m);
    assert!(
        !h.contains("spoofed"),
        "the sender's header must be removed: {h}"
    );
    assert!(h.contains("mail/contoso"), "{h}");
    assert!(h.contains("mail.contoso.com"), "{h}");
    assert!(h.contains("1.3") || h.contains("1.2"), "TLS version in {h}");

    assert_eq!(m.header_values("Subject"), ["end to end"]);
    assert!(
        m.text().contains("This is a test mailing"),
        "swaks' body arrives intact:\n{}",
        m.text()
    );
    assert!(
        !m.text().contains("spoofed-by-sender"),
        "no trace of the spoofed header"
    );
    f.gw.wait_log(&["mail/contoso", "mail.contoso.com"]);
    assert!(
        f.gw.log_lines_with(&["PRIVATE KEY"]).is_empty(),
        "no key material in the logs"
    );
}

#[test]
fn folded_spoofed_connector_header_is_removed_whole() {
    let f = Fixture::start(connectors(vec![]));
    let (mut c, _) = SmtpConn::connect(f.gw.smtp, None);
    c.cmd("EHLO client.test");
    let body = "x-partnergate-connector: evil-connector;\r\n\tcontinued-evil\r\n\
                From: <alice@contoso.com>\r\nSubject: folded\r\n\r\nbody line\r\n";
    let t = c.send_mail(ALICE, &[BOB], body);
    t.assert_delivered("plaintext, folded spoofed header");
    c.quit();
    let m = f.sink.wait_messages(1);
    let text = m[0].text();
    assert!(
        !text.contains("evil"),
        "spoofed header or its continuation leaked:\n{text}"
    );
    assert!(text.contains("body line"));
    assert_eq!(m[0].header_values("Subject"), ["folded"]);
    connector_header(&m[0]);
}

#[test]
fn upstream_down_gives_451_441_and_nothing_is_recorded() {
    let f = Fixture::build(
        SinkOptions::default(),
        |net, s| {
            let down = closed_addr(net.ip(3));
            s.fleet(json!({"upstream": {"host": down.ip().to_string(), "port": down.port()}}))
        },
        |_, _| connectors(vec![]),
    );
    let t = Swaks::new(f.gw.smtp).tls().from(ALICE).to(BOB).run();
    t.assert_refused("451 4.4.1", "next hop unreachable");
    let t = Python::new(f.gw.smtp).send(ALICE, &[BOB], &message(ALICE, BOB, "down", &[]));
    t.assert_refused("451 4.4.1", "next hop unreachable (smtplib)");
    assert!(t.data_end().is_none(), "no 250 for a message nobody has");
    assert!(f.sink.messages().is_empty());
    assert_eq!(f.sink.connections(), 0);
}

#[test]
fn upstream_rcpt_550_is_mirrored() {
    let f = Fixture::build(
        SinkOptions {
            rcpt_reply: Some("550 5.1.1 <bob@example.org>: Recipient address rejected".into()),
            ..SinkOptions::default()
        },
        |_, s| s,
        |_, _| connectors(vec![]),
    );
    let t = Swaks::new(f.gw.smtp).tls().from(ALICE).to(BOB).run();
    t.assert_refused("550 5.1.1", "next hop refuses the recipient");
    assert!(f.sink.messages().is_empty());
}

#[test]
fn upstream_data_refusals_are_mirrored() {
    for reply in [
        "554 5.6.0 Message content rejected",
        "451 4.3.0 Try again later",
    ] {
        let f = Fixture::build(
            SinkOptions {
                data_reply: Some(reply.into()),
                ..SinkOptions::default()
            },
            |_, s| s,
            |_, _| connectors(vec![]),
        );
        let t = Python::new(f.gw.smtp).starttls(&f.pki.ca).send(
            ALICE,
            &[BOB],
            &message(ALICE, BOB, "refused", &[]),
        );
        let code = &reply[..9];
        t.assert_refused(code, "next hop refuses the message after DATA");
        let end = t
            .replies_to(".")
            .into_iter()
            .chain(t.replies_to("DATA"))
            .next()
            .cloned();
        assert!(
            end.as_ref().is_some_and(|r| r.matches(code)),
            "the final reply mirrors {code}: {end:?}\n{}",
            t.raw
        );
    }
}

#[test]
fn each_recipient_gets_the_next_hops_answer() {
    let f = Fixture::build(
        SinkOptions {
            reject_rcpt: vec![("nobody@example.org".into(), "550 5.1.1 No such user".into())],
            ..SinkOptions::default()
        },
        |_, s| s,
        |_, _| connectors(vec![]),
    );
    let t = Python::new(f.gw.smtp).starttls(&f.pki.ca).send(
        ALICE,
        &[BOB, "nobody@example.org", "carol@example.org"],
        &message(ALICE, BOB, "three", &[]),
    );
    let rcpts: Vec<String> = t.replies_to("RCPT").iter().map(|r| r.summary()).collect();
    assert_eq!(rcpts.len(), 3, "{}", t.raw);
    assert!(rcpts[0].starts_with("250"), "{rcpts:?}");
    assert!(rcpts[1].starts_with("550 5.1.1"), "{rcpts:?}");
    assert!(rcpts[2].starts_with("250"), "{rcpts:?}");
    assert_eq!(t.data_end().map(|r| r.code), Some(250), "{}", t.raw);
    let m = f.sink.wait_messages(1);
    assert_eq!(m[0].rcpt_to, [BOB, "carol@example.org"]);
}

#[test]
fn upstream_domain_validation_with_private_ca_is_used() {
    // The sink offers STARTTLS with a certificate for sink.test from the private CA; one
    // gateway per TLS level relays to it.
    let net = crate::support::Net::new();
    let pki = crate::support::Pki::generate();
    let sink = crate::support::Sink::start_with(
        net.sink_ip(),
        SinkOptions {
            starttls: Some(pki.sink.clone()),
            ..SinkOptions::default()
        },
    );
    let cases = [
        ("DomainValidation", Some("sink.test"), true, ""),
        ("DomainValidation", Some("other.test"), false, "451 4.7.5"),
        ("CertificateValidation", None, true, ""),
        ("EncryptionOnly", None, true, ""),
    ];
    let mut delivered = 0;
    for (level, domain, ok, refusal) in cases {
        let mut upstream = json!({"tls": level, "trustBundleFile": pki.ca});
        if let Some(d) = domain {
            upstream["tlsDomain"] = json!(d);
        }
        let gw = crate::support::Gateway::start(
            net.gateway_ip(),
            &pki,
            crate::support::GatewaySpec::new(sink.addr, connectors(vec![]))
                .fleet(json!({"upstream": upstream})),
        );
        let t = Swaks::new(gw.smtp).tls().from(ALICE).to(BOB).run();
        if ok {
            t.assert_delivered(level);
            delivered += 1;
            let m = sink.wait_messages(delivered);
            assert!(m[delivered - 1].tls, "{level}: relayed over TLS");
        } else {
            t.assert_refused(refusal, &format!("{level} {domain:?}"));
            assert_eq!(sink.messages().len(), delivered, "nothing relayed");
        }
    }
}

#[test]
fn upstream_without_starttls_is_never_downgraded() {
    for level in [
        "EncryptionOnly",
        "CertificateValidation",
        "DomainValidation",
    ] {
        let f = Fixture::build(
            SinkOptions::default(),
            |_, s| s.fleet(json!({"upstream": {"tls": level}})),
            |_, _| connectors(vec![]),
        );
        let t = Swaks::new(f.gw.smtp).tls().from(ALICE).to(BOB).run();
        t.assert_refused("451 4.7.5", &format!("{level}, sink offers no STARTTLS"));
        assert!(
            f.sink.messages().is_empty(),
            "{level}: nothing relayed in plaintext"
        );
    }
}

#[test]
fn declared_or_actual_size_over_the_limit_gets_552_534() {
    let f = Fixture::build(
        SinkOptions::default(),
        |_, s| s.fleet(json!({"limits": {"maxMessageSize": 20000}})),
        |_, _| connectors(vec![]),
    );
    let (mut c, _) = SmtpConn::connect(f.gw.smtp, None);
    let ehlo = c.cmd("EHLO client.test");
    assert!(
        ehlo.lines.iter().any(|l| l.trim() == "SIZE 20000"),
        "SIZE advertised: {ehlo}"
    );
    let r = c.cmd(&format!("MAIL FROM:<{ALICE}> SIZE=50000"));
    crate::support::assert_reply(&r, "552 5.3.4", "declared SIZE over the limit");
    c.quit();

    let big = format!(
        "{}{}",
        message(ALICE, BOB, "big", &[]),
        "0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n".repeat(500)
    );
    let t = Python::new(f.gw.smtp).send(ALICE, &[BOB], &big);
    t.assert_refused("552 5.3.4", "undeclared message over the limit");
    assert!(
        f.sink.messages().is_empty(),
        "the partial message was not relayed"
    );

    let t = Python::new(f.gw.smtp).send(ALICE, &[BOB], &message(ALICE, BOB, "small", &[]));
    t.assert_delivered("a small message on the same gateway");
}

#[test]
fn recipients_over_the_limit_get_452_453() {
    let f = Fixture::build(
        SinkOptions::default(),
        |_, s| s.fleet(json!({"limits": {"maxRecipients": 2}})),
        |_, _| connectors(vec![]),
    );
    let to = ["r1@example.org", "r2@example.org", "r3@example.org"];
    let t = Python::new(f.gw.smtp).send(ALICE, &to, &message(ALICE, to[0], "many", &[]));
    let rcpts: Vec<String> = t.replies_to("RCPT").iter().map(|r| r.summary()).collect();
    assert_eq!(rcpts.len(), 3, "{}", t.raw);
    assert!(
        rcpts[0].starts_with("250") && rcpts[1].starts_with("250"),
        "{rcpts:?}"
    );
    assert!(rcpts[2].starts_with("452 4.5.3"), "{rcpts:?}");
    assert_eq!(t.data_end().map(|r| r.code), Some(250), "{}", t.raw);
    assert_eq!(f.sink.wait_messages(1)[0].rcpt_to, &to[..2]);
}

#[test]
fn internal_sender_reaches_partner_smart_host_and_mixed_routes_get_452_453() {
    let net = crate::support::Net::new();
    let pki = crate::support::Pki::generate();
    let org = crate::support::Sink::start(net.sink_ip());
    let partner = crate::support::Sink::start(net.ip(3));
    let internal = net.client(0);
    let gw = crate::support::Gateway::start(
        net.gateway_ip(),
        &pki,
        crate::support::GatewaySpec::new(
            org.addr,
            json!({"inbound": [], "outbound": [{
                "name": "mail/fabrikam-out", "generation": 2, "domains": ["fabrikam.example"],
                "smartHosts": [format!("[{}]:{}", partner.addr.ip(), partner.addr.port())],
                "tls": "Opportunistic"}]}),
        )
        .fleet(json!({"internalSenders": {"ipRanges": [format!("{internal}/32")]}})),
    );
    let (mut c, _) = SmtpConn::connect(gw.smtp, Some(internal));
    c.cmd("EHLO relay.example.org");
    c.cmd("MAIL FROM:<ops@example.org>");
    let r = c.cmd("RCPT TO:<dana@fabrikam.example>");
    assert_eq!(r.code, 250, "internal sender to a partner domain: {r}");
    let r = c.cmd(&format!("RCPT TO:<{BOB}>"));
    crate::support::assert_reply(&r, "452 4.5.3", "second recipient needs another next hop");
    let (_, end) = c.data(&message(
        "ops@example.org",
        "dana@fabrikam.example",
        "out",
        &[],
    ));
    assert_eq!(end.map(|r| r.code), Some(250));
    // The deferred recipient in a new transaction.
    let t = c.send_mail(
        "ops@example.org",
        &[BOB],
        &message("ops@example.org", BOB, "in", &[]),
    );
    t.assert_delivered("the 452'd recipient in its own transaction");
    c.quit();
    let m = partner.wait_messages(1);
    assert_eq!(m[0].rcpt_to, ["dana@fabrikam.example"]);
    assert_eq!(org.wait_messages(1)[0].rcpt_to, [BOB]);

    // A non-internal client may not use the partner route.
    let t = Swaks::new(gw.smtp)
        .local(net.client(5))
        .from("eve@unknown.example")
        .to("dana@fabrikam.example")
        .run();
    t.assert_refused("550 5.7.1", "outsider relaying to a partner domain");
}

/// A bare next hop for the pipelining tests, on `listener` until `stop`: answers EHLO with or
/// without PIPELINING and, after each MAIL, waits up to 300 ms for more bytes before answering,
/// recording whether the RCPT was already there (only a pipelining client sends it before
/// MAIL's reply). The first MAIL it sees gets `first_mail_reply`, later ones 250; a RCPT after a
/// refused MAIL gets 503. Returns every command with that flag (false but for MAIL).
fn pipelining_probe_hop(
    listener: std::net::TcpListener,
    pipelining: bool,
    first_mail_reply: &'static str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<(String, bool)>> {
    use std::io::{BufRead, BufReader, Write};
    use std::sync::atomic::Ordering;
    std::thread::spawn(move || {
        listener.set_nonblocking(true).expect("nonblocking");
        let mut seen = Vec::new();
        let mut first_mail = true;
        while !stop.load(Ordering::SeqCst) {
            let sock = match listener.accept() {
                Ok((s, _)) => s,
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
            };
            sock.set_nonblocking(false).expect("blocking");
            let mut out = sock.try_clone().expect("clone");
            let mut r = BufReader::new(sock);
            let mut mail_ok = false;
            let _ = out.write_all(b"220 hop.test\r\n");
            let mut line = String::new();
            loop {
                line.clear();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                let cmd = line.trim_end().to_ascii_uppercase();
                let mut ahead = false;
                let reply = if cmd.starts_with("EHLO") {
                    let p = if pipelining { "250-PIPELINING\r\n" } else { "" };
                    format!("250-hop.test\r\n{p}250 8BITMIME\r\n")
                } else if cmd.starts_with("MAIL") {
                    let sock = r.get_ref();
                    let _ = sock.set_read_timeout(Some(Duration::from_millis(300)));
                    ahead = !r.buffer().is_empty() || r.fill_buf().is_ok_and(|b| !b.is_empty());
                    let _ = r.get_ref().set_read_timeout(None);
                    let reply = if first_mail {
                        first_mail_reply
                    } else {
                        "250 2.1.0 Ok"
                    };
                    first_mail = false;
                    mail_ok = reply.starts_with('2');
                    format!("{reply}\r\n")
                } else if cmd.starts_with("RCPT") {
                    let ok = if mail_ok {
                        "250 2.1.5 Ok"
                    } else {
                        "503 5.5.1 MAIL first"
                    };
                    format!("{ok}\r\n")
                } else if cmd == "DATA" {
                    let _ = out.write_all(b"354 go\r\n");
                    loop {
                        line.clear();
                        if r.read_line(&mut line).unwrap_or(0) == 0 || line == ".\r\n" {
                            break;
                        }
                    }
                    line = "DATA".into();
                    "250 2.0.0 queued\r\n".to_string()
                } else if cmd == "QUIT" {
                    "221 bye\r\n".to_string()
                } else {
                    "250 2.0.0 Ok\r\n".to_string()
                };
                seen.push((line.trim_end().to_string(), ahead));
                if out.write_all(reply.as_bytes()).is_err() || cmd == "QUIT" {
                    break;
                }
            }
        }
        seen
    })
}

/// RFC 2920 towards the next hop: the first recipient of a transaction goes out with its MAIL
/// in one write when the next hop offers PIPELINING, after MAIL's reply when it does not; a MAIL
/// the next hop refuses is answered as before (its reply to the pipelined RCPT is read, not
/// passed on) and the session's next transaction goes through.
#[test]
fn first_recipient_goes_with_mail_only_when_the_next_hop_offers_pipelining() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    for (pipelining, first_mail) in [
        (true, "250 2.1.0 Ok"),
        (false, "250 2.1.0 Ok"),
        (true, "550 5.7.1 sender refused here"),
    ] {
        let case = format!("pipelining {pipelining}, first MAIL {first_mail:?}");
        let net = crate::support::Net::new();
        let pki = crate::support::Pki::generate();
        let listener = std::net::TcpListener::bind((net.ip(2), 0)).expect("bind hop");
        let addr = listener.local_addr().expect("hop addr");
        let stop = Arc::new(AtomicBool::new(false));
        let hop = pipelining_probe_hop(listener, pipelining, first_mail, stop.clone());
        let gw = crate::support::Gateway::start(
            net.gateway_ip(),
            &pki,
            crate::support::GatewaySpec::new(addr, json!({"inbound": [], "outbound": []})),
        );
        let (mut c, _) = SmtpConn::connect(gw.smtp, Some(net.client(0)));
        c.cmd("EHLO client.example.net");
        let rcpts = ["bob@example.org", "carol@example.org"];
        let first = c.send_mail("s1@example.net", &rcpts, &message(ALICE, BOB, "one", &[]));
        if !first_mail.starts_with('2') {
            // The refusal answers the recipient it came with; the next recipient tries again
            // (a new connection, MAIL again), as without pipelining.
            let r: Vec<String> = first
                .replies_to("RCPT")
                .iter()
                .map(|r| r.summary())
                .collect();
            assert_eq!(
                r,
                ["550 5.7.1 sender refused here", "250 2.1.5 Ok"],
                "{case}"
            );
        }
        assert_eq!(first.data_end().map(|r| r.code), Some(250), "{case}");
        c.send_mail("s2@example.net", &rcpts, &message(ALICE, BOB, "two", &[]))
            .assert_delivered(&case);
        c.quit();
        drop(gw);
        stop.store(true, Ordering::SeqCst);
        let seen = hop.join().expect("hop thread");
        let mails: Vec<(String, bool)> = seen
            .iter()
            .filter(|(c, _)| c.starts_with("MAIL"))
            .cloned()
            .collect();
        assert!(mails.len() >= 2, "{case}: {seen:?}");
        for (m, ahead) in &mails {
            assert_eq!(
                *ahead, pipelining,
                "{case}: RCPT before MAIL's reply for {m}: {seen:?}"
            );
        }
        // Every transaction's commands in order: MAIL, its RCPTs, DATA (when MAIL was accepted).
        let cmds: Vec<String> = seen
            .iter()
            .map(|(c, _)| c.split(':').next().unwrap_or("").to_string())
            .filter(|c| {
                c != "EHLO hop.test" && !c.starts_with("EHLO") && c != "QUIT" && c != "RSET"
            })
            .collect();
        let mut want = vec!["MAIL FROM", "RCPT TO", "RCPT TO", "DATA"];
        if !first_mail.starts_with('2') {
            // The refused MAIL and the pipelined RCPT it answered with 503.
            want.splice(0..0, ["MAIL FROM", "RCPT TO"]);
            want.remove(3);
        }
        want.extend(["MAIL FROM", "RCPT TO", "RCPT TO", "DATA"]);
        assert_eq!(cmds, want, "{case}: {seen:?}");
    }
}
