//! Connector validation probes (docs/interfaces.md, `/status.validation`): the gateway probes
//! each Outbound connector's next hops — connect, EHLO, STARTTLS, the connector's TLS level,
//! QUIT — and reports each result on `/status` and in
//! `partnergate_connector_validation_total`. No mail is sent; a changed connector is probed
//! again shortly after the change, a removed one disappears from the report.

use std::time::Duration;

use crate::support::net::closed_addr;
use crate::support::pki::material_name;
use crate::support::{Gateway, GatewaySpec, Net, Pki, Sink, SinkOptions, wait_for};
use serde_json::{Value, json};

fn connector(name: &str, gen_: i64, host: std::net::SocketAddr, extra: Value) -> Value {
    let mut c = json!({
        "name": name, "generation": gen_, "domains": [format!("{}.partner.test", name.replace('/', "-"))],
        "smartHosts": [format!("[{}]:{}", host.ip(), host.port())],
    });
    crate::support::merge_json(&mut c, &extra);
    c
}

fn results(gw: &Gateway) -> Vec<Value> {
    gw.status()["validation"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn entry<'a>(v: &'a [Value], connector: &str) -> Option<&'a Value> {
    v.iter().find(|e| e["connector"] == connector)
}

fn rfc3339(v: &Value) -> bool {
    v.as_str().is_some_and(|s| {
        time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).is_ok()
    })
}

#[test]
fn probes_report_success_and_failure_without_sending_mail() {
    let net = Net::new();
    let pki = Pki::generate();
    let org = Sink::start(net.sink_ip());
    // The partner: STARTTLS with a certificate for sink.test from the private CA.
    let partner = Sink::start_with(
        net.ip(3),
        SinkOptions {
            starttls: Some(pki.sink.clone()),
            ..SinkOptions::default()
        },
    );
    let down = closed_addr(net.ip(4));
    let ca = material_name(&pki.ca_pem);
    let dv =
        |name: &str| json!({"tls": "DomainValidation", "tlsDomain": name, "trustBundleFile": ca});
    let good = connector("mail/good", 1, partner.addr, dv("sink.test"));
    let mut files = json!({"inbound": [], "outbound": [
        good,
        connector("mail/wrong-name", 1, partner.addr, dv("other.test")),
        connector("mail/down", 1, down, json!({"tls": "Opportunistic"})),
    ]});
    let mut gw = Gateway::start(
        net.gateway_ip(),
        &pki,
        GatewaySpec::new(org.addr, files.clone()).fleet(json!({"validationIntervalSecs": 600})),
    );

    let v = wait_for(Duration::from_secs(20), "3 validation results", || {
        let v = results(&gw);
        (v.len() == 3).then_some(v)
    });
    let ok = entry(&v, "mail/good").expect("mail/good");
    assert_eq!(ok["result"], "Success", "{ok}");
    assert_eq!(
        ok["host"],
        format!("{}:{}", partner.addr.ip(), partner.addr.port())
    );
    assert_eq!(ok["tlsVersion"], "1.3", "{ok}");
    assert!(
        ok["peerSubject"]
            .as_str()
            .is_some_and(|s| s.contains("sink.test")),
        "{ok}"
    );
    assert!(rfc3339(&ok["peerNotAfter"]) && rfc3339(&ok["time"]), "{ok}");
    assert!(ok["error"].is_null(), "{ok}");

    let bad = entry(&v, "mail/wrong-name").expect("mail/wrong-name");
    assert_eq!(bad["result"], "Failure", "{bad}");
    let err = bad["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("451 4.7.5") && err.contains("certificate name mismatch"),
        "{bad}"
    );
    assert!(
        bad["tlsVersion"].is_null() && bad["peerSubject"].is_null(),
        "{bad}"
    );

    let unreachable = entry(&v, "mail/down").expect("mail/down");
    assert_eq!(unreachable["result"], "Failure");
    assert!(
        unreachable["error"]
            .as_str()
            .is_some_and(|e| e.contains("451 4.4.1")),
        "{unreachable}"
    );

    // No mail: the partner saw EHLO, STARTTLS and QUIT only.
    assert!(partner.messages().is_empty());
    let transcripts = partner.transcripts();
    assert!(!transcripts.is_empty());
    for t in &transcripts {
        assert!(!t.to_ascii_uppercase().contains("MAIL FROM"), "{t}");
    }
    let (_, metrics) = gw.get("/metrics");
    assert!(
        metrics.contains(
            "partnergate_connector_validation_total{connector=\"mail/good\",result=\"success\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "partnergate_connector_validation_total{connector=\"mail/wrong-name\",result=\"failure\"} 1"
        ),
        "{metrics}"
    );

    // Fix one connector and remove another: the change is probed right away.
    files["outbound"] = json!([
        files["outbound"][0],
        connector("mail/wrong-name", 2, partner.addr, dv("sink.test")),
    ]);
    gw.rewrite_connectors(&files);
    wait_for(
        Duration::from_secs(20),
        "the fixed connector probed again",
        || {
            let v = results(&gw);
            let fixed = entry(&v, "mail/wrong-name").is_some_and(|e| e["result"] == "Success");
            (fixed && entry(&v, "mail/down").is_none() && v.len() == 2).then_some(())
        },
    );
}
