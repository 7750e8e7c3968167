#!/usr/bin/env bash
# wait-jobs.sh -- wait for VESSL jobs; print each one's summary (or log tail) when it ends.
#
# Usage: batch-job/wait-jobs.sh ID...        (IDs: slugs printed by submit-async.sh)
#
# Polls `vesslctl job show SLUG -o json` (workloadState) every AR_VESSL_POLL_S seconds; never
# follows logs. When a job ends, its full log is read from its run folder on the object volume (the
# CLI log, capped at 1000 lines, is the fallback) and kept in its record under
# ${AR_STATE_DIR:-<repo>/.ar}/vessl/jobs/<slug>/.
# stdout, per job, when it ends: `=== ID (STATE) ===` (succeeded|failed|timeout|cancelled), then the
# summary block of its log (the last `---` line and the `key: value` lines after it) when it
# succeeded (its command exited 0), else the last 40 log lines.
# stderr: timestamped state changes.
# Jobs not ended at the deadline are terminated (`vesslctl job terminate`, -> timeout); SIGINT /
# SIGTERM terminate every unfinished job (-> cancelled). No job it gave up on is left running.
# Exit: 0 all succeeded, 1 some did not (or a terminate failed), 2 usage error or unknown id,
#       3 vesslctl missing / not logged in, 130/143 interrupted (after terminating).
#
# Env: AR_TIMEOUT_S    seconds before the rest is terminated; default 3 x the longest profile budget
#                      + 600 (full 1500, tiny 660, smoke 615; an unset profile counts as full)
#      AR_VESSL_POLL_S seconds between polls (default 15)
#      AR_STATE_DIR, VESSLCTL_ORG / VESSLCTL_TEAM (default: those recorded at submit).
# Contract: docs/contract.md
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
# shellcheck source=batch-job/_lib.sh
source "$here/_lib.sh"
# shellcheck source=batch-job/_vessl.sh
source "$here/_vessl.sh"
AR_PROG=wait-jobs.sh

ar_trap_signals  # first: a signal during the setup below still cancels

ar_parse_ids "$@"
ar_need jq flock
root=$(ar_state_root "$repo" vessl)
ar_collect_jobs "$root" "not submitted from this state dir: ${root%/vessl}" "$@"

# Default deadline: the longest profile among the jobs that have not ended (prep jobs: 2 hours).
budget=0 open=0 prep=0
for dir in "${AR_DIRS[@]}"; do
    ar_is_terminal "$(ar_state "$dir")" && continue
    open=$((open + 1))
    IFS=$'\t' read -r profile mode < <(ar_meta "$dir" '[.env.AR_PROFILE // "", .mode // "train"] | @tsv')
    [[ $mode != prepare ]] || prep=1
    b=$(ar_profile_budget "$profile")
    ((b > budget)) && budget=$b
done
default=$((3 * budget + 600))
((prep == 0 || default >= 7200)) || default=7200
timeout=$(ar_timeout_s "$default")
poll=${AR_VESSL_POLL_S:-15}
[[ $poll =~ ^[0-9]+([.][0-9]+)?$ ]] || ar_die 2 "bad AR_VESSL_POLL_S '$poll': a number of seconds"
if ((open > 0)); then
    vs_need_cli
    vs_auth_check
fi
ar_log "waiting for ${#AR_IDS[@]} job(s), up to ${timeout}s"

declare -A errors=()
# shellcheck disable=SC2329  # refresh and cancel are called by ar_wait_loop
refresh() {  # poll VESSL for each job; report a failing poll now and then, and keep trying
    local dir id
    for dir in "$@"; do
        id=$(basename "$dir")
        if vs_poll "$dir"; then
            errors[$id]=0
        else
            errors[$id]=$((${errors[$id]:-0} + 1))
            (((errors[$id] - 1) % 20 == 0)) && ar_log "$id: $VS_ERR (will retry)"
        fi
    done
    return 0
}
# shellcheck disable=SC2329
cancel() {  # terminate each job; one whose terminate failed stays open for cancel-jobs.sh
    local to=$1 reason=$2 dir rc
    shift 2
    for dir in "$@"; do
        rc=0
        vs_cancel "$dir" "$to" "$reason" || rc=$?
        ((rc != 2)) || AR_WAIT_STUCK[$(basename "$dir")]="[ar-vessl] vesslctl job terminate failed; the job may still be running: run batch-job/cancel-jobs.sh $(basename "$dir")"
    done
}
ar_wait_loop "$timeout" "$poll" refresh cancel
ar_wait_exit
