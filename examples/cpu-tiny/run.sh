#!/usr/bin/env bash
# Run the worked example: three K=4 rounds on the local backend, CPU tiny profile.
#
# Usage: examples/cpu-tiny/run.sh [OUT_DIR]     (default OUT_DIR: examples/cpu-tiny)
#   Works in a temporary clone of HEAD (your checkout, branches and .ar/ are untouched; the clone
#   uses this checkout's .venv) and copies results.tsv, progress.png and each round's table into
#   OUT_DIR. First `make baseline REPEATS=4`, as the prompts say (four runs of the unchanged
#   train file, for sigma). Round 1: a SWEEP of MATRIX_LR (four commits). Round 2: four candidate
#   branches with code edits, prepared the way an agent would (autoresearch/<tag>-r2-c<i>, each one
#   commit on the current best). Round 3: a SWEEP of WARMDOWN_RATIO on the best.
#   About 6 minutes on 2 cores.
# Env: AR_CACHE_DIR (data cache, default ~/.cache/autoresearch), AR_LOCAL_SLOTS (default: CPU cores)
set -euo pipefail
case ${1:-} in -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
repo=$(cd "$(dirname "$0")/../.." && pwd)
out=${1:-$repo/examples/cpu-tiny}
mkdir -p "$out"
out=$(cd "$out" && pwd)
py=$repo/.venv/bin/python
[[ -x "$py" ]] || { echo "worked example: error: $py not found: run make setup" >&2; exit 2; }
export AR_PROFILE=tiny

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/repo"
cd "$work/repo"
[[ -e .venv ]] || ln -s "$repo/.venv" .venv
git config user.email >/dev/null || git config user.email example@localhost
git config user.name >/dev/null || git config user.name example
start=$(git rev-parse HEAD)
"$py" prepare/prepare.py >&2
round() { "$py" tools/round.py round --backend=local --tag=example "$@"; }

echo "worked example: baseline (four runs of the unchanged train file, for sigma)" >&2
"$py" tools/round.py baseline --backend=local --tag=example --repeats=4 | tee "$out/baseline1.txt"

echo "worked example: round 1 (SWEEP)" >&2
round --k=4 --sweep="MATRIX_LR=0.02,0.03,0.05,0.06" | tee "$out/round1.txt"

echo "worked example: round 2 (four candidate branches)" >&2
edit() {  # edit BRANCH DESCRIPTION SED-EXPRESSION: one candidate branch off the current best
    git switch -q -c "$1" autoresearch/example
    sed -i -E "$3" trainer/train.py
    git diff --quiet && { echo "worked example: error: '$3' changed nothing" >&2; exit 1; }
    git commit -qam "$2"
    git switch -q -
}
edit autoresearch/example-r2-c1 "shorter warmdown (0.3)" 's/^WARMDOWN_RATIO = 0\.5 /WARMDOWN_RATIO = 0.3 /'
edit autoresearch/example-r2-c2 "no value embeddings" 's/^VALUE_EMBEDS = True /VALUE_EMBEDS = False/'
edit autoresearch/example-r2-c3 "3 layers on CPU" 's/^DEPTH = 2 if SMALL /DEPTH = 3 if SMALL /'
edit autoresearch/example-r2-c4 "MLP ratio 3" 's/^MLP_RATIO = 4 /MLP_RATIO = 3 /'
round --k=4 | tee "$out/round2.txt"

echo "worked example: round 3 (SWEEP on the new best)" >&2
round --k=4 --sweep="WARMDOWN_RATIO=0.4,0.6,0.7,0.8" | tee "$out/round3.txt"

"$py" tools/results.py show --tag=example --last=0 >"$out/results-table.txt"
"$py" tools/plot.py --tag=example >&2
cp results.tsv progress.png "$out/"
git log --oneline "$start..autoresearch/example" >"$out/best-branch-log.txt"
echo "worked example: wrote $out" >&2
