//! Prometheus metrics (names of ARCHITECTURE section 7). prometheus-client appends `_total` to
//! counters, so counters are registered without it.

use prometheus_client::encoding::EncodeLabelSet;
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
pub struct SecretLabels {
    pub secret: String,
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
        }
    }

    pub fn session_shed(&self, class: &str) {
        self.sessions_shed
            .get_or_create(&ClassLabels {
                class: class.into(),
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
        self.config_reloads
            .get_or_create(&ResultLabels {
                result: result.into(),
            })
            .inc();
    }

    pub fn set_certificates(&self, certs: &[crate::runtime::CertStatus]) {
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
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
    }
}
