//! Issue 15, REQUIRETLS (RFC 8689): advertised only after STARTTLS; a message sent with it is
//! relayed only over a connection whose certificate was validated to a next hop that offers
//! REQUIRETLS, with the parameter passed on; otherwise `550 5.7.30`. Next hops: the test's
//! sink offering REQUIRETLS (no Debian MTA implements it) and Postfix (which does not).

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;

use crate::outbound_support::PartnerPki;
use crate::outbound_support::tls_policy::{fleet, partner_mx, policy_count};
use crate::support::dns::{DnsServer, Zone};
use crate::support::{
    ClientTls, Gateway, GatewaySpec, Net, Pki, Sink, SinkOptions, SmtpConn, assert_reply, message,
    wait_for,
};

/// EHLO, STARTTLS, EHLO, then one REQUIRETLS transaction to `rcpt`; returns the reply that
/// ended it (RCPT's refusal or the final dot's).
fn send_requiretls(
    gw: &Gateway,
    pki: &Pki,
    net: &Net,
    from: &str,
    rcpt: &str,
) -> crate::support::Reply {
    let (mut c, _) = SmtpConn::connect(gw.smtp, Some(net.client(0)));
    c.cmd("EHLO relay.example.org");
    c.starttls(&ClientTls::new(&pki.ca));
    let ehlo = c.cmd("EHLO relay.example.org");
    assert!(
        ehlo.lines.iter().any(|l| l == "REQUIRETLS"),
        "offered after STARTTLS: {ehlo}"
    );
    let r = c.cmd(&format!("MAIL FROM:<{from}> REQUIRETLS"));
    assert_reply(&r, "250", "REQUIRETLS accepted over TLS");
    let r = c.cmd(&format!("RCPT TO:<{rcpt}>"));
    if r.code != 250 {
        c.quit();
        return r;
    }
    let (_, end) = c.data(&message(from, rcpt, "requiretls", &[]));
    c.quit();
    end.expect("reply to the final dot")
}

#[test]
fn requiretls_relayed_only_to_validated_next_hops_that_offer_it() {
    let net = Net::new();
    let pki = Pki::generate();
    let partner = PartnerPki::generate();
    let org = Sink::start(net.sink_ip());
    // The REQUIRETLS-capable partner: the sink with a certificate from the partner CA.
    let capable = Sink::start_with(
        net.ip(30),
        SinkOptions {
            starttls: Some(partner.server("rt", &["rt.partner.test"])),
            requiretls: true,
            ..SinkOptions::default()
        },
    );
    // Postfix: validated TLS, no REQUIRETLS.
    let ip_pf = net.ip(31);
    let pf = partner_mx(
        ip_pf,
        "pf.partner.test",
        &["pf.partner.test"],
        partner.server("pf", &["pf.partner.test"]),
    );
    let hop = |addr: SocketAddr| format!("[{}]:{}", addr.ip(), addr.port());
    let gw = Gateway::start(
        net.gateway_ip(),
        &pki,
        GatewaySpec::new(
            org.addr,
            json!({"inbound": [], "outbound": [
                {"name": "partners/rt", "generation": 1, "domains": ["rt.partner.test"],
                 "smartHosts": [hop(capable.addr)], "tls": "DomainValidation",
                 "tlsDomain": "rt.partner.test", "trustBundleFile": partner.ca},
                {"name": "partners/rt-unverified", "generation": 1,
                 "domains": ["unverified.partner.test"],
                 "smartHosts": [hop(capable.addr)], "tls": "EncryptionOnly"},
                // The chain is validated, the name is not (RFC 8689 4.2.1: not enough).
                {"name": "partners/rt-chain", "generation": 1, "domains": ["chain.partner.test"],
                 "smartHosts": [hop(capable.addr)], "tls": "CertificateValidation",
                 "trustBundleFile": partner.ca},
                {"name": "partners/pf", "generation": 1, "domains": ["pf.partner.test"],
                 "smartHosts": [hop(SocketAddr::from((ip_pf, 25)))], "tls": "DomainValidation",
                 "tlsDomain": "pf.partner.test", "trustBundleFile": partner.ca},
            ]}),
        )
        .fleet(json!({"internalSenders": {"ipRanges": [net.cidr()]}, "validationIntervalSecs": 0})),
    );

    // Not offered, and not accepted, before STARTTLS.
    let (mut c, _) = SmtpConn::connect(gw.smtp, Some(net.client(0)));
    let ehlo = c.cmd("EHLO relay.example.org");
    assert!(!ehlo.lines.iter().any(|l| l == "REQUIRETLS"), "{ehlo}");
    let r = c.cmd("MAIL FROM:<plain@example.org> REQUIRETLS");
    assert_reply(&r, "555 5.5.4", "REQUIRETLS on a plaintext session");
    c.quit();

    // Validated (DomainValidation) and offered: relayed with the parameter.
    let end = send_requiretls(&gw, &pki, &net, "ok@example.org", "a@rt.partner.test");
    assert_reply(&end, "250", "REQUIRETLS relayed");
    let got = capable.wait_messages(1);
    assert_eq!(got[0].mail_from, "ok@example.org");
    assert!(got[0].tls);
    // The sink files a transcript when the connection ends (the gateway pools it until its
    // client's session ends).
    wait_for(
        Duration::from_secs(30),
        "the sink's transcript with MAIL FROM … REQUIRETLS",
        || {
            capable
                .transcripts()
                .iter()
                .any(|t| t.contains("MAIL FROM:<ok@example.org> REQUIRETLS"))
                .then_some(())
        },
    );
    assert_eq!(policy_count(&gw, "partners/rt", "requiretls", "relayed"), 1);

    // Offered, but the connector's level validates nothing.
    let r = send_requiretls(
        &gw,
        &pki,
        &net,
        "unv@example.org",
        "b@unverified.partner.test",
    );
    assert_reply(
        &r,
        "550 5.7.30",
        "REQUIRETLS over an unvalidated connection",
    );
    assert!(r.text().contains("not validated"), "{r}");
    assert_eq!(
        policy_count(&gw, "partners/rt-unverified", "requiretls", "refused"),
        1
    );

    // Offered, the chain validated, but the certificate's name is checked by nothing.
    let r = send_requiretls(&gw, &pki, &net, "chain@example.org", "d@chain.partner.test");
    assert_reply(
        &r,
        "550 5.7.30",
        "REQUIRETLS over CertificateValidation (chain only)",
    );
    assert!(r.text().contains("not validated"), "{r}");
    assert_eq!(
        policy_count(&gw, "partners/rt-chain", "requiretls", "refused"),
        1
    );

    // Validated, but the next hop (Postfix) does not offer REQUIRETLS.
    let r = send_requiretls(&gw, &pki, &net, "pf@example.org", "c@pf.partner.test");
    assert_reply(&r, "550 5.7.30", "next hop without REQUIRETLS");
    assert!(r.text().contains("does not offer REQUIRETLS"), "{r}");
    assert_eq!(policy_count(&gw, "partners/pf", "requiretls", "refused"), 1);
    assert!(!pf.maillog().contains("from=<pf@example.org>"));

    assert_eq!(
        capable.messages().len(),
        1,
        "only the first message reached the sink"
    );
    assert!(org.messages().is_empty(), "nothing went upstream");
}

/// RFC 8689 4.2.1: an MX host that does not qualify (here: no REQUIRETLS offered) is skipped
/// for the next one; `550 5.7.30` only when none qualifies.
#[test]
fn requiretls_tries_the_next_mx_host() {
    let net = Net::new();
    let pki = Pki::generate();
    let partner = PartnerPki::generate();
    let org = Sink::start(net.sink_ip());
    let (ip1, ip2) = (net.ip(30), net.ip(31));
    let dns = DnsServer::start(
        net.ip(53),
        vec![Zone::unsigned(
            "rt.test",
            &[
                "two IN MX 10 mx1.two",
                "two IN MX 20 mx2.two",
                &format!("mx1.two IN A {ip1}"),
                &format!("mx2.two IN A {ip2}"),
                "none IN MX 10 mx.none",
                &format!("mx.none IN A {ip1}"),
            ],
        )],
    );
    let sink = |ip, names: &[&str], requiretls| {
        Sink::start_at(
            SocketAddr::from((ip, 25)),
            SinkOptions {
                starttls: Some(partner.server(names[0], names)),
                requiretls,
                ..SinkOptions::default()
            },
        )
    };
    // DomainValidation checks the recipient domain: mx1 is valid for both.
    let mx1 = sink(ip1, &["mx1.two.rt.test", "mx.none.rt.test"], false);
    let mx2 = sink(ip2, &["mx2.two.rt.test"], true);
    let gw = Gateway::start(
        net.gateway_ip(),
        &pki,
        GatewaySpec::new(
            org.addr,
            json!({"inbound": [], "outbound": [
                {"name": "partners/two", "generation": 1,
                 "domains": ["two.rt.test", "none.rt.test"],
                 "useMX": true, "tls": "DomainValidation", "trustBundleFile": partner.ca},
            ]}),
        )
        .fleet(fleet(
            &net.cidr(),
            &dns,
            pki.ca.parent().expect("pki dir"),
            None,
        )),
    );

    let end = send_requiretls(&gw, &pki, &net, "two@example.org", "a@two.rt.test");
    assert_reply(&end, "250", "relayed through the second MX host");
    let got = mx2.wait_messages(1);
    assert_eq!(got[0].mail_from, "two@example.org");
    assert!(mx1.messages().is_empty(), "the first MX host got nothing");
    assert_eq!(
        policy_count(&gw, "partners/two", "requiretls", "relayed"),
        1
    );

    // The only MX host does not qualify: 550 5.7.30.
    let r = send_requiretls(&gw, &pki, &net, "none@example.org", "b@none.rt.test");
    assert_reply(&r, "550 5.7.30", "no MX host offers REQUIRETLS");
    assert!(r.text().contains("does not offer REQUIRETLS"), "{r}");
    assert_eq!(
        policy_count(&gw, "partners/two", "requiretls", "refused"),
        1
    );
    assert!(mx1.messages().is_empty() && mx2.messages().len() == 1);
    assert!(org.messages().is_empty(), "nothing went upstream");
}
