#!/usr/bin/env bash
# Smoke test of the test control plane: build.sh -> up.sh -> checks -> down.sh.
# Exits non-zero on any failure (the components' log tails are printed first).
# PARTNERGATE_SMOKE_KEEP=1 keeps the state dir (logs, certs) after stopping the cluster.
# Uses its own state dir and ports by default, so it never tears down a cluster you are using:
#   PARTNERGATE_CLUSTER_STATE=/tmp/partnergate-cluster-smoke, ports = defaults + 1.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

export PARTNERGATE_CLUSTER_STATE=${PARTNERGATE_CLUSTER_STATE:-/tmp/partnergate-cluster-smoke}
export PARTNERGATE_ETCD_PORT=${PARTNERGATE_ETCD_PORT:-23791}
export PARTNERGATE_ETCD_PEER_PORT=${PARTNERGATE_ETCD_PEER_PORT:-23801}
export PARTNERGATE_APISERVER_PORT=${PARTNERGATE_APISERVER_PORT:-16444}
export PARTNERGATE_KCM_PORT=${PARTNERGATE_KCM_PORT:-10558}
export PARTNERGATE_SCHEDULER_PORT=${PARTNERGATE_SCHEDULER_PORT:-10560}
. "$HERE/common.sh"

T0=$SECONDS
step() { printf '\n==> %s\n' "$*"; }
die() {
  echo "smoke: FAIL: $*" >&2
  if [ -n "${KUBECONFIG:-}" ]; then
    kubectl get nodes,pods -A -o wide >&2 || true
    kubectl get events -A --sort-by=.lastTimestamp 2>/dev/null | tail -n 20 >&2 || true
  fi
  exit 1
}
# wait_until DESCRIPTION TIMEOUT CMD...: retry CMD every 0.5 s until it succeeds
wait_until() {
  local what=$1 timeout=$2; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || die "timed out after ${timeout}s waiting for: $what"
    sleep 0.5
  done
  echo "ok: $what"
}

step "build (cached after the first run)"
"$HERE/build.sh"
BIN=$("$HERE/build.sh" --print-bin-dir)
export PATH=$BIN:$PATH

cleanup() {
  local rc=$?
  set +e
  if [ "$rc" -ne 0 ] && [ -d "$STATE/logs" ]; then
    for c in "${COMPONENTS[@]}"; do
      echo "---- last 20 lines of $STATE/logs/$c.log ----" >&2
      tail -n 20 "$STATE/logs/$c.log" >&2
    done
  fi
  step "down"
  if [ "${PARTNERGATE_SMOKE_KEEP:-0}" = 1 ]; then "$HERE/down.sh" --keep; else "$HERE/down.sh"; fi
  rm -rf "${WORK:-}"
  if [ "$rc" -eq 0 ]; then echo "smoke: PASS ($((SECONDS - T0))s)"; else echo "smoke: FAILED (exit $rc)" >&2; fi
  exit "$rc"
}
trap cleanup EXIT
WORK=$(mktemp -d)

step "up"
"$HERE/up.sh"
export KUBECONFIG=$STATE/kubeconfig
k() { kubectl "$@"; }

step "server version"
k get --raw /version | tee "$WORK/version.json"
grep -q "\"gitVersion\": *\"$K8S_VERSION\"" "$WORK/version.json" || die "/version is not $K8S_VERSION"
k version
kv=$(k version --client -o json)
grep -q "\"gitVersion\": *\"$K8S_VERSION\"" <<<"$kv" || die "kubectl is not $K8S_VERSION"

NS=pg-smoke
step "namespace $NS + Deployment"
k create namespace "$NS"
wait_until "ServiceAccount $NS/default" 60 k -n "$NS" get serviceaccount default
wait_until "ConfigMap $NS/kube-root-ca.crt (root CA publisher)" 60 k -n "$NS" get configmap kube-root-ca.crt
k -n "$NS" create deployment web --image=partnergate.invalid/smoke:0 --replicas=1 --port=25
has_rs() { [ -n "$(k -n "$NS" get replicaset -l app=web -o name)" ]; }
wait_until "ReplicaSet created by the deployment controller" 60 has_rs
owner=$(k -n "$NS" get replicaset -l app=web -o jsonpath='{.items[0].metadata.ownerReferences[0].kind}')
[ "$owner" = Deployment ] || die "ReplicaSet owned by '$owner', expected the Deployment"
has_pod() { [ -n "$(k -n "$NS" get pod -l app=web -o name)" ]; }
wait_until "Pod created by the replicaset controller" 60 has_pod
POD=$(k -n "$NS" get pod -l app=web -o jsonpath='{.items[0].metadata.name}')
phase=$(k -n "$NS" get pod "$POD" -o jsonpath='{.status.phase}')
[ "$phase" = Pending ] || die "pod $POD phase is '$phase', expected Pending (no node yet)"
unschedulable() {
  [ "$(k -n "$NS" get pod "$POD" -o jsonpath='{.status.conditions[?(@.type=="PodScheduled")].reason}')" = Unschedulable ]
}
wait_until "scheduler marks pod $POD Unschedulable (no nodes)" 60 unschedulable

step "register a Node through the API; the scheduler binds the pod to it"
cat <<'EOF' | k apply -f -
apiVersion: v1
kind: Node
metadata:
  name: smoke-node
  labels: {kubernetes.io/hostname: smoke-node, kubernetes.io/os: linux}
EOF
k patch node smoke-node --subresource=status --type=merge -p '{"status":{
  "capacity":{"cpu":"2","memory":"4Gi","pods":"10"},
  "allocatable":{"cpu":"2","memory":"4Gi","pods":"10"},
  "conditions":[{"type":"Ready","status":"True","reason":"KubeletReady","message":"smoke",
    "lastHeartbeatTime":null,"lastTransitionTime":null}],
  "addresses":[{"type":"InternalIP","address":"127.0.0.1"}]}}'
bound() { [ "$(k -n "$NS" get pod "$POD" -o jsonpath='{.spec.nodeName}')" = smoke-node ]; }
wait_until "pod $POD scheduled to smoke-node" 90 bound

step "Service: ClusterIP allocated + EndpointSlice"
k -n "$NS" expose deployment web --port=25 --target-port=25
ip=$(k -n "$NS" get service web -o jsonpath='{.spec.clusterIP}')
[[ $ip == 10.96.* ]] || die "unexpected clusterIP '$ip'"
echo "ok: clusterIP $ip"
has_slice() { [ -n "$(k -n "$NS" get endpointslice -l kubernetes.io/service-name=web -o name)" ]; }
wait_until "EndpointSlice for service web" 60 has_slice

step "ServiceAccount token (TokenRequest) authenticates"
TOKEN=$(k -n "$NS" create token default --duration=10m)
[ -n "$TOKEN" ] || die "empty token"
who=$(kubectl --kubeconfig=/dev/null --server="https://127.0.0.1:$APISERVER_PORT" \
  --certificate-authority="$STATE/pki/ca.crt" --token="$TOKEN" \
  auth whoami -o jsonpath='{.status.userInfo.username}')
[ "$who" = "system:serviceaccount:$NS:default" ] || die "token authenticated as '$who'"
echo "ok: token authenticates as $who"

step "helm"
helm version
hv=$(helm version --template '{{.Version}}')
[ "$hv" = "$HELM_VERSION" ] || die "helm is '$hv', expected $HELM_VERSION"
helm create "$WORK/smokechart" >/dev/null
helm install smoke "$WORK/smokechart" -n "$NS" --set image.repository=partnergate.invalid/smoke --set image.tag=0
hs=$(helm status smoke -n "$NS")
grep -qx 'STATUS: deployed' <<<"$hs" || die "helm release not deployed"
wait_until "Deployment smoke-smokechart from the chart" 60 k -n "$NS" get deployment smoke-smokechart
helm uninstall smoke -n "$NS" --wait --timeout 60s

step "namespace deletion (namespace, garbage-collector, pod-garbage-collector controllers)"
# No kubelet confirms deletion of pods bound to smoke-node: deleting the Node lets the
# pod-garbage-collector force-delete them (after its ~40 s quarantine), so the namespace can go.
k delete node smoke-node --wait=false
k delete namespace "$NS" --wait=false
ns_gone() { ! k get namespace "$NS" >/dev/null 2>&1; }
wait_until "namespace $NS finalized" 180 ns_gone
