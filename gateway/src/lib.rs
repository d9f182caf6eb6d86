//! partnergate gateway: an SMTP server that terminates STARTTLS, applies partner connector
//! rules and relays accepted mail inline to the next hop.

pub use partnergate_core::{config, http, status};

pub mod admin;
pub mod admission;
pub mod auth;
pub mod certs;
pub mod data;
pub mod live_config;
pub mod metrics;
pub mod mx;
pub mod policy;
pub mod proxy;
pub mod relay;
pub mod reload;
pub mod reply;
pub mod server;
pub mod session;
pub mod stream;
pub mod telemetry;
pub mod tls;
pub mod tls_policy;
pub mod validation;
