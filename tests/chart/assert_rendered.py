#!/usr/bin/env python3
"""Assertions on `helm template` output of charts/partnergate (run by tests/chart/test.sh).

    assert_rendered.py DIR

DIR holds the renders made by test.sh (release "partnergate", namespace "partnergate"):
default.yaml, max.yaml (tests/chart/values-max.yaml), hostname.yaml (default + another
settings.hostname), replicas.yaml (default + other operator replicas), monitoring.yaml (default +
PrometheusRule and Grafana dashboard enabled), and optionally crd-src.yaml
(crds/partnerconnector.yaml) and gateway-bin (path of a partnergate-gateway binary to run
`check` with). Prints one line per check group; exits 1 on the first failure.
"""

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

NS = "partnergate"
HERE = Path(__file__).resolve().parent
FLEET_FIELDS = {  # core/src/config.rs FleetSettings (serde camelCase names)
    "listen", "adminListen", "hostname", "serverCertificate", "acceptedDomains",
    "internalSenders", "upstream", "defaultInbound", "materialDir", "limits", "timeouts",
    "trustedProxies", "allowPrivateMxAddresses", "validationIntervalSecs", "tlsPolicy",
    "unclaimedSenderAuthentication",
}
NESTED_FIELDS = {
    "serverCertificate": {"certFile", "keyFile"},
    "internalSenders": {"ipRanges", "certificateNames", "trustBundleFile"},
    "upstream": {"host", "port", "tls", "tlsDomain", "trustBundleFile", "clientCertificate"},
    "limits": {"maxMessageSize", "maxRecipients", "maxConnections", "maxConnectionsPerIp",
               "maxCommandLine", "maxTextLine", "maxErrors", "reservedConnectionsPercent",
               "stressPercent", "ipv6PrefixLength", "maxHeaderSize"},
    "tlsPolicy": {"dnssecTrustAnchorFile", "mtaStsRootsFile", "mtaStsMaxPolicyBytes",
                  "mtaStsFetchTimeoutSecs"},
    "timeouts": {"commandSecs", "dataSecs", "tlsHandshakeSecs", "nextHopSecs",
                 "nextHopDataEndSecs", "shutdownGraceSecs", "stressCommandSecs", "shedAfterSecs"},
}


class Fail(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Fail(msg)


def load(path):
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    for d in docs:
        check({"apiVersion", "kind", "metadata"} <= d.keys(), f"{path}: object without apiVersion/kind/metadata: {d}")
    return docs


def get(docs, kind, name=None, namespace=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
             and (namespace is None or d["metadata"].get("namespace") == namespace)]
    check(len(found) == 1, f"expected one {kind} {name or ''} (namespace {namespace}), found {len(found)}")
    return found[0]


def kinds(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def check_pod_security(where, pod, want_token):
    spec = pod["spec"]
    check(spec.get("automountServiceAccountToken") is want_token,
          f"{where}: automountServiceAccountToken must be {want_token}")
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        check(not spec.get(key), f"{where}: {key} set")
    psc = spec.get("securityContext", {})
    check(psc.get("runAsNonRoot") is True, f"{where}: pod runAsNonRoot")
    check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{where}: pod seccomp RuntimeDefault")
    for c in spec.get("initContainers", []) + spec["containers"]:
        sc = c.get("securityContext", {})
        cw = f"{where} container {c['name']}"
        check(sc.get("runAsNonRoot") is True, f"{cw}: runAsNonRoot")
        check(sc.get("runAsUser", 1) != 0, f"{cw}: runs as uid 0")
        check(sc.get("readOnlyRootFilesystem") is True, f"{cw}: readOnlyRootFilesystem")
        check(sc.get("allowPrivilegeEscalation") is False, f"{cw}: allowPrivilegeEscalation")
        check(not sc.get("privileged"), f"{cw}: privileged")
        check(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{cw}: capabilities.drop [ALL]")
        check(not sc.get("capabilities", {}).get("add"), f"{cw}: capabilities added")
        check(sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{cw}: seccomp RuntimeDefault")
        check("/" not in c["image"].split("/")[0] and "." not in c["image"].split("/")[0]
              and ":" not in c["image"].split("/")[0], f"{cw}: image {c['image']} names a registry host")


def container(deploy, name):
    cs = [c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    check(len(cs) == 1, f"{deploy['metadata']['name']}: no container {name}")
    return cs[0]


def check_gateway(docs, label, smtp=2525, admin=8080, tls_secret="partnergate-gateway-tls"):
    d = get(docs, "Deployment", "partnergate-gateway")
    pod = d["spec"]["template"]
    check_pod_security(f"{label} gateway", pod, want_token=False)
    sa = get(docs, "ServiceAccount", pod["spec"]["serviceAccountName"])
    check(sa.get("automountServiceAccountToken") is False, f"{label}: gateway ServiceAccount automounts a token")
    for b in kinds(docs, "RoleBinding") + kinds(docs, "ClusterRoleBinding"):
        for s in b.get("subjects", []):
            check(s.get("name") != sa["metadata"]["name"], f"{label}: gateway ServiceAccount is bound to {b['metadata']['name']}")
    c = container(d, "gateway")
    check(c["command"] == ["/usr/local/bin/partnergate-gateway"], f"{label}: gateway command {c['command']}")
    check(c["args"] == ["--fleet", "/etc/partnergate/fleet/fleet.json",
                        "--connectors", "/etc/partnergate/connectors/connectors.json"], f"{label}: gateway args {c['args']}")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    check(ports == {"smtp": smtp, "admin": admin}, f"{label}: gateway ports {ports}")
    check(c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}, f"{label}: readiness probe")
    check(c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}, f"{label}: liveness probe")
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    for m in c["volumeMounts"]:
        check(m.get("readOnly") is True, f"{label}: mount {m['mountPath']} not readOnly")
    want = {
        "/etc/partnergate/fleet": ("configMap", "partnergate-gateway-fleet", None),
        "/etc/partnergate/connectors": ("configMap", "partnergate-connectors", None),
        "/etc/partnergate/material": ("secret", "partnergate-connector-material", True),
        "/etc/partnergate/tls": ("secret", tls_secret, None),
    }
    for path, (kind, name, optional) in want.items():
        check(path in mounts, f"{label}: nothing mounted at {path}")
        v = vols[mounts[path]]
        check(kind in v, f"{label}: {path} is not a {kind} volume")
        got = v[kind].get("name") or v[kind].get("secretName")
        check(got == name, f"{label}: {path} mounts {got}, want {name}")
        check(v[kind].get("optional") is optional, f"{label}: {path} optional={v[kind].get('optional')}, want {optional}")
    check("checksum/fleet" in pod["metadata"].get("annotations", {}), f"{label}: no checksum/fleet annotation")
    checks = [k for k in pod["metadata"].get("annotations", {}) if k.startswith("checksum/")]
    check(checks == ["checksum/fleet"], f"{label}: restart checksums {checks}: connectors must hot-reload")
    return d


def fleet_json(docs):
    cm = get(docs, "ConfigMap", "partnergate-gateway-fleet")
    fleet = json.loads(cm["data"]["fleet.json"])
    unknown = set(fleet) - FLEET_FIELDS
    check(not unknown, f"fleet.json: unknown fields {unknown} (deny_unknown_fields)")
    for k, allowed in NESTED_FIELDS.items():
        extra = set(fleet.get(k, {})) - allowed
        check(not extra, f"fleet.json: unknown fields {extra} in {k}")
    return cm["data"]["fleet.json"], fleet


def run_gateway_check(gateway_bin, fleet_text, label):
    """`partnergate-gateway check` on the rendered fleet.json, /etc/partnergate -> a temp dir."""
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        fleet = json.loads(fleet_text.replace("/etc/partnergate/", f"{tmp}/"))
        for d in ("tls", "material", "connectors", "upstream-ca", "upstream-client", "internal-senders-ca",
                  "dnssec-trust-anchor", "mta-sts-roots"):
            (t / d).mkdir()
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-nodes", "-days", "2", "-subj", "/CN=mx.example.com",
                        "-keyout", t / "tls/tls.key", "-out", t / "tls/tls.crt"], check=True, capture_output=True)
        for d in ("upstream-client",):
            for f in ("tls.key", "tls.crt"):
                (t / d / f).write_bytes((t / "tls" / f).read_bytes())
        for d in ("upstream-ca", "internal-senders-ca", "mta-sts-roots"):
            (t / d / "ca.crt").write_bytes((t / "tls/tls.crt").read_bytes())
        # A DNSKEY trust anchor (the root KSK-2017), as `partnergate-gateway check` parses it.
        (t / "dnssec-trust-anchor" / "ca.crt").write_text(
            ". 172800 IN DNSKEY 257 3 8 AwEAAaz/tAm8yTn4Mfeh5eyI96WSVexTBAvkMgJzkKTOiW1vkIbzxeF3"
            "+/4RgWOq7HrxRixHlFlExOLAJr5emLvN7SWXgnLh4+B5xQlNVz8Og8kvArMtNROxVQuCaSnIDdD5LKyWbRd2"
            "n9WGe2R8PzgCmr3EgVLrjyBxWezF0jLHwVN8efS3rCj/EWgvIWgb9tarpVUDK/b58Da+sqqls3eNbuv7pr+e"
            "oZG+SrDK6nWeL3c6H5Apxz7LjVc1uTIdsIXxuOLYA4/ilBmSVIzuDWfdRUfhHdY6+cn8HFRm+2hM8AnXGXws"
            "9555KrUB5qihylGa8subX2Nn6UwNR1AkUTV74bU=\n")
        (t / "fleet.json").write_text(json.dumps(fleet))
        (t / "connectors/connectors.json").write_text('{"inbound": [], "outbound": []}')
        r = subprocess.run([gateway_bin, "check", "--fleet", t / "fleet.json",
                            "--connectors", t / "connectors/connectors.json"], capture_output=True, text=True)
        check(r.returncode == 0, f"{label}: partnergate-gateway check refused the rendered fleet.json:\n{r.stdout}{r.stderr}")


def doc_anchors(path):
    """GitHub-style anchors of the Markdown headings in path."""
    anchors = set()
    for line in Path(path).read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^a-z0-9 _-]", "", title).replace(" ", "-"))
    return anchors


def check_monitoring(out, default, mx, mon):
    """PrometheusRule and dashboard ConfigMap: off by default, knobs applied, every alert with a
    runbook section and unit tests. Writes rules.yaml and dashboard.json for promtool and
    prometheus_e2e.py (run by test.sh)."""
    dash_cms = lambda docs: [d for d in kinds(docs, "ConfigMap") if d["metadata"]["name"] == "partnergate-dashboard"]  # noqa: E731
    check(not kinds(default, "PrometheusRule") and not dash_cms(default),
          "default: PrometheusRule or dashboard ConfigMap rendered although off by default")
    rule = get(mon, "PrometheusRule", "partnergate", namespace=NS)
    check(rule["apiVersion"] == "monitoring.coreos.com/v1", f"PrometheusRule apiVersion {rule['apiVersion']}")
    cms = dash_cms(mon)
    check(len(cms) == 1 and cms[0]["metadata"]["namespace"] == NS, "enabled: one dashboard ConfigMap in the release namespace")
    cm = cms[0]
    check(cm["metadata"]["labels"].get("grafana_dashboard") == "1", "dashboard ConfigMap lacks the sidecar label grafana_dashboard: \"1\"")
    check(list(cm["data"]) == ["partnergate.json"], f"dashboard ConfigMap keys {list(cm['data'])}")
    dash = json.loads(cm["data"]["partnergate.json"])
    shipped = json.loads((HERE.parent.parent / "charts/partnergate/dashboards/partnergate.json").read_text())
    check(dash == shipped, "the dashboard ConfigMap differs from charts/partnergate/dashboards/partnergate.json")
    names = [v["name"] for v in dash["templating"]["list"]]
    check({"namespace", "connector"} <= set(names), f"dashboard variables {names}: want namespace and connector")
    uses = json.dumps(dash["panels"])
    check("$namespace" in uses and "$connector" in uses, "panels do not use the namespace and connector variables")

    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
    anchors = doc_anchors(HERE.parent.parent / "docs/operations.md")
    tests = yaml.safe_load((HERE / "alerts-test.yaml").read_text())
    firing, quiet = set(), set()
    for t in tests["tests"]:
        for a in t.get("alert_rule_test", []):
            (firing if a.get("exp_alerts") else quiet).add(a["alertname"])
    for r in alerts:
        a = r["alert"]
        ann = r.get("annotations", {})
        check({"summary", "description", "runbook_url"} <= set(ann), f"alert {a}: annotations {sorted(ann)}")
        check(r["labels"].get("severity") in ("warning", "critical"), f"alert {a}: severity {r['labels'].get('severity')}")
        check(ann["runbook_url"] == f"docs/operations.md#{a.lower()}", f"alert {a}: runbook_url {ann['runbook_url']}")
        check(a.lower() in anchors, f"alert {a}: docs/operations.md has no section #{a.lower()}")
        check(a in firing and a in quiet, f"alert {a}: tests/chart/alerts-test.yaml needs a firing and a not-firing case")
    check(len({r["alert"] for r in alerts}) == len(alerts), "duplicate alert names")

    mrule = get(mx, "PrometheusRule", "partnergate", namespace="monitoring")
    check(mrule["metadata"]["labels"].get("release") == "prometheus", "max: PrometheusRule labels")
    for r in (r for g in mrule["spec"]["groups"] for r in g["rules"]):
        check(r["labels"].get("team") == "mail", f"max: alert {r['alert']} lacks alertLabels")
        check(r["annotations"]["runbook_url"] == f"https://mail-docs.example.com/partnergate/operations#{r['alert'].lower()}",
              f"max: alert {r['alert']} runbook_url {r['annotations']['runbook_url']}")
    mfor = {r["alert"]: r.get("for") for g in mrule["spec"]["groups"] for r in g["rules"]}
    dfor = {r["alert"]: r.get("for") for r in alerts}
    check(mfor["PartnergateConnectorNotReady"] == "30m" and dfor["PartnergateConnectorNotReady"] == "10m"
          and all(mfor[a] == dfor[a] for a in dfor if a != "PartnergateConnectorNotReady"),
          f"max: metrics.prometheusRule.for overrides only the alert it names: {mfor}")
    mcm = get(mx, "ConfigMap", "partnergate-dashboard", namespace="grafana")
    check(mcm["metadata"]["labels"].get("team") == "mail" and mcm["metadata"]["labels"].get("grafana_dashboard") == "1"
          and mcm["metadata"].get("annotations") == {"grafana_folder": "Mail"}, "max: dashboard ConfigMap labels/annotations")
    (out / "rules.yaml").write_text(yaml.safe_dump(rule["spec"], sort_keys=False))
    (out / "dashboard.json").write_text(cm["data"]["partnergate.json"])
    print(f"ok   PrometheusRule ({len(alerts)} alerts, each with a runbook section and firing/not-firing tests) "
          "and dashboard ConfigMap: off by default, knobs applied")


def normalize_rules(rules):
    out = []
    for r in rules:
        out.append({k: sorted(r[k]) for k in ("apiGroups", "resources", "verbs", "resourceNames") if k in r})
    return sorted(out, key=lambda r: json.dumps(r, sort_keys=True))


def check_rbac(docs, label, expected):
    for d in kinds(docs, "Role") + kinds(docs, "ClusterRole"):
        for r in d["rules"]:
            for k in ("verbs", "resources", "apiGroups", "resourceNames"):
                check("*" not in r.get(k, []), f"{label}: {d['kind']} {d['metadata']['name']} has a wildcard in {k}")
            check("nonResourceURLs" not in r, f"{label}: {d['kind']} {d['metadata']['name']} grants nonResourceURLs")
            check(not {"escalate", "bind", "impersonate", "delete", "deletecollection"} & set(r["verbs"]),
                  f"{label}: {d['kind']} {d['metadata']['name']} grants {r['verbs']}")
    got = {f"{d['kind']}/{d['metadata'].get('namespace', '')}/{d['metadata']['name']}": normalize_rules(d["rules"])
           for d in kinds(docs, "Role") + kinds(docs, "ClusterRole")}
    want = {k: normalize_rules(v) for k, v in expected.items()}
    check(got == want, f"{label}: RBAC differs from tests/chart/rbac-expected.yaml (widening RBAC must update it):\n"
          f"got:  {json.dumps(got, indent=1, sort_keys=True)}\nwant: {json.dumps(want, indent=1, sort_keys=True)}")
    for b in kinds(docs, "RoleBinding") + kinds(docs, "ClusterRoleBinding"):
        ref = b["roleRef"]
        key = f"{ref['kind']}/{b['metadata'].get('namespace', '') if ref['kind'] == 'Role' else ''}/{ref['name']}"
        check(key in got, f"{label}: {b['kind']} {b['metadata']['name']} binds {key}, which the chart does not define")


def main():
    out = Path(sys.argv[1])
    default, mx = load(out / "default.yaml"), load(out / "max.yaml")
    expected_rbac = yaml.safe_load((HERE / "rbac-expected.yaml").read_text())

    for label, docs in (("default", default), ("max", mx)):
        for d in docs:
            if d["kind"] not in ("CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"):
                check(d["metadata"].get("namespace"), f"{label}: {d['kind']} {d['metadata']['name']} has no namespace")
            for k, v in d["metadata"].get("labels", {}).items():
                check(isinstance(v, str) and len(v) <= 63, f"{label}: label {k}={v!r} invalid")
            check(len(d["metadata"]["name"]) <= 63, f"{label}: name too long {d['metadata']['name']}")
    print("ok   every object has a namespace (unless cluster-scoped), valid labels and names")

    # --- gateways: security (section 6), wiring (docs/interfaces.md)
    gw = check_gateway(default, "default")
    check(gw["spec"]["replicas"] == 2, "default: gateway replicas")
    check(container(gw, "gateway")["image"] == "partnergate/partnergate:0.1.0", "default: image is not partnergate/partnergate:<appVersion>")
    gwm = check_gateway(mx, "max", smtp=2526, admin=8088, tls_secret="mx-tls")
    check("replicas" not in gwm["spec"], "max: gateway Deployment sets replicas although the HPA owns them")
    check(gwm["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 120, "max: terminationGracePeriodSeconds")
    check(gw["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 45, "default: grace = shutdownGraceSecs + 15")
    test_pods = [d for d in default if d["kind"] == "Pod"]
    check(len(test_pods) == 1 and test_pods[0]["metadata"]["annotations"]["helm.sh/hook"] == "test", "default: one helm test Pod")
    check_pod_security("test pod", test_pods[0], want_token=False)
    probe = test_pods[0]["spec"]["containers"][0]
    check(probe["args"][:2] == ["probe", "--host"] and "--starttls" in probe["args"]
          and probe["args"][2] == "partnergate-gateway.partnergate.svc.cluster.local"
          and probe["args"][3:5] == ["--port", "25"], f"test pod args {probe['args']}")
    mprobe = [d for d in mx if d["kind"] == "Pod"][0]
    check_pod_security("max test pod", mprobe, want_token=False)
    margs = mprobe["spec"]["containers"][0]["args"]
    check(margs[margs.index("--ca") + 1] == "/etc/partnergate/test-ca/ca.crt"
          and margs[margs.index("--tls-server-name") + 1] == "mx.example.com", f"max: test pod args {margs}")
    check(mprobe["spec"]["volumes"][0]["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}],
          "max: the test pod may only mount ca.crt of the server certificate Secret")
    print("ok   gateway pods: no SA token, non-root, read-only root FS, caps dropped, seccomp; mounts, ports, probes; test pod")

    # --- operator
    for label, docs, port, lease, ns_flag in (("default", default, 8081, "partnergate-operator", None),
                                              ("max", mx, 9081, "pg-leader", "mail,partners")):
        op = get(docs, "Deployment", "partnergate-operator")
        check_pod_security(f"{label} operator", op["spec"]["template"], want_token=True)
        c = container(op, "operator")
        check(c["command"] == ["/usr/local/bin/partnergate-operator"], f"{label}: operator command")
        args = dict(a[2:].split("=", 1) for a in c["args"])
        want = {
            "gateway-namespace": NS,
            "gateway-selector": "app.kubernetes.io/component=gateway,app.kubernetes.io/name=partnergate,app.kubernetes.io/instance=partnergate",
            "gateway-admin-port": "8080" if label == "default" else "8088",
            "connectors-configmap": "partnergate-connectors",
            "material-secret": "partnergate-connector-material",
            "server-certificate-secret": "partnergate-gateway-tls" if label == "default" else "mx-tls",
            "listen": f"0.0.0.0:{port}",
            "lease-name": lease,
        }
        if ns_flag:
            want["watch-namespaces"] = ns_flag
        check(args == want, f"{label}: operator args {args}, want {want}")
        env = {e["name"]: e for e in c["env"]}
        check(env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace", f"{label}: POD_NAMESPACE")
        # the selector must select the gateway pods
        gpod = get(docs, "Deployment", "partnergate-gateway")["spec"]["template"]["metadata"]["labels"]
        for kv in want["gateway-selector"].split(","):
            k, v = kv.split("=")
            check(gpod.get(k) == v, f"{label}: --gateway-selector {kv} does not match the gateway pods")
    check(get(default, "Deployment", "partnergate-operator")["spec"]["replicas"] == 2, "default: 2 operator replicas")
    print("ok   operator: args per docs/interfaces.md, POD_NAMESPACE, selector matches gateway pods, pod security")

    # --- RBAC
    check_rbac(default, "default", expected_rbac["default"])
    check_rbac(mx, "max", expected_rbac["max"])
    check(not kinds(mx, "ClusterRole"), "max: watchNamespaces set but a ClusterRole is rendered")
    print("ok   RBAC: no wildcards/escalation verbs, equal to tests/chart/rbac-expected.yaml")

    # --- Service, NetworkPolicy, PDB, HPA, Certificate, ServiceMonitor
    svc = get(default, "Service", "partnergate-gateway")
    check(svc["spec"]["type"] == "ClusterIP" and "externalTrafficPolicy" not in svc["spec"], "default: ClusterIP without externalTrafficPolicy")
    check(svc["spec"]["ports"] == [{"name": "smtp", "port": 25, "targetPort": "smtp", "protocol": "TCP", "appProtocol": "smtp"}],
          f"default: service ports {svc['spec']['ports']}")
    svcm = get(mx, "Service", "partnergate-gateway")
    check(svcm["spec"]["type"] == "LoadBalancer" and svcm["spec"]["externalTrafficPolicy"] == "Local", "max: LoadBalancer with externalTrafficPolicy Local")
    check([p["port"] for p in svcm["spec"]["ports"]] == [25], "max: only SMTP on the public Service")
    for label, docs, admin, smtp in (("default", default, 8080, 2525), ("max", mx, 8088, 2526)):
        np = get(docs, "NetworkPolicy", "partnergate-gateway")
        check(np["spec"]["policyTypes"] == ["Ingress"], f"{label}: NetworkPolicy types")
        rules = {r["ports"][0]["port"]: r for r in np["spec"]["ingress"]}
        check(set(rules) == {smtp, admin}, f"{label}: NetworkPolicy ports {set(rules)}")
        frm = rules[admin]["from"]
        check(frm[0] == {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "partnergate",
              "app.kubernetes.io/instance": "partnergate", "app.kubernetes.io/component": "operator"}}},
              f"{label}: admin port not limited to the operator: {frm}")
        if label == "default":
            check(len(frm) == 1 and "from" not in rules[smtp], "default: admin only from operator, SMTP from anywhere")
    pdb = get(default, "PodDisruptionBudget", "partnergate-gateway")
    check(pdb["spec"].get("maxUnavailable") == 1, "default: PDB maxUnavailable 1")
    check(get(mx, "PodDisruptionBudget", "partnergate-gateway")["spec"] .get("minAvailable") == "50%", "max: PDB minAvailable")
    check(not kinds(default, "HorizontalPodAutoscaler") and not kinds(default, "Certificate")
          and not kinds(default, "ServiceMonitor"), "default: optional objects rendered")
    hpa = get(mx, "HorizontalPodAutoscaler", "partnergate-gateway")
    check(hpa["spec"]["scaleTargetRef"]["name"] == "partnergate-gateway", "max: HPA target")
    cert = get(mx, "Certificate", "partnergate-gateway")
    check(cert["spec"]["secretName"] == "mx-tls" and cert["spec"]["issuerRef"] ==
          {"name": "mail-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}, "max: Certificate secret/issuer")
    check(cert["spec"]["dnsNames"] == ["mx.example.com", "mx2.example.com"], "max: Certificate dnsNames")
    check(len(kinds(mx, "ServiceMonitor")) == 2, "max: two ServiceMonitors")
    print("ok   Service (25 -> smtp, Local for LoadBalancer), NetworkPolicy, PDB, HPA, Certificate, ServiceMonitors")
    check_monitoring(out, default, mx, load(out / "monitoring.yaml"))

    # --- fleet settings
    text, fleet = fleet_json(default)
    check(fleet["hostname"] == "partnergate-gateway.partnergate.svc.cluster.local", f"default hostname {fleet['hostname']}")
    check(fleet["serverCertificate"] == {"certFile": "/etc/partnergate/tls/tls.crt", "keyFile": "/etc/partnergate/tls/tls.key"}, "serverCertificate paths")
    check(fleet["materialDir"] == "/etc/partnergate/material" and fleet["listen"] == "0.0.0.0:2525"
          and fleet["adminListen"] == "0.0.0.0:8080", "default: listen/adminListen/materialDir")
    mtext, mfleet = fleet_json(mx)
    check(mfleet["upstream"] == {"host": "exchange.example.com", "port": 587, "tls": "DomainValidation",
                                 "tlsDomain": "*.example.com", "trustBundleFile": "/etc/partnergate/upstream-ca/ca.crt",
                                 "clientCertificate": {"certFile": "/etc/partnergate/upstream-client/tls.crt",
                                                       "keyFile": "/etc/partnergate/upstream-client/tls.key"}},
          f"max: upstream {mfleet['upstream']}")
    check(mfleet["internalSenders"]["trustBundleFile"] == "/etc/partnergate/internal-senders-ca/ca.crt", "max: internal CA path")
    check(fleet["tlsPolicy"] == {"mtaStsMaxPolicyBytes": 65536, "mtaStsFetchTimeoutSecs": 60},
          f"default: tlsPolicy {fleet['tlsPolicy']}")
    check(mfleet["tlsPolicy"] == {"dnssecTrustAnchorFile": "/etc/partnergate/dnssec-trust-anchor/ca.crt",
                                  "mtaStsRootsFile": "/etc/partnergate/mta-sts-roots/ca.crt",
                                  "mtaStsMaxPolicyBytes": 32768, "mtaStsFetchTimeoutSecs": 30},
          f"max: tlsPolicy {mfleet['tlsPolicy']}")
    check(mfleet["limits"]["maxMessageSize"] == 52428800 and isinstance(mfleet["limits"]["maxMessageSize"], int), "max: integers stay integers")
    gmounts = {m["mountPath"] for m in container(gwm, "gateway")["volumeMounts"]}
    for p in ("/etc/partnergate/upstream-ca", "/etc/partnergate/upstream-client", "/etc/partnergate/internal-senders-ca",
              "/etc/partnergate/dnssec-trust-anchor", "/etc/partnergate/mta-sts-roots"):
        check(p in gmounts, f"max: {p} not mounted although fleet.json refers to it")
    print("ok   fleet.json: only FleetSettings fields, paths match the mounts")
    gateway_bin = (out / "gateway-bin").read_text().strip() if (out / "gateway-bin").exists() else ""
    if gateway_bin:
        run_gateway_check(gateway_bin, text, "default")
        run_gateway_check(gateway_bin, mtext, "max")
        print(f"ok   {gateway_bin} check accepts the default and maximal fleet.json")
    else:
        print("SKIP partnergate-gateway check (no binary with a `check` subcommand)")

    # --- checksum annotation: fleet changes roll the gateways, nothing else does
    ann = lambda docs: get(docs, "Deployment", "partnergate-gateway")["spec"]["template"]["metadata"]["annotations"]["checksum/fleet"]  # noqa: E731
    check(ann(load(out / "hostname.yaml")) != ann(default), "changing settings.hostname does not change checksum/fleet")
    check(ann(load(out / "replicas.yaml")) == ann(default), "changing operator.replicas changes checksum/fleet")
    print("ok   checksum/fleet follows the fleet settings only")

    # --- CRD
    crds = kinds(default, "CustomResourceDefinition")
    if (out / "crd-src.yaml").exists():
        check(len(crds) == 1, "default: expected the PartnerConnector CRD")
        crd = crds[0]
        check(crd["metadata"]["annotations"].get("helm.sh/resource-policy") == "keep", "CRD lacks helm.sh/resource-policy: keep")
        src = yaml.safe_load((out / "crd-src.yaml").read_text())
        strip = lambda c: {**c, "metadata": {k: v for k, v in c["metadata"].items() if k not in ("labels", "annotations")}}  # noqa: E731
        check(strip(crd) == strip(src), "rendered CRD differs from crds/partnerconnector.yaml beyond labels/annotations")
        print("ok   CRD rendered from crds/partnerconnector.yaml unchanged, with resource-policy keep")
    else:
        print("SKIP CRD render (crds/partnerconnector.yaml not generated yet)")


if __name__ == "__main__":
    try:
        main()
    except Fail as e:
        print(f"FAIL {e}", file=sys.stderr)
        sys.exit(1)
