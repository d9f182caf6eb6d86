//! Issue 12, policy items, through the real gateway binary with real clients (Python smtplib,
//! and the binary's own `check`):
//! - a connector's restrictToIPRanges / restrictToCertificate guard its sender domains whatever
//!   identifyBy says (ARCHITECTURE section 3, claiming rule 4);
//! - envelope domains are compared in their UTS-46 A-label form, invalid IDNA is refused
//!   (553 5.1.7 sender, 553 5.1.3 recipient), and addresses are relayed as the client sent them;
//! - `requireTls: false` with `minTlsVersion: "1.3"` is refused as a config;
//! - certificate-name wildcards over a single label (`*.com`) are refused as a config.
//!
//! Every refusal is paired with an accepted control, so a gateway refusing everything fails.

use std::ffi::OsStr;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use crate::support::gateway::run_cli;
use crate::support::pki::material_name;
use crate::support::{
    CertPair, Fixture, Gateway, GatewaySpec, Net, Pki, Python, Sink, SinkOptions, Transcript,
    connector_header, connectors, contoso_bundle, inbound,
};
use serde_json::{Value, json};

const BOB: &str = "bob@example.org";

/// A client from `source`, described before the gateway it talks to is known.
#[derive(Default)]
struct Client {
    source: Option<Ipv4Addr>,
    ca: Option<PathBuf>,
    cert: Option<CertPair>,
    tls12: bool,
}

impl Client {
    fn from(ip: Ipv4Addr) -> Client {
        Client {
            source: Some(ip),
            ..Client::default()
        }
    }

    fn starttls(mut self, pki: &Pki) -> Client {
        self.ca = Some(pki.ca.clone());
        self
    }

    fn cert(mut self, pair: &CertPair) -> Client {
        self.cert = Some(pair.clone());
        self
    }

    fn tls12(mut self) -> Client {
        self.tls12 = true;
        self
    }

    /// One message through support::Python (SMTPUTF8 when an address is not ASCII).
    fn send(&self, server: SocketAddr, from: &str, to: &[&str]) -> Transcript {
        let mut p = Python::new(server);
        if let Some(ip) = self.source {
            p = p.local(ip);
        }
        if let Some(ca) = &self.ca {
            p = p.starttls(ca);
        }
        if let Some(pair) = &self.cert {
            p = p.cert(pair);
        }
        if self.tls12 {
            p = p.tls12();
        }
        p.send(from, to, "Subject: policy hardening\r\n\r\nhello\r\n")
    }
}

/// Issue 12 item 2, the reported case: `identifyBy: SenderIP` with restrictToIPRanges for
/// tailspin.test; x@tailspin.test from an address outside senderIPRanges was accepted as
/// unclaimed mail. It is now claimed by the connector (rule 4) and refused 550 5.7.1.
#[test]
fn restrict_to_ip_ranges_guards_the_domain_of_a_sender_ip_connector() {
    let f = Fixture::build(
        SinkOptions::default(),
        |_, s| s,
        |net, _| {
            connectors(vec![inbound(
                "mail/tailspin",
                &["tailspin.test"],
                json!({"identifyBy": "SenderIP", "senderIPRanges": [format!("{}/32", net.client(1))],
                       "restrictToIPRanges": true, "requireTls": false}),
            )])
        },
    );
    let outsider = f.net.client(2);
    let t = Client::from(outsider).send(f.gw.smtp, "x@tailspin.test", &[BOB]);
    t.assert_refused("550 5.7.1", "tailspin.test from outside senderIPRanges");
    let t = Client::from(outsider).send(f.gw.smtp, "x@Mail.TAILSPIN.test", &[BOB]);
    t.assert_delivered("a subdomain is not tailspin.test (no wildcard listed)");
    f.gw.wait_log(&["mail/tailspin", "restrictToIPRanges", &outsider.to_string()]);

    // Controls: the partner's own address, and another domain from the outsider.
    let t = Client::from(f.net.client(1)).send(f.gw.smtp, "x@tailspin.test", &[BOB]);
    t.assert_delivered("tailspin.test from inside senderIPRanges");
    let t = Client::from(outsider).send(f.gw.smtp, "x@elsewhere.test", &[BOB]);
    t.assert_delivered("another domain from the outsider stays unclaimed");
    let m = f.sink.wait_messages(3);
    assert_eq!(m.len(), 3, "nothing else was relayed");
    assert!(connector_header(&m[1]).contains("mail/tailspin"));
    assert_eq!(m[1].mail_from, "x@tailspin.test");
}

/// Issue 12 item 2, restrictToCertificate with SenderIP and Certificate identification: the
/// connectors' domains cannot be used from anywhere without the connector's certificate.
#[test]
fn restrict_to_certificate_guards_the_domains_of_sender_ip_and_certificate_connectors() {
    let f = Fixture::build(
        SinkOptions::default(),
        |_, s| s,
        |net, pki| {
            connectors(vec![
                inbound(
                    "mail/fabrikam-ip",
                    &["fabrikam.test"],
                    json!({"identifyBy": "SenderIP", "senderIPRanges": [format!("{}/32", net.client(1))],
                           "certificate": {"subjectName": "mail.fabrikam.example",
                                           "trustBundleFile": contoso_bundle(pki)},
                           "restrictToCertificate": true, "requireTls": false}),
                ),
                inbound(
                    "mail/contoso-cert",
                    &["contoso.com"],
                    json!({"identifyBy": "Certificate",
                           "certificate": {"subjectName": "mail.contoso.com",
                                           "trustBundleFile": contoso_bundle(pki)},
                           "restrictToCertificate": true, "requireTls": false}),
                ),
            ])
        },
    );
    let outsider = f.net.client(2);
    let plain = || Client::from(outsider);
    let tls = || Client::from(outsider).starttls(&f.pki);
    let untrusted = &f.pki.self_signed_client;
    for (client, from, what) in [
        (plain(), "x@fabrikam.test", "SenderIP connector, plaintext"),
        (
            tls(),
            "x@fabrikam.test",
            "SenderIP connector, no certificate",
        ),
        (
            tls().cert(untrusted),
            "x@fabrikam.test",
            "SenderIP connector, untrusted certificate",
        ),
        (
            tls(),
            "alice@contoso.com",
            "Certificate connector, no certificate",
        ),
        (
            tls().cert(untrusted),
            "alice@contoso.com",
            "Certificate connector, untrusted certificate",
        ),
        (
            tls().cert(&f.pki.wrong_name_client),
            "alice@contoso.com",
            "Certificate connector, trusted certificate with another name",
        ),
    ] {
        client
            .send(f.gw.smtp, from, &[BOB])
            .assert_refused("550 5.7.1", what);
    }
    f.gw.wait_log(&["mail/fabrikam-ip", "restrictToCertificate"]);
    f.gw.wait_log(&["mail/contoso-cert", "restrictToCertificate"]);
    assert!(f.sink.messages().is_empty(), "nothing relayed so far");

    // Controls: with each connector's certificate, delivered and named by the connector.
    tls()
        .cert(&f.pki.wrong_name_client)
        .send(f.gw.smtp, "x@fabrikam.test", &[BOB])
        .assert_delivered("SenderIP connector, its certificate, from outside its range");
    tls()
        .cert(&f.pki.contoso_client)
        .send(f.gw.smtp, "alice@contoso.com", &[BOB])
        .assert_delivered("Certificate connector, its certificate");
    tls()
        .send(f.gw.smtp, "x@elsewhere.test", &[BOB])
        .assert_delivered("another domain without a certificate");
    let m = f.sink.wait_messages(3);
    assert!(connector_header(&m[0]).contains("mail/fabrikam-ip"));
    assert!(connector_header(&m[1]).contains("mail/contoso-cert"));
}

/// Issue 12 item 3: Unicode spellings of a partner's domain were accepted in plaintext as
/// unclaimed although the connector requires TLS. UTS-46 maps them to the connector's domain,
/// so its rules apply; what is relayed keeps the address exactly as the client sent it.
#[test]
fn unicode_spellings_of_a_partner_domain_meet_its_connector() {
    let f = Fixture::start(connectors(vec![
        inbound("mail/bucher", &["xn--bcher-kva.test"], json!({})),
        inbound("mail/contoso", &["contoso.test"], json!({})),
    ]));
    let client = f.net.client(1);
    for from in [
        "ceo@bücher.test",
        "ceo@BÜCHER.test",
        "ceo@ｃｏｎｔｏｓｏ.test",
        "ceo@contoso。test",
    ] {
        Client::from(client)
            .send(f.gw.smtp, from, &[BOB])
            .assert_refused("530 5.7.0", &format!("{from} in plaintext"));
    }
    assert!(f.sink.messages().is_empty());

    for (i, (from, connector)) in [
        ("ceo@bücher.test", "mail/bucher"),
        ("ceo@contoso。test", "mail/contoso"),
    ]
    .into_iter()
    .enumerate()
    {
        Client::from(client)
            .starttls(&f.pki)
            .send(f.gw.smtp, from, &[BOB])
            .assert_delivered(&format!("{from} over TLS"));
        let m = f.sink.wait_messages(i + 1);
        assert!(connector_header(&m[i]).contains(connector), "{from}");
        assert_eq!(m[i].mail_from, from, "the sender is relayed as sent");
    }
}

/// Issue 12 item 3, recipients: `acceptedDomains` are matched after UTS-46, the recipient is
/// relayed as sent; a look-alike (Cyrillic а) is another domain.
#[test]
fn recipients_are_normalised_for_accepted_domains_and_relayed_as_sent() {
    let f = Fixture::start(connectors(vec![]));
    let client = Client::from(f.net.client(1));
    let ours = "x@ｅｘａｍｐｌｅ.org";
    client
        .send(f.gw.smtp, "eve@stranger.test", &[ours])
        .assert_delivered("fullwidth example.org");
    let m = f.sink.wait_messages(1);
    assert_eq!(m[0].rcpt_to, [ours], "the recipient is relayed as sent");
    let t = client.send(f.gw.smtp, "eve@stranger.test", &["x@exаmple.org"]);
    t.assert_refused("550 5.7.1", "Cyrillic look-alike of example.org");
    assert_eq!(f.sink.messages().len(), 1);
}

/// Issue 12 item 3: a domain that is not valid IDNA is refused, 553 5.1.7 for the sender and
/// 553 5.1.3 for a recipient (it matched `*.example.org` before).
#[test]
fn invalid_idna_domains_are_refused_553() {
    let f = Fixture::start(connectors(vec![]));
    let client = Client::from(f.net.client(1));
    let t = client.send(f.gw.smtp, "ceo@xn--a.test", &[BOB]);
    t.assert_refused("553 5.1.7", "sender domain with invalid Punycode");
    let t = client.send(f.gw.smtp, "ceo@good.test", &["x@xn--a.example.org"]);
    t.assert_refused("553 5.1.3", "recipient domain with invalid Punycode");
    let t = client.send(f.gw.smtp, "ceo@good.test", &["x@mail.example.org"]);
    t.assert_delivered("control");
    assert_eq!(f.sink.wait_messages(1).len(), 1);
    f.gw.wait_log(&["invalidDomain", "MAIL FROM refused"]);
}

/// Review finding: `requireTls: false` with `minTlsVersion: "1.3"` accepted plaintext but
/// refused TLS 1.2. The combination is refused as a config (reload and `check`, naming the
/// field); the last good config stays in force.
#[test]
fn min_tls_13_without_require_tls_is_refused_as_a_config() {
    let contoso = |min: &str| {
        connectors(vec![inbound(
            "mail/contoso",
            &["contoso.com"],
            json!({"requireTls": false, "minTlsVersion": min}),
        )])
    };
    let mut f = Fixture::start(contoso("1.2"));
    let tls12 = || Client::from(f.net.client(1)).starttls(&f.pki).tls12();
    tls12()
        .send(f.gw.smtp, "alice@contoso.com", &[BOB])
        .assert_delivered("TLS 1.2 with requireTls false");

    let bad = contoso("1.3");
    f.gw.rewrite_connectors(&bad);
    f.gw.wait_log(&["config reload failed", "inbound[0].minTlsVersion"]);
    tls12()
        .send(f.gw.smtp, "alice@contoso.com", &[BOB])
        .assert_delivered("TLS 1.2 under the last good config");
    Client::from(f.net.client(1))
        .send(f.gw.smtp, "alice@contoso.com", &[BOB])
        .assert_delivered("plaintext under the last good config");
    assert_eq!(f.sink.wait_messages(3).len(), 3);

    let (code, out) = check(&f.gw, None, Some(&bad));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("inbound[0].minTlsVersion"), "{out}");
}

/// Runs `partnergate-gateway check` on the gateway's fleet file (or `fleet`) and connectors
/// file (or `connectors`), written next to them.
fn check(gw: &Gateway, fleet: Option<&Value>, connectors: Option<&Value>) -> (i32, String) {
    let dir = gw.dir();
    let mut fleet_path = dir.join("fleet").join("fleet.json");
    if let Some(v) = fleet {
        fleet_path = dir.join("fleet").join("check-fleet.json");
        std::fs::write(&fleet_path, serde_json::to_vec(v).expect("json")).expect("write");
    }
    let mut connectors_path = dir.join("connectors").join("connectors.json");
    if let Some(v) = connectors {
        connectors_path = dir.join("connectors").join("check-connectors.json");
        std::fs::write(&connectors_path, serde_json::to_vec(v).expect("json")).expect("write");
    }
    run_cli(&[
        OsStr::new("check"),
        OsStr::new("--fleet"),
        fleet_path.as_os_str(),
        OsStr::new("--connectors"),
        connectors_path.as_os_str(),
    ])
}

/// Review finding: `tlsDomain`, `upstream.tlsDomain` and `internalSenders.certificateNames`
/// accepted `*.com`. An Outbound connector whose tlsDomain became `*.test` would accept any
/// certificate under .test: the reload is refused naming the field, and a real internal
/// sender still gets the DomainValidation refusal of the last good config.
#[test]
fn single_label_certificate_wildcards_are_refused_as_a_config() {
    let net = Net::new();
    let pki = Pki::generate();
    let org = Sink::start(net.sink_ip());
    let partner = Sink::start_with(
        net.ip(3),
        SinkOptions {
            starttls: Some(pki.sink.clone()),
            ..SinkOptions::default()
        },
    );
    let internal = net.client(5);
    let files = |tls_domain: &str, subject: &str| {
        json!({
            "inbound": [inbound("mail/contoso", &["contoso.com"], json!({
                "identifyBy": "Certificate",
                "certificate": {"subjectName": subject, "trustBundleFile": contoso_bundle(&pki)}}))],
            "outbound": [{
                "name": "mail/partner", "generation": 1, "domains": ["partner.test"],
                "smartHosts": [format!("[{}]:{}", partner.addr.ip(), partner.addr.port())],
                "tls": "DomainValidation", "tlsDomain": tls_domain,
                "trustBundleFile": material_name(&pki.ca_pem)}],
        })
    };
    let mut gw = Gateway::start(
        net.gateway_ip(),
        &pki,
        GatewaySpec::new(org.addr, files("mx.partner.test", "mail.contoso.com"))
            .fleet(json!({"internalSenders": {"ipRanges": [format!("{internal}/32")]}})),
    );
    let smtp = gw.smtp;
    let send = || Client::from(internal).send(smtp, "alice@example.org", &["bob@partner.test"]);
    // The partner's certificate is for sink.test: DomainValidation for mx.partner.test fails.
    send().assert_refused("451 4.7.5", "certificate name mismatch");

    gw.rewrite_connectors(&files("*.test", "*.com"));
    let line = gw.wait_log(&["config reload failed", "outbound[0].tlsDomain"]);
    assert!(
        line.contains("inbound[0].certificate.subjectName"),
        "{line}"
    );
    send().assert_refused("451 4.7.5", "the *.test wildcard was not applied");
    assert_eq!(partner.messages().len(), 0);

    // Control: a wildcard over two labels is a valid config.
    gw.rewrite_connectors(&files("*.partner.test", "*.contoso.com"));
    gw.wait_config_hash(&gw.expected_hash());

    // The fleet's certificate names, checked by the binary's `check`.
    let fleet_path = gw.dir().join("fleet").join("fleet.json");
    let mut fleet: Value =
        serde_json::from_slice(&std::fs::read(fleet_path).expect("read fleet")).expect("json");
    fleet["upstream"]["tls"] = json!("DomainValidation");
    fleet["upstream"]["tlsDomain"] = json!("*.com");
    fleet["internalSenders"]["certificateNames"] = json!(["relay.example.org", "*.test"]);
    let (code, out) = check(&gw, Some(&fleet), None);
    assert_eq!(code, 1, "{out}");
    for path in ["upstream.tlsDomain", "internalSenders.certificateNames[1]"] {
        assert!(out.contains(path), "no error for {path}: {out}");
    }
    fleet["upstream"]["tlsDomain"] = json!("*.example.org");
    fleet["internalSenders"]["certificateNames"] = json!(["relay.example.org", "*.relays.test"]);
    let (code, out) = check(&gw, Some(&fleet), None);
    assert_eq!(code, 0, "{out}");
}
