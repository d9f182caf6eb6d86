#!/usr/bin/env bash
# Rolling upgrade under load (called by run.sh on its running cluster; needs the contoso
# connector Ready and the peers' files in $E2E_WORK/pki).
#
# stream_sender.py streams STARTTLS partner mail (contoso's client certificate, from 127.0.0.20)
# through the gateway Service's ClusterIP while `helm upgrade` changes a fleet setting, which
# changes the pod template's checksum/fleet annotation and so rolls every gateway pod
# (maxSurge 1, maxUnavailable 0: a new pod must be Ready before an old one is deleted; the old
# one leaves the Service's endpoints, sleeps preStopSleepSeconds, then gets SIGTERM and drains).
# Every message must end with 250; a refused/reset connection or a 4xx up to the reply to DATA
# is retried by the sender; anything else fails. Every acknowledged message must be at the sink.
# The figures go to $E2E_WORK/rolling-upgrade.txt (run.sh prints them); the sender's summary,
# ledger and output stay in $E2E_WORK/rolling-upgrade/.
# E2E_ROLL_SOURCE (default 127.0.0.20) is the senders' address (in contoso's senderIPRanges).
#
# On a cluster without kube-proxy (no SERVICES=1 in cluster.env) the sender is pointed at the
# ready, non-terminating gateway pods instead, re-read every 0.5 s: what the endpoints would hold.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=env.sh
. "$HERE/env.sh"
PKI=$E2E_WORK/pki
RU=$E2E_WORK/rolling-upgrade
rm -rf "$RU"
mkdir -p "$RU"
SVC=partnergate-gateway
SEL=app.kubernetes.io/component=gateway
WARMUP=${E2E_ROLL_WARMUP:-20}   # messages acknowledged before the upgrade starts
AFTER=${E2E_ROLL_AFTER:-20}     # messages acknowledged after the last old pod is gone
# E2E_ROLL_PRESTOP=N: first (without load) roll the pods to preStopSleepSeconds N, to measure
# what another setting does to the loaded roll (docs/operations.md has the comparison with 0).
PRESTOP_SET=()
if [ -n "${E2E_ROLL_PRESTOP:-}" ]; then
  PRESTOP_SET=(--set "gateway.preStopSleepSeconds=$E2E_ROLL_PRESTOP")
  helm upgrade partnergate "$REPO/charts/partnergate" -n "$NS" -f "$HERE/values-e2e.yaml" "${PRESTOP_SET[@]}" \
    --wait --timeout 180s >"$RU/helm-prestop.out" 2>&1 || e2e_fail "helm upgrade (preStop): $(cat "$RU/helm-prestop.out")"
  deadline=$((SECONDS + 120))
  until [ "$(kubectl -n "$NS" get pods -l app.kubernetes.io/component=gateway --no-headers 2>/dev/null | wc -l)" -eq 2 ]; do
    [ $SECONDS -lt $deadline ] || e2e_fail "gateway pods did not settle after the preStop roll"
    sleep 0.5
  done
fi

pods_line() { # name@ip of every gateway pod, sorted
  kubectl -n "$NS" get pods -l "$SEL" -o jsonpath='{range .items[*]}{.metadata.name}@{.status.podIP}{"\n"}{end}' | sort | paste -sd' '
}
acked() { [ -f "$RU/ledger" ] && wc -l <"$RU/ledger" || echo 0; }
wait_acked() { # N SECONDS: until the ledger holds N lines, or the sender died
  local n=$1 deadline=$((SECONDS + $2))
  until [ "$(acked)" -ge "$n" ]; do
    kill -0 "$sender" 2>/dev/null || e2e_fail "the sender stopped early: $(cat "$RU/sender.out")"
    [ $SECONDS -lt $deadline ] || e2e_fail "only $(acked) of $n messages acknowledged after $2 s: $(tail -n 3 "$RU/sender.out")"
    sleep 0.2
  done
}

svc_ip=$(kubectl -n "$NS" get svc "$SVC" -o jsonpath='{.spec.clusterIP}')
svc_port=$(kubectl -n "$NS" get svc "$SVC" -o jsonpath='{.spec.ports[?(@.name=="smtp")].port}')
[ -n "$svc_ip" ] && [ -n "$svc_port" ] || e2e_fail "no ClusterIP/smtp port on Service $NS/$SVC"
target_args=()
follower=
# Routed means kube-proxy has programmed the ClusterIP (never probe it otherwise: without a rule
# and without the substrate's unreachable routes, a SYN to it would follow the default route).
# A cluster that runs kube-proxy (SERVICES=1 in cluster.env) must route it.
routed() { iptables -w 5 -t nat -S KUBE-SERVICES 2>/dev/null | grep -q -- "-d $svc_ip/32 .*--dport $svc_port "; }
if grep -qx 'SERVICES=1' "$PARTNERGATE_CLUSTER_STATE/cluster.env" 2>/dev/null; then
  deadline=$((SECONDS + 30))
  until routed; do
    [ $SECONDS -lt $deadline ] || e2e_fail "kube-proxy runs but has no rule for $SVC $svc_ip:$svc_port after 30 s"
    sleep 0.5
  done
fi
if routed; then
  mode="Service $SVC ($svc_ip:$svc_port)"
  target_args=(--target "$svc_ip:$svc_port")
else
  mode="ready gateway pods on :2525 (Service $svc_ip:$svc_port is not routed on this cluster)"
  (
    while [ ! -e "$RU/stop" ]; do
      kubectl -n "$NS" get pods -l "$SEL" -o json 2>/dev/null | python3 -c '
import json, sys
for p in json.load(sys.stdin)["items"]:
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
    if ready and not p["metadata"].get("deletionTimestamp") and p["status"].get("podIP"):
        print(p["status"]["podIP"] + ":2525")' >"$RU/targets.tmp" && mv "$RU/targets.tmp" "$RU/targets"
      sleep 0.5
    done
  ) &
  follower=$!
  target_args=(--targets-file "$RU/targets")
fi
# The routing set over time ("<epoch> ip ip ..."): the Service's ready endpoints, or in pod mode
# the sender's targets; compared below with the time each old pod got SIGTERM.
(
  while [ ! -e "$RU/stop" ]; do
    if [ -z "$follower" ]; then
      ips=$(kubectl -n "$NS" get endpointslices -l "kubernetes.io/service-name=$SVC" \
        -o jsonpath='{range .items[*].endpoints[?(@.conditions.ready==true)]}{.addresses[0]}{" "}{end}' 2>/dev/null) || ips=?
    else
      ips=$(sed 's/:2525$//' "$RU/targets" 2>/dev/null | paste -sd' ') || ips=?
    fi
    echo "$(date +%s.%N) $ips" >>"$RU/routes"
    sleep 0.2
  done
) &
router=$!
loggers=()
cleanup_ru() {
  touch "$RU/stop"
  [ -n "${sender:-}" ] && kill "$sender" 2>/dev/null || true
  [ -n "$follower" ] && kill "$follower" 2>/dev/null || true
  kill "$router" "${loggers[@]}" 2>/dev/null || true
}
trap cleanup_ru EXIT

before=$(pods_line)
hash_before=$(kubectl -n "$NS" get deploy "$SVC" -o jsonpath='{.spec.template.metadata.annotations.checksum/fleet}')
prestop=$(kubectl -n "$NS" get deploy "$SVC" -o jsonpath='{.spec.template.spec.containers[0].lifecycle.preStop.sleep.seconds}')
grace=$(kubectl -n "$NS" get deploy "$SVC" -o jsonpath='{.spec.template.spec.terminationGracePeriodSeconds}')
e2e_log "rolling upgrade: streaming STARTTLS mail to $mode; pods before: $before"
# Each old pod's log, with the kubelet's time of every line, until the pod is gone: when
# SIGTERM arrived ("shutting down") and when the gateway finished draining ("stopped").
for n in $(tr ' ' '\n' <<<"$before" | cut -d@ -f1); do
  kubectl -n "$NS" logs -f --timestamps --tail=0 "$n" >"$RU/log-$n" 2>&1 &
  loggers+=($!)
done

python3 "$HERE/stream_sender.py" send "${target_args[@]}" --source "${E2E_ROLL_SOURCE:-127.0.0.20}" \
  --cert "$PKI/contoso-mail.crt" --key "$PKI/contoso-mail.key" --cafile "$PKI/org-ca.crt" \
  --from alice@contoso.test --to bob@org.test --workers 4 --id-prefix roll \
  --stop-file "$RU/stop" --ledger "$RU/ledger" --summary "$RU/summary.json" >"$RU/sender.out" 2>&1 &
sender=$!
wait_acked "$WARMUP" 60

t0=$SECONDS
helm upgrade partnergate "$REPO/charts/partnergate" -n "$NS" -f "$HERE/values-e2e.yaml" \
  "${PRESTOP_SET[@]}" --set gateway.settings.limits.maxRecipients=99 --wait --timeout 180s >"$RU/helm.out" 2>&1 ||
  e2e_fail "helm upgrade: $(cat "$RU/helm.out")"
hash_after=$(kubectl -n "$NS" get deploy "$SVC" -o jsonpath='{.spec.template.metadata.annotations.checksum/fleet}')
[ "$hash_after" != "$hash_before" ] || e2e_fail "helm upgrade did not change the pod template's checksum/fleet"
# helm --wait returns when the new pods are Ready; the last old one may still be draining.
old_names=$(tr ' ' '\n' <<<"$before" | cut -d@ -f1)
old_gone() {
  local n
  for n in $old_names; do kubectl -n "$NS" get pod "$n" >/dev/null 2>&1 && return 1; done
  return 0
}
deadline=$((SECONDS + 120))
until old_gone; do
  [ $SECONDS -lt $deadline ] || e2e_fail "old gateway pods still exist 120 s after helm upgrade: $(pods_line)"
  sleep 0.5
done
roll_secs=$((SECONDS - t0))
wait_acked $(($(acked) + AFTER)) 60
touch "$RU/stop"
rc=0
wait "$sender" || rc=$?
sender=
after=$(pods_line)
[ -s "$RU/summary.json" ] || e2e_fail "the sender wrote no summary: $(cat "$RU/sender.out")"
[ "$rc" -eq 0 ] || e2e_fail "messages failed during the rolling upgrade: $(cat "$RU/summary.json")"
for n in $old_names; do
  grep -q "$n@" <<<"$after" && e2e_fail "old pod $n survived the upgrade"
done
[ "$(wc -w <<<"$after")" -eq "$(wc -w <<<"$before")" ] || e2e_fail "pods before: $before; after: $after"

# Every acknowledged message at the sink (the gateway answers 250 only after the upstream did).
python3 "$HERE/stream_sender.py" check --ledger "$RU/ledger" --sink "$E2E_WORK/sink" >"$RU/sink.json" ||
  e2e_fail "acknowledged messages missing at the sink: $(cat "$RU/sink.json")"

kill "$router" "${loggers[@]}" 2>/dev/null || true
python3 - "$RU/summary.json" "$RU/sink.json" "$mode" "$before" "$after" "$roll_secs" "$prestop" "$grace" "$RU" \
  >"$E2E_WORK/rolling-upgrade.txt" <<'PY' # run.sh prints it
import json, sys
s, k = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
mode, before, after, roll, prestop, grace, ru = sys.argv[3:10]
from datetime import datetime


def epoch(ts):  # kubectl --timestamps: RFC 3339 with up to 9 fractional digits
    ts = ts.rstrip("Z")
    if "." in ts:
        a, b = ts.split(".")
        ts = a + "." + b[:6]
    return datetime.fromisoformat(ts + "+00:00").timestamp()


routes = []
for line in open(f"{ru}/routes"):
    parts = line.split()
    if len(parts) >= 1 and "?" not in parts[1:]:
        routes.append((float(parts[0]), set(parts[1:])))
timeline = []
for pod in before.split():
    name, ip = pod.split("@")
    seen, out = False, None
    for t, ips in routes:
        if ip in ips:
            seen = True
        elif seen:
            out = t
            break
    term = stopped = None
    try:
        for line in open(f"{ru}/log-{name}"):
            ts, _, rest = line.partition(" ")
            if term is None and "shutting down" in rest:
                term = epoch(ts)
            if "\"stopped\"" in rest:
                stopped = epoch(ts)
    except OSError:
        pass
    if out is None or term is None:
        when = "SIGTERM at ? (no endpoint change or no shutdown line seen)"
    elif term >= out:
        when = f"SIGTERM {term - out:.1f} s after it left the endpoints"
    else:
        when = f"SIGTERM {out - term:.1f} s BEFORE it left the endpoints"
    done = f"{stopped - term:.1f} s" if term is not None and stopped is not None else "?"
    timeline.append(f"{name}: {when}, stopped {done} after SIGTERM")
codes = ", ".join(f"{c} x{n}" for c, n in s["replies"].items())
print(f"rolling upgrade through {mode}: {s['messages']} messages in {s['seconds']} s "
      f"({s['per_second']}/s, 4 senders), {s['acked']} x 250, {s['retried']} retried, "
      f"{s['failed'] + s['gave_up']} failed; attempts by reply: {codes}; "
      f"at the sink: {k['found']} of {k['acked']} ({k['missing']} missing, {k['duplicates']} duplicated); "
      f"rollout (helm upgrade to last old pod gone) {roll} s with preStop sleep {prestop or 0} s, "
      f"grace {grace} s; pods before: {before}; after: {after}; " + "; ".join(timeline))
PY
