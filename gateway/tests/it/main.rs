//! The gateway's integration tests, one binary (linking the gateway and the support tree once
//! instead of once per file). Each module is one suite against the real `partnergate-gateway`
//! binary and real peers on loopback; `support` and `outbound_support` are the shared harness.
//!
//! Run one suite: `cargo test -p partnergate-gateway --test it relay_model::`.

mod outbound_support;
mod support;

mod address_fidelity;
mod admin;
mod cli;
mod client_cert_names;
mod data_boundaries;
mod hardening;
mod harness;
mod hostile_corpus;
mod inbound_rules;
mod interop;
mod logging;
mod no_loss;
mod open_relay;
mod outbound_dane;
mod outbound_matrix;
mod outbound_mta_sts;
mod outbound_mx;
mod outbound_requiretls;
mod outbound_validation;
mod policy_hardening;
mod postfix_partner;
mod proxy_haproxy;
mod relay;
mod relay_model;
mod relay_regressions;
mod reload;
mod sender_auth;
mod slow_clients;
