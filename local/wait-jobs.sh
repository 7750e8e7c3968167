#!/usr/bin/env bash
# wait-jobs.sh -- wait for local jobs; print each one's summary (or log tail) when it ends.
#
# Usage: local/wait-jobs.sh ID...
#
# stdout, per job, when it ends: `=== ID (STATE) ===` (succeeded|failed|timeout|cancelled), then the
# trainer's summary verbatim (`---` through `AR_RESULT_JSON: {...}`; rebuilt from result.json if the
# log lacks it), or the last 25 log lines when the job did not succeed.
# stderr: timestamped state changes.
# Jobs still queued or running at the deadline are cancelled (-> timeout); SIGINT / SIGTERM cancel
# every unfinished job (-> cancelled). A job whose supervisor died is marked failed.
# Exit: 0 all succeeded, 1 some did not, 2 usage error or unknown id, 3 jq/flock missing,
#       130/143 interrupted (after cancelling).
#
# Env: AR_TIMEOUT_S  seconds before the rest is cancelled; default (3 x the profile's budget +
#                    600) x ceil(unfinished jobs / slots); profile budgets: full 300, tiny 20, smoke 5
#                    (unset profile: full with GPUs, tiny without).
#      AR_STATE_DIR, AR_LOCAL_POLL_S (default 1), AR_LOCAL_KILL_GRACE_S (SIGTERM -> SIGKILL, default 5).
# Contract: docs/contract.md
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
# shellcheck source=local/_lib.sh
source "$here/_lib.sh"
# shellcheck source=local/_local.sh
source "$here/_local.sh"
AR_PROG=wait-jobs.sh
# Traps first: bash drops a SIGINT that arrives while it waits on a child before any trap is set.
signal=""
trap 'signal=INT' INT
trap 'signal=TERM' TERM

ar_parse_ids "$@"
ar_need jq flock
root=$(ar_state_root "$repo" local)
ids=() dirs=()
for id in "$@"; do
    dir=$(ar_job_dir "$root" "$id")
    [[ " ${ids[*]} " == *" $id "* ]] && continue
    ids+=("$id") dirs+=("$dir")
done

# Default deadline: the longest profile among the unfinished jobs, times the waves of slots.
budget=0 open=0 slots=""
for dir in "${dirs[@]}"; do
    al_reap "$dir"
    ar_is_terminal "$(ar_state "$dir")" && continue
    open=$((open + 1))
    IFS='|' read -r profile ngpus s < <(ar_meta "$dir" '[.env.AR_PROFILE // "", (.gpus | length), .slots] | join("|")')
    [[ -n $profile ]] || { ((ngpus > 0)) && profile=full || profile=tiny; }
    b=$(ar_profile_budget "$profile")
    ((b > budget)) && budget=$b
    [[ -n $slots && $slots -le $s ]] || slots=$s
done
waves=$(( open > 0 ? (open + ${slots:-1} - 1) / ${slots:-1} : 1 ))
timeout=$(ar_timeout_s $(( (3 * budget + 600) * waves )))
ar_log "waiting for ${#ids[@]} job(s), up to ${timeout}s"

deadline=$((SECONDS + timeout))
declare -A seen=()
pending=("${!ids[@]}")
failed=0
while :; do
    still=()
    for k in "${pending[@]}"; do
        id=${ids[k]} dir=${dirs[k]}
        al_reap "$dir"
        st=$(ar_state "$dir")
        if [[ ${seen[$id]:-} != "$st" ]]; then
            ar_log "$id: ${seen[$id]:-submitted} -> $st"
            seen[$id]=$st
        fi
        if ar_is_terminal "$st"; then
            ar_print_block "$id" "$st" "$dir/log" "$dir/result.json"
            [[ $st == succeeded ]] || failed=1
        else
            still+=("$k")
        fi
    done
    pending=("${still[@]}")
    ((${#pending[@]})) || break
    reason=""
    if [[ -n $signal ]]; then
        to=cancelled reason="wait-jobs.sh got SIG$signal"
    elif ((SECONDS >= deadline)); then
        to=timeout reason="wait-jobs.sh deadline of ${timeout}s (AR_TIMEOUT_S) passed"
    fi
    if [[ -n $reason ]]; then
        ar_log "$reason: cancelling ${#pending[@]} job(s)"
        for k in "${pending[@]}"; do al_cancel "${dirs[k]}" "$to" "$reason" || true; done
        for k in "${pending[@]}"; do al_wait_gone "${dirs[k]}" || true; done
        continue
    fi
    sleep "${AR_LOCAL_POLL_S:-1}" &
    wait $! || true
done

case $signal in
    INT) exit 130 ;;
    TERM) exit 143 ;;
esac
exit "$failed"
