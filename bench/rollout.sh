#!/usr/bin/env bash
# Orchestration overhead of a rolling rollout of INSTANCES instances on
# AGENTS simulated agents (`swarm --instances`: real agent clients that
# report an instance healthy as soon as it is assigned, and stopped as
# soon as it is to stop — no app to wait for). What the rollout takes is
# then the control plane's own work: planning each batch, the store's
# transactions, the agents' long polls and reports. The server is pinned
# to core 0, the swarm to core 1.
#
#   bash bench/rollout.sh                         # 1,000 instances, 100 agents, batches of 100
#   INSTANCES=1000 SURGE=10 QUICK=1 bash bench/rollout.sh   # print only
set -euo pipefail
cd "$(dirname "$0")/.."
AGENTS=${AGENTS:-100}
INSTANCES=${INSTANCES:-1000}
SURGE=${SURGE:-100}
PORT=${PORT:-17490}

cargo build --release --locked -p drover -p drover-bench --bins >/dev/null 2>&1 \
  || cargo build --release --locked -p drover -p drover-bench --bins
DROVER=$PWD/target/release/drover
SWARM=$PWD/target/release/swarm

D=$(mktemp -d)
cleanup() {
  jobs -p | xargs -r kill 2>/dev/null || true
  wait 2>/dev/null || true
  [ -n "${KEEP:-}" ] && echo "kept $D" >&2 || rm -rf "$D"
}
trap cleanup EXIT

taskset -c 0 "$DROVER" server --addr "127.0.0.1:$PORT" --data-dir "$D/server" \
  --poll-interval 0s >"$D/server.log" 2>&1 &
for _ in $(seq 100); do
  curl -fsS "http://127.0.0.1:$PORT/v1/health" >/dev/null 2>&1 && break
  sleep 0.1
done
export DROVER_SERVER="http://127.0.0.1:$PORT" DROVER_TOKEN=$(cat "$D/server/admin-token")
taskset -c 1 "$SWARM" "$DROVER_SERVER" "$D/server/join-token" "$AGENTS" 1000 3600 --instances \
  >"$D/swarm.json" 2>"$D/swarm.err" &
until grep -q "registered in" "$D/swarm.err" 2>/dev/null; do sleep 0.2; done

mkdir "$D/repo" && cd "$D/repo"
git init -q --initial-branch=main
commit() {
  cat >drover.toml <<TOML
[app]
name = "big"

[build]
command = "true"
artifact = ["app.sh"]

[run]
command = "sh app.sh"
instances = $INSTANCES

[health]
path = "/healthz"
deadline = "10m"

[route]
host = "big.localhost"

[deploy]
strategy = "rolling"
max_surge = $SURGE
max_unavailable = 0
drain_timeout = "0s"
TOML
  echo "echo $1" >app.sh
  git add -A && git -c user.name=b -c user.email=b@b.invalid commit -qm "$1"
}
commit v1
"$DROVER" apps add "$D/repo" >/dev/null
T0=$(date +%s.%N)
"$DROVER" deploy big --wait >"$D/deploy1.log" 2>&1 || { cat "$D/deploy1.log" "$D/server.log" | tail -30; exit 1; }
T1=$(date +%s.%N)
commit v2
"$DROVER" deploy big --wait >"$D/deploy2.log" 2>&1 || { cat "$D/deploy2.log" "$D/server.log" | tail -30; exit 1; }
T2=$(date +%s.%N)
cd - >/dev/null
curl -fsS -H "Authorization: Bearer $DROVER_TOKEN" "$DROVER_SERVER/v1/apps/big/runs" >"$D/runs.json"
curl -fsS -H "Authorization: Bearer $DROVER_TOKEN" "$DROVER_SERVER/v1/apps/big/status" >"$D/status.json"

OUT=$D/section.md
python3 - "$D/runs.json" "$D/status.json" "$INSTANCES" "$AGENTS" "$SURGE" "$T0" "$T1" "$T2" >"$OUT" <<'PY'
import json, math, sys
runs = json.load(open(sys.argv[1]))
st = json.load(open(sys.argv[2]))
n, agents, surge = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
t0, t1, t2 = map(float, sys.argv[6:9])
def deploy_ms(run):
    return next(s["duration_ms"] for s in run["steps"] if s["name"].startswith("deploy"))
r2, r1 = runs[0], runs[1]
inst = st["instances"]
assert st["live_release"] == "r2" and len(inst) == n and all(i["release"] == "r2" for i in inst), "not all on r2"
batches = math.ceil(n / surge)
d1, d2 = deploy_ms(r1), deploy_ms(r2)
print(f"`AGENTS={agents} INSTANCES={n} SURGE={surge} bash bench/rollout.sh` (simulated instances: healthy as soon as assigned)\n")
print("| rollout | instances | batches | rollout step | per batch | whole `deploy --wait` |")
print("|---|---|---|---|---|---|")
print(f"| first (place {n:,}) | {n:,} | 1 | {d1/1000:.2f} s | | {t1-t0:.2f} s |")
print(f"| rolling r1 → r2, max_surge {surge} | {n:,} | {batches} | {d2/1000:.2f} s | {d2/batches:.0f} ms | {t2-t1:.2f} s |")
PY
cat "$OUT"
[ -n "${QUICK:-}" ] && exit 0
python3 bench/section.py rollout "$OUT" "Orchestration overhead: a rolling rollout of 1,000 simulated instances"
