//! Sender authentication for Inbound mail: SPF, DKIM and DMARC (RFC 7208, 6376, 7489) with the
//! `mail-auth` crate, on the fleet's DNS resolver. One concern per file:
//! - [`plan`] (pure): what a transaction evaluates and what it must pass, from the claiming
//!   connector's `senderAuthentication` or the fleet's default for unclaimed mail.
//! - [`headers`] (pure): the header section held back (bounded) while DKIM/DMARC are decided.
//! - [`body`] (pure): DKIM body hashes computed incrementally while DATA streams.
//! - [`verdict`] (pure): results → stamp (Authentication-Results, `auth=` token) and refusal.
//! - [`resolver`] (I/O): the authenticator on the fleet's `dnsResolver`.
//! - [`evaluate`] (I/O): SPF (at MAIL FROM when required, else at DATA), DKIM and DMARC at the
//!   end of the header section, each within the resolver's deadline.
//!
//! Invariants: the message is never buffered whole (headers up to `limits.maxHeaderSize`,
//! then a few running hashes); a DNS error or a passed deadline is `temperror`, never a pass;
//! a `pass` stamped before the body is a promise the end of the body keeps by refusing the
//! message, so only passes the decision rests on are stamped `pass` (see [`body`]); a header
//! section our parser and `mail-auth`'s read differently is never evaluated.

pub mod body;
pub mod evaluate;
pub mod headers;
pub mod plan;
pub mod resolver;
pub mod verdict;

pub use plan::{Enforce, Plan};
