//! Issue 15, MTA-STS (RFC 8461) for `useMX` Outbound connectors, against real parts: Knot
//! serving the `_mta-sts` TXT records, MX and policy-host addresses; Python's HTTPS server
//! serving the policies with a certificate from the partner's CA (the fleet's
//! `tlsPolicy.mtaStsRootsFile`); Postfix as the partner's MX. Every case asserts the reply,
//! what the MX received, and the policy metric; the cache case also what the policy server
//! was asked.

use serde_json::json;

use crate::outbound_support::tls_policy::{
    PolicyServer, fleet, partner_mx, policy_count, received_from,
};
use crate::outbound_support::{PartnerPki, send};
use crate::support::dns::{DnsServer, Zone};
use crate::support::{Gateway, GatewaySpec, Net, Pki, Sink, SinkOptions};

fn policy(mode: &str, mx: &[&str]) -> String {
    let mut p = format!("version: STSv1\r\nmode: {mode}\r\n");
    for m in mx {
        p.push_str(&format!("mx: {m}\r\n"));
    }
    p.push_str("max_age: 86400\r\n");
    p
}

const DOMAINS: [&str; 6] = ["enf", "notlisted", "badcert", "testing", "cache", "open"];

fn zone(ip_mx: std::net::Ipv4Addr, ip_https: std::net::Ipv4Addr, cache_id: u32) -> Vec<Zone> {
    let mut records = Vec::new();
    for d in DOMAINS {
        records.push(format!("{d} IN MX 10 mx.{d}"));
        records.push(format!("mx.{d} IN A {ip_mx}"));
        if d != "open" {
            let id = if d == "cache" { cache_id } else { 1 };
            records.push(format!("_mta-sts.{d} IN TXT \"v=STSv1; id={id};\""));
            records.push(format!("mta-sts.{d} IN A {ip_https}"));
        }
    }
    records.push("nopolicy IN MX 10 mx.nopolicy".into());
    records.push(format!("mx.nopolicy IN A {ip_mx}"));
    // Policies that must not count: a redirect and an over-long body.
    for d in ["redirect", "huge"] {
        records.push(format!("{d} IN MX 10 mx.enf"));
        records.push(format!("_mta-sts.{d} IN TXT \"v=STSv1; id=1;\""));
        records.push(format!("mta-sts.{d} IN A {ip_https}"));
    }
    let refs: Vec<&str> = records.iter().map(String::as_str).collect();
    vec![Zone::unsigned("sts.test", &refs)]
}

/// The world of the sts.test tests: Knot serving `zone`, one partner Postfix MX for every
/// sts.test domain (its certificate names every MX host but mx.badcert.sts.test), the policy
/// server with a policy for each domain of [`DOMAINS`] but `open` (plus a redirect and an
/// over-long one), and a gateway with the Opportunistic connector `partners/sts` (those
/// domains) and the Mandatory `partners/sts-mandatory` (nopolicy, redirect, huge).
struct Sts {
    net: Net,
    pki: Pki,
    partner: PartnerPki,
    org: Sink,
    ip_mx: std::net::Ipv4Addr,
    ip_https: std::net::Ipv4Addr,
    dns: DnsServer,
    mx: crate::support::Postfix,
    web: PolicyServer,
    all: Vec<String>,
}

impl Sts {
    fn start() -> Sts {
        let net = Net::new();
        let pki = Pki::generate();
        let partner = PartnerPki::generate();
        let org = Sink::start(net.sink_ip());
        let (ip_mx, ip_https) = (net.ip(30), net.ip(40));
        let dns = DnsServer::start(net.ip(53), zone(ip_mx, ip_https, 1));
        let mx_cert = partner.server(
            "mx",
            &[
                "mx.enf.sts.test",
                "mx.notlisted.sts.test",
                "mx.testing.sts.test",
                "mx.cache.sts.test",
                "mx.open.sts.test",
                "mx.nopolicy.sts.test",
            ],
        );
        let all: Vec<String> = DOMAINS
            .iter()
            .chain(["nopolicy"].iter())
            .map(|d| format!("{d}.sts.test"))
            .collect();
        let all_refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let mx = partner_mx(ip_mx, "mx.enf.sts.test", &all_refs, mx_cert);

        let https_names: Vec<String> = DOMAINS
            .iter()
            .chain(["redirect", "huge"].iter())
            .map(|d| format!("mta-sts.{d}.sts.test"))
            .collect();
        let https_refs: Vec<&str> = https_names.iter().map(String::as_str).collect();
        let web = PolicyServer::start(ip_https, &partner.server("mta-sts", &https_refs));
        web.set_policy("enf.sts.test", &policy("enforce", &["mx.enf.sts.test"]));
        web.set_policy(
            "notlisted.sts.test",
            &policy("enforce", &["mx9.notlisted.sts.test"]),
        );
        web.set_policy(
            "badcert.sts.test",
            &policy("enforce", &["*.badcert.sts.test"]),
        );
        web.set_policy(
            "testing.sts.test",
            &policy("testing", &["other.testing.sts.test"]),
        );
        web.set_policy("cache.sts.test", &policy("enforce", &["mx.cache.sts.test"]));
        // http.server answers a directory requested without a trailing slash with a 301.
        std::fs::create_dir_all(
            web.root
                .path()
                .join("mta-sts.redirect.sts.test/.well-known/mta-sts.txt"),
        )
        .expect("mkdir");
        let mut huge = policy("enforce", &["mx.enf.sts.test"]);
        while huge.len() <= 64 * 1024 {
            huge.push_str(
                "x-padding: an extension key, ignored but counted against the size limit\r\n",
            );
        }
        web.set_policy("huge.sts.test", &huge);
        Sts {
            net,
            pki,
            partner,
            org,
            ip_mx,
            ip_https,
            dns,
            mx,
            web,
            all,
        }
    }

    fn connectors(&self, generation: u32) -> serde_json::Value {
        json!({"inbound": [], "outbound": [
            {"name": "partners/sts", "generation": generation,
             "domains": self.all[..DOMAINS.len()],
             "useMX": true, "tls": "EncryptionOnly", "mtaSts": "Opportunistic"},
            {"name": "partners/sts-mandatory", "generation": generation,
             "domains": ["nopolicy.sts.test", "redirect.sts.test", "huge.sts.test"],
             "useMX": true, "tls": "EncryptionOnly", "mtaSts": "Mandatory"},
        ]})
    }

    fn gateway(&self) -> Gateway {
        Gateway::start(
            self.net.gateway_ip(),
            &self.pki,
            GatewaySpec::new(self.org.addr, self.connectors(1)).fleet(fleet(
                &self.net.cidr(),
                &self.dns,
                self.pki.ca.parent().expect("pki dir"),
                Some(&self.partner.ca),
            )),
        )
    }
}

#[test]
fn mta_sts_enforce_testing_cache_and_modes() {
    let mut w = Sts::start();
    let mut gw = w.gateway();
    let (net, mx, web, org) = (w.net, &w.mx, &w.web, &w.org);
    let c =
        |gw: &Gateway, policy: &str, result: &str| policy_count(gw, "partners/sts", policy, result);

    // enforce, MX listed, certificate valid for the MX host: delivered.
    send(&gw, &net, "enf@example.org", "a@enf.sts.test").assert_delivered("enforce match");
    assert!(mx.wait_received("enf@example.org").tls);
    assert_eq!(c(&gw, "mta-sts", "success"), 1);

    // enforce, MX not in the policy: deferred before connecting.
    let t = send(&gw, &net, "notlisted@example.org", "b@notlisted.sts.test");
    t.assert_refused("451 4.7.5", "MX not in policy");
    let text = t.first_failure().map(|r| r.text()).unwrap_or_default();
    assert!(text.contains("not listed in the MTA-STS policy"), "{text}");
    assert_eq!(c(&gw, "mta-sts", "deferred"), 1);

    // enforce, MX listed (by pattern) but its certificate does not name it: refused at the
    // handshake, although the connector's level (EncryptionOnly) would have taken it.
    let t = send(&gw, &net, "badcert@example.org", "c@badcert.sts.test");
    t.assert_refused("451 4.7.5", "bad certificate under enforce");
    let text = t.first_failure().map(|r| r.text()).unwrap_or_default();
    assert!(
        text.contains("MTA-STS") && text.contains("name mismatch"),
        "{text}"
    );
    assert_eq!(c(&gw, "mta-sts", "failure"), 1);

    // testing: the MX is not listed, delivered anyway, the failure counted and logged.
    send(&gw, &net, "testing@example.org", "d@testing.sts.test").assert_delivered("testing");
    assert!(mx.wait_received("testing@example.org").tls);
    assert_eq!(c(&gw, "mta-sts", "testing_failure"), 1);
    gw.wait_log(&["MTA-STS testing", "not listed"]);

    // No policy published, Opportunistic: the level applies. Mandatory: deferred.
    send(&gw, &net, "open@example.org", "e@open.sts.test").assert_delivered("no policy");
    mx.wait_received("open@example.org");
    assert_eq!(c(&gw, "none", "fallback"), 1);
    let t = send(&gw, &net, "mand@example.org", "f@nopolicy.sts.test");
    t.assert_refused("451 4.7.5", "Mandatory without a policy");
    assert_eq!(
        policy_count(&gw, "partners/sts-mandatory", "mta-sts", "deferred"),
        1
    );

    // A redirect is not followed and an over-long policy is not read: no policy, so the
    // Mandatory connector defers, naming why.
    for (from, to, why) in [
        ("redir@example.org", "h@redirect.sts.test", "HTTP 301"),
        (
            "huge@example.org",
            "i@huge.sts.test",
            "larger than 65536 bytes",
        ),
    ] {
        let t = send(&gw, &net, from, to);
        t.assert_refused("451 4.7.5", why);
        let text = t.first_failure().map(|r| r.text()).unwrap_or_default();
        assert!(text.contains(why), "{text}");
        assert!(
            !received_from(mx, from),
            "nothing from {from} reached the MX"
        );
    }
    assert_eq!(web.requests("redirect.sts.test"), 1);
    // A failed fetch is not repeated at once (for each MX address, each up to the timeout).
    send(&gw, &net, "redir2@example.org", "h@redirect.sts.test")
        .assert_refused("451 4.7.5", "the remembered failure");
    assert_eq!(web.requests("redirect.sts.test"), 1, "failure remembered");
    assert_eq!(
        policy_count(&gw, "partners/sts-mandatory", "mta-sts", "deferred"),
        4
    );

    // Cache: the first delivery fetched the policy; a changed policy file with the same TXT id
    // is not fetched again (max_age not over) ...
    send(&gw, &net, "cache1@example.org", "g@cache.sts.test").assert_delivered("cache, first");
    mx.wait_received("cache1@example.org");
    assert_eq!(web.requests("cache.sts.test"), 1);
    web.set_policy(
        "cache.sts.test",
        &policy("enforce", &["elsewhere.cache.sts.test"]),
    );
    send(&gw, &net, "cache2@example.org", "g@cache.sts.test")
        .assert_delivered("cache, policy changed but id not");
    mx.wait_received("cache2@example.org");
    assert_eq!(web.requests("cache.sts.test"), 1, "served from the cache");
    // ... and a new id makes the gateway fetch the new policy, which no longer lists the MX.
    // The TXT answer itself is in the DNS resolver's cache for its TTL; a config reload
    // builds a new resolver (and keeps the process-wide policy cache, as the enf.sts.test
    // count below shows).
    w.dns.replace_zones(zone(w.ip_mx, w.ip_https, 2));
    gw.rewrite_connectors(&w.connectors(2));
    gw.wait_config_hash(&gw.expected_hash());
    send(&gw, &net, "enf2@example.org", "a@enf.sts.test").assert_delivered("cached after reload");
    mx.wait_received("enf2@example.org");
    let t = send(&gw, &net, "cache3@example.org", "g@cache.sts.test");
    t.assert_refused("451 4.7.5", "new policy after the id changed");
    assert_eq!(web.requests("cache.sts.test"), 2);

    for from in [
        "notlisted@example.org",
        "badcert@example.org",
        "mand@example.org",
        "cache3@example.org",
    ] {
        assert!(
            !received_from(mx, from),
            "nothing from {from} reached the MX"
        );
    }
    assert_eq!(web.requests("enf.sts.test"), 1, "one fetch per policy id");
    assert!(org.messages().is_empty(), "nothing went upstream");
}

/// MTA-STS enforce authenticates an MX host the policy lists even when it is in another domain
/// than the recipient's, under the default `tls: DomainValidation` (the policy names the host
/// to check); MTA-STS testing records a host without STARTTLS and a certificate that fails the
/// policy as testing failures, never as successes. The SNI is the MX host under a policy and
/// a non-wildcard `tlsDomain` without one (as before issue 15).
#[test]
fn mta_sts_hosted_mx_and_testing_failures() {
    let net = Net::new();
    let pki = Pki::generate();
    let partner = PartnerPki::generate();
    let org = Sink::start(net.sink_ip());
    let (ip_hosted, ip_plain, ip_badtest, ip_https) =
        (net.ip(30), net.ip(31), net.ip(32), net.ip(40));
    let mut records = vec![
        "cust IN MX 10 mx.provider".to_string(),
        "sni IN MX 10 mx.provider".to_string(),
        format!("mx.provider IN A {ip_hosted}"),
        "plain IN MX 10 mx.plain".to_string(),
        format!("mx.plain IN A {ip_plain}"),
        "badtest IN MX 10 mx.badtest".to_string(),
        format!("mx.badtest IN A {ip_badtest}"),
    ];
    for d in ["cust", "plain", "badtest"] {
        records.push(format!("_mta-sts.{d} IN TXT \"v=STSv1; id=1;\""));
        records.push(format!("mta-sts.{d} IN A {ip_https}"));
    }
    let refs: Vec<&str> = records.iter().map(String::as_str).collect();
    let dns = DnsServer::start(net.ip(53), vec![Zone::unsigned("hosted.test", &refs)]);
    // Not on 443: the fleet's tlsPolicy.mtaStsPort is what the fetch uses.
    let web = PolicyServer::start_on(
        ip_https,
        8443,
        &partner.server(
            "mta-sts",
            &[
                "mta-sts.cust.hosted.test",
                "mta-sts.plain.hosted.test",
                "mta-sts.badtest.hosted.test",
            ],
        ),
    );
    web.set_policy(
        "cust.hosted.test",
        &policy("enforce", &["mx.provider.hosted.test"]),
    );
    web.set_policy(
        "plain.hosted.test",
        &policy("testing", &["mx.plain.hosted.test"]),
    );
    web.set_policy(
        "badtest.hosted.test",
        &policy("testing", &["mx.badtest.hosted.test"]),
    );
    let tls_sink = |ip, names: &[&str]| {
        Sink::start_at(
            std::net::SocketAddr::from((ip, 25)),
            SinkOptions {
                starttls: Some(partner.server(names[0], names)),
                ..SinkOptions::default()
            },
        )
    };
    let hosted = tls_sink(ip_hosted, &["mx.provider.hosted.test", "mail.sni.example"]);
    let plain = Sink::start_at(
        std::net::SocketAddr::from((ip_plain, 25)),
        SinkOptions::default(),
    );
    // Listed in the policy, but the certificate names another host.
    let badtest = tls_sink(ip_badtest, &["elsewhere.hosted.test"]);
    let gw = Gateway::start(
        net.gateway_ip(),
        &pki,
        GatewaySpec::new(
            org.addr,
            json!({"inbound": [], "outbound": [
                {"name": "partners/hosted", "generation": 1, "domains": ["cust.hosted.test"],
                 "useMX": true, "tls": "DomainValidation", "trustBundleFile": partner.ca,
                 "mtaSts": "Opportunistic"},
                // No policy mode: the SNI is the tlsDomain, as before issue 15.
                {"name": "partners/sni", "generation": 1, "domains": ["sni.hosted.test"],
                 "useMX": true, "tls": "DomainValidation", "tlsDomain": "mail.sni.example",
                 "trustBundleFile": partner.ca},
                {"name": "partners/testing", "generation": 1,
                 "domains": ["plain.hosted.test", "badtest.hosted.test"],
                 "useMX": true, "tls": "Opportunistic", "mtaSts": "Opportunistic"},
            ]}),
        )
        .fleet({
            let mut f = fleet(
                &net.cidr(),
                &dns,
                pki.ca.parent().expect("pki dir"),
                Some(&partner.ca),
            );
            f["tlsPolicy"]["mtaStsPort"] = json!(8443);
            f
        }),
    );

    send(&gw, &net, "cust@example.org", "a@cust.hosted.test")
        .assert_delivered("MTA-STS enforce, MX host in another domain");
    assert!(hosted.wait_messages(1)[0].tls);
    assert_eq!(
        policy_count(&gw, "partners/hosted", "mta-sts", "success"),
        1
    );
    assert_eq!(
        policy_count(&gw, "partners/hosted", "mta-sts", "failure"),
        0
    );

    send(&gw, &net, "sni@example.org", "s@sni.hosted.test").assert_delivered("tlsDomain");
    hosted.wait_messages(2);
    // Transcripts are filed when the connections end (after each client session).
    let snis = crate::support::wait_for(
        std::time::Duration::from_secs(30),
        "the hosted MX's two transcripts",
        || {
            let t = hosted.transcripts();
            (t.len() == 2).then_some(t)
        },
    );
    let sni_of = |from: &str| {
        snis.iter()
            .find(|t| t.contains(&format!("MAIL FROM:<{from}>")))
            .and_then(|t| t.lines().find_map(|l| l.strip_prefix("<TLS, SNI ")))
            .map(|l| l.trim_end_matches('>').to_string())
    };
    assert_eq!(
        sni_of("cust@example.org").as_deref(),
        Some("mx.provider.hosted.test"),
        "under MTA-STS the SNI is the MX host"
    );
    assert_eq!(
        sni_of("sni@example.org").as_deref(),
        Some("mail.sni.example"),
        "without a policy the SNI is a non-wildcard tlsDomain"
    );

    send(&gw, &net, "plain@example.org", "b@plain.hosted.test")
        .assert_delivered("MTA-STS testing, no STARTTLS");
    assert!(!plain.wait_messages(1)[0].tls);
    let t = |result| policy_count(&gw, "partners/testing", "mta-sts", result);
    assert_eq!(t("testing_failure"), 1);
    gw.wait_log(&["MTA-STS testing", "STARTTLS"]);

    send(&gw, &net, "badtest@example.org", "c@badtest.hosted.test")
        .assert_delivered("MTA-STS testing, certificate name mismatch");
    assert!(badtest.wait_messages(1)[0].tls);
    assert_eq!(t("testing_failure"), 2);
    assert_eq!(t("success"), 0, "a testing failure is no success");
    for d in ["cust", "plain", "badtest"] {
        assert_eq!(
            web.requests(&format!("{d}.hosted.test")),
            1,
            "{d}: fetched on 8443"
        );
    }
    assert!(org.messages().is_empty(), "nothing went upstream");
}

/// Several recipients in one transaction, on routes whose MTA-STS outcomes differ (the relay
/// contract's invariants under a TLS policy): a recipient the policy defers pins nothing, so a
/// later recipient of another route is still accepted; once a route is pinned, recipients of
/// other routes get `452 4.5.3` before any policy work; a recipient whose MX failed the policy
/// at the handshake is never carried by another route's connection. The MX must receive each
/// message for exactly the recipients the gateway acknowledged.
#[test]
fn recipients_of_one_transaction_under_different_policies() {
    let w = Sts::start();
    let gw = w.gateway();
    let (net, mx, org) = (w.net, &w.mx, &w.org);
    let (mut c, _) = crate::support::SmtpConn::connect(gw.smtp, Some(net.client(0)));
    c.cmd("EHLO relay.example.org");
    let rcpt_replies = |t: &crate::support::Transcript| -> Vec<String> {
        t.replies_to("RCPT TO")
            .iter()
            .map(|r| {
                r.summary()
                    .split_whitespace()
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect()
    };
    let body = |from: &str| crate::support::message(from, "list@sts.test", "several", &[]);

    // 1. Deferred by the policy (MX not listed), then two of a route the policy accepts, then
    //    a route of the same connector and one of another connector: pinned, 452.
    let t = c.send_mail(
        "t1@example.org",
        &[
            "a@notlisted.sts.test",
            "b@enf.sts.test",
            "c@badcert.sts.test",
            "d@enf.sts.test",
            "e@nopolicy.sts.test",
        ],
        &body("t1@example.org"),
    );
    assert_eq!(
        rcpt_replies(&t),
        [
            "451 4.7.5",
            "250 2.1.5",
            "452 4.5.3",
            "250 2.1.5",
            "452 4.5.3"
        ],
        "{}",
        t.raw
    );
    assert_eq!(t.data_end().map(|r| r.code), Some(250), "{}", t.raw);
    assert_eq!(
        mx.wait_recipients("t1@example.org", 2),
        ["b@enf.sts.test", "d@enf.sts.test"]
    );

    // 2. Refused at the handshake (the certificate does not name the MX host), then a testing
    //    domain on the same MX address: delivered over a connection of its own.
    let t = c.send_mail(
        "t2@example.org",
        &["c@badcert.sts.test", "f@testing.sts.test"],
        &body("t2@example.org"),
    );
    assert_eq!(rcpt_replies(&t), ["451 4.7.5", "250 2.1.5"], "{}", t.raw);
    assert_eq!(t.data_end().map(|r| r.code), Some(250), "{}", t.raw);
    assert_eq!(
        mx.wait_recipients("t2@example.org", 1),
        ["f@testing.sts.test"]
    );

    // 3. Mandatory without a published policy: deferred; then the enforce route again (the
    //    session's parked connection may be reused only for its own route).
    let t = c.send_mail(
        "t3@example.org",
        &[
            "g@nopolicy.sts.test",
            "h@enf.sts.test",
            "i@testing.sts.test",
        ],
        &body("t3@example.org"),
    );
    assert_eq!(
        rcpt_replies(&t),
        ["451 4.7.5", "250 2.1.5", "452 4.5.3"],
        "{}",
        t.raw
    );
    assert_eq!(t.data_end().map(|r| r.code), Some(250), "{}", t.raw);
    assert_eq!(mx.wait_recipients("t3@example.org", 1), ["h@enf.sts.test"]);
    c.quit();

    // Exactly those recipients, once each, and nothing else reached the MX or went upstream.
    let mut got: Vec<(String, Vec<String>)> = mx
        .received()
        .into_iter()
        .map(|r| {
            let mut v = r.recipients;
            v.sort();
            (r.from, v)
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            (
                "t1@example.org".to_string(),
                vec!["b@enf.sts.test".to_string(), "d@enf.sts.test".to_string()]
            ),
            (
                "t2@example.org".to_string(),
                vec!["f@testing.sts.test".to_string()]
            ),
            (
                "t3@example.org".to_string(),
                vec!["h@enf.sts.test".to_string()]
            ),
        ]
    );
    assert_eq!(
        policy_count(&gw, "partners/sts", "mta-sts", "testing_failure"),
        1
    );
    assert!(org.messages().is_empty(), "nothing went upstream");
}
