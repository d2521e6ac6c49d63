#!/usr/bin/env bash
# Failover: two drover servers on one PostgreSQL (a throwaway cluster from
# Debian's postgresql, started by the test), two agents, a proxy, and a
# rolling rollout of four instances under load. The leader is killed
# (SIGKILL) once the first new instance serves; then the new leader is
# paused (SIGSTOP) and resumed. The scenario is the `ha` test
# (crates/drover/tests/ha.rs), run RUNS times; it prints its figures:
#   - from the kill to the follower leading (its term running),
#   - from the kill to the rollout moving again (one more new instance
#     routed, or the rollout done),
#   - requests failed through the proxy meanwhile,
#   - from the pause to the other server leading (the lease: 5 s).
#
#   bash bench/failover.sh            # 3 runs, medians into BENCHMARKS.md
#   RUNS=5 QUICK=1 bash bench/failover.sh   # print only
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
OUT=$(mktemp)
trap 'rm -f "$OUT" "$OUT.md"' EXIT
for i in $(seq "$RUNS"); do
  cargo test --locked -p drover --test ha -- --nocapture 2>&1 \
    | grep -E "^leader (killed|paused)" | tee -a "$OUT"
done
python3 - "$OUT" "$RUNS" > "$OUT.md" <<'PY'
import re, statistics, sys
text = open(sys.argv[1]).read()
runs = int(sys.argv[2])
def nums(pat):
    return [float(x) for x in re.findall(pat, text)]
led = nums(r"server-b led ([\d.]+) s later")
moved = nums(r"moved again ([\d.]+) s after")
failed = [int(x) for x in re.findall(r"(\d+) failed", text)]
sent = [int(x) for x in re.findall(r"load (\d+) requests", text)]
paused = nums(r"server-a led ([\d.]+) s later")
assert len(led) == len(moved) == len(paused) == runs, text
med = lambda v: statistics.median(v)
print(f"`RUNS={runs} bash bench/failover.sh` (the `ha` test's scenario, debug build; medians of {runs} runs; goal: the rollout moving again ≤ 5 s after the leader's death)\n")
print("| | median | runs |")
print("|---|---|---|")
print(f"| leader killed → follower leads | {med(led):.2} s | {', '.join(f'{x:.2f}' for x in led)} |")
print(f"| leader killed → rollout moving again | {med(moved):.2} s | {', '.join(f'{x:.2f}' for x in moved)} |")
print(f"| requests failed through the proxy (of sent) | {sum(failed)} of {sum(sent)} | {', '.join(map(str, failed))} |")
print(f"| leader paused → other server leads (lease 5 s) | {med(paused):.2} s | {', '.join(f'{x:.2f}' for x in paused)} |")
PY
cat "$OUT.md"
[ -n "${QUICK:-}" ] || python3 bench/section.py failover "$OUT.md" "Failover: two servers on PostgreSQL"
