//! The admin port (docs/interfaces.md): /healthz, /readyz, /status, /metrics; and SIGTERM.

use std::time::Duration;

use crate::support::{
    Fixture, SinkOptions, SmtpConn, Swaks, connectors, inbound, message, wait_for,
};
use serde_json::json;

#[test]
fn status_reports_hash_connectors_generations_and_certificates() {
    let f = Fixture::build(
        SinkOptions::default(),
        |_, s| s,
        |_, _| {
            json!({
                "inbound": [
                    inbound("mail/contoso", &["contoso.com"], json!({"generation": 3})),
                    inbound("partners/tailspin", &["tailspin.example"], json!({"generation": 1})),
                ],
                "outbound": [{"name": "mail/fabrikam-out", "generation": 7,
                              "domains": ["fabrikam.example"],
                              "smartHosts": ["[127.0.0.1]:2"], "tls": "Opportunistic"}],
            })
        },
    );
    assert_eq!(f.gw.get("/healthz").0, 200);
    assert_eq!(f.gw.get("/readyz").0, 200);
    let s = f.gw.status();
    assert_eq!(
        s["configHash"].as_str(),
        Some(f.gw.expected_hash().as_str()),
        "configHash is the sha256 of the connectors file bytes: {s}"
    );
    assert!(s["lastReloadError"].is_null(), "{s}");
    assert!(
        s["loadedAt"].as_str().is_some_and(|t| t.contains('T')),
        "loadedAt is an RFC 3339 time: {s}"
    );
    let mut got: Vec<(String, String, i64)> = s["connectors"]
        .as_array()
        .expect("connectors array")
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap_or("").to_string(),
                c["direction"].as_str().unwrap_or("").to_string(),
                c["generation"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("mail/contoso".into(), "Inbound".into(), 3),
            ("mail/fabrikam-out".into(), "Outbound".into(), 7),
            ("partners/tailspin".into(), "Inbound".into(), 1),
        ]
    );
    let certs = s["certificates"].as_array().expect("certificates array");
    assert!(
        certs.iter().any(|c| c["file"] == "server"
            && c["subject"]
                .as_str()
                .is_some_and(|x| x.contains("gateway.test"))
            && c["notAfter"].as_str().is_some()),
        "the server certificate and its expiry: {s}"
    );
}

#[test]
fn metrics_count_sessions_messages_and_rejections() {
    let f = Fixture::start(connectors(vec![inbound(
        "mail/contoso",
        &["contoso.com"],
        json!({"requireTls": true}),
    )]));
    Swaks::new(f.gw.smtp)
        .tls()
        .from("alice@contoso.com")
        .to("bob@example.org")
        .run()
        .assert_delivered("one message");
    Swaks::new(f.gw.smtp)
        .from("alice@contoso.com")
        .to("bob@example.org")
        .run()
        .assert_refused("530 5.7.0", "plaintext");
    let (code, body) = f.gw.get("/metrics");
    assert_eq!(code, 200);
    let value = |name: &str| -> f64 {
        body.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(
        value("partnergate_sessions_total") >= 2.0,
        "partnergate_sessions_total counts both sessions:\n{body}"
    );
    assert!(
        body.lines()
            .any(|l| l.starts_with("partnergate_messages_total") && l.contains("mail/contoso")),
        "partnergate_messages_total{{connector=\"mail/contoso\",...}}:\n{body}"
    );
    assert!(
        body.lines()
            .any(|l| l.starts_with("partnergate_rejections_total")),
        "partnergate_rejections_total:\n{body}"
    );
    assert!(
        body.contains("partnergate_tls_handshakes_total"),
        "partnergate_tls_handshakes_total:\n{body}"
    );
}

#[test]
fn sigterm_lets_open_sessions_finish_then_says_421_432() {
    let mut f = Fixture::build(
        SinkOptions::default(),
        |_, s| s.fleet(json!({"timeouts": {"shutdownGraceSecs": 3}})),
        |_, _| connectors(vec![]),
    );
    let (mut a, _) = SmtpConn::connect(f.gw.smtp, None);
    a.cmd("EHLO client.test");
    f.gw.signal("TERM");
    wait_for(Duration::from_secs(10), "/readyz 503 after SIGTERM", || {
        match crate::support::gateway::http_get(f.gw.admin, "/readyz") {
            Ok((503, _)) | Err(_) => Some(()),
            _ => None,
        }
    });
    // The open session may still finish its transaction.
    let t = a.send_mail(
        "alice@contoso.com",
        &["bob@example.org"],
        &message(
            "alice@contoso.com",
            "bob@example.org",
            "during shutdown",
            &[],
        ),
    );
    t.assert_delivered("a session open before SIGTERM");
    // Then, at the deadline, it is told to go.
    let r = a.read_reply().expect("421 at the end of the grace period");
    crate::support::assert_reply(&r, "421 4.3.2", "shutdown deadline");
    wait_for(Duration::from_secs(10), "the gateway to exit", || {
        f.gw.exited()
    });
    assert_eq!(f.sink.messages().len(), 1);
}
