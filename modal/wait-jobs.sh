#!/usr/bin/env bash
# wait-jobs.sh -- wait for Modal jobs; print each one's summary (or log tail) when it ends.
#
# Usage: modal/wait-jobs.sh ID...
#
# Collects each call with FunctionCall.get(timeout=0) every AR_MODAL_POLL_S seconds (a call still
# running raises TimeoutError; a result Modal no longer keeps is read back from the Volume).
# stdout, per job, when it ends: `=== ID (STATE) ===` (succeeded|failed|timeout|cancelled), then the
# summary block of its log (the last `---` line and the `key: value` lines after it) when it
# succeeded (the trainer exited 0), else the last 40 log lines.
# stderr: timestamped state changes.
# Jobs still queued or running at the deadline are cancelled with FunctionCall.cancel (-> timeout);
# SIGINT / SIGTERM cancel every unfinished job (-> cancelled).
# A job whose cancel kept failing (three tries) is reported in its block with the cancel-jobs.sh
# command to run.
# Exit: 0 all succeeded, 1 some did not (or could not be cancelled), 2 usage error or unknown id,
#       3 Modal unavailable, 130/143 interrupted (after cancelling).
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
ar_trap_signals  # first: a signal during the first poll below still cancels

ar_parse_ids "$@"
ar_need jq
ar_collect_jobs "$(ar_state_root "$repo" modal)" "" "$@"
poll=${AR_MODAL_POLL_S:-10}
[[ $poll =~ ^[0-9]+([.][0-9]+)?$ ]] || ar_die 2 "bad AR_MODAL_POLL_S '$poll': a number of seconds"
python=$(am_python "$repo")

open_ids() {  # the ids whose record is not terminal yet
    local k
    for k in "${!AR_IDS[@]}"; do
        ar_is_terminal "$(ar_state "${AR_DIRS[k]}")" || printf '%s\n' "${AR_IDS[k]}"
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
for dir in "${AR_DIRS[@]}"; do
    ar_is_terminal "$(ar_state "$dir")" && continue
    b=$(ar_profile_budget "$(jq -r '.env.AR_PROFILE // ""' "$dir/meta.json")")
    ((b > budget)) && budget=$b
done
timeout=$(ar_timeout_s $(( 3 * budget + 600 )))
ar_log "waiting for ${#AR_IDS[@]} job(s), up to ${timeout}s"

first=1
# shellcheck disable=SC2329  # refresh and cancel are called by ar_wait_loop
refresh() {  # one `ar_modal.py poll` for all of them (the first look above already polled once)
    local dir ids=()
    if [[ -n $first ]]; then first=""; return 0; fi
    for dir in "$@"; do ids+=("$(basename "$dir")"); done
    am_client "$python" poll "${ids[@]}" || ar_warn "could not reach Modal this time; trying again"
}
# shellcheck disable=SC2329
cancel() {
    local to=$1 reason=$2 dir ids=()
    shift 2
    for dir in "$@"; do ids+=("$(basename "$dir")"); done
    am_client "$python" cancel --quiet --to "$to" --reason "$reason" "${ids[@]}" || sleep 2
}
ar_wait_loop "$timeout" "$poll" refresh cancel
ar_wait_exit
