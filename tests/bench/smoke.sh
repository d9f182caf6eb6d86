#!/usr/bin/env bash
# Smoke run of pg-loadgen (part of `make test`, < 30 s): Postfix's smtp-sink on loopback,
# plaintext, 2 sessions x 5 messages; asserts 10 messages accepted and the JSON line parses;
# then 6 messages read from a file (--message-file, the dkim row's signed message).
# Then the same through starttls-forwarder (the bench's limit row) with STARTTLS TLS 1.3, so the
# limit's setup is exercised too. The other peers (Postfix proxy, Haraka, maddy) need installs
# and run only in `make bench`.
set -euo pipefail
cd "$(dirname "$0")/../.."
ADDR=${BENCH_SMOKE_ADDR:-127.0.0.71}
PORT=${BENCH_SMOKE_PORT:-2791}
SINK=$(command -v smtp-sink || echo /usr/sbin/smtp-sink)
[ -x "$SINK" ] || { echo "smoke: smtp-sink not found (apt-get install postfix)" >&2; exit 1; }

cargo build -q -p partnergate-bench --bin pg-loadgen --bin starttls-forwarder
BIN=${CARGO_TARGET_DIR:-target}/debug/pg-loadgen
FWD=${CARGO_TARGET_DIR:-target}/debug/starttls-forwarder
FWD_PORT=$((PORT + 1))

work=$(mktemp -d)
sink_pid=
fwd_pid=
cleanup() {
  [ -n "$sink_pid" ] && kill "$sink_pid" 2>/dev/null || true
  [ -n "$fwd_pid" ] && kill "$fwd_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# smtp-sink drops privileges to -u (default "postfix") when started as root.
sink_user=()
[ "$(id -u)" = 0 ] && sink_user=(-u postfix)
"$SINK" "${sink_user[@]}" "$ADDR:$PORT" 64 &
sink_pid=$!
for _ in $(seq 50); do
  (echo >"/dev/tcp/$ADDR/$PORT") 2>/dev/null && break
  sleep 0.1
done

"$BIN" --server "$ADDR:$PORT" --sessions 2 --messages 5 --size 2048 --rcpts 2 \
  --label smoke --timeout 10 >"$work/out.json"

python3 - "$work/out.json" <<'PY'
import json, sys
lines = [l for l in open(sys.argv[1]) if l.strip()]
assert len(lines) == 1, f"expected one JSON line, got {len(lines)}"
r = json.loads(lines[0])
assert r["mode"] == "messages", r
assert r["ok"] == 10 and r["failed"] == 0, f"expected 10 ok, 0 failed: {r}"
assert r["errors"] == {}, r
assert r["msg_per_s"] > 0 and r["latency_ms"]["count"] == 10, r
assert r["sessions_opened"] == 2, r
print(f"smoke: ok, 10 messages, {r['msg_per_s']} msg/s, p99 {r['latency_ms']['p99']} ms")
PY

# --message-file (the bench's dkim row sends a signed message this way): a file with bare-LF
# line ends and a line starting with a dot is accepted as every message.
printf 'From: <bench@partner.test>\nTo: <rcpt0@example.test>\nSubject: smoke\n\n.dot line\nend\n' \
  >"$work/message.eml"
"$BIN" --server "$ADDR:$PORT" --sessions 2 --messages 3 --message-file "$work/message.eml" \
  --label smoke-file --timeout 10 >"$work/file.json"
python3 - "$work/file.json" <<'PY'
import json, sys
r = json.loads(open(sys.argv[1]).read())
assert r["ok"] == 6 and r["failed"] == 0 and r["errors"] == {}, r
print("smoke: ok, 6 messages from --message-file")
PY

# The limit row's forwarder: STARTTLS, handshake, then bytes copied to the sink.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
  -subj "/CN=smoke.test" -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
"$FWD" --listen "$ADDR:$FWD_PORT" --next-hop "$ADDR:$PORT" --cert "$work/cert.pem" \
  --key "$work/key.pem" --threads 1 2>"$work/fwd.log" &
fwd_pid=$!
for _ in $(seq 50); do
  (echo >"/dev/tcp/$ADDR/$FWD_PORT") 2>/dev/null && break
  sleep 0.1
done
"$BIN" --server "$ADDR:$FWD_PORT" --starttls --tls-version 1.3 --sessions 2 --messages 5 \
  --size 2048 --label smoke-limit --timeout 10 >"$work/limit.json"
python3 - "$work/limit.json" <<'PY'
import json, sys
r = json.loads(open(sys.argv[1]).read())
assert r["ok"] == 10 and r["failed"] == 0 and r["errors"] == {}, r
print(f"smoke: ok, 10 messages through starttls-forwarder with STARTTLS, p99 {r['latency_ms']['p99']} ms")
PY
