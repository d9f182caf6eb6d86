//! partnergate operator: renders the gateway fleet's connector config from PartnerConnector
//! resources and writes their status.

pub mod certs;
pub mod fixtures;
pub mod render;
