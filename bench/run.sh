#!/usr/bin/env bash
# drover benchmarks. Usage: bash bench/run.sh
#
# Builds release binaries, starts `drover up` (server + 3 agents + proxy on
# 127.0.0.1), registers an app whose instances are `bench-backend` (a trivial
# hyper server that is healthy at once), and measures:
#   1. rollout wall time for 30 instances on 3 agents (max_surge 30 and 1),
#      from the `rollout.started` to the `rollout.succeeded` event;
#   2. proxy throughput and latency vs. calling an instance directly
#      (loadgen: 1 and 50 keep-alive connections, and a new connection per request).
# Prints markdown rows for BENCHMARKS.md. All traffic stays on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p drover -p drover-bench
BIN=$PWD/target/release
D=$(mktemp -d /tmp/drover-bench.XXXXXX)
API=127.0.0.1:17070
PROXY=127.0.0.1:18080
export DROVER_SERVER=http://$API
"$BIN/drover" up --data-dir "$D" --nodes 3 --api-addr $API --proxy-addr $PROXY >"$D/up.log" 2>&1 &
UP=$!
trap 'kill -INT $UP 2>/dev/null; wait $UP 2>/dev/null || true; rm -rf "$D"' EXIT
for _ in $(seq 1 300); do grep -q "press Ctrl-C" "$D/up.log" && break; sleep 0.1; done
grep -q "press Ctrl-C" "$D/up.log" || { cat "$D/up.log"; exit 1; }

REPO=$D/repo
mkdir -p "$REPO"
cp "$BIN/bench-backend" "$REPO/backend"
spec() { # instances surge interval
cat >"$REPO/drover.toml" <<TOML
[app]
name = "bench"
[build]
artifact = ["backend", "VERSION"]
[run]
command = "exec ./backend"
instances = $1
stop_timeout = "2s"
[health]
path = "/healthz"
interval = "$3"
healthy_after = 1
deadline = "30s"
[route]
host = "bench.localhost"
[deploy]
strategy = "rolling"
max_surge = $2
max_unavailable = 0
TOML
}
commit() { echo "$1" >"$REPO/VERSION"; git -C "$REPO" add -A; git -C "$REPO" -c user.name=b -c user.email=b@b.invalid commit -qm "$1"; }
git -C "$REPO" init -q --initial-branch=main
spec 30 30 50ms; commit v1
"$BIN/drover" apps add "$REPO" >/dev/null
"$BIN/drover" deploy bench --wait >/dev/null 2>&1

rollout_ms() { # duration of the newest rollout, from events
  "$BIN/drover" events --app bench --json | python3 -c '
import json, sys
ev = json.load(sys.stdin)
start = [e for e in ev if e["kind"] == "rollout.started"][0]
done = [e for e in ev if e["kind"] == "rollout.succeeded"][0]
print(done["at_ms"] - start["at_ms"])'
}

echo "| rolling deploy, 30 instances on 3 agents, healthy at once (health interval 50 ms) | wall time | health-check waits | overhead per instance |"
echo "|---|---|---|---|"
for surge in 30 10 1; do
  spec 30 $surge 50ms; commit "surge $surge"
  "$BIN/drover" deploy bench --wait >/dev/null 2>&1
  ms=$(rollout_ms)
  waits=$(( (30 + surge - 1) / surge * 50 ))
  echo "| max_surge $surge, max_unavailable 0 | ${ms} ms | ${waits} ms | $(( (ms - waits) * 10 / 30 / 10 )).$(( (ms - waits) * 10 / 30 % 10 )) ms |"
done

# Proxy vs direct: two instances, as a proxy would usually front.
spec 2 1 1s; commit "two instances"
"$BIN/drover" deploy bench --wait >/dev/null 2>&1
sleep 1
DIRECT=$("$BIN/drover" status bench --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["instances"][0]["address"])')
echo
echo "| load (loadgen, 5 s each) | target | requests/s | p50 | p90 | p99 | errors |"
echo "|---|---|---|---|---|---|---|"
row() { # label target addr args...
  local label=$1 target=$2 addr=$3; shift 3
  "$BIN/loadgen" "$addr" bench.localhost "$@" | python3 -c "
import json,sys
r=json.load(sys.stdin)
print('| $label | $target | %d | %d µs | %d µs | %d µs | %d |' % (r['rps'], r['p50_us'], r['p90_us'], r['p99_us'], r['errors']))"
}
for spec_ in "1 keep-alive connection:1 5" "50 keep-alive connections:50 5" "new connection per request (4 at a time):4 5 --new-conn"; do
  label=${spec_%%:*}; args=${spec_#*:}
  # shellcheck disable=SC2086
  row "$label" "instance directly" "$DIRECT" $args
  # shellcheck disable=SC2086
  row "$label" "through drover proxy" "$PROXY" $args
done
