#!/usr/bin/env bash
# Restart one component of a running test control plane with the very same command line, for
# fault tests (the e2e suite restarts kube-apiserver while mail flows).
#   tests/cluster/restart.sh kube-apiserver            stop (TERM), start again, wait until healthy
#   tests/cluster/restart.sh kube-apiserver --down 5   stay down 5 s before starting again
# Prints the seconds from SIGTERM to healthy again (graceful stop + --down + start). The log is
# appended to, not replaced.
set -euo pipefail
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

usage() { echo "usage: restart.sh {$(IFS='|'; echo "${COMPONENTS[*]}")} [--down SECONDS]" >&2; exit 2; }
[ $# -ge 1 ] || usage
component=$1; shift
case " ${COMPONENTS[*]} " in *" $component "*) ;; *) usage ;; esac
down_secs=0
while [ $# -gt 0 ]; do
  case $1 in
    --down) [[ ${2:-} =~ ^[0-9]+$ ]] || usage; down_secs=$2; shift 2 ;;
    *) usage ;;
  esac
done

[ -f "$STATE/$STATE_MARKER" ] || { echo "restart.sh: no cluster at $STATE" >&2; exit 1; }
# shellcheck source=/dev/null
. "$STATE/cluster.env"
pid=$(pg_pid "$component")
[ -n "$pid" ] || { echo "restart.sh: $component is not running (no live pid in $STATE/run)" >&2; exit 1; }

# The running process's own argv is the only complete record of its flags (up.sh computes them).
mapfile -d '' argv <"/proc/$pid/cmdline"
[ "${#argv[@]}" -ge 1 ] || { echo "restart.sh: cannot read the command line of pid $pid" >&2; exit 1; }

healthy() {
  case $component in
    etcd) curl -fsS --max-time 2 "http://127.0.0.1:$ETCD_PORT/health" | grep -q '"health":"true"' ;;
    kube-apiserver) [ "$(curl -sS --max-time 5 --cacert "$STATE/pki/ca.crt" --cert "$STATE/pki/admin.crt" \
      --key "$STATE/pki/admin.key" "$API_URL/readyz" 2>/dev/null)" = ok ] ;;
    kube-controller-manager) curl -fsS --max-time 2 --cacert "$STATE/pki/ca.crt" "https://127.0.0.1:$KCM_PORT/healthz" | grep -qx ok ;;
    kube-scheduler) curl -fsS --max-time 2 --cacert "$STATE/pki/ca.crt" "https://127.0.0.1:$SCHEDULER_PORT/healthz" | grep -qx ok ;;
  esac
}

t0=$(date +%s.%N)
pg_stop "$component"
sleep "$down_secs"
echo "---- restarted by restart.sh at $(date -u +%FT%TZ) ----" >>"$STATE/logs/$component.log"
setsid "${argv[@]}" >>"$STATE/logs/$component.log" 2>&1 </dev/null &
new_pid=$!
echo "$new_pid" >"$STATE/run/$component.pid"
pg_log "started $component again (pid $new_pid)"
deadline=$((SECONDS + UP_TIMEOUT))
until healthy >/dev/null 2>&1; do
  if ! kill -0 "$new_pid" 2>/dev/null; then
    echo "restart.sh: $component exited during startup; last lines of its log:" >&2
    tail -n 30 "$STATE/logs/$component.log" >&2
    exit 1
  fi
  [ $SECONDS -lt $deadline ] || { echo "restart.sh: $component not healthy after ${UP_TIMEOUT}s" >&2; exit 1; }
  sleep 0.2
done
t1=$(date +%s.%N)
took=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
pg_log "$component healthy again ${took}s after the stop began"
echo "$took"
