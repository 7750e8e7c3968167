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
ar_trap_signals  # first: a signal during the setup below still cancels

ar_parse_ids "$@"
ar_need jq flock
ar_collect_jobs "$(ar_state_root "$repo" local)" "" "$@"

# Default deadline: the longest profile among the unfinished jobs, times the waves of slots.
budget=0 open=0 slots=""
for dir in "${AR_DIRS[@]}"; do
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
ar_log "waiting for ${#AR_IDS[@]} job(s), up to ${timeout}s"

# shellcheck disable=SC2329  # refresh and cancel are called by ar_wait_loop
refresh() {  # a job whose processes are all gone is failed
    local dir
    for dir in "$@"; do al_reap "$dir"; done
}
# shellcheck disable=SC2329
cancel() {  # cancel TO REASON DIR...: SIGTERM each job's process group, then wait until it is gone
    local to=$1 reason=$2 dir
    shift 2
    for dir in "$@"; do al_cancel "$dir" "$to" "$reason" || true; done
    for dir in "$@"; do al_wait_gone "$dir" || true; done
}
ar_wait_loop "$timeout" "${AR_LOCAL_POLL_S:-1}" refresh cancel
ar_wait_exit
