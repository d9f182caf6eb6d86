//! The interop matrix (issue 14, docs/interop.md): real MTAs from Debian as the partner, each a
//! private instance on the test's own loopback block (never the system MTA), against the real
//! gateway binary.
//!
//! - Senders (Postfix, Exim 4, OpenSMTPD) relay to the gateway: plaintext is refused `530` by a
//!   `requireTls` connector, STARTTLS is accepted, a client certificate with the right name is
//!   identified by an `identifyBy: Certificate` connector (named in `X-Partnergate-Connector`
//!   at the sink), a trusted certificate for another name is refused `550 5.7.1`. The verdict
//!   is read from the MTA's own log, as the partner's admin would see it.
//! - Receivers (Postfix, Exim 4) are an Outbound connector's smart host under
//!   `DomainValidation`: delivered when the certificate names the expected host, `451 4.7.5`
//!   and nothing sent when it does not.
//! - msmtp is a plain client: plaintext, STARTTLS, with and without a client certificate.
//! - A partner CA rotated the way cert-manager users do it: the bundle holds the old and the new
//!   CA, then only the new one (reloads), mail signed by either flows while both are there.
//!
//! Certificates come from the test PKI (rcgen, support/pki.rs); the e2e suite gets the same
//! roles from cert-manager. OpenSMTPD cannot present a client certificate or serve TLS with
//! Debian 12's OpenSSL 3 (see support/opensmtpd.rs), so its mTLS and receiver cells are absent.

use std::net::SocketAddr;

use crate::outbound_support::PartnerPki;
use crate::support::exim::{Exim, EximSender};
use crate::support::msmtp::Msmtp;
use crate::support::net::free_port;
use crate::support::opensmtpd::{OpenSmtpd, SmtpdSender};
use crate::support::pki::material_name;
use crate::support::postfix::{Delivery, PostfixOptions, ReceiverOptions};
use crate::support::{
    CertPair, Fixture, Gateway, GatewaySpec, Net, Pki, Postfix, Recorded, Sink, SinkOptions,
    SmtpConn, connector_header, connectors, contoso_bundle, inbound, message,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use serde_json::{Value, json};

const BOB: &str = "bob@example.org";
/// Claimed by `mail/tailspin` (requireTls, no certificate): the plaintext and STARTTLS cells.
const TAILSPIN: &str = "alice@tailspin.test";
/// Claimed by `mail/contoso` (identifyBy Certificate, restrictToCertificate): the mTLS cells.
const CONTOSO: &str = "alice@contoso.com";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mta {
    Postfix,
    Exim,
    OpenSmtpd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cell {
    /// No STARTTLS: `530 5.7.0`, bounced.
    Plaintext,
    /// STARTTLS, no client certificate: delivered through `mail/tailspin`.
    Starttls,
    /// Client certificate `mail.contoso.com` from the Contoso CA: delivered, `cert=` names it.
    CertMatch,
    /// Client certificate `mail.fabrikam.example` from the Contoso CA: `550 5.7.1`, bounced.
    CertMismatch,
}

enum Sender {
    Postfix(Postfix),
    Exim(Exim),
    OpenSmtpd(OpenSmtpd),
}

impl Sender {
    fn submit(&self, from: &str, to: &str, body: &str) -> String {
        match self {
            Sender::Postfix(p) => p.submit(from, to, body),
            Sender::Exim(e) => e.submit(from, to, body),
            Sender::OpenSmtpd(o) => o.submit(from, to, body),
        }
    }

    fn wait_delivery(&self, id: &str, rcpt: &str) -> Delivery {
        match self {
            Sender::Postfix(p) => p.wait_delivery(id, rcpt),
            Sender::Exim(e) => e.wait_delivery(id, rcpt),
            Sender::OpenSmtpd(o) => o.wait_delivery(id, rcpt),
        }
    }
}

/// The partner connectors every sender cell runs against.
fn partner_connectors(pki: &Pki) -> Value {
    connectors(vec![
        inbound(
            "mail/contoso",
            &["contoso.com"],
            json!({"identifyBy": "Certificate", "requireTls": true,
                   "certificate": {"subjectName": "mail.contoso.com",
                                   "trustBundleFile": contoso_bundle(pki)},
                   "restrictToCertificate": true}),
        ),
        inbound(
            "mail/tailspin",
            &["tailspin.test"],
            json!({"requireTls": true}),
        ),
    ])
}

fn start_sender(mta: Mta, f: &Fixture, cell: Cell) -> Sender {
    let ca = (cell != Cell::Plaintext).then(|| f.pki.ca.clone());
    let cert: Option<CertPair> = match cell {
        Cell::CertMatch => Some(f.pki.contoso_client.clone()),
        Cell::CertMismatch => Some(f.pki.wrong_name_client.clone()),
        Cell::Plaintext | Cell::Starttls => None,
    };
    match mta {
        Mta::Postfix => {
            let mut o = PostfixOptions::new(f.net.ip(30), f.gw.smtp);
            // verify: the gateway's certificate is checked for gateway.test.
            o.tls_level = if ca.is_some() { "verify" } else { "none" }.into();
            o.ca_file = Some(f.pki.ca.clone());
            o.client_cert = cert;
            Sender::Postfix(Postfix::start(o))
        }
        Mta::Exim => Sender::Exim(Exim::start_sender(EximSender {
            ip: f.net.ip(31),
            relay: f.gw.smtp,
            ca,
            client_cert: cert,
        })),
        Mta::OpenSmtpd => {
            assert!(
                cert.is_none(),
                "OpenSMTPD 6.8 cannot present a client certificate with OpenSSL 3"
            );
            Sender::OpenSmtpd(OpenSmtpd::start_sender(SmtpdSender {
                ip: f.net.ip(32),
                relay: f.gw.smtp,
                ca,
                relay_domain: "example.org".into(),
            }))
        }
    }
}

/// One sender cell: a fresh gateway, the MTA configured for `cell`, one message to BOB, the
/// MTA's verdict from its log and what the organisation's server got.
fn sender_cell(mta: Mta, cell: Cell) {
    let f = Fixture::build(
        SinkOptions::default(),
        |_, s| s,
        |_, pki| partner_connectors(pki),
    );
    let from = match cell {
        Cell::Plaintext | Cell::Starttls => TAILSPIN,
        Cell::CertMatch | Cell::CertMismatch => CONTOSO,
    };
    let ctx = format!("{mta:?} × {cell:?}");
    let sender = start_sender(mta, &f, cell);
    let id = sender.submit(from, BOB, &message(from, BOB, &ctx, &[]));
    let d = sender.wait_delivery(&id, BOB);
    let relayed = |f: &Fixture| -> Recorded {
        assert_eq!(d.status, "sent", "{ctx}: {}", d.line);
        assert!(d.detail.contains("250"), "{ctx}: {}", d.line);
        let m = f.sink.wait_messages(1);
        assert_eq!(m.len(), 1, "{ctx}");
        assert_eq!(m[0].mail_from, from, "{ctx}");
        assert_eq!(m[0].rcpt_to, [BOB], "{ctx}");
        m[0].clone()
    };
    match cell {
        Cell::Plaintext => {
            assert_eq!(d.status, "bounced", "{ctx}: {}", d.line);
            assert!(
                d.detail
                    .contains("530 5.7.0 Must issue a STARTTLS command first"),
                "{ctx}: {}",
                d.line
            );
            assert!(f.sink.messages().is_empty(), "{ctx}: nothing relayed");
        }
        Cell::Starttls => {
            let m = relayed(&f);
            let h = connector_header(&m);
            assert!(
                h.starts_with("mail/tailspin;") && h.contains("tls=1.") && h.contains("cert=none"),
                "{ctx}: {h}"
            );
        }
        Cell::CertMatch => {
            let m = relayed(&f);
            let h = connector_header(&m);
            assert!(
                h.starts_with("mail/contoso;") && h.contains("cert=mail.contoso.com"),
                "{ctx}: identified by its certificate: {h}"
            );
        }
        Cell::CertMismatch => {
            assert_eq!(d.status, "bounced", "{ctx}: {}", d.line);
            assert!(d.detail.contains("550 5.7.1"), "{ctx}: {}", d.line);
            assert!(f.sink.messages().is_empty(), "{ctx}: nothing relayed");
        }
    }
}

#[test]
fn postfix_sender_plaintext_refused_530() {
    sender_cell(Mta::Postfix, Cell::Plaintext);
}

#[test]
fn postfix_sender_starttls_accepted() {
    sender_cell(Mta::Postfix, Cell::Starttls);
}

#[test]
fn postfix_sender_client_cert_name_match_identified() {
    sender_cell(Mta::Postfix, Cell::CertMatch);
}

#[test]
fn postfix_sender_client_cert_name_mismatch_refused_550() {
    sender_cell(Mta::Postfix, Cell::CertMismatch);
}

#[test]
fn exim_sender_plaintext_refused_530() {
    sender_cell(Mta::Exim, Cell::Plaintext);
}

#[test]
fn exim_sender_starttls_accepted() {
    sender_cell(Mta::Exim, Cell::Starttls);
}

#[test]
fn exim_sender_client_cert_name_match_identified() {
    sender_cell(Mta::Exim, Cell::CertMatch);
}

#[test]
fn exim_sender_client_cert_name_mismatch_refused_550() {
    sender_cell(Mta::Exim, Cell::CertMismatch);
}

#[test]
fn opensmtpd_sender_plaintext_refused_530() {
    sender_cell(Mta::OpenSmtpd, Cell::Plaintext);
}

#[test]
fn opensmtpd_sender_starttls_accepted() {
    sender_cell(Mta::OpenSmtpd, Cell::Starttls);
}

/// msmtp: each cell is one run against one gateway (msmtp needs no set-up of its own).
#[test]
fn msmtp_client_plaintext_starttls_and_client_certificates() {
    let f = Fixture::build(
        SinkOptions::default(),
        |_, s| s,
        |_, pki| partner_connectors(pki),
    );
    let client = || Msmtp::new(f.gw.smtp).source(f.net.client(0));

    let r = client().send(TAILSPIN, BOB, &message(TAILSPIN, BOB, "plaintext", &[]));
    assert!(!r.success, "plaintext: {}", r.output);
    assert!(
        r.output
            .contains("530 5.7.0 Must issue a STARTTLS command first"),
        "plaintext: {}",
        r.output
    );
    assert!(f.sink.messages().is_empty(), "plaintext: nothing relayed");

    let r =
        client()
            .starttls(&f.pki.ca)
            .send(TAILSPIN, BOB, &message(TAILSPIN, BOB, "starttls", &[]));
    assert!(r.success, "STARTTLS: {}", r.output);
    let m = f.sink.wait_messages(1);
    let h = connector_header(&m[0]);
    assert!(
        h.starts_with("mail/tailspin;") && h.contains("tls=1.") && h.contains("cert=none"),
        "STARTTLS: {h}"
    );

    let r = client()
        .starttls(&f.pki.ca)
        .cert(&f.pki.wrong_name_client)
        .send(CONTOSO, BOB, &message(CONTOSO, BOB, "mismatch", &[]));
    assert!(!r.success, "name mismatch: {}", r.output);
    assert!(
        r.output.contains("550 5.7.1"),
        "name mismatch: {}",
        r.output
    );

    let r = client()
        .starttls(&f.pki.ca)
        .cert(&f.pki.contoso_client)
        .send(CONTOSO, BOB, &message(CONTOSO, BOB, "match", &[]));
    assert!(r.success, "name match: {}", r.output);
    let m = f.sink.wait_messages(2);
    assert_eq!(m.len(), 2, "the mismatch was not relayed");
    assert_eq!(m[1].mail_from, CONTOSO);
    let h = connector_header(&m[1]);
    assert!(
        h.starts_with("mail/contoso;") && h.contains("cert=mail.contoso.com"),
        "name match: {h}"
    );
}

enum Receiver {
    Postfix(Postfix),
    Exim(Exim),
}

impl Receiver {
    fn log(&self) -> String {
        match self {
            Receiver::Postfix(p) => p.maillog(),
            Receiver::Exim(e) => e.mainlog(),
        }
    }

    /// Waits until mail from `from` was received and dropped; asserts the session had TLS.
    fn wait_received_over_tls(&self, from: &str) {
        match self {
            Receiver::Postfix(p) => {
                let r = p.wait_received(from);
                assert!(r.tls, "received over TLS: {r:?}\n{}", p.maillog());
            }
            Receiver::Exim(e) => {
                let line = e.wait_received(from);
                assert!(
                    line.contains(" P=esmtps ") && line.contains(" X=TLS"),
                    "received over TLS: {line}"
                );
            }
        }
    }

    /// Whether the log shows any message from `from` (a refused cell must show none).
    fn saw_sender(&self, from: &str) -> bool {
        let log = self.log();
        match self {
            Receiver::Postfix(_) => log.contains(&format!("from=<{from}>")),
            Receiver::Exim(_) => log.contains(from),
        }
    }
}

/// The partner's MTA as an Outbound smart host with a partner-CA certificate for
/// `mx.partner.test`; two `DomainValidation` connectors point at it: one expecting that name
/// (delivered), one expecting `mx.other.test` (`451 4.7.5`, nothing sent).
fn receiver_cells(mta: Mta) {
    let net = Net::new();
    let pki = Pki::generate();
    let partner = PartnerPki::generate();
    let org = Sink::start(net.sink_ip());
    let ip = net.ip(30);
    let listen = SocketAddr::from((ip, free_port(ip)));
    let mut opts = ReceiverOptions::new(listen, &["dv.partner.test", "wrong.partner.test"]);
    opts.server_cert = Some(partner.server("mx", &["mx.partner.test"]));
    let rx = match mta {
        Mta::Postfix => Receiver::Postfix(Postfix::start_receiver(opts)),
        Mta::Exim => Receiver::Exim(Exim::start_receiver(opts)),
        Mta::OpenSmtpd => panic!("OpenSMTPD 6.8 cannot serve STARTTLS with OpenSSL 3"),
    };
    let connector = |name: &str, domain: &str, tls_domain: &str| {
        json!({
            "name": name, "generation": 1, "domains": [domain],
            "smartHosts": [format!("[{}]:{}", listen.ip(), listen.port())],
            "tls": "DomainValidation", "tlsDomain": tls_domain,
            "trustBundleFile": partner.ca,
        })
    };
    let gw = Gateway::start(
        net.gateway_ip(),
        &pki,
        GatewaySpec::new(
            org.addr,
            json!({"inbound": [], "outbound": [
                connector("partners/dv", "dv.partner.test", "mx.partner.test"),
                connector("partners/wrong", "wrong.partner.test", "mx.other.test"),
            ]}),
        )
        .fleet(json!({"internalSenders": {"ipRanges": [net.cidr()]}})),
    );
    let send = |from: &str, rcpt: &str| {
        let (mut c, _) = SmtpConn::connect(gw.smtp, Some(net.client(0)));
        c.cmd("EHLO relay.example.org");
        let t = c.send_mail(from, &[rcpt], &message(from, rcpt, "outbound", &[]));
        c.quit();
        t
    };

    let ok = format!("ok-{mta:?}@example.org").to_ascii_lowercase();
    send(&ok, "dana@dv.partner.test")
        .assert_delivered(&format!("{mta:?}: DomainValidation, the name matches"));
    rx.wait_received_over_tls(&ok);

    let wrong = format!("wrong-{mta:?}@example.org").to_ascii_lowercase();
    let t = send(&wrong, "dana@wrong.partner.test");
    t.assert_refused(
        "451 4.7.5",
        &format!("{mta:?}: DomainValidation, wrong name"),
    );
    let reply = t.first_failure().map(|r| r.text()).unwrap_or_default();
    assert!(
        reply.contains("certificate name mismatch"),
        "{mta:?}: the reply names the reason: {reply}"
    );
    assert!(
        !rx.saw_sender(&wrong),
        "{mta:?}: the partner saw the refused sender:\n{}",
        rx.log()
    );
    assert!(org.messages().is_empty(), "nothing went upstream");
}

#[test]
fn postfix_receiver_domain_validation_delivers_and_refuses_wrong_name_451() {
    receiver_cells(Mta::Postfix);
}

#[test]
fn exim_receiver_domain_validation_delivers_and_refuses_wrong_name_451() {
    receiver_cells(Mta::Exim);
}

/// A second Contoso CA (the rotated one) and a `mail.contoso.com` client certificate from it,
/// written next to the test PKI's files.
fn rotated_contoso(pki: &Pki) -> (String, CertPair) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "Contoso CA (rotated)");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("key")).expect("CA");
    let mut leaf =
        CertificateParams::new(vec!["mail.contoso.com".to_string()]).expect("leaf params");
    leaf.distinguished_name
        .push(DnType::CommonName, "mail.contoso.com");
    leaf.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().expect("key");
    let cert = leaf.signed_by(&key, &ca).expect("sign leaf");
    let pair = CertPair {
        cert: pki.dir().join("contoso-rotated-client.crt"),
        key: pki.dir().join("contoso-rotated-client.key"),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    };
    std::fs::write(&pair.cert, &pair.cert_pem).expect("write cert");
    std::fs::write(&pair.key, &pair.key_pem).expect("write key");
    (ca.pem(), pair)
}

/// The partner's CA rotated the way cert-manager users do it: the connector's trust bundle
/// (`ca.crt`) first holds the old CA, then the old and the new one, then only the new one
/// (each step a reload of the connectors file). While both are there, mail signed by either is
/// identified; before, the new CA's certificate is refused, after, the old one's.
#[test]
fn partner_ca_rotation_old_and_new_bundle_then_new_only() {
    let mut f = Fixture::build(
        SinkOptions::default(),
        |_, s| s,
        |_, pki| partner_connectors(pki),
    );
    let (new_ca, new_client) = rotated_contoso(&f.pki);
    let old_client = f.pki.contoso_client.clone();
    let both = format!("{}{}", f.pki.contoso_ca_pem, new_ca);
    for pem in [&both, &new_ca] {
        std::fs::write(f.gw.material_dir().join(material_name(pem)), pem).expect("material");
    }
    let with_bundle = |bundle: &str| {
        connectors(vec![
            inbound(
                "mail/contoso",
                &["contoso.com"],
                json!({"identifyBy": "Certificate", "requireTls": true, "generation": 2,
                       "certificate": {"subjectName": "mail.contoso.com",
                                       "trustBundleFile": material_name(bundle)},
                       "restrictToCertificate": true}),
            ),
            inbound(
                "mail/tailspin",
                &["tailspin.test"],
                json!({"requireTls": true}),
            ),
        ])
    };
    let mut sent = 0;
    let mut send = |f: &Fixture, cert: &CertPair, what: &str, accepted: bool| {
        let r = Msmtp::new(f.gw.smtp)
            .source(f.net.client(1))
            .starttls(&f.pki.ca)
            .cert(cert)
            .send(CONTOSO, BOB, &message(CONTOSO, BOB, what, &[]));
        if accepted {
            assert!(r.success, "{what}: {}", r.output);
            sent += 1;
            let m = f.sink.wait_messages(sent);
            let h = connector_header(&m[sent - 1]);
            assert!(
                h.starts_with("mail/contoso;") && h.contains("cert=mail.contoso.com"),
                "{what}: {h}"
            );
        } else {
            assert!(!r.success, "{what}: {}", r.output);
            assert!(r.output.contains("550 5.7.1"), "{what}: {}", r.output);
            assert_eq!(f.sink.messages().len(), sent, "{what}: not relayed");
        }
    };
    let reload = |f: &mut Fixture, bundle: &str| {
        f.gw.rewrite_connectors(&with_bundle(bundle));
        let status = f.gw.wait_config_hash(&f.gw.expected_hash());
        assert!(status["lastReloadError"].is_null(), "{status}");
    };

    send(&f, &old_client, "old CA only: old certificate", true);
    send(&f, &new_client, "old CA only: new certificate", false);

    reload(&mut f, &both);
    send(&f, &old_client, "old and new CA: old certificate", true);
    send(&f, &new_client, "old and new CA: new certificate", true);

    reload(&mut f, &new_ca);
    send(&f, &new_client, "new CA only: new certificate", true);
    send(&f, &old_client, "new CA only: old certificate", false);
}
