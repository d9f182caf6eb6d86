//! The inline relay: the next-hop side of the gateway, kept out of the SMTP session.
//!
//! - [`client`]: one SMTP client connection to a next hop, TLS level enforced.
//! - [`transaction`]: the next-hop side of one SMTP transaction (route pinning, the ledger of
//!   accepted recipients, reconnect-and-replay) and the session's idle connection pool.
//!
//! The session decides (policy) and replies; everything it sends to a next hop goes through a
//! [`RelayTransaction`].

pub mod client;
pub mod transaction;

pub use client::{Capabilities, HopConnection, HopReply, host_port, mx_hosts};
pub use transaction::{DataTransfer, Envelope, IdlePool, RelayTransaction, route_label};
