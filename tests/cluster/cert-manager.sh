#!/usr/bin/env bash
# Run cert-manager's controller next to the control plane that up.sh started, the way users run
# it beside partnergate, as a local process (see README.md "cert-manager" for why not a pod and
# why no webhook):
#   tests/cluster/cert-manager.sh         apply cert-manager's CRDs, create the cert-manager
#                                         namespace, start the controller and wait for it
#   tests/cluster/cert-manager.sh stop    stop the controller (down.sh does this too)
# Idempotent: if the controller already runs for this state dir, it says so and exits 0.
# Binaries and CRDs come from build.sh (v$CERT_MANAGER_VERSION, built on first use, cached).
# Invariants: listens only on 127.0.0.1:$CM_METRICS_PORT (below the ephemeral range); its pid
# file sits in $STATE/run like every component's, so pg_stop_all (down.sh, up.sh) stops it.
set -euo pipefail
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

NAME=cert-manager-controller
CM_NAMESPACE=cert-manager   # --cluster-resource-namespace: ClusterIssuers' CA Secrets live here

case "${1:-start}" in
  start) ;;
  stop) pg_stop "$NAME"; exit 0 ;;
  *) echo "cert-manager.sh: unknown argument: $1 (start|stop)" >&2; exit 2 ;;
esac

[ -f "$STATE/$STATE_MARKER" ] || { echo "cert-manager.sh: no cluster in $STATE (run up.sh first)" >&2; exit 1; }
if [ -n "${PARTNERGATE_BIN_DIR:-}" ]; then
  BIN=$PARTNERGATE_BIN_DIR
else
  BIN=$("$PG_CLUSTER_DIR/build.sh" --print-bin-dir)
fi
for f in "$NAME" cmctl kubectl cert-manager.crds.yaml; do
  [ -e "$BIN/$f" ] || { echo "cert-manager.sh: $BIN/$f missing (run tests/cluster/build.sh)" >&2; exit 1; }
done
KUBECONFIG_ADMIN=$STATE/kubeconfig
kc() { "$BIN/kubectl" --kubeconfig="$KUBECONFIG_ADMIN" "$@"; }
metrics_up() { curl -fsS --max-time 2 "http://127.0.0.1:$CM_METRICS_PORT/metrics" >/dev/null 2>&1; }

if [ -n "$(pg_pid "$NAME")" ] && metrics_up; then
  pg_log "$NAME already running (pid $(pg_pid "$NAME"))"
  exit 0
fi
pg_stop "$NAME"   # a dead or unhealthy one: its pid file goes, then a fresh start
pg_check_port "$CM_METRICS_PORT" PARTNERGATE_CERT_MANAGER_PORT || exit 1

# Server-side apply: the CRDs are too large for the last-applied annotation of client-side apply.
kc apply --server-side --force-conflicts -f "$BIN/cert-manager.crds.yaml" >/dev/null
kc wait --for=condition=Established --timeout=60s \
  crd/certificates.cert-manager.io crd/certificaterequests.cert-manager.io \
  crd/issuers.cert-manager.io crd/clusterissuers.cert-manager.io \
  crd/orders.acme.cert-manager.io crd/challenges.acme.cert-manager.io >/dev/null
kc create namespace "$CM_NAMESPACE" --dry-run=client -o yaml | kc apply -f - >/dev/null

# The admin kubeconfig (system:masters) stands in for the chart's RBAC: the process has no
# ServiceAccount. Leader election is off (one replica); metrics on loopback only.
mkdir -p "$STATE/logs" "$STATE/run"
setsid "$BIN/$NAME" \
  --kubeconfig="$KUBECONFIG_ADMIN" \
  --leader-elect=false \
  --cluster-resource-namespace="$CM_NAMESPACE" \
  --metrics-listen-address="127.0.0.1:$CM_METRICS_PORT" \
  --v=2 >"$STATE/logs/$NAME.log" 2>&1 </dev/null &
echo $! >"$STATE/run/$NAME.pid"
pg_log "started $NAME (pid $!, log $STATE/logs/$NAME.log)"

deadline=$((SECONDS + UP_TIMEOUT))
until metrics_up; do
  if ! kill -0 "$(cat "$STATE/run/$NAME.pid")" 2>/dev/null || [ $SECONDS -ge $deadline ]; then
    echo "cert-manager.sh: $NAME did not come up; last 40 lines of its log:" >&2
    tail -n 40 "$STATE/logs/$NAME.log" >&2 || true
    pg_stop "$NAME" >&2
    exit 1
  fi
  sleep 0.5
done
pg_log "$NAME is up (metrics http://127.0.0.1:$CM_METRICS_PORT/metrics)"
