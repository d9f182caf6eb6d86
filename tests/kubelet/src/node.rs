//! Node registration, Node status heartbeat and the node Lease in `kube-node-lease`.

use std::time::Duration;

use anyhow::Context as _;
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;
use tracing::{info, warn};

use crate::Ctx;

const LEASE_NS: &str = "kube-node-lease";
const LEASE_SECONDS: i32 = 40;

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn os_image() -> String {
    let text = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| "Linux".to_string())
}

fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn now() -> String {
    Timestamp::now().to_string()
}

fn node_status(ctx: &Ctx, transition: &str) -> serde_json::Value {
    let resources =
        json!({"cpu": "16", "memory": "64Gi", "pods": "110", "ephemeral-storage": "100Gi"});
    let cond = |type_: &str, status: &str, reason: &str, message: &str| {
        json!({
            "type": type_, "status": status, "reason": reason, "message": message,
            "lastHeartbeatTime": now(), "lastTransitionTime": transition,
        })
    };
    json!({
        "status": {
            "capacity": resources,
            "allocatable": resources,
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                cond("Ready", "True", "KubeletReady", "process-kubelet is posting ready status (pods run as local processes on 127.0.0.0/8)"),
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": ctx.args.node_name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": ctx.args.port}},
            "nodeInfo": {
                "machineID": read_trim("/etc/machine-id"),
                "systemUUID": read_trim("/etc/machine-id"),
                "bootID": read_trim("/proc/sys/kernel/random/boot_id"),
                "kernelVersion": read_trim("/proc/sys/kernel/osrelease"),
                "osImage": os_image(),
                "containerRuntimeVersion": "process://partnergate-kubelet",
                "kubeletVersion": ctx.kube_version,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": arch(),
            },
        }
    })
}

/// Creates the Node (or adopts an existing one of the same name) and posts its status.
pub async fn register(ctx: &Ctx) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let name = &ctx.args.node_name;
    let labels = json!({
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": arch(),
        "partnergate.io/process-kubelet": "true",
    });
    match nodes.get_opt(name).await.context("get node")? {
        Some(_) => {
            info!(node = %name, "node exists; adopting it");
            nodes
                .patch(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(
                        json!({"metadata": {"labels": labels}, "spec": {"unschedulable": false}}),
                    ),
                )
                .await
                .context("patch node")?;
        }
        None => {
            let node: Node = serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {
                    "name": name,
                    "labels": labels,
                    "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
                },
                "spec": {},
            }))
            .context("build node")?;
            nodes
                .create(&PostParams::default(), &node)
                .await
                .context("create node")?;
            info!(node = %name, "node registered");
        }
    }
    let transition = now();
    nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(node_status(ctx, &transition)),
        )
        .await
        .context("post node status")?;
    renew_lease(ctx).await.context("node lease")?;
    Ok(())
}

async fn renew_lease(ctx: &Ctx) -> anyhow::Result<()> {
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), LEASE_NS);
    let name = &ctx.args.node_name;
    let renew = k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(Timestamp::now());
    let renew = serde_json::to_value(&renew).context("serialize time")?;
    if leases.get_opt(name).await?.is_some() {
        leases
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"holderIdentity": name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": renew}})),
            )
            .await?;
    } else {
        let nodes: Api<Node> = Api::all(ctx.client.clone());
        let uid = nodes.get(name).await?.metadata.uid.unwrap_or_default();
        let lease: Lease = serde_json::from_value(json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {
                "name": name, "namespace": LEASE_NS,
                "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": name, "uid": uid}],
            },
            "spec": {"holderIdentity": name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": renew},
        }))?;
        leases.create(&PostParams::default(), &lease).await?;
    }
    Ok(())
}

/// Renews the Lease every 10 s and refreshes the Node conditions every 20 s.
pub async fn heartbeat_loop(ctx: std::sync::Arc<Ctx>) {
    let transition = now();
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let mut tick = 0u64;
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        tick += 1;
        if let Err(e) = renew_lease(&ctx).await {
            warn!(error = %e, "lease renewal failed");
        }
        if tick.is_multiple_of(2) {
            let r = nodes
                .patch_status(
                    &ctx.args.node_name,
                    &PatchParams::default(),
                    &Patch::Merge(node_status(&ctx, &transition)),
                )
                .await;
            match r {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    warn!("node object disappeared: registering it again");
                    if let Err(e) = register(&ctx).await {
                        warn!(error = %e, "node re-registration failed");
                    }
                }
                Err(e) => warn!(error = %e, "node status update failed"),
            }
        }
    }
}
