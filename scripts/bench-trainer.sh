#!/usr/bin/env bash
# Measure the trainer: steady-state tokens/s, MFU and startup with a cold and then a warm compile cache.
#
# Usage: scripts/bench-trainer.sh [OUT_DIR]
#   Runs `python trainer/train.py` twice against a fresh inductor cache (cold, then warm) and prints one
#   table row per run, its numbers read from the run's summary block. Logs go to OUT_DIR (default: a
#   temp dir).
# Env:
#   AR_PROFILE   profile to run (default: full on CUDA, tiny on CPU; as the trainer decides)
#   AR_DATA      data source (default: the profile's own; use offline on machines without internet)
#   PYTHON       interpreter with the project's dependencies (default: .venv/bin/python, else python3)
#   BENCH_RUNS   how many runs in total (default 2: cold + warm)
set -euo pipefail
case ${1:-} in -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
cd "$(dirname "$0")/.."

out=${1:-$(mktemp -d)}
mkdir -p "$out"
py=${PYTHON:-}
if [[ -z "$py" ]]; then
    if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python3; fi
fi
runs=${BENCH_RUNS:-2}
[[ "$runs" =~ ^[1-9][0-9]?$ ]] || { echo "bench: error: BENCH_RUNS must be 1..99" >&2; exit 2; }

# A fresh compile cache makes the first run cold; the data/tokenizer cache stays where it is.
inductor=$(mktemp -d)
export TORCHINDUCTOR_CACHE_DIR="$inductor/inductor" TRITON_CACHE_DIR="$inductor/triton"
trap 'rm -rf "$inductor"' EXIT

"$py" prepare/prepare.py >&2
printf 'run\tcache\tdevice\tprofile\ttokens_per_sec\tmfu_percent\tstartup_seconds\tnum_steps\tval_bpb\n'
for i in $(seq 1 "$runs"); do
    cache=warm; [[ "$i" -eq 1 ]] && cache=cold
    echo "bench: run $i ($cache compile cache), log: $out/run$i.log" >&2
    "$py" trainer/train.py >"$out/run$i.log" 2>&1 || {
        echo "bench: error: run $i failed; last lines of $out/run$i.log:" >&2; tail -n 20 "$out/run$i.log" >&2; exit 1; }
    # The summary block: the `key: value` lines after the last `---` line.
    awk -v i="$i" -v c="$cache" '
        $0 == "---" { delete v; on = 1; next }
        on && match($0, /^[A-Za-z_]+:/) { v[substr($0, 1, RLENGTH - 1)] = $2 }
        END { print i "\t" c "\t" v["device"] "\t" v["profile"] "\t" v["tokens_per_sec"] "\t" v["mfu_percent"] "\t" \
                    v["startup_seconds"] "\t" v["num_steps"] "\t" v["val_bpb"] }' "$out/run$i.log"
done
