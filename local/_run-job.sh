#!/usr/bin/env bash
# _run-job.sh -- the supervisor of one local job (internal; started by submit-async.sh).
#
# Usage: _run-job.sh JOB_DIR     (run detached with setsid: its process group is the job)
#
# Waits for a free slot (an flock on <state>/local/slots/<i>.lock, held until the trainer exits),
# marks the job running, runs `python trainer/train.py` from the job's snapshot (JOB_DIR/src) with
# the job's environment, then records succeeded (exit 0 and result.json status ok) or failed.
# A state that is already terminal (cancelled, timeout) is never overwritten. submit-async.sh starts
# it holding JOB_DIR/alive.lock; the lock is inherited by the trainer, so the job counts as alive
# exactly as long as one of them lives.

# shellcheck disable=SC2016  # jq programs are single-quoted on purpose
set -euo pipefail

dir=$1
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=local/_lib.sh
source "$here/_lib.sh"
# shellcheck source=local/_local.sh
source "$here/_local.sh"
AR_PROG=ar-local

child=""
on_signal() {
    [[ -z $child ]] || kill -TERM "$child" 2>/dev/null || true
    exit 143
}
trap on_signal TERM INT HUP

echo "$$" | ar_write "$dir/pid"  # setsid made this shell the leader of the job's process group
slots_dir=$(dirname "$(dirname "$dir")")/slots
mkdir -p "$slots_dir"
nslots=$(ar_meta "$dir" .slots)
mapfile -t gpus < <(ar_meta "$dir" '.gpus[]')

slot=""
while [[ -z $slot ]]; do
    [[ $(ar_state "$dir") == queued ]] || exit 0  # cancelled while queued
    for ((i = 0; i < nslots; i++)); do
        exec {slot_fd}>>"$slots_dir/$i.lock"
        if flock -n "$slot_fd"; then
            slot=$i
            break
        fi
        exec {slot_fd}>&-
    done
    if [[ -z $slot ]]; then
        sleep "${AR_LOCAL_POLL_S:-0.5}" &
        wait $! || true
    fi
done

gpu=""
((${#gpus[@]} == 0)) || gpu=${gpus[slot % ${#gpus[@]}]}
ar_transition "$dir" running queued || exit 0
ar_meta_set "$dir" '.slot = $slot | .gpu = (if $gpu == "" then null else $gpu end) | .pid = $pid' \
    --argjson slot "$slot" --arg gpu "$gpu" --argjson pid "$$"

# The job's environment: this one (the submitter's) without any AR_ variable, then the job's own.
while IFS= read -r var; do
    [[ $var != AR_* ]] || unset "$var"
done < <(compgen -e)
while IFS= read -r pair; do
    export "${pair%%=*}=${pair#*=}"  # a name and a value, never evaluated
done < <(ar_meta "$dir" '(.env + .forward) | to_entries[] | "\(.key)=\(.value)"')
export AR_RESULT_PATH="$dir/result.json" PYTHONUNBUFFERED=1
threads=$(ar_meta "$dir" .threads)
export OMP_NUM_THREADS="$threads" MKL_NUM_THREADS="$threads"
[[ -z $gpu ]] || export CUDA_VISIBLE_DEVICES="$gpu"
python=$(ar_meta "$dir" .python)

al_note "$dir" "running $(ar_meta "$dir" .commit) on slot $slot${gpu:+ (GPU $gpu)}, $threads thread(s)"
cd "$dir/src"
"$python" trainer/train.py </dev/null >>"$dir/log" 2>&1 &
child=$!
rc=0
wait "$child" || rc=$?
child=""

status=$(jq -r '.status // empty' "$dir/result.json" 2>/dev/null || true)
final=failed
[[ $rc -ne 0 || $status != ok ]] || final=succeeded
if ar_transition "$dir" "$final" running; then
    ar_meta_set "$dir" '.exit_code = $rc' --argjson rc "$rc"
    al_note "$dir" "trainer exited with code $rc, result status '${status:-none}' -> $final"
fi
