# Shared bring-up for the end-to-end suite (tests/e2e/run.sh) and `make demo`
# (tests/e2e/demo.sh). Sourced, not executed. Everything stays on this machine:
#   - a real control plane (tests/cluster: etcd, kube-apiserver, controller-manager, scheduler),
#     kube-proxy (Services route) and CoreDNS (cluster.local) on 127.0.0.1 / the pod range
#   - the process kubelet (tests/kubelet) running the chart's pods as local processes on
#     10.244.0.0/24 pod IPs (/32s on lo), resolving through the kube-dns Service
#   - the chart installed with helm, the real operator and gateways
#   - Postfix's smtp-sink as the organisation's mail server (127.0.0.1:$E2E_SINK_PORT)
#   - cert-manager's controller next to the control plane (tests/cluster/cert-manager.sh), which
#     issues every certificate: Issuers and Certificates in manifests/pki-*.yaml and the chart's
#     gateway Certificate; files for the peers (Postfix, swaks) are read from its Secrets.

E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$E2E_DIR/../.." && pwd)
E2E_WORK=${E2E_WORK:-/tmp/partnergate-e2e}
E2E_SINK_PORT=${E2E_SINK_PORT:-2626}
E2E_PARTNER_PORT=${E2E_PARTNER_PORT:-2627}
# The process kubelet's API (kubectl logs), on 127.0.0.1: tests/cluster/README.md's port table.
E2E_KUBELET_PORT=${PARTNERGATE_KUBELET_PORT:-10580}
export PARTNERGATE_CLUSTER_STATE=${PARTNERGATE_CLUSTER_STATE:-/tmp/partnergate-cluster}
export KUBECONFIG=$PARTNERGATE_CLUSTER_STATE/kubeconfig
NS=partnergate

e2e_log() { printf '\033[1m[%s] %s\033[0m\n' "$(date +%T)" "$*"; }
e2e_fail() { printf '\033[31mFAIL: %s\033[0m\n' "$*" >&2; e2e_dump; exit 1; }

e2e_dump() {
  [ -n "${E2E_NO_DUMP:-}" ] && return 0
  echo "---- pods ----" >&2
  kubectl get pods -A -o wide >&2 2>/dev/null || true
  kubectl get partnerconnectors -A >&2 2>/dev/null || true
  kubectl get certificates,issuers,clusterissuers -A >&2 2>/dev/null || true
  for f in "$E2E_WORK"/kubelet.log "$PARTNERGATE_CLUSTER_STATE"/logs/cert-manager-controller.log \
    "$PARTNERGATE_CLUSTER_STATE"/kubelet/pods/*/*.log; do
    [ -f "$f" ] || continue
    echo "---- tail $f ----" >&2
    tail -n 25 "$f" >&2
  done
}

# Tools: kubectl and helm from the cached Go builds, our binaries from cargo.
e2e_tools() {
  local bin
  bin=$("$REPO/tests/cluster/build.sh" --print-bin-dir)
  export PATH="$bin:$PATH"
  e2e_log "building partnergate binaries (cargo build)"
  (cd "$REPO" && cargo build --workspace --bins -q)
  BIN_DIR=$REPO/target/debug
}

# Every certificate comes from cert-manager (tests/cluster/cert-manager.sh runs its controller):
# manifests/pki-org.yaml (org CA, outbound client certificate) and manifests/pki-partners.yaml
# (partner CAs and their leaves); the gateway's server certificate is the chart's Certificate.
e2e_cert_manager() {
  "$REPO/tests/cluster/cert-manager.sh" >"$E2E_WORK/cert-manager-up.log" 2>&1 || {
    cat "$E2E_WORK/cert-manager-up.log" >&2
    e2e_fail "tests/cluster/cert-manager.sh"
  }
  kubectl apply -f "$E2E_DIR/manifests/pki-org.yaml" -f "$E2E_DIR/manifests/pki-partners.yaml" >/dev/null ||
    e2e_fail "applying the cert-manager Issuers and Certificates"
}
# Wait for what e2e_cert_manager applied, then hand the peers their files and Fabrikam's bundle.
e2e_cert_files() {
  local d=$E2E_WORK/pki
  kubectl -n cert-manager wait --for=condition=Ready certificate/org-ca --timeout=60s >/dev/null &&
    kubectl wait --for=condition=Ready clusterissuer/org-ca --timeout=60s >/dev/null &&
    kubectl -n mail wait --for=condition=Ready certificate --all --timeout=60s >/dev/null ||
    e2e_fail "cert-manager did not issue the test certificates: $(kubectl get certificates -A 2>&1)"
  mkdir -p "$d"
  e2e_secret_key cert-manager org-ca ca.crt >"$d/org-ca.crt"
  e2e_secret_key mail fabrikam-ca ca.crt >"$d/fabrikam-ca.crt"
  e2e_pki_files mail contoso-mail contoso-mail
  e2e_pki_files mail contoso-wrong contoso-wrong
  e2e_pki_files mail fabrikam-smtp fabrikam-smtp
  # Fabrikam's bundle as a ConfigMap (configMapRef), copied from the Secret cert-manager wrote,
  # as trust-manager would distribute it.
  kubectl -n mail create configmap fabrikam-ca --from-file=ca.crt="$d/fabrikam-ca.crt" \
    --dry-run=client -o yaml | kubectl apply -f - >/dev/null
}

# Write a cert-manager Secret's tls.crt and tls.key to $PKI/<name>.crt and .key, for the peers
# that read files (Postfix, swaks, openssl).
e2e_pki_files() { # namespace secret name
  local d=$E2E_WORK/pki
  mkdir -p "$d"
  e2e_secret_key "$1" "$2" tls.crt >"$d/$3.crt" && e2e_secret_key "$1" "$2" tls.key >"$d/$3.key" &&
    [ -s "$d/$3.crt" ] && [ -s "$d/$3.key" ] || e2e_fail "no certificate in secret $1/$2"
  chmod 0600 "$d/$3.key"
}
e2e_secret_key() { # namespace secret key -> decoded value on stdout
  kubectl -n "$1" get secret "$2" -o go-template="{{index .data \"$3\"}}" | base64 -d
}

# The organisation's mail server: Postfix's smtp-sink dumping each message to a file.
e2e_sink() {
  mkdir -p "$E2E_WORK/sink"
  pkill -f "smtp-sink.*:$E2E_SINK_PORT" 2>/dev/null || true
  (cd "$E2E_WORK/sink" && exec smtp-sink -u root -R "$E2E_WORK/sink" -d "mail." \
    "127.0.0.1:$E2E_SINK_PORT" 100 >"$E2E_WORK/sink.log" 2>&1) &
  echo $! >"$E2E_WORK/sink.pid"
}
e2e_sink_count() { find "$E2E_WORK/sink" -name 'mail.*' -type f 2>/dev/null | wc -l; }
e2e_sink_grep() { grep -rl -- "$1" "$E2E_WORK/sink" 2>/dev/null | head -n1; }

# A value of the cluster's cluster.env (written by tests/cluster/up.sh).
e2e_cluster_env() { sed -n "s/^$1=//p" "$PARTNERGATE_CLUSTER_STATE/cluster.env"; }

e2e_kubelet() {
  pkill -f "process-kubelet.*$PARTNERGATE_CLUSTER_STATE" 2>/dev/null || true
  "$BIN_DIR/process-kubelet" --kubeconfig "$KUBECONFIG" --node-name "$(e2e_cluster_env NODE_NAME)" \
    --state-dir "$PARTNERGATE_CLUSTER_STATE/kubelet" --bin-dir "$BIN_DIR" \
    --pod-cidr "$(e2e_cluster_env POD_CIDR)" --cluster-dns "$(e2e_cluster_env DNS_SERVICE_IP)" \
    --port "$E2E_KUBELET_PORT" --ca-cert-file "$PARTNERGATE_CLUSTER_STATE/pki/ca.crt" \
    --ca-key-file "$PARTNERGATE_CLUSTER_STATE/pki/ca.key" \
    >"$E2E_WORK/kubelet.log" 2>&1 &
  echo $! >"$E2E_WORK/kubelet.pid"
  local i
  for i in $(seq 60); do
    kubectl get node local-node >/dev/null 2>&1 && return 0
    sleep 1
  done
  e2e_fail "process kubelet did not register its node (see $E2E_WORK/kubelet.log)"
}

e2e_install_chart() {
  helm upgrade --install partnergate "$REPO/charts/partnergate" -n "$NS" \
    -f "$E2E_DIR/values-e2e.yaml" --wait --timeout 180s >/dev/null ||
    e2e_fail "helm install"
}

# Everything up, from scratch.
e2e_up() {
  e2e_tools
  # A clean slate: whatever an earlier run or demo left behind is stopped first.
  if [ -f "$E2E_WORK/kubelet.pid" ] || [ -f "$PARTNERGATE_CLUSTER_STATE/kubeconfig" ]; then
    e2e_log "stopping what an earlier run left (make cluster-down)"
    E2E_NO_DUMP=1 e2e_down
  fi
  rm -rf "$E2E_WORK"
  mkdir -p "$E2E_WORK"
  e2e_net_snapshot >"$E2E_WORK/net-before.txt"
  e2e_log "starting the local control plane"
  "$REPO/tests/cluster/up.sh" >"$E2E_WORK/cluster-up.log" 2>&1 || {
    cat "$E2E_WORK/cluster-up.log" >&2
    e2e_fail "tests/cluster/up.sh"
  }
  kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  kubectl create namespace mail --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  e2e_log "starting cert-manager; issuing the org and partner certificates"
  e2e_cert_manager
  e2e_sink
  e2e_log "starting the process kubelet"
  e2e_kubelet
  e2e_cert_files
  e2e_log "helm install charts/partnergate (its Certificate: gateway server certificate from org-ca)"
  e2e_install_chart
}

e2e_down() {
  local p pid i
  for p in kubelet sink; do
    [ -f "$E2E_WORK/$p.pid" ] || continue
    pid=$(cat "$E2E_WORK/$p.pid")
    kill "$pid" 2>/dev/null || true
    # The kubelet stops its pods' processes before it exits.
    for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    rm -f "$E2E_WORK/$p.pid"
  done
  "$REPO/tests/cluster/down.sh" >/dev/null 2>&1 || true
}

# The machine's network state that the cluster changes while it runs (addresses, routes and
# rules of every table, both families; iptables of both families; nft tables; the sysctls
# kube-proxy could set). Counters, lifetimes and timestamps are dropped: run.sh compares the
# snapshot taken before the cluster started with one taken after it was torn down.
e2e_net_snapshot() {
  echo "## ip addr"; ip addr | sed -E '/^\s+valid_lft/d'
  echo "## ip -4 route show table all"; ip -4 route show table all
  echo "## ip -6 route show table all"; ip -6 route show table all | sed -E 's/ expires [0-9]+sec//'
  echo "## ip rule"; ip -4 rule; ip -6 rule
  echo "## iptables-save"; iptables-save | sed -E '/^#/d; s/ \[[0-9]+:[0-9]+\]$//'
  echo "## ip6tables-save"; ip6tables-save | sed -E '/^#/d; s/ \[[0-9]+:[0-9]+\]$//'
  echo "## nft list tables"; nft list tables
  echo "## sysctl"
  sysctl net.ipv4.conf.all.route_localnet net.ipv4.ip_forward net.netfilter.nf_conntrack_max \
    net.netfilter.nf_conntrack_tcp_timeout_established net.netfilter.nf_conntrack_tcp_timeout_close_wait 2>&1
}

# Pod IPs of the ready gateway pods.
e2e_gateway_ips() {
  kubectl -n "$NS" get pods -l app.kubernetes.io/component=gateway \
    -o jsonpath='{range .items[?(@.status.podIP)]}{.status.podIP}{"\n"}{end}'
}

# swaks against a gateway pod; prints the last server reply line ("250 2.0.0 ...").
# usage: e2e_swaks <gateway-ip or ip:port> <source-ip> <from> <to> [swaks args...]
e2e_swaks() {
  local gw=$1 src=$2 from=$3 to=$4
  shift 4
  [[ $gw == *:* ]] || gw=$gw:2525
  local out rc=0 replies
  out=$(swaks --server "$gw" --local-interface "$src" --from "$from" --to "$to" \
    --header "Subject: partnergate e2e" --body "hello from $from" --timeout 30 "$@" 2>&1) || rc=$?
  printf '%s\n' "$out" >>"$E2E_WORK/swaks.log"
  replies=$(printf '%s\n' "$out" | grep -E '^<[-~*]+ +[0-9]{3} ' | grep -vE '^<[-~*]+ +221 ')
  if grep -qE '^<~?\*' <<<"$replies"; then
    # The first refusal (swaks marks it <** in plaintext, <~* in TLS).
    grep -E '^<~?\*' <<<"$replies" | head -n1 | sed -E 's/^<[-~*]+ +//'
  elif [ "$rc" -ne 0 ]; then
    # swaks gave up without a refusal (no STARTTLS offered, TLS failure, connection lost).
    echo "swaks-error($rc): $(grep -E '^\*\*\*' <<<"$out" | head -n1)"
  else
    tail -n1 <<<"$replies" | sed -E 's/^<[-~*]+ +//'
  fi
}
