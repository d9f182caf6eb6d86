//! Prometheus metrics (names of ARCHITECTURE section 7). prometheus-client appends `_total` to
//! counters, so counters are registered without it.
//!
//! The chart's alerts and dashboard (charts/partnergate/templates/prometheusrule.yaml,
//! charts/partnergate/dashboards/) query these names; tests/chart/prometheus_e2e.py fails when
//! they name one that is not registered here, so rename both together.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MessageLabels {
    pub connector: String,
    pub direction: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectionLabels {
    pub connector: String,
    pub rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsLabels {
    pub version: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ValidationLabels {
    pub connector: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub rule: String,
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectorResultLabels {
    pub connector: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SenderAuthLabels {
    pub connector: String,
    pub mechanism: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SecretLabels {
    pub secret: String,
}

/// Log lines the non-blocking writer dropped ([`crate::telemetry::dropped_lines`]), read at
/// scrape time: the count lives in the writer, not in a counter of ours.
#[derive(Debug)]
struct LogLinesDropped;

impl Collector for LogLinesDropped {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counter = ConstCounter::new(crate::telemetry::dropped_lines());
        let metric = encoder.encode_descriptor(
            "partnergate_log_lines_dropped",
            "Log lines dropped because stderr's reader fell behind (the log queue was full)",
            None,
            counter.metric_type(),
        )?;
        counter.encode(metric)
    }
}

pub struct Metrics {
    registry: Registry,
    pub sessions: Counter,
    pub sessions_active: Gauge,
    pub messages: Family<MessageLabels, Counter>,
    pub rejections: Family<RejectionLabels, Counter>,
    pub tls_handshakes: Family<TlsLabels, Counter>,
    pub relay_duration: Histogram,
    pub config_reloads: Family<ResultLabels, Counter>,
    pub certificate_expiry: Family<SecretLabels, Gauge>,
    pub connector_validation: Family<ValidationLabels, Counter>,
    /// Sessions before MAIL FROM given up to admit a new client (by the victim's class).
    pub sessions_shed: Family<ClassLabels, Counter>,
    /// Connections refused with `421 4.7.0` before the greeting, by limit and client class.
    pub connections_refused: Family<RefusedLabels, Counter>,
    /// 1 when the last config load succeeded: a failed reload keeps the old config live and is
    /// not retried until a file changes, so a counter's increase would stop alerting.
    pub config_last_reload_successful: Gauge,
    /// `limits.maxConnections` of the fleet settings, so alerts can compare sessions_active.
    pub max_connections: Gauge,
    /// STARTTLS handshakes by the connector the client's IP or certificate identifies.
    pub connector_tls_handshakes: Family<ConnectorResultLabels, Counter>,
    /// The next hop's reply to each forwarded RCPT (`accepted`, `tempfail`, `rejected`):
    /// an unreachable next hop (451 4.4.1) shows here, never in `messages`.
    pub next_hop_recipients: Family<ConnectorResultLabels, Counter>,
    /// Sender authentication results (mechanism `spf`, `dkim`, `dmarc`) by connector (`none`
    /// for unclaimed mail), counted once per transaction when the result is final.
    pub sender_auth: Family<SenderAuthLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let sessions = Counter::default();
        let sessions_active = Gauge::default();
        let messages = Family::<MessageLabels, Counter>::default();
        let rejections = Family::<RejectionLabels, Counter>::default();
        let tls_handshakes = Family::<TlsLabels, Counter>::default();
        let relay_duration =
            Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0]);
        let config_reloads = Family::<ResultLabels, Counter>::default();
        let certificate_expiry = Family::<SecretLabels, Gauge>::default();
        let connector_validation = Family::<ValidationLabels, Counter>::default();
        let sessions_shed = Family::<ClassLabels, Counter>::default();
        let connections_refused = Family::<RefusedLabels, Counter>::default();
        let config_last_reload_successful = Gauge::default();
        let max_connections = Gauge::default();
        let connector_tls_handshakes = Family::<ConnectorResultLabels, Counter>::default();
        let next_hop_recipients = Family::<ConnectorResultLabels, Counter>::default();
        let sender_auth = Family::<SenderAuthLabels, Counter>::default();
        registry.register(
            "partnergate_outbound_tls_policy",
            "Outbound connection attempts under a DANE/MTA-STS mode, by connector, policy that \
             applied (dane, mta-sts, none) and result (success, failure, deferred, \
             testing_failure, fallback)",
            crate::tls_policy::engine::counters(),
        );
        registry.register(
            "partnergate_sessions",
            "SMTP sessions accepted",
            sessions.clone(),
        );
        registry.register(
            "partnergate_sessions_active",
            "SMTP sessions in progress",
            sessions_active.clone(),
        );
        registry.register(
            "partnergate_messages",
            "Messages by connector, direction and outcome",
            messages.clone(),
        );
        registry.register(
            "partnergate_rejections",
            "Refusals by connector and rule",
            rejections.clone(),
        );
        registry.register(
            "partnergate_tls_handshakes",
            "STARTTLS handshakes by version and result",
            tls_handshakes.clone(),
        );
        registry.register(
            "partnergate_relay_duration_seconds",
            "Time from DATA to the next hop's final reply",
            relay_duration.clone(),
        );
        registry.register(
            "partnergate_config_reloads",
            "Config loads by result",
            config_reloads.clone(),
        );
        registry.register(
            "partnergate_certificate_expiry_timestamp_seconds",
            "notAfter of each loaded certificate",
            certificate_expiry.clone(),
        );
        registry.register(
            "partnergate_connector_validation",
            "Outbound connector validation probes by connector and result",
            connector_validation.clone(),
        );
        registry.register(
            "partnergate_sessions_shed",
            "Sessions before MAIL FROM shed (421 4.7.0) to admit a new client, by class",
            sessions_shed.clone(),
        );
        registry.register(
            "partnergate_connections_refused",
            "Connections refused (421 4.7.0) by limit and client class",
            connections_refused.clone(),
        );
        registry.register(
            "partnergate_config_last_reload_successful",
            "1 if the last config load succeeded, 0 if the last good config is kept after a failure",
            config_last_reload_successful.clone(),
        );
        registry.register(
            "partnergate_max_connections",
            "Concurrent SMTP connections allowed per pod (limits.maxConnections)",
            max_connections.clone(),
        );
        registry.register(
            "partnergate_connector_tls_handshakes",
            "STARTTLS handshakes by identified connector and result",
            connector_tls_handshakes.clone(),
        );
        registry.register(
            "partnergate_next_hop_recipients",
            "Next hop replies to forwarded RCPT commands by connector and result",
            next_hop_recipients.clone(),
        );
        registry.register(
            "partnergate_sender_auth",
            "Sender authentication results (SPF, DKIM, DMARC) by connector, mechanism and result",
            sender_auth.clone(),
        );
        registry.register_collector(Box::new(LogLinesDropped));
        // Every label set that can occur starts at 0, so `rate()`/`increase()` in alerts see a
        // series before the first flood rather than nothing.
        for class in ["general", "priority"] {
            sessions_shed
                .get_or_create(&ClassLabels {
                    class: class.into(),
                })
                .inc_by(0);
            for rule in ["maxConnections", "maxConnectionsPerIp"] {
                connections_refused
                    .get_or_create(&RefusedLabels {
                        rule: rule.into(),
                        class: class.into(),
                    })
                    .inc_by(0);
            }
        }
        Metrics {
            registry,
            sessions,
            sessions_active,
            messages,
            rejections,
            tls_handshakes,
            relay_duration,
            config_reloads,
            certificate_expiry,
            connector_validation,
            sessions_shed,
            connections_refused,
            config_last_reload_successful,
            max_connections,
            connector_tls_handshakes,
            next_hop_recipients,
            sender_auth,
        }
    }

    pub fn sender_auth(&self, connector: &str, mechanism: &str, result: &str) {
        self.sender_auth
            .get_or_create(&SenderAuthLabels {
                connector: connector.into(),
                mechanism: mechanism.into(),
                result: result.into(),
            })
            .inc();
    }

    pub fn session_shed(&self, class: &str) {
        self.sessions_shed
            .get_or_create(&ClassLabels {
                class: class.into(),
            })
            .inc();
    }

    pub fn set_limits(&self, limits: &crate::config::Limits) {
        self.max_connections
            .set(i64::try_from(limits.max_connections).unwrap_or(i64::MAX));
    }

    pub fn connector_tls(&self, connector: &str, result: &str) {
        self.connector_tls_handshakes
            .get_or_create(&ConnectorResultLabels {
                connector: connector.into(),
                result: result.into(),
            })
            .inc();
    }

    pub fn connection_refused(&self, rule: &str, class: &str) {
        self.connections_refused
            .get_or_create(&RefusedLabels {
                rule: rule.into(),
                class: class.into(),
            })
            .inc();
    }

    /// `result`: `accepted` (2xx), `tempfail` (4xx, including an unreachable next hop) or
    /// `rejected` (5xx).
    pub fn next_hop_recipient(&self, connector: &str, result: &str) {
        self.next_hop_recipients
            .get_or_create(&ConnectorResultLabels {
                connector: connector.into(),
                result: result.into(),
            })
            .inc();
    }

    pub fn validation(&self, connector: &str, result: &str) {
        self.connector_validation
            .get_or_create(&ValidationLabels {
                connector: connector.into(),
                result: result.into(),
            })
            .inc();
    }

    pub fn message(&self, connector: &str, direction: &str, outcome: &str) {
        self.messages
            .get_or_create(&MessageLabels {
                connector: connector.into(),
                direction: direction.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    pub fn rejection(&self, connector: &str, rule: &str) {
        self.rejections
            .get_or_create(&RejectionLabels {
                connector: connector.into(),
                rule: rule.into(),
            })
            .inc();
    }

    pub fn tls(&self, version: &str, result: &str) {
        self.tls_handshakes
            .get_or_create(&TlsLabels {
                version: version.into(),
                result: result.into(),
            })
            .inc();
    }

    pub fn reload(&self, result: &str) {
        self.config_last_reload_successful
            .set(i64::from(result == "success"));
        self.config_reloads
            .get_or_create(&ResultLabels {
                result: result.into(),
            })
            .inc();
    }

    pub fn set_certificates(&self, certs: &[crate::live_config::CertStatus]) {
        self.certificate_expiry.clear();
        for c in certs {
            self.certificate_expiry
                .get_or_create(&SecretLabels {
                    secret: c.file.clone(),
                })
                .set(c.not_after);
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_are_exposed() {
        let m = super::Metrics::new();
        m.sessions.inc();
        m.rejection("mail/contoso", "requireTls");
        m.reload("success");
        m.validation("mail/fabrikam", "failure");
        m.session_shed("general");
        m.connection_refused("maxConnectionsPerIp", "general");
        let text = m.encode();
        for name in [
            "partnergate_sessions_total 1",
            "partnergate_rejections_total{connector=\"mail/contoso\",rule=\"requireTls\"} 1",
            "partnergate_config_reloads_total{result=\"success\"} 1",
            "partnergate_connector_validation_total{connector=\"mail/fabrikam\",result=\"failure\"} 1",
            "# TYPE partnergate_relay_duration_seconds histogram",
            "partnergate_sessions_shed_total{class=\"general\"} 1",
            "partnergate_connections_refused_total{rule=\"maxConnectionsPerIp\",class=\"general\"} 1",
            "# TYPE partnergate_log_lines_dropped counter",
            "partnergate_log_lines_dropped_total 0",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
    }

    #[test]
    fn last_reload_gauge_follows_the_last_result() {
        let m = super::Metrics::new();
        m.reload("success");
        assert!(
            m.encode()
                .contains("partnergate_config_last_reload_successful 1\n")
        );
        m.reload("failure");
        let text = m.encode();
        assert!(
            text.contains("partnergate_config_last_reload_successful 0\n"),
            "{text}"
        );
        assert!(text.contains("partnergate_config_reloads_total{result=\"success\"} 1"));
        m.reload("success");
        assert!(
            m.encode()
                .contains("partnergate_config_last_reload_successful 1\n")
        );
    }

    #[test]
    fn limits_and_connector_families_are_exposed() {
        let m = super::Metrics::new();
        let limits = crate::config::Limits {
            max_connections: 250,
            ..crate::config::Limits::default()
        };
        m.set_limits(&limits);
        m.connector_tls("mail/contoso", "failure");
        m.next_hop_recipient("mail/fabrikam", "tempfail");
        let text = m.encode();
        for line in [
            "partnergate_max_connections 250",
            "partnergate_connector_tls_handshakes_total{connector=\"mail/contoso\",result=\"failure\"} 1",
            "partnergate_next_hop_recipients_total{connector=\"mail/fabrikam\",result=\"tempfail\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
    }
}
