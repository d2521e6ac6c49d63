#!/usr/bin/env bash
# Scale: AGENTS simulated agents against one drover server on this machine.
#
# `swarm` (bench/src/bin/swarm.rs) runs them in one process, each a real
# agent client: it registers with the join token and a CSR (a certificate
# from the server's CA), then over mutual TLS reports — its heartbeat —
# every INTERVAL_MS and long-polls its assignments; no app processes. The
# server is pinned to core 0, the swarm to core 1. Measured over the
# heartbeat phase: report round trips (p50/p99 from the swarm over SECS of
# steady state, after a first interval in which the registrations' backlog
# drains; that interval's p99 and max are shown beside them),
# the server's CPU (/proc utime + stime) and RSS, its open connections,
# and how many nodes the server holds ready at the end (a node whose
# heartbeats come later than its 10 s lease would be lost).
#
#   bash bench/agents.sh                      # 10,000 agents every 10 s, 60 s
#   AGENTS=2000 INTERVAL_MS=1000 SECS=30 bash bench/agents.sh
#   QUICK=1 …                                 # print only, BENCHMARKS.md untouched
#
# Rewrites the section between the agents markers of BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."

AGENTS=${AGENTS:-10000}
INTERVAL_MS=${INTERVAL_MS:-10000}
SECS=${SECS:-60}
PORT=${PORT:-17390}

cargo build --release --locked -p drover -p drover-bench --bins >/dev/null 2>&1 \
  || cargo build --release --locked -p drover -p drover-bench --bins
DROVER=target/release/drover
SWARM=target/release/swarm

D=$(mktemp -d)
SPID=""
cleanup() {
  [ -n "$SPID" ] && kill "$SPID" 2>/dev/null || true
  wait 2>/dev/null || true
  [ -n "${KEEP:-}" ] && echo "kept $D" >&2 || rm -rf "$D"
}
trap cleanup EXIT

taskset -c 0 "$DROVER" server --addr "127.0.0.1:$PORT" --data-dir "$D/server" \
  --poll-interval 0s >"$D/server.log" 2>&1 &
SPID=$!
for _ in $(seq 100); do
  curl -fsS "http://127.0.0.1:$PORT/v1/health" >/dev/null 2>&1 && break
  sleep 0.1
done

ticks() { awk '{print $14 + $15}' "/proc/$SPID/stat"; }
rss_mb() { awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$SPID/status"; }
conns() { ls "/proc/$SPID/fd" | wc -l; }
HZ=$(getconf CLK_TCK)

taskset -c 1 "$SWARM" "http://127.0.0.1:$PORT" "$D/server/join-token" "$AGENTS" "$INTERVAL_MS" "$SECS" \
  >"$D/swarm.json" 2>"$D/swarm.err" &
SWPID=$!
# The heartbeat phase starts once every agent registered.
until grep -q "registered in" "$D/swarm.err" 2>/dev/null; do
  kill -0 "$SWPID" 2>/dev/null || { cat "$D/swarm.err"; exit 1; }
  sleep 0.2
done
sleep 2 # the first phase of heartbeats and polls is under way
T0=$(date +%s.%N); C0=$(ticks)
MAXRSS=0; MAXFD=0
while kill -0 "$SWPID" 2>/dev/null; do
  r=$(rss_mb); f=$(conns)
  MAXRSS=$(python3 -c "print(max($MAXRSS, $r))"); [ "$f" -gt "$MAXFD" ] && MAXFD=$f
  T1=$(date +%s.%N); C1=$(ticks)
  sleep 1
done
wait "$SWPID" || true
READY=$(curl -fsS -H "Authorization: Bearer $(cat "$D/server/admin-token")" \
  "http://127.0.0.1:$PORT/v1/nodes" | python3 -c 'import json,sys; n=json.load(sys.stdin); print(sum(1 for x in n if x["ready"]), len(n))')
cat "$D/swarm.err" >&2
CPU=$(python3 -c "print(round(100 * ($C1 - $C0) / $HZ / ($T1 - $T0), 1))")

OUT=$D/section.md
python3 - "$D/swarm.json" "$AGENTS" "$INTERVAL_MS" "$SECS" "$CPU" "$MAXRSS" "$MAXFD" "$READY" >"$OUT" <<'PY'
import json, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
agents, interval, secs, cpu, rss, fds, ready = sys.argv[2:9]
ready_n, known = ready.split()
print("| run | agents | heartbeat every | reports | failed | report p50 | report p99 (goal ≤ 100 ms) | max | first interval p99 / max | server CPU | server RSS | server fds | ready at the end |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
print(f"| `AGENTS={agents} INTERVAL_MS={interval} SECS={secs}` ({r['registered']} registered in {r['register_s']} s) | {int(agents):,} | {int(interval)/1000:g} s | {r['reports']:,} | {r['report_errors']} | {r['p50_ms']} ms | {r['p99_ms']} ms | {r['max_ms']} ms | {r['settling_p99_ms']} / {r['settling_max_ms']} ms | {cpu} % | {rss} MB | {fds} | {ready_n} of {known} |")
PY
cat "$OUT"
[ -n "${QUICK:-}" ] && exit 0
python3 bench/section.py agents "$OUT" "Scale: simulated agents against one server"
