//! Regression tests for the two sequences of issue 11, against scripted next hops on loopback
//! (gateway/tests/support/scripted_hop.rs):
//!
//! 1. An acknowledged recipient must not be lost: the next hop accepts r1, then drops the
//!    connection at r2. After DATA the hop must have the message for r1 (replayed on a new
//!    connection) or the client must get a 4xx — never a 250 that leaves r1 out, and never a
//!    5xx (`554 5.5.1`) for that temporary fault.
//! 2. A recipient must only travel over a connection of its own route: when the first
//!    recipient is refused by its next hop, the second recipient (another route) must not be
//!    sent over the first one's still-open connection, nor over a pooled connection of another
//!    route in the next transaction — upstream ↔ Outbound smart host, between two Outbound
//!    smart-host connectors, and between two `useMX` domains of one connector (the MX hosts are
//!    scripted hops on port 25 of their own loopback addresses, found through the test's DNS
//!    server from outbound_support).

use std::net::SocketAddr;
use std::sync::Arc;

use crate::outbound_support::DnsServer;
use crate::support::scripted_hop::{Action, Kind, Script, ScriptedHop};
use crate::support::{Gateway, GatewaySpec, Net, Pki, Reply, SmtpConn};
use serde_json::{Value, json};

/// A gateway whose upstream is scripted hop `upstream` (org.test) with Outbound smart-host
/// connectors `partners/a` and `partners/b` (partner-a.test, partner-b.test) on scripted hops.
struct Rig {
    net: Net,
    script: Arc<Script>,
    upstream: ScriptedHop,
    a: ScriptedHop,
    b: ScriptedHop,
    gw: Gateway,
}

fn rig() -> Rig {
    let net = Net::new();
    let pki = Pki::generate();
    let script = Script::new();
    let hop = |host: u8, name: &str| {
        ScriptedHop::start(SocketAddr::from((net.ip(host), 0)), name, script.clone())
    };
    let (upstream, a, b) = (hop(2, "upstream"), hop(3, "partner-a"), hop(4, "partner-b"));
    let outbound = |name: &str, domain: &str, h: &ScriptedHop| -> Value {
        json!({"name": name, "generation": 1, "domains": [domain],
               "smartHosts": [h.smart_host()], "tls": "Opportunistic"})
    };
    let gw = Gateway::start(
        net.gateway_ip(),
        &pki,
        GatewaySpec::new(
            upstream.addr,
            json!({"inbound": [], "outbound": [
                outbound("partners/a", "partner-a.test", &a),
                outbound("partners/b", "partner-b.test", &b),
            ]}),
        )
        .fleet(json!({
            "acceptedDomains": ["org.test"],
            "internalSenders": {"ipRanges": [net.cidr()]},
        })),
    );
    Rig {
        net,
        script,
        upstream,
        a,
        b,
        gw,
    }
}

fn body(txn: &str) -> String {
    format!(
        "From: <{txn}@org.test>\r\nSubject: {txn}\r\nMessage-ID: <{txn}@regress.test>\r\n\r\nhello\r\n"
    )
}

/// MAIL, the RCPTs and DATA (with the body when the gateway says 354). Returns the RCPT
/// replies, the DATA reply and the final reply.
fn transaction(c: &mut SmtpConn, txn: &str, rcpts: &[&str]) -> (Vec<Reply>, Reply, Option<Reply>) {
    let r = c.cmd(&format!("MAIL FROM:<{txn}@org.test>"));
    assert_eq!(r.code, 250, "MAIL: {r}");
    let replies: Vec<Reply> = rcpts
        .iter()
        .map(|r| c.cmd(&format!("RCPT TO:<{r}>")))
        .collect();
    let data = c.cmd("DATA");
    let end = if data.code == 354 {
        c.send_raw(body(txn).as_bytes()).expect("body");
        c.send_raw(b".\r\n").expect("dot");
        c.read_reply()
    } else {
        let r = c.cmd("RSET");
        assert_eq!(r.code, 250, "RSET: {r}");
        None
    };
    (replies, data, end)
}

fn hop_log(hops: &[&ScriptedHop], txn: &str) -> String {
    hops.iter()
        .flat_map(|h| h.transcript_for(txn))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Sequence 1 of issue 11, with (`with_r3`) or without a third recipient after the drop.
fn drop_at_second_rcpt(with_r3: bool) {
    let rig = rig();
    let txn = if with_r3 { "drop3" } else { "drop2" };
    rig.script.on(
        txn,
        "upstream",
        Kind::Rcpt,
        "r2@org.test",
        vec![Action::Drop],
    );
    let (mut c, _) = SmtpConn::connect(rig.gw.smtp, Some(rig.net.client(0)));
    c.cmd("EHLO client.org.test");
    let rcpts: &[&str] = if with_r3 {
        &["r1@org.test", "r2@org.test", "r3@org.test"]
    } else {
        &["r1@org.test", "r2@org.test"]
    };
    let (replies, data, end) = transaction(&mut c, txn, rcpts);
    c.quit();
    let ctx = format!(
        "replies {:?}, DATA {data}, end {:?}\n{}",
        replies.iter().map(Reply::summary).collect::<Vec<_>>(),
        end.as_ref().map(Reply::summary),
        hop_log(&[&rig.upstream], txn)
    );
    assert_eq!(replies[0].code, 250, "r1 is accepted first: {ctx}");
    let acked: Vec<&str> = rcpts
        .iter()
        .zip(&replies)
        .filter(|(_, r)| r.code == 250)
        .map(|(a, _)| *a)
        .collect();
    let delivered: Vec<_> = rig
        .upstream
        .deliveries()
        .into_iter()
        .filter(|d| d.txn == txn)
        .collect();
    assert!(
        data.code < 500 && end.as_ref().is_none_or(|e| e.code < 500),
        "a dropped connection is a temporary fault, never a 5xx: {ctx}"
    );
    match &end {
        Some(e) if e.code == 250 => {
            assert_eq!(delivered.len(), 1, "one delivery: {delivered:?}\n{ctx}");
            for a in &acked {
                assert!(
                    delivered[0].rcpts.iter().any(|r| r == a),
                    "250 to the final dot but acknowledged recipient {a} is not in the delivered message {:?}\n{ctx}",
                    delivered[0].rcpts
                );
            }
        }
        _ => {
            let failure = end.as_ref().unwrap_or(&data);
            assert!(
                (400..500).contains(&failure.code),
                "without delivery the client gets a 4xx: {ctx}"
            );
            assert!(delivered.is_empty(), "no 250, no delivery: {delivered:?}");
        }
    }
}

#[test]
fn drop_after_an_accepted_recipient_never_loses_it() {
    drop_at_second_rcpt(true);
}

#[test]
fn drop_after_the_only_accepted_recipient_is_not_a_permanent_failure() {
    drop_at_second_rcpt(false);
}

/// Sequence 2: `first` is refused 550 by its hop, `second` (another route) must go to its own
/// hop only; then a second transaction in the same session, to `first`'s route again, must not
/// reuse `second`'s connection either.
fn refused_first_then_other_route(first: (&str, &str), second: (&str, &str)) {
    let rig = rig();
    let hops = [&rig.upstream, &rig.a, &rig.b];
    let hop_of = |name: &str| *hops.iter().find(|h| h.name == name).expect("hop");
    let txn = "split1";
    rig.script.on(
        txn,
        first.1,
        Kind::Rcpt,
        first.0,
        vec![Action::reply("550 5.1.1 no such user")],
    );
    let (mut c, _) = SmtpConn::connect(rig.gw.smtp, Some(rig.net.client(0)));
    c.cmd("EHLO client.org.test");
    let (replies, data, end) = transaction(&mut c, txn, &[first.0, second.0]);
    let ctx = format!(
        "replies {:?}, DATA {data}, end {:?}\n{}",
        replies.iter().map(Reply::summary).collect::<Vec<_>>(),
        end.as_ref().map(Reply::summary),
        hop_log(&hops, txn)
    );
    assert!(
        replies[0].matches("550 5.1.1"),
        "the first recipient is refused by its hop: {ctx}"
    );
    assert_eq!(
        replies[1].code, 250,
        "the second recipient is accepted: {ctx}"
    );
    assert_eq!(end.as_ref().map(|e| e.code), Some(250), "delivered: {ctx}");
    // The next transaction goes back to the first route: it must not ride on the second
    // route's (pooled) connection.
    let again = format!("again-{}", first.0);
    let (replies2, _, end2) = transaction(&mut c, "split2", &[&again]);
    c.quit();
    let ctx2 = format!(
        "second transaction: replies {:?}, end {:?}\n{}",
        replies2.iter().map(Reply::summary).collect::<Vec<_>>(),
        end2.as_ref().map(Reply::summary),
        hop_log(&hops, "split2")
    );
    assert_eq!(end2.as_ref().map(|e| e.code), Some(250), "{ctx2}");

    for h in hops {
        let domain = match h.name.as_str() {
            "upstream" => "@org.test",
            "partner-a" => "@partner-a.test",
            _ => "@partner-b.test",
        };
        let foreign: Vec<String> = h
            .rcpts_seen()
            .into_iter()
            .filter(|r| !r.ends_with(domain))
            .collect();
        assert!(
            foreign.is_empty(),
            "hop {} was sent recipients of another route: {foreign:?}\n{ctx}\n{ctx2}",
            h.name
        );
    }
    let d = hop_of(second.1).deliveries();
    assert!(
        d.iter()
            .any(|d| d.txn == txn && d.rcpts == vec![second.0.to_string()]),
        "{} reached its own hop {}: {d:?}\n{ctx}",
        second.0,
        second.1
    );
    let d = hop_of(first.1).deliveries();
    assert!(
        d.iter()
            .any(|d| d.txn == "split2" && d.rcpts == vec![again.clone()]),
        "{again} reached its own hop {}: {d:?}\n{ctx2}",
        first.1
    );
}

#[test]
fn refused_upstream_recipient_leaves_no_connection_for_a_partner_recipient() {
    refused_first_then_other_route(
        ("r1@org.test", "upstream"),
        ("r2@partner-a.test", "partner-a"),
    );
}

#[test]
fn refused_partner_recipient_leaves_no_connection_for_an_upstream_recipient() {
    refused_first_then_other_route(
        ("r1@partner-a.test", "partner-a"),
        ("r2@org.test", "upstream"),
    );
}

#[test]
fn refused_recipient_of_one_outbound_connector_leaves_no_connection_for_another() {
    refused_first_then_other_route(
        ("r1@partner-a.test", "partner-a"),
        ("r2@partner-b.test", "partner-b"),
    );
}

/// The same between two `useMX` domains of one Outbound connector: each domain's MX host is a
/// scripted hop on port 25 of its own loopback address.
#[test]
fn refused_recipient_of_one_mx_domain_leaves_no_connection_for_another() {
    let net = Net::new();
    let pki = Pki::generate();
    let script = Script::new();
    let org = ScriptedHop::start(SocketAddr::from((net.ip(2), 0)), "upstream", script.clone());
    let one = ScriptedHop::start(SocketAddr::from((net.ip(30), 25)), "mx-one", script.clone());
    let two = ScriptedHop::start(SocketAddr::from((net.ip(31), 25)), "mx-two", script.clone());
    let dns = DnsServer::start(net.ip(53));
    dns.mx("one.test", 10, "mx.one.test")
        .a("mx.one.test", net.ip(30))
        .mx("two.test", 10, "mx.two.test")
        .a("mx.two.test", net.ip(31));
    let gw = Gateway::start(
        net.gateway_ip(),
        &pki,
        GatewaySpec::new(
            org.addr,
            json!({"inbound": [], "outbound": [{
                "name": "partners/mx", "generation": 1,
                "domains": ["one.test", "two.test"],
                "useMX": true, "tls": "Opportunistic",
            }]}),
        )
        .fleet(json!({
            "acceptedDomains": ["org.test"],
            "internalSenders": {"ipRanges": [net.cidr()]},
            "dnsResolver": dns.addr.to_string(),
            // The MX hosts are on loopback: allowed for this test's block only.
            "allowPrivateMxAddresses": [net.cidr()],
        })),
    );
    script.on(
        "mx1",
        "mx-one",
        Kind::Rcpt,
        "r1@one.test",
        vec![Action::reply("550 5.1.1 no such user")],
    );
    let (mut c, _) = SmtpConn::connect(gw.smtp, Some(net.client(0)));
    c.cmd("EHLO client.org.test");
    let (replies, data, end) = transaction(&mut c, "mx1", &["r1@one.test", "r2@two.test"]);
    let (replies2, _, end2) = transaction(&mut c, "mx2", &["r3@one.test"]);
    c.quit();
    let ctx = format!(
        "replies {:?}, DATA {data}, end {:?}; second transaction {:?}, end {:?}\n{}\n{}",
        replies.iter().map(Reply::summary).collect::<Vec<_>>(),
        end.as_ref().map(Reply::summary),
        replies2.iter().map(Reply::summary).collect::<Vec<_>>(),
        end2.as_ref().map(Reply::summary),
        hop_log(&[&one, &two], "mx1"),
        hop_log(&[&one, &two], "mx2"),
    );
    assert!(replies[0].matches("550 5.1.1"), "{ctx}");
    let stray: Vec<String> = one
        .rcpts_seen()
        .into_iter()
        .filter(|r| !r.ends_with("@one.test"))
        .chain(
            two.rcpts_seen()
                .into_iter()
                .filter(|r| !r.ends_with("@two.test")),
        )
        .collect();
    assert!(
        stray.is_empty(),
        "recipients sent to another domain's MX host: {stray:?}\n{ctx}"
    );
    assert_eq!(end.as_ref().map(|e| e.code), Some(250), "{ctx}");
    assert!(
        two.deliveries()
            .iter()
            .any(|d| d.txn == "mx1" && d.rcpts == ["r2@two.test"]),
        "r2 reached two.test's MX host: {ctx}"
    );
    assert!(
        one.deliveries()
            .iter()
            .any(|d| d.txn == "mx2" && d.rcpts == ["r3@one.test"]),
        "r3 reached one.test's MX host: {ctx}"
    );
}
