//! partnergate gateway: an SMTP server that terminates STARTTLS, applies partner connector
//! rules and relays accepted mail inline to the next hop.

pub mod config;
