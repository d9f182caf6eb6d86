#!/usr/bin/env bash
# The chart's alerts and Grafana dashboard against a real Prometheus scraping the e2e pods.
#
#   tests/e2e/prometheus.sh        start Prometheus, run the checks (called by tests/e2e/run.sh)
#   tests/e2e/prometheus.sh stop   stop it (tests/e2e/down.sh, run.sh's cleanup)
#
# Prometheus (Debian `prometheus` 2.42, tests/scripts/install-deps.sh) runs as a private process
# on 127.0.0.1:$E2E_PROMETHEUS_PORT (19090: below the ephemeral range, in no port table of
# tests/cluster/README.md) with its config, rules and TSDB in $E2E_WORK/prometheus. Targets come
# from file_sd: the script lists the release's gateway and operator pods with kubectl (pod IP,
# the named container port `admin` or `metrics`) and writes them with the `namespace` and `pod`
# labels prometheus-operator's monitors add, which the alerts and panels aggregate on. Not
# kubernetes_sd: Debian builds Prometheus without it (promtool: "field kubernetes_sd_configs not
# found"). The pods of the process kubelet listen on their pod IPs in 127.0.0.0/8, so the pod
# targets are scraped directly, as in a real cluster; the file is written once because no pod
# changes while the checks run (the fault steps before this replace pods).
#
# Invariants checked (any failure exits 1, after the tail of Prometheus's log):
#  1. Prometheus scrapes exactly the gateway admin and operator metrics ports that kubectl
#     lists for the release's pods, and every target is up.
#  2. The chart's PrometheusRule, rendered with helm from the e2e values (spec.groups as a
#     rule file; the two alerts of check 4 get `for: 15s` through the chart's per-alert
#     `metrics.prometheusRule.for` value, every other alert keeps its built-in duration),
#     loads, and every rule evaluates with health "ok".
#  3. Every alert expression, dashboard panel query and dashboard variable evaluates through
#     the HTTP API, and every partnergate_* name in them is a metric in this scrape.
#  4. With the suite's connectors all Ready and their certificates long-lived, the "connector
#     not Ready" and "certificate expiring" expressions are empty; then a connector whose
#     trust bundle Secret does not exist (not Ready) and one whose trust bundle is a CA that
#     cert-manager issued for 240 h make exactly those connectors' series appear, with the
#     certificate's real notAfter, and both alerts fire in Prometheus (state "firing" after
#     their 15 s). The two connectors and the Certificate are deleted again afterwards.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=env.sh
. "$HERE/env.sh"
PROM_PORT=${E2E_PROMETHEUS_PORT:-19090}
PROM_DIR=$E2E_WORK/prometheus
PROM_URL=http://127.0.0.1:$PROM_PORT

prom_pids() { # our Prometheus: from its pid file, or (pid file wiped by a new run) the port's
  # holder; either only if its command line is ours, so a recycled pid is never signalled
  local p
  {
    cat "$PROM_DIR/prometheus.pid" 2>/dev/null || true
    ss -Hltnp "sport = :$PROM_PORT" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2
  } | sort -u | while read -r p; do
    tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -q -- "--web.listen-address=127.0.0.1:$PROM_PORT" && echo "$p"
  done
  return 0
}
prom_stop() {
  local p i
  for p in $(prom_pids); do
    kill "$p" 2>/dev/null || continue
    for i in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null || true
  done
  rm -f "$PROM_DIR/prometheus.pid"
}
if [ "${1:-}" = stop ]; then
  prom_stop
  exit 0
fi

fail() {
  [ -f "$PROM_DIR/prometheus.log" ] && { echo "---- tail $PROM_DIR/prometheus.log ----" >&2; tail -n 20 "$PROM_DIR/prometheus.log" >&2; }
  printf '\033[31mFAIL (prometheus.sh): %s\033[0m\n' "$*" >&2
  exit 1
}
t_start=$(date +%s)
prom_stop
rm -rf "$PROM_DIR"
mkdir -p "$PROM_DIR"

# --- the chart's rules and dashboard, rendered from the values the suite installed ---
helm template partnergate "$REPO/charts/partnergate" -n "$NS" -f "$E2E_DIR/values-e2e.yaml" \
  --set metrics.prometheusRule.enabled=true --set metrics.grafanaDashboard.enabled=true \
  --set metrics.prometheusRule.for.PartnergateConnectorNotReady=15s \
  --set metrics.prometheusRule.for.PartnergateCertificateExpiringSoon=15s \
  --show-only templates/prometheusrule.yaml --show-only templates/dashboard.yaml >"$PROM_DIR/monitoring.yaml" ||
  fail "helm template (PrometheusRule, dashboard)"
python3 - "$PROM_DIR" <<'PY' || fail "extracting spec.groups and the dashboard from the rendered chart"
import sys, yaml
from pathlib import Path
d = Path(sys.argv[1])
docs = [x for x in yaml.safe_load_all((d / "monitoring.yaml").read_text()) if x]
rule = next(x for x in docs if x["kind"] == "PrometheusRule")
cm = next(x for x in docs if x["kind"] == "ConfigMap")
(d / "rules.yaml").write_text(yaml.safe_dump(rule["spec"], sort_keys=False))
(d / "dashboard.json").write_text(cm["data"]["partnergate.json"])
PY

# --- Prometheus: file_sd with the pods kubectl lists, the chart's rules ---
# The targets: pod IP and named port (gateway admin, operator metrics) of every running pod of
# the release, with the namespace and pod labels prometheus-operator's monitors add.
write_targets() {
  local c
  for c in gateway:admin operator:metrics; do
    kubectl -n "$NS" get pods -l "app.kubernetes.io/component=${c%%:*}" --field-selector=status.phase=Running \
      -o go-template="{{range .items}}{{if .status.podIP}}{{\$p := .}}{{range (index .spec.containers 0).ports}}{{if eq .name \"${c##*:}\"}}{{\$p.status.podIP}}:{{.containerPort}} {{\$p.metadata.namespace}} {{\$p.metadata.name}}{{\"\n\"}}{{end}}{{end}}{{end}}{{end}}"
  done | python3 -c '
import json, sys
rows = [l.split() for l in sys.stdin if l.strip()]
print(json.dumps([{"targets": [t], "labels": {"namespace": ns, "pod": pod}} for t, ns, pod in rows], indent=1))' \
    >"$PROM_DIR/targets.json.new" && mv "$PROM_DIR/targets.json.new" "$PROM_DIR/targets.json"
}
write_targets || fail "listing the gateway and operator pods with kubectl"
n_pods=$(kubectl -n "$NS" get pods -l 'app.kubernetes.io/component in (gateway,operator)' --no-headers | wc -l)
n_targets=$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))))' "$PROM_DIR/targets.json")
[ "$n_targets" -eq "$n_pods" ] && [ "$n_pods" -ge 2 ] ||
  fail "kubectl lists $n_pods gateway/operator pods but $n_targets running ones with a pod IP and metrics port"
cat >"$PROM_DIR/prometheus.yml" <<EOF
global: {scrape_interval: 1s, evaluation_interval: 1s}
rule_files: [$PROM_DIR/rules.yaml]
scrape_configs:
  - job_name: partnergate
    file_sd_configs:
      - files: [$PROM_DIR/targets.json]
        refresh_interval: 1s
EOF
promtool check config "$PROM_DIR/prometheus.yml" >"$PROM_DIR/promtool.txt" 2>&1 || { cat "$PROM_DIR/promtool.txt" >&2; fail "promtool check config"; }
prometheus --config.file="$PROM_DIR/prometheus.yml" --storage.tsdb.path="$PROM_DIR/data" \
  --web.listen-address="127.0.0.1:$PROM_PORT" --log.level=warn >"$PROM_DIR/prometheus.log" 2>&1 &
echo $! >"$PROM_DIR/prometheus.pid"

# --- the checks through the HTTP API (1-3 before the failing connectors, 4 after) ---
api() { # phase
  python3 - "$1" "$PROM_URL" "$PROM_DIR" "$REPO" <<'PY'
import calendar, json, sys, time, urllib.error, urllib.parse, urllib.request
from pathlib import Path
import yaml

phase, url, d, repo = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
sys.path.insert(0, str(repo / "tests/chart"))
from prometheus_e2e import NAME, label_values_query, substitute  # the chart check's own helpers


class Fail(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Fail(msg)


def get(path, **params):
    q = ("?" + urllib.parse.urlencode(params)) if params else ""
    with urllib.request.urlopen(f"{url}/api/v1/{path}{q}", timeout=10) as r:
        body = json.loads(r.read())
    check(body.get("status") == "success", f"{path} {params}: {body}")
    return body["data"]


def query(q):
    try:
        return get("query", query=q)["result"]
    except urllib.error.HTTPError as e:  # 400/422: the expression does not parse or evaluate
        raise Fail(f"Prometheus refused {q!r}: {e.read().decode(errors='replace')}")


def wait_for(what, fn, secs):
    deadline, last = time.monotonic() + secs, None
    while time.monotonic() < deadline:
        try:
            v = fn()
            if v:
                return v
        except (OSError, ValueError, Fail) as e:
            last = e
        time.sleep(0.5)
    raise Fail(f"{what}: not within {secs} s (last: {last})")


rules = yaml.safe_load((d / "rules.yaml").read_text())
alerts = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
dash = json.loads((d / "dashboard.json").read_text())


def panels(ps):
    for p in ps:
        yield p
        yield from panels(p.get("panels", []))


queries = [(f"panel {p['title']!r} {t['refId']}", t["expr"]) for p in panels(dash["panels"]) for t in p.get("targets", [])]
for v in dash["templating"]["list"]:
    if v["type"] == "query":
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        queries.append((f"variable {v['name']}", label_values_query(q)))
NOT_READY, EXPIRING = alerts["PartnergateConnectorNotReady"], alerts["PartnergateCertificateExpiringSoon"]


def baseline():
    want = {t for g in json.loads((d / "targets.json").read_text()) for t in g["targets"]}

    def targets():
        active = get("targets", state="active")["activeTargets"]
        got = {t["labels"]["instance"] for t in active}
        check(got == want, f"Prometheus targets {sorted(got)} != kubectl's pods {sorted(want)}")
        down = [(t["labels"]["instance"], t["lastError"]) for t in active if t["health"] != "up"]
        check(not down, f"targets not up: {down}")
        return active
    active = wait_for("Prometheus scrapes every gateway and operator pod", targets, 30)
    pods = sorted(f"{t['labels']['pod']}={t['labels']['instance']}" for t in active)
    print(f"ok   Prometheus scrapes the {len(active)} gateway/operator pods kubectl lists (file_sd), all up: {' '.join(pods)}")

    def evaluated_after(t0):
        rs = [r for g in get("rules")["groups"] for r in g["rules"]]
        check(len([r for r in rs if r["type"] == "alerting"]) == len(alerts), f"{len(rs)} rules loaded, want {len(alerts)} alerts")
        bad = [(r["name"], r.get("lastError")) for r in rs if r["health"] != "ok"]
        check(not bad, f"rules with health != ok: {bad}")
        when = [calendar.timegm(time.strptime(r["lastEvaluation"][:19], "%Y-%m-%dT%H:%M:%S")) for r in rs]
        check(min(when) > t0, "not every rule evaluated since the first scrape")
        return rs
    # a rule evaluated before the first scrape is "ok" too: wait for a scrape, then an evaluation
    wait_for("a scrape of every target", lambda: len(query("up == 1")) == len(want), 15)
    t0 = time.time()
    wait_for("every rule evaluated after the first scrape", lambda: evaluated_after(t0), 15)
    print(f"ok   the chart's PrometheusRule ({len(alerts)} alerts, two of them with for: 15s) loaded; every rule evaluates with health ok")

    scraped = set(get("label/__name__/values"))
    missing = []
    for where, q in [(f"alert {a}", e) for a, e in alerts.items()] + queries:
        query(substitute(q))
        missing += [f"{where}: {n}" for n in NAME.findall(q) if n not in scraped]
    check(not missing, "names that are not metrics in the scrape:\n  " + "\n  ".join(missing))
    names = {n for _, q in [(a, e) for a, e in alerts.items()] + queries for n in NAME.findall(q)}
    print(f"ok   {len(alerts)} alert expressions, {len(queries)} dashboard queries/variables evaluate through the HTTP API; "
          f"the {len(names)} partnergate_* names they use are all in the scrape ({len([n for n in scraped if n.startswith('partnergate_')])} scraped)")

    for name, expr in (("PartnergateConnectorNotReady", NOT_READY), ("PartnergateCertificateExpiringSoon", EXPIRING)):
        r = query(expr)
        check(not r, f"{name} is already true before the failing connectors: {[x['metric'] for x in r]}")
    print("ok   with the suite's connectors Ready and long-lived certificates, the not-Ready and expiring expressions are empty")


def failing():
    info = json.loads((d / "failing.json").read_text())
    broken, not_after = info["broken"], info["not_after"]

    def not_ready():
        r = query(NOT_READY)
        conns = sorted(x["metric"].get("connector") for x in r)
        check(conns == [broken], f"PartnergateConnectorNotReady selects {conns}, want [{broken!r}]")
        return r
    wait_for(f"PartnergateConnectorNotReady true for {broken}", not_ready, 40)

    def expiring():
        r = query(EXPIRING)
        check(len(r) == 1, f"PartnergateCertificateExpiringSoon selects {[(x['metric'], x['value']) for x in r]}, want one series")
        ts, left = r[0]["value"]
        check(abs(float(ts) + float(left) - not_after) <= 2, f"expiring series {r[0]['metric']} says notAfter "
              f"{float(ts) + float(left):.0f}, cert-manager's Certificate says {not_after}")
        return r
    r = wait_for("PartnergateCertificateExpiringSoon true for the 240 h trust bundle", expiring, 40)
    secret, left = r[0]["metric"].get("secret"), float(r[0]["value"][1])

    def held():
        got = {(a["labels"]["alertname"], a["labels"].get("connector") or a["labels"].get("secret")): a["state"]
               for a in get("alerts")["alerts"]}
        want = [("PartnergateConnectorNotReady", broken), ("PartnergateCertificateExpiringSoon", secret)]
        check(all(got.get(w) == "firing" for w in want), f"Prometheus alerts {got}, want {want} firing")
        return [(w, got[w]) for w in want]
    states = wait_for("both alerts firing (for: 15s)", held, 60)
    print(f"ok   connector {broken} (trust bundle Secret missing) -> PartnergateConnectorNotReady; trust bundle {secret} "
          f"({left / 86400:.1f} days left, = cert-manager notAfter) -> PartnergateCertificateExpiringSoon; "
          f"Prometheus alerts: {', '.join(f'{a} {s}' for (a, _), s in states)}")


try:
    {"baseline": baseline, "failing": failing}[phase]()
except Fail as e:
    print(f"FAIL {e}", file=sys.stderr)
    sys.exit(1)
PY
}
wait_ready() { # seconds
  local i
  for i in $(seq $(($1 * 2))); do curl -fsS "$PROM_URL/-/ready" >/dev/null 2>&1 && return 0; sleep 0.5; done
  return 1
}
wait_ready 30 || fail "Prometheus did not become ready on 127.0.0.1:$PROM_PORT"
api baseline || fail "baseline checks"

# --- two connectors made to fail ---
# Removed again however the checks end, so a kept cluster (E2E_KEEP) has only the suite's own.
remove_failing() {
  kubectl -n mail delete partnerconnector e2e-notready e2e-expiring --ignore-not-found --wait=false >/dev/null 2>&1
  kubectl -n mail delete certificate e2e-expiring-ca --ignore-not-found --wait=false >/dev/null 2>&1
  kubectl -n mail delete secret e2e-expiring-ca --ignore-not-found --wait=false >/dev/null 2>&1
  return 0
}
trap remove_failing EXIT
kubectl apply -f - >/dev/null <<'YAML' || fail "applying the failing connectors"
# not Ready: its trust bundle Secret does not exist (ResolvedRefs False)
apiVersion: partnergate.io/v1alpha1
kind: PartnerConnector
metadata: {name: e2e-notready, namespace: mail}
spec:
  direction: Inbound
  domains: ["notready.test"]
  inbound:
    identifyBy: SenderDomain
    requireTls: true
    certificate:
      subjectName: mail.notready.test
      trustBundle:
        secretRef: {name: e2e-no-such-secret, key: ca.crt}
---
# expiring: its trust bundle is a CA cert-manager issues for 240 h (< the alert's 14 days)
apiVersion: cert-manager.io/v1
kind: Certificate
metadata: {name: e2e-expiring-ca, namespace: mail}
spec:
  isCA: true
  commonName: Expiring partner CA
  secretName: e2e-expiring-ca
  duration: 240h
  privateKey: {algorithm: ECDSA, size: 256}
  issuerRef: {name: selfsigned, kind: ClusterIssuer, group: cert-manager.io}
---
apiVersion: partnergate.io/v1alpha1
kind: PartnerConnector
metadata: {name: e2e-expiring, namespace: mail}
spec:
  direction: Inbound
  domains: ["expiring.test"]
  inbound:
    identifyBy: SenderDomain
    requireTls: true
    certificate:
      subjectName: mail.expiring.test
      trustBundle:
        secretRef: {name: e2e-expiring-ca, key: ca.crt}
YAML
kubectl -n mail wait --for=condition=Ready certificate/e2e-expiring-ca --timeout=30s >/dev/null ||
  fail "cert-manager did not issue e2e-expiring-ca"
not_after=$(date -u -d "$(kubectl -n mail get certificate e2e-expiring-ca -o jsonpath='{.status.notAfter}')" +%s)
kubectl -n mail wait --for=condition=Ready=False partnerconnector/e2e-notready --timeout=30s >/dev/null ||
  fail "partnerconnector/e2e-notready did not report Ready=False"
printf '{"broken": "mail/e2e-notready", "not_after": %s}\n' "$not_after" >"$PROM_DIR/failing.json"
api failing || fail "alerts for the failing connectors"
echo "ok   prometheus.sh took $(($(date +%s) - t_start)) s; Prometheus keeps running on $PROM_URL until run.sh's cleanup (kept with E2E_KEEP) or tests/e2e/down.sh"
