#!/usr/bin/env bash
# End-to-end suite on the local control plane: the real chart, operator and gateways (as pods
# run by the process kubelet), real Postfix partners, swaks and openssl. See tests/e2e/env.sh.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=env.sh
. "$HERE/env.sh"
# shellcheck source=postfix.sh
. "$HERE/postfix.sh"

passed=0
pass() { passed=$((passed + 1)); printf '\033[32mok\033[0m %s\n' "$*"; }
expect_reply() { # got want what
  [[ "$1" == "$2"* ]] || e2e_fail "$3: expected '$2...', got '${1:-<no reply>}'"
  pass "$3 -> $1"
}
cleanup() {
  local rc=$?
  if [ -n "${streamer:-}" ]; then # the renewal/fault-time sender, if a check failed while it ran
    touch "$E2E_WORK/fault-stream.stop" "$E2E_WORK/rotation.stop"
    kill "$streamer" 2>/dev/null || true
    pkill -f 'X-E2E-Id: (fault|rot)-' 2>/dev/null || true # its swaks, grandchildren of the loop
  fi
  # A kube-apiserver restart in progress finishes before the cluster is torn down, so it
  # cannot start an apiserver that down.sh no longer knows about.
  [ -n "${restarter:-}" ] && wait "$restarter" 2>/dev/null || true
  [ -n "${frozen_pid:-}" ] && kill -CONT "$frozen_pid" 2>/dev/null || true
  e2e_postfix_down contoso
  e2e_postfix_down fabrikam
  [ -n "${E2E_KEEP:-}" ] || { "$HERE/prometheus.sh" stop; e2e_down; }
  exit $rc
}
trap cleanup EXIT

wait_for() { # seconds description command...
  local t=$1 what=$2 i
  shift 2
  for i in $(seq $((t * 2))); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  e2e_fail "timed out after ${t}s waiting for: $what"
}

status_lists() { # gateway-ip connector
  curl -fsS "http://$1:8080/status" | grep -q "\"$2\""
}

cp /etc/resolv.conf "$E2E_WORK.resolv.conf.before" 2>/dev/null || true
e2e_up
mv "$E2E_WORK.resolv.conf.before" "$E2E_WORK/resolv.conf.before"
PKI=$E2E_WORK/pki
wait_for 120 "2 ready gateway pods" \
  bash -c "[ \$(kubectl -n $NS get pods -l app.kubernetes.io/component=gateway -o jsonpath='{.items[*].status.conditions[?(@.type==\"Ready\")].status}' | tr ' ' '\n' | grep -c True) -ge 2 ]"
mapfile -t GW < <(e2e_gateway_ips)
[ ${#GW[@]} -ge 2 ] || e2e_fail "expected 2 gateway pod IPs, got: ${GW[*]:-none}"
POD_CIDR=$(e2e_cluster_env POD_CIDR)
for ip in "${GW[@]}"; do
  python3 -c 'import ipaddress,sys; sys.exit(ipaddress.ip_address(sys.argv[1]) not in ipaddress.ip_network(sys.argv[2]))' \
    "$ip" "$POD_CIDR" || e2e_fail "gateway pod IP $ip is outside the pod CIDR $POD_CIDR"
  ip -4 -o addr show dev lo | grep -qF " $ip/32 " || e2e_fail "gateway pod IP $ip is not a /32 on lo"
done
pass "chart installed: gateways at ${GW[*]} (/32s on lo in $POD_CIDR)"

# --- Services route (kube-proxy), cluster DNS (CoreDNS), nothing leaves the machine ---
SVC_IP=$(kubectl -n "$NS" get svc partnergate-gateway -o jsonpath='{.spec.clusterIP}')
slice_ips() {
  kubectl -n "$NS" get endpointslices -l kubernetes.io/service-name=partnergate-gateway \
    -o jsonpath='{range .items[*].endpoints[?(@.conditions.ready==true)]}{.addresses[0]}{"\n"}{end}' | sort
}
want_ips=$(printf '%s\n' "${GW[@]}" | sort)
slices_match() { [ "$(slice_ips)" = "$want_ips" ]; }
wait_for 30 "EndpointSlice of partnergate-gateway lists the gateway pod IPs" slices_match
pass "Service partnergate-gateway ($SVC_IP): its EndpointSlice lists the ready gateway pod IPs $(slice_ips | tr '\n' ' ')"
iptables -t nat -S KUBE-SERVICES | grep -qF -- "-d $SVC_IP/32" || e2e_fail "kube-proxy has no rule for $SVC_IP"
# Addresses nobody holds fail on this machine: a ClusterIP without a Service is refused by the
# local stack (table local's route for the service CIDR), a pod IP nobody has is unreachable.
net_err=$(python3 - <<'PY'
import errno, socket
for dst, port in (("10.96.255.254", 25), ("10.244.0.254", 2525), ("10.244.200.1", 25)):
    s = socket.socket(); s.settimeout(5)
    try:
        s.connect((dst, port)); print(f"{dst}:{port} connected")
    except OSError as e:
        print(f"{dst}:{port} {errno.errorcode.get(e.errno, e.errno)}")
PY
)
[ "$net_err" = "$(printf '10.96.255.254:25 ECONNREFUSED\n10.244.0.254:2525 EHOSTUNREACH\n10.244.200.1:25 EHOSTUNREACH')" ] ||
  e2e_fail "unassigned service/pod addresses must fail locally, got: $net_err"
pass "unassigned addresses fail locally: $(tr '\n' ',' <<<"$net_err" | sed 's/,$//; s/,/, /g')"
dns=$(dig +short +time=2 +tries=2 "@$(e2e_cluster_env DNS_SERVICE_IP)" "partnergate-gateway.$NS.svc.cluster.local")
[ "$dns" = "$SVC_IP" ] || e2e_fail "kube-dns resolves partnergate-gateway.$NS.svc.cluster.local to '$dns', not $SVC_IP"
outside=$(dig +time=2 +tries=1 "@$(e2e_cluster_env DNS_SERVICE_IP)" example.com | sed -n 's/.*status: \([A-Z]*\).*/\1/p')
[ "$outside" = SERVFAIL ] || e2e_fail "kube-dns answered a name outside cluster.local with '$outside', not SERVFAIL"
pass "kube-dns ($(e2e_cluster_env DNS_SERVICE_IP), CoreDNS): partnergate-gateway.$NS.svc.cluster.local -> $dns; example.com -> SERVFAIL (no upstream)"
gw_pid=$(kubectl -n "$NS" get pods -l app.kubernetes.io/component=gateway -o jsonpath='{.items[0].status.containerStatuses[0].containerID}')
gw_pid=${gw_pid#process://}
grep -qx "nameserver $(e2e_cluster_env DNS_SERVICE_IP)" "/proc/$gw_pid/root/etc/resolv.conf" ||
  e2e_fail "gateway process $gw_pid does not see the cluster resolv.conf: $(cat "/proc/$gw_pid/root/etc/resolv.conf")"
grep -qx "search $NS.svc.cluster.local svc.cluster.local cluster.local" "/proc/$gw_pid/root/etc/resolv.conf" ||
  e2e_fail "gateway process $gw_pid: wrong search path in its resolv.conf"
cmp -s /etc/resolv.conf "$E2E_WORK/resolv.conf.before" || e2e_fail "the machine's /etc/resolv.conf changed"
pass "gateway process $gw_pid resolves through kube-dns (its mount namespace's /etc/resolv.conf); the machine's /etc/resolv.conf is unchanged"
out=$(helm test partnergate -n "$NS" --timeout 120s 2>&1) || e2e_fail "helm test partnergate: $out"
grep -q 'Phase:.*Succeeded' <<<"$out" || e2e_fail "helm test partnergate: no succeeded test in: $out"
pass "helm test partnergate: $(grep -E '^(TEST SUITE|Phase)' <<<"$out" | tr -s ' ' | paste -sd' ' -) (probe of partnergate-gateway.$NS.svc.cluster.local via CoreDNS and the ClusterIP, STARTTLS verified against org-ca)"

# --- apply-time validation (CEL) ---
if out=$(kubectl apply -f - 2>&1 <<'YAML'
apiVersion: partnergate.io/v1alpha1
kind: PartnerConnector
metadata: {name: broken, namespace: mail}
spec:
  direction: Inbound
  domains: ["contoso.test"]
  inbound: {identifyBy: SenderIP}
YAML
); then
  e2e_fail "a SenderIP connector without senderIPRanges was accepted"
fi
grep -q senderIPRanges <<<"$out" || e2e_fail "CEL rejection does not name the field: $out"
pass "kubectl apply refuses identifyBy: SenderIP without senderIPRanges ($(tail -n1 <<<"$out" | cut -c1-120))"

# --- connectors become Ready ---
kubectl apply -f "$HERE/manifests/contoso.yaml" -f "$HERE/manifests/fabrikam.yaml" -f "$HERE/manifests/northwind.yaml" >/dev/null
kubectl -n mail wait --for=condition=Ready partnerconnector/contoso partnerconnector/fabrikam partnerconnector/northwind --timeout=120s >/dev/null ||
  e2e_fail "kubectl wait --for=condition=Ready"
pass "kubectl wait --for=condition=Ready partnerconnector/contoso partnerconnector/fabrikam partnerconnector/northwind"
for ip in "${GW[@]}"; do status_lists "$ip" mail/contoso || e2e_fail "gateway $ip /status lacks mail/contoso"; done
pass "every gateway's /status lists mail/contoso"

CONTOSO_TLS=(--tls --tls-cert "$PKI/contoso-mail.crt" --tls-key "$PKI/contoso-mail.key")
WRONG_TLS=(--tls --tls-cert "$PKI/contoso-wrong.crt" --tls-key "$PKI/contoso-wrong.key")

# --- inbound rules, on every gateway pod ---
for ip in "${GW[@]}"; do
  id="e2e-accept-$ip-$RANDOM"
  got=$(e2e_swaks "$ip" 127.0.0.20 alice@contoso.test bob@org.test "${CONTOSO_TLS[@]}" --header "X-E2E-Id: $id" \
    --header "X-Partnergate-Connector: spoofed")
  expect_reply "$got" "250" "[$ip] contoso over STARTTLS with mail.contoso.test certificate"
  f=$(e2e_sink_grep "$id")
  [ -n "$f" ] || e2e_fail "[$ip] accepted message $id is not at the sink"
  grep -qi '^X-Partnergate-Connector: mail/contoso' "$f" || e2e_fail "[$ip] no X-Partnergate-Connector header for mail/contoso in $f"
  ! grep -qi '^X-Partnergate-Connector: spoofed' "$f" || e2e_fail "[$ip] spoofed X-Partnergate-Connector header survived"
  grep -qi '^Received: ' "$f" || e2e_fail "[$ip] no Received: header"
  pass "[$ip] sink has the message with Received: and X-Partnergate-Connector: mail/contoso, spoof removed"

  got=$(e2e_swaks "$ip" 127.0.0.20 alice@contoso.test bob@org.test)
  expect_reply "$got" "530 5.7.0" "[$ip] contoso in plaintext"
  got=$(e2e_swaks "$ip" 127.0.0.20 alice@contoso.test bob@org.test "${WRONG_TLS[@]}")
  expect_reply "$got" "550 5.7.1" "[$ip] contoso with a certificate for mail.evil.test"
  got=$(e2e_swaks "$ip" 127.0.0.22 alice@contoso.test bob@org.test "${CONTOSO_TLS[@]}")
  expect_reply "$got" "550 5.7.1" "[$ip] contoso from 127.0.0.22 (outside senderIPRanges)"
done

# --- partner mail to the Service: kube-proxy DNATs the ClusterIP to a ready gateway pod, and the
# partner's source IP is kept (no masquerade), so senderIPRanges still decide ---
svc_ids=()
for n in 1 2 3 4; do
  id="e2e-svc-$n-$RANDOM"
  got=$(e2e_swaks "$SVC_IP:25" 127.0.0.20 alice@contoso.test bob@org.test "${CONTOSO_TLS[@]}" --header "X-E2E-Id: $id")
  expect_reply "$got" "250" "Service $SVC_IP:25: contoso over STARTTLS from 127.0.0.20 (message $n)"
  svc_ids+=("$id")
done
for id in "${svc_ids[@]}"; do
  f=$(e2e_sink_grep "$id")
  [ -n "$f" ] || e2e_fail "message $id accepted through the Service is not at the sink"
  grep -qi '^X-Partnergate-Connector: mail/contoso' "$f" || e2e_fail "message $id through the Service was not matched to mail/contoso"
done
pass "all ${#svc_ids[@]} messages sent to the Service are at the sink, matched to mail/contoso"
got=$(e2e_swaks "$SVC_IP:25" 127.0.0.22 alice@contoso.test bob@org.test "${CONTOSO_TLS[@]}")
expect_reply "$got" "550 5.7.1" "Service $SVC_IP:25: contoso from 127.0.0.22 (outside senderIPRanges: the source IP survives the DNAT)"

# --- kubectl logs of a gateway pod: the apiserver reads them from the process kubelet's API ---
gw_pod=$(kubectl -n "$NS" get pods -l app.kubernetes.io/component=gateway --field-selector "status.podIP=${GW[0]}" -o jsonpath='{.items[0].metadata.name}')
[ -n "$gw_pod" ] || e2e_fail "no gateway pod with IP ${GW[0]}"
logs=$(kubectl -n "$NS" logs "$gw_pod" 2>&1) || e2e_fail "kubectl logs $gw_pod: $logs"
decisions=$(grep -c '"target":"decision"' <<<"$logs" || true)
grep '"target":"decision"' <<<"$logs" | grep -q '"client_ip":"127.0.0.20"' ||
  e2e_fail "kubectl logs $gw_pod shows no decision line for 127.0.0.20: $(tail -n 3 <<<"$logs")"
kubectl -n "$NS" logs -f --tail=0 "$gw_pod" >"$E2E_WORK/logs-follow.out" 2>&1 &
follower=$!
sleep 1 # kubectl has its stream open (--tail=0 prints nothing to wait for)
got=$(e2e_swaks "${GW[0]}" 127.0.0.22 alice@contoso.test bob@org.test)
followed() { grep '"target":"decision"' "$E2E_WORK/logs-follow.out" | grep -q '"client_ip":"127.0.0.22"'; }
for _ in $(seq 40); do followed && break; sleep 0.5; done
kill "$follower" 2>/dev/null || true
wait "$follower" 2>/dev/null || true
followed || e2e_fail "kubectl logs -f $gw_pod did not stream the decision for 127.0.0.22 ($got): $(cat "$E2E_WORK/logs-follow.out")"
pass "kubectl logs $gw_pod: $decisions decision lines incl. 127.0.0.20's; kubectl logs -f streamed the new decision for 127.0.0.22 ($got)"

# --- Contoso's real Postfix relays to the gateway with its client certificate ---
e2e_postfix_up contoso 127.0.0.21 2628 "
relayhost = [${GW[0]}]:2525
smtp_bind_address = 127.0.0.20
smtp_tls_security_level = encrypt
smtp_tls_cert_file = $PKI/contoso-mail.crt
smtp_tls_key_file = $PKI/contoso-mail.key
smtp_tls_CAfile = $PKI/org-ca.crt" || e2e_fail "contoso postfix did not start"
id="e2e-postfix-$RANDOM"
got=$(e2e_swaks 127.0.0.21:2628 127.0.0.1 carol@contoso.test dave@org.test --header "X-E2E-Id: $id")
expect_reply "$got" "250" "contoso postfix queued a message for org.test"
e2e_postfix_wait_log contoso "status=sent \(250" 60 ||
  e2e_fail "contoso postfix did not deliver through the gateway: $(tail -n 5 "$(e2e_postfix_log contoso)")"
wait_for 20 "postfix-relayed message at the sink" test -n "$(e2e_sink_grep "$id")"
pass "Postfix (smtp_tls_security_level=encrypt, client cert, bind 127.0.0.20) -> gateway -> sink"

# --- outbound: DomainValidation to Fabrikam's Postfix, with our client certificate ---
e2e_postfix_up fabrikam 127.0.0.30 "$E2E_PARTNER_PORT" "
relay_domains = fabrikam.test northwind.test
default_transport = discard:partner test
relay_transport = discard:partner test
smtpd_tls_security_level = may
smtpd_tls_cert_file = $PKI/fabrikam-smtp.crt
smtpd_tls_key_file = $PKI/fabrikam-smtp.key
smtpd_tls_ask_ccert = yes
smtpd_tls_CAfile = $PKI/org-ca.crt" || e2e_fail "fabrikam postfix did not start"
got=$(e2e_swaks "${GW[0]}" 127.0.0.40 relay@org.test erin@fabrikam.test)
expect_reply "$got" "250" "internal sender -> erin@fabrikam.test (DomainValidation smtp.fabrikam.test)"
e2e_postfix_wait_log fabrikam "discard.*erin@fabrikam.test.*status=sent" 30 ||
  e2e_fail "fabrikam postfix did not receive the message"
grep -q "Trusted TLS connection established from" "$(e2e_postfix_log fabrikam)" ||
  e2e_fail "fabrikam postfix did not see our trusted client certificate"
pass "fabrikam postfix received it over TLS and verified our client certificate"
got=$(e2e_swaks "${GW[0]}" 127.0.0.40 relay@org.test frank@northwind.test)
expect_reply "$got" "451 4.7.5" "internal sender -> northwind.test (certificate not valid for smtp.northwind.test)"
! grep -q "frank@northwind.test" "$(e2e_postfix_log fabrikam)" || e2e_fail "northwind mail reached the partner despite the name mismatch"
wait_for 90 "status.validation of fabrikam shows a successful probe" bash -c \
  "kubectl -n mail get partnerconnector fabrikam -o jsonpath='{.status.validation[*].result}' | grep -q Success"
wait_for 90 "a ValidationFailed Warning event for northwind" bash -c \
  "kubectl -n mail get events --field-selector reason=ValidationFailed,involvedObject.name=northwind -o name | grep -q ."
pass "connector validation: fabrikam probe Success in status.validation, northwind raised a ValidationFailed Warning"
got=$(e2e_swaks "${GW[0]}" 127.0.0.22 someone@elsewhere.test erin@fabrikam.test)
expect_reply "$got" "550 5.7.1" "non-internal sender -> fabrikam.test (relaying denied)"

# --- renewal through cert-manager while a sender streams messages ---
# `cmctl renew` of the gateway's server certificate (new key: rotationPolicy Always) and of
# Contoso's CA (same key, new notAfter) while contoso sessions go to both gateways. The stream
# runs until every gateway serves the renewed certificate, every gateway has loaded the config
# holding the renewed CA and contoso's status.certificates shows it, and at least 30 sessions;
# each must get 250. (The later checks compare configHash, so this also settles the reload.)
serial_of() { openssl x509 -noout -serial | sed 's/^serial=//'; }
served_serial() { echo QUIT | openssl s_client -starttls smtp -connect "$1:2525" 2>/dev/null | serial_of; }
secret_serial() { e2e_secret_key "$1" "$2" tls.crt | serial_of; }
epoch_of() { date -u -d "$1" +%s 2>/dev/null; }
status_ca_epoch() { # notAfter that contoso's status.certificates shows for the contoso-ca Secret
  epoch_of "$(kubectl -n mail get partnerconnector contoso -o jsonpath='{.status.certificates[?(@.secret=="contoso-ca")].notAfter}')"
}
rendered_hash() { kubectl -n "$NS" get configmap partnergate-connectors -o jsonpath='{.metadata.annotations.partnergate\.io/config-hash}'; }
loaded_hash() { curl -fsS --max-time 5 "http://$1:8080/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["configHash"])'; }
export NS # rendered_hash runs in bash -c too
export -f serial_of served_serial epoch_of status_ca_epoch rendered_hash loaded_hash # for wait_for's bash -c
ca_not_after() { epoch_of "$(kubectl -n mail get certificate contoso-ca -o jsonpath='{.status.notAfter}')"; }
gw_serial_old=$(secret_serial "$NS" partnergate-gateway-tls)
for ip in "${GW[@]}"; do
  [ "$(served_serial "$ip")" = "$gw_serial_old" ] || e2e_fail "gateway $ip does not serve the certificate cert-manager issued ($gw_serial_old)"
done
ca_old=$(ca_not_after)
[ -n "$ca_old" ] && [ "$(status_ca_epoch)" = "$ca_old" ] ||
  e2e_fail "contoso status.certificates does not show contoso-ca's notAfter ($(kubectl -n mail get certificate contoso-ca -o jsonpath='{.status.notAfter}'))"
gw_rev_old=$(kubectl -n "$NS" get certificate partnergate-gateway -o jsonpath='{.status.revision}')
ca_rev_old=$(kubectl -n mail get certificate contoso-ca -o jsonpath='{.status.revision}')
cfg_old=$(rendered_hash)
[ -n "$cfg_old" ] || e2e_fail "no partnergate.io/config-hash on ConfigMap $NS/partnergate-connectors"
log=$E2E_WORK/rotation.log
: >"$log"
rm -f "$E2E_WORK/rotation.stop"
(
  n=0
  while [ ! -e "$E2E_WORK/rotation.stop" ] || [ $n -lt 30 ]; do
    n=$((n + 1))
    ip=${GW[$((n % ${#GW[@]}))]}
    got=$(e2e_swaks "$ip" 127.0.0.20 alice@contoso.test bob@org.test "${CONTOSO_TLS[@]}" --header "X-E2E-Id: rot-$n") || true
    echo "rot-$n $ip $got" >>"$log"
  done
) &
streamer=$!
sleep 1
cmctl renew -n "$NS" partnergate-gateway >/dev/null || e2e_fail "cmctl renew -n $NS partnergate-gateway"
cmctl renew -n mail contoso-ca >/dev/null || e2e_fail "cmctl renew -n mail contoso-ca"
wait_for 60 "cert-manager reissued partnergate-gateway and contoso-ca" bash -c \
  "[ \"\$(kubectl -n $NS get certificate partnergate-gateway -o jsonpath='{.status.revision}{.status.conditions[?(@.type==\"Ready\")].status}')\" = $((gw_rev_old + 1))True ] &&
   [ \"\$(kubectl -n mail get certificate contoso-ca -o jsonpath='{.status.revision}{.status.conditions[?(@.type==\"Ready\")].status}')\" = $((ca_rev_old + 1))True ]"
gw_serial_new=$(secret_serial "$NS" partnergate-gateway-tls)
[ "$gw_serial_new" != "$gw_serial_old" ] || e2e_fail "cmctl renew left the gateway certificate's serial at $gw_serial_old"
ca_new=$(ca_not_after)
[ "$ca_new" -gt "$ca_old" ] || e2e_fail "cmctl renew did not move contoso-ca's notAfter ($ca_old -> $ca_new)"
for ip in "${GW[@]}"; do
  wait_for 60 "the renewed certificate ($gw_serial_new) is served by $ip" bash -c "[ \"\$(served_serial $ip)\" = $gw_serial_new ]"
done
wait_for 90 "contoso status.certificates shows the renewed contoso-ca notAfter" bash -c "[ \"\$(status_ca_epoch)\" = $ca_new ]"
wait_for 60 "the operator renders the renewed contoso-ca bundle" bash -c "h=\$(rendered_hash); [ -n \"\$h\" ] && [ \"\$h\" != $cfg_old ]"
for ip in "${GW[@]}"; do # the current rendering each time: it may have moved on again meanwhile
  wait_for 60 "gateway $ip loads the config holding the renewed contoso-ca" bash -c "[ \"\$(loaded_hash $ip)\" = \"\$(rendered_hash)\" ]"
done
cfg_new=$(rendered_hash)
touch "$E2E_WORK/rotation.stop"
wait $streamer || true
streamer=
total=$(wc -l <"$log")
bad=$(grep -vc '^rot-[0-9]* [0-9.]* 250' "$log" || true)
[ "$bad" -eq 0 ] || e2e_fail "renewal: $bad of $total sessions were not accepted: $(grep -v ' 250' "$log" | head -3)"
pass "cmctl renew of the gateway certificate and Contoso's CA during $total STARTTLS sessions: $total x 250; every gateway serves serial $gw_serial_new; every gateway loaded the renewed contoso-ca (config ${cfg_new:0:12}); status.certificates shows its notAfter $(date -u -d "@$ca_new" +%FT%TZ)"

# --- control-plane faults: kube-apiserver restart, leader hand-over, leader killed mid-reconcile ---
# A sender streams partner mail through both gateways the whole time; every session must get 250
# and reach the sink, and the gateways must keep their last good config (configHash) while the
# control plane is away. Convergence (spec change -> Ready at the new observedGeneration) is
# timed and printed; the goal is 20 s, the guard is looser because these machines are noisy
# (docs/reliability.md has the measured figures).
LEASE=partnergate-operator
FAULT_GUARD_SECS=${E2E_FAULT_GUARD_SECS:-90}
config_hash() { curl -fsS --max-time 5 "http://$1:8080/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["configHash"])'; }
lease_holder() { kubectl -n "$NS" get lease "$LEASE" -o jsonpath='{.spec.holderIdentity}' 2>/dev/null; }
operator_pid() { # pod name -> pid of the operator process the kubelet runs for it
  local p
  for p in $(pgrep -f '/partnergate-operator( |$)'); do
    tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | grep -qx "POD_NAME=$1" && { echo "$p"; return 0; }
  done
  return 1
}
fault_round=0
GEN=0
patch_contoso() { # bump contoso's spec; sets GEN to the new generation (not in a subshell: it counts)
  local before=$GEN
  fault_round=$((fault_round + 1))
  kubectl -n mail patch partnerconnector contoso --type merge \
    -p "{\"spec\":{\"domains\":[\"contoso.test\",\"*.contoso.test\",\"fault$fault_round.contoso.test\"]}}" >/dev/null
  GEN=$(kubectl -n mail get partnerconnector contoso -o jsonpath='{.metadata.generation}')
  [ "$GEN" -gt "$before" ] || e2e_fail "patching contoso did not bump its generation ($before -> $GEN)"
}
converged_secs() { # generation t0 what -> seconds from t0 until contoso is Ready at that generation
  local gen=$1 t0=$2 what=$3 now
  until kubectl -n mail get partnerconnector contoso -o jsonpath='{.status.conditions[?(@.type=="Ready")].observedGeneration}{" "}{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null | grep -qx "$gen True"; do
    now=$(date +%s.%N)
    awk -v a="$t0" -v b="$now" -v g="$FAULT_GUARD_SECS" 'BEGIN { exit !(b - a > g) }' &&
      e2e_fail "$what: contoso not Ready at generation $gen after ${FAULT_GUARD_SECS}s"
    sleep 0.2
  done
  awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'
}
FAULT_LEDGER=$E2E_WORK/fault-stream.log
: >"$FAULT_LEDGER"
rm -f "$E2E_WORK/fault-stream.stop"
(
  n=0
  while [ ! -e "$E2E_WORK/fault-stream.stop" ]; do
    n=$((n + 1))
    ip=${GW[$((n % ${#GW[@]}))]}
    got=$(e2e_swaks "$ip" 127.0.0.20 alice@contoso.test bob@org.test "${CONTOSO_TLS[@]}" --header "X-E2E-Id: fault-$n") || true
    echo "fault-$n $ip $got" >>"$FAULT_LEDGER"
  done
) &
streamer=$!
declare -A hash_before
for ip in "${GW[@]}"; do hash_before[$ip]=$(config_hash "$ip"); done

# kube-apiserver down for 5 s, then up again with the same flags.
"$REPO/tests/cluster/restart.sh" kube-apiserver --down 5 >"$E2E_WORK/apiserver-restart.log" 2>&1 &
restarter=$!
wait_for 30 "kube-apiserver to be down" bash -c "! kubectl get --raw /readyz --request-timeout=2s"
for ip in "${GW[@]}"; do
  # Gateways never talk to the API server; what could break here is the kubelet (volumes emptied
  # or pods restarted when it loses the API server).
  [ "$(config_hash "$ip")" = "${hash_before[$ip]}" ] || e2e_fail "gateway $ip changed its config while kube-apiserver was down"
  got=$(e2e_swaks "$ip" 127.0.0.20 alice@contoso.test bob@org.test "${CONTOSO_TLS[@]}")
  expect_reply "$got" "250" "[$ip] kube-apiserver down: last good config (${hash_before[$ip]:0:12}) still enforced, contoso accepted"
done
rc=0
wait $restarter || rc=$?
restarter=
[ "$rc" -eq 0 ] || { cat "$E2E_WORK/apiserver-restart.log"; e2e_fail "restarting kube-apiserver"; }
t0=$(date +%s.%N)
patch_contoso
gen=$GEN
secs=$(converged_secs "$gen" "$t0" "after kube-apiserver restart")
pass "kube-apiserver restarted (stop, 5 s down, start: $(tail -n1 "$E2E_WORK/apiserver-restart.log") s): generation $gen Ready ${secs}s after the change"

# Leader hand-over: the leader's pod is deleted (a drain or a rolling update); the kubelet stops
# it with SIGTERM, it releases the Lease and the other replica takes over.
old=$(lease_holder)
[ -n "$old" ] || e2e_fail "no holder on Lease $NS/$LEASE"
t0=$(date +%s.%N)
patch_contoso
gen=$GEN
kubectl -n "$NS" delete pod "$old" --wait=false >/dev/null
secs=$(converged_secs "$gen" "$t0" "leader hand-over")
wait_for 60 "a new leader on Lease $LEASE" bash -c "h=\$(kubectl -n $NS get lease $LEASE -o jsonpath='{.spec.holderIdentity}'); [ -n \"\$h\" ] && [ \"\$h\" != '$old' ]"
pass "leader pod $old deleted with a change in flight: $(lease_holder) took over, generation $gen Ready ${secs}s after the change"

# Leader frozen (SIGSTOP: a hung process or a partitioned node), then a change: the frozen leader
# cannot renew, the Lease expires (--lease-duration-secs, 15 s) and the other replica takes over
# and programs the change; thawed, the old one steps down.
wait_for 90 "two operator replicas ready" bash -c \
  "[ \$(kubectl -n $NS get pods -l app.kubernetes.io/component=operator -o jsonpath='{.items[*].status.containerStatuses[*].ready}' | tr ' ' '\n' | grep -c true) -ge 2 ]"
old=$(lease_holder)
pid=$(operator_pid "$old") || e2e_fail "no process for leader pod $old"
old_ip=$(kubectl -n "$NS" get pod "$old" -o jsonpath='{.status.podIP}')
frozen_pid=$pid
kill -STOP "$pid" # before the change, so the frozen leader cannot have programmed it
t0=$(date +%s.%N)
patch_contoso
gen=$GEN
secs=$(converged_secs "$gen" "$t0" "leader frozen")
new=$(lease_holder)
kill -CONT "$pid" 2>/dev/null || true
frozen_pid=
[ -n "$new" ] && [ "$new" != "$old" ] || e2e_fail "leader frozen: the Lease is still held by $old"
wait_for 60 "the thawed replica $old to step down" bash -c \
  "curl -fsS --max-time 2 http://$old_ip:8081/metrics | grep -Eq '^partnergate[a-z_]*leader 0'"
pass "leader $old frozen (SIGSTOP), then generation $gen applied: $new took over, Ready ${secs}s after the change; thawed, $old reports leader 0"

# Leader killed mid-reconcile: SIGKILL 0.3 s after the change is stored, so nothing is released; the kubelet
# restarts the process in the same pod (same identity) or the Lease expires to the other replica.
wait_for 90 "two operator replicas ready" bash -c \
  "[ \$(kubectl -n $NS get pods -l app.kubernetes.io/component=operator -o jsonpath='{.items[*].status.containerStatuses[*].ready}' | tr ' ' '\n' | grep -c true) -ge 2 ]"
old=$(lease_holder)
pid=$(operator_pid "$old") || e2e_fail "no process for leader pod $old"
t0=$(date +%s.%N)
patch_contoso
gen=$GEN
sleep 0.3
kill -KILL "$pid"
secs=$(converged_secs "$gen" "$t0" "leader killed mid-reconcile")
pass "leader $old killed (SIGKILL) 0.3 s after generation $gen was stored: Lease held by $(lease_holder), Ready ${secs}s after the change"

# Both replicas SIGKILLed at once (nothing released): the kubelet restarts them and they converge.
pkill -KILL -f '/partnergate-operator( |$)' || e2e_fail "no operator process to kill"
t0=$(date +%s.%N)
patch_contoso
gen=$GEN
secs=$(converged_secs "$gen" "$t0" "every operator killed")
got=$(e2e_swaks "${GW[0]}" 127.0.0.20 alice@sub.contoso.test bob@org.test "${CONTOSO_TLS[@]}")
expect_reply "$got" "250" "every operator replica killed: generation $gen Ready ${secs}s after the change, *.contoso.test accepted"

touch "$E2E_WORK/fault-stream.stop"
wait $streamer || true
streamer=
total=$(wc -l <"$FAULT_LEDGER")
[ "$total" -ge 10 ] || e2e_fail "the fault-time sender ran only $total sessions"
bad=$(grep -vc '^fault-[0-9]* [0-9.]* 250' "$FAULT_LEDGER" || true)
[ "$bad" -eq 0 ] || e2e_fail "$bad of $total sessions during control-plane faults were not accepted: $(grep -v ' 250' "$FAULT_LEDGER" | head -3)"
missing=0
while read -r id _; do
  grep -rqx -- "X-E2E-Id: $id" "$E2E_WORK/sink" 2>/dev/null || missing=$((missing + 1))
done <"$FAULT_LEDGER"
[ "$missing" -eq 0 ] || e2e_fail "$missing of $total messages accepted during control-plane faults are not at the sink"
pass "during every control-plane fault: $total sessions through ${#GW[@]} gateways, $total x 250, all $total at the sink"

# --- the chart's alerts and dashboard on a real Prometheus scraping these pods ---
"$HERE/prometheus.sh" || e2e_fail "tests/e2e/prometheus.sh"
pass "Prometheus scraping the gateway and operator pods: the chart's alerts and dashboard queries evaluate on real metrics; not-Ready and expiring-certificate alerts fire for connectors made to fail"

# --- rolling upgrade under load: helm upgrade rolls the gateways while mail streams in ---
"$HERE/rolling_upgrade.sh" || E2E_NO_DUMP=1 e2e_fail "rolling upgrade under load (see above)"
pass "$(cat "$E2E_WORK/rolling-upgrade.txt")"
mapfile -t GW < <(e2e_gateway_ips) # the pods were replaced

# --- deleting the connector removes its rules ---
kubectl -n mail delete partnerconnector contoso --wait=true >/dev/null
for ip in "${GW[@]}"; do
  wait_for 60 "gateway $ip drops mail/contoso" bash -c "! curl -fsS http://$ip:8080/status | grep -q '\"mail/contoso\"'"
done
got=$(e2e_swaks "${GW[0]}" 127.0.0.22 alice@contoso.test bob@org.test)
expect_reply "$got" "250" "connector deleted: contoso mail in plaintext from anywhere is accepted (defaultInbound: Accept)"

# --- helm upgrade and uninstall ---
helm upgrade partnergate "$REPO/charts/partnergate" -n "$NS" -f "$HERE/values-e2e.yaml" \
  --set gateway.settings.limits.maxRecipients=2 --wait --timeout 180s >/dev/null || e2e_fail "helm upgrade"
wait_for 120 "gateways rolled with the new fleet settings" bash -c \
  "[ \$(kubectl -n $NS get pods -l app.kubernetes.io/component=gateway --no-headers 2>/dev/null | wc -l) -eq 2 ] && \
   kubectl -n $NS get cm partnergate-gateway-fleet -o jsonpath='{.data.fleet\.json}' | grep -q '\"maxRecipients\": 2'"
pass "helm upgrade rolled the fleet settings"
helm uninstall partnergate -n "$NS" --wait --timeout 120s >/dev/null || e2e_fail "helm uninstall"
wait_for 60 "gateway and operator pods gone" bash -c "[ -z \"\$(kubectl -n $NS get pods --no-headers 2>/dev/null)\" ]"
kubectl get crd partnerconnectors.partnergate.io >/dev/null || e2e_fail "the CRD did not survive uninstall"
pass "helm uninstall removed the pods and kept the CRD (and with it the connectors)"

# --- the machine's networking is as before ---
"$HERE/prometheus.sh" stop
e2e_down
e2e_net_snapshot >"$E2E_WORK/net-after.txt"
diff -u "$E2E_WORK/net-before.txt" "$E2E_WORK/net-after.txt" >"$E2E_WORK/net.diff" ||
  { cat "$E2E_WORK/net.diff" >&2; E2E_NO_DUMP=1 e2e_fail "cluster-down left the machine's network changed (diff above)"; }
pass "after cluster-down the machine's addresses, routes (all tables), rules, iptables/ip6tables, nft tables and kube-proxy's sysctls equal the snapshot taken before cluster-up ($(grep -c . "$E2E_WORK/net-before.txt") lines)"

echo
echo "e2e: $passed checks passed"
