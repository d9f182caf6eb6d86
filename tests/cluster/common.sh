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
STATE_MARKER=.partnergate-cluster                    # down.sh only deletes dirs holding this

# Stop order is the reverse of this.
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler)
# Started on demand next to the control plane (cert-manager.sh) or with SERVICES=1 (kube-proxy,
# coredns); stopped before COMPONENTS.
ADDONS=(cert-manager-controller coredns kube-proxy)

# ---- network (pod IPs, Services, DNS; see README.md "Network") -------------------------------
# The pod CIDR of every test cluster and the service CIDR are guarded by `unreachable` routes
# (shared by all clusters on the machine, reference-counted in $NET_DIR): an address of these
# ranges that is not assigned fails locally and nothing follows the default route.
POD_SUPERNET=10.244.0.0/16
SERVICE_CIDR=10.96.0.0/16
# This cluster's pod IPs (the process kubelet's --pod-cidr, /32s on lo): the default cluster
# (make cluster-up, demo, e2e) has 10.244.0.0/24; a suite with its own control plane that runs a
# kubelet sets its own /24 (tests/kubelet/smoke.sh: 10.244.3.0/24). Empty: no pod IPs, nothing to
# clean. Cleanup removes the addresses of this range only, never another cluster's.
if [ -z "${PARTNERGATE_POD_CIDR+x}" ] && [ "$STATE" = /tmp/partnergate-cluster ]; then
  POD_CIDR=10.244.0.0/24
else
  POD_CIDR=${PARTNERGATE_POD_CIDR:-}
fi
# Services that route (kube-proxy, iptables mode) and cluster DNS (CoreDNS). kube-proxy owns
# machine-wide iptables chains (KUBE-SERVICES, ...), so only one cluster may run them: on by
# default for the default cluster only (PARTNERGATE_SERVICES=0/1 overrides).
if [ "$STATE" = /tmp/partnergate-cluster ]; then SERVICES=${PARTNERGATE_SERVICES:-1}; else SERVICES=${PARTNERGATE_SERVICES:-0}; fi
DNS_IP=${PARTNERGATE_DNS_IP:-10.244.1.10}            # CoreDNS listens here (a /32 on lo), port 53
DNS_SERVICE_IP=10.96.0.10                            # kube-system/kube-dns ClusterIP -> $DNS_IP
CLUSTER_DOMAIN=cluster.local
NODE_NAME=${PARTNERGATE_NODE_NAME:-local-node}       # kube-proxy's --hostname-override (= the kubelet's node)
KUBE_PROXY_PORT=${PARTNERGATE_KUBE_PROXY_PORT:-10576}  # kube-proxy /livez (metrics: +1)
DNS_READY_PORT=${PARTNERGATE_DNS_READY_PORT:-10578}  # CoreDNS /ready (health: +1), 127.0.0.1
NET_DIR=/run/partnergate-net                         # users/<id> = state dirs using the guard

pg_ip_addr_in() {  # CIDR: the IPv4 addresses on lo inside CIDR
  ip -4 -o addr show dev lo | awk '{print $4}' | cut -d/ -f1 | while read -r a; do
    python3 -c 'import ipaddress,sys; sys.exit(0 if ipaddress.ip_address(sys.argv[1]) in ipaddress.ip_network(sys.argv[2]) else 1)' "$a" "$1" && echo "$a"
  done
  return 0
}

# The guard, before anything else: unreachable routes for the pod and service CIDRs, and a
# `local` route for the service CIDR in table local. The local route is needed because for
# locally originated packets the route lookup happens at connect(), before nat OUTPUT where
# kube-proxy DNATs a ClusterIP: with only the unreachable route, connect() to a ClusterIP fails
# with EHOSTUNREACH before any DNAT. As a local destination the packet reaches OUTPUT, is DNATed
# to a pod IP (also local), and a ClusterIP without a rule is refused by the local stack.
pg_net_up() {
  mkdir -p "$NET_DIR/users"
  (
    flock 8
    if ! ip -4 route show table main type unreachable | grep -q "^unreachable $POD_SUPERNET"; then
      # first user: remember which nft tables existed, so the last one can remove what
      # kube-proxy/iptables created (iptables-nft leaves empty tables behind)
      { nft list tables 2>/dev/null || true; } >"$NET_DIR/nft-tables.before"
    fi
    ip route replace unreachable "$POD_SUPERNET"
    ip route replace unreachable "$SERVICE_CIDR"
    ip route replace local "$SERVICE_CIDR" dev lo src 127.0.0.1 table local
    printf '%s\n' "$STATE" >"$NET_DIR/users/$(printf '%s' "$STATE" | md5sum | cut -c1-16)"
  ) 8>"$NET_DIR/.lock"
  pg_net_flush   # a crashed run's pod IPs
}

pg_net_flush() {  # this cluster's addresses on lo: pod IPs, CoreDNS
  local a
  if [ -n "$POD_CIDR" ]; then
    for a in $(pg_ip_addr_in "$POD_CIDR"); do ip addr del "$a/32" dev lo 2>/dev/null || true; done
  fi
  if [ "$SERVICES" = 1 ]; then ip addr del "$DNS_IP/32" dev lo 2>/dev/null || true; fi
  return 0
}

# kube-proxy's chains (both families) and the service CIDR's conntrack entries.
pg_kube_proxy_cleanup() {
  [ -x "${BIN:-}/kube-proxy" ] || BIN=$("$PG_CLUSTER_DIR/build.sh" --print-bin-dir 2>/dev/null) || return 0
  "$BIN/kube-proxy" --cleanup --proxy-mode=iptables >/dev/null 2>&1 || true
  # --cleanup leaves KUBE-FIREWALL (and any chain of an older kube-proxy): every KUBE-* chain of
  # both families goes, after the rules of the built-in chains that jump to one.
  local ipt t line c
  for ipt in iptables ip6tables; do
    for t in filter nat mangle raw; do
      "$ipt-save" -t "$t" 2>/dev/null | grep -E '^-A [A-Z]+ .*-j KUBE-' | grep -vE '^-A KUBE-' | while read -r line; do
        eval "\"\$ipt\" -t \"\$t\" ${line/#-A/-D}" 2>/dev/null || true
      done || true
      for c in $("$ipt-save" -t "$t" 2>/dev/null | sed -n 's/^:\(KUBE-[^ ]*\) .*/\1/p'); do "$ipt" -t "$t" -F "$c" 2>/dev/null || true; done
      for c in $("$ipt-save" -t "$t" 2>/dev/null | sed -n 's/^:\(KUBE-[^ ]*\) .*/\1/p'); do "$ipt" -t "$t" -X "$c" 2>/dev/null || true; done
    done
  done
  conntrack -D -d "$SERVICE_CIDR" >/dev/null 2>&1 || true
  return 0
}

# Undo pg_net_up for this state dir; the last user (no other live cluster) removes the guard and
# every nft table that did not exist before the first user and holds no rule.
pg_net_down() {
  [ -d "$NET_DIR" ] || return 0
  pg_net_flush
  [ "$SERVICES" = 1 ] && pg_kube_proxy_cleanup
  (
    flock 8
    rm -f "$NET_DIR/users/$(printf '%s' "$STATE" | md5sum | cut -c1-16)"
    local u s live=0
    for u in "$NET_DIR"/users/*; do
      [ -f "$u" ] || continue
      s=$(cat "$u")
      if [ -f "$s/$STATE_MARKER" ] && [ -n "$(STATE=$s pg_pid etcd)" ]; then live=$((live + 1)); else rm -f "$u"; fi
    done
    [ "$live" -eq 0 ] || exit 0
    ip route del local "$SERVICE_CIDR" dev lo table local 2>/dev/null || true
    ip route del unreachable "$SERVICE_CIDR" 2>/dev/null || true
    ip route del unreachable "$POD_SUPERNET" 2>/dev/null || true
    if command -v nft >/dev/null; then
      local fam name
      nft list tables 2>/dev/null | while read -r _ fam name; do
        grep -qx "table $fam $name" "$NET_DIR/nft-tables.before" 2>/dev/null && continue
        # only chain headers, no rule: what `iptables` leaves after kube-proxy --cleanup
        if ! nft list table "$fam" "$name" | grep -vE '^\s*(table|chain|type|policy|\}|$)' | grep -q .; then
          nft delete table "$fam" "$name"
        fi
      done
    fi
    rm -f "$NET_DIR/nft-tables.before" "$NET_DIR/.lock"
    rmdir "$NET_DIR/users" "$NET_DIR" 2>/dev/null || true
  ) 8>>"$NET_DIR/.lock"
}

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
