//! The config loader: arbitrary bytes as the fleet settings file or the connectors file
//! (first byte selects; the other file is a valid default), parsed and validated exactly as
//! `partnergate_gateway::live_config::load` does, including PEM loading. Property: no panic, and
//! a config that loads has only valid domain patterns.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use partnergate_gateway::config::{ConnectorsFile, FleetSettings, validate_domain_pattern};
use partnergate_gateway::live_config::{ConfigPaths, load};

struct Dir {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn dir() -> &'static Dir {
    static D: OnceLock<Dir> = OnceLock::new();
    D.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().to_path_buf();
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["gw.test".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        std::fs::write(d.join("c.pem"), cert.pem()).expect("write");
        std::fs::write(d.join("k.pem"), key.serialize_pem()).expect("write");
        std::fs::write(d.join("ca.pem"), cert.pem()).expect("write");
        Dir { _dir: dir, path: d }
    })
}

const FLEET: &str = r#"{"hostname":"gw.test","serverCertificate":{"certFile":"c.pem","keyFile":"k.pem"},
"acceptedDomains":["example.org"],"upstream":{"host":"127.0.0.1","port":25,"tls":"None"}}"#;
const CONNECTORS: &str = r#"{"inbound":[{"name":"a/b","domains":["contoso.com"],
"certificate":{"subjectName":"mail.contoso.com","trustBundleFile":"ca.pem"}}]}"#;

fuzz_target!(|input: &[u8]| {
    let Some((&sel, body)) = input.split_first() else {
        return;
    };
    let fleet_is_input = sel & 1 == 0;
    // The in-memory half: serde + validate (fast; this is most of the loader's logic).
    if fleet_is_input {
        if let Ok(f) = serde_json::from_slice::<FleetSettings>(body) {
            let _ = f.validate();
        }
    } else if let Ok(c) = serde_json::from_slice::<ConnectorsFile>(body) {
        let errors = c.validate();
        if errors.is_empty() {
            for i in &c.inbound {
                for d in &i.domains {
                    assert!(
                        validate_domain_pattern(d).is_ok(),
                        "invalid pattern passed: {d:?}"
                    );
                }
            }
        }
    }
    // The full loader on files (with PEM material) when the input is at least JSON.
    if serde_json::from_slice::<serde_json::Value>(body).is_err() {
        return;
    }
    let d = &dir().path;
    let (fleet, connectors) = if fleet_is_input {
        (body, CONNECTORS.as_bytes())
    } else {
        (FLEET.as_bytes(), body)
    };
    std::fs::write(d.join("fleet.json"), fleet).expect("write");
    std::fs::write(d.join("connectors.json"), connectors).expect("write");
    let _ = load(&ConfigPaths {
        fleet: d.join("fleet.json"),
        connectors: d.join("connectors.json"),
    });
});
