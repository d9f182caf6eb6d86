//! Integration test against a REAL kube-apiserver (tests/cluster/up.sh).
//!
//! It needs a cluster; run it with
//!
//!     tests/cluster/up.sh
//!     PARTNERGATE_KUBECONFIG=/tmp/partnergate-cluster/kubeconfig \
//!         cargo test -p partnergate-operator --features apiserver-tests --test apiserver -- --nocapture
//!
//! Built only with the `apiserver-tests` feature (`make operator-apiserver-test` starts the
//! control plane and runs it; `make test` includes that). Without PARTNERGATE_KUBECONFIG it FAILS (it never skips silently).
//!
//! It installs the CRD, checks that invalid specs are refused at apply with the field named,
//! runs the operator's controllers in-process against the apiserver, and plays the gateway
//! fleet with a fake `/status` server on 127.0.0.1 plus a Pod object (Ready, podIP 127.0.0.1)
//! registered through the status subresource.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use partnergate_crds::PartnerConnector;
use partnergate_operator::controller::{self, Settings};
use partnergate_operator::metrics::Metrics;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

type R<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

async fn client() -> R<Client> {
    let path = std::env::var("PARTNERGATE_KUBECONFIG").map_err(|_| {
        "PARTNERGATE_KUBECONFIG is not set: start tests/cluster/up.sh and point it at the kubeconfig"
    })?;
    let kc = Kubeconfig::read_from(&path)?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(cfg)?)
}

fn suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{:x}{:x}", std::process::id(), nanos % 0xffff)
}

async fn install_crd(client: &Client) -> R<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut crd = serde_json::to_value(partnergate_crds::crd())?;
    crd["apiVersion"] = json!("apiextensions.k8s.io/v1");
    crd["kind"] = json!("CustomResourceDefinition");
    crds.patch(
        "partnerconnectors.partnergate.io",
        &PatchParams::apply("partnergate-test").force(),
        &Patch::Apply(&crd),
    )
    .await?;
    wait_for(Duration::from_secs(30), "CRD Established", || async {
        let c = crds.get("partnerconnectors.partnergate.io").await.ok()?;
        let established = c
            .status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        established.then_some(())
    })
    .await
}

async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> R<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn create_ns(client: &Client, name: &str) -> R<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    api.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": name}}))?,
    )
    .await?;
    Ok(())
}

fn pc_json(ns: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "partnergate.io/v1alpha1",
        "kind": "PartnerConnector",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    })
}

async fn apply_pc(
    api: &Api<PartnerConnector>,
    ns: &str,
    name: &str,
    spec: Value,
) -> Result<PartnerConnector, kube::Error> {
    api.patch(
        name,
        &PatchParams::apply("partnergate-test").force(),
        &Patch::Apply(&pc_json(ns, name, spec)),
    )
    .await
}

fn condition(pc: &PartnerConnector, type_: &str) -> Option<(String, String)> {
    pc.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

async fn wait_condition(
    api: &Api<PartnerConnector>,
    name: &str,
    type_: &str,
    status: &str,
    reason: &str,
) -> R<PartnerConnector> {
    let what = format!("{name} {type_}={status}/{reason}");
    let last = std::sync::Mutex::new(None);
    let r = wait_for(Duration::from_secs(60), &what, || async {
        let pc = api.get(name).await.ok()?;
        if let Ok(mut l) = last.lock() {
            *l = condition(&pc, type_);
        }
        let gen_ok = pc.status.as_ref()?.observed_generation == pc.metadata.generation;
        (gen_ok && condition(&pc, type_) == Some((status.to_string(), reason.to_string())))
            .then_some(pc)
    })
    .await;
    let last = last.lock().map(|l| l.clone()).unwrap_or_default();
    r.map_err(|e| format!("{e} (last seen {last:?})").into())
}

fn self_signed_ca(cn: &str) -> R<String> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    Ok(params.self_signed(&key)?.pem())
}

async fn apply_secret(
    client: &Client,
    ns: &str,
    name: &str,
    data: BTreeMap<&str, String>,
) -> R<()> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let body = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": ns},
        "stringData": data,
    });
    api.patch(
        name,
        &PatchParams::apply("partnergate-test").force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

async fn connectors_json(client: &Client, ns: &str) -> Option<Value> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let cm = api.get_opt("partnergate-connectors").await.ok()??;
    serde_json::from_str(cm.data?.get("connectors.json")?).ok()
}

fn names(file: &Value) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for dir in ["inbound", "outbound"] {
        for c in file[dir].as_array().into_iter().flatten() {
            out.push((
                c["name"].as_str().unwrap_or_default().to_string(),
                c["generation"].as_i64().unwrap_or(0),
            ));
        }
    }
    out
}

/// A fake gateway admin port: /status lists what the rendered ConfigMap holds (as a gateway
/// that has loaded it would).
async fn fake_gateway(client: Client, gw_ns: String) -> R<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let client = client.clone();
            let gw_ns = gw_ns.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let _ = tcp.read(&mut buf).await;
                let file = connectors_json(&client, &gw_ns).await.unwrap_or(json!({}));
                let connectors: Vec<Value> = names(&file)
                    .into_iter()
                    .map(|(n, g)| json!({"name": n, "direction": "Inbound", "generation": g}))
                    .collect();
                let body = json!({"configHash": "fake", "connectors": connectors, "certificates": [], "validation": []}).to_string();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.write_all(resp.as_bytes()).await;
            });
        }
    });
    Ok(port)
}

async fn register_ready_pod(
    client: &Client,
    ns: &str,
    node: &str,
    name: &str,
    label: &str,
) -> R<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    if nodes.get_opt(node).await?.is_none() {
        nodes
            .create(
                &PostParams::default(),
                &serde_json::from_value(
                    json!({"metadata": {"name": node, "labels": {"partnergate.io/fake": "true"}}}),
                )?,
            )
            .await?;
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"app": label}},
            "spec": {"nodeName": node, "containers": [{"name": "gateway", "image": "partnergate-gateway:test"}]},
        }))?,
    )
    .await?;
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let status = json!({"status": {
        "phase": "Running",
        "podIP": "127.0.0.1",
        "podIPs": [{"ip": "127.0.0.1"}],
        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}],
    }});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

#[tokio::test]
async fn operator_against_real_apiserver() -> R<()> {
    let client = client().await?;
    install_crd(&client).await?;
    let sfx = suffix();
    let ns = format!("pgt-{sfx}");
    let gw_ns = format!("pgt-{sfx}-gw");
    create_ns(&client, &ns).await?;
    create_ns(&client, &gw_ns).await?;
    let result = scenario(&client, &ns, &gw_ns, &sfx).await;
    // clean up whatever happened
    let nsapi: Api<Namespace> = Api::all(client.clone());
    for n in [&ns, &gw_ns] {
        let _ = nsapi.delete(n, &DeleteParams::default()).await;
    }
    let _ = Api::<Node>::all(client.clone())
        .delete(&format!("pgt-node-{sfx}"), &DeleteParams::default())
        .await;
    result
}

async fn scenario(client: &Client, ns: &str, gw_ns: &str, sfx: &str) -> R<()> {
    let pcs: Api<PartnerConnector> = Api::namespaced(client.clone(), ns);

    // ---- refused at apply, with the field named -------------------------------------------
    let invalid: Vec<(&str, Value, &str)> = vec![
        (
            "no-inbound",
            json!({"direction": "Inbound", "domains": ["a.com"]}),
            "spec.inbound",
        ),
        (
            "outbound-on-inbound",
            json!({"direction": "Inbound", "domains": ["a.com"], "inbound": {}, "outbound": {"useMX": true}}),
            "spec.outbound",
        ),
        (
            "senderip-no-ranges",
            json!({"direction": "Inbound", "domains": ["a.com"], "inbound": {"identifyBy": "SenderIP"}}),
            "senderIPRanges",
        ),
        (
            "restrict-ip-no-ranges",
            json!({"direction": "Inbound", "domains": ["a.com"], "inbound": {"restrictToIPRanges": true}}),
            "senderIPRanges",
        ),
        (
            "cert-no-subject",
            json!({"direction": "Inbound", "domains": ["a.com"], "inbound": {"identifyBy": "Certificate"}}),
            "certificate.subjectName",
        ),
        (
            "restrict-cert-no-subject",
            json!({"direction": "Inbound", "domains": ["a.com"], "inbound": {"restrictToCertificate": true}}),
            "certificate.subjectName",
        ),
        (
            "bad-cidr",
            json!({"direction": "Inbound", "domains": ["a.com"], "inbound": {"identifyBy": "SenderIP", "senderIPRanges": ["10.0.0.0/33"]}}),
            "senderIPRanges",
        ),
        (
            "bad-domain",
            json!({"direction": "Inbound", "domains": ["a_b.com"], "inbound": {}}),
            "spec.domains",
        ),
        (
            "empty-domains",
            json!({"direction": "Inbound", "domains": [], "inbound": {}}),
            "spec.domains",
        ),
        (
            "no-route",
            json!({"direction": "Outbound", "domains": ["f.com"], "outbound": {}}),
            "smartHosts",
        ),
        (
            "tlsdomain-level",
            json!({"direction": "Outbound", "domains": ["f.com"], "outbound": {"smartHosts": ["smtp.f.com"], "tls": "EncryptionOnly", "tlsDomain": "f.com"}}),
            "tlsDomain",
        ),
        (
            "bad-smarthost",
            json!({"direction": "Outbound", "domains": ["f.com"], "outbound": {"smartHosts": ["[nope]:25"]}}),
            "smartHosts",
        ),
        (
            "bad-direction",
            json!({"direction": "Sideways", "domains": ["f.com"]}),
            "spec.direction",
        ),
    ];
    for (name, spec, field) in &invalid {
        match apply_pc(&pcs, ns, name, spec.clone()).await {
            Ok(_) => {
                return Err(format!("{name}: accepted, expected a refusal naming {field}").into());
            }
            Err(kube::Error::Api(s)) => {
                if !s.message.contains(field) {
                    return Err(
                        format!("{name}: refusal does not name {field}: {}", s.message).into(),
                    );
                }
                eprintln!("refused {name}: {}", s.message);
            }
            Err(e) => return Err(format!("{name}: {e}").into()),
        }
    }

    // ---- the operator, in-process ----------------------------------------------------------
    let label = format!("pgt-gw-{sfx}");
    let port = fake_gateway(client.clone(), gw_ns.to_string()).await?;
    let settings = Settings {
        gateway_namespace: gw_ns.to_string(),
        gateway_selector: format!("app={label}"),
        gateway_admin_port: port,
        connectors_configmap: "partnergate-connectors".into(),
        material_secret: "partnergate-connector-material".into(),
        server_certificate_secret: String::new(),
        watch_namespaces: vec![ns.to_string()],
        poll_interval: Duration::from_secs(1),
        debounce: Duration::from_millis(100),
        resync: Duration::from_secs(60),
        instance: Some("test".into()),
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let op = tokio::spawn(controller::run(
        client.clone(),
        settings,
        Metrics::new(),
        async move {
            let _ = stop_rx.await;
        },
    ));

    // ---- a valid connector: missing Secret, then resolved ---------------------------------
    let contoso = json!({"direction": "Inbound", "domains": ["contoso.com"], "inbound": {
        "identifyBy": "Certificate", "restrictToCertificate": true,
        "certificate": {"subjectName": "mail.contoso.com", "trustBundle": {"secretRef": {"name": "contoso-ca"}}}}});
    apply_pc(&pcs, ns, "contoso", contoso.clone()).await?;
    let pc = wait_condition(&pcs, "contoso", "ResolvedRefs", "False", "SecretNotFound").await?;
    assert_eq!(
        condition(&pc, "Accepted"),
        Some(("True".into(), "Accepted".into()))
    );
    assert_eq!(condition(&pc, "Ready").map(|c| c.0), Some("False".into()));

    let ca1 = self_signed_ca("Contoso CA 1")?;
    apply_secret(
        client,
        ns,
        "contoso-ca",
        BTreeMap::from([("ca.crt", ca1.clone())]),
    )
    .await?;
    let pc = wait_condition(&pcs, "contoso", "ResolvedRefs", "True", "ResolvedRefs").await?;
    let certs = &pc.status.as_ref().ok_or("status")?.certificates;
    assert_eq!(certs.len(), 1);
    assert_eq!(certs[0].subject, "CN=Contoso CA 1");
    assert_eq!(certs[0].secret, "contoso-ca");
    let contoso_key = format!("{ns}/contoso");
    let file = wait_for(
        Duration::from_secs(30),
        "contoso in the ConfigMap",
        || async {
            let f = connectors_json(client, gw_ns).await?;
            names(&f)
                .iter()
                .any(|(n, _)| *n == contoso_key)
                .then_some(f)
        },
    )
    .await?;
    let pem1 = file["inbound"][0]["certificate"]["trustBundleFile"]
        .as_str()
        .ok_or("trustBundleFile")?
        .to_string();
    let material: Api<Secret> = Api::namespaced(client.clone(), gw_ns);
    let m = material.get("partnergate-connector-material").await?;
    assert!(
        m.data.as_ref().is_some_and(|d| d.contains_key(&pem1)),
        "material holds {pem1}"
    );

    // ---- no gateways yet: NoGateways; then a ready pod that reports the config: Ready -----
    wait_condition(&pcs, "contoso", "Programmed", "False", "NoGateways").await?;
    register_ready_pod(
        client,
        gw_ns,
        &format!("pgt-node-{sfx}"),
        "gateway-0",
        &label,
    )
    .await?;
    let pc = wait_condition(&pcs, "contoso", "Ready", "True", "Ready").await?;
    let gws = pc
        .status
        .as_ref()
        .and_then(|s| s.gateways.clone())
        .ok_or("gateways")?;
    assert_eq!((gws.ready, gws.programmed), (1, 1));

    // ---- Secret rotation re-renders with the new content -----------------------------------
    let ca2 = self_signed_ca("Contoso CA 2")?;
    apply_secret(client, ns, "contoso-ca", BTreeMap::from([("ca.crt", ca2)])).await?;
    wait_for(
        Duration::from_secs(30),
        "rotated trust bundle rendered",
        || async {
            let f = connectors_json(client, gw_ns).await?;
            let p = f["inbound"][0]["certificate"]["trustBundleFile"]
                .as_str()?
                .to_string();
            (p != pem1).then_some(())
        },
    )
    .await?;
    wait_for(
        Duration::from_secs(30),
        "status lists the new CA",
        || async {
            let pc = pcs.get("contoso").await.ok()?;
            (pc.status?.certificates.first()?.subject == "CN=Contoso CA 2").then_some(())
        },
    )
    .await?;

    // ---- a spec change: generation 2 becomes Ready again -----------------------------------
    let mut contoso2 = contoso.clone();
    contoso2["inbound"]["minTlsVersion"] = json!("1.3");
    apply_pc(&pcs, ns, "contoso", contoso2).await?;
    let pc = wait_condition(&pcs, "contoso", "Ready", "True", "Ready").await?;
    assert_eq!(pc.metadata.generation, Some(2));

    // ---- a younger connector claiming the same certificate is Conflicted -------------------
    tokio::time::sleep(Duration::from_millis(1100)).await; // distinct creationTimestamp
    apply_pc(
        &pcs,
        ns,
        "contoso-copy",
        json!({"direction": "Inbound", "domains": ["contoso.com"], "inbound": {
        "identifyBy": "Certificate", "certificate": {"subjectName": "mail.contoso.com"}}}),
    )
    .await?;
    let pc = wait_condition(&pcs, "contoso-copy", "Accepted", "False", "Conflicted").await?;
    let msg = pc
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Accepted"))
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(msg.contains(&contoso_key), "{msg}");
    wait_condition(&pcs, "contoso", "Ready", "True", "Ready").await?;

    // ---- a disabled connector is left out ---------------------------------------------------
    apply_pc(
        &pcs,
        ns,
        "fabrikam",
        json!({"enabled": false, "direction": "Outbound", "domains": ["fabrikam.com"],
        "outbound": {"smartHosts": ["smtp.fabrikam.com:25"]}}),
    )
    .await?;
    wait_condition(&pcs, "fabrikam", "Accepted", "False", "Disabled").await?;

    // ---- deleting the winner: the copy takes over; deleting removes it from the config ------
    pcs.delete("contoso", &DeleteParams::default()).await?;
    wait_condition(&pcs, "contoso-copy", "Ready", "True", "Ready").await?;
    wait_for(
        Duration::from_secs(30),
        "contoso gone from the ConfigMap",
        || async {
            let f = connectors_json(client, gw_ns).await?;
            (!names(&f).iter().any(|(n, _)| *n == contoso_key)).then_some(())
        },
    )
    .await?;

    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), op).await;
    Ok(())
}
