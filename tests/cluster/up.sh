#!/usr/bin/env bash
# Start a real Kubernetes control plane on loopback only:
#   network guard -> etcd -> kube-apiserver -> kube-controller-manager -> kube-scheduler
#   [-> kube-proxy -> CoreDNS, with SERVICES=1: the default cluster]
# Binaries from build.sh (built on first use, cached after). Admin kubeconfig: $STATE/kubeconfig.
# If the cluster is already up and healthy, says so and exits 0; leftovers of a dead cluster in
# $STATE are stopped and wiped first. Knobs (env): see common.sh and README.md.
set -euo pipefail
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

for tool in openssl curl base64; do
  command -v "$tool" >/dev/null || { echo "up.sh: '$tool' is required" >&2; exit 1; }
done

if [ -n "${PARTNERGATE_BIN_DIR:-}" ]; then
  BIN=$PARTNERGATE_BIN_DIR
else
  BIN=$("$PG_CLUSTER_DIR/build.sh" --print-bin-dir)
fi
needed=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl)
[ "$SERVICES" = 1 ] && needed+=(kube-proxy coredns)
for b in "${needed[@]}"; do
  [ -x "$BIN/$b" ] || { echo "up.sh: $BIN/$b missing (run tests/cluster/build.sh)" >&2; exit 1; }
done

PKI=$STATE/pki
LOGS=$STATE/logs
RUN=$STATE/run
KUBECONFIG_ADMIN=$STATE/kubeconfig
API_URL=https://127.0.0.1:$APISERVER_PORT

api_readyz() {  # prints the body; exit status from curl
  curl -sS --max-time 5 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" \
    "$API_URL/readyz" 2>&1
}

# ---- already up? -------------------------------------------------------------------------------
if [ -f "$STATE/$STATE_MARKER" ]; then
  alive=0
  expected=("${COMPONENTS[@]}")
  [ "$SERVICES" = 1 ] && expected+=(kube-proxy coredns)
  for c in "${expected[@]}"; do [ -n "$(pg_pid "$c")" ] && alive=$((alive + 1)); done
  if [ "$alive" -eq "${#expected[@]}" ] && [ "$(api_readyz)" = ok ]; then
    pg_log "cluster already up and healthy: $API_URL (KUBECONFIG=$KUBECONFIG_ADMIN)"
    exit 0
  fi
  pg_log "found a stale/partial cluster in $STATE ($alive of ${#expected[@]} components alive): stopping and wiping it"
  pg_stop_all
  pg_net_down
  rm -rf "$STATE"
elif [ -e "$STATE" ] && [ -n "$(ls -A "$STATE" 2>/dev/null)" ]; then
  echo "up.sh: $STATE exists, is not empty and is not a partnergate cluster state dir; refusing to use it" >&2
  exit 1
fi

# ---- ports free? -------------------------------------------------------------------------------
# Ports inside the kernel's ephemeral range can be taken at any moment by an outgoing connection's
# local end (CI once lost etcd's port that way), so every default sits below it and an explicit
# choice inside it is refused. Any socket bound to the port counts, not only listeners.
read -r EPHEMERAL_LOW EPHEMERAL_HIGH </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || { EPHEMERAL_LOW=32768 EPHEMERAL_HIGH=60999; }
for p in "$ETCD_PORT" "$ETCD_PEER_PORT" "$APISERVER_PORT" "$KCM_PORT" "$SCHEDULER_PORT"; do
  if [ "$p" -ge "$EPHEMERAL_LOW" ] && [ "$p" -le "$EPHEMERAL_HIGH" ]; then
    echo "up.sh: port $p is inside the ephemeral range $EPHEMERAL_LOW-$EPHEMERAL_HIGH; pick one below $EPHEMERAL_LOW (PARTNERGATE_*_PORT)" >&2
    exit 1
  fi
  sockets=$(ss -Hatn "sport = :$p" 2>/dev/null | grep -v TIME-WAIT || true)
  if [ -n "$sockets" ]; then
    echo "up.sh: port $p is already in use (set PARTNERGATE_*_PORT to move this cluster)" >&2
    ss -Hatnp "sport = :$p" >&2 || true
    exit 1
  fi
done

net_tools=(ip)
[ "$SERVICES" = 1 ] && net_tools+=(iptables iptables-save ip6tables nft conntrack)
for tool in "${net_tools[@]}"; do
  command -v "$tool" >/dev/null || { echo "up.sh: '$tool' is required (tests/scripts/install-deps.sh)" >&2; exit 1; }
done
[ "$SERVICES" = 1 ] && for p in "$KUBE_PROXY_PORT" $((KUBE_PROXY_PORT + 1)) "$DNS_READY_PORT" $((DNS_READY_PORT + 1)); do
  pg_check_port "$p" "PARTNERGATE_KUBE_PROXY_PORT/PARTNERGATE_DNS_READY_PORT" || exit 1
done

# ---- network guard, before anything else ---------------------------------------------------------
# (also clears what a crashed run of this state dir left: its pod IPs, kube-proxy's chains)
pg_net_up
[ "$SERVICES" = 1 ] && pg_kube_proxy_cleanup
pg_log "network guard: unreachable $POD_SUPERNET, unreachable $SERVICE_CIDR, local $SERVICE_CIDR (table local)"

mkdir -p "$PKI" "$LOGS" "$RUN" "$STATE/etcd"
chmod 0700 "$STATE/etcd"
touch "$STATE/$STATE_MARKER"
cat >"$STATE/cluster.env" <<EOF
# written by tests/cluster/up.sh
K8S_VERSION=$K8S_VERSION
ETCD_VERSION=$ETCD_VERSION
BIN_DIR=$BIN
KUBECONFIG=$KUBECONFIG_ADMIN
API_URL=$API_URL
ETCD_PORT=$ETCD_PORT
ETCD_PEER_PORT=$ETCD_PEER_PORT
APISERVER_PORT=$APISERVER_PORT
KCM_PORT=$KCM_PORT
SCHEDULER_PORT=$SCHEDULER_PORT
SERVICE_CIDR=$SERVICE_CIDR
POD_SUPERNET=$POD_SUPERNET
POD_CIDR=$POD_CIDR
SERVICES=$SERVICES
DNS_SERVICE_IP=$DNS_SERVICE_IP
DNS_IP=$DNS_IP
CLUSTER_DOMAIN=$CLUSTER_DOMAIN
NODE_NAME=$NODE_NAME
SERVICE_ACCOUNT_ISSUER=https://kubernetes.default.svc.cluster.local
EOF

# ---- PKI (openssl) -----------------------------------------------------------------------------
pg_log "generating CA, certificates and service-account keys in $PKI"
(
  cd "$PKI"
  umask 077
  # ca NAME CN: a self-signed CA
  ca() {
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1.key" 2>/dev/null
    openssl req -x509 -new -key "$1.key" -sha256 -days 3650 -subj "/CN=$2" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
      -out "$1.crt" 2>/dev/null
  }
  ca ca partnergate-test-ca               # cluster CA: serving certs + client certs
  ca front-proxy-ca partnergate-front-proxy-ca   # request-header (aggregation) CA

  # leaf NAME SUBJECT EXTKEYUSAGE [SAN] (signed by $CA, default ca)
  leaf() {
    local name=$1 subj=$2 eku=$3 san=${4:-} cacert=${CA:-ca}
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$name.key" 2>/dev/null
    openssl req -new -key "$name.key" -subj "$subj" -out "$name.csr" 2>/dev/null
    {
      echo "basicConstraints=critical,CA:FALSE"
      echo "keyUsage=critical,digitalSignature,keyEncipherment"
      echo "extendedKeyUsage=$eku"
      echo "authorityKeyIdentifier=keyid"
      echo "subjectKeyIdentifier=hash"
      [ -n "$san" ] && echo "subjectAltName=$san"
    } >"$name.ext"
    openssl x509 -req -in "$name.csr" -CA "$cacert.crt" -CAkey "$cacert.key" -CAcreateserial -CAserial "$cacert.srl" \
      -days 3650 -sha256 -extfile "$name.ext" -out "$name.crt" 2>/dev/null
    rm -f "$name.csr" "$name.ext"
  }
  leaf apiserver "/CN=kube-apiserver" serverAuth \
    "IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  leaf apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" clientAuth
  leaf admin "/O=system:masters/CN=partnergate-admin" clientAuth
  leaf kube-controller-manager "/CN=system:kube-controller-manager" clientAuth
  leaf kube-scheduler "/CN=system:kube-scheduler" clientAuth
  leaf kube-proxy "/CN=system:kube-proxy" clientAuth   # built-in binding system:node-proxier
  leaf coredns "/CN=system:coredns" clientAuth         # ClusterRole system:coredns (below)
  leaf kcm-serving "/CN=kube-controller-manager" serverAuth "IP:127.0.0.1,DNS:localhost"
  leaf scheduler-serving "/CN=kube-scheduler" serverAuth "IP:127.0.0.1,DNS:localhost"
  CA=front-proxy-ca leaf front-proxy-client "/CN=front-proxy-client" clientAuth

  # Service-account token signing key pair (RS256).
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out sa.key 2>/dev/null
  openssl pkey -in sa.key -pubout -out sa.pub 2>/dev/null
  chmod 0644 ./*.crt sa.pub
)

b64() { base64 -w0 <"$1"; }
write_kubeconfig() {  # FILE USER CERT KEY
  local f=$1 user=$2 crt=$3 key=$4
  umask 077
  cat >"$f" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: partnergate
  cluster:
    server: $API_URL
    certificate-authority-data: $(b64 "$PKI/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(b64 "$crt")
    client-key-data: $(b64 "$key")
contexts:
- name: $user@partnergate
  context:
    cluster: partnergate
    user: $user
    namespace: default
current-context: $user@partnergate
EOF
  umask 022
}
write_kubeconfig "$KUBECONFIG_ADMIN" partnergate-admin "$PKI/admin.crt" "$PKI/admin.key"
write_kubeconfig "$STATE/kube-controller-manager.kubeconfig" system:kube-controller-manager \
  "$PKI/kube-controller-manager.crt" "$PKI/kube-controller-manager.key"
write_kubeconfig "$STATE/kube-scheduler.kubeconfig" system:kube-scheduler \
  "$PKI/kube-scheduler.crt" "$PKI/kube-scheduler.key"
write_kubeconfig "$STATE/kube-proxy.kubeconfig" system:kube-proxy "$PKI/kube-proxy.crt" "$PKI/kube-proxy.key"
write_kubeconfig "$STATE/coredns.kubeconfig" system:coredns "$PKI/coredns.crt" "$PKI/coredns.key"

# ---- start / wait helpers ----------------------------------------------------------------------
start() {  # NAME ARGS... : start $BIN/NAME in its own session, log to $LOGS/NAME.log, pid to $RUN
  local name=$1; shift
  setsid "$BIN/$name" "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
  echo $! >"$RUN/$name.pid"
  pg_log "started $name (pid $!, log $LOGS/$name.log)"
}

fail() {  # NAME MESSAGE
  echo "up.sh: $1: $2" >&2
  echo "---- last 40 lines of $LOGS/$1.log ----" >&2
  tail -n 40 "$LOGS/$1.log" >&2 || true
  echo "---- stopping what was started; state kept in $STATE for inspection (down.sh removes it) ----" >&2
  pg_stop_all >&2
  exit 1
}

# The process we just started still runs (neither reaped nor a zombie). Not pg_pid: right
# after `setsid ... &` the child may not have exec'd the binary yet, so a check of its command
# line races with the start and reported healthy-but-slow components as "exited".
started_alive() {  # NAME
  local pid
  pid=$(cat "$RUN/$1.pid" 2>/dev/null) || return 1
  [ -r "/proc/$pid/stat" ] || return 1
  [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]
}

wait_for() {  # NAME CHECK-COMMAND... : poll CHECK until it succeeds, the process dies, or timeout
  local name=$1; shift
  local deadline=$((SECONDS + UP_TIMEOUT)) start=$SECONDS
  until "$@" >/dev/null 2>&1; do
    started_alive "$name" || fail "$name" "process exited during startup"
    [ $SECONDS -lt $deadline ] || fail "$name" "not healthy after ${UP_TIMEOUT}s (check: $*)"
    sleep 0.5
  done
  pg_log "$name is healthy ($((SECONDS - start))s)"
}

# ---- etcd --------------------------------------------------------------------------------------
start etcd \
  --name=partnergate \
  --data-dir="$STATE/etcd" \
  --listen-client-urls="http://127.0.0.1:$ETCD_PORT" \
  --advertise-client-urls="http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster="partnergate=http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster-state=new \
  --unsafe-no-fsync=true \
  --log-level=warn
etcd_healthy() { curl -fsS --max-time 2 "http://127.0.0.1:$ETCD_PORT/health" | grep -q '"health":"true"'; }
wait_for etcd etcd_healthy

# ---- kube-apiserver ----------------------------------------------------------------------------
# Notes: --endpoint-reconciler-type=none because the apiserver listens on 127.0.0.1 only and
# Endpoints may not hold loopback IPs (the "kubernetes" Service has no endpoints; in-cluster
# clients must be pointed at 127.0.0.1:$APISERVER_PORT via KUBERNETES_SERVICE_HOST/PORT). Pod IPs
# (10.244/16) are fine in EndpointSlices, so every other Service gets endpoints. Default
# admission plugins + NodeRestriction; none needs anything external.
SA_ISSUER=https://kubernetes.default.svc.cluster.local
start kube-apiserver \
  --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
  --bind-address=127.0.0.1 \
  --advertise-address=127.0.0.1 \
  --secure-port="$APISERVER_PORT" \
  --tls-cert-file="$PKI/apiserver.crt" \
  --tls-private-key-file="$PKI/apiserver.key" \
  --client-ca-file="$PKI/ca.crt" \
  --kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" \
  --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
  --kubelet-certificate-authority="$PKI/ca.crt" \
  --kubelet-preferred-address-types=InternalIP \
  --authorization-mode=Node,RBAC \
  --enable-admission-plugins=NodeRestriction \
  --allow-privileged=true \
  --service-cluster-ip-range="$SERVICE_CIDR" \
  --service-account-issuer="$SA_ISSUER" \
  --service-account-key-file="$PKI/sa.pub" \
  --service-account-signing-key-file="$PKI/sa.key" \
  --api-audiences="$SA_ISSUER" \
  --requestheader-client-ca-file="$PKI/front-proxy-ca.crt" \
  --requestheader-allowed-names=front-proxy-client \
  --requestheader-username-headers=X-Remote-User \
  --requestheader-group-headers=X-Remote-Group \
  --requestheader-extra-headers-prefix=X-Remote-Extra- \
  --proxy-client-cert-file="$PKI/front-proxy-client.crt" \
  --proxy-client-key-file="$PKI/front-proxy-client.key" \
  --endpoint-reconciler-type=none \
  --profiling=false
api_ready() { [ "$(api_readyz)" = ok ]; }
wait_for kube-apiserver api_ready

# ---- kube-controller-manager -------------------------------------------------------------------
# Controllers: the workload/SA/endpoint/namespace ones tests need, plus root-ca publisher (the
# kube-root-ca.crt ConfigMap of projected SA volumes), clusterrole aggregation, pod GC, service-cidr,
# and node-lifecycle (removes the node.kubernetes.io/not-ready taint that admission puts on a new
# Node once it reports Ready, and marks it NotReady/unreachable when its status/Lease go stale, like
# a real cluster: a process kubelet must post status and renew its Lease in kube-node-lease).
start kube-controller-manager \
  --kubeconfig="$STATE/kube-controller-manager.kubeconfig" \
  --authentication-kubeconfig="$STATE/kube-controller-manager.kubeconfig" \
  --authorization-kubeconfig="$STATE/kube-controller-manager.kubeconfig" \
  --bind-address=127.0.0.1 \
  --secure-port="$KCM_PORT" \
  --tls-cert-file="$PKI/kcm-serving.crt" \
  --tls-private-key-file="$PKI/kcm-serving.key" \
  --client-ca-file="$PKI/ca.crt" \
  --leader-elect=false \
  --use-service-account-credentials=true \
  --root-ca-file="$PKI/ca.crt" \
  --service-account-private-key-file="$PKI/sa.key" \
  --service-cluster-ip-range="$SERVICE_CIDR" \
  --controllers=deployment-controller,replicaset-controller,garbage-collector-controller,serviceaccount-token-controller,serviceaccount-controller,endpoints-controller,endpointslice-controller,endpointslice-mirroring-controller,namespace-controller,job-controller,root-ca-certificate-publisher-controller,clusterrole-aggregation-controller,pod-garbage-collector-controller,service-cidr-controller,node-lifecycle-controller \
  --profiling=false
kcm_healthy() { curl -fsS --max-time 2 --cacert "$PKI/ca.crt" "https://127.0.0.1:$KCM_PORT/healthz" | grep -qx ok; }
wait_for kube-controller-manager kcm_healthy

# ---- kube-scheduler ----------------------------------------------------------------------------
start kube-scheduler \
  --kubeconfig="$STATE/kube-scheduler.kubeconfig" \
  --authentication-kubeconfig="$STATE/kube-scheduler.kubeconfig" \
  --authorization-kubeconfig="$STATE/kube-scheduler.kubeconfig" \
  --bind-address=127.0.0.1 \
  --secure-port="$SCHEDULER_PORT" \
  --tls-cert-file="$PKI/scheduler-serving.crt" \
  --tls-private-key-file="$PKI/scheduler-serving.key" \
  --client-ca-file="$PKI/ca.crt" \
  --leader-elect=false \
  --profiling=false
sched_healthy() { curl -fsS --max-time 2 --cacert "$PKI/ca.crt" "https://127.0.0.1:$SCHEDULER_PORT/healthz" | grep -qx ok; }
wait_for kube-scheduler sched_healthy

# ---- Services: kube-proxy (iptables mode) ------------------------------------------------------
# Only with SERVICES=1 (the default cluster): kube-proxy's chains are machine-wide. Flags that
# would change machine-wide settings are turned off, so cluster-down leaves the machine as it
# was: no conntrack sysctls (max/timeouts 0 = leave as is), no route_localnet (no NodePorts on
# localhost), and NodePorts answer on pod-range addresses only, never on an external interface
# (--nodeport-addresses). --bind-address fixes the node IP (family IPv4) without waiting for the Node, which
# the process kubelet registers later. No --cluster-cidr: see README.md (masquerade on lo).
kubectl_admin() { "$BIN/kubectl" --kubeconfig="$KUBECONFIG_ADMIN" "$@"; }
if [ "$SERVICES" = 1 ]; then
  start kube-proxy \
    --kubeconfig="$STATE/kube-proxy.kubeconfig" \
    --proxy-mode=iptables \
    --hostname-override="$NODE_NAME" \
    --bind-address=127.0.0.1 \
    --healthz-bind-address="127.0.0.1:$KUBE_PROXY_PORT" \
    --metrics-bind-address="127.0.0.1:$((KUBE_PROXY_PORT + 1))" \
    --conntrack-max-per-core=0 \
    --conntrack-tcp-timeout-established=0 \
    --conntrack-tcp-timeout-close-wait=0 \
    --iptables-localhost-nodeports=false \
    --nodeport-addresses="$POD_SUPERNET" \
    --oom-score-adj=0 \
    --profiling=false
  kp_healthy() { curl -fsS --max-time 2 "http://127.0.0.1:$KUBE_PROXY_PORT/livez" >/dev/null && iptables -t nat -S KUBE-SERVICES >/dev/null 2>&1; }
  wait_for kube-proxy kp_healthy

  # ---- cluster DNS: CoreDNS on $DNS_IP:53, Service kube-system/kube-dns ($DNS_SERVICE_IP) ------
  # CoreDNS cannot be a pod (the process kubelet runs partnergate images only), so it is a
  # process like the control plane, and kube-dns is a Service without selector plus an
  # EndpointSlice naming $DNS_IP, which kube-proxy routes like any other.
  kubectl_admin apply -f - >/dev/null <<YAML
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "system:coredns"}
rules:
- {apiGroups: [""], resources: [endpoints, services, pods, namespaces], verbs: [list, watch]}
- {apiGroups: [discovery.k8s.io], resources: [endpointslices], verbs: [list, watch]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "system:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: "system:coredns"}]
---
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels: {k8s-app: kube-dns, kubernetes.io/name: CoreDNS}
spec:
  clusterIP: $DNS_SERVICE_IP
  ports:
  - {name: dns, port: 53, protocol: UDP, targetPort: 53}
  - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 53}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kube-dns-coredns
  namespace: kube-system
  labels: {kubernetes.io/service-name: kube-dns, endpointslice.kubernetes.io/managed-by: tests.partnergate.local}
addressType: IPv4
ports:
- {name: dns, port: 53, protocol: UDP}
- {name: dns-tcp, port: 53, protocol: TCP}
endpoints:
- addresses: ["$DNS_IP"]
  conditions: {ready: true}
YAML
  ip addr replace "$DNS_IP/32" dev lo
  # Only cluster.local and its reverse zones are answered; everything else gets SERVFAIL (no
  # forward plugin: no query leaves the machine; SERVFAIL rather than NXDOMAIN so a lookup of an
  # outside name is a temporary failure, never an authoritative "does not exist").
  cat >"$STATE/Corefile" <<COREFILE
$CLUSTER_DOMAIN:53 in-addr.arpa:53 ip6.arpa:53 {
    bind $DNS_IP
    errors
    ready 127.0.0.1:$DNS_READY_PORT
    health 127.0.0.1:$((DNS_READY_PORT + 1))
    kubernetes $CLUSTER_DOMAIN in-addr.arpa ip6.arpa {
        kubeconfig $STATE/coredns.kubeconfig system:coredns@partnergate
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }
    cache 5
    loadbalance
}
.:53 {
    bind $DNS_IP
    errors
    template ANY ANY {
        rcode SERVFAIL
    }
}
COREFILE
  start coredns -conf "$STATE/Corefile"
  dns_ready() { curl -fsS --max-time 2 "http://127.0.0.1:$DNS_READY_PORT/ready" >/dev/null; }
  wait_for coredns dns_ready
  # Through the Service (kube-proxy's DNAT): the apiserver's own Service resolves.
  dns_routed() {
    python3 - "$DNS_SERVICE_IP" "kubernetes.default.svc.$CLUSTER_DOMAIN" <<'PY'
import socket, struct, sys
server, name = sys.argv[1], sys.argv[2]
q = struct.pack(">HHHHHH", 0x5047, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
s.sendto(q, (server, 53)); r = s.recv(512)
sys.exit(0 if (r[3] & 0x0F) == 0 and struct.unpack(">H", r[6:8])[0] >= 1 else 1)
PY
  }
  wait_for coredns dns_routed
fi

# ---- ready for clients -------------------------------------------------------------------------
# Pods need the namespace's "default" ServiceAccount (created by the controller-manager).
sa_ready() { "$BIN/kubectl" --kubeconfig="$KUBECONFIG_ADMIN" -n default get serviceaccount default; }
wait_for kube-controller-manager sa_ready

pg_log "cluster up: $API_URL"
echo "export KUBECONFIG=$KUBECONFIG_ADMIN"
echo "export PATH=$BIN:\$PATH"
