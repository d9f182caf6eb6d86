//! Writes the PartnerConnector CRD generated from the Rust types.
//!
//! `crdgen` writes `crds/partnerconnector.yaml` (next to this crate's Cargo.toml);
//! `crdgen -` prints it to stdout; `crdgen PATH` writes it to PATH.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let yaml = match partnergate_crds::crd_yaml() {
        Ok(y) => y,
        Err(e) => {
            eprintln!("crdgen: cannot serialise the CRD: {e}");
            return ExitCode::FAILURE;
        }
    };
    let target = std::env::args().nth(1);
    if target.as_deref() == Some("-") {
        print!("{yaml}");
        return ExitCode::SUCCESS;
    }
    let path = target
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("partnerconnector.yaml"));
    if let Err(e) = std::fs::write(&path, yaml) {
        eprintln!("crdgen: cannot write {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    eprintln!("crdgen: wrote {}", path.display());
    ExitCode::SUCCESS
}
