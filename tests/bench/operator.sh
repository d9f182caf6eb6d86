#!/usr/bin/env bash
# Operator rows on a private local control plane (tests/cluster with its own state dir and
# ports, so it does not touch a cluster already running). Prints one JSON line on stdout.
#  1. operator RSS with BENCH_SECRETS (5,000) unrelated Secrets (referenced by no connector);
#  2. BENCH_OP_CONNECTORS (1,000) PartnerConnectors created -> all Programmed=True.
#
# The operator runs outside the cluster with the admin kubeconfig. For (2) one gateway runs on
# 127.0.0.20 and a Pod object stands for it (status patched Ready with podIP 127.0.0.20; no
# kubelet). A sync loop copies the operator's ConfigMap and Secret into the gateway's files every
# 0.25 s, standing in for the kubelet's volume updates (a real kubelet takes up to its sync
# period plus the ConfigMap cache TTL, about a minute by default).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

N=${BENCH_SECRETS:-5000}
NC=${BENCH_OP_CONNECTORS:-1000}
W=${BENCH_WORK:-$ROOT/target/bench}/operator
OP_IP=127.0.0.19 OP_PORT=8719
GW_IP=127.0.0.20 GW_PORT=2720 GW_ADMIN=8720
export PARTNERGATE_CLUSTER_STATE=${BENCH_CLUSTER_STATE:-/tmp/partnergate-bench-cluster}
export PARTNERGATE_ETCD_PORT=23795 PARTNERGATE_ETCD_PEER_PORT=23805
export PARTNERGATE_APISERVER_PORT=16453 PARTNERGATE_KCM_PORT=10567
export PARTNERGATE_SCHEDULER_PORT=10569

OP=${BENCH_OPERATOR_BIN:-}
if [ -z "$OP" ]; then
  for c in target/release/partnergate-operator \
    target/x86_64-unknown-linux-gnu/release/partnergate-operator; do
    [ -x "$c" ] && OP=$ROOT/$c && break
  done
fi
[ -n "$OP" ] || nice -n 5 cargo build -q --release -p partnergate-operator
OP=${OP:-$ROOT/target/release/partnergate-operator}
GW=${BENCH_GATEWAY_BIN:-$ROOT/target/release/partnergate-gateway}
[ -x "$GW" ] || nice -n 5 cargo build -q --release -p partnergate-gateway

rm -rf "$W"
mkdir -p "$W/gw/connectors" "$W/gw/material"
OP_PID='' GW_PID='' SYNC_PID=''
cleanup() {
  local p
  for p in $OP_PID $GW_PID $SYNC_PID; do kill "$p" 2>/dev/null || true; done
  [ "${BENCH_KEEP_CLUSTER:-0}" = 1 ] || tests/cluster/down.sh >/dev/null 2>&1 || true
}
trap cleanup EXIT

tests/cluster/up.sh >"$W/up.log" 2>&1
BIN=$(tests/cluster/build.sh --print-bin-dir)
export KUBECONFIG=$PARTNERGATE_CLUSTER_STATE/kubeconfig
k() { "$BIN/kubectl" "$@"; }
since() { python3 -c "print(round($EPOCHREALTIME - $1, 1))"; }

k apply -f crds/partnerconnector.yaml >/dev/null
k create namespace partnergate >/dev/null
k create namespace bench-secrets >/dev/null
k create namespace partners >/dev/null

"$OP" --gateway-namespace partnergate --listen $OP_IP:$OP_PORT --log-format text \
  --identity bench --gateway-admin-port $GW_ADMIN >"$W/operator.log" 2>&1 &
OP_PID=$!
for _ in $(seq 300); do
  curl -sf "http://$OP_IP:$OP_PORT/readyz" >/dev/null 2>&1 && break
  sleep 0.2
done
sleep 5
rss() { awk '/^VmRSS:/ {print $2}' "/proc/$OP_PID/status"; }

# ---- 1. N unrelated Secrets of about 1 KiB each --------------------------------------------
BEFORE=$(rss)
python3 tests/bench/gen-objects.py secrets "$N" "$W/secrets"
t0=$EPOCHREALTIME
for f in "$W"/secrets/*.json; do k create -f "$f" >/dev/null; done
SECRETS_S=$(since "$t0")
sleep 15
AFTER=$(rss)
COUNT=$(k get secrets -n bench-secrets --no-headers 2>/dev/null | wc -l)

# ---- 2. NC connectors -> all Programmed ----------------------------------------------------
(
  cd "$W/gw"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
    -subj "/CN=gateway.bench.test" -keyout server.key -out server.crt 2>/dev/null
)
echo '{"inbound": [], "outbound": []}' >"$W/gw/connectors/connectors.json"
printf '{"listen": "%s:%s", "adminListen": "%s:%s", "hostname": "gateway.bench.test",
 "serverCertificate": {"certFile": "server.crt", "keyFile": "server.key"},
 "acceptedDomains": ["example.test"], "upstream": {"host": "127.0.0.1", "port": 2, "tls": "None"},
 "materialDir": "%s"}\n' $GW_IP $GW_PORT $GW_IP $GW_ADMIN "$W/gw/material" >"$W/gw/fleet.json"
"$GW" --fleet "$W/gw/fleet.json" --connectors "$W/gw/connectors/connectors.json" >/dev/null \
  2>"$W/gateway.log" &
GW_PID=$!
python3 tests/bench/gen-objects.py sync "$BIN/kubectl" "$W/gw" >"$W/sync.log" 2>&1 &
SYNC_PID=$!
for _ in $(seq 100); do
  curl -sf "http://$GW_IP:$GW_ADMIN/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
python3 tests/bench/gen-objects.py pod | k apply -f - >/dev/null
k patch pod gateway-bench -n partnergate --subresource=status --type=merge -p \
  "{\"status\":{\"phase\":\"Running\",\"podIP\":\"$GW_IP\",\"podIPs\":[{\"ip\":\"$GW_IP\"}],\"conditions\":[{\"type\":\"Ready\",\"status\":\"True\"}]}}" >/dev/null
python3 tests/bench/gen-objects.py connectors "$NC" "$W/connectors"

t0=$EPOCHREALTIME
for f in "$W"/connectors/*.json; do k create -f "$f" >/dev/null; done
CREATED_S=$(since "$t0")
PROG=0
# Waits at most BENCH_OP_WAIT seconds after the last create (the goal is 60 s): listing 10,000
# connectors takes seconds, so a count of iterations would not bound the wait.
WAIT_UNTIL=$((SECONDS + ${BENCH_OP_WAIT:-180}))
while [ "$SECONDS" -lt "$WAIT_UNTIL" ]; do
  # An operator that died (or was killed) programs nothing more: do not wait out the loop.
  kill -0 "$OP_PID" 2>/dev/null || break
  PROG=$(k get partnerconnectors -n partners -o json | python3 tests/bench/gen-objects.py programmed)
  [ "$PROG" -ge "$NC" ] && break
  sleep 0.5
done
PROG_S=$(since "$t0")
GWN=$(curl -s "http://$GW_IP:$GW_ADMIN/status" | jq '.connectors | length')
RSS_NC=$(rss)
RSS_PEAK=$(awk '/^VmHWM:/ {print $2}' "/proc/$OP_PID/status" 2>/dev/null || echo 0)
# the box is shared: the load average next to the figures says how busy it was
LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
jq -cn --argjson secrets "$COUNT" --argjson before "$BEFORE" --argjson after "$AFTER" \
  --argjson secrets_s "$SECRETS_S" --argjson nc "$NC" --argjson prog "$PROG" \
  --argjson created_s "$CREATED_S" --argjson prog_s "$PROG_S" --argjson gwn "$GWN" \
  --argjson rss_nc "$RSS_NC" --argjson rss_peak "${RSS_PEAK:-0}" --arg load "$LOAD" --arg bin "$OP" \
  '{mode: "operator", secrets: $secrets, rss_kib_before: $before, rss_kib_after: $after,
    secrets_create_s: $secrets_s, connectors: $nc, programmed: $prog, create_s: $created_s,
    all_programmed_s: $prog_s, gateway_connectors: $gwn, rss_kib_with_connectors: $rss_nc,
    rss_kib_peak: $rss_peak, loadavg: $load, binary: $bin}'
