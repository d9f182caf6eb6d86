#!/usr/bin/env bash
# Smoke test of the process kubelet against the real local control plane (tests/cluster/).
#   build -> up.sh (own state dir + ports) -> process-kubelet -> checks -> down.sh
# Exits non-zero on any failure. Knobs (env):
#   PG_KUBELET_SMOKE_KEEP=1   leave the cluster and the kubelet running at the end
#   PARTNERGATE_CLUSTER_STATE / PARTNERGATE_*_PORT   as in tests/cluster/common.sh
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CLUSTER=$REPO/tests/cluster

# Own cluster (never the one a developer is using): state dir and ports differ from the defaults
# and from tests/cluster/smoke.sh.
export PARTNERGATE_CLUSTER_STATE=${PARTNERGATE_CLUSTER_STATE:-/tmp/partnergate-cluster-kubelet-smoke}
export PARTNERGATE_ETCD_PORT=${PARTNERGATE_ETCD_PORT:-23792}
export PARTNERGATE_ETCD_PEER_PORT=${PARTNERGATE_ETCD_PEER_PORT:-23802}
export PARTNERGATE_APISERVER_PORT=${PARTNERGATE_APISERVER_PORT:-16445}
export PARTNERGATE_KCM_PORT=${PARTNERGATE_KCM_PORT:-10563}
export PARTNERGATE_SCHEDULER_PORT=${PARTNERGATE_SCHEDULER_PORT:-10564}
STATE=$PARTNERGATE_CLUSTER_STATE
# Its own /24 of the guarded pod CIDR 10.244.0.0/16 (see tests/cluster/README.md "Network"):
# up.sh installs the guard routes, down.sh removes this range's addresses from lo.
POD_CIDR=${PG_KUBELET_SMOKE_POD_CIDR:-10.244.3.0/24}
export PARTNERGATE_POD_CIDR=$POD_CIDR
KUBELET_PORT=${PARTNERGATE_KUBELET_PORT:-10581}   # kubelet API (kubectl logs), 127.0.0.1
NODE=kubelet-smoke-node
NS=kubelet-smoke

T0=$SECONDS
step() { printf '\n==> %s\n' "$*"; }
die() { echo "smoke: FAIL: $*" >&2; exit 1; }
ok() { echo "ok: $*"; }
# wait_until DESCRIPTION TIMEOUT CMD...: retry CMD every 0.5 s until it succeeds
wait_until() {
  local what=$1 timeout=$2; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || die "timed out after ${timeout}s waiting for: $what"
    sleep 0.5
  done
  ok "$what"
}

WORK=$(mktemp -d /tmp/pg-kubelet-smoke.XXXXXX)
KUBELET_STATE=$WORK/kubelet
KUBELET_PID=

cleanup() {
  local rc=$?
  set +e
  if [ "$rc" -ne 0 ]; then
    echo "---- last 60 lines of the process-kubelet log ----" >&2
    tail -n 60 "$WORK/kubelet.log" >&2
    for f in "$KUBELET_STATE"/pods/*/*.log; do
      [ -f "$f" ] || continue
      echo "---- last 15 lines of $f ----" >&2
      tail -n 15 "$f" >&2
    done
  fi
  if [ "${PG_KUBELET_SMOKE_KEEP:-}" = 1 ]; then
    echo "kept: KUBECONFIG=$STATE/kubeconfig kubelet pid=$KUBELET_PID state=$KUBELET_STATE"
  else
    if [ -n "$KUBELET_PID" ] && kill -0 "$KUBELET_PID" 2>/dev/null; then
      kill -TERM "$KUBELET_PID"; wait "$KUBELET_PID" 2>/dev/null
    fi
    step "down"
    "$CLUSTER/down.sh"
    rm -rf "$WORK"
  fi
  if [ "$rc" -eq 0 ]; then echo "kubelet smoke: PASS ($((SECONDS - T0))s)"; else echo "kubelet smoke: FAILED (exit $rc)" >&2; fi
  exit "$rc"
}
trap cleanup EXIT

step "build process-kubelet + kubelet-test-echo"
(cd "$REPO" && cargo build -q -p partnergate-kubelet --bins)
TARGET=${CARGO_TARGET_DIR:-$REPO/target}/debug
[ -x "$TARGET/process-kubelet" ] && [ -x "$TARGET/kubelet-test-echo" ] || die "binaries missing in $TARGET"

step "control plane up ($STATE)"
"$CLUSTER/up.sh"
BIN=$("$CLUSTER/build.sh" --print-bin-dir)
export PATH=$BIN:$PATH
export KUBECONFIG=$STATE/kubeconfig
k() { kubectl "$@"; }
kn() { kubectl -n "$NS" "$@"; }

step "start process-kubelet (node $NODE, pod CIDR $POD_CIDR)"
"$TARGET/process-kubelet" --kubeconfig "$KUBECONFIG" --node-name "$NODE" \
  --state-dir "$KUBELET_STATE" --bin-dir "$TARGET" --pod-cidr "$POD_CIDR" \
  --port "$KUBELET_PORT" --ca-cert-file "$STATE/pki/ca.crt" --ca-key-file "$STATE/pki/ca.key" \
  >"$WORK/kubelet.log" 2>&1 &
KUBELET_PID=$!
node_ready() { [ "$(k get node "$NODE" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]; }
wait_until "node $NODE Ready" 60 node_ready
wait_until "node lease kube-node-lease/$NODE" 30 k -n kube-node-lease get lease "$NODE"
[ "$(k get node "$NODE" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}')" = 127.0.0.1 ] \
  || die "node InternalIP is not 127.0.0.1"
[ "$(k get node "$NODE" -o jsonpath='{.status.capacity.pods}')" = 110 ] || die "node capacity.pods missing"

k create namespace "$NS" >/dev/null
wait_until "ServiceAccount $NS/default" 60 kn get serviceaccount default

step "ConfigMap + pod 'echo' (image partnergate/partnergate:test)"
kn apply -f - >/dev/null <<'EOF'
apiVersion: v1
kind: ConfigMap
metadata: {name: demo}
data:
  config.txt: hello-1
  settings.json: '{"certFile": "/etc/demo/config.txt", "other": "/etc/demox/no"}'
  greeting: from-configmap
---
apiVersion: v1
kind: Pod
metadata: {name: echo, labels: {app: echo}}
spec:
  terminationGracePeriodSeconds: 5
  containers:
    - name: echo
      image: partnergate/partnergate:test
      command: ["/usr/local/bin/kubelet-test-echo"]
      args: ["--file", "/etc/demo/config.txt", "--port", "8080", "$(POD_NS)-expanded"]
      env:
        - {name: POD_NS, valueFrom: {fieldRef: {fieldPath: metadata.namespace}}}
        - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
        - {name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}
        - {name: GREETING, valueFrom: {configMapKeyRef: {name: demo, key: greeting}}}
        - {name: SETTINGS, value: /etc/demo/settings.json}
      readinessProbe:
        httpGet: {path: /readyz, port: 8080}
        periodSeconds: 1
      lifecycle:
        preStop:
          sleep: {seconds: 1}
      volumeMounts:
        - {name: demo, mountPath: /etc/demo, readOnly: true}
  volumes:
    - name: demo
      configMap: {name: demo, defaultMode: 0640}
EOF
wait_until "pod echo Ready" 90 kn wait --for=condition=Ready pod/echo --timeout=2s
[ "$(kn get pod echo -o jsonpath='{.status.phase}')" = Running ] || die "pod echo is not Running"
IP=$(kn get pod echo -o jsonpath='{.status.podIP}')
[[ $IP =~ ^10\.244\.3\.[0-9]+$ ]] || die "podIP '$IP' is not in $POD_CIDR"
ip -4 -o addr show dev lo | grep -qF " $IP/32 " || die "pod IP $IP is not a /32 on lo"
[ "$(kn get pod echo -o jsonpath='{.status.podIPs[0].ip}')" = "$IP" ] || die "podIPs[0] != podIP"
[ "$(kn get pod echo -o jsonpath='{.status.hostIP}')" = 127.0.0.1 ] || die "hostIP is not 127.0.0.1"
[ "$(kn get pod echo -o jsonpath='{.status.containerStatuses[0].ready}')" = true ] || die "container not ready"
ok "echo Running + Ready, podIP $IP"

get() { curl -fsS --max-time 3 "http://$1:8080$2"; }
ENVS=$(get "$IP" /env) || die "GET /env on $IP:8080 failed (process not bound to its pod IP?)"
PODDIR=$KUBELET_STATE/pods/${NS}_echo
VOL=$PODDIR/volumes/demo
want_env() { grep -qxF "$1" <<<"$ENVS" || die "env of echo lacks '$1'"; }
want_env "PARTNERGATE_BIND_IP=$IP"
want_env "POD_IP=$IP"
want_env "POD_NS=$NS"
want_env "POD_NAME=echo"
want_env "GREETING=from-configmap"
want_env "SETTINGS=$VOL/settings.json"
want_env "KUBERNETES_SERVICE_HOST=127.0.0.1"
want_env "KUBERNETES_SERVICE_PORT=$PARTNERGATE_APISERVER_PORT"
want_env "KUBECONFIG=$PODDIR/kubeconfig"
ok "env: fieldRef, configMapKeyRef, bind IP, service host/port, mount path rewritten"
ARGS=$(get "$IP" /args)
grep -qxF "$VOL/config.txt" <<<"$ARGS" || die "args: mount path not rewritten: $ARGS"
grep -qxF "$NS-expanded" <<<"$ARGS" || die "args: \$(POD_NS) not expanded: $ARGS"
ok "args: \$(VAR) expanded, mount path rewritten"

step "ConfigMap volume layout"
[ "$(get "$IP" /file)" = hello-1 ] || die "mounted file content is not hello-1"
[ -L "$VOL/..data" ] || die "$VOL/..data is not a symlink"
DATA1=$(readlink "$VOL/..data")
[[ $DATA1 =~ ^\.\.[0-9]{4}_ ]] || die "..data -> '$DATA1' is not a timestamped dir"
[ "$(readlink "$VOL/config.txt")" = ..data/config.txt ] || die "config.txt is not a symlink to ..data/config.txt"
[ "$(stat -c %a "$VOL/$DATA1/config.txt")" = 640 ] || die "defaultMode 0640 not applied"
grep -qF "\"certFile\": \"$VOL/config.txt\"" "$VOL/settings.json" || die "mount path inside settings.json not rewritten"
grep -qF '"/etc/demox/no"' "$VOL/settings.json" || die "non-mount path inside settings.json was rewritten"
ok "..data -> $DATA1, key symlinks, mode, content rewriting"

step "service-account token (TokenRequest)"
SAVOL=$(ls -d "$PODDIR"/volumes/kube-api-access-* 2>/dev/null | head -n1)
[ -n "$SAVOL" ] && [ -s "$SAVOL/token" ] && [ -s "$SAVOL/ca.crt" ] || die "no projected token/ca.crt under $PODDIR/volumes"
[ "$(cat "$SAVOL/namespace")" = "$NS" ] || die "namespace file wrong"
[ -L "$SAVOL/..data" ] || die "token volume lacks ..data"
WHO=$(kubectl --kubeconfig "$PODDIR/kubeconfig" auth whoami -o jsonpath='{.status.userInfo.username}') \
  || die "the pod's kubeconfig (token + ca.crt) does not authenticate"
[ "$WHO" = "system:serviceaccount:$NS:default" ] || die "token authenticates as '$WHO'"
ok "token authenticates as $WHO"

step "ConfigMap update reaches the mounted file"
kn patch configmap demo --type merge -p '{"data":{"config.txt":"hello-2"}}' >/dev/null
file_is() { [ "$(get "$IP" /file)" = "$1" ]; }
wait_until "mounted file shows hello-2" 30 file_is hello-2
DATA2=$(readlink "$VOL/..data")
[ "$DATA2" != "$DATA1" ] || die "..data was not switched to a new timestamped dir"
[ ! -e "$VOL/$DATA1" ] || die "old version dir $DATA1 not removed"
ok "..data -> $DATA2"

step "process exit -> restart with restartCount"
PID1=$(kn get pod echo -o jsonpath='{.status.containerStatuses[0].containerID}'); PID1=${PID1#process://}
get "$IP" '/exit?code=3' >/dev/null || true
restarted() {
  [ "$(kn get pod echo -o jsonpath='{.status.containerStatuses[0].restartCount}')" -ge 1 ] &&
    [ "$(kn get pod echo -o jsonpath='{.status.containerStatuses[0].ready}')" = true ]
}
wait_until "echo restarted (restartCount >= 1) and Ready again" 60 restarted
[ "$(kn get pod echo -o jsonpath='{.status.containerStatuses[0].lastState.terminated.exitCode}')" = 3 ] \
  || die "lastState.terminated.exitCode is not 3"
PID2=$(kn get pod echo -o jsonpath='{.status.containerStatuses[0].containerID}'); PID2=${PID2#process://}
[ "$PID1" != "$PID2" ] || die "pid did not change after restart"

step "kubelet API: kubectl logs through the apiserver (CRI log file, client-cert auth)"
[ "$(k get node "$NODE" -o jsonpath='{.status.daemonEndpoints.kubeletEndpoint.Port}')" = "$KUBELET_PORT" ] \
  || die "node does not report kubeletEndpoint.Port $KUBELET_PORT"
[ "$(curl -fsS --max-time 3 --cacert "$STATE/pki/ca.crt" --cert "$STATE/pki/admin.crt" --key "$STATE/pki/admin.key" \
  "https://127.0.0.1:$KUBELET_PORT/healthz")" = ok ] || die "kubelet /healthz with the admin certificate"
! curl -sS --max-time 3 --cacert "$STATE/pki/ca.crt" "https://127.0.0.1:$KUBELET_PORT/healthz" >/dev/null 2>&1 \
  || die "the kubelet API answered a client without a certificate"
ok "node reports kubeletEndpoint.Port $KUBELET_PORT; /healthz needs a client certificate of the cluster CA"
LOGS=$(kn logs echo) || die "kubectl logs echo: $LOGS"
grep -qxF "listening on $IP:8080" <<<"$LOGS" || die "kubectl logs echo lacks 'listening on $IP:8080': $(tail -n3 <<<"$LOGS")"
! grep -q '^=== process-kubelet' <<<"$LOGS" || die "kubectl logs shows the kubelet's start header"
! grep -q 'exiting with 3' <<<"$LOGS" || die "kubectl logs shows the previous instance"
PREV=$(kn logs echo --previous) || die "kubectl logs --previous: $PREV"
grep -qxF "exiting with 3 on request" <<<"$PREV" || die "kubectl logs --previous lacks the exit line"
ok "kubectl logs: current instance ($(wc -l <<<"$LOGS") lines), --previous ends with 'exiting with 3 on request'"
FOLLOW=$WORK/follow.out
kn logs -f --tail=1 echo >"$FOLLOW" 2>&1 &
FPID=$!
wait_until "kubectl logs -f prints the last line" 20 grep -qxF "listening on $IP:8080" "$FOLLOW"
get "$IP" /say/follow-me >/dev/null
followed() { grep -qxF "said follow-me" "$FOLLOW" && grep -qxF "warned follow-me" "$FOLLOW"; }
wait_until "kubectl logs -f streams the new stdout and stderr lines" 20 followed
kill "$FPID" 2>/dev/null; wait "$FPID" 2>/dev/null || true
[ "$(wc -l <"$FOLLOW")" = 3 ] || die "kubectl logs -f --tail=1: expected 3 lines, got: $(cat "$FOLLOW")"
TS=$(kn logs echo --timestamps --tail=2)
[ "$(wc -l <<<"$TS")" = 2 ] || die "--tail=2 returned $(wc -l <<<"$TS") lines"
grep -qE '^20[0-9]{2}-[0-9]{2}-[0-9]{2}T[0-9:.]+Z said follow-me$' <<<"$TS" || die "--timestamps: $TS"
[ "$(kn logs echo --limit-bytes=5 | wc -c)" = 5 ] || die "--limit-bytes=5"
[ -z "$(kn logs echo --since=1h --tail=0)" ] || die "--tail=0 returned lines"
grep -qxF "said follow-me" <(kn logs echo --since=1h) || die "--since=1h lost a recent line"
ok "kubectl logs -f streamed stdout+stderr; --timestamps, --tail, --limit-bytes, --since"
EXEC=$(kn exec echo -- true 2>&1) && die "kubectl exec succeeded?"
grep -q "not supported by the process kubelet" <<<"$EXEC" || die "kubectl exec error does not explain: $EXEC"
ok "kubectl exec refused with the reason: $(head -c 120 <<<"$EXEC")"

step "Deployment with 2 replicas"
kn apply -f - >/dev/null <<'EOF'
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      automountServiceAccountToken: false
      containers:
        - name: web
          image: registry.example.com/partnergate/partnergate:0.1.0
          command: ["kubelet-test-echo"]
          args: ["--port", "8080"]
          readinessProbe:
            tcpSocket: {port: http}
            periodSeconds: 1
          ports: [{name: http, containerPort: 8080}]
EOF
deploy_ready() { [ "$(kn get deployment web -o jsonpath='{.status.readyReplicas}')" = 2 ]; }
wait_until "deployment web has 2 ready replicas" 90 deploy_ready
mapfile -t IPS < <(kn get pods -l app=web -o jsonpath='{range .items[*]}{.status.podIP}{"\n"}{end}')
[ "${#IPS[@]}" = 2 ] || die "expected 2 web pods, got ${#IPS[@]}"
[ "${IPS[0]}" != "${IPS[1]}" ] || die "web pods share IP ${IPS[0]}"
for ip in "${IPS[@]}"; do
  [[ $ip =~ ^10\.244\.3\. ]] || die "web pod IP $ip outside $POD_CIDR"
  [ "$ip" != "$IP" ] || die "web pod got the echo pod's IP"
  E=$(get "$ip" /env) || die "web pod at $ip:8080 not reachable"
  grep -qxF "PARTNERGATE_BIND_IP=$ip" <<<"$E" || die "web pod at $ip has wrong bind IP"
  ! grep -q '^KUBECONFIG=' <<<"$E" || die "automountServiceAccountToken: false pod got a KUBECONFIG"
done
ok "2 Ready pods on ${IPS[*]} (same port 8080, distinct IPs)"

step "failing liveness probe restarts the process"
kn apply -f - >/dev/null <<'EOF'
apiVersion: v1
kind: Pod
metadata: {name: unlively}
spec:
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 2
  containers:
    - name: echo
      image: partnergate/partnergate:test
      command: ["kubelet-test-echo"]
      livenessProbe:
        httpGet: {path: /no-such-path, port: 8080}
        periodSeconds: 1
        failureThreshold: 2
EOF
live_restarted() { [ "$(kn get pod unlively -o jsonpath='{.status.containerStatuses[0].restartCount}')" -ge 1 ]; }
wait_until "unlively restarted by its liveness probe" 60 live_restarted
kn delete pod unlively --timeout=30s >/dev/null

step "pod with image nginx stays Pending with an Event"
kn run nginx --image=nginx:1.27 --restart=Always >/dev/null
has_event() {
  kn get events --field-selector involvedObject.name=nginx,reason=UnsupportedImage -o jsonpath='{.items[0].message}' | grep -q nginx
}
wait_until "UnsupportedImage event for nginx" 60 has_event
sleep 2
[ "$(kn get pod nginx -o jsonpath='{.status.phase}')" = Pending ] || die "nginx pod is not Pending"
kn get pod nginx -o jsonpath='{.status.conditions[?(@.type=="Ready")].message}' | grep -q 'nginx' \
  || die "nginx pod has no Ready condition message naming the image"
ok "nginx Pending: $(kn get events --field-selector involvedObject.name=nginx,reason=UnsupportedImage -o jsonpath='{.items[0].message}')"

step "deleting pod echo stops its process"
PID=$(kn get pod echo -o jsonpath='{.status.containerStatuses[0].containerID}'); PID=${PID#process://}
kill -0 "$PID" 2>/dev/null || die "echo process $PID not alive before delete"
kn logs -f --tail=0 echo >"$WORK/final.out" 2>&1 &
FPID=$!
sleep 1 # the stream is open (--tail=0 prints nothing to wait for)
kn delete pod echo --timeout=60s >/dev/null
! kn get pod echo >/dev/null 2>&1 || die "pod echo still exists"
gone() { ! kill -0 "$PID" 2>/dev/null; }
wait_until "process $PID gone" 10 gone
wait_until "pod state dir removed" 10 test ! -e "$PODDIR"
# The kubelet removes the pod dir right after the process exits; the follower must still
# deliver the last line and then end by itself.
follower_done() { ! kill -0 "$FPID" 2>/dev/null; }
wait_until "kubectl logs -f ends with the pod" 10 follower_done
grep -qxF "got SIGTERM" "$WORK/final.out" || die "kubectl logs -f lost the last line: $(cat "$WORK/final.out")"
ok "kubectl logs -f delivered the SIGTERM line and ended with the pod"
! curl -fsS --max-time 2 "http://$IP:8080/readyz" >/dev/null 2>&1 || die "something still serves on $IP:8080"
! ip -4 -o addr show dev lo | grep -qF " $IP/32 " || die "pod IP $IP still on lo after the pod was deleted"
ok "pod IP $IP removed from lo"

step "deleting the nginx pod (never started) completes"
kn delete pod nginx --timeout=30s >/dev/null

step "kubelet SIGTERM stops every pod process"
WEB_PIDS=$(kn get pods -l app=web -o jsonpath='{range .items[*]}{.status.containerStatuses[0].containerID}{" "}{end}' | sed 's#process://##g')
kill -TERM "$KUBELET_PID"
wait "$KUBELET_PID" 2>/dev/null || true
KUBELET_PID=
for p in $WEB_PIDS; do
  ! kill -0 "$p" 2>/dev/null || die "web process $p survived the kubelet"
done
ok "web processes ($WEB_PIDS) stopped with the kubelet"
left=$(ip -4 -o addr show dev lo | awk '{print $4}' | grep '^10\.244\.3\.' || true)
[ -z "$left" ] || die "pod IPs left on lo after the kubelet stopped: $left"
ok "the kubelet removed its pod IPs from lo"
