//! Benchmark (not a test): render N connectors (default 1000), half with a trust bundle.
//!
//!     cargo run --release -p partnergate-operator --example render_bench -- 1000

use std::collections::BTreeMap;
use std::time::Instant;

use partnergate_operator::fixtures;
use partnergate_operator::render::{self, ObjectKey, Objects};

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    // one CA PEM shared by the bundles (content-addressed: one file)
    let key = rcgen::KeyPair::generate().ok();
    let ca = key
        .as_ref()
        .and_then(|k| {
            let mut p = rcgen::CertificateParams::new(vec!["ca.example".to_string()]).ok()?;
            p.distinguished_name
                .push(rcgen::DnType::CommonName, "Bench CA");
            p.self_signed(k).ok()
        })
        .map(|c| c.pem())
        .unwrap_or_default();
    let mut connectors = Vec::with_capacity(n);
    let mut objects = Objects::new();
    for i in 0..n {
        let mut pc = match i % 4 {
            0 => fixtures::connector(
                "bench",
                &format!("dom-{i}"),
                1,
                &[&format!("partner{i}.example")],
            ),
            1 => fixtures::inbound_ip(
                "bench",
                &format!("ip-{i}"),
                1,
                &[&format!("10.{}.{}.0/24", i / 256 % 256, i % 256)],
            ),
            2 => {
                let secret = format!("ca-{i}");
                objects.insert(
                    ObjectKey::secret("bench", &secret),
                    BTreeMap::from([("ca.crt".to_string(), ca.as_bytes().to_vec())]),
                );
                fixtures::inbound_cert(
                    "bench",
                    &format!("cert-{i}"),
                    1,
                    &format!("mail.partner{i}.example"),
                    Some(&secret),
                )
            }
            _ => fixtures::outbound(
                "bench",
                &format!("out-{i}"),
                1,
                &[&format!("partner{i}.example")],
                &[&format!("smtp.partner{i}.example:25")],
            ),
        };
        fixtures::created(&mut pc, 1_700_000_000 + i as i64);
        connectors.push(pc);
    }
    let now = time::OffsetDateTime::now_utc();
    let _warm = render::render(&connectors, &objects, now);
    let runs = 10;
    let started = Instant::now();
    let mut last = None;
    for _ in 0..runs {
        last = Some(render::render(&connectors, &objects, now));
    }
    let per = started.elapsed() / runs;
    let r = last.unwrap_or_else(|| render::render(&connectors, &objects, now));
    let included = r.outcomes.values().filter(|o| o.included).count();
    println!(
        "render of {n} connectors: {:.2} ms per render ({included} included, connectors.json {} KiB, {} PEM files)",
        per.as_secs_f64() * 1000.0,
        r.connectors_json.len() / 1024,
        r.material.len()
    );
}
