#!/usr/bin/env bash
# wait-jobs.sh -- wait for Modal jobs; print each one's summary (or log tail) when it ends.
#
# Usage: modal/wait-jobs.sh ID...
#
# Collects each call with FunctionCall.get(timeout=0) every AR_MODAL_POLL_S seconds (a call still
# running raises TimeoutError; a result Modal no longer keeps is read back from the Volume).
# stdout, per job, when it ends: `=== ID (STATE) ===` (succeeded|failed|timeout|cancelled), then the
# trainer's summary verbatim (`---` through `AR_RESULT_JSON: {...}`; rebuilt from result.json if the
# log lacks it), or the last 25 log lines when the job did not succeed.
# stderr: timestamped state changes.
# Jobs still queued or running at the deadline are cancelled with FunctionCall.cancel (-> timeout);
# SIGINT / SIGTERM cancel every unfinished job (-> cancelled).
# Exit: 0 all succeeded, 1 some did not, 2 usage error or unknown id, 3 Modal unavailable (or a
#       cancel that kept failing: run cancel-jobs.sh on the ids it names), 130/143 interrupted
#       (after cancelling).
#
# Env: AR_TIMEOUT_S  seconds before the rest is cancelled; default 3 x the profile's budget + 600
#                    (full 1500, tiny 660, smoke 615; no profile: full) -- Modal runs calls at once.
#      AR_STATE_DIR, AR_MODAL_POLL_S (default 10), AR_MODAL_PYTHON (see submit-async.sh).
# Contract: docs/contract.md
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
# shellcheck source=modal/_lib.sh
source "$here/_lib.sh"
# shellcheck source=modal/_modal.sh
source "$here/_modal.sh"
AR_PROG=wait-jobs.sh
signal=""  # from the start: a signal during the first poll still cancels (the loop checks it)
trap 'signal=INT' INT
trap 'signal=TERM' TERM

ar_parse_ids "$@"
ar_need jq
root=$(ar_state_root "$repo" modal)
ids=() dirs=()
for id in "$@"; do
    dir=$(ar_job_dir "$root" "$id")
    [[ " ${ids[*]} " == *" $id "* ]] && continue
    ids+=("$id") dirs+=("$dir")
done
poll=${AR_MODAL_POLL_S:-10}
[[ $poll =~ ^[0-9]+([.][0-9]+)?$ ]] || ar_die 2 "bad AR_MODAL_POLL_S '$poll': a number of seconds"
python=$(am_python "$repo")

open_ids() {  # the ids whose record is not terminal yet
    local k
    for k in "${!ids[@]}"; do
        ar_is_terminal "$(ar_state "${dirs[k]}")" || printf '%s\n' "${ids[k]}"
    done
}
mapfile -t open < <(open_ids)
if ((${#open[@]})); then  # a first look; an unreachable or unauthenticated Modal ends here (exit 3)
    rc=0
    am_client "$python" poll "${open[@]}" || rc=$?
    ((rc == 0)) || exit "$rc"
fi

# Default deadline: the longest profile among the unfinished jobs (calls do not queue behind each other).
budget=0
for dir in "${dirs[@]}"; do
    ar_is_terminal "$(ar_state "$dir")" && continue
    b=$(ar_profile_budget "$(jq -r '.env.AR_PROFILE // ""' "$dir/meta.json")")
    ((b > budget)) && budget=$b
done
timeout=$(ar_timeout_s $(( 3 * budget + 600 )))
ar_log "waiting for ${#ids[@]} job(s), up to ${timeout}s"

deadline=$((SECONDS + timeout))
declare -A seen=()
pending=("${!ids[@]}")
failed=0 cancel_rounds=0
while :; do
    still=()
    for k in "${pending[@]}"; do
        id=${ids[k]} dir=${dirs[k]}
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
    left=()
    for k in "${pending[@]}"; do left+=("${ids[k]}"); done
    reason=""
    if [[ -n $signal ]]; then
        to=cancelled reason="wait-jobs.sh got SIG$signal"
    elif ((SECONDS >= deadline)); then
        to=timeout reason="wait-jobs.sh deadline of ${timeout}s (AR_TIMEOUT_S) passed"
    fi
    if [[ -n $reason ]]; then
        if ((cancel_rounds++ >= 3)); then
            ar_die 3 "could not cancel ${left[*]} on Modal; run: modal/cancel-jobs.sh ${left[*]}"
        fi
        ar_log "$reason: cancelling ${#left[@]} job(s)"
        am_client "$python" cancel --quiet --to "$to" --reason "$reason" "${left[@]}" || sleep 2
        continue
    fi
    sleep "$poll" &
    wait $! || true
    [[ -n $signal ]] && continue
    am_client "$python" poll "${left[@]}" || ar_warn "could not reach Modal this time; trying again"
done

case $signal in
    INT) exit 130 ;;
    TERM) exit 143 ;;
esac
exit "$failed"
