#!/usr/bin/env bash
# Measure a K-wide round on the local backend against the same K candidates run one after another.
#
# Usage: scripts/bench-round.sh [OUT_DIR]
#   1. clones HEAD into a temp dir (your working tree and .ar/ are never touched),
#   2. runs `make baseline REPEATS=2` there (untimed: so the round has no extra baseline job),
#   3. times `tools/round.py round --k=K --sweep=SWEEP` (the parallel round),
#   4. runs the same K candidates sequentially (submit + wait, one at a time, fresh state dir),
#   and prints one tab-separated table: round wall, slowest job, orchestration overhead
#   (round wall - slowest job wall, meaningful when K <= slots), sequential wall, speedup.
# Env:
#   K            candidates (default 4); SWEEP must have exactly K values
#   SWEEP        default "MATRIX_LR=0.02,0.03,0.05,0.06"
#   AR_PROFILE   default tiny
#   AR_LOCAL_SLOTS  parallel slots (default: the local backend's own: GPUs, else CPU cores)
#   AR_CACHE_DIR prepared data cache (default ~/.cache/autoresearch)
#   PYTHON       interpreter with the project's dependencies (default: <repo>/.venv/bin/python)
set -euo pipefail
case ${1:-} in -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$(mktemp -d)}
mkdir -p "$out"
out=$(cd "$out" && pwd)
k=${K:-4}
sweep=${SWEEP:-MATRIX_LR=0.02,0.03,0.05,0.06}
[[ "$k" =~ ^[1-9][0-9]?$ ]] || { echo "bench-round: error: K must be 1..99" >&2; exit 2; }
py=${PYTHON:-$repo/.venv/bin/python}
[[ -x "$py" ]] || { echo "bench-round: error: $py not found: run make setup or set PYTHON" >&2; exit 2; }
export AR_PROFILE=${AR_PROFILE:-tiny} AR_LOCAL_PYTHON="$py"
unset AR_STATE_DIR AR_TAG

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/repo"
cd "$work/repo"
"$py" prepare/prepare.py --profile "$AR_PROFILE" >&2

echo "bench-round: baseline (untimed)" >&2
"$py" tools/round.py baseline --repeats=2 --backend=local --tag=bench >"$out/baseline.txt"

echo "bench-round: parallel round of $k ($sweep)" >&2
t0=$(date +%s.%N)
"$py" tools/round.py round --k="$k" --backend=local --tag=bench --sweep="$sweep" >"$out/round.txt"
t1=$(date +%s.%N)
cp .ar/rounds/bench/r1.json "$out/round-ledger.json"
cp -r .ar/local/jobs "$out/parallel-jobs"

echo "bench-round: the same $k candidates one after another" >&2
knob=${sweep%%=*}
IFS=, read -r -a values <<<"${sweep#*=}"
commit=$(jq -r '.best_commit' "$out/round-ledger.json")
t2=$(date +%s.%N)
for v in "${values[@]}"; do
    id=$(AR_STATE_DIR="$work/seq" AR_TAG=benchseq local/submit-async.sh --commit "$commit" --env "AR_$knob=$v")
    AR_STATE_DIR="$work/seq" local/wait-jobs.sh "$id" >>"$out/sequential.txt"
done
t3=$(date +%s.%N)
cp -r "$work/seq/local/jobs" "$out/sequential-jobs"

"$py" - "$out" "$t0" "$t1" "$t2" "$t3" "$k" <<'EOF'
import json, sys, datetime, pathlib
out, t0, t1, t2, t3, k = pathlib.Path(sys.argv[1]), *map(float, sys.argv[2:6]), int(sys.argv[6])
ts = lambda s: datetime.datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").timestamp()
def jobs(d):
    metas = [json.loads(p.read_text()) for p in sorted(d.glob("*/meta.json"))]
    return [m for m in metas if m.get("finished_at")]
round_ids = {c["job_id"] for c in json.load(open(out / "round-ledger.json"))["candidates"]}
par = [m for m in jobs(out / "parallel-jobs") if m["id"] in round_ids]
slowest = max(ts(m["finished_at"]) - ts(m["started_at"]) for m in par)
slots = par[0]["slots"]
round_wall, seq_wall = t1 - t0, t3 - t2
row = dict(k=k, slots=slots, threads_per_job=par[0]["threads"], round_wall_s=round(round_wall, 1),
           slowest_job_s=round(slowest, 1), overhead_s=round(round_wall - slowest, 1),
           sequential_wall_s=round(seq_wall, 1), speedup=round(seq_wall / round_wall, 2),
           target=round(0.9 * min(k, slots), 2))
print("\t".join(row))
print("\t".join(str(v) for v in row.values()))
(out / "bench-round.json").write_text(json.dumps(row, indent=2) + "\n")
EOF
