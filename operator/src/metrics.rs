//! Operator metrics (prometheus-client), served on `--listen` at /metrics.
//!
//! The chart's alerts and dashboard query these names; tests/chart/prometheus_e2e.py fails when
//! they name one that is not registered here.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SecretLabel {
    pub secret: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectorLabel {
    pub connector: String,
}

#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub reconciles: Counter,
    pub reconcile_errors: Family<ErrorLabel, Counter>,
    pub reconcile_duration: Histogram,
    pub renders: Family<ResultLabel, Counter>,
    pub render_duration: Histogram,
    pub config_applies: Counter,
    pub connectors_rendered: Gauge,
    pub leader: Gauge,
    pub gateway_pods_ready: Gauge,
    pub certificate_expiry: Family<SecretLabel, Gauge>,
    /// Per connector (`namespace/name`): 1 while its Ready condition is True. Only the leader
    /// writes it, so alerts join it with `leader == 1`.
    pub connector_ready: Family<ConnectorLabel, Gauge>,
    /// Keys with a `connector_ready` series, so deleted connectors' series can be dropped.
    ready_keys: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("partnergate_operator");
        let reconciles = Counter::default();
        registry.register(
            "reconciliations",
            "Connector reconciliations",
            reconciles.clone(),
        );
        let reconcile_errors = Family::<ErrorLabel, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Failed connector reconciliations by error kind",
            reconcile_errors.clone(),
        );
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one connector reconciliation",
            reconcile_duration.clone(),
        );
        let renders = Family::<ResultLabel, Counter>::default();
        registry.register(
            "renders",
            "Renders of the whole connector set (result: applied, unchanged, error)",
            renders.clone(),
        );
        let render_duration = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "render_duration_seconds",
            "Duration of one render including fetches and apply",
            render_duration.clone(),
        );
        let config_applies = Counter::default();
        registry.register(
            "config_applies",
            "Server-side applies of the rendered ConfigMap and Secret",
            config_applies.clone(),
        );
        let connectors_rendered = Gauge::default();
        registry.register(
            "connectors_rendered",
            "Connectors in the last rendered config",
            connectors_rendered.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease",
            leader.clone(),
        );
        let gateway_pods_ready = Gauge::default();
        registry.register(
            "gateway_pods_ready",
            "Ready gateway pods seen by the last poll",
            gateway_pods_ready.clone(),
        );
        let certificate_expiry = Family::<SecretLabel, Gauge>::default();
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "notAfter of the gateway's server certificate (unix seconds)",
            certificate_expiry.clone(),
        );
        let connector_ready = Family::<ConnectorLabel, Gauge>::default();
        registry.register(
            "connector_ready",
            "1 while the PartnerConnector's Ready condition is True (connector: namespace/name)",
            connector_ready.clone(),
        );
        Metrics {
            registry: Arc::new(registry),
            reconciles,
            reconcile_errors,
            reconcile_duration,
            renders,
            render_duration,
            config_applies,
            connectors_rendered,
            leader,
            gateway_pods_ready,
            certificate_expiry,
            connector_ready,
            ready_keys: Default::default(),
        }
    }

    /// Records a connector's Ready condition after its status is computed.
    pub fn set_connector_ready(&self, connector: &str, ready: bool) {
        if let Ok(mut keys) = self.ready_keys.lock() {
            keys.insert(connector.to_string());
        }
        self.connector_ready
            .get_or_create(&ConnectorLabel {
                connector: connector.into(),
            })
            .set(i64::from(ready));
    }

    /// Drops the series of every connector not in `present` (deleted ones), so they cannot
    /// alert as not Ready.
    pub fn retain_connectors(&self, present: &std::collections::BTreeSet<String>) {
        let gone: Vec<String> = match self.ready_keys.lock() {
            Ok(mut keys) => {
                let gone = keys.difference(present).cloned().collect();
                keys.retain(|k| present.contains(k));
                gone
            }
            Err(_) => return,
        };
        for key in gone {
            self.forget_connector(&key);
        }
    }

    /// Drops a deleted connector's series, so it cannot alert as not Ready.
    pub fn forget_connector(&self, connector: &str) {
        self.connector_ready.remove(&ConnectorLabel {
            connector: connector.into(),
        });
    }

    /// OpenMetrics text.
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
    fn encodes() {
        let m = super::Metrics::new();
        m.reconciles.inc();
        m.reconcile_duration.observe(0.01);
        let text = m.encode();
        assert!(
            text.contains("partnergate_operator_reconciliations_total 1"),
            "{text}"
        );
        assert!(text.contains("partnergate_operator_reconcile_duration_seconds_bucket"));
    }

    /// Every `partnergate_operator_*` name the chart's alerts and dashboard query is a sample
    /// name of this exposition (tests/chart/prometheus_e2e.py checks the gateway's live).
    #[test]
    fn chart_queries_name_exported_metrics() {
        let m = super::Metrics::new();
        m.reconcile_errors
            .get_or_create(&super::ErrorLabel {
                error: "kube".into(),
            })
            .inc();
        m.renders
            .get_or_create(&super::ResultLabel {
                result: "applied".into(),
            })
            .inc();
        m.certificate_expiry
            .get_or_create(&super::SecretLabel {
                secret: "partnergate-gateway-tls".into(),
            })
            .set(1);
        m.set_connector_ready("mail/contoso", true);
        let text = m.encode();
        let exported: std::collections::HashSet<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .collect();
        let chart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/partnergate");
        let mut used = 0;
        for file in [
            "templates/prometheusrule.yaml",
            "dashboards/partnergate.json",
        ] {
            let body = std::fs::read_to_string(chart.join(file)).unwrap();
            for (i, _) in body.match_indices("partnergate_operator_") {
                let name: String = body[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                assert!(
                    exported.contains(name.as_str()),
                    "{file} queries {name}, not in\n{text}"
                );
                used += 1;
            }
        }
        assert!(
            used > 0,
            "the chart queries no operator metric: wrong path?"
        );
    }

    #[test]
    fn connector_ready_is_set_and_forgotten() {
        let m = super::Metrics::new();
        m.set_connector_ready("mail/contoso", false);
        m.set_connector_ready("mail/fabrikam", true);
        let text = m.encode();
        assert!(
            text.contains("partnergate_operator_connector_ready{connector=\"mail/contoso\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("partnergate_operator_connector_ready{connector=\"mail/fabrikam\"} 1")
        );
        m.forget_connector("mail/contoso");
        assert!(!m.encode().contains("mail/contoso"));
    }
}
