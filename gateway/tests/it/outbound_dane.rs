//! Issue 15, DANE (RFC 7672) for `useMX` Outbound connectors, against real parts: Knot serving
//! a DNSSEC-signed zone (signed in the test with BIND's tools, the root key as the gateway's
//! trust anchor — support::dns), an unsigned zone, and Postfix as the partner's MX presenting a
//! self-signed certificate (DANE-EE) or one from the partner's CA with the chain (DANE-TA).
//! Every case asserts the reply, what the partner's MX received, and the policy metric.

use serde_json::json;

use crate::outbound_support::tls_policy::{
    fleet, partner_mx, policy_count, received_from, tlsa_ee_spki, tlsa_ta_cert, with_chain,
};
use crate::outbound_support::{PartnerPki, send};
use crate::support::dns::{DnsServer, Zone};
use crate::support::{Gateway, GatewaySpec, Net, Pki, Sink, SinkOptions};

#[test]
fn dane_ee_ta_mismatch_bogus_and_unsigned_per_mode() {
    let net = Net::new();
    let pki = Pki::generate();
    let partner = PartnerPki::generate();
    let org = Sink::start(net.sink_ip());
    let (ip_ee, ip_ta) = (net.ip(30), net.ip(31));

    // DANE-EE: a self-signed certificate whose key the TLSA record pins (no CA, a name the MX
    // host does not have: DANE-EE checks neither).
    let ee = partner.self_signed("ee", &["not-the-mx.example"]);
    // DANE-TA: issued by the partner CA for the MX host, presented with the CA.
    let ta_leaf = partner.server("ta", &["mx-ta.dane.test"]);
    let ta = with_chain(&ta_leaf, &partner.ca, net_dir(&ta_leaf));
    // A key the partner does not use.
    let other = partner.self_signed("other", &["mx-ee.dane.test"]);

    let ee_tlsa = tlsa_ee_spki(&ee.cert);
    let dns = DnsServer::start(
        net.ip(53),
        vec![
            Zone::signed(
                "dane.test",
                &[
                    "ee IN MX 10 mx-ee",
                    &format!("mx-ee IN A {ip_ee}"),
                    &format!("_25._tcp.mx-ee IN TLSA {ee_tlsa}"),
                    "ta IN MX 10 mx-ta",
                    &format!("mx-ta IN A {ip_ta}"),
                    &format!("_25._tcp.mx-ta IN TLSA {}", tlsa_ta_cert(&partner.ca)),
                    "bad IN MX 10 mx-bad",
                    &format!("mx-bad IN A {ip_ee}"),
                    &format!("_25._tcp.mx-bad IN TLSA {}", tlsa_ee_spki(&other.cert)),
                    "bogus IN MX 10 mx-bogus",
                    &format!("mx-bogus IN A {ip_ee}"),
                    &format!("_25._tcp.mx-bogus IN TLSA {ee_tlsa}"),
                    // A secure host behind a bogus MX answer.
                    "mxbogus IN MX 10 mx-ee",
                ],
            )
            .corrupt_signature("_25._tcp.mx-bogus", "TLSA")
            .corrupt_signature("mxbogus", "MX"),
            // Unsigned: its TLSA record (pinning a key the MX does not use) must be ignored.
            Zone::unsigned(
                "plain.test",
                &[
                    "@ IN MX 10 mx",
                    "m IN MX 10 mx",
                    // An unsigned MX answer naming a host with secure TLSA records.
                    "viaplain IN MX 10 mx-ee.dane.test.",
                    &format!("mx IN A {ip_ee}"),
                    &format!("_25._tcp.mx IN TLSA {}", tlsa_ee_spki(&other.cert)),
                ],
            ),
        ],
    );
    let mx_ee = partner_mx(
        ip_ee,
        "mx-ee.dane.test",
        &[
            "ee.dane.test",
            "bad.dane.test",
            "bogus.dane.test",
            "plain.test",
            "m.plain.test",
        ],
        ee.clone(),
    );
    let mx_ta = partner_mx(ip_ta, "mx-ta.dane.test", &["ta.dane.test"], ta);

    let gw = Gateway::start(
        net.gateway_ip(),
        &pki,
        GatewaySpec::new(
            org.addr,
            json!({"inbound": [], "outbound": [
                {"name": "partners/dane", "generation": 1,
                 "domains": ["ee.dane.test", "ta.dane.test", "bad.dane.test", "bogus.dane.test",
                             "plain.test", "mxbogus.dane.test"],
                 "useMX": true, "tls": "EncryptionOnly", "dane": "Opportunistic"},
                {"name": "partners/dane-mandatory", "generation": 1,
                 "domains": ["m.plain.test", "viaplain.plain.test"],
                 "useMX": true, "tls": "EncryptionOnly", "dane": "Mandatory"},
            ]}),
        )
        .fleet(fleet(&net.cidr(), &dns, pki_dir(&pki), None)),
    );
    let c = |policy: &str, result: &str| policy_count(&gw, "partners/dane", policy, result);

    // DANE-EE match: delivered over TLS although the certificate is self-signed and names
    // another host.
    send(&gw, &net, "ee@example.org", "a@ee.dane.test").assert_delivered("DANE-EE match");
    assert!(mx_ee.wait_received("ee@example.org").tls);
    assert_eq!(c("dane", "success"), 1);

    // DANE-TA match: chain to the TLSA-pinned CA and the MX host's name.
    send(&gw, &net, "ta@example.org", "b@ta.dane.test").assert_delivered("DANE-TA match");
    assert!(mx_ta.wait_received("ta@example.org").tls);
    assert_eq!(c("dane", "success"), 2);

    // TLSA mismatch: secure records pin another key.
    let t = send(&gw, &net, "bad@example.org", "c@bad.dane.test");
    t.assert_refused("451 4.7.5", "TLSA mismatch");
    let text = t.first_failure().map(|r| r.text()).unwrap_or_default();
    assert!(
        text.contains("DANE") && text.contains("no TLSA record matches"),
        "{text}"
    );
    assert_eq!(c("dane", "failure"), 1);

    // Bogus signature over the TLSA records: deferred before connecting, even in
    // Opportunistic mode.
    let t = send(&gw, &net, "bogus@example.org", "d@bogus.dane.test");
    t.assert_refused("451 4.7.5", "bogus TLSA");
    let text = t.first_failure().map(|r| r.text()).unwrap_or_default();
    assert!(text.contains("bogus"), "{text}");
    assert_eq!(c("dane", "deferred"), 1);

    // Unsigned zone, Opportunistic: the level (EncryptionOnly) applies, the unsigned TLSA
    // record that would not match is ignored.
    send(&gw, &net, "plain@example.org", "e@plain.test")
        .assert_delivered("insecure, Opportunistic");
    assert!(mx_ee.wait_received("plain@example.org").tls);
    assert_eq!(c("none", "fallback"), 1);

    // Unsigned zone, Mandatory: deferred.
    let t = send(&gw, &net, "mand@example.org", "f@m.plain.test");
    t.assert_refused("451 4.7.5", "insecure, Mandatory");
    let text = t.first_failure().map(|r| r.text()).unwrap_or_default();
    assert!(text.contains("Mandatory"), "{text}");
    assert_eq!(
        policy_count(&gw, "partners/dane-mandatory", "dane", "deferred"),
        1
    );

    // A bogus MX answer: deferred before any TLSA lookup or connection.
    let t = send(&gw, &net, "mxbogus@example.org", "g@mxbogus.dane.test");
    t.assert_refused("451 4.7.5", "bogus MX");
    let text = t.first_failure().map(|r| r.text()).unwrap_or_default();
    assert!(text.contains("MX records failed (bogus)"), "{text}");
    assert_eq!(c("dane", "deferred"), 2);

    // RFC 7672 2.2.1: an insecure MX answer does not let the host's (secure) TLSA records
    // apply, so Mandatory defers.
    let t = send(&gw, &net, "viaplain@example.org", "h@viaplain.plain.test");
    t.assert_refused("451 4.7.5", "insecure MX, Mandatory");
    assert_eq!(
        policy_count(&gw, "partners/dane-mandatory", "dane", "deferred"),
        2
    );

    for from in [
        "bad@example.org",
        "bogus@example.org",
        "mand@example.org",
        "mxbogus@example.org",
        "viaplain@example.org",
    ] {
        assert!(
            !received_from(&mx_ee, from),
            "nothing from {from} reached the MX"
        );
    }
    gw.wait_log(&["TLS policy applied", "secure TLSA 3 1 1"]);
    // The RCPT decision line names the policy of the connection that carried the recipient.
    gw.wait_log(&["RCPT TO decided", "\"tls_policy\":\"dane\""]);
    assert!(org.messages().is_empty(), "nothing went upstream");
}

/// The validation probe reports which policy authenticated each MX host and what was found;
/// a bogus TLSA answer is a Failure with the `451 4.7.5` a recipient would get.
#[test]
fn probes_report_the_policy_per_next_hop() {
    let net = Net::new();
    let pki = Pki::generate();
    let partner = PartnerPki::generate();
    let org = Sink::start(net.sink_ip());
    let ip = net.ip(30);
    let ee = partner.self_signed("ee", &["mx-ee.dane.test"]);
    let tlsa = tlsa_ee_spki(&ee.cert);
    let dns = DnsServer::start(
        net.ip(53),
        vec![
            Zone::signed(
                "dane.test",
                &[
                    "ee IN MX 10 mx-ee",
                    &format!("mx-ee IN A {ip}"),
                    &format!("_25._tcp.mx-ee IN TLSA {tlsa}"),
                    "bogus IN MX 10 mx-bogus",
                    &format!("mx-bogus IN A {ip}"),
                    &format!("_25._tcp.mx-bogus IN TLSA {tlsa}"),
                ],
            )
            .corrupt_signature("_25._tcp.mx-bogus", "TLSA"),
        ],
    );
    let _mx = partner_mx(ip, "mx-ee.dane.test", &["ee.dane.test"], ee);
    let mut fleet = fleet(&net.cidr(), &dns, pki_dir(&pki), None);
    fleet["validationIntervalSecs"] = json!(600);
    let gw = Gateway::start(
        net.gateway_ip(),
        &pki,
        GatewaySpec::new(
            org.addr,
            json!({"inbound": [], "outbound": [
                {"name": "partners/dane", "generation": 1,
                 "domains": ["ee.dane.test", "bogus.dane.test"],
                 "useMX": true, "tls": "EncryptionOnly", "dane": "Opportunistic"},
            ]}),
        )
        .fleet(fleet),
    );
    let entry = |host: &str| {
        crate::support::wait_for(
            std::time::Duration::from_secs(30),
            &format!("a validation result for {host}"),
            || {
                gw.status()["validation"]
                    .as_array()
                    .and_then(|v| v.iter().find(|e| e["host"] == host).cloned())
            },
        )
    };
    let ok = entry("mx-ee.dane.test:25");
    assert_eq!(ok["result"], "Success", "{ok}");
    let policy = ok["policy"].as_str().unwrap_or_default();
    assert!(policy.starts_with("dane: DANE: secure TLSA 3 1 1"), "{ok}");
    let bad = entry("mx-bogus.dane.test:25");
    assert_eq!(bad["result"], "Failure", "{bad}");
    let error = bad["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("451 4.7.5") && error.contains("bogus"),
        "{bad}"
    );
    assert!(policy_count(&gw, "partners/dane", "dane", "deferred") >= 1);
}

fn net_dir(pair: &crate::support::CertPair) -> &std::path::Path {
    pair.cert.parent().expect("cert dir")
}

fn pki_dir(pki: &Pki) -> &std::path::Path {
    pki.ca.parent().expect("pki dir")
}

/// RFC 7672 2.2: a secure TLSA RRset none of whose records is usable for SMTP (here PKIX-EE,
/// usage 1) still makes STARTTLS mandatory: a host without STARTTLS is deferred, never sent
/// plaintext, under `dane: Opportunistic` and `tls: Opportunistic`; one with STARTTLS gets the
/// message over TLS.
#[test]
fn dane_unusable_tlsa_records_still_require_starttls() {
    let net = Net::new();
    let pki = Pki::generate();
    let partner = PartnerPki::generate();
    let org = Sink::start(net.sink_ip());
    let (ip_plain, ip_tls) = (net.ip(30), net.ip(31));
    let cert = partner.server("tls", &["mx-tls.unusable.test"]);
    let pkix_ee = tlsa_ee_spki(&cert.cert).replacen('3', "1", 1);
    let dns = DnsServer::start(
        net.ip(53),
        vec![Zone::signed(
            "unusable.test",
            &[
                "plain IN MX 10 mx-plain",
                &format!("mx-plain IN A {ip_plain}"),
                &format!("_25._tcp.mx-plain IN TLSA {pkix_ee}"),
                "tls IN MX 10 mx-tls",
                &format!("mx-tls IN A {ip_tls}"),
                &format!("_25._tcp.mx-tls IN TLSA {pkix_ee}"),
            ],
        )],
    );
    let plain = Sink::start_at(
        std::net::SocketAddr::from((ip_plain, 25)),
        SinkOptions::default(),
    );
    let tls = Sink::start_at(
        std::net::SocketAddr::from((ip_tls, 25)),
        SinkOptions {
            starttls: Some(cert),
            ..SinkOptions::default()
        },
    );
    let gw = Gateway::start(
        net.gateway_ip(),
        &pki,
        GatewaySpec::new(
            org.addr,
            json!({"inbound": [], "outbound": [
                {"name": "partners/unusable", "generation": 1,
                 "domains": ["plain.unusable.test", "tls.unusable.test"],
                 "useMX": true, "tls": "Opportunistic", "dane": "Opportunistic"},
            ]}),
        )
        .fleet(fleet(
            &net.cidr(),
            &dns,
            pki.ca.parent().expect("pki dir"),
            None,
        )),
    );

    let t = send(&gw, &net, "plain@example.org", "a@plain.unusable.test");
    t.assert_refused("451 4.7.5", "unusable TLSA records, no STARTTLS");
    let text = t.first_failure().map(|r| r.text()).unwrap_or_default();
    assert!(text.contains("does not offer STARTTLS"), "{text}");
    assert!(plain.messages().is_empty(), "nothing sent in plaintext");
    assert_eq!(policy_count(&gw, "partners/unusable", "dane", "failure"), 1);

    send(&gw, &net, "tls@example.org", "b@tls.unusable.test")
        .assert_delivered("unusable TLSA records, STARTTLS offered");
    assert!(tls.wait_messages(1)[0].tls);
    assert!(org.messages().is_empty(), "nothing went upstream");
}
