//! partnergate core: what the operator and the gateway share, with neither Kubernetes nor SMTP
//! in it (as linkerd2's policy controller keeps a `core` crate).
//!
//! - [`config`]: the two files the gateway reads (fleet settings, connectors file), their
//!   validation and JSON Schemas. The operator renders the connectors file; the gateway owns
//!   what it reads, so its types live here rather than in either binary.
//! - [`status`]: the gateway's `/status` document, serialised by the gateway and deserialised
//!   by the operator from the same type, so a renamed field fails to compile, not to parse.
//! - [`http`]: the admin-port HTTP responder both binaries serve.
//! - [`certs`]: the facts both report about an X.509 certificate ([`certs::CertInfo`]).

pub mod certs;
pub mod config;
pub mod http;
pub mod status;
