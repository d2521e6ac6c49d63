#!/usr/bin/env bash
# drover's proxy side by side with nginx and HAProxy. Usage (root):
#   bash bench/proxies.sh            # RUNS=3 SECS=5 by default
#   QUICK=1 ONLY="drover nginx" bash bench/proxies.sh   # while tuning: the
#       named proxies' figures, printed only
#   HOLD=1 bash bench/proxies.sh     # set up and wait, for profiling
#   CALLGRIND="/tmp/drover-old target/release/drover" bash bench/proxies.sh
#       # user-space instructions per proxied request of each binary
#       # ("nginx" in the list: nginx itself, for reference)
#   COMPARE=/tmp/drover-old QUICK=1 ONLY="before drover nginx" bash bench/proxies.sh
#       # another drover binary's proxy beside this one's, as "before"
#   DROVER_PROXY_ENGINE=h1 COMPARE_ENGINE=pingora QUICK=1 ONLY="drover before nginx" \
#     bash bench/proxies.sh
#       # drover's proxy with the h1 engine, and as "before" the same binary
#       # (or COMPARE's) with the pingora engine, in one interleaved run
#   CALLGRIND="target/dist/drover@h1 target/dist/drover@pingora nginx" …
#       # BIN@ENGINE: that binary's proxy with that engine
#
# Installs nginx and haproxy from Debian's packages (their services are not
# started), builds drover with the dist profile (DROVER=path: another
# binary), starts `drover up` with one node and an app of two `bench-backend` instances, and puts three proxies in front of
# the same two instances, each with one worker/thread, keep-alive upstream
# pools and no access log: drover's (`drover proxy --threads 1`), nginx
# (worker_processes 1, upstream keepalive) and HAProxy (nbthread 1, http-reuse
# always). The proxy under test is pinned to core 0; the load generator and
# the backends to core 1. Each figure is the median of RUNS runs of SECS s,
# the runs interleaved across the proxies.
# Measured: requests/s at 50 keep-alive connections and with a new
# connection per request (4 at a time); p50/p99 at 1 connection and, over
# 10 connections, at one rate for all: half the peak of the slowest proxy
# (so every proxy is at half its own peak or below, and all carry the same
# load); RSS idle and under load; and
# failed requests across 20 switches between two backend sets under load
# (drover: rollouts; nginx: `nginx -s reload`; HAProxy: master-worker reload
# with SIGUSR2). Rewrites the section between the proxies markers of
# BENCHMARKS.md and prints it. All traffic stays on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
SECS=${SECS:-5}

need=()
command -v nginx >/dev/null 2>&1 || need+=(nginx)
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
if [ ${#need[@]} -gt 0 ]; then
  # Install without starting the packages' own services.
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi
# drover as it is built for production (the dist profile: fat LTO, one
# codegen unit; ~10 min the first time); the load tools as usual.
cargo build --profile dist -q -p drover
cargo build --release -q -p drover-bench
BIN=$PWD/target/release
DROVER=${DROVER:-$PWD/target/dist/drover}
D=$(mktemp -d /tmp/drover-proxies.XXXXXX)
API=127.0.0.1:17270
P_DROVER=127.0.0.1:18281
P_NGINX=127.0.0.1:18282
P_HAPROXY=127.0.0.1:18283
HOST=bench.localhost
export DROVER_SERVER=http://$API

"$DROVER" up --data-dir "$D" --nodes 1 --api-addr $API --proxy-addr 127.0.0.1:18280 --poll-interval 0 >"$D/up.log" 2>&1 &
UP=$!
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$D/nginx/nginx.pid" ] && nginx -p "$D/nginx" -c "$D/nginx/nginx.conf" -s stop 2>/dev/null || true
  kill -INT $UP 2>/dev/null; wait $UP 2>/dev/null || true
  pkill -KILL -f -- "--callgrind-out-file=$D/" 2>/dev/null || true
  rm -rf "$D"
}
trap cleanup EXIT
for _ in $(seq 1 300); do grep -q "press Ctrl-C" "$D/up.log" && break; sleep 0.1; done
grep -q "press Ctrl-C" "$D/up.log" || { cat "$D/up.log"; exit 1; }
export DROVER_TOKEN_FILE=$D/server/admin-token

REPO=$D/repo
mkdir -p "$REPO"
cp "$BIN/bench-backend" "$REPO/backend"
cat >"$REPO/drover.toml" <<TOML
[app]
name = "bench"
[build]
artifact = ["backend", "VERSION"]
[run]
command = "exec ./backend"
instances = 2
stop_timeout = "2s"
[health]
path = "/healthz"
interval = "50ms"
healthy_after = 1
deadline = "30s"
[route]
host = "$HOST"
[deploy]
strategy = "rolling"
max_surge = 2
max_unavailable = 0
drain_timeout = "5s"
TOML
commit() { echo "$1" >"$REPO/VERSION"; git -C "$REPO" add -A; git -C "$REPO" -c user.name=b -c user.email=b@b.invalid commit -qm "$1"; }
# A deploy that fails stops the benchmark with the CLI's answer, the app's
# status and the end of the cluster's log.
deploy() {
  "$DROVER" deploy bench --wait >"$D/deploy.out" 2>&1 && return
  echo "drover deploy bench --wait failed:" >&2
  cat "$D/deploy.out" >&2
  "$DROVER" status bench >&2 || true
  tail -40 "$D/up.log" >&2
  exit 1
}
git -C "$REPO" init -q --initial-branch=main
commit v1
"$DROVER" apps add "$REPO" >/dev/null
deploy
addrs() { "$DROVER" status bench --json | python3 -c 'import json,sys; print(" ".join(i["address"] for i in json.load(sys.stdin)["instances"] if i["state"] == "healthy"))'; }
read -r A B <<<"$(addrs)"
pin_backends() { for p in $(pgrep -f "exec ./backend|/backend$" || true); do taskset -a -cp 1 "$p" >/dev/null 2>&1 || true; done; }
pin_backends

# A drover binary's proxy, one thread, run by WRAPPER… (taskset, valgrind).
# Call it with `&`: it execs, so $! is the proxy's (or the wrapper's) pid.
# BIN@ENGINE picks the engine (h1 or pingora); otherwise $DROVER_PROXY_ENGINE
# or the binary's default.
drover_proxy() { # bin[@engine] listen name [WRAPPER…]
  local bin=$1 listen=$2 name=$3 engine=${DROVER_PROXY_ENGINE:-}; shift 3
  if [[ $bin == *@* ]]; then engine=${bin##*@}; bin=${bin%@*}; fi
  if [ -n "$engine" ]; then export DROVER_PROXY_ENGINE=$engine; fi
  DROVER_JOIN_TOKEN=$(cat "$D/server/join-token") exec "$@" "$bin" proxy --server "http://$API" \
    --listen "$listen" --name "$name" --threads 1 --grace 1
}
# Waits until ADDR answers through to the app; false if it never does.
answers() { # addr
  for _ in $(seq 1 300); do curl -fsS -H "Host: $HOST" "http://$1/" 2>/dev/null | grep -q hello && return 0; sleep 0.1; done
  return 1
}
drover_proxy "$DROVER" $P_DROVER bench-proxy taskset -c 0 >"$D/drover-proxy.log" 2>&1 &
DPID=$!
PIDS+=($DPID)
# COMPARE=/path/to/another/drover: its proxy too, as "before" (tuning steps).
P_BEFORE=127.0.0.1:18284
# COMPARE_ENGINE=h1|pingora: "before" runs with that engine (COMPARE's
# binary, or this one).
if [ -n "${COMPARE_ENGINE:-}" ]; then COMPARE="${COMPARE:-$DROVER}@$COMPARE_ENGINE"; fi
if [ -n "${COMPARE:-}" ]; then
  drover_proxy "$COMPARE" $P_BEFORE bench-before taskset -c 0 >"$D/before-proxy.log" 2>&1 &
  BPID=$!
  PIDS+=($BPID)
fi

# nginx: one worker, keep-alive upstream pool, no logs.
mkdir -p "$D/nginx/logs"
nginx_conf() { # servers…
  {
    echo "worker_processes 1; pid $D/nginx/nginx.pid; error_log $D/nginx/error.log warn; daemon on;"
    echo "events { worker_connections 4096; }"
    echo "http { access_log off; keepalive_requests 1000000;"
    echo "  upstream b { $(for s in "$@"; do printf 'server %s; ' "$s"; done) keepalive 128; }"
    echo "  server { listen $P_NGINX; location / { proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_set_header Host \$host; } } }"
  } >"$D/nginx/nginx.conf"
}
nginx_conf "$A" "$B"
taskset -c 0 nginx -p "$D/nginx" -c "$D/nginx/nginx.conf"

# HAProxy: master-worker, one thread, connection reuse, no logs.
haproxy_conf() { # servers…
  {
    echo "global"
    echo "  nbthread 1"
    echo "  maxconn 4000"
    echo "defaults"
    echo "  mode http"
    echo "  option http-keep-alive"
    echo "  timeout connect 2s"
    echo "  timeout client 30s"
    echo "  timeout server 30s"
    echo "  http-reuse always"
    echo "frontend f"
    echo "  bind $P_HAPROXY"
    echo "  default_backend b"
    echo "backend b"
    echo "  balance roundrobin"
    local i=0
    for s in "$@"; do i=$((i + 1)); echo "  server s$i $s"; done
  } >"$D/haproxy.cfg"
}
haproxy_conf "$A" "$B"
taskset -c 0 haproxy -W -f "$D/haproxy.cfg" >"$D/haproxy.log" 2>&1 &
HPID=$!
PIDS+=($HPID)

for p in $P_DROVER $P_NGINX $P_HAPROXY ${COMPARE:+$P_BEFORE}; do
  answers "$p" || { echo "no answer through $p"; cat "$D"/*.log; exit 1; }
done

if [ -n "${HOLD:-}" ]; then
  # HOLD=1: set up, print where everything is, and wait (for profiling).
  echo "drover proxy pid $DPID on $P_DROVER, nginx on $P_NGINX, HAProxy on $P_HAPROXY, backends $A $B; Host: $HOST"
  echo "load: taskset -c 1 $BIN/loadgen $P_DROVER $HOST 50 5"
  wait $DPID
  exit 0
fi

# User-space instructions per request of a drover binary's proxy (or of
# nginx itself, for BIN=nginx) under valgrind's callgrind: independent of CPU
# speed and of the machine's other load (it varies only with how requests
# batch per wake-up), so a tuning step shows even on a noisy machine.
# 2,000 requests warm up, then 5,000 over 10 keep-alive connections.
instructions() { # BIN|nginx
  local bin=$1 out=$D/callgrind.out V total
  command -v valgrind >/dev/null || apt-get install -y -qq valgrind >/dev/null
  if [ "$bin" = nginx ]; then
    # nginx itself, one process (no master), same upstream settings.
    mkdir -p "$D/nginx-cg/logs"
    sed -e "s|daemon on;|daemon off; master_process off;|" -e "s|$P_NGINX|127.0.0.1:18290|" \
      -e "s|$D/nginx/nginx.pid|$D/nginx-cg/nginx.pid|" "$D/nginx/nginx.conf" >"$D/nginx-cg/nginx.conf"
    valgrind --tool=callgrind --callgrind-out-file="$out" \
      nginx -p "$D/nginx-cg" -c "$D/nginx-cg/nginx.conf" >"$D/cg.log" 2>&1 &
  else
    drover_proxy "$bin" 127.0.0.1:18290 bench-cg valgrind --tool=callgrind --callgrind-out-file="$out" >"$D/cg.log" 2>&1 &
  fi
  V=$!
  answers 127.0.0.1:18290 || answers 127.0.0.1:18290 || { cat "$D/cg.log"; exit 1; }
  "$BIN/loadgen" 127.0.0.1:18290 $HOST 10 600 --max 2000 >/dev/null
  callgrind_control -z $V >/dev/null
  "$BIN/loadgen" 127.0.0.1:18290 $HOST 10 600 --max 5000 >/dev/null
  callgrind_control -d $V >/dev/null
  # The dump is written when the process next runs under valgrind: wait
  # for it (an idle nginx can take a while), else take the dump at exit
  # (counted from the same zero).
  for _ in $(seq 100); do grep -qs '^totals:' "$out".1 && break; sleep 0.1; done
  kill -INT $V; wait $V 2>/dev/null || true
  pkill -KILL -f -- "--callgrind-out-file=$out" 2>/dev/null || true
  local dump="$out".1
  grep -qs '^totals:' "$dump" || dump=$out
  total=$(awk '/^(summary|totals):/ {print $2}' "$dump" | tail -1)
  rm -f "$out"*
  echo $((total / 5000))
}
if [ -n "${CALLGRIND:-}" ]; then
  for bin in $CALLGRIND; do
    echo "$bin: $(instructions "$bin") instructions per request (user space, all threads)"
  done
  exit 0
fi

# The processes of a proxy, for RSS.
proc_pids() {
  case $1 in
    drover) echo "$DPID" ;;
    before) echo "$BPID" ;;
    nginx) echo "$(cat "$D/nginx/nginx.pid") $(pgrep -P "$(cat "$D/nginx/nginx.pid")" | tr '\n' ' ')" ;;
    haproxy) echo "$HPID $(pgrep -P $HPID | tr '\n' ' ')" ;;
  esac
}
rss_mb() { # pids… → total RSS in MB
  local kb=0
  for p in "$@"; do
    v=$(awk '/^VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
    kb=$((kb + ${v:-0}))
  done
  python3 -c "print(round($kb / 1024, 1))"
}
cpu_ticks() { # pids… → utime+stime of all their threads, in clock ticks
  local t=0 v
  for p in "$@"; do
    v=$(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)
    t=$((t + ${v:-0}))
  done
  echo $t
}
CLK=$(getconf CLK_TCK)
addr_of() { case $1 in drover) echo $P_DROVER ;; before) echo $P_BEFORE ;; nginx) echo $P_NGINX ;; haproxy) echo $P_HAPROXY ;; direct) echo "$A" ;; esac; }
load() { taskset -c 1 "$BIN/loadgen" "$@"; }
# One measurement, interleaved: round r runs the test once against every
# proxy in turn, so that a slow minute on this shared machine lands on all of
# them alike rather than on whichever ran then. Appends each loadgen line to
# $D/res.TEST.WHO and the proxy's CPU ticks over the run to $D/cpu.TEST.WHO.
measure() { # test conns secs [loadgen args…]; test "half": at HALF[who] req/s
  local test=$1 conns=$2 secs=$3; shift 3
  for _ in $(seq 1 "$RUNS"); do
    for who in $ONLY; do
      local extra=()
      if [ "$test" = half ]; then extra=(--rate "${HALF[$who]}"); fi
      local c0 c1
      c0=$(cpu_ticks $(proc_pids $who))
      load "$(addr_of $who)" $HOST "$conns" "$secs" "$@" "${extra[@]}" >>"$D/res.$test.$who"
      c1=$(cpu_ticks $(proc_pids $who))
      echo $((c1 - c0)) >>"$D/cpu.$test.$who"
    done
  done
}
# Medians of a test for one proxy: "rps p50 p99 errors requests cpu_ticks"
median() { # test who
  python3 - "$D/res.$1.$2" "$D/cpu.$1.$2" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ticks = sum(int(l) for l in open(sys.argv[2]) if l.strip())
m = lambda k: statistics.median(r[k] for r in rows)
print(int(m("rps")), int(m("p50_us")), int(m("p99_us")), sum(r["errors"] for r in rows),
      sum(r["requests"] for r in rows), ticks)
PY
}

declare -A RPS50 RPSNEW P50_1 P99_1 P50_H P99_H IDLE BUSY ERR CPU EFF HALF
ONLY=${ONLY:-direct drover nginx haproxy}
for who in $ONLY; do
  if [ $who != direct ]; then IDLE[$who]=$(rss_mb $(proc_pids $who)); fi
done
# RSS under load: sampled in the middle of a 50-connection run of each proxy.
for who in $ONLY; do
  [ $who = direct ] && continue
  (sleep "$(python3 -c "print($SECS / 2)")"; rss_mb $(proc_pids $who) >"$D/busy.$who") &
  load "$(addr_of $who)" $HOST 50 "$SECS" >/dev/null
  wait $!
  BUSY[$who]=$(cat "$D/busy.$who")
done
measure k50 50 "$SECS"
measure new 4 "$SECS" --new-conn
measure one 1 "$SECS"
for who in $ONLY; do
  read -r RPS50[$who] _ _ e1 total ticks <<<"$(median k50 $who)"
  if [ $who != direct ]; then
    # The proxy's CPU time over the 50-connection runs: its share of core 0,
    # and requests per CPU-second (what it could do with a whole core).
    read -r CPU[$who] EFF[$who] <<<"$(python3 -c "
s = $ticks / $CLK
print('%d%%' % round(100 * s / ($RUNS * $SECS)), int($total / max(s, 1e-9)))")"
  fi
  read -r RPSNEW[$who] _ _ e2 _ _ <<<"$(median new $who)"
  read -r _ P50_1[$who] P99_1[$who] e3 _ _ <<<"$(median one $who)"
  ERR[$who]=$((e1 + e2 + e3))
done
# The same offered load for every proxy: half the slowest one's peak.
RATE=
for who in $ONLY; do
  [ $who = direct ] && continue
  h=$(( ${RPS50[$who]} / 2 ))
  if [ -z "$RATE" ] || [ "$h" -lt "$RATE" ]; then RATE=$h; fi
done
for who in $ONLY; do HALF[$who]=${RATE:-$(( ${RPS50[$who]} / 2 ))}; done
measure half 10 "$SECS"
for who in $ONLY; do
  read -r _ P50_H[$who] P99_H[$who] e4 _ _ <<<"$(median half $who)"
  ERR[$who]=$(( ${ERR[$who]} + e4 ))
done

row() { # name
  local w=$1
  echo "| $w | ${RPS50[$w]} | ${CPU[$w]:-–} | ${EFF[$w]:-–} | ${RPSNEW[$w]} | ${P50_1[$w]} µs | ${P99_1[$w]} µs | ${P50_H[$w]} µs | ${P99_H[$w]} µs | ${IDLE[$w]:-–} MB | ${BUSY[$w]:-–} MB | ${ERR[$w]} |"
}
if [ -n "${QUICK:-}" ]; then
  # QUICK=1: the throughput table only, printed, BENCHMARKS.md untouched.
  for w in $ONLY; do row "$w"; done
  exit 0
fi

# Instructions per request, while nginx's configuration still points at
# instances that live (the switches below replace drover's instances).
INSTR_DROVER=$(instructions "$DROVER")
INSTR_NGINX=$(instructions nginx)

# 20 switches between the two backend sets under load (4 keep-alive
# connections), counting failed requests.
SWITCH_SECS=${SWITCH_SECS:-20}
switch_errors() { # who
  local who=$1 addr
  addr=$(addr_of "$who")
  load "$addr" $HOST 4 "$SWITCH_SECS" >"$D/switch.$who" &
  local L=$!
  sleep 1
  for i in $(seq 1 20); do
    case $who in
      nginx)
        if [ $((i % 2)) = 1 ]; then nginx_conf "$B"; else nginx_conf "$A"; fi
        nginx -p "$D/nginx" -c "$D/nginx/nginx.conf" -s reload
        sleep 0.5 ;;
      haproxy)
        if [ $((i % 2)) = 1 ]; then haproxy_conf "$B"; else haproxy_conf "$A"; fi
        kill -USR2 $HPID
        sleep 0.5 ;;
    esac
  done
  wait $L
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["errors"], r["requests"])' "$D/switch.$who"
}
read -r SW_NGINX SWN_REQ <<<"$(switch_errors nginx)"
read -r SW_HAPROXY SWH_REQ <<<"$(switch_errors haproxy)"
# drover: 20 rollouts (each a new release on new instances, the old ones
# drained and stopped) while the load runs.
rm -f "$D/stop"
load $P_DROVER $HOST 4 900 --until "$D/stop" >"$D/switch.drover" &
L=$!
sleep 1
for i in $(seq 1 20); do
  commit "switch $i"
  deploy
  pin_backends
done
sleep 1
touch "$D/stop"
wait $L
read -r SW_DROVER SWD_REQ <<<"$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["errors"], r["requests"])' "$D/switch.drover")"


ratio() { python3 -c "print('%.2f' % ($1 / $2))"; }
OUT=$D/section.md
{
  echo "## Proxies side by side: drover, nginx, HAProxy"
  echo
  echo "\`bash bench/proxies.sh\` (RUNS=$RUNS, SECS=$SECS), $(date -u +%Y-%m-%d), $(nproc) cores, drover built with \`--profile dist\`. Each proxy has one worker/thread pinned to core 0; the load generator and the two backends are on core 1; medians of $RUNS runs, interleaved across the proxies. \"proxy CPU\" is the proxy's user+system CPU time over its 50-connection runs (of one core), and \"req per proxy CPU-second\" its requests divided by that time: what it would serve with a whole core, whichever side of the machine ran out first. nginx $(nginx -v 2>&1 | sed 's/.*nginx\///'), HAProxy $(haproxy -v | head -1 | awk '{print $3}')."
  echo
  echo "| proxy | req/s, 50 keep-alive conns | proxy CPU (of 1 core) | req per proxy CPU-second | req/s, new conn per request (4) | p50, 1 conn | p99, 1 conn | p50 at $RATE req/s | p99 at $RATE req/s | RSS idle | RSS under load | errors |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
  row direct
  row drover
  row nginx
  row haproxy
  echo
  echo "Ratios (drover / other, 50 keep-alive connections): $(ratio "${RPS50[drover]}" "${RPS50[nginx]}") × nginx, $(ratio "${RPS50[drover]}" "${RPS50[haproxy]}") × HAProxy; per proxy CPU-second: $(ratio "${EFF[drover]}" "${EFF[nginx]}") × nginx, $(ratio "${EFF[drover]}" "${EFF[haproxy]}") × HAProxy. Added p99 at 1 connection over calling the instance directly: drover $(( ${P99_1[drover]} - ${P99_1[direct]} )) µs, nginx $(( ${P99_1[nginx]} - ${P99_1[direct]} )) µs, HAProxy $(( ${P99_1[haproxy]} - ${P99_1[direct]} )) µs; at $RATE req/s over 10 connections (half the slowest proxy's peak, the same load for each): drover $(( ${P99_H[drover]} - ${P99_H[direct]} )) µs, nginx $(( ${P99_H[nginx]} - ${P99_H[direct]} )) µs, HAProxy $(( ${P99_H[haproxy]} - ${P99_H[direct]} )) µs."
  echo
  echo "User-space instructions per proxied request (callgrind, 5,000 requests over 10 keep-alive connections, all threads): drover $INSTR_DROVER, nginx $INSTR_NGINX."
  echo
  echo "Switches under load (4 keep-alive connections), 20 each:"
  echo
  echo "| proxy | how | requests | failed |"
  echo "|---|---|---|---|"
  echo "| nginx | \`nginx -s reload\` every 0.5 s, upstream A ↔ B | $SWN_REQ | $SW_NGINX |"
  echo "| HAProxy | master-worker reload (SIGUSR2) every 0.5 s, server A ↔ B | $SWH_REQ | $SW_HAPROXY |"
  echo "| drover | 20 rolling rollouts (\`drover deploy --wait\`), each to a new release on new instances | $SWD_REQ | $SW_DROVER |"
} >"$OUT"
cat "$OUT"
# Rewrite the section between the markers in BENCHMARKS.md.
python3 bench/section.py proxies "$OUT"
