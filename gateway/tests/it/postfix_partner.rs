//! A private Postfix instance as the partner's MTA (ARCHITECTURE section 8): relayhost = the
//! gateway, `smtp_tls_security_level` encrypt/verify, a client certificate, `smtp_bind_address`
//! choosing its source IP. The gateway's reply is read from Postfix's own log, as the partner's
//! admin would see it.

use crate::support::postfix::{Postfix, PostfixOptions};
use crate::support::{
    Fixture, SinkOptions, connector_header, connectors, contoso_bundle, inbound, message,
};
use serde_json::json;

const ALICE: &str = "alice@contoso.com";
const BOB: &str = "bob@example.org";

fn partner(f: &Fixture, level: &str, cert: Option<&crate::support::CertPair>) -> Postfix {
    let mut o = PostfixOptions::new(f.net.ip(30), f.gw.smtp);
    o.tls_level = level.into();
    o.ca_file = Some(f.pki.ca.clone());
    o.client_cert = cert.cloned();
    Postfix::start(o)
}

fn cert_connector(
    restrict: bool,
) -> impl FnOnce(&crate::support::Net, &crate::support::Pki) -> serde_json::Value {
    move |_, pki| {
        connectors(vec![inbound(
            "mail/contoso",
            &["contoso.com"],
            json!({"identifyBy": "Certificate",
                   "certificate": {"subjectName": "mail.contoso.com",
                                   "trustBundleFile": contoso_bundle(pki)},
                   "restrictToCertificate": restrict}),
        )])
    }
}

#[test]
fn postfix_partner_with_verify_and_client_certificate_is_delivered() {
    let f = Fixture::build(SinkOptions::default(), |_, s| s, cert_connector(true));
    let pf = partner(&f, "verify", Some(&f.pki.contoso_client));
    let id = pf.submit(ALICE, BOB, &message(ALICE, BOB, "from postfix", &[]));
    let d = pf.wait_delivery(&id, BOB);
    assert_eq!(d.status, "sent", "{}", d.line);
    assert!(d.detail.starts_with("250"), "{}", d.line);
    assert!(
        pf.maillog().contains("Verified TLS connection established"),
        "postfix verified gateway.test against the private CA:\n{}",
        pf.maillog()
    );
    let m = f.sink.wait_messages(1);
    assert_eq!(m[0].mail_from, ALICE);
    assert_eq!(m[0].rcpt_to, [BOB]);
    let h = connector_header(&m[0]);
    assert!(
        h.contains("mail/contoso") && h.contains("mail.contoso.com"),
        "{h}"
    );
    let received = &m[0].header_values("Received")[0];
    assert!(
        received.contains(&f.net.ip(30).to_string()),
        "Received: names the partner's source IP: {received}"
    );
}

#[test]
fn postfix_partner_with_untrusted_certificate_is_bounced_550() {
    // Claimed by sender domain; restrictToCertificate then needs a trusted certificate.
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
    let pf = partner(&f, "encrypt", Some(&f.pki.self_signed_client));
    let id = pf.submit(ALICE, BOB, &message(ALICE, BOB, "self-signed", &[]));
    let d = pf.wait_delivery(&id, BOB);
    assert_eq!(d.status, "bounced", "{}", d.line);
    assert!(d.detail.contains("550 5.7.1"), "{}", d.line);
    assert!(f.sink.messages().is_empty());
}

#[test]
fn postfix_partner_without_tls_gets_530_and_bounces() {
    let f = Fixture::start(connectors(vec![inbound(
        "mail/contoso",
        &["contoso.com"],
        json!({"requireTls": true}),
    )]));
    let pf = partner(&f, "none", None);
    let id = pf.submit(ALICE, BOB, &message(ALICE, BOB, "plaintext", &[]));
    let d = pf.wait_delivery(&id, BOB);
    assert_eq!(d.status, "bounced", "{}", d.line);
    assert!(
        d.detail
            .contains("530 5.7.0 Must issue a STARTTLS command first"),
        "{}",
        d.line
    );
    assert!(f.sink.messages().is_empty());
}

#[test]
fn postfix_partner_defers_when_upstream_is_down() {
    let f = Fixture::build(
        SinkOptions::default(),
        |net, s| {
            let down = crate::support::net::closed_addr(net.ip(3));
            s.fleet(json!({"upstream": {"host": down.ip().to_string(), "port": down.port()}}))
        },
        cert_connector(false),
    );
    let pf = partner(&f, "verify", Some(&f.pki.contoso_client));
    let id = pf.submit(ALICE, BOB, &message(ALICE, BOB, "upstream down", &[]));
    let d = pf.wait_delivery(&id, BOB);
    assert_eq!(
        d.status, "deferred",
        "the partner keeps the message: {}",
        d.line
    );
    assert!(d.detail.contains("451 4.4.1"), "{}", d.line);
}

#[test]
fn postfix_source_address_identifies_partner_by_ip() {
    let f = Fixture::build(
        SinkOptions::default(),
        |_, s| s,
        |net, _| {
            connectors(vec![
                inbound("mail/contoso-domain", &["contoso.com"], json!({})),
                inbound(
                    "mail/contoso-ip",
                    &["contoso.com"],
                    json!({"identifyBy": "SenderIP",
                           "senderIpRanges": [format!("{}/32", net.ip(31))]}),
                ),
            ])
        },
    );
    // smtp_bind_address picks the source IP the gateway sees.
    let mut o = PostfixOptions::new(f.net.ip(30), f.gw.smtp);
    o.bind = f.net.ip(31);
    o.ca_file = Some(f.pki.ca.clone());
    let pf = Postfix::start(o);
    let id = pf.submit(ALICE, BOB, &message(ALICE, BOB, "by ip", &[]));
    let d = pf.wait_delivery(&id, BOB);
    assert_eq!(d.status, "sent", "{}", d.line);
    let m = f.sink.wait_messages(1);
    let h = connector_header(&m[0]);
    assert!(
        h.contains("mail/contoso-ip"),
        "SenderIP beats SenderDomain: {h}"
    );
}
