#!/usr/bin/env bash
# The chart against a real API server (no kubelet needed: pods stay Pending). Checks what
# `helm template` cannot:
#  - helm install into a namespace enforcing the `restricted` Pod Security Standard; every pod
#    template of the chart passes a server-side dry-run there
#  - the operator's RBAC as the API server evaluates it (impersonating its ServiceAccount):
#    server-side apply may create/update exactly the two rendered objects, POST create and
#    other names and delete are refused, the Lease works; `kubectl auth can-i --list` equals
#    tests/chart/can-i-expected.txt; the gateway ServiceAccount can do nothing
#  - helm upgrade to the maximal values (minus cert-manager/ServiceMonitor/PrometheusRule kinds;
#    the dashboard ConfigMap lands in namespace grafana), then helm uninstall keeps the CRD
#
#   tests/chart/cluster.sh            own throwaway control plane (tests/cluster/up.sh on private
#                                     ports and state dir), torn down afterwards
#   KUBECONFIG=... tests/chart/cluster.sh --use-current   an existing cluster (namespace partnergate)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE=$ROOT/tests/chart
CHART=$ROOT/charts/partnergate
NS=partnergate
OP=system:serviceaccount:$NS:partnergate-operator
GW=system:serviceaccount:$NS:partnergate-gateway
TMP=$(mktemp -d)

if [ "${1:-}" != --use-current ]; then
  export PARTNERGATE_CLUSTER_STATE=${PARTNERGATE_CLUSTER_STATE:-/tmp/partnergate-chart-cluster}
  export PARTNERGATE_ETCD_PORT=23796 PARTNERGATE_ETCD_PEER_PORT=23806 PARTNERGATE_APISERVER_PORT=16448 \
         PARTNERGATE_KCM_PORT=10571 PARTNERGATE_SCHEDULER_PORT=10572
  "$ROOT/tests/cluster/up.sh" >"$TMP/up.log" 2>&1 || { cat "$TMP/up.log"; exit 1; }
  trap '"$ROOT/tests/cluster/down.sh" >/dev/null 2>&1 || true; rm -rf "$TMP"' EXIT
  export KUBECONFIG=$PARTNERGATE_CLUSTER_STATE/kubeconfig
else
  trap 'rm -rf "$TMP"' EXIT
fi
BIN=$("$ROOT/tests/cluster/build.sh" --print-bin-dir)
export PATH=$BIN:$PATH
fail() { echo "FAIL: $*"; exit 1; }
expect_ok() { local what=$1; shift; "$@" >"$TMP/out" 2>&1 || { cat "$TMP/out"; fail "$what"; }; }
expect_forbidden() {
  local what=$1; shift
  if "$@" >"$TMP/out" 2>&1; then fail "$what was allowed"; fi
  grep -qi forbidden "$TMP/out" || { cat "$TMP/out"; fail "$what failed, but not as Forbidden"; }
}

kubectl create namespace $NS --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl label namespace $NS --overwrite pod-security.kubernetes.io/enforce=restricted >/dev/null
expect_ok "helm install" helm install partnergate "$CHART" -n $NS
echo "ok   helm install (namespace enforcing restricted Pod Security)"

# Every pod template as a Pod, server-side dry run: admission (PSA restricted) must accept it.
for values in "" "$HERE/values-max.yaml"; do
  helm template partnergate "$CHART" -n $NS ${values:+-f "$values"} \
    --set gateway.priorityClassName= --set operator.priorityClassName= --set operator.serviceAccount.name= |
  python3 -c '
import json, sys, yaml
for d in yaml.safe_load_all(sys.stdin):
    if d and d["kind"] == "Deployment":
        t = d["spec"]["template"]
        print(json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": d["metadata"]["name"] + "-psa",
              "namespace": d["metadata"]["namespace"], "labels": t["metadata"]["labels"]}, "spec": t["spec"]}))
    elif d and d["kind"] == "Pod":
        print(json.dumps(d))' |
  while read -r pod; do
    echo "$pod" | kubectl create --dry-run=server -f - >"$TMP/out" 2>&1 || { cat "$TMP/out"; fail "pod template refused"; }
  done
done
echo "ok   every pod template passes admission under Pod Security restricted"

cm() { printf 'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: %s, namespace: %s}\ndata: {connectors.json: "%s"}\n' "$1" $NS "$2"; }
cm partnergate-connectors '{}' >"$TMP/cm.yaml"
cm something-else '{}' >"$TMP/other.yaml"
ssa() { kubectl --as=$OP apply --server-side --field-manager=partnergate-operator -f "$@"; }
expect_forbidden "operator POST-creating its ConfigMap" kubectl --as=$OP create -f "$TMP/cm.yaml"
expect_forbidden "operator applying another ConfigMap" ssa "$TMP/other.yaml"
expect_ok "operator server-side-applying (creating) its ConfigMap" ssa "$TMP/cm.yaml"
cm partnergate-connectors '{\"inbound\": []}' >"$TMP/cm.yaml"
expect_ok "operator server-side-applying (updating) its ConfigMap" ssa "$TMP/cm.yaml"
kubectl -n $NS create secret generic partnergate-connector-material --from-literal=x.pem=x --dry-run=client -o yaml >"$TMP/secret.yaml"
expect_ok "operator server-side-applying its Secret" ssa "$TMP/secret.yaml"
expect_forbidden "operator deleting its ConfigMap" kubectl --as=$OP -n $NS delete configmap partnergate-connectors
expect_forbidden "operator writing a Secret elsewhere" kubectl --as=$OP -n default create secret generic x --from-literal=a=b
printf 'apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata: {name: %s, namespace: %s}\nspec: {holderIdentity: a}\n' \
  partnergate-operator $NS >"$TMP/lease.yaml"
expect_ok "operator creating its Lease" kubectl --as=$OP create -f "$TMP/lease.yaml"
expect_ok "operator updating its Lease" kubectl --as=$OP -n $NS annotate lease partnergate-operator renewed=1
sed 's/name: partnergate-operator/name: other/' "$TMP/lease.yaml" | kubectl create -f - >/dev/null
expect_forbidden "operator updating another Lease" kubectl --as=$OP -n $NS annotate lease other renewed=1
echo "ok   operator RBAC as evaluated by the API server (SSA create by name, no POST create, no delete)"

kubectl auth can-i --list --as=$OP -n $NS | awk 'NR > 1 && $1 !~ /^\[/ && $1 !~ /^self/' | tr -s ' ' | sort >"$TMP/can-i.txt"
grep -v '^#' "$HERE/can-i-expected.txt" | diff -u - "$TMP/can-i.txt" || fail "kubectl auth can-i --list for the operator differs from tests/chart/can-i-expected.txt"
gw=$(kubectl auth can-i --list --as=$GW -n $NS | awk 'NR > 1 && $1 !~ /^\[/ && $1 !~ /^self/')
[ -z "$gw" ] || fail "the gateway ServiceAccount can do: $gw"
echo "ok   kubectl auth can-i --list equals can-i-expected.txt; the gateway ServiceAccount can do nothing"

kubectl create namespace mail >/dev/null; kubectl create namespace partners >/dev/null
kubectl create namespace grafana >/dev/null   # values-max.yaml puts the dashboard ConfigMap there
expect_ok "helm upgrade to values-max.yaml" helm upgrade partnergate "$CHART" -n $NS -f "$HERE/values-max.yaml" \
  --set gateway.tls.certManager.enabled=false --set metrics.serviceMonitor.enabled=false \
  --set metrics.prometheusRule.enabled=false \
  --set gateway.priorityClassName= --set operator.priorityClassName=
for ns in mail partners $NS; do
  kubectl -n $ns get role partnergate-operator-read >/dev/null || fail "no read Role in $ns after the upgrade"
done
kubectl -n grafana get configmap partnergate-dashboard -o jsonpath='{.metadata.labels.grafana_dashboard}' | grep -qx 1 ||
  fail "no dashboard ConfigMap with grafana_dashboard=1 in namespace grafana after the upgrade"
kubectl get clusterrole partnergate-operator >/dev/null 2>&1 && fail "ClusterRole still there with watchNamespaces set"
echo "ok   helm upgrade to the maximal values (Roles per watched namespace replace the ClusterRole)"

expect_ok "helm uninstall" helm uninstall partnergate -n $NS --wait
kubectl get crd partnerconnectors.partnergate.io >/dev/null || fail "helm uninstall deleted the CRD"
left=$(kubectl -n $NS get deploy,svc,sa,role,rolebinding,networkpolicy,pdb,hpa -o name | grep -v serviceaccount/default || true)
[ -z "$left" ] || fail "left after uninstall: $left"
kubectl -n grafana get configmap partnergate-dashboard >/dev/null 2>&1 && fail "dashboard ConfigMap left after uninstall"
echo "ok   helm uninstall removes the release and keeps the CRD"
echo "PASS: chart cluster tests"
