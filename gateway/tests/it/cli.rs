//! `partnergate-gateway check` and `schema` (docs/interfaces.md).

use std::ffi::OsStr;
use std::path::Path;

use crate::support::gateway::{Gateway, run_cli};
use crate::support::{Net, Pki};
use serde_json::json;

fn write_files(dir: &Path, fleet: &serde_json::Value, connectors: &str) -> (String, String) {
    let f = dir.join("fleet.json");
    let c = dir.join("connectors.json");
    std::fs::write(&f, serde_json::to_vec_pretty(fleet).expect("json")).expect("write");
    std::fs::write(&c, connectors).expect("write");
    (f.display().to_string(), c.display().to_string())
}

fn check(fleet: &str, connectors: &str) -> (i32, String) {
    run_cli(&[
        OsStr::new("check"),
        OsStr::new("--fleet"),
        OsStr::new(fleet),
        OsStr::new("--connectors"),
        OsStr::new(connectors),
    ])
}

fn fleet(pki: &Pki, dir: &Path) -> serde_json::Value {
    let net = Net::new();
    let addr = std::net::SocketAddr::from((net.sink_ip(), 2525));
    Gateway::default_fleet(net.gateway_ip(), 2525, 8080, pki, addr, dir)
}

#[test]
fn check_accepts_valid_files() {
    let pki = Pki::generate();
    let dir = tempfile::tempdir().expect("tempdir");
    let bundle = crate::support::pki::material_name(&pki.contoso_ca_pem);
    std::fs::write(dir.path().join(&bundle), &pki.contoso_ca_pem).expect("material");
    let connectors = json!({"inbound": [{"name": "mail/contoso", "generation": 1,
        "domains": ["contoso.com", "*.contoso.com"], "identifyBy": "Certificate",
        "certificate": {"subjectName": "mail.contoso.com", "trustBundleFile": bundle}}]});
    let (f, c) = write_files(
        dir.path(),
        &fleet(&pki, dir.path()),
        &connectors.to_string(),
    );
    let (code, out) = check(&f, &c);
    assert_eq!(code, 0, "valid files: {out}");
}

#[test]
fn check_prints_every_error_with_its_field_path_and_exits_1() {
    let pki = Pki::generate();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut fl = fleet(&pki, dir.path());
    fl["hostname"] = json!("");
    fl["limits"] = json!({"maxRecipients": 0});
    let connectors = json!({
        "inbound": [{"name": "mail/contoso", "domains": ["bad domain"], "identifyBy": "SenderIP"}],
        "outbound": [{"name": "mail/fabrikam", "domains": ["fabrikam.example"],
                      "smartHosts": ["smtp.fabrikam.example:99999"], "tls": "Opportunistic",
                      "tlsDomain": "x.example"}]
    });
    let (f, c) = write_files(dir.path(), &fl, &connectors.to_string());
    let (code, out) = check(&f, &c);
    assert_eq!(code, 1, "{out}");
    let lower = out.to_ascii_lowercase();
    for path in [
        "hostname",
        "limits.maxrecipients",
        "inbound[0].domains[0]",
        "inbound[0].senderipranges",
        "outbound[0].smarthosts[0]",
        "outbound[0].tlsdomain",
    ] {
        assert!(lower.contains(path), "no error for {path} in:\n{out}");
    }
}

#[test]
fn check_reports_unparsable_and_unknown_fields_and_exits_1() {
    let pki = Pki::generate();
    let dir = tempfile::tempdir().expect("tempdir");
    let (f, c) = write_files(dir.path(), &fleet(&pki, dir.path()), "{\"inbound\": [");
    let (code, out) = check(&f, &c);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("connectors.json"), "names the file: {out}");

    let (f, c) = write_files(
        dir.path(),
        &fleet(&pki, dir.path()),
        r#"{"inbound": [{"name": "mail/a", "domains": ["a.example"], "requireTLS": true}]}"#,
    );
    let (code, out) = check(&f, &c);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("requireTLS"), "names the unknown field: {out}");
}

#[test]
fn check_reports_missing_pem_files_and_exits_1() {
    let pki = Pki::generate();
    let dir = tempfile::tempdir().expect("tempdir");
    let connectors = json!({"inbound": [{"name": "mail/contoso", "domains": ["contoso.com"],
        "certificate": {"subjectName": "mail.contoso.com", "trustBundleFile": "0123456789abcdef.pem"}}]});
    let (f, c) = write_files(
        dir.path(),
        &fleet(&pki, dir.path()),
        &connectors.to_string(),
    );
    let (code, out) = check(&f, &c);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("0123456789abcdef.pem"),
        "names the missing file: {out}"
    );

    let mut fl = fleet(&pki, dir.path());
    fl["serverCertificate"]["keyFile"] = json!(dir.path().join("nope.key"));
    let (f, c) = write_files(dir.path(), &fl, r#"{"inbound": []}"#);
    let (code, out) = check(&f, &c);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("nope.key"), "names the missing key: {out}");
}

#[test]
fn schema_prints_json_schemas_of_both_files() {
    let (code, out) = run_cli(&[OsStr::new("schema")]);
    assert_eq!(code, 0, "{out}");
    for field in [
        "acceptedDomains",
        "defaultInbound",
        "identifyBy",
        "restrictToCertificate",
    ] {
        assert!(out.contains(field), "schema lacks {field}");
    }
}

#[test]
fn run_refuses_a_bad_reload_poll_interval_naming_the_variable() {
    let pki = Pki::generate();
    let dir = tempfile::tempdir().expect("tempdir");
    let (f, c) = write_files(dir.path(), &fleet(&pki, dir.path()), r#"{"inbound": []}"#);
    for bad in ["0", "soon", "-5"] {
        let out = std::process::Command::new(crate::support::gateway::BIN)
            .args(["--fleet", &f, "--connectors", &c])
            .env("PARTNERGATE_RELOAD_POLL_SECS", bad)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run partnergate-gateway");
        let text = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{bad}: {text}");
        assert!(
            text.contains("PARTNERGATE_RELOAD_POLL_SECS"),
            "{bad}: the error names the variable: {text}"
        );
    }
}
