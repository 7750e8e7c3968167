#!/usr/bin/env bash
# Measure a K-wide round on the local backend against the same K candidates run one after another.
#
# Usage: scripts/bench-round.sh [OUT_DIR]
#   1. clones HEAD into a temp dir (your working tree and .ar/ are never touched; the clone uses this
#      checkout's .venv),
#   2. runs `tools/round.py baseline --repeats=2` there (untimed: the best then has two runs, so the
#      round adds no control jobs),
#   3. times `tools/round.py round --k=K --sweep=SWEEP` (the parallel round: K candidate commits),
#   4. runs the same K commits one after another (local/submit-async.sh --commit, then wait-jobs.sh),
#   and prints one tab-separated table: round wall, slowest job, orchestration overhead
#   (round wall - slowest job wall, meaningful when K <= slots), sequential wall, speedup.
#   A job's wall is from its start in a slot to its exit (the mtimes of its `slot` and `rc` files).
# Env:
#   K               candidates (default 4); SWEEP must make exactly K
#   SWEEP           default "MATRIX_LR=0.02,0.03,0.05,0.06"
#   AR_PROFILE      default tiny
#   AR_LOCAL_SLOTS  parallel slots (default: the local recipe's own: GPUs, else CPU cores)
#   AR_CACHE_DIR    prepared data cache (default ~/.cache/autoresearch)
set -euo pipefail
case ${1:-} in -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$(mktemp -d)}
mkdir -p "$out"
out=$(cd "$out" && pwd)
k=${K:-4}
sweep=${SWEEP:-MATRIX_LR=0.02,0.03,0.05,0.06}
[[ "$k" =~ ^[1-9][0-9]?$ ]] || { echo "bench-round: error: K must be 1..99" >&2; exit 2; }
py=$repo/.venv/bin/python
[[ -x "$py" ]] || { echo "bench-round: error: $py not found: run make setup" >&2; exit 2; }
export AR_PROFILE=${AR_PROFILE:-tiny}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/repo"
cd "$work/repo"
[[ -e .venv ]] || ln -s "$repo/.venv" .venv
"$py" prepare/prepare.py --profile "$AR_PROFILE" >&2

echo "bench-round: baseline (untimed)" >&2
"$py" tools/round.py baseline --repeats=2 --backend=local --tag=bench >"$out/baseline.txt"

echo "bench-round: parallel round of $k ($sweep)" >&2
t0=$(date +%s.%N)
"$py" tools/round.py round --k="$k" --backend=local --tag=bench --sweep="$sweep" >"$out/round.txt"
t1=$(date +%s.%N)
cp .ar/rounds/bench/r1.json "$out/round-ledger.json"

echo "bench-round: the same $k commits one after another" >&2
mapfile -t commits < <("$py" -c 'import json, sys
print("\n".join(c["commit"] for c in json.load(open(sys.argv[1]))["candidates"]))' "$out/round-ledger.json")
t2=$(date +%s.%N)
for i in "${!commits[@]}"; do
    id=$(local/submit-async.sh --commit "${commits[i]}" --name "bench-seq-c$((i + 1))")
    local/wait-jobs.sh "$id" >>"$out/sequential.txt"
done
t3=$(date +%s.%N)

"$py" - "$out" "$work/repo/.ar/local/jobs" "$t0" "$t1" "$t2" "$t3" "$k" <<'PY'
import json, os, sys, pathlib
out, jobs = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
t0, t1, t2, t3 = map(float, sys.argv[3:7])
k = int(sys.argv[7])
wall = lambda i: os.stat(jobs / i / "rc").st_mtime - os.stat(jobs / i / "slot").st_mtime
par = [c["job_id"] for c in json.load(open(out / "round-ledger.json"))["candidates"]]
slots = int((jobs / par[0] / "meta").read_text().split()[2])
slowest = max(wall(i) for i in par)
round_wall, seq_wall = t1 - t0, t3 - t2
row = dict(k=k, slots=slots, threads_per_job=max(1, len(os.sched_getaffinity(0)) // slots), round_wall_s=round(round_wall, 1),
           slowest_job_s=round(slowest, 1), overhead_s=round(round_wall - slowest, 1),
           sequential_wall_s=round(seq_wall, 1), speedup=round(seq_wall / round_wall, 2),
           target=round(0.9 * min(k, slots), 2))
print("\t".join(row))
print("\t".join(str(v) for v in row.values()))
(out / "bench-round.json").write_text(json.dumps(row, indent=2) + "\n")
PY
