#!/usr/bin/env bash
# make bench-profile: where the gateway's CPU goes under the throughput load (50 STARTTLS
# sessions, 10 KiB, BENCH_CONNECTORS connectors) and, for comparison, the limit's
# (starttls-forwarder). perf samples the first run of each row at 499 Hz with call graphs;
# the reports land in $BENCH_WORK/profile-{gateway,limit}{,-dso}.txt. Needs perf (Debian
# linux-perf) and permission to attach to the process (root, or perf_event_paranoid <= 1).
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v perf >/dev/null || { echo "profile: perf not found (apt-get install linux-perf)" >&2; exit 1; }
perf stat -e task-clock true >/dev/null 2>&1 || { echo "profile: perf cannot run here" >&2; exit 1; }
export BENCH_PROFILE=1 BENCH_RUNS=${BENCH_RUNS:-1}
export BENCH_SKIP="validate sink postfix-proxy postfix haraka maddy latency sessions idle reload scale operator"
tests/bench/run.sh
W=${BENCH_WORK:-target/bench}
for f in "$W"/profile-gateway-dso.txt "$W"/profile-gateway.txt "$W"/profile-limit-dso.txt; do
  echo "== $f"
  head -n 30 "$f"
done
