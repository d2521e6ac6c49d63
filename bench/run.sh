#!/usr/bin/env bash
# drover benchmarks. Usage: bash bench/run.sh
#
# Builds release binaries, starts `drover up` (server + 3 agents + proxy on
# 127.0.0.1), registers an app whose instances are `bench-backend` (a trivial
# hyper server that is healthy at once), and measures:
#   1. rollout wall time for 30 instances on 3 agents (max_surge 30 and 1),
#      from the `rollout.started` to the `rollout.succeeded` event;
#   2. proxy throughput and latency vs. calling an instance directly
#      (loadgen: 1 and 50 keep-alive connections, and a new connection per request);
#   3. commit to live: signed push webhook → all requests answered by the new release;
#   4. canary abort: from the decision to 100% of new requests on the stable release.
# Prints markdown rows for BENCHMARKS.md. All traffic stays on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p drover -p drover-bench
BIN=$PWD/target/release
D=$(mktemp -d /tmp/drover-bench.XXXXXX)
API=127.0.0.1:17070
PROXY=127.0.0.1:18080
export DROVER_SERVER=http://$API
"$BIN/drover" up --data-dir "$D" --nodes 3 --api-addr $API --proxy-addr $PROXY --poll-interval 0 >"$D/up.log" 2>&1 &
UP=$!
trap 'kill -INT $UP 2>/dev/null; wait $UP 2>/dev/null || true; rm -rf "$D"' EXIT
for _ in $(seq 1 300); do grep -q "press Ctrl-C" "$D/up.log" && break; sleep 0.1; done
grep -q "press Ctrl-C" "$D/up.log" || { cat "$D/up.log"; exit 1; }
export DROVER_TOKEN_FILE=$D/server/admin-token

REPO=$D/repo
mkdir -p "$REPO"
cp "$BIN/bench-backend" "$REPO/backend"
spec() { # instances surge interval [deploy strategy lines]
local strategy=${4:-'strategy = "rolling"'}
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
user_key = "header:x-user"
[deploy]
$strategy
max_surge = $2
max_unavailable = 0
TOML
}
commit() { echo "$1" >"$REPO/VERSION"; git -C "$REPO" add -A; git -C "$REPO" -c user.name=b -c user.email=b@b.invalid commit -qm "$1"; }
git -C "$REPO" init -q --initial-branch=main
spec 30 30 50ms; commit v1
"$BIN/drover" apps add "$REPO" | sed -n 's/.*secret \([0-9a-f]*\).*/\1/p' >"$D/secret"
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

# Commit to live: a signed push webhook (polling off), until every request
# through the proxy answers from the new release; minus the run's own
# build and test time (this app has none).
SECRET=$(cat "$D/secret")
spec 2 2 50ms; commit "fast health checks"
"$BIN/drover" deploy bench --wait >/dev/null 2>&1
echo
echo "| commit to live (webhook, polling off, 2 instances) | wall time | build + test | overhead |"
echo "|---|---|---|---|"
for i in 1 2 3; do
  commit "live $i"
  SHA=$(git -C "$REPO" rev-parse HEAD)
  BODY="{\"ref\":\"refs/heads/main\",\"after\":\"$SHA\"}"
  SIG=$(printf '%s' "$BODY" | python3 -c "import hmac,hashlib,sys; print(hmac.new(sys.argv[1].encode(), sys.stdin.buffer.read(), hashlib.sha256).hexdigest())" "$SECRET")
  START=$(date +%s%3N)
  curl -fsS -o /dev/null -X POST "http://$API/v1/hooks/bench" -H "X-Hub-Signature-256: sha256=$SIG" -H "X-GitHub-Delivery: bench-$i-$START" --data-binary "$BODY"
  REL=""
  for _ in $(seq 1 600); do
    REL=$("$BIN/drover" runs bench --json | python3 -c 'import json,sys; r=json.load(sys.stdin)[0]; print(r["release"] or "")')
    [ -n "$REL" ] && break
    sleep 0.01
  done
  # All of 20 requests in a row answer from the new release.
  while :; do
    ok=1
    for _ in $(seq 1 20); do
      curl -fsS -H 'Host: bench.localhost' "http://$PROXY/" | grep -q "hello $REL" || { ok=0; break; }
    done
    [ $ok = 1 ] && break
    [ $(( $(date +%s%3N) - START )) -gt 60000 ] && { echo "timed out"; exit 1; }
  done
  END=$(date +%s%3N)
  BT=$("$BIN/drover" runs bench --json | python3 -c 'import json,sys; r=json.load(sys.stdin)[0]; print(sum(s["duration_ms"] or 0 for s in r["steps"] if s["name"] in ("build","test")))')
  echo "| run $i | $((END - START)) ms | ${BT} ms | $((END - START - BT)) ms |"
done

# Canary abort → stable: a 50% canary split (no user key: each request is
# decided at random), then the decision to go back (`drover abort`, the same
# path an analysis failure takes from the rollout write on). Measured from
# the decision's event to the send time of the last request the canary
# still answered, with 4 keep-alive clients sending as fast as they can.
cat >"$D/flip.py" <<'PY'
import http.client, json, sys, threading, time
proxy, secs, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
host, port = proxy.split(":")
rows, stop = [], time.time() + secs
def client():
    c = http.client.HTTPConnection(host, int(port), timeout=5)
    while time.time() < stop:
        t = time.time() * 1000
        c.request("GET", "/", headers={"Host": "bench.localhost"})
        body = c.getresponse().read().decode().strip()
        rows.append((t, body))
ts = [threading.Thread(target=client) for _ in range(4)]
[t.start() for t in ts]; [t.join() for t in ts]
json.dump(rows, open(out, "w"))
PY
canary_spec() { spec 4 1 50ms 'strategy = "canary"
steps = [{ weight = 50, pause = "10m" }]'; }
wait_state() { # field value: poll the newest rollout until .field == value
  for _ in $(seq 1 600); do
    V=$("$BIN/drover" status bench --json | python3 -c "import json,sys; r=json.load(sys.stdin)['rollout']; print(r.get('$1'))")
    [ "$V" = "$2" ] && return 0
    sleep 0.1
  done
  echo "timed out waiting for $1 = $2"; exit 1
}
# The canary spec itself goes out as a canary: promote it past its step.
canary_spec; commit "canary spec"
"$BIN/drover" deploy bench >/dev/null 2>&1
wait_state weight 50
"$BIN/drover" promote bench --full >/dev/null 2>&1
wait_state state succeeded
echo
echo "| canary 50% → abort: decision to 100% of new requests on stable | requests during | answered by the canary after the decision | time |"
echo "|---|---|---|---|"
for i in 1 2 3; do
  commit "canary $i"
  "$BIN/drover" deploy bench >/dev/null 2>&1
  wait_state weight 50
  NEW=$("$BIN/drover" status bench --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["rollout"]["to"])')
  python3 "$D/flip.py" "$PROXY" 4 "$D/flip.json" &
  LOADER=$!
  sleep 2
  "$BIN/drover" abort bench >/dev/null 2>&1
  wait $LOADER
  "$BIN/drover" events --app bench --json | python3 -c "
import json, sys
ev = json.load(sys.stdin)
t = max(e['at_ms'] for e in ev if e['kind'] == 'rollout.aborted')
rows = json.load(open('$D/flip.json'))
late = [s for s, body in rows if body == 'hello $NEW' and s >= t]
last = max(late) if late else t
print('| run $i | %d | %d | %d ms |' % (len(rows), len(late), max(0, last - t)))"
  # Let the aborted canary's instances go before the next run.
  wait_state state rolled_back
done
