//! PartnerConnector objects for tests (unit tests here, the integration test, benchmarks).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use partnergate_crds::{
    Direction, IdentifyBy, InboundCertificate, InboundSpec, KeyRef, MinTlsVersion, OutboundSpec,
    OutboundTls, PartnerConnector, PartnerConnectorSpec, SenderAuthentication, TrustBundle,
};

fn meta(ns: &str, name: &str, generation: i64) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(ns.into()),
        generation: Some(generation),
        uid: Some(format!("uid-{ns}-{name}")),
        ..ObjectMeta::default()
    }
}

fn inbound_spec() -> InboundSpec {
    InboundSpec {
        identify_by: IdentifyBy::SenderDomain,
        sender_ip_ranges: vec![],
        require_tls: true,
        min_tls_version: MinTlsVersion::Tls12,
        certificate: None,
        restrict_to_ip_ranges: false,
        restrict_to_certificate: false,
        sender_authentication: SenderAuthentication::None,
    }
}

/// Inbound, identified by sender domain.
pub fn connector(ns: &str, name: &str, generation: i64, domains: &[&str]) -> PartnerConnector {
    PartnerConnector {
        metadata: meta(ns, name, generation),
        spec: PartnerConnectorSpec {
            enabled: true,
            direction: Direction::Inbound,
            domains: domains.iter().map(|d| d.to_string()).collect(),
            inbound: Some(inbound_spec()),
            outbound: None,
        },
        status: None,
    }
}

/// Inbound, identified by sender IP, restricted to the ranges.
pub fn inbound_ip(ns: &str, name: &str, generation: i64, ranges: &[&str]) -> PartnerConnector {
    let mut pc = connector(ns, name, generation, &["*"]);
    if let Some(i) = pc.spec.inbound.as_mut() {
        i.identify_by = IdentifyBy::SenderIp;
        i.sender_ip_ranges = ranges.iter().map(|r| r.to_string()).collect();
        i.restrict_to_ip_ranges = true;
    }
    pc
}

/// Inbound, identified by certificate, optionally with a trust bundle Secret (key ca.crt).
pub fn inbound_cert(
    ns: &str,
    name: &str,
    generation: i64,
    subject: &str,
    ca_secret: Option<&str>,
) -> PartnerConnector {
    let mut pc = connector(ns, name, generation, &["contoso.com"]);
    if let Some(i) = pc.spec.inbound.as_mut() {
        i.identify_by = IdentifyBy::Certificate;
        i.restrict_to_certificate = true;
        i.certificate = Some(InboundCertificate {
            subject_name: subject.into(),
            trust_bundle: ca_secret.map(|s| TrustBundle {
                secret_ref: Some(KeyRef {
                    name: s.into(),
                    key: "ca.crt".into(),
                }),
                config_map_ref: None,
            }),
        });
    }
    pc
}

/// Outbound through smart hosts with DomainValidation.
pub fn outbound(
    ns: &str,
    name: &str,
    generation: i64,
    domains: &[&str],
    smart_hosts: &[&str],
) -> PartnerConnector {
    PartnerConnector {
        metadata: meta(ns, name, generation),
        spec: PartnerConnectorSpec {
            enabled: true,
            direction: Direction::Outbound,
            domains: domains.iter().map(|d| d.to_string()).collect(),
            inbound: None,
            outbound: Some(OutboundSpec {
                smart_hosts: smart_hosts.iter().map(|h| h.to_string()).collect(),
                use_mx: false,
                tls: OutboundTls::DomainValidation,
                tls_domain: None,
                trust_bundle: None,
                client_certificate: None,
                dane: Default::default(),
                mta_sts: Default::default(),
            }),
        },
        status: None,
    }
}

/// Sets creationTimestamp to `unix` seconds.
pub fn created(pc: &mut PartnerConnector, unix: i64) {
    pc.metadata.creation_timestamp = Timestamp::from_second(unix).ok().map(Time);
}

/// A `Time` `secs` seconds after the epoch.
pub fn time(secs: i64) -> Time {
    Time(Timestamp::from_second(secs).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// What the render says of an accepted connector whose references resolved, included in the
/// config.
pub fn accepted_outcome() -> crate::render::Outcome {
    crate::render::Outcome {
        acceptance: crate::render::Acceptance::Accepted,
        resolution: crate::render::Resolution::Resolved,
        included: true,
        certificates: vec![],
        expiring: vec![],
        left_out: None,
    }
}
