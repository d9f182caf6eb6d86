#!/usr/bin/env bash
# make bench: partnergate gateway vs its peers (Postfix as a before-queue proxy, Postfix with its
# queue, Haraka, maddy) vs the limit (starttls-forwarder: STARTTLS then a byte copy) vs the sink,
# one run, one machine, one load generator (pg-loadgen). Prints one markdown table; details and
# raw JSON lines go to $BENCH_WORK (default target/bench). Not part of `make test`.
#
# Environment:
#   BENCH_RUNS=5            runs per noisy row (the median is quoted)
#   BENCH_SECS=8            seconds per throughput / latency / session-rate run
#   BENCH_IDLE_SESSIONS=10000
#   BENCH_CONNECTORS=1000   connectors in the gateway config (throughput rows and reload)
#   BENCH_SKIP="postfix idle ..."  rows to skip (validate sink gateway dkim limit postfix-proxy
#                           postfix haraka maddy latency sessions idle reload scale operator)
#   BENCH_SCALE="10 1000 10000"  connector counts of the scale rows (gateway CPU and reload)
#   BENCH_PROFILE=1         perf record the first run of each throughput row (tests/bench/profile.sh)
#   BENCH_GW=FILE           the gateway binary (default: the release build)
#   BENCH_GW_LOG=FILE       the gateway's log (default $BENCH_WORK/gateway.log)
#   BENCH_GW_BEFORE=FILE    another gateway binary: the scale rows run it interleaved with this
#                           one (before/after a change, same run window)
#   BENCH_BUILD=0           use the release binaries already in target/release
#   BENCH_OPERATOR=0        skip the operator rows (they start a private control plane)
#   BENCH_OP_CONNECTORS=10000  PartnerConnectors of the operator row (about 20 minutes)
#
# Loopback only, never port 25: load generator 127.0.0.10, sink 127.0.0.11, gateway 127.0.0.12,
# Postfix 127.0.0.13 (queue) and 127.0.0.15 (proxy), tls-baseline 127.0.0.14, starttls-forwarder
# 127.0.0.16, Haraka 127.0.0.17, maddy 127.0.0.18 (peer configs: tests/bench/peers/), Knot DNS
# 127.0.0.19 port 2719 (the dkim row's DKIM key).
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
PFP_IP=127.0.0.15 PFP_PORT=2715
FW_IP=127.0.0.16 FW_PORT=2716
HK_IP=127.0.0.17 HK_PORT=2717
MD_IP=127.0.0.18 MD_PORT=2718
DNS_IP=127.0.0.19 DNS_PORT=2719
SCALE=${BENCH_SCALE:-10 1000 10000}
GW_BEFORE=${BENCH_GW_BEFORE:-}

say() { printf '\033[1m== %s\033[0m\n' "$*" >&2; }
skip() { [[ "$SKIP" == *" $1 "* ]]; }

for t in smtp-sink smtp-source postfix openssl python3 curl; do
  command -v "$t" >/dev/null || [ -x "/usr/sbin/$t" ] || {
    echo "bench: $t not found (make deps)" >&2
    exit 1
  }
done
export PATH="$PATH:/usr/sbin"
if ! skip dkim; then
  for t in knotd dkimsign dig; do
    command -v "$t" >/dev/null || {
      echo "bench: $t not found (make deps), or BENCH_SKIP=dkim" >&2
      exit 1
    }
  done
fi

if [ "${BENCH_BUILD:-1}" = 1 ]; then
  say "building (release): partnergate-gateway, partnergate-bench"
  nice -n 5 cargo build -q --release -p partnergate-gateway -p partnergate-bench
fi
GW=${BENCH_GW:-$TARGET/release/partnergate-gateway}
LG=$TARGET/release/pg-loadgen
TB=$TARGET/release/tls-baseline
FW=$TARGET/release/starttls-forwarder

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
for a in $SINK_IP:$SINK_PORT $GW_IP:$GW_PORT $GW_IP:$GW_ADMIN $PF_IP:$PF_PORT $TB_IP:$TB_PORT \
  $PFP_IP:$PFP_PORT $FW_IP:$FW_PORT $HK_IP:$HK_PORT $MD_IP:$MD_PORT $DNS_IP:$DNS_PORT; do
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
  printf 'subjectAltName=DNS:gateway.bench.test,IP:%s,IP:%s,IP:%s,IP:%s,IP:%s,IP:%s,IP:%s\n' \
    $GW_IP $PF_IP $TB_IP $PFP_IP $FW_IP $HK_IP $MD_IP >server.ext
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
connectors() { # generation n [senderAuthentication of partners/bench] > file
  python3 - "$1" "$2" "${3:-None}" <<'PY'
import json, sys
gen, n, auth = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
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
bench = {"name": "partners/bench", "generation": gen, "domains": ["partner.test"], "requireTls": True, "minTlsVersion": "1.3"}
if auth != "None":
    bench["senderAuthentication"] = auth
inbound.append(bench)
print(json.dumps({"inbound": inbound, "outbound": []}, indent=1))
PY
}
connectors 1 "$NCONN" >"$W/gw/connectors.json"
"$GW" check --fleet "$W/gw/fleet.json" --connectors "$W/gw/connectors.json" >>"$LOG"

GW_PID=
GW_LOG=${BENCH_GW_LOG:-$W/gateway.log}
GW_CONF=$W/gw # the config directory start_gateway uses (the dkim row has its own)
start_gateway() { # [binary]
  # The log stays out of the config directory: the gateway watches that directory (inotify), and
  # every log write there would be an event for it to read and discard.
  "${1:-$GW}" --fleet "$GW_CONF/fleet.json" --connectors "$GW_CONF/connectors.json" 2>>"$GW_LOG" &
  GW_PID=$!
  PIDS+=("$GW_PID")
  local i
  for i in $(seq 100); do
    curl -sf "http://$GW_IP:$GW_ADMIN/readyz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "bench: gateway did not become ready (see $GW_LOG)" >&2
  return 1
}
stop_gateway() {
  [ -n "$GW_PID" ] || return 0
  kill "$GW_PID" 2>/dev/null || true
  wait "$GW_PID" 2>/dev/null || true
  GW_PID=
}
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
# CPU ticks (user + system, own and reaped children's) and PSS (KiB) of a process and all its
# live descendants: a peer's every process (Postfix's master and its daemons, Haraka's workers).
# An exiting child's ticks move into its parent's reaped-children fields, so the sum holds.
tree() { # pid ticks|rss
  python3 - "$1" "$2" <<'PY'
import os, sys
root, what = int(sys.argv[1]), sys.argv[2]
kids, ticks = {}, {}
for p in os.listdir("/proc"):
    if not p.isdigit():
        continue
    try:
        st = open(f"/proc/{p}/stat").read()
    except OSError:
        continue
    f = st[st.rindex(")") + 2:].split()
    kids.setdefault(int(f[1]), []).append(int(p))
    ticks[int(p)] = sum(int(x) for x in f[11:15])
todo, seen = [root], []
while todo:
    p = todo.pop()
    seen.append(p)
    todo.extend(kids.get(p, []))
if what == "ticks":
    print(sum(ticks.get(p, 0) for p in seen))
else:
    # Proportional set size: Postfix's 200 smtpd processes share their text and libraries,
    # which a sum of RSS would count 200 times.
    pss = 0
    for p in seen:
        try:
            for line in open(f"/proc/{p}/smaps_rollup"):
                if line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            pass
    print(pss)
PY
}
cpu_ticks() { tree "$1" ticks; }
TCK=$(getconf CLK_TCK)
load() { cut -d' ' -f1-3 /proc/loadavg; }

# ------------------------------------------------------------------------------------------
# Postfix 3.7 private instance: TLS required on its listener, relays example.test to the sink.
# Recipe as in tests/e2e/postfix.sh: private config and queue, loopback listener in master.cf.
pf_up() {
  local d=$W/pf
  mkdir -p "$d/conf" "$d/queue" "$d/data"
  chown postfix "$d/data"
  cp /etc/postfix/master.cf "$d/conf/master.cf"
  sed -i -E "s/^smtp +inet .*/$PF_IP:$PF_PORT inet n - n - - smtpd/" "$d/conf/master.cf"
  # The before-queue proxy (Postfix's own inline relay): this listener hands every transaction
  # straight to the sink and answers the client with the sink's reply; nothing is queued.
  printf '%s inet n - n - - smtpd\n  -o smtpd_proxy_filter=%s\n' \
    "$PFP_IP:$PFP_PORT" "$SINK_IP:$SINK_PORT" >>"$d/conf/master.cf"
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
  wait_port $PFP_IP $PFP_PORT 30
}
pf_master() { head -n 1 "$W/pf/queue/pid/master.pid" | tr -d ' '; }
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

# One throughput row of a server (the gateway, a peer or the limit): RUNS closed-loop runs of
# the same STARTTLS load; CPU of the whole process tree per message (ticks over the run plus the
# optional drain, e.g. Postfix's queue), PSS of the tree after the runs, load average per run.
declare -A P_RATE P_P50 P_P99 P_CPU P_RSS P_LOAD P_ERR P_CMD
LG_EXTRA=() # extra generator options of the row being measured (the dkim row's signed message)
peer_bench() { # name root-pid ip:port [command run after each load, before the CPU sample]
  local name=$1 pid=$2 server=$3 after=${4:-} i c0 c1
  : >"$W/runs/$name-cpu.txt"
  : >"$W/runs/$name-load.txt"
  for i in $(seq "$RUNS"); do
    local perf_pid=
    if [ "${BENCH_PROFILE:-0}" = 1 ] && [ "$i" = 1 ]; then
      perf record -q -F 499 -g -p "$pid" -o "$W/perf-$name.data" -- sleep "$SECS" \
        >>"$LOG" 2>&1 &
      perf_pid=$!
    fi
    c0=$(cpu_ticks "$pid")
    lg "$name" --server "$server" "${TLS[@]}" "${COMMON[@]}" "${LG_EXTRA[@]}" >/dev/null
    if [ -n "$perf_pid" ]; then
      wait "$perf_pid" || true
      perf report -i "$W/perf-$name.data" --no-children --sort dso,symbol --stdio 2>/dev/null |
        grep -v '^#' | grep '%' | head -n 60 >"$W/profile-$name.txt" || true
      perf report -i "$W/perf-$name.data" --no-children --sort dso --stdio 2>/dev/null |
        grep -v '^#' | grep '%' | head -n 15 >"$W/profile-$name-dso.txt" || true
      say "profile of $name: $W/profile-$name.txt (this run's numbers include perf's overhead)"
    fi
    [ -z "$after" ] || $after
    c1=$(cpu_ticks "$pid")
    load | cut -d' ' -f1 >>"$W/runs/$name-load.txt"
    tail -n 1 "$W/runs/$name.jsonl" |
      jq -r "($c1 - $c0) * 1000000 / $TCK / ([.ok, 1] | max) | round" >>"$W/runs/$name-cpu.txt"
  done
  P_RSS[$name]=$(calc "round($(tree "$pid" rss) / 1024, 1)")
  P_CPU[$name]=$(median <"$W/runs/$name-cpu.txt")
  P_LOAD[$name]=$(median <"$W/runs/$name-load.txt")
  P_RATE[$name]=$(jget "$W/runs/$name.jsonl" 'r["msg_per_s"]' | median)
  P_P50[$name]=$(jget "$W/runs/$name.jsonl" 'r["latency_ms"]["p50"]' | median)
  P_P99[$name]=$(jget "$W/runs/$name.jsonl" 'r["latency_ms"]["p99"]' | median)
  P_ERR[$name]=$(jget "$W/runs/$name.jsonl" 'r["failed"]' | sumv)
  P_CMD[$name]=$(cmdline)
}
peer_measured() { # name -> the measured cell
  local n=$1
  printf '%s msg/s (p50 %s ms, p99 %s ms, %s failed; CPU %s µs/message, all processes; PSS %s MiB; load %s)' \
    "${P_RATE[$n]}" "${P_P50[$n]}" "${P_P99[$n]}" "${P_ERR[$n]}" "${P_CPU[$n]}" "${P_RSS[$n]}" "${P_LOAD[$n]}"
}
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
  peer_bench gateway "$GW_PID" $GW_IP:$GW_PORT
  GW_RATE=${P_RATE[gateway]}
  GW_CPU=${P_CPU[gateway]}
  row "partnergate gateway (release) → sink, STARTTLS TLS 1.3, 50 sessions, 10 KiB, $NCONN connectors" \
    "$(peer_measured gateway)" "CPU ≤ 100 µs/message" "$(verdict "$GW_CPU <= 100")" "${P_CMD[gateway]}"
fi

# ---- 2b. gateway -> sink with DKIM verification (issue 16) ----------------------------------
# The same load and connectors, but partners/bench requires `senderAuthentication: DKIM`: every
# message carries a real RSA-2048 signature (dkimpy's dkimsign, relaxed/relaxed, d=partner.test,
# signed once: the generator sends those bytes every time) and the key is served by a private
# Knot on $DNS_IP:$DNS_PORT, the fleet's dnsResolver. The row fails unless the gateway's
# /metrics counted dkim=pass once per accepted message: a run that silently skipped or failed
# verification would measure nothing.
BENCH_FAILED=
dkim_setup() {
  local d=$W/dkim
  mkdir -p "$d/db" "$W/gw-dkim"
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$d/sel.pem" 2>/dev/null
  local pub
  pub=$(openssl pkey -pubout -outform DER -in "$d/sel.pem" | openssl base64 -A)
  # TXT strings are at most 255 octets: the key is split into strings of 200.
  python3 - "$pub" "$DNS_IP" >"$d/partner.test.zone" <<'PY'
import sys
key, ip = sys.argv[1], sys.argv[2]
rec = f"v=DKIM1; k=rsa; p={key}"
txt = " ".join(f'"{rec[i:i + 200]}"' for i in range(0, len(rec), 200))
print(f"""$ORIGIN partner.test.
$TTL 300
@ IN SOA ns hostmaster.ns 1 3600 600 86400 300
@ IN NS ns
ns IN A {ip}
sel._domainkey IN TXT {txt}""")
PY
  # As gateway/tests/it/support/dns.rs: zone file served as it is, never written back, no
  # journal.
  cat >"$d/knot.conf" <<KNOT
server:
    rundir: "$d"
    listen: $DNS_IP@$DNS_PORT
database:
    storage: "$d/db"
log:
  - target: stderr
    any: info
template:
  - id: default
    storage: "$d"
    semantic-checks: off
    zonefile-sync: -1
    zonefile-load: whole
    journal-content: none
zone:
  - domain: partner.test
    file: "$d/partner.test.zone"
KNOT
  knotd -c "$d/knot.conf" >"$d/knotd.log" 2>&1 &
  DNS_PID=$!
  PIDS+=("$DNS_PID")
  local i
  for i in $(seq 100); do
    dig @$DNS_IP -p $DNS_PORT +norecurse +tries=1 +time=1 +short sel._domainkey.partner.test TXT \
      2>/dev/null | grep -q 'v=DKIM1' && break
    [ "$i" = 100 ] && { echo "bench: knotd does not serve the DKIM key (see $d/knotd.log)" >&2; return 1; }
    sleep 0.1
  done
  # The message pg-loadgen would generate (same shape as build_message in tests/bench/src),
  # signed; built twice so that with its DKIM-Signature it is SIZE octets on the wire.
  python3 - "$SIZE" "$d/sel.pem" "$d/message.eml" >"$d/message.len" <<'PY'
import subprocess, sys
size, pem, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
LINE = b"The quick brown fox jumps over the lazy dog; 0123456789 abcdefghijklmnopqrstuvw"
def build(n):
    m = (b"From: <bench@partner.test>\r\nTo: <rcpt0@example.test>\r\nSubject: partnergate benchmark\r\n"
         b"Date: Sat, 28 Nov 2026 10:00:00 +0000\r\nMessage-ID: <bench@loadgen.test>\r\n\r\n")
    while len(m) + 2 < n:
        m += LINE[:min(n - len(m) - 2, len(LINE))] + b"\r\n"
    return m
def sign(m):
    s = subprocess.run(["dkimsign", "--hcanon", "relaxed", "--bcanon", "relaxed", "sel",
                        "partner.test", pem], input=m, capture_output=True, check=True).stdout
    assert s.startswith(b"DKIM-Signature:"), s[:200]
    # dkimsign folds its header with bare LF; the wire has CRLF (as pg-loadgen sends it).
    return s.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
signed = sign(build(size))
signed = sign(build(size - (len(signed) - size)))
open(out, "wb").write(signed)
print(len(signed))
PY
  jq --arg r "$DNS_IP:$DNS_PORT" '.dnsResolver = $r' "$W/gw/fleet.json" >"$W/gw-dkim/fleet.json"
  cp "$W/gw/ca.pem" "$W/gw-dkim/ca.pem"
  connectors 1 "$NCONN" DKIM >"$W/gw-dkim/connectors.json"
  "$GW" check --fleet "$W/gw-dkim/fleet.json" --connectors "$W/gw-dkim/connectors.json" >>"$LOG"
}
sender_auth() { # dkim pass|other: partnergate_sender_auth_total summed over connectors
  curl -sf "http://$GW_IP:$GW_ADMIN/metrics" | python3 -c '
import re, sys
mech, want = sys.argv[1], sys.argv[2]
n = 0
for line in sys.stdin:
    m = re.match(r"partnergate_sender_auth_total\{(.*)\} (\S+)$", line.strip())
    if not m:
        continue
    labels = dict(re.findall(r"(\w+)=\"([^\"]*)\"", m.group(1)))
    if labels.get("mechanism") != mech:
        continue
    if (labels.get("result") == "pass") == (want == "pass"):
        n += float(m.group(2))
print(int(n))' "$1" "$2"
}
if ! skip dkim; then
  say "gateway -> sink with DKIM verification (STARTTLS TLS 1.3, $RUNS x ${SECS}s)"
  dkim_setup # not in a subshell: it starts knotd (DNS_PID, PIDS)
  MSG_LEN=$(cat "$W/dkim/message.len")
  stop_gateway
  GW_CONF=$W/gw-dkim
  start_gateway
  PASS0=$(sender_auth dkim pass)
  OTHER0=$(sender_auth dkim other)
  LG_EXTRA=(--message-file "$W/dkim/message.eml")
  K0=$(cpu_ticks "$DNS_PID")
  peer_bench dkim "$GW_PID" $GW_IP:$GW_PORT
  K1=$(cpu_ticks "$DNS_PID")
  LG_EXTRA=()
  PASSED=$(($(sender_auth dkim pass) - PASS0))
  OTHER=$(($(sender_auth dkim other) - OTHER0))
  SENT=$(jget "$W/runs/dkim.jsonl" 'r["ok"]' | sumv)
  # Knot's CPU is not in the row's (the gateway's alone); shown so that a resolver that stopped
  # caching the key would be seen.
  KNOT_US=$(calc "round(($K1 - $K0) * 1000000 / $TCK / max($SENT, 1), 2)")
  stop_gateway
  GW_CONF=$W/gw
  start_gateway
  kill "$DNS_PID" 2>/dev/null || true
  DK_CPU=${P_CPU[dkim]}
  VS="no plain gateway row in this run"
  if [ -n "$GW_RATE" ]; then
    VS="DKIM verification adds $(calc "round($DK_CPU - $GW_CPU, 1)") µs/message to the gateway row's $GW_CPU µs ($(calc "round(100 * ($DK_CPU - $GW_CPU) / max($GW_CPU, 1), 1)") %), $(calc "round(${P_RATE[dkim]} / $GW_RATE * 100, 1)") % of its msg/s"
  fi
  if [ "$SENT" -gt 0 ] && [ "$PASSED" = "$SENT" ] && [ "$OTHER" = 0 ] && [ "${P_ERR[dkim]}" = 0 ]; then
    DV=met
  else
    DV="FAILED: dkim=pass $PASSED, other DKIM results $OTHER, for $SENT accepted and ${P_ERR[dkim]} failed messages"
    BENCH_FAILED=1
  fi
  row "partnergate gateway (release) → sink with DKIM verification (partners/bench: senderAuthentication DKIM; RSA-2048 relaxed/relaxed, dkimsign; key from Knot, the fleet dnsResolver), same load, $MSG_LEN-octet signed message, $NCONN connectors" \
    "$(peer_measured dkim); $VS; dkim=pass counted (/metrics) for $PASSED of $SENT messages; knotd $KNOT_US µs/message" \
    "every message dkim=pass" "$DV" "${P_CMD[dkim]}"
fi

# ---- 3. latency added by the gateway at 50 % of its max rate ---------------------------------
# Also through the limit (starttls-forwarder) at the same rate: the same TLS client work and the
# same two loopback legs, so gateway minus limit is what the gateway's SMTP handling adds on top
# of the architecture's transport.
if ! skip latency && [ -n "$GW_RATE" ]; then
  RATE=$(calc "round($GW_RATE / 2)")
  say "latency at $RATE msg/s open loop (gateway vs limit vs sink direct, $RUNS x ${SECS}s)"
  LAT_FW=
  if ! skip limit; then
    "$FW" --listen $FW_IP:$FW_PORT --next-hop $SINK_IP:$SINK_PORT --cert "$W/pki/server.crt" \
      --key "$W/pki/server.key" 2>>"$LOG" &
    LAT_FW=$!
    PIDS+=("$LAT_FW")
    wait_port $FW_IP $FW_PORT
  fi
  for i in $(seq "$RUNS"); do
    lg lat-direct --server $SINK_IP:$SINK_PORT "${LAT[@]}" --rate "$RATE" >/dev/null
    lg lat-gateway --server $GW_IP:$GW_PORT "${TLS[@]}" "${LAT[@]}" --rate "$RATE" >/dev/null
    LATCMD=$(cmdline)
    [ -z "$LAT_FW" ] ||
      lg lat-limit --server $FW_IP:$FW_PORT "${TLS[@]}" "${LAT[@]}" --rate "$RATE" >/dev/null
  done
  [ -z "$LAT_FW" ] || kill "$LAT_FW" 2>/dev/null || true
  D99=$(jget "$W/runs/lat-direct.jsonl" 'r["latency_ms"]["p99"]' | median)
  G99=$(jget "$W/runs/lat-gateway.jsonl" 'r["latency_ms"]["p99"]' | median)
  G50=$(jget "$W/runs/lat-gateway.jsonl" 'r["latency_ms"]["p50"]' | median)
  D50=$(jget "$W/runs/lat-direct.jsonl" 'r["latency_ms"]["p50"]' | median)
  ADD=$(calc "round($G99 - $D99, 3)")
  VS_LIMIT=
  if [ -n "$LAT_FW" ]; then
    L99=$(jget "$W/runs/lat-limit.jsonl" 'r["latency_ms"]["p99"]' | median)
    L50=$(jget "$W/runs/lat-limit.jsonl" 'r["latency_ms"]["p50"]' | median)
    VS_LIMIT="; through the limit at the same rate p99 $L99 ms, p50 $L50 ms: the gateway adds $(calc "round($G99 - $L99, 3)") ms at p99 over the limit"
  fi
  row "p99 latency added by the gateway (MAIL → final 250) at 50 % of its max rate ($RATE msg/s, open loop)" \
    "+$ADD ms (p99 $G99 ms via gateway with TLS vs $D99 ms to the sink directly; p50 $G50 vs $D50 ms$VS_LIMIT)" \
    "≤ 1 ms" "$(verdict "$ADD <= 1")" "$LATCMD"
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
    "$PER KiB (VmRSS $BEFORE → $AFTER KiB)" "≤ 16 KiB" "$(verdict "$PER <= 16")" \
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

# ---- 7. the limit: starttls-forwarder (greeting, EHLO, STARTTLS, handshake, then a byte copy) ---
if ! skip limit; then
  say "limit: starttls-forwarder -> sink ($RUNS x ${SECS}s)"
  "$FW" --listen $FW_IP:$FW_PORT --next-hop $SINK_IP:$SINK_PORT --cert "$W/pki/server.crt" \
    --key "$W/pki/server.key" 2>>"$LOG" &
  FW_PID=$!
  PIDS+=("$FW_PID")
  wait_port $FW_IP $FW_PORT
  peer_bench limit "$FW_PID" $FW_IP:$FW_PORT
  row "the limit: starttls-forwarder (tests/bench: STARTTLS, handshake, then copies bytes to the sink), same load" \
    "$(peer_measured limit)" "—" "—" "${P_CMD[limit]}"
  kill "$FW_PID" 2>/dev/null || true
fi

# ---- 8. Postfix: before-queue proxy (inline, no queue) and with its queue -------------------
PF_VERSION=$(postconf -d -h mail_version)
if ! skip postfix-proxy || ! skip postfix; then
  pf_up
fi
if ! skip postfix-proxy; then
  say "Postfix $PF_VERSION smtpd_proxy_filter -> sink ($RUNS x ${SECS}s)"
  peer_bench postfix-proxy "$(pf_master)" $PFP_IP:$PFP_PORT
  row "Postfix $PF_VERSION as a before-queue proxy (smtpd_proxy_filter straight at the sink, no queue, smtpd_tls_security_level=encrypt), same load" \
    "$(peer_measured postfix-proxy)" "—" "—" "${P_CMD[postfix-proxy]}"
fi
if ! skip postfix; then
  say "Postfix $PF_VERSION with its queue -> sink ($RUNS x ${SECS}s)"
  : >"$W/runs/postfix-e2e.txt"
  pf_after() { # CPU includes delivering the queue; e2e = messages / (run + drain)
    local dr
    dr=$(pf_drain)
    tail -n 1 "$W/runs/postfix.jsonl" | jq -r "(.ok / (.elapsed_s + $dr)) * 10 | round / 10" \
      >>"$W/runs/postfix-e2e.txt"
  }
  peer_bench postfix "$(pf_master)" $PF_IP:$PF_PORT pf_after
  E2E=$(median <"$W/runs/postfix-e2e.txt")
  row "Postfix $PF_VERSION with its queue (smtpd_tls_security_level=encrypt) → sink, counted at acceptance; CPU includes draining the queue" \
    "$(peer_measured postfix); $E2E msg/s until the queue drained" "—" "—" "${P_CMD[postfix]}"
fi
[ -d "$W/pf/conf" ] && postfix -c "$W/pf/conf" stop >/dev/null 2>&1 || true

# ---- 9. Haraka and maddy (installed and cached by tests/bench/peers.sh) ----------------------
peer_bin() { tests/bench/peers.sh "$1" 2>>"$LOG" | tail -n 1; }
if ! skip haraka; then
  read -r _ HK_BIN HK_WHY <<<"$(peer_bin haraka)"
  if [ "$HK_BIN" = skip ]; then
    row "Haraka" "not measured: $HK_WHY" "—" "—" "tests/bench/peers.sh haraka"
  else
    HK_VERSION=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["version"])' \
      "$(dirname "$(dirname "$HK_BIN")")/package.json")
    say "Haraka $HK_VERSION -> sink ($RUNS x ${SECS}s)"
    mkdir -p "$W/haraka/config"
    cp -r "$(dirname "$(dirname "$HK_BIN")")/config/." "$W/haraka/config/"
    cp -r tests/bench/peers/haraka/config/. "$W/haraka/config/"
    cp "$W/pki/server.crt" "$W/haraka/config/tls_cert.pem"
    cp "$W/pki/server.key" "$W/haraka/config/tls_key.pem"
    "$HK_BIN" -c "$W/haraka" >"$W/haraka/haraka.log" 2>&1 &
    HK_PID=$!
    PIDS+=("$HK_PID")
    wait_port $HK_IP $HK_PORT 30
    sleep 2 # every worker listening
    peer_bench haraka "$HK_PID" $HK_IP:$HK_PORT
    row "Haraka $HK_VERSION (tls, rcpt_to.in_host_list, queue/smtp_forward to the sink: answers after the sink accepted; cluster, $(nproc) workers), same load" \
      "$(peer_measured haraka)" "—" "—" "${P_CMD[haraka]}"
    kill "$HK_PID" 2>/dev/null || true
  fi
fi
if ! skip maddy; then
  read -r _ MD_BIN MD_WHY <<<"$(peer_bin maddy)"
  if [ "$MD_BIN" = skip ]; then
    row "maddy" "not measured: $MD_WHY" "—" "—" "tests/bench/peers.sh maddy"
  else
    say "maddy -> sink ($RUNS x ${SECS}s)"
    mkdir -p "$W/maddy/state" "$W/maddy/run" "$W/maddy/queue"
    sed "s|\$W|$W|g" tests/bench/peers/maddy/maddy.conf >"$W/maddy/maddy.conf"
    # This box's DNS server leaves PTR queries for loopback addresses unanswered, which cost
    # maddy (its own resolver, no nsswitch) a 5 s timeout on the first message of every session
    # (rDNS for its Received header). A private /etc/hosts naming the generator's address
    # stands for the PTR record a real client has.
    { cat /etc/hosts; echo "$LG_IP loadgen.bench.test"; } >"$W/maddy/hosts"
    unshare --mount sh -c 'mount --bind "$1" /etc/hosts && shift && exec "$@"' - "$W/maddy/hosts" \
      "$MD_BIN" --config "$W/maddy/maddy.conf" run >"$W/maddy/maddy.log" 2>&1 &
    MD_PID=$!
    PIDS+=("$MD_PID")
    if wait_port $MD_IP $MD_PORT 30; then
      peer_bench maddy "$MD_PID" $MD_IP:$MD_PORT
      row "maddy $(basename "$(dirname "$(dirname "$MD_BIN")")" | sed 's/^maddy-//') (queue → target.smtp to the sink, counted at acceptance), same load" \
        "$(peer_measured maddy)" "—" "—" "${P_CMD[maddy]}"
    else
      row "maddy" "not measured: did not start (see \$W/maddy/maddy.log)" "—" "—" "tests/bench/peers.sh maddy"
    fi
    kill "$MD_PID" 2>/dev/null || true
  fi
fi

# ---- 10. ratios: the gateway against each peer and the limit ---------------------------------
if [ -n "$GW_RATE" ]; then
  for n in postfix-proxy haraka postfix maddy; do
    [ -n "${P_RATE[$n]:-}" ] || continue
    row "ratio gateway / $n (msg/s; CPU per message)" \
      "$(calc "round($GW_RATE / ${P_RATE[$n]}, 2)")× msg/s; $(calc "round(${P_CPU[$n]} / max($GW_CPU, 1), 2)")× less CPU per message" \
      "—" "—" "rows above"
  done
  BEST=
  for n in postfix-proxy haraka; do
    [ -n "${P_RATE[$n]:-}" ] || continue
    if [ -z "$BEST" ] || python3 -c "import sys; sys.exit(0 if ${P_RATE[$n]} > ${P_RATE[$BEST]} else 1)"; then
      BEST=$n
    fi
  done
  if [ -n "$BEST" ]; then
    R=$(calc "round($GW_RATE / ${P_RATE[$BEST]}, 2)")
    row "gateway vs the best inline peer ($BEST), $NCONN connectors on the gateway, none on the peer" \
      "${R}×" "≥ 4×" "$(verdict "$R >= 4")" "rows above"
  fi
  if [ -n "${P_RATE[limit]:-}" ]; then
    PCT=$(calc "round(100 * $GW_RATE / ${P_RATE[limit]}, 1)")
    row "gateway / the limit (starttls-forwarder), msg/s; CPU per message gateway vs limit" \
      "$PCT % ($GW_CPU vs ${P_CPU[limit]} µs/message)" "≥ 80 %" "$(verdict "$PCT >= 80")" "rows above"
  fi
fi

# ---- 11. cost as connectors grow: the gateway row and the reload row at each count in SCALE ----
if ! skip scale; then
  BINS=("$GW")
  [ -n "$GW_BEFORE" ] && BINS=("$GW_BEFORE" "$GW")
  declare -A SC_CPU SC_RATE SC_RELOAD
  for n in $SCALE; do
    connectors 1 "$n" >"$W/gw/connectors.json"
    say "scale: $n connectors ($RUNS rounds, ${#BINS[@]} build(s) interleaved)"
    for i in $(seq "$RUNS"); do
      for b in "${BINS[@]}"; do
        tag=$([ "$b" = "$GW" ] && echo after || echo before)
        start_gateway "$b"
        c0=$(cpu_ticks "$GW_PID")
        lg "scale-$n-$tag" --server $GW_IP:$GW_PORT "${TLS[@]}" "${COMMON[@]}" >/dev/null
        c1=$(cpu_ticks "$GW_PID")
        SC_CMD=$(cmdline)
        tail -n 1 "$W/runs/scale-$n-$tag.jsonl" |
          jq -r "($c1 - $c0) * 1000000 / $TCK / ([.ok, 1] | max) | round" >>"$W/runs/scale-$n-$tag-cpu.txt"
        load | cut -d' ' -f1 >>"$W/runs/scale-$n-$tag-load.txt"
        if [ "$tag" = after ] && ! skip reload; then
          connectors $((i + 1)) "$n" >"$W/gw/connectors.next.json"
          HASH=$(sha256sum "$W/gw/connectors.next.json" | cut -d' ' -f1)
          lg "scale-reload-$n" --server $GW_IP:$GW_PORT "${TLS[@]}" --sessions $SESSIONS --size $SIZE \
            --messages $PER_SESSION --duration 4 --swap-from "$W/gw/connectors.next.json" \
            --swap-to "$W/gw/connectors.json" --swap-at 1 --admin $GW_IP:$GW_ADMIN \
            --expect-hash "$HASH" >/dev/null
        fi
        stop_gateway
      done
    done
    for tag in before after; do
      [ -f "$W/runs/scale-$n-$tag-cpu.txt" ] || continue
      SC_CPU[$n-$tag]=$(median <"$W/runs/scale-$n-$tag-cpu.txt")
      SC_RATE[$n-$tag]=$(jget "$W/runs/scale-$n-$tag.jsonl" 'r["msg_per_s"]' | median)
      L=$(median <"$W/runs/scale-$n-$tag-load.txt")
      row "scale: gateway ($tag) → sink with $n connectors" \
        "${SC_RATE[$n-$tag]} msg/s; CPU ${SC_CPU[$n-$tag]} µs/message (runs: $(paste -sd/ "$W/runs/scale-$n-$tag-cpu.txt")); load $L" \
        "—" "—" "$SC_CMD (gateway restarted with $n connectors, $(basename "$([ "$tag" = after ] && echo "$GW" || echo "$GW_BEFORE")"))"
    done
    if [ -f "$W/runs/scale-reload-$n.jsonl" ]; then
      RMED=$(jget "$W/runs/scale-reload-$n.jsonl" 'r["reload"].get("swap_to_status_ms", "nan")' | median)
      DROPPED=$(jget "$W/runs/scale-reload-$n.jsonl" 'r["failed"]' | sumv)
      row "scale: reload of $n connectors under load: swap → /status shows the new hash" \
        "median $RMED ms; $DROPPED failed messages" "≤ 50 ms, 0 dropped" \
        "$(verdict "$RMED <= 50 and $DROPPED == 0")" "as the reload row, with $n connectors"
    fi
  done
  first=${SCALE%% *}
  last=${SCALE##* }
  if [ -n "${SC_CPU[$first-after]:-}" ] && [ -n "${SC_CPU[$last-after]:-}" ] && [ "$first" != "$last" ]; then
    G=$(calc "round(100 * (${SC_CPU[$last-after]} - ${SC_CPU[$first-after]}) / ${SC_CPU[$first-after]}, 1)")
    row "gateway CPU per message at $last vs $first connectors" \
      "${SC_CPU[$last-after]} vs ${SC_CPU[$first-after]} µs (${G} %)" "within 10 %" \
      "$(verdict "$G <= 10")" "scale rows above"
  fi
  connectors 1 "$NCONN" >"$W/gw/connectors.json"
fi

# ---- 12. operator rows (private local control plane; tests/bench/operator.sh) ---------------
# Issue 17: 10,000 PartnerConnectors (BENCH_OP_CONNECTORS); the API server creates them at
# about 10 per second on a 2-core box, so this row alone takes about 20 minutes.
OPC=${BENCH_OP_CONNECTORS:-10000}
KBIN=
if tests/cluster/build.sh --check >/dev/null 2>&1; then
  KBIN=$(tests/cluster/build.sh --print-bin-dir 2>/dev/null || true)
fi
if [ "${BENCH_OPERATOR:-1}" = 1 ] && ! skip operator && [ -x "$KBIN/kube-apiserver" ]; then
  say "operator: 5,000 unrelated Secrets, $OPC connectors -> Programmed (private control plane)"
  if BENCH_WORK=$W BENCH_OP_CONNECTORS=$OPC tests/bench/operator.sh >"$W/runs/operator.jsonl" 2>>"$LOG"; then
    O=$W/runs/operator.jsonl
    OC=$(jget "$O" 'r["create_s"]')
    OP_S=$(jget "$O" 'r["all_programmed_s"]')
    OPN=$(jget "$O" 'r["programmed"]')
    AFTER_APPLY=$(calc "round($OP_S - $OC, 1)")
    OLOAD=$(jget "$O" 'r.get("loadavg", "?")')
    row "operator: $OPC PartnerConnectors created (kubectl create, lists of 500) → all Programmed (1 gateway, ConfigMap/Secret copied to its files every 0.25 s)" \
      "$OPN Programmed $AFTER_APPLY s after the last create returned ($OP_S s from the first create; the API server took $OC s to create them; load average $OLOAD)" \
      "≤ 60 s" "$(verdict "$OPN >= $OPC and $AFTER_APPLY <= 60")" "tests/bench/operator.sh"
    RB=$(jget "$O" 'round(r["rss_kib_before"] / 1024, 1)')
    RA=$(jget "$O" 'round(r["rss_kib_after"] / 1024, 1)')
    RC=$(jget "$O" 'round(r["rss_kib_with_connectors"] / 1024, 1)')
    NS=$(jget "$O" 'r["secrets"]')
    row "operator RSS at $OPC connectors (release binary; with $NS unrelated Secrets)" \
      "$RC MiB ($RB MiB at start, $RA MiB with the Secrets; peak $(jget "$O" 'round(r.get("rss_kib_peak", 0) / 1024, 1)') MiB)" "≤ 200 MiB" \
      "$(verdict "$RC <= 200")" "tests/bench/operator.sh"
  else
    row "operator rows" "failed (see $LOG)" "≤ 60 s; ≤ 200 MiB" "—" "tests/bench/operator.sh"
  fi
else
  why="control-plane binaries missing (tests/cluster/build.sh)"
  { [ "${BENCH_OPERATOR:-1}" != 1 ] || skip operator; } && why="skipped (BENCH_OPERATOR=0 or BENCH_SKIP)"
  row "operator: $OPC connectors applied → all Programmed" "not measured: $why" "≤ 60 s" "—" \
    "tests/bench/operator.sh"
  row "operator RSS at $OPC connectors" "not measured: $why" "≤ 200 MiB" "—" \
    "tests/bench/operator.sh"
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
if [ -n "$BENCH_FAILED" ]; then
  echo "bench: the dkim row did not verify every message (see its verdict)" >&2
  exit 1
fi
