//! ARCHITECTURE section 4 (contract), Outbound TLS levels against a real partner: a private
//! Postfix plays the partner's receiving server in four variants (no STARTTLS, self-signed
//! certificate, a certificate from the partner's CA for the wrong name, a valid certificate),
//! and one gateway per variant relays an internal sender's mail through four Outbound
//! connectors, one per TLS level, all pointing at that Postfix. Each of the 16 cells must
//! either be delivered (the partner's log shows the message and `discard` `status=sent`) or be
//! refused with `451 4.7.5` and the reason, with nothing at all reaching the partner (no
//! `from=<…>` for that sender in its log: the gateway never sent MAIL FROM in plaintext or over
//! an unverified channel). The valid variant also checks mutual TLS: the gateway presents its
//! client certificate and the partner Postfix logs a `Trusted TLS connection`.

use crate::outbound_support::PartnerPki;
use crate::support::net::free_port;
use crate::support::postfix::ReceiverOptions;
use crate::support::{Gateway, GatewaySpec, Net, Pki, Postfix, Sink, SmtpConn, message};
use serde_json::json;

const LEVELS: [(&str, &str); 4] = [
    ("Opportunistic", "opp"),
    ("EncryptionOnly", "enc"),
    ("CertificateValidation", "cv"),
    ("DomainValidation", "dv"),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    NoStarttls,
    SelfSigned,
    WrongName,
    Valid,
}

/// What a cell must show: delivered, or `451 4.7.5` with these words in the reason.
#[derive(Debug, Clone, Copy)]
enum Expect {
    Delivered,
    Refused(&'static str),
}

use Expect::{Delivered, Refused};

const NO_STARTTLS: Expect = Refused("does not offer STARTTLS");
const UNTRUSTED: Expect = Refused("untrusted certificate chain");
const MISMATCH: Expect = Refused("certificate name mismatch");

fn run(variant: Variant, expect: [Expect; 4]) {
    let net = Net::new();
    let pki = Pki::generate();
    let partner = PartnerPki::generate();
    let org = Sink::start(net.sink_ip());
    let pf_ip = net.ip(30);
    let listen = std::net::SocketAddr::from((pf_ip, free_port(pf_ip)));
    let domains: Vec<String> = LEVELS
        .iter()
        .map(|(_, p)| format!("{p}.partner.test"))
        .collect();
    let mut opts = ReceiverOptions::new(
        listen,
        &domains.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    opts.server_cert = match variant {
        Variant::NoStarttls => None,
        Variant::SelfSigned => Some(partner.self_signed("self-signed", &["mx.partner.test"])),
        Variant::WrongName => Some(partner.server("wrong-name", &["mail.elsewhere.test"])),
        Variant::Valid => Some(partner.server("valid", &["mx.partner.test"])),
    };
    // The partner trusts our organisation's CA for client certificates.
    opts.client_ca = Some(pki.ca.clone());
    let pf = Postfix::start_receiver(opts);

    let outbound: Vec<_> = LEVELS
        .iter()
        .zip(&domains)
        .map(|((level, p), domain)| {
            let mut c = json!({
                "name": format!("partners/{p}"),
                "generation": 1,
                "domains": [domain],
                "smartHosts": [format!("[{}]:{}", listen.ip(), listen.port())],
                "tls": level,
            });
            if matches!(*level, "CertificateValidation" | "DomainValidation") {
                c["trustBundleFile"] = json!(partner.ca);
            }
            if *level == "DomainValidation" {
                c["tlsDomain"] = json!("mx.partner.test");
            }
            if variant == Variant::Valid {
                c["clientCertificate"] = json!({
                    "certFile": pki.internal_client.cert,
                    "keyFile": pki.internal_client.key,
                });
            }
            c
        })
        .collect();
    let gw = Gateway::start(
        net.gateway_ip(),
        &pki,
        GatewaySpec::new(org.addr, json!({"inbound": [], "outbound": outbound}))
            .fleet(json!({"internalSenders": {"ipRanges": [net.cidr()]}})),
    );

    let mut table = Vec::new();
    for (((level, p), domain), expect) in LEVELS.iter().zip(&domains).zip(expect) {
        let sender = format!("{p}-{variant:?}@example.org").to_ascii_lowercase();
        let rcpt = format!("dana@{domain}");
        let ctx = format!("{variant:?} × {level}");
        let (mut c, _) = SmtpConn::connect(gw.smtp, Some(net.client(0)));
        c.cmd("EHLO relay.example.org");
        let t = c.send_mail(&sender, &[&rcpt], &message(&sender, &rcpt, &ctx, &[]));
        c.quit();
        match expect {
            Delivered => {
                t.assert_delivered(&ctx);
                let r = pf.wait_received(&sender);
                let starttls_offered = variant != Variant::NoStarttls;
                assert_eq!(
                    r.tls,
                    starttls_offered,
                    "{ctx}: TLS iff the partner offers STARTTLS: {r:?}\n{}",
                    pf.maillog()
                );
                if variant == Variant::Valid {
                    assert_eq!(
                        r.tls_trust.as_deref(),
                        Some("Trusted"),
                        "{ctx}: mutual TLS, the partner verified our client certificate: {r:?}\n{}",
                        pf.maillog()
                    );
                }
                table.push(format!(
                    "{ctx}: delivered ({})",
                    r.tls_trust.as_deref().unwrap_or("plaintext")
                ));
            }
            Refused(reason) => {
                t.assert_refused("451 4.7.5", &ctx);
                let reply = t.first_failure().map(|r| r.text()).unwrap_or_default();
                assert!(
                    reply.contains(reason),
                    "{ctx}: the reply names the reason {reason:?}: {reply}"
                );
                assert!(org.messages().is_empty(), "{ctx}: nothing went to upstream");
                table.push(format!("{ctx}: 451 4.7.5 {reason}"));
            }
        }
    }
    // Nothing at all reached the partner for a refused cell: it never saw MAIL FROM from that
    // sender (neither in plaintext nor over an unverified channel).
    let log = pf.maillog();
    for ((_, p), expect) in LEVELS.iter().zip(expect) {
        if let Refused(_) = expect {
            let sender = format!("{p}-{variant:?}@example.org").to_ascii_lowercase();
            assert!(
                !log.contains(&format!("from=<{sender}>")),
                "{variant:?}: the partner saw a message from {sender} although the level forbids it:\n{log}"
            );
        }
    }
    if variant == Variant::NoStarttls {
        // Every session the gateway opened to check the level ended without MAIL, except the
        // one Opportunistic delivery.
        let with_mail = log
            .lines()
            .filter(|l| l.contains("disconnect from") && l.contains(" mail="))
            .count();
        assert_eq!(with_mail, 1, "one plaintext transaction only:\n{log}");
    }
    if variant == Variant::Valid {
        assert!(
            log.contains("Trusted TLS connection established"),
            "mutual TLS seen by the partner:\n{log}"
        );
        assert!(
            log.contains("subject_CN=relay.example.org, issuer=partnergate test CA"),
            "the partner logged our client certificate's subject and issuer:\n{log}"
        );
    }
    println!("{}", table.join("\n"));
}

#[test]
fn partner_without_starttls() {
    run(
        Variant::NoStarttls,
        [Delivered, NO_STARTTLS, NO_STARTTLS, NO_STARTTLS],
    );
}

#[test]
fn partner_with_self_signed_certificate() {
    run(
        Variant::SelfSigned,
        [Delivered, Delivered, UNTRUSTED, UNTRUSTED],
    );
}

#[test]
fn partner_with_valid_chain_for_the_wrong_name() {
    run(
        Variant::WrongName,
        [Delivered, Delivered, Delivered, MISMATCH],
    );
}

#[test]
fn partner_with_valid_certificate_and_mutual_tls() {
    run(Variant::Valid, [Delivered, Delivered, Delivered, Delivered]);
}
