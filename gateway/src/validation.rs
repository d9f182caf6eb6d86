//! Connector validation: every `validationIntervalSecs` (jittered ±10 %; the first probe a
//! moment after a connector appears or changes) each Outbound connector's next hops are probed
//! the way the relay would use them — connect, EHLO, STARTTLS, the connector's TLS level
//! verified, QUIT. No mail is ever sent, and results never change routing. Results are served
//! on `/status` (`validation`) for the operator to copy into the PartnerConnector's status.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use time::OffsetDateTime;
use tokio::time::Instant;

use crate::config::{OutboundConnector, Timeouts};
use crate::live_config::{LiveConfig, NextHop, NextHopHost};
use crate::relay::{HopConnection, host_port, mx_hosts};
use crate::server::State;
use crate::status::StatusValidation;

/// Probes running at the same time, across connectors.
const MAX_CONCURRENT_PROBES: usize = 8;
/// Exact domains of one `useMX` connector whose MX hosts are probed.
const MAX_MX_DOMAINS: usize = 3;
/// A probe never waits longer than this for one step, whatever the relay timeouts say.
const MAX_PROBE_STEP_SECS: u64 = 30;

/// One probe of one next hop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    pub connector: String,
    /// `host:port` as the relay addresses it (smart host, or MX host name and port 25).
    pub host: String,
    pub time: OffsetDateTime,
    pub success: bool,
    pub tls_version: Option<String>,
    pub peer_subject: Option<String>,
    /// Unix seconds.
    pub peer_not_after: Option<i64>,
    pub error: Option<String>,
    /// The TLS policy that applied and what its lookups found.
    pub policy: Option<String>,
}

impl ProbeResult {
    /// The probe as `/status` reports it.
    pub fn to_status(&self) -> StatusValidation {
        use time::format_description::well_known::Rfc3339;
        let not_after = self
            .peer_not_after
            .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok())
            .and_then(|t| t.format(&Rfc3339).ok());
        StatusValidation {
            connector: self.connector.clone(),
            host: self.host.clone(),
            time: self.time.format(&Rfc3339).ok(),
            result: if self.success { "Success" } else { "Failure" }.into(),
            tls_version: self.tls_version.clone(),
            peer_subject: self.peer_subject.clone(),
            peer_not_after: not_after,
            error: self.error.clone(),
            policy: self.policy.clone(),
        }
    }
}

/// The latest probe results per connector, shared with the admin port.
#[derive(Debug, Default)]
pub struct Validation {
    results: Mutex<BTreeMap<String, Vec<ProbeResult>>>,
}

impl Validation {
    /// Every result, connectors in name order, hosts in the order they were probed.
    pub fn snapshot(&self) -> Vec<ProbeResult> {
        self.results
            .lock()
            .map(|m| m.values().flatten().cloned().collect())
            .unwrap_or_default()
    }

    fn store(&self, connector: &str, results: Vec<ProbeResult>) {
        if let Ok(mut m) = self.results.lock() {
            m.insert(connector.to_string(), results);
        }
    }

    fn retain(&self, keep: impl Fn(&str) -> bool) {
        if let Ok(mut m) = self.results.lock() {
            m.retain(|k, _| keep(k));
        }
    }
}

/// A fraction in [-1, 1) from the std hasher's random keys.
fn jitter_unit(salt: &str) -> f64 {
    (crate::mx::random_u64(salt) % 2_000_001) as f64 / 1_000_000.0 - 1.0
}

/// The interval with ±10 % jitter.
pub fn jittered(interval: Duration, salt: &str) -> Duration {
    interval.mul_f64(1.0 + 0.1 * jitter_unit(salt))
}

/// What a probe depends on: the connector as configured plus the fleet settings it uses.
fn fingerprint(rt: &LiveConfig, c: &OutboundConnector) -> String {
    // PEM files are named by content, so a new bundle or client certificate is a new name.
    format!(
        "{}|{}|{:?}",
        serde_json::to_string(c).unwrap_or_default(),
        rt.fleet.hostname,
        rt.fleet.dns_resolver,
    )
}

struct Scheduled {
    fingerprint: String,
    due: Instant,
}

/// Runs forever: keeps a schedule in step with the live config and probes what is due.
pub async fn run(state: Arc<State>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_PROBES));
    let mut schedule: HashMap<String, Scheduled> = HashMap::new();
    loop {
        let rt = state.config.load_full();
        let interval = rt.fleet.validation_interval_secs;
        if interval == 0 {
            schedule.clear();
            state.validation.retain(|_| false);
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        let interval = Duration::from_secs(interval);
        let now = Instant::now();
        let names: std::collections::HashSet<&str> = rt
            .connectors
            .outbound
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        schedule.retain(|k, _| names.contains(k.as_str()));
        state.validation.retain(|k| names.contains(k));
        for (i, c) in rt.connectors.outbound.iter().enumerate() {
            let fp = fingerprint(&rt, c);
            let changed = schedule.get(&c.name).is_none_or(|s| s.fingerprint != fp);
            if changed {
                // First probe shortly after the connector appears or changes: within 2 s, or
                // a tenth of the interval if that is shorter, spread so many connectors don't
                // start at once.
                let spread = Duration::from_secs(2).min(interval / 10);
                let delay = spread.mul_f64((jitter_unit(&c.name) + 1.0) / 2.0);
                schedule.insert(
                    c.name.clone(),
                    Scheduled {
                        fingerprint: fp,
                        due: now + delay,
                    },
                );
                continue;
            }
            let Some(entry) = schedule.get_mut(&c.name) else {
                continue;
            };
            if entry.due > now {
                continue;
            }
            entry.due = now + jittered(interval, &c.name);
            let (state, rt, slots, fp) = (
                state.clone(),
                rt.clone(),
                slots.clone(),
                entry.fingerprint.clone(),
            );
            tokio::spawn(async move {
                let Ok(_permit) = slots.acquire().await else {
                    return;
                };
                let Some(c) = rt.connectors.outbound.get(i) else {
                    return;
                };
                let results = probe_connector(&rt, i).await;
                // Store only if the connector was not changed or removed meanwhile.
                let live = state.config.load_full();
                let current = live
                    .connectors
                    .outbound
                    .iter()
                    .find(|l| l.name == c.name)
                    .map(|l| fingerprint(&live, l));
                if current.as_deref() != Some(fp.as_str()) {
                    return;
                }
                report(&state, &c.name, &results);
                state.validation.store(&c.name, results);
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn report(state: &State, connector: &str, results: &[ProbeResult]) {
    let before: HashMap<String, bool> = state
        .validation
        .snapshot()
        .into_iter()
        .filter(|r| r.connector == connector)
        .map(|r| (r.host, r.success))
        .collect();
    for r in results {
        state
            .metrics
            .validation(connector, if r.success { "success" } else { "failure" });
        let was = before.get(&r.host).copied();
        if r.success {
            tracing::info!(target: "validation", connector, host = %r.host, result = "Success",
                tls = r.tls_version.as_deref().unwrap_or("none"),
                peer_subject = r.peer_subject.as_deref().unwrap_or("none"),
                recovered = was == Some(false), "connector validation probe");
        } else {
            tracing::warn!(target: "validation", connector, host = %r.host, result = "Failure",
                error = r.error.as_deref().unwrap_or(""), newly_failing = was != Some(false),
                "connector validation probe");
        }
    }
}

fn probe_timeouts(t: &Timeouts) -> Timeouts {
    Timeouts {
        next_hop_secs: t.next_hop_secs.clamp(1, MAX_PROBE_STEP_SECS),
        tls_handshake_secs: t.tls_handshake_secs.clamp(1, MAX_PROBE_STEP_SECS),
        ..t.clone()
    }
}

/// Probes every next hop of Outbound connector `i`: each smart host, or the MX hosts of each
/// exact domain (wildcard domains name no host to probe).
pub async fn probe_connector(rt: &LiveConfig, i: usize) -> Vec<ProbeResult> {
    let (Some(c), Some(hop)) = (rt.connectors.outbound.get(i), rt.outbound.get(i)) else {
        return Vec::new();
    };
    let t = probe_timeouts(&rt.fleet.timeouts);
    let helo = rt.fleet.hostname.as_str();
    let mut results = Vec::new();
    if !hop.use_mx {
        for target in &hop.hosts {
            let host = host_port(&target.host, target.port);
            results.push(probe(&c.name, host, hop, std::slice::from_ref(target), helo, &t).await);
        }
        return results;
    }
    let domains = c
        .domains
        .iter()
        .filter(|d| !d.starts_with('*'))
        .take(MAX_MX_DOMAINS);
    for domain in domains {
        match mx_hosts(hop, domain, &rt.resolver).await {
            Ok(targets) => {
                // One probe per MX host (trying its addresses in order).
                let mut groups: Vec<(String, Vec<NextHopHost>)> = Vec::new();
                for target in targets {
                    match groups.iter_mut().find(|(h, _)| *h == target.host) {
                        Some((_, v)) => v.push(target),
                        None => groups.push((target.host.clone(), vec![target])),
                    }
                }
                for (host, targets) in groups {
                    let port = targets.first().map_or(25, |t| t.port);
                    let label = host_port(&host, port);
                    results.push(probe(&c.name, label, hop, &targets, helo, &t).await);
                }
            }
            Err(reply) => results.push(ProbeResult {
                connector: c.name.clone(),
                host: format!("{domain} (MX)"),
                time: OffsetDateTime::now_utc(),
                success: false,
                tls_version: None,
                peer_subject: None,
                peer_not_after: None,
                error: Some(reply.to_string()),
                policy: None,
            }),
        }
    }
    results
}

async fn probe(
    connector: &str,
    host: String,
    hop: &NextHop,
    targets: &[NextHopHost],
    helo: &str,
    t: &Timeouts,
) -> ProbeResult {
    let time = OffsetDateTime::now_utc();
    match HopConnection::open_hosts(hop, targets, helo, t).await {
        Ok(conn) => {
            let info = conn
                .peer_cert
                .as_ref()
                .and_then(|c| crate::certs::CertInfo::from_der(c).ok());
            let r = ProbeResult {
                connector: connector.to_string(),
                host,
                time,
                success: true,
                tls_version: conn.tls.map(|v| v.as_str().to_string()),
                peer_subject: info.as_ref().map(|i| i.subject.clone()),
                peer_not_after: info.map(|i| i.not_after.unix_timestamp()),
                error: None,
                policy: conn
                    .policy_detail
                    .as_ref()
                    .map(|d| format!("{}: {d}", conn.policy)),
            };
            conn.quit().await;
            r
        }
        Err(reply) => ProbeResult {
            connector: connector.to_string(),
            host,
            time,
            success: false,
            tls_version: None,
            peer_subject: None,
            peer_not_after: None,
            error: Some(reply.to_string()),
            policy: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_ten_percent() {
        let base = Duration::from_secs(600);
        for i in 0..200 {
            let d = jittered(base, &format!("c{i}"));
            assert!(
                d >= Duration::from_secs(540) && d <= Duration::from_secs(660),
                "{d:?}"
            );
        }
    }

    #[test]
    fn json_shape() {
        let r = ProbeResult {
            connector: "mail/fabrikam".into(),
            host: "smtp.fabrikam.com:25".into(),
            time: OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap(),
            success: false,
            tls_version: None,
            peer_subject: None,
            peer_not_after: None,
            error: Some("451 4.7.5 TLS to next hop mail/fabrikam failed".into()),
            policy: None,
        };
        let j = serde_json::to_value(r.to_status()).unwrap();
        assert_eq!(j["result"], "Failure");
        assert_eq!(j["time"], "2027-01-15T08:00:00Z");
        assert!(j["tlsVersion"].is_null() && j["peerNotAfter"].is_null());
        assert_eq!(j["connector"], "mail/fabrikam");
    }
}
