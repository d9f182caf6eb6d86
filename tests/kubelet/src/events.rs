//! core/v1 Events about Pods, reported as component "kubelet" like the real kubelet does.

use k8s_openapi::api::core::v1::{Event, Pod};
use kube::Api;
use kube::api::PostParams;
use serde_json::json;
use tracing::{debug, warn};

use crate::Ctx;

pub async fn emit(
    ctx: &Ctx,
    pod: &Pod,
    container: Option<&str>,
    type_: &str,
    reason: &str,
    message: &str,
) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let now = jiff::Timestamp::now().to_string();
    let mut involved = json!({
        "apiVersion": "v1", "kind": "Pod", "name": name, "namespace": ns,
        "uid": pod.metadata.uid, "resourceVersion": pod.metadata.resource_version,
    });
    if let Some(c) = container {
        involved["fieldPath"] = json!(format!("spec.containers{{{c}}}"));
    }
    let ev = json!({
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": format!("{name}."), "namespace": ns},
        "involvedObject": involved,
        "reason": reason,
        "message": message,
        "type": type_,
        "source": {"component": "kubelet", "host": ctx.args.node_name},
        "reportingComponent": "kubelet",
        "reportingInstance": ctx.args.node_name,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    });
    let ev: Event = match serde_json::from_value(ev) {
        Ok(e) => e,
        Err(e) => {
            warn!(error = %e, "cannot build event");
            return;
        }
    };
    let api: Api<Event> = Api::namespaced(ctx.client.clone(), &ns);
    match api.create(&PostParams::default(), &ev).await {
        Ok(_) => debug!(pod = %name, reason, "event"),
        Err(e) => warn!(pod = %name, reason, error = %e, "cannot create event"),
    }
}
