#!/usr/bin/env bash
# The operator against a real kube-apiserver: starts a private control plane (own state dir and
# ports, so it never touches `make demo`'s), runs operator/tests/apiserver.rs, then applies every
# file in examples/ (each must be accepted) and examples/invalid/ (each must be refused with a
# message naming a spec field), and stops the control plane.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
export PARTNERGATE_CLUSTER_STATE=${PARTNERGATE_CLUSTER_STATE:-/tmp/partnergate-operator-cluster}
export PARTNERGATE_ETCD_PORT=${PARTNERGATE_ETCD_PORT:-23797} \
       PARTNERGATE_ETCD_PEER_PORT=${PARTNERGATE_ETCD_PEER_PORT:-23807} \
       PARTNERGATE_APISERVER_PORT=${PARTNERGATE_APISERVER_PORT:-16449} \
       PARTNERGATE_KCM_PORT=${PARTNERGATE_KCM_PORT:-10573} \
       PARTNERGATE_SCHEDULER_PORT=${PARTNERGATE_SCHEDULER_PORT:-10574}
BIN=$("$REPO/tests/cluster/build.sh" --print-bin-dir)
trap '"$REPO/tests/cluster/down.sh" >/dev/null 2>&1 || true' EXIT
"$REPO/tests/cluster/up.sh"
cd "$REPO"
PARTNERGATE_KUBECONFIG=$PARTNERGATE_CLUSTER_STATE/kubeconfig \
  cargo test -p partnergate-operator --features apiserver-tests --test apiserver -- --nocapture

export KUBECONFIG=$PARTNERGATE_CLUSTER_STATE/kubeconfig
kubectl() { "$BIN/kubectl" "$@"; }
kubectl apply -f crds/partnerconnector.yaml >/dev/null
kubectl wait --for=condition=Established crd/partnerconnectors.partnergate.io --timeout=60s >/dev/null
for ns in $(grep -ho 'namespace: *[a-z0-9-]*' examples/*.yaml examples/invalid/*.yaml | awk '{print $2}' | sort -u); do
  kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
done
n=0
for f in examples/*.yaml; do
  kubectl apply -f "$f" >/dev/null || { echo "FAIL: $f was refused" >&2; exit 1; }
  n=$((n + 1))
done
echo "ok: $n examples accepted by the real apiserver"
n=0
for f in examples/invalid/*.yaml; do
  if out=$(kubectl apply -f "$f" 2>&1); then
    echo "FAIL: $f was accepted" >&2
    exit 1
  fi
  grep -qE 'spec\.[A-Za-z]' <<<"$out" || { echo "FAIL: $f refused without naming a field: $out" >&2; exit 1; }
  echo "  refused $(basename "$f"): $(sed -n 's/.* is invalid: //p' <<<"$out" | head -n1 | cut -c1-110)"
  n=$((n + 1))
done
echo "ok: $n invalid examples refused, each naming its field"
