#!/usr/bin/env bash
# The operator's integration test (operator/tests/apiserver.rs) against a real kube-apiserver:
# starts a private control plane (own state dir and ports, so it never touches `make demo`'s),
# runs the test, stops the control plane.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
export PARTNERGATE_CLUSTER_STATE=${PARTNERGATE_CLUSTER_STATE:-/tmp/partnergate-operator-cluster}
export PARTNERGATE_ETCD_PORT=43790 PARTNERGATE_ETCD_PEER_PORT=43800 PARTNERGATE_APISERVER_PORT=36443 \
       PARTNERGATE_KCM_PORT=30557 PARTNERGATE_SCHEDULER_PORT=30559
"$REPO/tests/cluster/build.sh" >/dev/null
trap '"$REPO/tests/cluster/down.sh" >/dev/null 2>&1 || true' EXIT
"$REPO/tests/cluster/up.sh"
cd "$REPO"
PARTNERGATE_KUBECONFIG=$PARTNERGATE_CLUSTER_STATE/kubeconfig \
  cargo test -p partnergate-operator --features apiserver-tests --test apiserver -- --nocapture
