//! JSON logs. Every SMTP decision is one `info` event with target `decision`; fields name the
//! connector, rule, client IP, TLS version and certificate subject. Message content, keys and
//! client-supplied header values are never logged.

use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter =
        EnvFilter::try_from_env("PARTNERGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
