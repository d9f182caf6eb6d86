//! Client certificates judged by real TLS clients (issue 12 review findings): trust bundles are
//! keyed by the file they resolve to, not by the name written in the config, and only DNS names
//! in a certificate can become its verified name (nothing else is ever written into the
//! `X-Partnergate-Connector` header).

use std::path::Path;

use crate::support::{
    CertPair, ClientTls, Fixture, SinkOptions, SmtpConn, connector_header, connectors, inbound,
    message,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use serde_json::{Value, json};

const BOB: &str = "bob@example.org";

/// Replaces the fleet file with the fixture's fleet settings merged with `patch` and the
/// connectors file with `next`, then waits until the gateway runs on them.
fn reconfigure(f: &mut Fixture, patch: &Value, next: &Value) {
    let mut fleet: Value =
        serde_json::from_slice(&std::fs::read(&f.gw.fleet_path).expect("read fleet"))
            .expect("fleet json");
    crate::support::merge_json(&mut fleet, patch);
    std::fs::write(
        &f.gw.fleet_path,
        serde_json::to_vec_pretty(&fleet).expect("fleet json"),
    )
    .expect("write fleet");
    f.gw.rewrite_connectors(next);
    let status = f.gw.wait_config_hash(&f.gw.expected_hash());
    assert!(status["lastReloadError"].is_null(), "{status}");
}

/// Sends one message over STARTTLS presenting `cert`; returns whether it was accepted.
fn send_with_cert(f: &Fixture, client: u8, cert: &CertPair, from: &str, subject: &str) -> bool {
    let (mut c, _) = SmtpConn::connect(f.gw.smtp, Some(f.net.client(client)));
    c.cmd("EHLO client.test");
    c.starttls(&ClientTls::new(&f.pki.ca).with_cert(cert));
    c.cmd("EHLO client.test");
    let t = c.send_mail(from, &[BOB], &message(from, BOB, subject, &[]));
    c.quit();
    t.steps.last().is_some_and(|(_, r)| r.code == 250)
}

#[test]
fn same_relative_bundle_name_under_fleet_dir_and_material_dir_are_two_bundles() {
    let mut f = Fixture::build(
        SinkOptions::default(),
        |_, s| s.fleet(json!({"defaultInbound": "Reject"})),
        |_, _| connectors(vec![]),
    );
    // `ca.pem` next to the fleet file: the test CA, which signed `relay.example.org` (internal).
    // `ca.pem` in materialDir: the Contoso CA, which signed `mail.contoso.com` (the partner).
    let fleet_dir = f.gw.fleet_path.parent().expect("fleet dir").to_path_buf();
    std::fs::write(fleet_dir.join("ca.pem"), &f.pki.ca_pem).expect("write fleet bundle");
    std::fs::write(f.gw.material_dir().join("ca.pem"), &f.pki.contoso_ca_pem)
        .expect("write material bundle");
    let next = connectors(vec![inbound(
        "mail/contoso",
        &["contoso.com"],
        json!({"identifyBy": "Certificate", "requireTls": true,
               "certificate": {"subjectName": "mail.contoso.com", "trustBundleFile": "ca.pem"}}),
    )]);
    reconfigure(
        &mut f,
        &json!({"internalSenders": {"certificateNames": ["relay.example.org"],
                                     "trustBundleFile": "ca.pem"}}),
        &next,
    );

    let partner = f.pki.contoso_client.clone();
    assert!(
        send_with_cert(&f, 0, &partner, "alice@contoso.com", "partner"),
        "the partner's certificate is judged by materialDir/ca.pem (Contoso CA)"
    );
    let internal = f.pki.internal_client.clone();
    assert!(
        send_with_cert(&f, 1, &internal, "ops@example.org", "internal"),
        "the internal sender's certificate is judged by the fleet dir's ca.pem (test CA)"
    );
    let m = f.sink.wait_messages(2);
    assert_eq!(m[0].mail_from, "alice@contoso.com");
    let h = connector_header(&m[0]);
    assert!(
        h.contains("mail/contoso") && h.contains("cert=mail.contoso.com"),
        "{h}"
    );
    assert_eq!(m[1].mail_from, "ops@example.org");
}

/// A CA of the test's own (its key is needed to sign odd certificates) and a client
/// certificate from it whose only SAN dNSName is `san`.
fn odd_client(dir: &Path, san: &str) -> (String, CertPair) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "Odd CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("key")).expect("CA");
    let mut leaf = CertificateParams::new(vec![san.to_string()]).expect("rcgen takes the SAN");
    leaf.distinguished_name
        .push(DnType::CommonName, "mail.contoso.com");
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().expect("key");
    let cert = leaf.signed_by(&key, &ca).expect("sign leaf");
    let stem = format!("odd-{}", crate::support::sha256_hex(san.as_bytes()));
    let pair = CertPair {
        cert: dir.join(format!("{stem}.crt")),
        key: dir.join(format!("{stem}.key")),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    };
    std::fs::write(&pair.cert, &pair.cert_pem).expect("write cert");
    std::fs::write(&pair.key, &pair.key_pem).expect("write key");
    (ca.pem(), pair)
}

#[test]
fn a_san_that_is_not_a_dns_name_neither_matches_nor_reaches_the_header() {
    let mut f = Fixture::start(connectors(vec![]));
    for (i, san) in [
        // Its first label holds CRLF and two header lines; the rest matches `*.contoso.com`.
        "a\r\nX-Injected: yes\r\nX-Pad: b.contoso.com",
        "evil name.contoso.com",
    ]
    .into_iter()
    .enumerate()
    {
        let (ca_pem, pair) = odd_client(f.gw.dir(), san);
        let bundle = format!("odd-ca-{i}.pem");
        std::fs::write(f.gw.material_dir().join(&bundle), &ca_pem).expect("write bundle");
        let next = connectors(vec![inbound(
            "mail/contoso",
            &["contoso.com"],
            json!({"identifyBy": "Certificate", "requireTls": true, "generation": i + 2,
                   "certificate": {"subjectName": "*.contoso.com", "trustBundleFile": bundle}}),
        )]);
        reconfigure(&mut f, &json!({}), &next);
        // defaultInbound Accept: the message is relayed either way, so its headers show what a
        // matched name would have written.
        assert!(
            send_with_cert(&f, i as u8, &pair, "alice@contoso.com", &format!("odd {i}")),
            "{san:?}: accepted as unclaimed"
        );
        let m = f.sink.wait_messages(i + 1);
        let m = &m[i];
        assert!(
            m.header_values("X-Injected").is_empty() && m.header_values("X-Pad").is_empty(),
            "{san:?}: a SAN injected headers:\n{}",
            m.headers()
        );
        let h = connector_header(m);
        assert!(
            !h.contains("mail/contoso") && h.contains("cert=none"),
            "{san:?}: not a DNS name, so it cannot match the connector: {h}"
        );
    }
}
