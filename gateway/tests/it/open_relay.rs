//! Open-relay suite (issue 8, item 4): from a client that is not an internal sender, every
//! address form that could reach a domain other than the accepted ones is refused, and what is
//! accepted goes only to the upstream, with the address the client sent (so the upstream, not
//! a rewritten address, decides). Two sinks listen: the upstream (organisation server) and the
//! smart host of an Outbound connector for `partner.test`, which a stranger must never reach.
//!
//! Decisions: the recipient domain is what follows the last `@` of the (dequoted) address.
//! `user%evil.test@example.org` and `evil.test!user@example.org` are addresses *at
//! example.org*: the gateway relays them to the upstream verbatim and never interprets `%` or
//! `!` itself (the upstream must not either: Postfix `allow_percent_hack = no`,
//! `swap_bangpath = no`, `resolve_dequoted_address = yes`; see docs/hardening.md). A quoted
//! local part `"user@evil.test"@example.org` is legitimate and goes to the upstream only, still
//! quoted. Source routes are stripped (RFC 5321 4.1.1.3: the route is ignored), so
//! `<@evil.test:user@example.org>` reaches the upstream as `user@example.org`.

use crate::support::{Fixture, Sink, SinkOptions, SmtpConn, connectors, message};
use serde_json::json;

/// One row: the RCPT address as written on the wire (between `<` and `>`), whether MAIL
/// declares SMTPUTF8, the expected reply prefix, and for accepted rows the recipient the
/// upstream must see.
struct Row {
    rcpt: &'static str,
    utf8: bool,
    reply: &'static str,
    upstream_rcpt: Option<&'static str>,
}

const fn r(rcpt: &'static str, reply: &'static str, upstream_rcpt: Option<&'static str>) -> Row {
    Row {
        rcpt,
        utf8: false,
        reply,
        upstream_rcpt,
    }
}

const fn u(rcpt: &'static str, reply: &'static str) -> Row {
    Row {
        rcpt,
        utf8: true,
        reply,
        upstream_rcpt: None,
    }
}

const DENIED: &str = "550 5.7.1 Relaying denied";
const BAD: &str = "501 5.1.3";
const OK: &str = "250 2.1.5";

const ROWS: &[Row] = &[
    // Plain strangers' domains.
    r("user@evil.test", DENIED, None),
    r("user@partner.test", DENIED, None),
    r("user@mail.partner.test", DENIED, None),
    // The % hack: only the part after the last @ is the domain.
    r(
        "user%evil.test@example.org",
        OK,
        Some("user%evil.test@example.org"),
    ),
    r("user%example.org@evil.test", DENIED, None),
    r("user%evil.test%example.org@evil.test", DENIED, None),
    // Source routes (RFC 5321 4.1.1.3; stripped by the parser, never followed).
    r("@example.org:user@evil.test", DENIED, None),
    r("@a.test,@example.org:user@evil.test", DENIED, None),
    r("@evil.test:user@example.org", OK, Some("user@example.org")),
    // Quoted local parts holding an @ that cannot reach a foreign domain (the accepted forms
    // are in address_fidelity.rs).
    r("\"user@example.org\"@evil.test", DENIED, None),
    r("\"user@evil.test\"", BAD, None),
    // UUCP bang paths.
    r(
        "evil.test!user@example.org",
        OK,
        Some("evil.test!user@example.org"),
    ),
    r("example.org!user@evil.test", DENIED, None),
    r("evil.test!user", BAD, None),
    // Two @ without quotes.
    r("user@evil.test@example.org", BAD, None),
    r("user@example.org@evil.test", BAD, None),
    // IP literals: the parser refuses address literals outright (safe: nothing relayed).
    r("user@[127.0.0.1]", BAD, None),
    r("user@[IPv6:::1]", BAD, None),
    r("postmaster@[127.0.0.1]", BAD, None),
    // Trailing dots.
    r("user@evil.test.", DENIED, None),
    r("user@example.org.evil.test.", DENIED, None),
    r("user@example.org.", OK, Some("user@example.org.")),
    // Case and look-alike suffixes.
    r("user@EXAMPLE.ORG", OK, Some("user@EXAMPLE.ORG")),
    r("user@Sub.ExAmPlE.oRg", OK, Some("user@Sub.ExAmPlE.oRg")),
    r("user@EXAMPLE.ORG.evil.test", DENIED, None),
    r("user@example.org.evil.test", DENIED, None),
    r("user@evilexample.org", DENIED, None),
    r("user@example.org-evil.test", DENIED, None),
    r("user@.example.org", BAD, None),
    // IDN and punycode look-alikes (Cyrillic а, xn-- forms) are other domains. A fullwidth
    // full stop is not: UTS-46 maps `example．org` to example.org (ARCHITECTURE section 3), so
    // it is ours and goes to the upstream as the client wrote it.
    u("user@exаmple.org", DENIED),
    Row {
        rcpt: "user@example．org",
        utf8: true,
        reply: OK,
        upstream_rcpt: Some("user@example．org"),
    },
    u("user@sub.exаmple.org", DENIED),
    r("user@xn--exmple-4nf.org", DENIED, None),
    r("user@xn--80ak6aa92e.com", DENIED, None),
    r("user@example.xn--org-9o0a", DENIED, None),
];

#[test]
fn strangers_cannot_relay_through_any_address_form() {
    relay_rows(ROWS);
}

fn relay_rows(rows: &[Row]) {
    let net = crate::support::Net::new();
    let partner = Sink::start(net.ip(3));
    let partner_addr = partner.addr;
    let f = Fixture::build(
        SinkOptions::default(),
        |_, s| s,
        move |_, _| {
            let mut c = connectors(vec![]);
            c["outbound"] = json!([{
                "name": "mail/partner",
                "generation": 1,
                "domains": ["partner.test", "*.partner.test"],
                "smartHosts": [format!("[{}]:{}", partner_addr.ip(), partner_addr.port())],
                "tls": "None",
            }]);
            c
        },
    );
    let mut failures = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let ip = f.net.ip(100 + i as u8);
        let (mut c, _) = SmtpConn::connect(f.gw.smtp, Some(ip));
        c.cmd("EHLO stranger.test");
        let smtputf8 = if row.utf8 { " SMTPUTF8" } else { "" };
        let m = c.cmd(&format!("MAIL FROM:<eve@stranger.test>{smtputf8}"));
        assert_eq!(m.code, 250, "{m}");
        let reply = c.cmd(&format!("RCPT TO:<{}>", row.rcpt));
        if !reply.matches(row.reply) {
            failures.push(format!(
                "RCPT TO:<{}>: expected {:?}, got {:?}",
                row.rcpt,
                row.reply,
                reply.to_string()
            ));
        }
        if reply.is_positive() {
            let (d, end) = c.data(&message("eve@stranger.test", "x@example.org", "relay", &[]));
            if d.code != 354 || end.as_ref().map(|e| e.code) != Some(250) {
                failures.push(format!("RCPT TO:<{}>: DATA {d} / {end:?}", row.rcpt));
            }
        }
        c.quit();
        let mine = f.sink.messages_from(ip);
        match (row.upstream_rcpt, mine.as_slice()) {
            (None, []) => {}
            (Some(want), [m]) if m.rcpt_to == [want] => {}
            (want, got) => failures.push(format!(
                "RCPT TO:<{}>: the upstream should have {:?}, got recipients {:?}",
                row.rcpt,
                want,
                got.iter().map(|m| m.rcpt_to.clone()).collect::<Vec<_>>()
            )),
        }
    }
    assert_eq!(
        partner.connections(),
        0,
        "a stranger reached the Outbound connector's smart host: {:?}",
        partner.transcripts()
    );
    for t in f.sink.transcripts() {
        for line in t.lines() {
            let l = line.to_ascii_lowercase();
            // `example．org` is example.org under UTS-46 (the fullwidth row above).
            let ours = l.contains("example.org") || l.contains("example．org");
            if l.starts_with("rcpt to:") && !ours {
                failures.push(format!(
                    "the upstream was asked for a foreign recipient: {line}"
                ));
            }
        }
    }
    println!("{} address forms tried", rows.len());
    assert!(
        failures.is_empty(),
        "{} of {} open-relay rows failed:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
}

/// The same stranger over TLS with a client certificate the internal-sender rules do not
/// trust (the partner CA's `mail.contoso.com`): TLS and a certificate do not make a client
/// internal.
#[test]
fn tls_and_an_untrusted_client_certificate_do_not_open_the_relay() {
    let f = Fixture::build(
        SinkOptions::default(),
        |_, s| {
            s.fleet(json!({
                "internalSenders": {"certificateNames": ["mail.contoso.com", "relay.example.org"]}
            }))
        },
        |_, _| {
            let mut c = connectors(vec![]);
            c["outbound"] = json!([{
                "name": "mail/partner",
                "generation": 1,
                "domains": ["partner.test"],
                "smartHosts": ["[127.0.0.1]:9"],
                "tls": "None",
            }]);
            c
        },
    );
    let (mut c, _) = SmtpConn::connect(f.gw.smtp, Some(f.net.client(0)));
    c.cmd("EHLO stranger.test");
    c.starttls(&crate::support::ClientTls::new(&f.pki.ca).with_cert(&f.pki.contoso_client));
    c.cmd("EHLO stranger.test");
    assert_eq!(c.cmd("MAIL FROM:<eve@contoso.com>").code, 250);
    for rcpt in ["user@partner.test", "user@evil.test", "user@[127.0.0.1]"] {
        let r = c.cmd(&format!("RCPT TO:<{rcpt}>"));
        assert!(r.matches(DENIED) || r.matches(BAD), "{rcpt}: {r}");
    }
    let r = c.cmd("DATA");
    assert!(r.matches("554 5.5.1"), "{r}");
    c.quit();
    assert!(f.sink.messages().is_empty());
}
