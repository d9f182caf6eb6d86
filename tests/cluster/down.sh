#!/usr/bin/env bash
# Stop the test control plane started by up.sh (by its pid files), remove what it added to the
# machine's network (pod IPs, CoreDNS address, kube-proxy's chains; the shared guard routes when
# no other cluster uses them; see common.sh pg_net_down) and remove its state dir.
#   tests/cluster/down.sh           stop + remove $STATE
#   tests/cluster/down.sh --keep    stop, keep $STATE (logs, certs, etcd data) for inspection
set -euo pipefail
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

keep=0
case "${1:-}" in
  "") ;;
  --keep) keep=1 ;;
  *) echo "down.sh: unknown argument: $1" >&2; exit 2 ;;
esac

if [ ! -e "$STATE" ]; then
  pg_net_down   # a crashed run's addresses/routes/chains, if any
  pg_log "no cluster state at $STATE: nothing to do"
  exit 0
fi
if [ ! -f "$STATE/$STATE_MARKER" ]; then
  echo "down.sh: $STATE is not a partnergate cluster state dir (no $STATE_MARKER); not touching it" >&2
  exit 1
fi
pg_stop_all
pg_net_down
if [ "$keep" = 1 ]; then
  pg_log "cluster stopped; state kept in $STATE"
else
  rm -rf -- "$STATE"
  pg_log "cluster stopped; removed $STATE"
fi
