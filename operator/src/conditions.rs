//! Status computation: (connector, render outcome, gateway reports) → status. Pure.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use partnergate_crds::{
    Direction, GatewaysStatus, PartnerConnector, PartnerConnectorStatus, ValidationStatus,
    condition, reason,
};

use crate::gateway::GatewaySnapshot;
use crate::render::{Acceptance, Outcome, Resolution};

/// What reconcile needs to know about Programmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Programming {
    pub ready: i32,
    pub programmed: i32,
    /// Pods not (yet) running this generation, with why.
    pub lagging: Vec<String>,
}

/// Counts the ready gateway pods that list `name` with generation ≥ `generation`. Each pod's
/// `connectors` are sorted by name, as `gateway::fetch_status` returns them.
pub fn programming(snapshot: &GatewaySnapshot, name: &str, generation: i64) -> Programming {
    let mut p = Programming {
        ready: 0,
        programmed: 0,
        lagging: vec![],
    };
    for pod in &snapshot.pods {
        p.ready += 1;
        match &pod.status {
            Ok(st) => {
                // sorted by name (gateway::fetch_status)
                let found = st
                    .connectors
                    .binary_search_by(|c| c.name.as_str().cmp(name))
                    .ok()
                    .map(|i| &st.connectors[i]);
                match found {
                    Some(c) if c.generation >= generation => p.programmed += 1,
                    Some(c) => p.lagging.push(format!(
                        "{} runs generation {} (config {})",
                        pod.name,
                        c.generation,
                        short(&st.config_hash)
                    )),
                    None => p.lagging.push(format!(
                        "{} does not list it yet (config {}{})",
                        pod.name,
                        short(&st.config_hash),
                        st.last_reload_error
                            .as_deref()
                            .map(|e| format!(", last reload error: {e}"))
                            .unwrap_or_default()
                    )),
                }
            }
            Err(e) => p
                .lagging
                .push(format!("{}: /status unreadable: {e}", pod.name)),
        }
    }
    p
}

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// Summary for the TLS printer column.
pub fn tls_summary(pc: &PartnerConnector) -> Option<String> {
    match pc.spec.direction {
        Direction::Inbound => pc.spec.inbound.as_ref().map(|i| {
            if i.require_tls {
                let v = match i.min_tls_version {
                    partnergate_crds::MinTlsVersion::Tls12 => "1.2",
                    partnergate_crds::MinTlsVersion::Tls13 => "1.3",
                };
                format!("Required {v}+")
            } else {
                "Optional".to_string()
            }
        }),
        Direction::Outbound => pc.spec.outbound.as_ref().map(|o| {
            // DANE/MTA-STS modes after the level, only when set, so existing connectors keep
            // their column: `Opportunistic+DANE(Mandatory)+MTA-STS(Opportunistic)`.
            let mut s = o.tls.as_str().to_string();
            for (name, mode) in [("DANE", o.dane), ("MTA-STS", o.mta_sts)] {
                if !mode.is_none() {
                    s.push_str(&format!("+{name}({mode:?})"));
                }
            }
            s
        }),
    }
}

/// Latest probe per host for this connector across the gateway pods.
pub fn validation(snapshot: &GatewaySnapshot, name: &str) -> Vec<ValidationStatus> {
    let mut by_host: BTreeMap<String, ValidationStatus> = BTreeMap::new();
    for pod in &snapshot.pods {
        let Ok(st) = &pod.status else { continue };
        for v in st.validation.iter().filter(|v| v.connector == name) {
            let newer = by_host.get(&v.host).is_none_or(|cur| {
                cur.time.as_deref().unwrap_or("") < v.time.as_deref().unwrap_or("")
            });
            if newer {
                by_host.insert(
                    v.host.clone(),
                    ValidationStatus {
                        host: v.host.clone(),
                        time: v.time.clone(),
                        result: v.result.clone(),
                        tls_version: v.tls_version.clone(),
                        peer_subject: v.peer_subject.clone(),
                        peer_not_after: v.peer_not_after.clone(),
                        error: v.error.clone(),
                        policy: v.policy.clone(),
                    },
                );
            }
        }
    }
    by_host.into_values().collect()
}

/// Condition statuses (type, status, reason, message) without times.
type Cond = (&'static str, bool, &'static str, String);

fn conds(pc: &PartnerConnector, outcome: Option<&Outcome>, prog: &Programming) -> Vec<Cond> {
    let Some(o) = outcome else {
        let m = "waiting for the operator's first render".to_string();
        return vec![
            (condition::ACCEPTED, false, reason::PENDING, m.clone()),
            (condition::RESOLVED_REFS, false, reason::PENDING, m.clone()),
            (condition::PROGRAMMED, false, reason::PENDING, m.clone()),
            (condition::READY, false, reason::PENDING, m),
        ];
    };
    let accepted = match &o.acceptance {
        Acceptance::Accepted => (
            condition::ACCEPTED,
            true,
            reason::ACCEPTED,
            "the connector is valid and not conflicted".into(),
        ),
        Acceptance::Disabled => (
            condition::ACCEPTED,
            false,
            reason::DISABLED,
            "spec.enabled is false: the connector is left out of the gateway config".into(),
        ),
        Acceptance::Invalid(m) => (condition::ACCEPTED, false, reason::INVALID, m.clone()),
        Acceptance::Conflicted { winner, key } => (
            condition::ACCEPTED,
            false,
            reason::CONFLICTED,
            format!(
                "{key} is already claimed by the older connector {winner}; this one is left out of the gateway config"
            ),
        ),
    };
    let resolved = match &o.resolution {
        Resolution::Resolved => (
            condition::RESOLVED_REFS,
            true,
            reason::RESOLVED_REFS,
            if o.certificates.is_empty() {
                "no references".to_string()
            } else {
                "every referenced Secret/ConfigMap exists and parses".to_string()
            },
        ),
        Resolution::NotFound(m) => (
            condition::RESOLVED_REFS,
            false,
            reason::SECRET_NOT_FOUND,
            m.clone(),
        ),
        Resolution::InvalidCertificate(m) => (
            condition::RESOLVED_REFS,
            false,
            reason::INVALID_CERTIFICATE,
            m.clone(),
        ),
        Resolution::Expired(m) => (
            condition::RESOLVED_REFS,
            false,
            reason::CERTIFICATE_EXPIRED,
            m.clone(),
        ),
    };
    let generation = pc.metadata.generation.unwrap_or(0);
    let programmed = if let Some(m) = o.left_out.as_ref().filter(|_| !o.included) {
        (
            condition::PROGRAMMED,
            false,
            reason::CONFIG_TOO_LARGE,
            m.clone(),
        )
    } else if !o.included {
        (
            condition::PROGRAMMED,
            false,
            reason::PENDING,
            "not in the gateway config (see Accepted and ResolvedRefs)".to_string(),
        )
    } else if prog.ready == 0 {
        (
            condition::PROGRAMMED,
            false,
            reason::NO_GATEWAYS,
            "no ready gateway pods".to_string(),
        )
    } else if prog.programmed == prog.ready {
        (
            condition::PROGRAMMED,
            true,
            reason::PROGRAMMED,
            format!(
                "generation {generation} is live on all {} ready gateway pods",
                prog.ready
            ),
        )
    } else {
        let mut m = format!(
            "generation {generation} is live on {} of {} ready gateway pods",
            prog.programmed, prog.ready
        );
        if !prog.lagging.is_empty() {
            m.push_str(": ");
            m.push_str(&prog.lagging.join("; "));
        }
        (condition::PROGRAMMED, false, reason::PENDING, m)
    };
    let failing: Vec<&Cond> = [&accepted, &resolved, &programmed]
        .into_iter()
        .filter(|c| !c.1)
        .collect();
    let ready = match failing.first() {
        None => (
            condition::READY,
            true,
            reason::READY,
            "accepted, references resolved and programmed on every ready gateway pod".to_string(),
        ),
        Some(first) => (
            condition::READY,
            false,
            first.2,
            failing
                .iter()
                .map(|c| format!("{}={}: {}", c.0, c.2, c.3))
                .collect::<Vec<_>>()
                .join("; "),
        ),
    };
    vec![accepted, resolved, programmed, ready]
}

/// The status to write, keeping lastTransitionTime of conditions whose status did not change.
pub fn compute_status(
    pc: &PartnerConnector,
    outcome: Option<&Outcome>,
    snapshot: &GatewaySnapshot,
    now: Time,
) -> PartnerConnectorStatus {
    let generation = pc.metadata.generation.unwrap_or(0);
    let name = pc.key();
    let prog = programming(snapshot, &name, generation);
    let previous = pc
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let conditions = conds(pc, outcome, &prog)
        .into_iter()
        .map(|(type_, ok, reason, message)| {
            let status = if ok { "True" } else { "False" };
            let last = previous
                .iter()
                .find(|c| c.type_ == type_ && c.status == status)
                .map(|c| c.last_transition_time.clone())
                .unwrap_or_else(|| now.clone());
            Condition {
                type_: type_.to_string(),
                status: status.to_string(),
                reason: reason.to_string(),
                message: truncate(message, 32 * 1024),
                observed_generation: Some(generation),
                last_transition_time: last,
            }
        })
        .collect();
    PartnerConnectorStatus {
        observed_generation: Some(generation),
        conditions,
        tls: tls_summary(pc),
        gateways: Some(GatewaysStatus {
            ready: prog.ready,
            programmed: prog.programmed,
        }),
        certificates: outcome.map(|o| o.certificates.clone()).unwrap_or_default(),
        validation: validation(snapshot, &name),
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// Next hops whose validation probe has just started failing (absent or passing before):
/// each deserves one Warning event, not one per poll.
pub fn newly_failing_validation<'a>(
    old: Option<&PartnerConnectorStatus>,
    new: &'a PartnerConnectorStatus,
) -> Vec<&'a ValidationStatus> {
    new.validation
        .iter()
        .filter(|v| v.result == "Failure")
        .filter(|v| {
            !old.is_some_and(|o| {
                o.validation
                    .iter()
                    .any(|p| p.host == v.host && p.result == "Failure")
            })
        })
        .collect()
}

/// A condition that changed status or reason between two statuses (for Events).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub type_: String,
    pub status: String,
    pub reason: String,
    pub message: String,
}

pub fn transitions(
    old: Option<&PartnerConnectorStatus>,
    new: &PartnerConnectorStatus,
) -> Vec<Transition> {
    let old = old.map(|s| s.conditions.as_slice()).unwrap_or_default();
    new.conditions
        .iter()
        .filter(|c| {
            !old.iter()
                .any(|o| o.type_ == c.type_ && o.status == c.status && o.reason == c.reason)
        })
        .map(|c| Transition {
            type_: c.type_.clone(),
            status: c.status.clone(),
            reason: c.reason.clone(),
            message: c.message.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{accepted_outcome as accepted, connector, outbound, time as t};
    use crate::gateway::{GatewayStatus, PodReport, StatusConnector, StatusValidation};

    fn pod(name: &str, conns: &[(&str, i64)]) -> PodReport {
        PodReport {
            name: name.into(),
            ip: "127.0.0.1".into(),
            status: Ok(GatewayStatus {
                config_hash: "abcdef0123456789".into(),
                // sorted by name, as gateway::fetch_status hands them over
                connectors: {
                    let mut c: Vec<StatusConnector> = conns
                        .iter()
                        .map(|(n, g)| StatusConnector {
                            name: n.to_string(),
                            direction: "Inbound".into(),
                            generation: *g,
                        })
                        .collect();
                    c.sort_by(|a, b| a.name.cmp(&b.name));
                    c
                },
                ..GatewayStatus::default()
            }),
        }
    }

    fn cond<'a>(s: &'a PartnerConnectorStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn ready_when_programmed_everywhere() {
        let pc = connector("mail", "contoso", 3, &["contoso.com"]);
        let snap = GatewaySnapshot {
            pods: vec![
                pod("gw-1", &[("mail/contoso", 3)]),
                pod("gw-2", &[("mail/contoso", 4)]),
            ],
        };
        let s = compute_status(&pc, Some(&accepted()), &snap, t(100));
        assert_eq!(cond(&s, "Ready").status, "True");
        assert_eq!(cond(&s, "Programmed").reason, "Programmed");
        assert_eq!(
            s.gateways,
            Some(GatewaysStatus {
                ready: 2,
                programmed: 2
            })
        );
        assert!(
            s.conditions
                .iter()
                .all(|c| c.observed_generation == Some(3))
        );
        assert_eq!(s.tls.as_deref(), Some("Required 1.2+"));
    }

    #[test]
    fn pending_while_a_pod_lags_and_no_gateways() {
        let pc = connector("mail", "contoso", 3, &["contoso.com"]);
        let snap = GatewaySnapshot {
            pods: vec![
                pod("gw-1", &[("mail/contoso", 3)]),
                pod("gw-2", &[("mail/contoso", 2)]),
            ],
        };
        let s = compute_status(&pc, Some(&accepted()), &snap, t(100));
        let p = cond(&s, "Programmed");
        assert_eq!((p.status.as_str(), p.reason.as_str()), ("False", "Pending"));
        assert!(
            p.message.contains("gw-2 runs generation 2"),
            "{}",
            p.message
        );
        assert_eq!(cond(&s, "Ready").reason, "Pending");
        let s = compute_status(&pc, Some(&accepted()), &GatewaySnapshot::default(), t(100));
        assert_eq!(cond(&s, "Programmed").reason, "NoGateways");
    }

    #[test]
    fn conflicted_and_missing_secret() {
        let pc = connector("mail", "young", 1, &["contoso.com"]);
        let mut o = accepted();
        o.acceptance = Acceptance::Conflicted {
            winner: "mail/old".into(),
            key: "inbound sender domain contoso.com".into(),
        };
        o.resolution = Resolution::NotFound("Secret mail/ca not found".into());
        o.included = false;
        let snap = GatewaySnapshot {
            pods: vec![pod("gw-1", &[])],
        };
        let s = compute_status(&pc, Some(&o), &snap, t(100));
        assert_eq!(cond(&s, "Accepted").reason, "Conflicted");
        assert!(cond(&s, "Accepted").message.contains("mail/old"));
        assert_eq!(cond(&s, "ResolvedRefs").reason, "SecretNotFound");
        assert_eq!(cond(&s, "Programmed").status, "False");
        assert_eq!(cond(&s, "Ready").reason, "Conflicted");
    }

    #[test]
    fn transition_times_and_transitions() {
        let mut pc = connector("mail", "contoso", 1, &["contoso.com"]);
        let snap = GatewaySnapshot {
            pods: vec![pod("gw-1", &[])],
        };
        let s1 = compute_status(&pc, Some(&accepted()), &snap, t(100));
        let tr = transitions(None, &s1);
        assert_eq!(tr.len(), 4);
        pc.status = Some(s1.clone());
        // same state later: times kept, no transitions
        let s2 = compute_status(&pc, Some(&accepted()), &snap, t(200));
        assert_eq!(s1, s2);
        assert!(transitions(Some(&s1), &s2).is_empty());
        // programmed: Programmed and Ready flip, times move
        let snap = GatewaySnapshot {
            pods: vec![pod("gw-1", &[("mail/contoso", 1)])],
        };
        let s3 = compute_status(&pc, Some(&accepted()), &snap, t(300));
        let tr = transitions(Some(&s2), &s3);
        assert_eq!(
            tr.iter().map(|t| t.type_.as_str()).collect::<Vec<_>>(),
            ["Programmed", "Ready"]
        );
        assert_eq!(cond(&s3, "Ready").last_transition_time, t(300));
        assert_eq!(cond(&s3, "Accepted").last_transition_time, t(100));
    }

    #[test]
    fn validation_takes_latest_per_host() {
        let pc = outbound(
            "mail",
            "fab",
            1,
            &["fabrikam.com"],
            &["smtp.fabrikam.com:25"],
        );
        let mut a = pod("gw-1", &[("mail/fab", 1)]);
        let mut b = pod("gw-2", &[("mail/fab", 1)]);
        let v = |time: &str, result: &str| StatusValidation {
            connector: "mail/fab".into(),
            host: "smtp.fabrikam.com:25".into(),
            time: Some(time.into()),
            result: result.into(),
            ..StatusValidation::default()
        };
        if let Ok(st) = a.status.as_mut() {
            st.validation = vec![v("2026-01-01T00:00:00Z", "Failure")];
        }
        if let Ok(st) = b.status.as_mut() {
            st.validation = vec![v("2026-01-02T00:00:00Z", "Success")];
        }
        let s = compute_status(
            &pc,
            Some(&accepted()),
            &GatewaySnapshot { pods: vec![a, b] },
            t(1),
        );
        assert_eq!(s.validation.len(), 1);
        assert_eq!(s.validation[0].result, "Success");
        assert_eq!(s.tls.as_deref(), Some("DomainValidation"));
    }

    #[test]
    fn tls_column_names_dane_and_mta_sts_modes() {
        let mut pc = crate::fixtures::outbound("mail", "fab", 1, &["fabrikam.com"], &[]);
        assert_eq!(tls_summary(&pc).as_deref(), Some("DomainValidation"));
        if let Some(o) = pc.spec.outbound.as_mut() {
            o.dane = partnergate_crds::OutboundPolicyMode::Mandatory;
            o.mta_sts = partnergate_crds::OutboundPolicyMode::Opportunistic;
        }
        assert_eq!(
            tls_summary(&pc).as_deref(),
            Some("DomainValidation+DANE(Mandatory)+MTA-STS(Opportunistic)")
        );
    }

    #[test]
    fn only_newly_failing_probes_are_reported() {
        let probe = |host: &str, result: &str| ValidationStatus {
            host: host.into(),
            result: result.into(),
            error: Some("451 4.7.5 certificate name mismatch".into()),
            ..ValidationStatus::default()
        };
        let status = |v: Vec<ValidationStatus>| PartnerConnectorStatus {
            validation: v,
            ..PartnerConnectorStatus::default()
        };
        let before = status(vec![probe("a:25", "Success"), probe("b:25", "Failure")]);
        let after = status(vec![
            probe("a:25", "Failure"),
            probe("b:25", "Failure"),
            probe("c:25", "Failure"),
        ]);
        let hosts =
            |v: Vec<&ValidationStatus>| v.iter().map(|p| p.host.clone()).collect::<Vec<_>>();
        assert_eq!(
            hosts(newly_failing_validation(Some(&before), &after)),
            ["a:25", "c:25"]
        );
        assert_eq!(hosts(newly_failing_validation(None, &before)), ["b:25"]);
        assert!(newly_failing_validation(Some(&after), &after).is_empty());
    }
}
