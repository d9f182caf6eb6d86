//! PROXY protocol v2 end to end (issue 12): Debian's HAProxy in TCP mode in front of the
//! gateway with `send-proxy-v2`, connecting from its own loopback address, the only entry in
//! `trustedProxies`; and the IP rules around it.
//!
//! - Connector IP rules see the real client behind HAProxy: an `identifyBy: SenderIP`
//!   connector claims by it, `restrictToIPRanges` refuses a real client outside the ranges.
//! - `maxConnectionsPerIp` counts the real client, not HAProxy.
//! - A peer outside `trustedProxies` that sends a PROXY header is closed without a reply.
//! - A dual-stack listener sees IPv4 peers as `::ffff:a.b.c.d`; an IPv4 `trustedProxies` entry
//!   still matches them (regression: it did not, so the header reached the SMTP parser).
//! - IPv6 clients reported by a proxy are counted per /64 (the only way to get many IPv6
//!   client addresses on loopback, where the only IPv6 address is ::1).

use std::net::SocketAddr;

use crate::support::{
    Fixture, Haproxy, SinkOptions, SmtpConn, assert_reply, connector_header, connectors, inbound,
    message, proxy_v2_header,
};
use serde_json::json;

const BOB: &str = "bob@example.org";

fn mail(c: &mut SmtpConn, from: &str, what: &str) -> crate::support::Transcript {
    c.cmd("EHLO client.test");
    c.send_mail(from, &[BOB], &message(from, BOB, what, &[]))
}

#[test]
fn haproxy_passes_the_real_client_to_connector_rules_and_the_per_ip_limit() {
    let f = Fixture::build(
        SinkOptions::default(),
        |net, s| {
            s.fleet(json!({
                "trustedProxies": [format!("{}/32", net.ip(6))],
                "limits": {"maxConnectionsPerIp": 2},
            }))
        },
        |net, _| {
            let partner = format!("{}/32", net.client(0));
            let contoso = format!("{}/32", net.client(5));
            connectors(vec![
                inbound(
                    "mail/tailspin-ip",
                    &["tailspin.test"],
                    json!({"identifyBy": "SenderIP", "senderIPRanges": [partner],
                           "requireTls": false}),
                ),
                inbound(
                    "mail/contoso",
                    &["contoso.test"],
                    json!({"senderIPRanges": [contoso], "restrictToIPRanges": true,
                           "requireTls": false}),
                ),
            ])
        },
    );
    let lb = Haproxy::start(f.net.ip(5), f.net.ip(6), f.gw.smtp, f.net.ip(9));

    // Partners' real addresses, behind HAProxy: one claimed by the SenderIP connector, one
    // inside the restricted connector's ranges.
    let (mut c, g) = SmtpConn::connect(lb.addr, Some(f.net.client(0)));
    assert_eq!(g.code, 220, "{g}");
    mail(&mut c, "ceo@tailspin.test", "by ip").assert_delivered("SenderIP behind HAProxy");
    c.quit();
    let (mut c, _) = SmtpConn::connect(lb.addr, Some(f.net.client(5)));
    mail(&mut c, "ceo@contoso.test", "restricted")
        .assert_delivered("restrictToIPRanges, real client inside");
    c.quit();
    let m = f.sink.wait_messages(2);
    assert!(
        connector_header(&m[0]).contains("mail/tailspin-ip"),
        "claimed by the real client's address: {}",
        connector_header(&m[0])
    );
    assert!(
        m[0].text().contains(&f.net.client(0).to_string()),
        "Received: names the real client:\n{}",
        m[0].headers()
    );

    // Another real client behind the same HAProxy: outside the restricted ranges.
    let (mut c, _) = SmtpConn::connect(lb.addr, Some(f.net.client(1)));
    c.cmd("EHLO client.test");
    let r = c.cmd("MAIL FROM:<ceo@contoso.test>");
    assert_reply(&r, "550 5.7.1", "restrictToIPRanges, real client outside");
    c.quit();

    // Per-IP limit 2, counted per real client although every connection comes from HAProxy.
    let (_a, ga) = SmtpConn::connect(lb.addr, Some(f.net.client(2)));
    let (_b, gb) = SmtpConn::connect(lb.addr, Some(f.net.client(2)));
    assert_eq!((ga.code, gb.code), (220, 220));
    let (mut third, g) = SmtpConn::connect(lb.addr, Some(f.net.client(2)));
    assert_reply(&g, "421 4.7.0", "third connection of one real client");
    assert!(third.is_closed());
    let (_d, g) = SmtpConn::connect(lb.addr, Some(f.net.client(3)));
    assert_eq!(
        g.code, 220,
        "another real client behind the same proxy: {g}"
    );

    // A peer outside trustedProxies sending a PROXY header: greeted (the server speaks
    // first), then closed with no reply to anything it sent.
    let mut rogue = SmtpConn::connect_raw(f.gw.smtp, Some(f.net.client(4)));
    let mut bytes = proxy_v2_header(SocketAddr::from((f.net.client(0), 40000)), f.gw.smtp);
    bytes.extend_from_slice(b"EHLO rogue.test\r\nMAIL FROM:<ceo@tailspin.test>\r\n");
    rogue.send_raw(&bytes).expect("send");
    let g = rogue.read_reply().expect("greeting");
    assert_eq!(g.code, 220, "{g}");
    assert_eq!(
        rogue.read_reply(),
        None,
        "a PROXY header from an untrusted peer must close the connection without a reply"
    );
    f.gw.wait_log(&["proxyProtocol", "outside trustedProxies"]);
}

#[test]
fn ipv4_proxies_are_trusted_on_a_dual_stack_listener() {
    let mut port = 0;
    let f = Fixture::build(
        SinkOptions::default(),
        |net, s| {
            // An IPv6 socket bound to an IPv4-mapped address: IPv4 peers appear as
            // ::ffff:a.b.c.d, as on a `[::]` dual-stack listener, but only on our own address.
            port = crate::support::net::free_port(net.gateway_ip());
            s.fleet(json!({
                "listen": format!("[::ffff:{}]:{port}", net.gateway_ip()),
                "trustedProxies": [net.cidr()],
            }))
        },
        |net, _| {
            connectors(vec![inbound(
                "mail/tailspin-ip",
                &["tailspin.test"],
                json!({"identifyBy": "SenderIP", "requireTls": false,
                       "senderIPRanges": [format!("{}/32", net.ip(77))]}),
            )])
        },
    );
    let gw = SocketAddr::from((f.net.gateway_ip(), port));
    let mut c = SmtpConn::connect_raw(gw, Some(f.net.client(0)));
    c.send_raw(&proxy_v2_header(SocketAddr::from((f.net.ip(77), 4242)), gw))
        .expect("send header");
    let g = c.read_reply().expect("greeting");
    assert_eq!(g.code, 220, "{g}");
    mail(&mut c, "ceo@tailspin.test", "dual stack").assert_delivered("behind an IPv4 proxy");
    c.quit();
    let m = f.sink.wait_messages(1);
    assert!(
        connector_header(&m[0]).contains("mail/tailspin-ip"),
        "claimed by the address in the PROXY header: {}",
        connector_header(&m[0])
    );
}

#[test]
fn ipv6_clients_behind_a_proxy_are_counted_per_64() {
    let f = Fixture::build(
        SinkOptions::default(),
        |net, s| {
            s.fleet(json!({
                "trustedProxies": [net.cidr()],
                "limits": {"maxConnectionsPerIp": 2},
            }))
        },
        |_, _| connectors(vec![]),
    );
    let connect_as = |src: &str| {
        let mut c = SmtpConn::connect_raw(f.gw.smtp, Some(f.net.client(0)));
        let src: SocketAddr = format!("[{src}]:5000").parse().expect("addr");
        c.send_raw(&proxy_v2_header(src, "[::1]:25".parse().expect("addr")))
            .expect("send header");
        let g = c.read_reply().expect("greeting");
        (c, g)
    };
    let (_a, ga) = connect_as("2001:db8:1:2::1");
    let (_b, gb) = connect_as("2001:db8:1:2::2");
    assert_eq!((ga.code, gb.code), (220, 220));
    let (_c, g) = connect_as("2001:db8:1:2:ffff:ffff:ffff:fffe");
    assert_reply(&g, "421 4.7.0", "a third address of the same /64");
    let (_d, g) = connect_as("2001:db8:1:3::1");
    assert_eq!(g.code, 220, "another /64: {g}");
}
