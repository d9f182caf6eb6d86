//! Fails when crds/partnerconnector.yaml differs from what the Rust types generate.

#[test]
fn committed_crd_matches_types() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("partnerconnector.yaml");
    let committed = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let generated = partnergate_crds::crd_yaml().expect("CRD serialises");
    assert!(
        committed == generated,
        "{} is out of date with crds/src/lib.rs; run `cargo run -p partnergate-crds --bin crdgen`",
        path.display()
    );
}
