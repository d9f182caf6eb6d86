//! The CRD's CEL rules, evaluated client-side (kube's `cel` feature) on raw objects, so each
//! apply-time refusal is tested without an apiserver. The apiserver integration test in the
//! operator crate checks the same refusals for real.

use kube::core::cel::Validator;
use serde_json::{Value, json};

fn schema() -> Value {
    let crd = partnergate_crds::crd();
    let s = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("schema");
    serde_json::to_value(s).expect("schema json")
}

fn obj(spec: Value) -> Value {
    json!({
        "apiVersion": "partnergate.io/v1alpha1",
        "kind": "PartnerConnector",
        "metadata": {"name": "x", "namespace": "mail"},
        "spec": spec,
    })
}

fn errors(spec: Value) -> String {
    match Validator::new().validate(&schema(), &obj(spec), None) {
        Ok(()) => String::new(),
        Err(e) => format!("{e:?}"),
    }
}

#[track_caller]
fn ok(spec: Value) {
    let e = errors(spec);
    assert!(e.is_empty(), "expected valid, got {e}");
}

#[track_caller]
fn refused(spec: Value, needle: &str) {
    let e = errors(spec);
    assert!(
        e.contains(needle),
        "expected refusal naming {needle:?}, got {e:?}"
    );
}

#[test]
fn valid_examples_pass() {
    ok(
        json!({"direction": "Inbound", "domains": ["contoso.com", "*.contoso.com"],
        "inbound": {"identifyBy": "Certificate", "requireTls": true,
            "certificate": {"subjectName": "mail.contoso.com",
                "trustBundle": {"secretRef": {"name": "contoso-ca", "key": "ca.crt"}}},
            "restrictToCertificate": true}}),
    );
    ok(json!({"direction": "Inbound", "domains": ["*"],
        "inbound": {"identifyBy": "SenderIP",
            "senderIPRanges": ["203.0.113.0/24", "2001:db8:1::/48"], "restrictToIPRanges": true}}));
    ok(json!({"direction": "Outbound", "domains": ["fabrikam.com"],
        "outbound": {"smartHosts": ["smtp.fabrikam.com:25", "[192.0.2.10]:2525", "mx.fabrikam.com"],
            "tls": "DomainValidation", "tlsDomain": "*.fabrikam.com"}}));
    ok(json!({"direction": "Outbound", "domains": ["fabrikam.com"],
        "outbound": {"useMX": true, "tls": "Opportunistic"}}));
    for auth in ["None", "SPF", "DKIM", "DMARC"] {
        ok(json!({"direction": "Inbound", "domains": ["contoso.com"],
            "inbound": {"senderAuthentication": auth}}));
    }
}

#[test]
fn inbound_outbound_follow_direction() {
    refused(
        json!({"direction": "Inbound", "domains": ["a.com"]}),
        "spec.inbound is required",
    );
    refused(
        json!({"direction": "Outbound", "domains": ["a.com"]}),
        "spec.outbound is required",
    );
    refused(
        json!({"direction": "Inbound", "domains": ["a.com"], "inbound": {},
            "outbound": {"useMX": true}}),
        "spec.outbound must not be set",
    );
    refused(
        json!({"direction": "Outbound", "domains": ["a.com"], "inbound": {},
            "outbound": {"useMX": true}}),
        "spec.inbound must not be set",
    );
}

#[test]
fn sender_ip_needs_ranges() {
    refused(
        json!({"direction": "Inbound", "domains": ["a.com"], "inbound": {"identifyBy": "SenderIP"}}),
        "spec.inbound.senderIPRanges is required",
    );
    refused(
        json!({"direction": "Inbound", "domains": ["a.com"],
            "inbound": {"restrictToIPRanges": true, "senderIPRanges": []}}),
        "spec.inbound.senderIPRanges is required",
    );
}

#[test]
fn certificate_needs_subject_name() {
    refused(
        json!({"direction": "Inbound", "domains": ["a.com"], "inbound": {"identifyBy": "Certificate"}}),
        "spec.inbound.certificate.subjectName is required",
    );
    refused(
        json!({"direction": "Inbound", "domains": ["a.com"], "inbound": {"restrictToCertificate": true}}),
        "spec.inbound.certificate.subjectName is required",
    );
    refused(
        json!({"direction": "Inbound", "domains": ["a.com"],
            "inbound": {"certificate": {"subjectName": "bad name!"}}}),
        "spec.inbound.certificate.subjectName must be",
    );
}

#[test]
fn cidrs_are_checked() {
    refused(
        json!({"direction": "Inbound", "domains": ["a.com"],
            "inbound": {"identifyBy": "SenderIP", "senderIPRanges": ["203.0.113.0/33"]}}),
        "spec.inbound.senderIPRanges: each entry must be a CIDR",
    );
    refused(
        json!({"direction": "Inbound", "domains": ["a.com"],
            "inbound": {"identifyBy": "SenderIP", "senderIPRanges": ["not-an-ip"]}}),
        "spec.inbound.senderIPRanges: each entry must be a CIDR",
    );
}

#[test]
fn domains_are_checked() {
    for bad in [
        "a..b",
        "-a.com",
        "a_b.com",
        "ex ample.com",
        "**.a",
        "a.*.com",
        "*.",
    ] {
        refused(
            json!({"direction": "Inbound", "domains": [bad], "inbound": {}}),
            "spec.domains: each entry must be",
        );
    }
}

#[test]
fn outbound_rules() {
    refused(
        json!({"direction": "Outbound", "domains": ["f.com"], "outbound": {}}),
        "spec.outbound: set smartHosts or useMX",
    );
    refused(
        json!({"direction": "Outbound", "domains": ["f.com"],
            "outbound": {"useMX": true, "smartHosts": ["smtp.f.com"]}}),
        "mutually exclusive",
    );
    refused(
        json!({"direction": "Outbound", "domains": ["f.com"],
            "outbound": {"smartHosts": ["smtp.f.com"], "tls": "EncryptionOnly", "tlsDomain": "f.com"}}),
        "spec.outbound.tlsDomain is only allowed with tls: DomainValidation",
    );
    refused(
        json!({"direction": "Outbound", "domains": ["f.com"],
            "outbound": {"smartHosts": ["[not-ip]:25"]}}),
        "spec.outbound.smartHosts: each entry must be",
    );
    refused(
        json!({"direction": "Outbound", "domains": ["f.com"],
            "outbound": {"smartHosts": ["smtp.f.com"],
                "trustBundle": {"secretRef": {"name": "a"}, "configMapRef": {"name": "b"}}}}),
        "trustBundle: set exactly one",
    );
}

/// Review finding: a wildcard over a single label (`*.com`) in a certificate name.
#[test]
fn certificate_name_wildcards_need_two_labels() {
    for bad in ["*.com", "*.test"] {
        refused(
            json!({"direction": "Outbound", "domains": ["f.com"],
                "outbound": {"smartHosts": ["smtp.f.com"], "tls": "DomainValidation", "tlsDomain": bad}}),
            "spec.outbound.tlsDomain: a wildcard needs two labels or more",
        );
        refused(
            json!({"direction": "Inbound", "domains": ["a.com"],
                "inbound": {"identifyBy": "Certificate", "certificate": {"subjectName": bad}}}),
            "spec.inbound.certificate.subjectName: a wildcard needs two labels or more",
        );
    }
    for good in ["*.f.com", "*.mx.f.com", "smtp.f.com", "localhost"] {
        ok(json!({"direction": "Outbound", "domains": ["f.com"],
                "outbound": {"smartHosts": ["smtp.f.com"], "tls": "DomainValidation", "tlsDomain": good}}));
        ok(json!({"direction": "Inbound", "domains": ["a.com"],
            "inbound": {"identifyBy": "Certificate", "certificate": {"subjectName": good}}}));
    }
}

/// Review finding: requireTls false with minTlsVersion "1.3" accepted plaintext but refused
/// TLS 1.2; the combination is refused at apply.
#[test]
fn min_tls_13_needs_require_tls() {
    refused(
        json!({"direction": "Inbound", "domains": ["a.com"],
            "inbound": {"requireTls": false, "minTlsVersion": "1.3"}}),
        "spec.inbound.minTlsVersion \\\"1.3\\\" needs requireTls: true",
    );
    ok(json!({"direction": "Inbound", "domains": ["a.com"],
        "inbound": {"requireTls": true, "minTlsVersion": "1.3"}}));
    ok(json!({"direction": "Inbound", "domains": ["a.com"],
        "inbound": {"minTlsVersion": "1.3"}}));
    ok(json!({"direction": "Inbound", "domains": ["a.com"],
        "inbound": {"requireTls": false, "minTlsVersion": "1.2"}}));
    ok(json!({"direction": "Inbound", "domains": ["a.com"], "inbound": {"requireTls": false}}));
}
