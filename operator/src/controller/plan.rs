//! Reconcile's decisions, pure: (connector, last render, last gateway poll, now, expiry
//! warnings already given) → [`Plan`]: the status to write, the Events to publish, when to look
//! again. [`super::reconcile`] only carries a plan out; nothing here talks to the API server
//! or reads the clock.
//!
//! Invariants (docs/partnerconnector.md, docs/operations.md):
//! - a connector being deleted is left alone;
//! - nothing is written before the render has seen this uid and generation (the render is
//!   woken and the connector looked at again in 2 s), nor before the first gateway poll (1 s):
//!   a status is never written only to be taken back a moment later (e.g. NoGateways);
//! - the status is written only when it differs from the live one, and Events about the status
//!   (one ValidationFailed Warning per newly failing probe, then at most one per condition that
//!   changed status or reason) only come with such a write;
//! - a condition transition to False is a Warning, except Programmed=False/Pending (and Ready
//!   following it) on the normal path to Ready, which gives no Event — Pending after True at
//!   the same generation is a regression and a Warning; a transition to True is a
//!   Normal Event for Ready, and for another condition only when it was False with a
//!   failure reason before (a recovery): the normal path of a new connector or generation is
//!   one `Ready` Event, not one per condition;
//! - CertificateExpiring is a Warning given once per connector uid and message, whatever the
//!   status does;
//! - an included connector that is not programmed yet is looked at again in 2 s, anything else
//!   in 300 s (the watches and "reconcile all" bring changes sooner).

use std::collections::HashSet;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::events::EventType;
use partnergate_crds::{PartnerConnector, PartnerConnectorStatus, condition, reason};

use super::{RenderState, uid_gen};
use crate::conditions::{self, compute_status};
use crate::gateway::GatewaySnapshot;

/// The render has not seen this generation yet.
pub const REQUEUE_RENDER_BEHIND: Duration = Duration::from_secs(2);
/// The gateways have not been polled yet.
pub const REQUEUE_NOT_POLLED: Duration = Duration::from_secs(1);
/// Included in the config but not programmed on every ready gateway pod yet.
pub const REQUEUE_PROGRAMMING: Duration = Duration::from_secs(2);
/// Everything else.
pub const REQUEUE_STEADY: Duration = Duration::from_secs(300);

/// Reason of the Warning about a certificate close to expiry.
pub const CERTIFICATE_EXPIRING: &str = "CertificateExpiring";
/// Reason of the Warning about a next hop whose validation probe fails.
pub const VALIDATION_FAILED: &str = "ValidationFailed";

/// One Event to publish about the connector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedEvent {
    pub type_: EventType,
    pub reason: String,
    pub note: String,
}

/// What one reconcile does.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The status to write to the status subresource; `None` = leave it as it is.
    pub status: Option<PartnerConnectorStatus>,
    /// Events to publish, in order, after the status write succeeded.
    pub events: Vec<PlannedEvent>,
    /// Expiry warnings to remember as given (their keys in `warned`), with the events.
    pub warned: Vec<String>,
    /// Wake the render loop: it has not seen this generation yet.
    pub notify_render: bool,
    /// Look again after this long; `None` = only when something changes.
    pub requeue: Option<Duration>,
}

impl Plan {
    fn wait(requeue: Option<Duration>) -> Self {
        Plan {
            status: None,
            events: vec![],
            warned: vec![],
            notify_render: false,
            requeue,
        }
    }
}

/// Whether a condition transition gives an Event, and of which type; `before` is the
/// condition's (status, reason) before it, `None` when the status did not have it yet, and
/// `pending_is_regression` says the old status was computed from the generation this one is
/// and no condition other than Programmed and Ready is failing.
///
/// A failure is always a Warning. The normal path of a connector (conditions appearing True,
/// Programmed=False/Pending while the gateways load it) is one Normal `Ready` Event when it
/// becomes Ready: an Event per condition on that path told nothing the status does not, and at
/// thousands of connectors those writes are most of the API server's work. Pending after True
/// at the same generation is not that path but a regression (a gateway pod stopped serving
/// what it served: a failed reload, a pod running an older config), so it is a Warning. A
/// condition that comes back True after a failure is a Normal Event, the answer to its Warning.
fn event_type(
    t: &conditions::Transition,
    before: Option<(&str, &str)>,
    pending_is_regression: bool,
) -> Option<EventType> {
    if t.reason == reason::PENDING {
        let was_true = before.is_some_and(|(status, _)| status == "True");
        return (was_true && pending_is_regression).then_some(EventType::Warning);
    }
    if t.status != "True" {
        return Some(EventType::Warning);
    }
    let recovered = before.is_some_and(|(status, r)| status != "True" && r != reason::PENDING);
    (t.type_ == condition::READY || recovered).then_some(EventType::Normal)
}

/// The key under which an expiry warning is remembered in `warned`.
pub fn warned_key(pc: &PartnerConnector, message: &str) -> String {
    format!(
        "{}|{message}",
        pc.metadata.uid.as_deref().unwrap_or_default()
    )
}

/// Decides what reconciling `pc` does, given the last render, the last gateway poll (`None`
/// before the first), the time for new conditions and the expiry warnings already given.
pub fn plan(
    pc: &PartnerConnector,
    render: &RenderState,
    gateways: Option<&GatewaySnapshot>,
    now: Time,
    warned: &HashSet<String>,
) -> Plan {
    if pc.metadata.deletion_timestamp.is_some() {
        return Plan::wait(None);
    }
    let key = pc.key();
    if render.seen.get(&key) != Some(&uid_gen(pc)) {
        // The render has not seen this generation yet: it will trigger us when it has.
        return Plan {
            notify_render: true,
            ..Plan::wait(Some(REQUEUE_RENDER_BEHIND))
        };
    }
    let outcome = render.outcomes.get(&key);
    let Some(snapshot) = gateways else {
        // Not polled yet: don't write NoGateways only to take it back a moment later.
        return Plan::wait(Some(REQUEUE_NOT_POLLED));
    };
    let status = compute_status(pc, outcome, snapshot, now);
    let old = pc.status.as_ref();

    let mut events = vec![];
    if old != Some(&status) {
        for probe in conditions::newly_failing_validation(old, &status) {
            events.push(PlannedEvent {
                type_: EventType::Warning,
                reason: VALIDATION_FAILED.into(),
                note: format!(
                    "validation of next hop {} failed: {}",
                    probe.host,
                    probe.error.as_deref().unwrap_or("no detail")
                ),
            });
        }
        // Pending is a regression of its own only at a generation that was already computed
        // and when nothing else failed: a connector left out of the config for a failing
        // condition has that condition's Warning.
        let pending_is_regression = old.is_some_and(|o| {
            o.observed_generation.is_some() && o.observed_generation == status.observed_generation
        }) && status.conditions.iter().all(|c| {
            c.status == "True" || c.type_ == condition::PROGRAMMED || c.type_ == condition::READY
        });
        for t in conditions::transitions(old, &status) {
            let before = old.and_then(|s| s.conditions.iter().find(|c| c.type_ == t.type_));
            let Some(type_) = event_type(
                &t,
                before.map(|c| (c.status.as_str(), c.reason.as_str())),
                pending_is_regression,
            ) else {
                continue;
            };
            events.push(PlannedEvent {
                type_,
                note: format!("{} is {}: {}", t.type_, t.status, t.message),
                reason: t.reason,
            });
        }
    }

    let mut newly_warned = vec![];
    for msg in outcome.iter().flat_map(|o| &o.expiring) {
        let k = warned_key(pc, msg);
        if !warned.contains(&k) && !newly_warned.contains(&k) {
            newly_warned.push(k);
            events.push(PlannedEvent {
                type_: EventType::Warning,
                reason: CERTIFICATE_EXPIRING.into(),
                note: msg.clone(),
            });
        }
    }

    let programmed = status
        .conditions
        .iter()
        .any(|c| c.type_ == condition::PROGRAMMED && c.status == "True");
    let included = outcome.is_some_and(|o| o.included);
    let requeue = if included && !programmed {
        REQUEUE_PROGRAMMING
    } else {
        REQUEUE_STEADY
    };
    Plan {
        status: (old != Some(&status)).then_some(status),
        events,
        warned: newly_warned,
        notify_render: false,
        requeue: Some(requeue),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{accepted_outcome as accepted, connector, outbound, time as t};
    use crate::gateway::{GatewayStatus, PodReport, StatusConnector, StatusValidation};
    use crate::render::{Outcome, Resolution};
    use std::collections::{BTreeMap, HashMap};

    use EventType::{Normal, Warning};

    /// A render that has seen `pc` as it is, with this outcome.
    fn rendered(pc: &PartnerConnector, outcome: Outcome) -> RenderState {
        RenderState {
            hash: "abc".into(),
            seen: HashMap::from([(pc.key(), uid_gen(pc))]),
            outcomes: BTreeMap::from([(pc.key(), outcome)]),
        }
    }

    /// A ready gateway pod running these (connector, generation)s and reporting these probes
    /// (host, result, time).
    fn pod(name: &str, conns: &[(&str, i64)], probes: &[(&str, &str, &str)]) -> PodReport {
        PodReport {
            name: name.into(),
            ip: "127.0.0.1".into(),
            status: Ok(GatewayStatus {
                config_hash: "abcdef0123456789".into(),
                connectors: conns
                    .iter()
                    .map(|(n, g)| StatusConnector {
                        name: n.to_string(),
                        direction: "Outbound".into(),
                        generation: *g,
                    })
                    .collect(),
                validation: probes
                    .iter()
                    .map(|(host, result, time)| StatusValidation {
                        connector: "mail/fab".into(),
                        host: host.to_string(),
                        time: Some(time.to_string()),
                        result: result.to_string(),
                        error: (*result == "Failure")
                            .then(|| "certificate name mismatch".to_string()),
                        ..StatusValidation::default()
                    })
                    .collect(),
                ..GatewayStatus::default()
            }),
        }
    }

    fn gateways(pods: Vec<PodReport>) -> GatewaySnapshot {
        GatewaySnapshot { pods }
    }

    /// `pc` with the status it would have been given at t(100) from `outcome` and `snapshot`.
    fn written(
        mut pc: PartnerConnector,
        outcome: &Outcome,
        snapshot: &GatewaySnapshot,
    ) -> PartnerConnector {
        pc.status = Some(compute_status(&pc, Some(outcome), snapshot, t(100)));
        pc
    }

    fn fab() -> PartnerConnector {
        fab_generation(2)
    }

    fn expiring() -> Outcome {
        Outcome {
            expiring: vec!["Secret mail/ca ca.crt: CN=Soon CA expires 2026-01-10".into()],
            ..accepted()
        }
    }

    struct Row {
        contract: &'static str,
        pc: PartnerConnector,
        render: RenderState,
        gateways: Option<GatewaySnapshot>,
        warned: HashSet<String>,
        writes_status: bool,
        /// (type, reason, part of the note)
        events: Vec<(EventType, &'static str, &'static str)>,
        warns: usize,
        notify_render: bool,
        requeue: Option<Duration>,
    }

    impl Default for Row {
        fn default() -> Self {
            let pc = fab();
            Row {
                contract: "",
                render: rendered(&pc, accepted()),
                pc,
                gateways: None,
                warned: HashSet::new(),
                writes_status: false,
                events: vec![],
                warns: 0,
                notify_render: false,
                requeue: Some(REQUEUE_STEADY),
            }
        }
    }

    fn rows() -> Vec<Row> {
        let live = || gateways(vec![pod("gw-1", &[("mail/fab", 2)], &[])]);
        let lagging = || gateways(vec![pod("gw-1", &[("mail/fab", 1)], &[])]);
        let probing = |result, time| {
            gateways(vec![pod(
                "gw-1",
                &[("mail/fab", 2)],
                &[("smtp.fabrikam.com:25", result, time)],
            )])
        };
        let deleting = {
            let mut pc = fab();
            pc.metadata.deletion_timestamp = Some(t(50));
            pc
        };
        let recreated = {
            let mut pc = fab();
            pc.metadata.uid = Some("uid-of-the-new-object".into());
            pc
        };
        let not_found = Outcome {
            resolution: Resolution::NotFound("Secret mail/ca not found".into()),
            included: false,
            ..accepted()
        };
        let too_large = Outcome {
            included: false,
            left_out: Some(
                "the gateway's connectors file would be 2000000 bytes with every accepted \
                 connector, over the 1047552-byte limit"
                    .into(),
            ),
            ..accepted()
        };
        vec![
            Row {
                contract: "a connector being deleted is left alone until it changes",
                pc: deleting,
                gateways: Some(live()),
                requeue: None,
                ..Row::default()
            },
            Row {
                contract: "a generation the render has not seen: nothing written, render woken, 2 s",
                render: rendered(&fab(), accepted()),
                pc: fab_generation(3),
                gateways: Some(live()),
                notify_render: true,
                requeue: Some(REQUEUE_RENDER_BEHIND),
                ..Row::default()
            },
            Row {
                contract: "a recreated object (new uid, same generation) waits for the render too",
                render: rendered(&fab(), accepted()),
                pc: recreated,
                gateways: Some(live()),
                notify_render: true,
                requeue: Some(REQUEUE_RENDER_BEHIND),
                ..Row::default()
            },
            Row {
                contract: "before the first gateway poll nothing is written (no NoGateways flap), 1 s",
                gateways: None,
                requeue: Some(REQUEUE_NOT_POLLED),
                ..Row::default()
            },
            Row {
                contract: "a new connector gets its status and one Normal Ready event, not one \
                           per condition (issue 17)",
                gateways: Some(live()),
                writes_status: true,
                events: vec![(Normal, reason::READY, "Ready is True")],
                ..Row::default()
            },
            Row {
                contract: "a new connector the gateways have not loaded yet: status written, \
                           no event (the normal path), 2 s",
                gateways: Some(lagging()),
                writes_status: true,
                requeue: Some(REQUEUE_PROGRAMMING),
                ..Row::default()
            },
            Row {
                contract: "Pending then programmed: one Normal Ready event",
                pc: written(fab(), &accepted(), &lagging()),
                gateways: Some(live()),
                writes_status: true,
                events: vec![(Normal, reason::READY, "Ready is True")],
                ..Row::default()
            },
            Row {
                contract: "a condition back to True after a failure is a Normal event, with Ready",
                pc: written(fab(), &accepted(), &gateways(vec![])),
                gateways: Some(live()),
                writes_status: true,
                events: vec![
                    (
                        Normal,
                        reason::PROGRAMMED,
                        "Programmed is True: generation 2",
                    ),
                    (Normal, reason::READY, "Ready is True"),
                ],
                ..Row::default()
            },
            Row {
                contract: "an unchanged status is not written and gives no event",
                pc: written(fab(), &accepted(), &live()),
                gateways: Some(live()),
                ..Row::default()
            },
            Row {
                contract: "Programmed True then Pending at the same generation (a gateway pod \
                           stopped serving it) is a Warning, Ready too; not programmed: 2 s",
                pc: written(fab(), &accepted(), &live()),
                gateways: Some(lagging()),
                writes_status: true,
                events: vec![
                    (
                        Warning,
                        reason::PENDING,
                        "Programmed is False: generation 2 is live on 0 of 1",
                    ),
                    (Warning, reason::PENDING, "Ready is False"),
                ],
                requeue: Some(REQUEUE_PROGRAMMING),
                ..Row::default()
            },
            Row {
                contract: "a new generation not loaded yet (Pending after True at the old \
                           generation) is the normal path: no event; 2 s",
                pc: {
                    let mut pc = fab();
                    pc.status = written(fab_generation(1), &accepted(), &lagging()).status;
                    pc
                },
                gateways: Some(lagging()),
                writes_status: true,
                requeue: Some(REQUEUE_PROGRAMMING),
                ..Row::default()
            },
            Row {
                contract: "no ready gateway pod is a Warning; included but not programmed: 2 s",
                pc: written(fab(), &accepted(), &live()),
                gateways: Some(gateways(vec![])),
                writes_status: true,
                events: vec![
                    (
                        Warning,
                        reason::NO_GATEWAYS,
                        "Programmed is False: no ready gateway pods",
                    ),
                    (Warning, reason::NO_GATEWAYS, "Ready is False"),
                ],
                requeue: Some(REQUEUE_PROGRAMMING),
                ..Row::default()
            },
            Row {
                contract: "a Secret found again: ResolvedRefs and Ready events, Programmed \
                           (Pending before) none",
                pc: written(fab(), &not_found, &live()),
                gateways: Some(live()),
                writes_status: true,
                events: vec![
                    (Normal, reason::RESOLVED_REFS, "ResolvedRefs is True"),
                    (Normal, reason::READY, "Ready is True"),
                ],
                ..Row::default()
            },
            Row {
                contract: "a failing condition is a Warning; left out of the config: 300 s",
                render: rendered(&fab(), not_found),
                pc: written(fab(), &accepted(), &live()),
                gateways: Some(live()),
                writes_status: true,
                events: vec![
                    (
                        Warning,
                        reason::SECRET_NOT_FOUND,
                        "ResolvedRefs is False: Secret mail/ca not found",
                    ),
                    (Warning, reason::SECRET_NOT_FOUND, "Ready is False"),
                ],
                ..Row::default()
            },
            Row {
                contract: "left out for room (issue 17): Programmed=False/ConfigTooLarge is a \
                           Warning naming the limit; 300 s",
                render: rendered(&fab(), too_large),
                pc: written(fab(), &accepted(), &live()),
                gateways: Some(live()),
                writes_status: true,
                events: vec![
                    (
                        Warning,
                        reason::CONFIG_TOO_LARGE,
                        "Programmed is False: the gateway's connectors file would be 2000000 bytes",
                    ),
                    (Warning, reason::CONFIG_TOO_LARGE, "Ready is False"),
                ],
                ..Row::default()
            },
            Row {
                contract: "a newly failing validation probe is one ValidationFailed Warning",
                pc: written(
                    fab(),
                    &accepted(),
                    &probing("Success", "2026-01-01T00:00:00Z"),
                ),
                gateways: Some(probing("Failure", "2026-01-01T00:01:00Z")),
                writes_status: true,
                events: vec![(
                    Warning,
                    VALIDATION_FAILED,
                    "validation of next hop smtp.fabrikam.com:25 failed: certificate name mismatch",
                )],
                ..Row::default()
            },
            Row {
                contract: "a probe that keeps failing is written again but not warned again",
                pc: written(
                    fab(),
                    &accepted(),
                    &probing("Failure", "2026-01-01T00:01:00Z"),
                ),
                gateways: Some(probing("Failure", "2026-01-01T00:02:00Z")),
                writes_status: true,
                ..Row::default()
            },
            Row {
                contract: "an expiring certificate is a CertificateExpiring Warning, even with the status unchanged",
                render: rendered(&fab(), expiring()),
                pc: written(fab(), &expiring(), &live()),
                gateways: Some(live()),
                events: vec![(
                    Warning,
                    CERTIFICATE_EXPIRING,
                    "CN=Soon CA expires 2026-01-10",
                )],
                warns: 1,
                ..Row::default()
            },
            Row {
                contract: "an expiring certificate is warned about once",
                render: rendered(&fab(), expiring()),
                pc: written(fab(), &expiring(), &live()),
                gateways: Some(live()),
                warned: HashSet::from([warned_key(&fab(), &expiring().expiring[0])]),
                ..Row::default()
            },
        ]
    }

    fn fab_generation(generation: i64) -> PartnerConnector {
        outbound(
            "mail",
            "fab",
            generation,
            &["fabrikam.com"],
            &["smtp.fabrikam.com:25"],
        )
    }

    #[test]
    fn plan_follows_the_reconcile_contract() {
        for row in rows() {
            let c = row.contract;
            let p = plan(
                &row.pc,
                &row.render,
                row.gateways.as_ref(),
                t(1000),
                &row.warned,
            );
            assert_eq!(p.status.is_some(), row.writes_status, "{c}: status written");
            let got: Vec<(EventType, &str)> = p
                .events
                .iter()
                .map(|e| (e.type_, e.reason.as_str()))
                .collect();
            let want: Vec<(EventType, &str)> = row.events.iter().map(|e| (e.0, e.1)).collect();
            assert_eq!(got, want, "{c}: events");
            for (e, (_, _, note)) in p.events.iter().zip(&row.events) {
                assert!(
                    e.note.contains(note),
                    "{c}: note {:?} lacks {note:?}",
                    e.note
                );
            }
            assert_eq!(p.warned.len(), row.warns, "{c}: warnings remembered");
            assert_eq!(p.notify_render, row.notify_render, "{c}: render woken");
            assert_eq!(p.requeue, row.requeue, "{c}: requeue");
        }
    }

    #[test]
    fn written_status_is_the_computed_one_and_keeps_transition_times() {
        let pc = fab();
        let snap = gateways(vec![pod("gw-1", &[("mail/fab", 2)], &[])]);
        let render = rendered(&pc, accepted());
        let first = plan(&pc, &render, Some(&snap), t(100), &HashSet::new());
        let status = first.status.clone().unwrap();
        assert_eq!(
            status,
            compute_status(&pc, Some(&accepted()), &snap, t(100))
        );
        assert_eq!(status.observed_generation, Some(2));
        // the same state later: nothing to write, the times of t(100) stay
        let mut pc = pc;
        pc.status = Some(status);
        let later = plan(&pc, &render, Some(&snap), t(900), &HashSet::new());
        assert_eq!(later.status, None);
        assert!(later.events.is_empty());
    }

    #[test]
    fn expiry_warning_key_is_per_connector_uid_and_message() {
        let render = rendered(&fab(), expiring());
        let snap = gateways(vec![pod("gw-1", &[("mail/fab", 2)], &[])]);
        let p = plan(&fab(), &render, Some(&snap), t(1), &HashSet::new());
        assert_eq!(p.warned, [warned_key(&fab(), &expiring().expiring[0])]);
        assert!(p.warned[0].starts_with("uid-mail-fab|"));
        // the same message twice in one outcome is one warning
        let mut twice = expiring();
        twice.expiring.push(twice.expiring[0].clone());
        let p = plan(
            &fab(),
            &rendered(&fab(), twice),
            Some(&snap),
            t(1),
            &HashSet::new(),
        );
        assert_eq!(p.warned.len(), 1);
        assert_eq!(
            p.events
                .iter()
                .filter(|e| e.reason == CERTIFICATE_EXPIRING)
                .count(),
            1
        );
        // another connector with the same message is warned on its own
        let other = connector("mail", "other", 1, &["contoso.com"]);
        assert_ne!(warned_key(&other, &expiring().expiring[0]), p.warned[0]);
    }
}
