//! The gateway's server certificate: watches its Secret (by name, in the gateway namespace),
//! exports the leaf's expiry as a metric and gives one CertificateExpiring Warning on the
//! Secret when it is within the warning window.
//!
//! Invariants:
//! - disabled when no Secret is configured;
//! - one Warning per leaf expiry date (a renewed certificate that is again close to expiry
//!   warns again); a Secret without `tls.crt` or that does not parse changes nothing.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::Resource;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::runtime::watcher::{self, watcher};
use time::OffsetDateTime;

use super::Context;
use crate::render;

pub(super) async fn server_certificate_watch(ctx: Arc<Context>) {
    let s = &ctx.settings;
    if s.server_certificate_secret.is_empty() {
        return;
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &s.gateway_namespace);
    let cfg = watcher::Config::default()
        .fields(&format!("metadata.name={}", s.server_certificate_secret));
    let stream = watcher(api, cfg).default_backoff().applied_objects();
    futures::pin_mut!(stream);
    let mut warned_for = None;
    while let Some(ev) = stream.next().await {
        let secret = match ev {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "server certificate watch failed; retrying");
                continue;
            }
        };
        let Some(crt) = secret.data.as_ref().and_then(|d| d.get("tls.crt")) else {
            continue;
        };
        match crate::certs::parse_pem_certificates(&crt.0) {
            Ok(certs) => {
                let Some(leaf) = certs.first() else { continue };
                ctx.metrics
                    .certificate_expiry
                    .get_or_create(&crate::metrics::SecretLabel {
                        secret: s.server_certificate_secret.clone(),
                    })
                    .set(leaf.not_after.unix_timestamp());
                let now = OffsetDateTime::now_utc();
                let soon =
                    leaf.not_after <= now + time::Duration::days(render::EXPIRY_WARNING_DAYS);
                if soon && warned_for != Some(leaf.not_after) {
                    warned_for = Some(leaf.not_after);
                    let ev = KubeEvent {
                        type_: EventType::Warning,
                        reason: "CertificateExpiring".into(),
                        note: Some(format!(
                            "gateway server certificate {} expires at {}",
                            leaf.subject,
                            leaf.not_after_rfc3339()
                        )),
                        action: "Reconcile".into(),
                        secondary: None,
                    };
                    if let Err(e) = ctx.recorder.publish(&ev, &secret.object_ref(&())).await {
                        tracing::warn!(error = %e, "cannot publish event");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(secret = %s.server_certificate_secret, error = %e, "gateway server certificate does not parse")
            }
        }
    }
}
