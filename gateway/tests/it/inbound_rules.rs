//! ARCHITECTURE section 3 (contract): which connector claims a transaction, and each rule of
//! the table, driven through the real gateway by real clients (swaks, openssl s_client, Python
//! smtplib). Every refusal is paired with an accepted control so a gateway that refuses
//! everything cannot pass.

use crate::support::{
    Fixture, Openssl, Python, SinkOptions, Swaks, connector_header, connectors, contoso_bundle,
    inbound, message,
};
use serde_json::json;

const ALICE: &str = "alice@contoso.com";
const BOB: &str = "bob@example.org";

fn body(from: &str, subject: &str) -> String {
    message(from, BOB, subject, &[])
}

/// Steps for openssl s_client after STARTTLS: one transaction from `from` to BOB.
fn openssl_steps(from: &str) -> Vec<String> {
    vec![
        "EHLO client.test".into(),
        format!("MAIL FROM:<{from}>"),
        format!("RCPT TO:<{BOB}>"),
        "DATA".into(),
        format!("Subject: openssl\nFrom: <{from}>\n\nhello from openssl\n."),
        "QUIT".into(),
    ]
}

fn run_openssl(o: Openssl, from: &str) -> crate::support::Transcript {
    let steps = openssl_steps(from);
    let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
    o.run(&steps)
}

/// Row 1: identified by IP, sender domain not in `domains` → 550 5.7.1.
#[test]
fn ip_identified_partner_with_foreign_sender_domain_gets_550() {
    let f = Fixture::build(
        SinkOptions::default(),
        |_, s| s,
        |net, _| {
            connectors(vec![inbound(
                "mail/contoso-ip",
                &["contoso.com"],
                json!({"identifyBy": "SenderIP", "senderIpRanges": [format!("{}/32", net.client(0))]}),
            )])
        },
    );
    let client = f.net.client(0);
    let t = Swaks::new(f.gw.smtp)
        .local(client)
        .tls()
        .from("mallory@fabrikam.example")
        .to(BOB)
        .run();
    t.assert_refused("550 5.7.1", "IP-identified partner, foreign sender domain");
    f.gw.wait_log(&["mail/contoso-ip", &client.to_string()]);

    let t = Swaks::new(f.gw.smtp)
        .local(client)
        .tls()
        .from(ALICE)
        .to(BOB)
        .run();
    t.assert_delivered("IP-identified partner, own domain");
    let m = f.sink.wait_messages(1);
    assert_eq!(m.len(), 1, "only the allowed message was relayed");
    assert!(connector_header(&m[0]).contains("mail/contoso-ip"));
}

/// Row 1: identified by certificate, sender domain not in `domains` → 550 5.7.1.
#[test]
fn certificate_identified_partner_with_foreign_sender_domain_gets_550() {
    let f = Fixture::build(
        SinkOptions::default(),
        |_, s| s,
        |_, pki| {
            connectors(vec![inbound(
                "mail/contoso-cert",
                &["contoso.com"],
                json!({"identifyBy": "Certificate",
                       "certificate": {"subjectName": "mail.contoso.com",
                                       "trustBundleFile": contoso_bundle(pki)}}),
            )])
        },
    );
    let t = run_openssl(
        Openssl::new(f.gw.smtp, &f.pki.ca).cert(&f.pki.contoso_client),
        "mallory@fabrikam.example",
    );
    t.assert_refused(
        "550 5.7.1",
        "certificate-identified partner, foreign sender domain",
    );
    f.gw.wait_log(&["mail/contoso-cert", "mail.contoso.com"]);

    let t = run_openssl(
        Openssl::new(f.gw.smtp, &f.pki.ca).cert(&f.pki.contoso_client),
        ALICE,
    );
    t.assert_delivered("certificate-identified partner, own domain");
    let m = f.sink.wait_messages(1);
    assert_eq!(m.len(), 1);
    let h = connector_header(&m[0]);
    assert!(
        h.contains("mail/contoso-cert") && h.contains("mail.contoso.com"),
        "{h}"
    );
}

/// Row 2: `requireTls` and a plaintext session → 530 5.7.0.
#[test]
fn require_tls_refuses_plaintext_with_530() {
    let f = Fixture::start(connectors(vec![inbound(
        "mail/contoso",
        &["contoso.com"],
        json!({"requireTls": true}),
    )]));
    let t = Swaks::new(f.gw.smtp).from(ALICE).to(BOB).run();
    t.assert_refused(
        "530 5.7.0 Must issue a STARTTLS command first",
        "swaks plaintext",
    );
    let t = Python::new(f.gw.smtp).send(ALICE, &[BOB], &body(ALICE, "plain"));
    t.assert_refused(
        "530 5.7.0 Must issue a STARTTLS command first",
        "smtplib plaintext",
    );
    assert!(f.sink.messages().is_empty());

    let t = Python::new(f.gw.smtp)
        .starttls(&f.pki.ca)
        .send(ALICE, &[BOB], &body(ALICE, "tls"));
    t.assert_delivered("smtplib with STARTTLS");
    assert_eq!(f.sink.wait_messages(1).len(), 1);
}

/// Row 3: negotiated TLS below `minTlsVersion` → 550 5.7.1.
#[test]
fn tls_below_min_version_gets_550() {
    let f = Fixture::start(connectors(vec![inbound(
        "mail/contoso",
        &["contoso.com"],
        json!({"minTlsVersion": "1.3"}),
    )]));
    let t = run_openssl(Openssl::new(f.gw.smtp, &f.pki.ca).tls_version("1.2"), ALICE);
    t.assert_refused("550 5.7.1", "TLS 1.2 against minTlsVersion 1.3");
    assert!(f.sink.messages().is_empty());

    let t = run_openssl(Openssl::new(f.gw.smtp, &f.pki.ca).tls_version("1.3"), ALICE);
    t.assert_delivered("TLS 1.3 against minTlsVersion 1.3");
    let m = f.sink.wait_messages(1);
    assert!(
        connector_header(&m[0]).contains("1.3"),
        "the header names the TLS version"
    );
}

/// Row 4: `restrictToIpRanges` and the client IP outside `senderIpRanges` → 550 5.7.1.
#[test]
fn restrict_to_ip_ranges_refuses_claimed_mail_from_outside() {
    let f = Fixture::build(
        SinkOptions::default(),
        |_, s| s,
        |net, _| {
            connectors(vec![inbound(
                "mail/contoso",
                &["contoso.com"],
                json!({"senderIpRanges": [format!("{}/32", net.client(1))],
                       "restrictToIpRanges": true}),
            )])
        },
    );
    let t = Swaks::new(f.gw.smtp)
        .local(f.net.client(2))
        .tls()
        .from(ALICE)
        .to(BOB)
        .run();
    t.assert_refused("550 5.7.1", "claimed by domain, client outside the ranges");
    f.gw.wait_log(&["mail/contoso", &f.net.client(2).to_string()]);

    let t = Swaks::new(f.gw.smtp)
        .local(f.net.client(1))
        .tls()
        .from(ALICE)
        .to(BOB)
        .run();
    t.assert_delivered("client inside the ranges");
    assert_eq!(f.sink.wait_messages(1).len(), 1);
}

/// Row 5: `restrictToCertificate` and no certificate / an untrusted one / a name mismatch →
/// 550 5.7.1; the right certificate is accepted.
#[test]
fn restrict_to_certificate_refuses_missing_untrusted_and_mismatched_certificates() {
    let f = Fixture::build(
        SinkOptions::default(),
        |_, s| s,
        |_, pki| {
            connectors(vec![inbound(
                "mail/contoso",
                &["contoso.com"],
                json!({"certificate": {"subjectName": "mail.contoso.com",
                                       "trustBundleFile": contoso_bundle(pki)},
                       "restrictToCertificate": true}),
            )])
        },
    );
    let t = Swaks::new(f.gw.smtp).tls().from(ALICE).to(BOB).run();
    t.assert_refused("550 5.7.1", "no client certificate");

    let t = Swaks::new(f.gw.smtp)
        .tls()
        .cert(&f.pki.self_signed_client)
        .from(ALICE)
        .to(BOB)
        .run();
    t.assert_refused("550 5.7.1", "self-signed certificate with the right name");

    let t = Python::new(f.gw.smtp)
        .starttls(&f.pki.ca)
        .cert(&f.pki.wrong_name_client)
        .send(ALICE, &[BOB], &body(ALICE, "wrong name"));
    t.assert_refused("550 5.7.1", "trusted certificate, wrong name");
    assert!(f.sink.messages().is_empty(), "nothing relayed so far");

    let t = Python::new(f.gw.smtp)
        .starttls(&f.pki.ca)
        .cert(&f.pki.contoso_client)
        .send(ALICE, &[BOB], &body(ALICE, "right cert"));
    t.assert_delivered("trusted certificate, right name");
    let m = f.sink.wait_messages(1);
    assert!(connector_header(&m[0]).contains("mail.contoso.com"));
}

/// Row 6: no connector claims and `defaultInbound: Reject` → 550 5.7.1.
#[test]
fn unclaimed_mail_with_default_reject_gets_550() {
    let f = Fixture::build(
        SinkOptions::default(),
        |_, s| s.fleet(json!({"defaultInbound": "Reject"})),
        |_, _| {
            connectors(vec![inbound(
                "mail/contoso",
                &["contoso.com"],
                json!({"requireTls": false}),
            )])
        },
    );
    let t = Python::new(f.gw.smtp).starttls(&f.pki.ca).send(
        "eve@unknown.example",
        &[BOB],
        &body("eve@unknown.example", "stranger"),
    );
    t.assert_refused("550 5.7.1", "unclaimed sender with defaultInbound Reject");

    let t = Python::new(f.gw.smtp).send(ALICE, &[BOB], &body(ALICE, "partner"));
    t.assert_delivered("claimed sender");
    let m = f.sink.wait_messages(1);
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].mail_from, ALICE);
}

/// The other side of row 6: `defaultInbound: Accept` lets non-partners send to us.
#[test]
fn unclaimed_mail_with_default_accept_is_delivered() {
    let f = Fixture::start(connectors(vec![]));
    let t = Swaks::new(f.gw.smtp)
        .from("eve@unknown.example")
        .to(BOB)
        .run();
    t.assert_delivered("unclaimed sender with defaultInbound Accept");
    assert_eq!(f.sink.wait_messages(1)[0].rcpt_to, [BOB]);
}

/// Row 7: recipient outside `acceptedDomains`, sender not internal → 550 5.7.1, and the
/// next hop is never contacted.
#[test]
fn recipient_outside_accepted_domains_is_relaying_denied() {
    let f = Fixture::start(connectors(vec![]));
    let t = Swaks::new(f.gw.smtp)
        .tls()
        .from(ALICE)
        .to("victim@elsewhere.example")
        .run();
    t.assert_refused("550 5.7.1", "open relay attempt");
    assert!(t.reply_to("RCPT TO").is_some_and(|r| r.code == 550));
    // A subdomain of an accepted wildcard is ours.
    let t = Swaks::new(f.gw.smtp)
        .tls()
        .from(ALICE)
        .to("carol@eu.example.org")
        .run();
    t.assert_delivered("recipient under *.example.org");
    let m = f.sink.wait_messages(1);
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].rcpt_to, ["carol@eu.example.org"]);
}

/// Claiming order: Certificate, then SenderIP (longest prefix), then SenderDomain.
#[test]
fn claiming_prefers_certificate_then_longest_ip_prefix_then_domain() {
    let f = Fixture::build(
        SinkOptions::default(),
        |_, s| s,
        |net, pki| {
            connectors(vec![
                inbound(
                    "mail/contoso-domain",
                    &["contoso.com"],
                    json!({"requireTls": false}),
                ),
                inbound(
                    "mail/partner-ip-wide",
                    &["*"],
                    json!({"identifyBy": "SenderIP", "senderIpRanges": [net.cidr()], "requireTls": false}),
                ),
                inbound(
                    "mail/partner-ip",
                    &["*"],
                    json!({"identifyBy": "SenderIP",
                           "senderIpRanges": [format!("{}/32", net.client(0))], "requireTls": false}),
                ),
                inbound(
                    "mail/contoso-cert",
                    &["contoso.com"],
                    json!({"identifyBy": "Certificate",
                           "certificate": {"subjectName": "mail.contoso.com",
                                           "trustBundleFile": contoso_bundle(pki)}}),
                ),
            ])
        },
    );
    let cases = [
        (Some(f.net.client(0)), true, "mail/contoso-cert"),
        (Some(f.net.client(0)), false, "mail/partner-ip"),
        (Some(f.net.client(3)), false, "mail/partner-ip-wide"),
        (None, false, "mail/contoso-domain"),
    ];
    for (i, (local, cert, expected)) in cases.iter().enumerate() {
        let mut p = Python::new(f.gw.smtp).starttls(&f.pki.ca);
        if let Some(ip) = local {
            p = p.local(*ip);
        }
        if *cert {
            p = p.cert(&f.pki.contoso_client);
        }
        let t = p.send(ALICE, &[BOB], &body(ALICE, &format!("case {i}")));
        t.assert_delivered(expected);
        let m = f.sink.wait_messages(i + 1);
        let h = connector_header(&m[i]);
        assert!(
            h.contains(expected),
            "case {i} (client {local:?}, cert {cert}): expected {expected} to claim, header says {h:?}"
        );
        // "mail/partner-ip" is a prefix of "mail/partner-ip-wide": make sure which one.
        if *expected == "mail/partner-ip" {
            assert!(!h.contains("mail/partner-ip-wide"), "{h}");
        }
    }
}

/// Domain claiming: exact beats wildcard, longer wildcard beats shorter, `*` last.
#[test]
fn wildcard_sender_domains_pick_the_most_specific_connector() {
    let f = Fixture::start(connectors(vec![
        inbound("mail/any", &["*"], json!({"requireTls": false})),
        inbound(
            "mail/contoso-wild",
            &["*.contoso.com"],
            json!({"requireTls": false}),
        ),
        inbound(
            "mail/contoso-exact",
            &["contoso.com"],
            json!({"requireTls": false}),
        ),
        inbound(
            "mail/contoso-eu",
            &["*.eu.contoso.com"],
            json!({"requireTls": false}),
        ),
    ]));
    let cases = [
        ("a@contoso.com", "mail/contoso-exact"),
        ("a@mx.contoso.com", "mail/contoso-wild"),
        ("a@x.eu.contoso.com", "mail/contoso-eu"),
        ("a@deep.sub.contoso.com", "mail/contoso-wild"),
        ("a@fabrikam.example", "mail/any"),
        ("a@notcontoso.com", "mail/any"),
    ];
    for (i, (from, expected)) in cases.iter().enumerate() {
        let t = Python::new(f.gw.smtp).send(from, &[BOB], &body(from, &format!("case {i}")));
        t.assert_delivered(from);
        let m = f.sink.wait_messages(i + 1);
        let h = connector_header(&m[i]);
        assert!(
            h.contains(expected),
            "sender {from}: expected {expected}, header says {h:?}"
        );
    }
}
