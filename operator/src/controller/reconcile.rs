//! The kube-runtime Controller's reconcile of one PartnerConnector: asks [`plan`] what to do
//! with what the render loop and the poller last published, and carries it out.
//!
//! Invariants:
//! - no decision is taken here (they are all in [`plan`], which is tested on its own); this
//!   file only talks to the API server;
//! - the status is written with server-side apply on the status subresource as
//!   [`FIELD_MANAGER`] (forced: the operator owns status);
//! - Events are published only after the status write succeeded (a failed write is retried
//!   by `error_policy` in 5 s and the Events come with the retry); a failed Event publish is
//!   logged, never fails the reconcile;
//! - an expiry warning is remembered as given when it is published.

use std::sync::{Arc, PoisonError};
use std::time::Instant;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::Event as KubeEvent;
use kube::{Resource, ResourceExt};
use partnergate_crds::PartnerConnector;
use serde_json::json;

use super::plan::{Plan, PlannedEvent, plan};
use super::{Context, Error, FIELD_MANAGER};

/// Retry after a failed reconcile.
const ERROR_REQUEUE: std::time::Duration = std::time::Duration::from_secs(5);

pub(super) async fn reconcile(
    pc: Arc<PartnerConnector>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    let result = reconcile_inner(&pc, &ctx).await;
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    result
}

async fn reconcile_inner(pc: &PartnerConnector, ctx: &Context) -> Result<Action, Error> {
    let plan = {
        let render = ctx.render_state();
        let gateways = ctx.gateways();
        let warned = ctx.warned.lock().unwrap_or_else(PoisonError::into_inner);
        plan(
            pc,
            &render,
            gateways.as_deref(),
            Time(Timestamp::now()),
            &warned,
        )
    };
    execute(pc, ctx, plan).await
}

/// Carries out a plan: wake the render, write the status, publish the Events.
async fn execute(pc: &PartnerConnector, ctx: &Context, plan: Plan) -> Result<Action, Error> {
    if plan.notify_render {
        ctx.render_notify.notify_one();
    }
    if let Some(status) = &plan.status {
        let api: Api<PartnerConnector> =
            Api::namespaced(ctx.client.clone(), &pc.namespace().unwrap_or_default());
        let patch = json!({
            "apiVersion": "partnergate.io/v1alpha1",
            "kind": "PartnerConnector",
            "status": status,
        });
        api.patch_status(
            &pc.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    }
    if pc.metadata.deletion_timestamp.is_some() {
        ctx.metrics.forget_connector(&pc.key());
    } else if let Some(status) = plan.status.as_ref().or(pc.status.as_ref()) {
        let ready = status
            .conditions
            .iter()
            .any(|c| c.type_ == partnergate_crds::condition::READY && c.status == "True");
        ctx.metrics.set_connector_ready(&pc.key(), ready);
    }
    if !plan.warned.is_empty()
        && let Ok(mut w) = ctx.warned.lock()
    {
        w.extend(plan.warned);
    }
    for ev in &plan.events {
        publish(ctx, pc, ev).await;
    }
    Ok(match plan.requeue {
        Some(after) => Action::requeue(after),
        None => Action::await_change(),
    })
}

async fn publish(ctx: &Context, pc: &PartnerConnector, ev: &PlannedEvent) {
    // events.k8s.io/v1 refuses notes over 1 kB
    let note: String = ev.note.chars().take(1000).collect();
    let ev = KubeEvent {
        type_: ev.type_,
        reason: ev.reason.clone(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &pc.object_ref(&())).await {
        tracing::warn!(connector = %pc.key(), error = %e, "cannot publish event");
    }
}

pub(super) fn error_policy(pc: Arc<PartnerConnector>, err: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(connector = %pc.key(), error = %err, "reconcile failed");
    ctx.metrics
        .reconcile_errors
        .get_or_create(&crate::metrics::ErrorLabel {
            error: err.metric_label(),
        })
        .inc();
    Action::requeue(ERROR_REQUEUE)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};
    use std::time::Duration;

    use http::Method;
    use partnergate_crds::PartnerConnectorStatus;

    use super::*;
    use crate::conditions::compute_status;
    use crate::controller::mock_api::{self, Call};
    use crate::controller::{RenderState, uid_gen};
    use crate::fixtures::outbound;
    use crate::gateway::{
        GatewaySnapshot, GatewayStatus, PodReport, StatusConnector, StatusValidation,
    };
    use crate::render::{Acceptance, Outcome, Resolution};

    const STATUS_PATH: &str =
        "/apis/partnergate.io/v1alpha1/namespaces/mail/partnerconnectors/fab/status";
    const EVENTS_PATH: &str = "/apis/events.k8s.io/v1/namespaces/mail/events";

    fn fab() -> PartnerConnector {
        outbound(
            "mail",
            "fab",
            2,
            &["fabrikam.com"],
            &["smtp.fabrikam.com:25"],
        )
    }

    fn accepted(expiring: &[&str]) -> Outcome {
        Outcome {
            acceptance: Acceptance::Accepted,
            resolution: Resolution::Resolved,
            included: true,
            certificates: vec![],
            expiring: expiring.iter().map(|m| m.to_string()).collect(),
            left_out: None,
        }
    }

    /// One ready gateway pod running generation 2 of mail/fab, its probe of the smart host
    /// failing when `failing`.
    fn live(failing: bool) -> GatewaySnapshot {
        GatewaySnapshot {
            pods: vec![PodReport {
                name: "gw-1".into(),
                ip: "127.0.0.1".into(),
                status: Ok(GatewayStatus {
                    config_hash: "abcdef0123456789".into(),
                    connectors: vec![StatusConnector {
                        name: "mail/fab".into(),
                        direction: "Outbound".into(),
                        generation: 2,
                    }],
                    validation: failing
                        .then(|| StatusValidation {
                            connector: "mail/fab".into(),
                            host: "smtp.fabrikam.com:25".into(),
                            time: Some("2026-01-01T00:00:00Z".into()),
                            result: "Failure".into(),
                            error: Some("certificate name mismatch".into()),
                            ..StatusValidation::default()
                        })
                        .into_iter()
                        .collect(),
                    ..GatewayStatus::default()
                }),
            }],
        }
    }

    /// Publishes a render that has seen `pc` with `outcome`, and a gateway poll.
    fn published(ctx: &Context, pc: &PartnerConnector, outcome: Outcome, snap: GatewaySnapshot) {
        *ctx.render_state.write().unwrap() = Arc::new(RenderState {
            hash: "abc".into(),
            seen: HashMap::from([(pc.key(), uid_gen(pc))]),
            outcomes: BTreeMap::from([(pc.key(), outcome)]),
        });
        *ctx.gateways.write().unwrap() = Some(Arc::new(snap));
    }

    /// Runs reconcile on the mock API server; the action and every call it made.
    async fn reconcile_on_mock(
        pc: &PartnerConnector,
        outcome: Outcome,
        snap: GatewaySnapshot,
    ) -> (Action, Vec<Call>) {
        let (ctx, server) = mock_api::context(pc);
        published(&ctx, pc, outcome, snap);
        let action = reconcile(Arc::new(pc.clone()), ctx.clone()).await.unwrap();
        drop(ctx);
        (action, server.await.unwrap())
    }

    fn event(call: &Call) -> (String, String, String) {
        assert_eq!(call.method, Method::POST, "{call:?}");
        assert_eq!(call.path, EVENTS_PATH);
        assert_eq!(call.body["regarding"]["kind"], "PartnerConnector");
        assert_eq!(call.body["regarding"]["name"], "fab");
        assert_eq!(call.body["reportingController"], FIELD_MANAGER);
        assert_eq!(call.body["action"], "Reconcile");
        let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
        (
            s(&call.body["type"]),
            s(&call.body["reason"]),
            s(&call.body["note"]),
        )
    }

    #[tokio::test]
    async fn a_changed_status_is_applied_to_the_status_subresource_then_its_events_published() {
        let (action, calls) = reconcile_on_mock(&fab(), accepted(&[]), live(true)).await;

        let patch = &calls[0];
        assert_eq!(patch.method, Method::PATCH);
        assert_eq!(patch.path, STATUS_PATH);
        assert_eq!(
            patch.query.get("fieldManager").map(String::as_str),
            Some(FIELD_MANAGER)
        );
        assert_eq!(patch.query.get("force").map(String::as_str), Some("true"));
        assert_eq!(patch.content_type, "application/apply-patch+yaml");
        assert_eq!(patch.body["apiVersion"], "partnergate.io/v1alpha1");
        assert_eq!(patch.body["kind"], "PartnerConnector");
        let status: PartnerConnectorStatus =
            serde_json::from_value(patch.body["status"].clone()).unwrap();
        assert_eq!(status.observed_generation, Some(2));
        let conditions: Vec<(&str, &str, &str)> = status
            .conditions
            .iter()
            .map(|c| (c.type_.as_str(), c.status.as_str(), c.reason.as_str()))
            .collect();
        assert_eq!(
            conditions,
            [
                ("Accepted", "True", "Accepted"),
                ("ResolvedRefs", "True", "ResolvedRefs"),
                ("Programmed", "True", "Programmed"),
                ("Ready", "True", "Ready"),
            ]
        );
        assert_eq!(status.validation[0].result, "Failure");

        let events: Vec<_> = calls[1..].iter().map(event).collect();
        let kinds: Vec<(&str, &str)> = events
            .iter()
            .map(|(t, r, _)| (t.as_str(), r.as_str()))
            .collect();
        assert_eq!(
            kinds,
            [("Warning", "ValidationFailed"), ("Normal", "Ready"),]
        );
        assert_eq!(
            events[0].2,
            "validation of next hop smtp.fabrikam.com:25 failed: certificate name mismatch"
        );
        assert!(events[1].2.starts_with("Ready is True"), "{}", events[1].2);
        assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    }

    /// `live(false)` but the pod still runs generation 1: generation 2 is not programmed yet.
    fn lagging() -> GatewaySnapshot {
        let mut snap = live(false);
        if let Ok(s) = &mut snap.pods[0].status {
            s.connectors[0].generation = 1;
        }
        snap
    }

    #[tokio::test]
    async fn the_normal_path_of_a_new_connector_is_two_status_writes_and_one_event() {
        // created, rendered, not loaded by the gateway yet: the status, no Event
        let (action, calls) = reconcile_on_mock(&fab(), accepted(&[]), lagging()).await;
        assert_eq!(calls.len(), 1, "{calls:?}");
        assert_eq!(calls[0].path, STATUS_PATH);
        let pending: PartnerConnectorStatus =
            serde_json::from_value(calls[0].body["status"].clone()).unwrap();
        assert_eq!(action, Action::requeue(Duration::from_secs(2)));

        // the same state again: nothing at all
        let mut pc = fab();
        pc.status = Some(pending);
        let (_, calls) = reconcile_on_mock(&pc, accepted(&[]), lagging()).await;
        assert!(calls.is_empty(), "{calls:?}");

        // loaded: the status and one Normal Ready Event
        let (action, calls) = reconcile_on_mock(&pc, accepted(&[]), live(false)).await;
        assert_eq!(calls.len(), 2, "{calls:?}");
        assert_eq!(calls[0].path, STATUS_PATH);
        let (type_, reason, note) = event(&calls[1]);
        assert_eq!((type_.as_str(), reason.as_str()), ("Normal", "Ready"));
        assert!(note.starts_with("Ready is True"), "{note}");
        assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    }

    #[tokio::test]
    async fn an_unchanged_status_is_not_patched_and_gives_no_event() {
        let mut pc = fab();
        pc.status = Some(compute_status(
            &pc,
            Some(&accepted(&[])),
            &live(true),
            Time(Timestamp::from_second(100).unwrap()),
        ));
        let (action, calls) = reconcile_on_mock(&pc, accepted(&[]), live(true)).await;
        assert!(calls.is_empty(), "{calls:?}");
        assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    }

    #[tokio::test]
    async fn an_expiring_certificate_is_one_warning_across_reconciles() {
        let msg = "Secret mail/ca ca.crt: CN=Soon CA expires 2026-01-10";
        let mut pc = fab();
        pc.status = Some(compute_status(
            &pc,
            Some(&accepted(&[msg])),
            &live(false),
            Time(Timestamp::from_second(100).unwrap()),
        ));
        let (ctx, server) = mock_api::context(&pc);
        published(&ctx, &pc, accepted(&[msg]), live(false));
        let pc = Arc::new(pc);
        for _ in 0..2 {
            reconcile(pc.clone(), ctx.clone()).await.unwrap();
        }
        drop(ctx);
        let calls = server.await.unwrap();
        assert_eq!(calls.len(), 1, "{calls:?}");
        assert_eq!(
            event(&calls[0]),
            ("Warning".into(), "CertificateExpiring".into(), msg.into())
        );
    }
}
