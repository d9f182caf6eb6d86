#!/usr/bin/env bash
# Chart tests for charts/partnergate, no cluster needed (install/upgrade/uninstall against the
# local control plane belong to the e2e suite). Run by `make chart-test`.
#
#  1. the chart's CRD copy is identical to the generated crds/partnerconnector.yaml
#  2. values.yaml / values-max.yaml / values.schema.json / docs/install.md agree (values_doc.py)
#  3. helm lint --strict, default and maximal values (tests/chart/values-max.yaml)
#  4. helm template default, maximal and two variants; assert_rendered.py checks pod security,
#     RBAC (against rbac-expected.yaml), wiring per docs/interfaces.md, and runs
#     `partnergate-gateway check` on the rendered fleet.json when the binary has it
#  5. values.schema.json rejects bad values through helm itself
#  6. the PrometheusRule: `promtool check rules` and the unit tests of alerts-test.yaml (every
#     alert firing and not firing); prometheus_e2e.py: every metric an alert or dashboard panel
#     names is registered by the binaries, and a private Prometheus scraping a standalone
#     gateway returns data for the panels and matches every alert selector (promtool and
#     prometheus: Debian package `prometheus`, tests/scripts/install-deps.sh)
#
# helm: $HELM, else the one tests/cluster/build.sh caches, else helm on PATH.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE=$ROOT/tests/chart
CHART=$ROOT/charts/partnergate
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

find_helm() {
  if [ -n "${HELM:-}" ]; then echo "$HELM"; return; fi
  # shellcheck source=../cluster/versions.env
  . "$ROOT/tests/cluster/versions.env"
  local cached=${PARTNERGATE_CACHE:-$HOME/.cache/partnergate}/helm-$HELM_VERSION/bin/helm
  if [ -x "$cached" ]; then echo "$cached"; return; fi
  command -v helm || { echo "FAIL: no helm: run tests/cluster/build.sh (or set HELM=...)" >&2; exit 1; }
}
HELM=$(find_helm)
echo "helm: $HELM ($("$HELM" version --short))"

# 1. CRD copy
SRC_CRD=$ROOT/crds/partnerconnector.yaml
CHART_CRD=$CHART/files/crds/partnerconnector.yaml
crd_args=()
if [ -f "$SRC_CRD" ]; then
  cmp -s "$SRC_CRD" "$CHART_CRD" ||
    { echo "FAIL: $CHART_CRD differs from crds/partnerconnector.yaml: run 'make chart-crds'"; exit 1; }
  cp "$SRC_CRD" "$OUT/crd-src.yaml"
  echo "ok   chart CRD is identical to crds/partnerconnector.yaml"
elif [ ! -f "$CHART_CRD" ]; then
  echo "SKIP CRD: crds/partnerconnector.yaml not generated yet; rendering with crds.install=false"
  crd_args=(--set crds.install=false)
fi

# 2. values, schema, docs
python3 "$HERE/values_doc.py"

# 3. lint
"$HELM" lint --strict "$CHART" "${crd_args[@]}" >"$OUT/lint.txt" 2>&1 || { cat "$OUT/lint.txt"; echo "FAIL: helm lint (default values)"; exit 1; }
"$HELM" lint --strict "$CHART" -f "$HERE/values-max.yaml" "${crd_args[@]}" >"$OUT/lint.txt" 2>&1 || { cat "$OUT/lint.txt"; echo "FAIL: helm lint (values-max.yaml)"; exit 1; }
echo "ok   helm lint --strict: default and maximal values"

# 4. render and assert
tpl() { "$HELM" template partnergate "$CHART" --namespace partnergate "${crd_args[@]}" "$@"; }
tpl >"$OUT/default.yaml"
tpl -f "$HERE/values-max.yaml" >"$OUT/max.yaml"
tpl --set gateway.settings.hostname=mx2.example.com >"$OUT/hostname.yaml"
tpl --set operator.replicas=5 >"$OUT/replicas.yaml"
tpl --set metrics.prometheusRule.enabled=true --set metrics.grafanaDashboard.enabled=true >"$OUT/monitoring.yaml"

# A gateway binary to run `check` with: an existing build, else a debug build of the gateway.
gw=""
for b in "${PARTNERGATE_GATEWAY_BIN:-}" "$ROOT/target/debug/partnergate-gateway" \
         "$ROOT/target/x86_64-unknown-linux-gnu/release/partnergate-gateway"; do
  if [ -n "$b" ] && [ -x "$b" ]; then gw=$b; break; fi
done
if [ -z "$gw" ]; then
  (cd "$ROOT" && cargo build -q -p partnergate-gateway) && gw=$ROOT/target/debug/partnergate-gateway
fi
if "$gw" --help 2>/dev/null | grep -qw check; then
  echo "$gw" >"$OUT/gateway-bin"
else
  echo "note: $gw has no 'check' subcommand yet"
fi
python3 "$HERE/assert_rendered.py" "$OUT"

# 5. the schema, through helm
reject() {
  local what=$1; shift
  if tpl "$@" >/dev/null 2>"$OUT/err.txt"; then echo "FAIL: helm accepted $what"; exit 1; fi
  grep -qi "schema\|values don't meet\|required\|must" "$OUT/err.txt" ||
    { cat "$OUT/err.txt"; echo "FAIL: $what refused, but not by the schema"; exit 1; }
}
reject "gateway.replicas=abc" --set gateway.replicas=abc
reject "an unknown fleet setting" --set gateway.settings.limits.maxBogus=1
reject "defaultInbound=Maybe" --set gateway.settings.defaultInbound=Maybe
reject "upstream.tls=Strict" --set gateway.settings.upstream.tls=Strict
reject "maxCommandLine below 512" --set gateway.settings.limits.maxCommandLine=100
reject "a CIDR without prefix" --set 'gateway.settings.trustedProxies={10.0.0.1}'
reject "an MX allowance without prefix" --set 'gateway.settings.allowPrivateMxAddresses={10.0.0.1}'
reject "service.type=ExternalName" --set gateway.service.type=ExternalName
reject "cert-manager without issuer" --set gateway.tls.certManager.enabled=true
echo "ok   bad values are refused (schema and template checks)"

# 6. alerts and dashboard against Prometheus (assert_rendered.py wrote rules.yaml, dashboard.json)
command -v promtool >/dev/null && command -v prometheus >/dev/null ||
  { echo "FAIL: no promtool/prometheus: run tests/scripts/install-deps.sh"; exit 1; }
promtool check rules "$OUT/rules.yaml" >"$OUT/promtool.txt" 2>&1 || { cat "$OUT/promtool.txt"; echo "FAIL: promtool check rules"; exit 1; }
cp "$HERE/alerts-test.yaml" "$OUT/alerts-test.yaml"
promtool test rules "$OUT/alerts-test.yaml" >"$OUT/promtool.txt" 2>&1 || { cat "$OUT/promtool.txt"; echo "FAIL: promtool test rules (tests/chart/alerts-test.yaml)"; exit 1; }
echo "ok   promtool check rules; promtool test rules: every alert firing and not firing ($(promtool --version 2>&1 | head -n1))"
python3 "$HERE/prometheus_e2e.py" "$OUT/rules.yaml" "$OUT/dashboard.json" "$gw"
echo "PASS: chart tests"
