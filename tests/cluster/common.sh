# Shared settings for up.sh / down.sh / smoke.sh / cert-manager.sh (sourced, not executed).
# Every knob is an environment variable with a fixed default, so two clusters can coexist when
# they differ in PARTNERGATE_CLUSTER_STATE and the ports.

PG_CLUSTER_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
. "$PG_CLUSTER_DIR/versions.env"

STATE=${PARTNERGATE_CLUSTER_STATE:-/tmp/partnergate-cluster}
ETCD_PORT=${PARTNERGATE_ETCD_PORT:-23790}            # etcd client (http, 127.0.0.1)
ETCD_PEER_PORT=${PARTNERGATE_ETCD_PEER_PORT:-23800}  # etcd peer (http, 127.0.0.1)
APISERVER_PORT=${PARTNERGATE_APISERVER_PORT:-16443}  # kube-apiserver secure port (https)
KCM_PORT=${PARTNERGATE_KCM_PORT:-10557}              # kube-controller-manager /healthz (https)
SCHEDULER_PORT=${PARTNERGATE_SCHEDULER_PORT:-10559}  # kube-scheduler /healthz (https)
CM_METRICS_PORT=${PARTNERGATE_CERT_MANAGER_PORT:-10575}  # cert-manager controller /metrics (http)
UP_TIMEOUT=${PARTNERGATE_UP_TIMEOUT:-120}            # seconds to wait for each component
SERVICE_CIDR=10.96.0.0/16                            # config only: nothing routes there
STATE_MARKER=.partnergate-cluster                    # down.sh only deletes dirs holding this

# Stop order is the reverse of this.
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler)
# Started on demand next to the control plane (cert-manager.sh); stopped before COMPONENTS.
ADDONS=(cert-manager-controller)

pg_log() { printf '[%s] %s\n' "$(date +%T)" "$*"; }

# pid of component $1 if its pid file names a live process of that binary, else empty.
pg_pid() {
  local f=$STATE/run/$1.pid pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f" 2>/dev/null) || return 0
  [[ $pid =~ ^[0-9]+$ ]] || return 0
  # Guard against pid reuse: the process must be the component's binary.
  if [ -r "/proc/$pid/cmdline" ] && tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | head -n1 | grep -q "/$1\$"; then
    echo "$pid"
  fi
}

# Stop component $1 by its pid file: TERM, then KILL after 15 s.
pg_stop() {
  local c=$1 pid n
  pid=$(pg_pid "$c")
  if [ -n "$pid" ]; then
    kill -TERM "$pid" 2>/dev/null || true
    n=0
    while kill -0 "$pid" 2>/dev/null && [ $n -lt 150 ]; do sleep 0.1; n=$((n + 1)); done
    if kill -0 "$pid" 2>/dev/null; then
      kill -KILL "$pid" 2>/dev/null || true
      pg_log "stopped $c (pid $pid, SIGKILL)"
    else
      pg_log "stopped $c (pid $pid)"
    fi
  fi
  rm -f "$STATE/run/$c.pid"
}

# Stop every add-on, then every component in the reverse of the start order.
pg_stop_all() {
  local i
  for i in "${ADDONS[@]}"; do pg_stop "$i"; done
  for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
    pg_stop "${COMPONENTS[$i]}"
  done
}

# Refuse a port inside the kernel's ephemeral range or held by any socket (see README.md: a port
# in that range can be taken by an outgoing connection's local end between this check and bind).
pg_check_port() {  # PORT ENV-NAME
  local p=$1 low high sockets
  read -r low high </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || { low=32768 high=60999; }
  if [ "$p" -ge "$low" ] && [ "$p" -le "$high" ]; then
    echo "port $p is inside the ephemeral range $low-$high; pick one below $low ($2)" >&2
    return 1
  fi
  sockets=$(ss -Hatn "sport = :$p" 2>/dev/null | grep -v TIME-WAIT || true)
  if [ -n "$sockets" ]; then
    echo "port $p is already in use (set $2 to move it)" >&2
    ss -Hatnp "sport = :$p" >&2 || true
    return 1
  fi
}
