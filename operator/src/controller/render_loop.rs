//! The render loop: renders the whole connector set (the gateway config is global), applies the
//! result in the gateway namespace and publishes the per-connector outcomes for reconcile.
//!
//! Invariants:
//! - it starts only once every connector store has its initial list, so a first render never
//!   drops connectors that are merely not listed yet;
//! - a burst of changes is one render (debounce); a full re-read of every referenced object at
//!   least every `resync`;
//! - the Secret (material) is applied before the ConfigMap that names its files, and the
//!   material of the previous round is kept one more round (while both fit one Secret), so a
//!   gateway never loads a config whose files are missing;
//! - nothing is written when the live ConfigMap and Secret already carry the rendered hash;
//! - outcomes are published even when the apply failed (Accepted/ResolvedRefs are still right
//!   and Programmed will say the gateways don't have it), and a change of them triggers
//!   "reconcile all" and a gateway poll;
//! - connectors the render left out for room (ConfigTooLarge) are logged once per change,
//!   naming the ConfigMap or the material Secret whose limit left them out;
//! - the applied Secret never exceeds the API server's 1 MiB: the previous round's material is
//!   kept only while it fits with this one.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ObjectMeta, PartialObjectMeta, Patch, PatchParams};
use partnergate_crds::PartnerConnector;
use serde_json::json;
use time::OffsetDateTime;

use super::{
    CONNECTORS_KEY, Context, Error, FIELD_MANAGER, HASH_ANNOTATION, RenderState, store_ready,
    uid_gen,
};
use crate::render;

fn fingerprint(connectors: &[Arc<PartnerConnector>]) -> Vec<(String, String, i64)> {
    let mut fp: Vec<_> = connectors
        .iter()
        .map(|pc| {
            let (uid, gen_) = uid_gen(pc);
            (pc.key(), uid, gen_)
        })
        .collect();
    fp.sort();
    fp
}

pub(super) async fn render_loop(ctx: Arc<Context>) {
    for s in &ctx.stores {
        if !store_ready(s).await {
            tracing::error!("connector store writer dropped before the initial list");
            return;
        }
    }
    tracing::debug!("connector stores ready: render loop starts");
    let mut last_fp = None;
    let mut last_full: Option<Instant> = None;
    loop {
        let notified = tokio::time::timeout(Duration::from_secs(2), ctx.render_notify.notified())
            .await
            .is_ok();
        let fp = fingerprint(&ctx.connectors());
        ctx.metrics
            .retain_connectors(&fp.iter().map(|(key, _, _)| key.clone()).collect());
        let due = last_full.is_none_or(|t| t.elapsed() >= ctx.settings.resync);
        if !notified && !due && last_fp.as_ref() == Some(&fp) {
            continue;
        }
        // coalesce a burst of changes into one render
        tokio::time::sleep(ctx.settings.debounce).await;
        if due {
            ctx.references.clear();
            last_full = Some(Instant::now());
        }
        let started = Instant::now();
        tracing::debug!(notified, due, "rendering");
        let result = render_once(&ctx).await;
        ctx.metrics
            .render_duration
            .observe(started.elapsed().as_secs_f64());
        let label = match &result {
            Ok(true) => "applied",
            Ok(false) => "unchanged",
            Err(_) => "error",
        };
        ctx.metrics
            .renders
            .get_or_create(&crate::metrics::ResultLabel {
                result: label.into(),
            })
            .inc();
        match result {
            Ok(_) => last_fp = Some(fingerprint(&ctx.connectors())),
            Err(e) => {
                tracing::warn!(error = %e, "render failed; retrying");
                last_fp = None;
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

/// Renders, applies when needed, publishes. Ok(true) when something was written.
async fn render_once(ctx: &Context) -> Result<bool, Error> {
    let connectors = ctx.connectors();
    let objects = ctx.references.read(&ctx.client, &connectors).await?;

    let rendered = render::render(&connectors, &objects, OffsetDateTime::now_utc());
    ctx.metrics
        .connectors_rendered
        .set(rendered.outcomes.values().filter(|o| o.included).count() as i64);
    let applied = apply_rendered(ctx, &rendered).await;

    // Publish outcomes even when the apply failed: Accepted/ResolvedRefs are still right and
    // Programmed will say the gateways don't have it.
    let state = RenderState {
        hash: rendered.hash.clone(),
        seen: connectors
            .iter()
            .map(|pc| (pc.key(), uid_gen(pc)))
            .collect(),
        outcomes: rendered.outcomes,
    };
    let changed = {
        let prev = ctx.render_state();
        warn_left_out(ctx, &prev.outcomes, &state.outcomes, &rendered.over_limit);
        prev.hash != state.hash || prev.seen != state.seen || prev.outcomes != state.outcomes
    };
    if let Ok(mut g) = ctx.render_state.write() {
        *g = Arc::new(state);
    }
    if changed {
        ctx.bump();
        ctx.poll_notify.notify_one();
    }
    applied
}

/// Says, once per change of the set, that connectors were left out because the connectors
/// file would not fit its ConfigMap or the material its Secret, naming the object: the API
/// server's 1 MiB limits are not settings of ours, so the way out is fewer (or smaller)
/// connectors or certificates.
fn warn_left_out(
    ctx: &Context,
    prev: &BTreeMap<String, render::Outcome>,
    now: &BTreeMap<String, render::Outcome>,
    over_limit: &[render::Limit],
) {
    let left = |o: &BTreeMap<String, render::Outcome>| -> Vec<String> {
        o.iter()
            .filter(|(_, o)| o.left_out.is_some())
            .map(|(k, _)| k.clone())
            .collect()
    };
    let (before, after) = (left(prev), left(now));
    if before == after {
        return;
    }
    let s = &ctx.settings;
    if !after.is_empty() {
        let first_of = |limit: render::Limit| {
            after.iter().find_map(|k| {
                let m = now.get(k)?.left_out.as_ref()?;
                let material = m.starts_with(render::MATERIAL_LEFT_OUT);
                (material == (limit == render::Limit::Material)).then_some((k.as_str(), m.as_str()))
            })
        };
        // Each line counts the connectors its own limit left out.
        let left_out_by = |limit: render::Limit| {
            after
                .iter()
                .filter(|k| {
                    now.get(*k)
                        .and_then(|o| o.left_out.as_ref())
                        .is_some_and(|m| {
                            m.starts_with(render::MATERIAL_LEFT_OUT)
                                == (limit == render::Limit::Material)
                        })
                })
                .count()
        };
        for limit in over_limit {
            let Some((first, message)) = first_of(*limit) else {
                continue;
            };
            match limit {
                render::Limit::ConnectorsFile => tracing::warn!(
                    left_out = left_out_by(render::Limit::ConnectorsFile),
                    configmap = %format!("{}/{}", s.gateway_namespace, s.connectors_configmap),
                    limit_bytes = render::MAX_CONNECTORS_FILE_BYTES,
                    first,
                    message,
                    "connectors left out of the gateway config: the connectors file would \
                     exceed the ConfigMap size limit (Programmed=False, reason ConfigTooLarge)"
                ),
                render::Limit::Material => tracing::warn!(
                    left_out = left_out_by(render::Limit::Material),
                    secret = %format!("{}/{}", s.gateway_namespace, s.material_secret),
                    limit_bytes = render::MAX_MATERIAL_BYTES,
                    first,
                    message,
                    "connectors left out of the gateway config: their TLS material would exceed \
                     the size limit of the material Secret (Programmed=False, reason \
                     ConfigTooLarge)"
                ),
            }
        }
    } else {
        tracing::info!(
            configmap = %format!("{}/{}", s.gateway_namespace, s.connectors_configmap),
            secret = %format!("{}/{}", s.gateway_namespace, s.material_secret),
            "every accepted connector fits the connectors file and the material Secret again"
        );
    }
}

fn rendered_labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "partnergate".to_string(),
        ),
        (
            "app.kubernetes.io/managed-by".to_string(),
            FIELD_MANAGER.to_string(),
        ),
    ])
}

/// Applies Secret then ConfigMap when the live ConfigMap's hash annotation differs.
async fn apply_rendered(ctx: &Context, rendered: &render::Rendered) -> Result<bool, Error> {
    let s = &ctx.settings;
    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &s.gateway_namespace);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &s.gateway_namespace);
    // metadata only: the hash annotation is all that is compared, and the data is up to 1 MiB
    let live_cm = cms.get_metadata_opt(&s.connectors_configmap).await?;
    let live_secret = secrets.get_metadata_opt(&s.material_secret).await?;
    let live_hash = |meta: Option<&ObjectMeta>| {
        meta.and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get(HASH_ANNOTATION))
            .cloned()
    };
    let cm_hash = live_hash(
        live_cm
            .as_ref()
            .map(|m: &PartialObjectMeta<ConfigMap>| &m.metadata),
    );
    let secret_hash = live_hash(
        live_secret
            .as_ref()
            .map(|m: &PartialObjectMeta<Secret>| &m.metadata),
    );
    if cm_hash.as_deref() == Some(&rendered.hash) && secret_hash.as_deref() == Some(&rendered.hash)
    {
        if let Ok(mut p) = ctx.previous_material.lock() {
            p.clone_from(&rendered.material);
        }
        return Ok(false);
    }

    let annotations = BTreeMap::from([(HASH_ANNOTATION.to_string(), rendered.hash.clone())]);
    let material = {
        let previous = ctx
            .previous_material
            .lock()
            .map(|p| p.clone())
            .unwrap_or_default();
        let (material, kept_previous) = material_to_apply(&previous, &rendered.material);
        if !kept_previous {
            tracing::warn!(
                secret = %format!("{}/{}", s.gateway_namespace, s.material_secret),
                limit_bytes = render::SECRET_DATA_LIMIT,
                "the previous round's material does not fit the material Secret with this one: \
                 applying this round's alone (a gateway still loading the previous config may \
                 miss files and keep its current one until it loads this)"
            );
        }
        material
    };
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(s.material_secret.clone()),
            namespace: Some(s.gateway_namespace.clone()),
            labels: Some(rendered_labels()),
            annotations: Some(annotations.clone()),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(
            material
                .into_iter()
                .map(|(k, v)| (k, k8s_openapi::ByteString(v)))
                .collect(),
        ),
        ..Secret::default()
    };
    let mut secret_json = serde_json::to_value(&secret)?;
    secret_json["apiVersion"] = json!("v1");
    secret_json["kind"] = json!("Secret");
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    secrets
        .patch(&s.material_secret, &pp, &Patch::Apply(&secret_json))
        .await?;

    let json_text = String::from_utf8_lossy(&rendered.connectors_json).into_owned();
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(s.connectors_configmap.clone()),
            namespace: Some(s.gateway_namespace.clone()),
            labels: Some(rendered_labels()),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(CONNECTORS_KEY.to_string(), json_text)])),
        ..ConfigMap::default()
    };
    let mut cm_json = serde_json::to_value(&cm)?;
    cm_json["apiVersion"] = json!("v1");
    cm_json["kind"] = json!("ConfigMap");
    cms.patch(&s.connectors_configmap, &pp, &Patch::Apply(&cm_json))
        .await?;
    ctx.metrics.config_applies.inc();
    if let Ok(mut p) = ctx.previous_material.lock() {
        p.clone_from(&rendered.material);
    }
    tracing::info!(config_hash = %rendered.hash, configmap = %s.connectors_configmap, secret = %s.material_secret, "applied rendered gateway config");
    Ok(true)
}

/// The material to apply: this render's files plus the previous round's, so a gateway still
/// loading the previous config finds its files, as long as the two fit one Secret; past the
/// limit this render's alone (the render kept it within the limit). The flag says whether the
/// previous round's files were kept.
fn material_to_apply(
    previous: &BTreeMap<String, Vec<u8>>,
    current: &BTreeMap<String, Vec<u8>>,
) -> (BTreeMap<String, Vec<u8>>, bool) {
    let mut both = previous.clone();
    both.extend(current.iter().map(|(k, v)| (k.clone(), v.clone())));
    if render::data_size(&both) <= render::SECRET_DATA_LIMIT {
        (both, true)
    } else {
        (current.clone(), false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(names: &[&str], size: usize) -> BTreeMap<String, Vec<u8>> {
        names
            .iter()
            .map(|n| (n.to_string(), vec![b'x'; size]))
            .collect()
    }

    #[test]
    fn the_previous_material_is_kept_one_round_while_both_fit_one_secret() {
        let previous = files(&["a.pem", "b.pem"], 1000);
        let current = files(&["b.pem", "c.pem"], 1000);
        let (m, kept) = material_to_apply(&previous, &current);
        assert!(kept);
        assert_eq!(m.keys().collect::<Vec<_>>(), ["a.pem", "b.pem", "c.pem"]);
    }

    #[test]
    fn past_the_secret_limit_only_this_rounds_material_is_applied() {
        // each half of the limit: together they would be refused by the API server
        let half = render::SECRET_DATA_LIMIT / 2;
        let previous = files(&["a.pem"], half);
        let current = files(&["c.pem"], half);
        let (m, kept) = material_to_apply(&previous, &current);
        assert!(!kept);
        assert_eq!(m, current);
        assert!(render::data_size(&m) <= render::SECRET_DATA_LIMIT);
    }
}
