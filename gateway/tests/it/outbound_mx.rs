//! ARCHITECTURE section 4 (contract), `useMX`: the next hop of an Outbound connector is the
//! recipient domain's MX hosts (preference order, then their A/AAAA; the domain's own A/AAAA
//! when it has no MX), looked up on the fleet's `dnsResolver` — here a DNS server of the test on
//! a loopback address, so no other DNS server is ever asked. A private Postfix on port 25 of
//! the test's own address plays the partner's MX host; DomainValidation checks the MX host's
//! own name. MX answers pointing at loopback are refused unless `allowPrivateMxAddresses`
//! covers them: the tests that deliver allow their own /24 explicitly.

use std::time::Duration;

use crate::outbound_support::{DnsServer, PartnerPki, send};
use crate::support::postfix::ReceiverOptions;
use crate::support::{Gateway, GatewaySpec, Net, Pki, Postfix, Sink, SmtpConn, message, wait_for};
use serde_json::{Value, json};

fn validation_entry(gw: &Gateway, host: &str) -> Value {
    wait_for(
        Duration::from_secs(30),
        &format!("a validation result for {host} on /status"),
        || {
            gw.status()["validation"]
                .as_array()
                .and_then(|v| v.iter().find(|e| e["host"] == host).cloned())
        },
    )
}

#[test]
fn mx_routing_end_to_end() {
    let net = Net::new();
    let pki = Pki::generate();
    let partner = PartnerPki::generate();
    let org = Sink::start(net.sink_ip());
    let dns = DnsServer::start(net.ip(53));
    let (mx1, mx0) = (net.ip(30), net.ip(31));
    // mx0 is preferred but nothing listens there; mx1 is the partner's Postfix.
    dns.mx("partner.test", 20, "mx1.partner.test")
        .mx("partner.test", 10, "mx0.partner.test")
        .a("mx0.partner.test", mx0)
        .a("mx1.partner.test", mx1)
        // No MX: the domain's own address is the implicit MX.
        .a("implicit.test", mx1)
        // RFC 7505 null MX.
        .mx("nullmx.test", 0, ".")
        // An MX host whose name the partner's certificate does not carry.
        .mx("wrongname.test", 10, "mx9.wrongname.test")
        .a("mx9.wrongname.test", mx1)
        // An MX host without addresses.
        .mx("dangling.test", 10, "nowhere.dangling.test")
        // A (spoofed) MX answer naming a host whose certificate is valid for its own name but
        // not for the recipient domain.
        .mx("spoofed.test", 10, "mx1.partner.test");
    let mut opts = ReceiverOptions::new(
        std::net::SocketAddr::from((mx1, 25)),
        &[
            "partner.test",
            "implicit.test",
            "wrongname.test",
            "spoofed.test",
        ],
    );
    opts.hostname = "mx1.partner.test".into();
    opts.server_cert = Some(partner.server("mx1", &["mx1.partner.test", "implicit.test"]));
    let pf = Postfix::start_receiver(opts);

    let gw = Gateway::start(
        net.gateway_ip(),
        &pki,
        GatewaySpec::new(
            org.addr,
            json!({"inbound": [], "outbound": [{
                "name": "partners/mx", "generation": 1,
                "domains": ["partner.test", "implicit.test", "nullmx.test", "wrongname.test",
                            "dangling.test", "missing.test", "spoofed.test"],
                "useMX": true,
                "tls": "DomainValidation",
                "trustBundleFile": partner.ca,
            }]}),
        )
        .fleet(json!({
            "internalSenders": {"ipRanges": [net.cidr()]},
            "dnsResolver": dns.addr.to_string(),
            "allowPrivateMxAddresses": [net.cidr()],
            "validationIntervalSecs": 600,
        })),
    );

    // Preference order: mx0 refuses the connection, mx1 takes the message over verified TLS
    // (its certificate matches the MX host name mx1.partner.test).
    send(&gw, &net, "ops@example.org", "dana@partner.test").assert_delivered("MX delivery");
    let r = pf.wait_received("ops@example.org");
    assert!(r.tls, "delivered over TLS: {r:?}");
    gw.wait_log(&["next hop attempt failed", "mx0.partner.test"]);

    // Implicit MX.
    send(&gw, &net, "implicit@example.org", "erin@implicit.test")
        .assert_delivered("implicit MX (A record of the domain)");
    pf.wait_received("implicit@example.org");

    // DomainValidation's default name is the recipient domain or a name under it: mx1's
    // certificate (mx1.partner.test) is fine for partner.test above, not for wrongname.test.
    let t = send(&gw, &net, "wrong@example.org", "fay@wrongname.test");
    t.assert_refused("451 4.7.5", "recipient domain not in the certificate");
    let text = t.first_failure().map(|r| r.text()).unwrap_or_default();
    assert!(text.contains("certificate name mismatch"), "{text}");

    // Issue 15 regression: an MX answer for spoofed.test naming a host with a valid
    // certificate for its own name (mx1.partner.test) passed DomainValidation (Postfix
    // `verify`); the certificate must name the recipient domain (Postfix `secure`).
    let t = send(&gw, &net, "spoof@example.org", "gil@spoofed.test");
    t.assert_refused(
        "451 4.7.5",
        "certificate for the MX host, not the recipient domain",
    );
    let text = t.first_failure().map(|r| r.text()).unwrap_or_default();
    assert!(text.contains("certificate name mismatch"), "{text}");

    send(&gw, &net, "null@example.org", "gus@nullmx.test").assert_refused("556 5.1.10", "null MX");
    send(&gw, &net, "missing@example.org", "hal@missing.test")
        .assert_refused("550 5.4.4", "domain does not exist");
    send(&gw, &net, "dangling@example.org", "ida@dangling.test")
        .assert_refused("451 4.4.1", "MX host without addresses");

    // Two recipient domains have two next hops: the second waits for its own transaction.
    let (mut c, _) = SmtpConn::connect(gw.smtp, Some(net.client(0)));
    c.cmd("EHLO relay.example.org");
    c.cmd("MAIL FROM:<split@example.org>");
    let r = c.cmd("RCPT TO:<dana@partner.test>");
    assert_eq!(r.code, 250, "{r}");
    let r = c.cmd("RCPT TO:<erin@implicit.test>");
    crate::support::assert_reply(&r, "452 4.5.3", "another MX domain in the same transaction");
    let (_, end) = c.data(&message(
        "split@example.org",
        "dana@partner.test",
        "split",
        &[],
    ));
    assert_eq!(end.map(|r| r.code), Some(250));
    c.quit();
    pf.wait_received("split@example.org");

    for (from, _) in [
        ("wrong@example.org", ()),
        ("null@example.org", ()),
        ("spoof@example.org", ()),
    ] {
        assert!(
            !pf.maillog().contains(&format!("from=<{from}>")),
            "nothing from {from} reached the partner"
        );
    }
    assert!(org.messages().is_empty(), "nothing went upstream");
    let asked = dns.queries();
    assert!(
        asked
            .iter()
            .any(|(n, t)| n == "partner.test" && t.to_string() == "MX"),
        "the MX lookup went to the test's DNS server: {asked:?}"
    );

    // Validation probes follow MX routing too: one result per MX host of the exact domains.
    let ok = validation_entry(&gw, "mx1.partner.test:25");
    assert_eq!(ok["result"], "Success", "{ok}");
    assert_eq!(ok["connector"], "partners/mx");
    assert!(
        ok["peerSubject"]
            .as_str()
            .is_some_and(|s| s.contains("mx1.partner.test")),
        "{ok}"
    );
    let down = validation_entry(&gw, "mx0.partner.test:25");
    assert_eq!(down["result"], "Failure", "{down}");
    assert!(
        down["error"]
            .as_str()
            .is_some_and(|e| e.contains("451 4.4.1")),
        "{down}"
    );
    let null = validation_entry(&gw, "nullmx.test (MX)");
    assert_eq!(null["result"], "Failure", "{null}");
    assert!(
        null["error"]
            .as_str()
            .is_some_and(|e| e.contains("556 5.1.10")),
        "{null}"
    );
}

/// Issue 12 review: an MX answer (or a domain's own A record, the implicit MX) pointing at a
/// loopback address was connected to as-is. Without `allowPrivateMxAddresses` covering it the
/// recipient gets `451 4.4.1` naming the reason, and nothing connects to the address.
#[test]
fn mx_answers_pointing_at_loopback_are_refused_unless_allowed() {
    let net = Net::new();
    let pki = Pki::generate();
    let org = Sink::start(net.sink_ip());
    let dns = DnsServer::start(net.ip(53));
    let internal = net.ip(30);
    // An "internal service" on the address the MX answers name: it must never be connected to.
    let service = std::net::TcpListener::bind((internal, 25)).expect("bind the internal service");
    service.set_nonblocking(true).expect("nonblocking");
    dns.mx("aimed.test", 10, "mx.aimed.test")
        .a("mx.aimed.test", internal)
        .a("implicit-aimed.test", internal);
    let gw = Gateway::start(
        net.gateway_ip(),
        &pki,
        GatewaySpec::new(
            org.addr,
            json!({"inbound": [], "outbound": [{
                "name": "partners/mx", "generation": 1,
                "domains": ["aimed.test", "implicit-aimed.test"],
                "useMX": true,
                "tls": "Opportunistic",
            }]}),
        )
        .fleet(json!({
            "internalSenders": {"ipRanges": [net.cidr()]},
            "dnsResolver": dns.addr.to_string(),
            // Allowing some other private range does not allow loopback.
            "allowPrivateMxAddresses": ["10.0.0.0/8"],
        })),
    );
    for (from, to) in [
        ("ops@example.org", "dana@aimed.test"),
        ("ops@example.org", "erin@implicit-aimed.test"),
    ] {
        let t = send(&gw, &net, from, to);
        t.assert_refused("451 4.4.1", "MX address on loopback");
        let text = t.first_failure().map(|r| r.text()).unwrap_or_default();
        assert!(
            text.contains(&format!("{internal} is a loopback address"))
                && text.contains("allowPrivateMxAddresses"),
            "{to}: the reply says why: {text}"
        );
    }
    gw.wait_log(&["MX address refused", &internal.to_string()]);
    match service.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the gateway connected to the internal service: {other:?}"),
    }
    assert!(org.messages().is_empty(), "nothing went upstream");
}
