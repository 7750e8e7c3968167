#!/usr/bin/env bash
# _run-job.sh -- internal: runs one job; submit-async.sh starts it detached (setsid).
#
# Usage: _run-job.sh JOB_DIR SLOTS [GPU...]
#
# Waits for a free slot (the lock .ar/local/slots/<i>, held for the job's life), runs the train
# command in JOB_DIR/src, then writes its exit code to rc and succeeded/failed to ended.
set -euo pipefail
d=$1 slots=$2 root=${1%/.ar/local/jobs/*}
gpus=("${@:3}")
cd "$d"
mkdir -p "$root/.ar/local/slots"
while :; do
    for ((i = 0; i < slots; i++)); do
        exec 7>>"$root/.ar/local/slots/$i"
        if flock -n 7; then break 2; fi
    done
    sleep 0.5
done
[[ ! -e ended ]] || exit 0  # cancelled while queued
echo "$i" >slot
export OMP_NUM_THREADS=$(($(nproc) / slots > 1 ? $(nproc) / slots : 1))
if ((${#gpus[@]})); then export CUDA_VISIBLE_DEVICES=${gpus[i % ${#gpus[@]}]}; fi
if [[ -d $root/.venv/bin ]]; then  # python, and uv run, use the project's environment
    export PATH=$root/.venv/bin:$PATH UV_PROJECT_ENVIRONMENT=${UV_PROJECT_ENVIRONMENT:-$root/.venv}
fi
cd src
cmd=(python train.py)
if [[ -f trainer/train.py ]]; then cmd=(python trainer/train.py); fi
if [[ -f uv.lock ]]; then cmd=(uv run "${cmd[@]}"); fi
if [[ -n ${AR_TRAIN_CMD:-} ]]; then cmd=(bash -c "$AR_TRAIN_CMD"); fi  # run as written, no uv run added
rc=0
"${cmd[@]}" </dev/null || rc=$?
echo "$rc" >../rc
if ((rc == 0)); then end=succeeded; else end=failed; fi
(set -C && echo "$end" >../ended) 2>/dev/null || true  # the first end recorded wins
