//! The usual set-up: certificates, a recording sink, and a gateway relaying to it.

use serde_json::{Value, json};

use super::gateway::{Gateway, GatewaySpec};
use super::net::Net;
use super::pki::{Pki, material_name};
use super::sink::{Sink, SinkOptions};

/// Fields drop in order: the gateway is killed first.
pub struct Fixture {
    pub gw: Gateway,
    pub sink: Sink,
    pub pki: Pki,
    pub net: Net,
}

impl Fixture {
    /// Gateway with default fleet settings and `connectors`, relaying to a plain sink.
    pub fn start(connectors: Value) -> Fixture {
        Fixture::build(SinkOptions::default(), |_, s| s, |_, _| connectors)
    }

    /// Full control: sink options, a function adjusting the gateway spec, and connectors
    /// computed from the test's addresses and the PKI (for material file names).
    pub fn build(
        sink_opts: SinkOptions,
        spec: impl FnOnce(&Net, GatewaySpec) -> GatewaySpec,
        connectors: impl FnOnce(&Net, &Pki) -> Value,
    ) -> Fixture {
        let net = Net::new();
        let pki = Pki::generate();
        let sink = Sink::start_with(net.sink_ip(), sink_opts);
        let spec = spec(&net, GatewaySpec::new(sink.addr, connectors(&net, &pki)));
        let gw = Gateway::start(net.gateway_ip(), &pki, spec);
        Fixture { gw, sink, pki, net }
    }
}

/// The material file name of the Contoso CA bundle.
pub fn contoso_bundle(pki: &Pki) -> String {
    material_name(&pki.contoso_ca_pem)
}

/// An inbound connector: `name`, `domains` and any other fields from `extra`.
pub fn inbound(name: &str, domains: &[&str], extra: Value) -> Value {
    let mut c = json!({"name": name, "generation": 1, "domains": domains});
    super::merge_json(&mut c, &extra);
    c
}

/// A connectors file with these inbound connectors.
pub fn connectors(inbound: Vec<Value>) -> Value {
    json!({"inbound": inbound, "outbound": []})
}

/// The one `X-Partnergate-Connector:` header of a relayed message (panics unless exactly one).
#[track_caller]
pub fn connector_header(m: &super::Recorded) -> String {
    let v = m.header_values("X-Partnergate-Connector");
    assert_eq!(
        v.len(),
        1,
        "expected exactly one X-Partnergate-Connector header, got {v:?} in:\n{}",
        m.headers()
    );
    v[0].clone()
}
