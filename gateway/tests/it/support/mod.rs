//! Support for the gateway's real-peer tests: generated certificates, a recording sink playing
//! the organisation's mail server, a launcher for the real `partnergate-gateway` binary, a
//! private Postfix instance playing a partner's MTA, a scripted next hop (per-command accept,
//! refuse, drop or stall, for the relay-transaction tests), and wrappers around swaks, `openssl
//! s_client` and Python smtplib.
//!
//! Every test gets its own 127.x.y.0/24 block ([`Net`]), so tests in one binary (and test
//! binaries run by other people on the same machine) never share an address or a port. No
//! traffic ever leaves 127.0.0.0/8.

pub mod dns;
pub mod exim;
pub mod fixture;
pub mod gateway;
pub mod haproxy;
pub mod msmtp;
pub mod net;
pub mod opendkim;
pub mod opensmtpd;
pub mod peers;
pub mod pki;
pub mod postfix;
pub mod scripted_hop;
pub mod sink;
pub mod smtp;
pub mod wire;

pub use fixture::{Fixture, connector_header, connectors, contoso_bundle, inbound};
pub use gateway::{Gateway, GatewaySpec};
pub use haproxy::{Haproxy, proxy_v2_header};
pub use net::Net;
pub use peers::{Openssl, Python, Swaks};
pub use pki::{CertPair, Pki};
pub use postfix::Postfix;
pub use sink::{Recorded, Sink, SinkOptions};
pub use smtp::{ClientTls, Reply, SmtpConn, Transcript, assert_reply, message};

use std::time::{Duration, Instant};

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout` (a guard, not a
/// timed assertion).
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Fails the test (never skips it) when a peer program is missing.
pub fn require_tool(name: &str) -> std::path::PathBuf {
    let dirs = std::env::var("PATH").unwrap_or_default();
    let mut candidates: Vec<std::path::PathBuf> = std::env::split_paths(&dirs).collect();
    candidates.push("/usr/sbin".into());
    candidates.push("/usr/bin".into());
    for d in candidates {
        let p = d.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "`{name}` is not installed; these tests use real peers (postfix, swaks, openssl, python3): \
         run `make deps` (tests/scripts/install-deps.sh) to install them"
    );
}

/// sha256 hex of some bytes (the gateway's configHash is this over the connectors file).
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// RFC 7386 JSON merge patch: `patch` applied onto `base`.
pub fn merge_json(base: &mut serde_json::Value, patch: &serde_json::Value) {
    use serde_json::Value;
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    b.remove(k);
                } else {
                    merge_json(b.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (b, p) => *b = p.clone(),
    }
}
