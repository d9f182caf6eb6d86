//! partnergate operator: renders the gateway fleet's connector config from PartnerConnector
//! resources and writes their status.
//!
//! One file per concern: [`render`] (pure render), [`conditions`] (pure status computation),
//! [`certs`] (PEM parsing), [`gateway`] (reading gateway /status), [`controller`] (the loops:
//! render loop, reference watches, gateway poller, reconcile and its pure plan, one file each),
//! [`metrics`], [`server`] (/healthz, /readyz, /metrics), [`telemetry`] (JSON logs),
//! [`fixtures`] (test objects).

pub mod certs;
pub mod conditions;
pub mod controller;
pub mod fixtures;
pub mod gateway;
pub mod metrics;
pub mod render;
pub mod server;
pub mod telemetry;
