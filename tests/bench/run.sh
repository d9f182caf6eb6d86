#!/usr/bin/env bash
# make bench: partnergate gateway vs Postfix vs the sink and the TLS limit, one run, one machine,
# one load generator (pg-loadgen). Prints one markdown table; details and raw JSON lines go to
# $BENCH_WORK (default target/bench). Not part of `make test`.
#
# Environment:
#   BENCH_RUNS=5            runs per noisy row (the median is quoted)
#   BENCH_SECS=8            seconds per throughput / latency / session-rate run
#   BENCH_IDLE_SESSIONS=10000
#   BENCH_CONNECTORS=1000   connectors in the gateway config (throughput rows and reload)
#   BENCH_SKIP="postfix idle ..."  rows to skip (validate sink gateway postfix latency sessions idle reload operator)
#   BENCH_BUILD=0           use the release binaries already in target/release
#   BENCH_OPERATOR=0        skip the operator rows (they start a private control plane)
#
# Loopback only, never port 25: load generator 127.0.0.10, sink 127.0.0.11, gateway 127.0.0.12,
# Postfix 127.0.0.13, tls-baseline 127.0.0.14.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

RUNS=${BENCH_RUNS:-5}
SECS=${BENCH_SECS:-8}
IDLE_N=${BENCH_IDLE_SESSIONS:-10000}
NCONN=${BENCH_CONNECTORS:-1000}
SKIP=" ${BENCH_SKIP:-} "
SESSIONS=50
SIZE=10240
PER_SESSION=100 # messages per SMTP session before QUIT and reconnect
W=${BENCH_WORK:-$ROOT/target/bench}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}

LG_IP=127.0.0.10
SINK_IP=127.0.0.11 SINK_PORT=2711
GW_IP=127.0.0.12 GW_PORT=2712 GW_ADMIN=8712
PF_IP=127.0.0.13 PF_PORT=2713
TB_IP=127.0.0.14 TB_PORT=2714

say() { printf '\033[1m== %s\033[0m\n' "$*" >&2; }
skip() { [[ "$SKIP" == *" $1 "* ]]; }

for t in smtp-sink smtp-source postfix openssl python3 curl; do
  command -v "$t" >/dev/null || [ -x "/usr/sbin/$t" ] || {
    echo "bench: $t not found (make deps)" >&2
    exit 1
  }
done
export PATH="$PATH:/usr/sbin"

if [ "${BENCH_BUILD:-1}" = 1 ]; then
  say "building (release): partnergate-gateway, partnergate-bench"
  nice -n 5 cargo build -q --release -p partnergate-gateway -p partnergate-bench
fi
GW=$TARGET/release/partnergate-gateway
LG=$TARGET/release/pg-loadgen
TB=$TARGET/release/tls-baseline

# The idle row holds IDLE_N sessions: two fds per session across generator and gateway.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((IDLE_N + 1000)) ]; then
  echo "bench: fd limit $(ulimit -n) is below $((IDLE_N + 1000)); idle row will use fewer sessions" >&2
  IDLE_N=$(($(ulimit -n) - 1000))
fi

rm -rf "$W"
mkdir -p "$W"/{pki,gw,pf,runs}
LOG=$W/bench.log
: >"$LOG"

PIDS=()
cleanup() {
  local p
  [ -d "$W/pf/conf" ] && postfix -c "$W/pf/conf" stop >/dev/null 2>&1 || true
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

wait_port() { # ip port [seconds]
  local i
  for i in $(seq $((${3:-20} * 10))); do
    (echo >"/dev/tcp/$1/$2") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "bench: nothing listening on $1:$2" >&2
  return 1
}

port_free() {
  if (echo >"/dev/tcp/$1/$2") 2>/dev/null; then
    echo "bench: $1:$2 is already in use" >&2
    exit 1
  fi
}
for a in $SINK_IP:$SINK_PORT $GW_IP:$GW_PORT $GW_IP:$GW_ADMIN $PF_IP:$PF_PORT $TB_IP:$TB_PORT; do
  port_free "${a%:*}" "${a#*:}"
done

# ------------------------------------------------------------------------------------------
# PKI: one CA, one server certificate (EC P-256) used by the gateway, Postfix and tls-baseline.
say "certificates"
(
  cd "$W/pki"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
    -subj "/CN=Bench CA" -keyout ca.key -out ca.crt 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj "/CN=gateway.bench.test" -keyout server.key -out server.csr 2>/dev/null
  printf 'subjectAltName=DNS:gateway.bench.test,IP:%s,IP:%s,IP:%s\n' $GW_IP $PF_IP $TB_IP >server.ext
  openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
    -extfile server.ext -out server.crt 2>/dev/null
  chmod 644 server.key
)

# ------------------------------------------------------------------------------------------
# Gateway configuration: NCONN inbound connectors (a mix of SenderDomain, SenderIP and
# Certificate), the one that claims the benchmark's sender (partner.test) last.
cp "$W/pki/ca.crt" "$W/gw/ca.pem"
cat >"$W/gw/fleet.json" <<EOF
{
  "listen": "$GW_IP:$GW_PORT",
  "adminListen": "$GW_IP:$GW_ADMIN",
  "hostname": "gateway.bench.test",
  "serverCertificate": {"certFile": "$W/pki/server.crt", "keyFile": "$W/pki/server.key"},
  "acceptedDomains": ["example.test"],
  "upstream": {"host": "$SINK_IP", "port": $SINK_PORT, "tls": "None"},
  "defaultInbound": "Reject",
  "limits": {"maxConnections": 30000, "maxConnectionsPerIp": 30000}
}
EOF
connectors() { # generation n > file
  python3 - "$1" "$2" <<'PY'
import json, sys
gen, n = int(sys.argv[1]), int(sys.argv[2])
inbound = []
for i in range(n - 1):
    c = {"name": f"partners/p{i:04d}", "generation": gen, "domains": [f"p{i:04d}.test", f"*.p{i:04d}.test"]}
    if i % 4 == 1:
        c.update(identifyBy="SenderIP", senderIPRanges=[f"10.{i // 250}.{i % 250}.0/24"], restrictToIPRanges=True)
    elif i % 4 == 2:
        c.update(identifyBy="Certificate", certificate={"subjectName": f"mail.p{i:04d}.test", "trustBundleFile": "ca.pem"}, restrictToCertificate=True)
    elif i % 4 == 3:
        c.update(minTlsVersion="1.3")
    inbound.append(c)
inbound.append({"name": "partners/bench", "generation": gen, "domains": ["partner.test"], "requireTls": True, "minTlsVersion": "1.3"})
print(json.dumps({"inbound": inbound, "outbound": []}, indent=1))
PY
}
connectors 1 "$NCONN" >"$W/gw/connectors.json"
"$GW" check --fleet "$W/gw/fleet.json" --connectors "$W/gw/connectors.json" >>"$LOG"

GW_PID=
start_gateway() {
  "$GW" --fleet "$W/gw/fleet.json" --connectors "$W/gw/connectors.json" 2>>"$W/gw/gateway.log" &
  GW_PID=$!
  PIDS+=("$GW_PID")
  local i
  for i in $(seq 100); do
    curl -sf "http://$GW_IP:$GW_ADMIN/readyz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "bench: gateway did not become ready (see $W/gw/gateway.log)" >&2
  return 1
}
stop_gateway() {
  [ -n "$GW_PID" ] || return 0
  kill "$GW_PID" 2>/dev/null || true
  wait "$GW_PID" 2>/dev/null || true
  GW_PID=
}
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TCK=$(getconf CLK_TCK)

# ------------------------------------------------------------------------------------------
# Postfix 3.7 private instance: TLS required on its listener, relays example.test to the sink.
# Recipe as in tests/e2e/postfix.sh: private config and queue, loopback listener in master.cf.
pf_up() {
  local d=$W/pf
  mkdir -p "$d/conf" "$d/queue" "$d/data"
  chown postfix "$d/data"
  cp /etc/postfix/master.cf "$d/conf/master.cf"
  sed -i -E "s/^smtp +inet .*/$PF_IP:$PF_PORT inet n - n - - smtpd/" "$d/conf/master.cf"
  cat >"$d/conf/main.cf" <<CF
compatibility_level = 3.6
queue_directory = $d/queue
data_directory = $d/data
maillog_file = $d/maillog
maillog_file_prefixes = $d
myhostname = postfix.bench.test
mydestination =
inet_interfaces = all
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
relay_domains = example.test
relayhost = [$SINK_IP]:$SINK_PORT
smtp_bind_address = $PF_IP
smtp_tls_security_level = none
smtpd_tls_security_level = encrypt
smtpd_tls_cert_file = $W/pki/server.crt
smtpd_tls_key_file = $W/pki/server.key
smtpd_tls_loglevel = 0
smtpd_client_connection_count_limit = 0
default_process_limit = 200
CF
  postfix -c "$d/conf" start >/dev/null 2>&1 || {
    cat "$d/maillog" >&2 2>/dev/null
    return 1
  }
  wait_port $PF_IP $PF_PORT 30
}
pf_queued() { find "$W/pf/queue/incoming" "$W/pf/queue/active" "$W/pf/queue/deferred" \
  "$W/pf/queue/maildrop" -type f 2>/dev/null | wc -l; }
pf_drain() { # waits until the queue is empty; prints seconds waited
  local t0=$EPOCHREALTIME i
  for i in $(seq 3000); do
    [ "$(pf_queued)" -eq 0 ] && break
    sleep 0.1
  done
  python3 -c "print(round($EPOCHREALTIME - $t0, 2))"
}

# ------------------------------------------------------------------------------------------
# Helpers: run the generator, keep every JSON line, compute medians.
LGCMD=() # last generator command, for the table
lg() { # label args... ; prints the JSON line
  local label=$1
  shift
  LGCMD=(pg-loadgen "$@")
  "$LG" --bind $LG_IP --label "$label" "$@" 2>>"$LOG" | tee -a "$W/runs/$label.jsonl"
}
jget() { # file.jsonl python-expr-on-r  -> one value per line
  python3 - "$1" "$2" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    if line.startswith("{"):
        r = json.loads(line)
        print(eval(sys.argv[2], {}, {"r": r}))
PY
}
median() { python3 -c 'import sys,statistics as s; v=[float(x) for x in sys.stdin.read().split()]; print(round(s.median(v),3) if v else "nan")'; }
minimum() { python3 -c 'import sys; v=[float(x) for x in sys.stdin.read().split()]; print(round(min(v),3) if v else "nan")'; }
sumv() { python3 -c 'import sys; print(int(sum(float(x) for x in sys.stdin.read().split())))'; }
calc() { python3 -c "print($1)"; }
cmdline() { # the last generator command, with long paths shortened
  local s="${LGCMD[*]}"
  s=${s//$W\//\$W/}
  printf '%s' "$s"
}

ROWS=()
row() { ROWS+=("| $1 | $2 | $3 | $4 | \`$5\` |"); }
verdict() { python3 -c "print('met' if $1 else 'missed')"; }

COMMON=(--sessions $SESSIONS --size $SIZE --messages $PER_SESSION --duration "$SECS")
TLS=(--starttls --tls-version 1.3)
# Latency: sessions opened before the schedule starts and kept for the whole run.
LAT=(--sessions $SESSIONS --size $SIZE --messages 1000000 --duration "$SECS")

say "sink: smtp-sink on $SINK_IP:$SINK_PORT"
sink_user=()
[ "$(id -u)" = 0 ] && sink_user=(-u postfix)
smtp-sink "${sink_user[@]}" $SINK_IP:$SINK_PORT 1024 &
PIDS+=($!)
wait_port $SINK_IP $SINK_PORT

# ---- 0. generator check: smtp-source vs pg-loadgen, plaintext into the sink ----------------
if ! skip validate; then
  say "generator check: smtp-source vs pg-loadgen (plaintext -> sink, $RUNS runs)"
  VN=20000
  for i in $(seq "$RUNS"); do
    t0=$EPOCHREALTIME
    smtp-source -d -s $SESSIONS -m $VN -l $SIZE -M loadgen.test -f bench@partner.test \
      -t rcpt0@example.test $SINK_IP:$SINK_PORT
    calc "round($VN / ($EPOCHREALTIME - $t0), 1)" >>"$W/runs/smtp-source.txt"
    lg validate --server $SINK_IP:$SINK_PORT --sessions $SESSIONS --messages $((VN / SESSIONS)) \
      --size $SIZE >/dev/null
  done
  SS=$(median <"$W/runs/smtp-source.txt")
  PG=$(jget "$W/runs/validate.jsonl" 'r["msg_per_s"]' | median)
  DIFF=$(calc "round(100 * ($PG - $SS) / $SS, 1)")
  row "generator check: pg-loadgen vs smtp-source, plaintext → sink, 50 sessions × 400, 10 KiB" \
    "pg-loadgen $PG msg/s, smtp-source $SS msg/s ($DIFF %)" "within ±10 %" \
    "$(verdict "abs($DIFF) <= 10")" \
    "smtp-source -d -s 50 -m $VN -l $SIZE $SINK_IP:$SINK_PORT; $(cmdline)"
fi

# ---- 1. sink alone -------------------------------------------------------------------------
SINK_RATE=
if ! skip sink; then
  say "sink alone (plaintext, $RUNS x ${SECS}s)"
  for i in $(seq "$RUNS"); do
    lg sink --server $SINK_IP:$SINK_PORT "${COMMON[@]}" >/dev/null
  done
  SINK_RATE=$(jget "$W/runs/sink.jsonl" 'r["msg_per_s"]' | median)
  P99=$(jget "$W/runs/sink.jsonl" 'r["latency_ms"]["p99"]' | median)
  row "sink alone (smtp-sink, plaintext: the ceiling), 50 sessions, 10 KiB" \
    "$SINK_RATE msg/s (p99 $P99 ms)" "—" "—" "$(cmdline)"
fi

# ---- 2. gateway -> sink ----------------------------------------------------------------------
start_gateway
GW_RATE=
if ! skip gateway; then
  say "gateway -> sink (STARTTLS TLS 1.3, $RUNS x ${SECS}s)"
  : >"$W/runs/gateway-cpu.txt"
  for i in $(seq "$RUNS"); do
    c0=$(cpu_ticks "$GW_PID")
    lg gateway --server $GW_IP:$GW_PORT "${TLS[@]}" "${COMMON[@]}" >/dev/null
    c1=$(cpu_ticks "$GW_PID")
    tail -n 1 "$W/runs/gateway.jsonl" | jq -r "($c1 - $c0) * 1000000 / $TCK / .ok | round" \
      >>"$W/runs/gateway-cpu.txt"
  done
  GW_CPU=$(median <"$W/runs/gateway-cpu.txt")
  GW_RATE=$(jget "$W/runs/gateway.jsonl" 'r["msg_per_s"]' | median)
  P50=$(jget "$W/runs/gateway.jsonl" 'r["latency_ms"]["p50"]' | median)
  P99=$(jget "$W/runs/gateway.jsonl" 'r["latency_ms"]["p99"]' | median)
  ERR=$(jget "$W/runs/gateway.jsonl" 'r["failed"]' | sumv)
  row "partnergate gateway (release) → sink, STARTTLS TLS 1.3, 50 sessions, 10 KiB, $NCONN connectors" \
    "$GW_RATE msg/s (p50 $P50 ms, p99 $P99 ms, $ERR failed; gateway CPU $GW_CPU µs/message)" "—" "—" "$(cmdline)"
fi

# ---- 3. latency added by the gateway at 50 % of its max rate ---------------------------------
if ! skip latency && [ -n "$GW_RATE" ]; then
  RATE=$(calc "round($GW_RATE / 2)")
  say "latency at $RATE msg/s open loop (gateway vs sink direct, $RUNS x ${SECS}s)"
  for i in $(seq "$RUNS"); do
    lg lat-direct --server $SINK_IP:$SINK_PORT "${LAT[@]}" --rate "$RATE" >/dev/null
    lg lat-gateway --server $GW_IP:$GW_PORT "${TLS[@]}" "${LAT[@]}" --rate "$RATE" >/dev/null
  done
  D99=$(jget "$W/runs/lat-direct.jsonl" 'r["latency_ms"]["p99"]' | median)
  G99=$(jget "$W/runs/lat-gateway.jsonl" 'r["latency_ms"]["p99"]' | median)
  G50=$(jget "$W/runs/lat-gateway.jsonl" 'r["latency_ms"]["p50"]' | median)
  D50=$(jget "$W/runs/lat-direct.jsonl" 'r["latency_ms"]["p50"]' | median)
  ADD=$(calc "round($G99 - $D99, 3)")
  row "p99 latency added by the gateway (MAIL → final 250) at 50 % of its max rate ($RATE msg/s, open loop)" \
    "+$ADD ms (p99 $G99 ms via gateway with TLS vs $D99 ms to the sink directly; p50 $G50 vs $D50 ms)" \
    "≤ 2 ms" "$(verdict "$ADD <= 2")" "$(cmdline)"
fi

# ---- 4. new-session rate vs bare tokio-rustls ------------------------------------------------
if ! skip sessions; then
  "$TB" --listen $TB_IP:$TB_PORT --cert "$W/pki/server.crt" --key "$W/pki/server.key" 2>>"$LOG" &
  TB_PID=$!
  PIDS+=("$TB_PID")
  wait_port $TB_IP $TB_PORT
  say "new-session rate (gateway vs tls-baseline, $RUNS x ${SECS}s)"
  for i in $(seq "$RUNS"); do
    lg tls-baseline --server $TB_IP:$TB_PORT --implicit-tls --tls-version 1.3 \
      --sessions $SESSIONS --duration "$SECS" >/dev/null
    TBCMD=$(cmdline)
    lg sessions-gateway --server $GW_IP:$GW_PORT --sessions-only "${TLS[@]}" \
      --sessions $SESSIONS --duration "$SECS" >/dev/null
  done
  kill "$TB_PID" 2>/dev/null || true
  TBR=$(jget "$W/runs/tls-baseline.jsonl" 'r["sessions_per_s"]' | median)
  GSR=$(jget "$W/runs/sessions-gateway.jsonl" 'r["sessions_per_s"]' | median)
  PCT=$(calc "round(100 * $GSR / $TBR, 1)")
  row "new sessions/s (connect+EHLO+STARTTLS+QUIT) vs bare tokio-rustls handshake-and-close, same certificate, 50 concurrent" \
    "$GSR/s vs $TBR/s = $PCT %" "≥ 70 %" "$(verdict "$PCT >= 70")" "$(cmdline); $TBCMD"
fi

# ---- 5. RSS per idle TLS session -------------------------------------------------------------
if ! skip idle; then
  say "RSS per idle TLS session ($IDLE_N sessions, fresh gateway)"
  stop_gateway
  start_gateway
  sleep 1
  BEFORE=$(rss_kib "$GW_PID")
  : >"$W/runs/idle.jsonl"
  "$LG" --bind $LG_IP --label idle --server $GW_IP:$GW_PORT "${TLS[@]}" --idle "$IDLE_N" \
    --hold 600 >"$W/runs/idle.jsonl" 2>>"$LOG" &
  IDLE_PID=$!
  PIDS+=("$IDLE_PID")
  for i in $(seq 3000); do
    grep -q '^{' "$W/runs/idle.jsonl" && break
    sleep 0.1
  done
  sleep 2
  AFTER=$(rss_kib "$GW_PID")
  kill "$IDLE_PID" 2>/dev/null || true
  wait "$IDLE_PID" 2>/dev/null || true
  OPEN=$(jget "$W/runs/idle.jsonl" 'r["open"]')
  PER=$(calc "round(($AFTER - $BEFORE) / max($OPEN, 1), 1)")
  row "gateway RSS per idle TLS session (after STARTTLS + EHLO) at $OPEN sessions" \
    "$PER KiB (VmRSS $BEFORE → $AFTER KiB)" "≤ 64 KiB" "$(verdict "$PER <= 64")" \
    "pg-loadgen --server $GW_IP:$GW_PORT --starttls --tls-version 1.3 --idle $IDLE_N --hold 600"
  stop_gateway
  start_gateway
fi

# ---- 6. reload of NCONN connectors under load --------------------------------------------------
if ! skip reload; then
  say "reload of $NCONN connectors under load ($RUNS runs)"
  CHECK_MS=()
  for i in $(seq "$RUNS"); do
    gen=$((i + 1))
    connectors "$gen" "$NCONN" >"$W/gw/connectors.next.json"
    HASH=$(sha256sum "$W/gw/connectors.next.json" | cut -d' ' -f1)
    t0=$EPOCHREALTIME
    "$GW" check --fleet "$W/gw/fleet.json" --connectors "$W/gw/connectors.next.json" >/dev/null
    CHECK_MS+=("$(calc "round(1000 * ($EPOCHREALTIME - $t0), 1)")")
    lg reload --server $GW_IP:$GW_PORT "${TLS[@]}" --sessions $SESSIONS --size $SIZE \
      --messages $PER_SESSION --duration 4 --swap-from "$W/gw/connectors.next.json" \
      --swap-to "$W/gw/connectors.json" --swap-at 1 --admin $GW_IP:$GW_ADMIN \
      --expect-hash "$HASH" >/dev/null
  done
  RMED=$(jget "$W/runs/reload.jsonl" 'r["reload"].get("swap_to_status_ms", "nan")' | median)
  RMIN=$(jget "$W/runs/reload.jsonl" 'r["reload"].get("swap_to_status_ms", "nan")' | minimum)
  DROPPED=$(jget "$W/runs/reload.jsonl" 'r["failed"]' | sumv)
  CMED=$(printf '%s\n' "${CHECK_MS[@]}" | median)
  row "gateway reload of $NCONN connectors under load (50 STARTTLS sessions): file swap → /status shows the new hash; messages failed" \
    "median $RMED ms, min $RMIN ms (inotify wake-up + 5 ms settle + load; \`check\` of the same files: $CMED ms incl. process start); $DROPPED failed messages in $RUNS runs" \
    "≤ 50 ms, 0 dropped" "$(verdict "$RMED <= 50 and $DROPPED == 0")" "$(cmdline | sed "s/--expect-hash [0-9a-f]*/--expect-hash <sha256 of the new file>/")"
fi
stop_gateway

# ---- 7. Postfix -> sink ----------------------------------------------------------------------
PF_RATE=
if ! skip postfix; then
  say "Postfix $(postconf -d -h mail_version) -> sink (STARTTLS TLS 1.3, $RUNS x ${SECS}s)"
  pf_up
  : >"$W/runs/postfix-e2e.txt"
  for i in $(seq "$RUNS"); do
    lg postfix --server $PF_IP:$PF_PORT "${TLS[@]}" "${COMMON[@]}" >/dev/null
    DR=$(pf_drain)
    tail -n 1 "$W/runs/postfix.jsonl" | jq -r "(.ok / (.elapsed_s + $DR)) * 10 | round / 10" \
      >>"$W/runs/postfix-e2e.txt"
  done
  PF_RATE=$(jget "$W/runs/postfix.jsonl" 'r["msg_per_s"]' | median)
  P50=$(jget "$W/runs/postfix.jsonl" 'r["latency_ms"]["p50"]' | median)
  P99=$(jget "$W/runs/postfix.jsonl" 'r["latency_ms"]["p99"]' | median)
  ERR=$(jget "$W/runs/postfix.jsonl" 'r["failed"]' | sumv)
  E2E=$(median <"$W/runs/postfix-e2e.txt")
  row "Postfix $(postconf -d -h mail_version) (smtpd_tls_security_level=encrypt, queue) → sink, STARTTLS TLS 1.3, 50 sessions, 10 KiB" \
    "$PF_RATE msg/s accepted (p50 $P50 ms, p99 $P99 ms, $ERR failed); $E2E msg/s until the queue drained" \
    "—" "—" "$(cmdline)"
  postfix -c "$W/pf/conf" stop >/dev/null 2>&1 || true
fi

if [ -n "$GW_RATE" ] && [ -n "$PF_RATE" ]; then
  RATIO=$(calc "round($GW_RATE / $PF_RATE, 2)")
  row "ratio gateway / Postfix (msg/s, Postfix counted at acceptance into its queue)" \
    "${RATIO}×" "≥ 3×" "$(verdict "$RATIO >= 3")" "rows above"
fi

# ---- 8. operator rows (private local control plane; tests/bench/operator.sh) ---------------
KBIN=
if tests/cluster/build.sh --check >/dev/null 2>&1; then
  KBIN=$(tests/cluster/build.sh --print-bin-dir 2>/dev/null || true)
fi
if [ "${BENCH_OPERATOR:-1}" = 1 ] && ! skip operator && [ -x "$KBIN/kube-apiserver" ]; then
  say "operator: 5,000 unrelated Secrets, $NCONN connectors -> Programmed (private control plane)"
  if BENCH_WORK=$W BENCH_OP_CONNECTORS=$NCONN tests/bench/operator.sh >"$W/runs/operator.jsonl" 2>>"$LOG"; then
    O=$W/runs/operator.jsonl
    OC=$(jget "$O" 'r["create_s"]')
    OP_S=$(jget "$O" 'r["all_programmed_s"]')
    OPN=$(jget "$O" 'r["programmed"]')
    AFTER_APPLY=$(calc "round($OP_S - $OC, 1)")
    row "operator: $NCONN PartnerConnectors created (kubectl create, lists of 500) → all Programmed (1 gateway, ConfigMap/Secret copied to its files every 0.25 s)" \
      "$OPN Programmed $AFTER_APPLY s after the last create returned ($OP_S s from the first create; the API server took $OC s to create them)" \
      "≤ 30 s" "$(verdict "$OPN >= $NCONN and $AFTER_APPLY <= 30")" "tests/bench/operator.sh"
    RB=$(jget "$O" 'round(r["rss_kib_before"] / 1024, 1)')
    RA=$(jget "$O" 'round(r["rss_kib_after"] / 1024, 1)')
    RC=$(jget "$O" 'round(r["rss_kib_with_connectors"] / 1024, 1)')
    NS=$(jget "$O" 'r["secrets"]')
    row "operator RSS with $NS unrelated Secrets (release binary)" \
      "$RA MiB ($RB MiB before the Secrets; $RC MiB after $NCONN connectors)" "≤ 100 MiB" \
      "$(verdict "$RA <= 100")" "tests/bench/operator.sh"
  else
    row "operator rows" "failed (see $LOG)" "≤ 30 s; ≤ 100 MiB" "—" "tests/bench/operator.sh"
  fi
else
  row "operator: $NCONN connectors applied → all Programmed" "not measured" "≤ 30 s" "—" \
    "needs the control-plane binaries (tests/cluster/build.sh, not built: skipped); BENCH_OPERATOR=0 skips it"
  row "operator RSS with 5,000 unrelated Secrets" "not measured" "≤ 100 MiB" "—" \
    "needs the control-plane binaries (tests/cluster/build.sh)"
fi

# ------------------------------------------------------------------------------------------
{
  echo
  echo "partnergate benchmarks — $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) CPUs ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)), $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo) RAM; medians of $RUNS runs of ${SECS} s; \$W = $W"
  echo
  echo "| row | measured | goal | verdict | command |"
  echo "|---|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
} | tee "$W/results.md"
