#!/usr/bin/env bash
# wait-jobs.sh -- wait for SkyPilot jobs; print each one's summary (or log tail) when it ends.
#
# Usage: sky/wait-jobs.sh ID...
#
# Polls `sky logs CLUSTER N --status` (exit 0 succeeded, 100 failed, 101 not finished, 102 not
# found, 103 cancelled; never follows a log), and once a job has ended fetches its whole log with
# `sky logs CLUSTER N --no-follow --tail 0`, without SkyPilot's `(task, pid=N) ` line prefixes.
# Managed jobs (AR_SKY_MANAGED=1): one `sky jobs queue -o json` per poll for all of them, and
# `sky jobs logs N --no-follow --tail 0`; RECOVERING (preempted) counts as running.
# stdout, per job, when it ends: `=== ID (STATE) ===` (succeeded|failed|timeout|cancelled), then the
# summary block of its log (the last `---` line and the `key: value` lines after it) when it
# succeeded (SkyPilot SUCCEEDED: the run exited 0), else the last 40 log lines.
# stderr: timestamped state changes.
# Jobs still queued or running at the deadline are cancelled (`sky cancel`; -> timeout); SIGINT /
# SIGTERM cancel every unfinished job (-> cancelled). A job whose launch failed, whose supervisor
# died before its SkyPilot job existed, or whose cluster disappeared is marked failed.
# Exit: 0 all succeeded, 1 some did not, 2 usage error or unknown id, 3 jq/flock/sky missing,
#       130/143 interrupted (after cancelling).
#
# Env: AR_TIMEOUT_S  seconds before the rest is cancelled; default (3 x the profile's budget + 600)
#                    x the most jobs queued on one cluster (managed jobs: x ceil(jobs / SKY_MAX_CLUSTERS),
#                    + 900 for provisioning and recoveries); profile budgets: full 300, tiny 20,
#                    smoke 5 (unset profile: full).
#      AR_STATE_DIR, AR_SKY_POLL_S (seconds between polls, default 10), AR_SKY_CWD.
# Contract: docs/contract.md
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
# shellcheck source=sky/_lib.sh
source "$here/_lib.sh"
# shellcheck source=sky/_sky.sh
source "$here/_sky.sh"
AR_PROG=wait-jobs.sh
ar_trap_signals  # first: a signal during the setup below still cancels

ar_parse_ids "$@"
ar_need jq flock timeout
ar_collect_jobs "$(ar_state_root "$repo" sky)" "" "$@"
command -v sky >/dev/null 2>&1 || ar_die 3 "'sky' not found: pip install skypilot (then run 'sky check')"

# Default deadline: the longest profile among the unfinished jobs, times the longest cluster queue
# (managed jobs: the waves their pool's cap makes, plus time to provision and recover).
budget=0 waves=1 extra=0
declare -A per_key=()
for dir in "${AR_DIRS[@]}"; do
    ar_is_terminal "$(ar_state "$dir")" && continue
    IFS='|' read -r profile key cap < <(ar_meta "$dir" \
        '[.env.AR_PROFILE // "", (if .managed then "managed:" + .pool else .cluster end), (if .managed then .max_in_flight else 1 end)]
         | map(tostring) | join("|")')
    b=$(ar_profile_budget "$profile")
    ((b > budget)) && budget=$b
    [[ $key != managed:* ]] || extra=900
    per_key[$key]=$(( ${per_key[$key]:-0} + 1 ))
    w=$(( (per_key[$key] + cap - 1) / cap ))
    ((w > waves)) && waves=$w
done
((budget > 0)) || budget=300
timeout=$(ar_timeout_s $(( (3 * budget + 600) * waves + extra )))
ar_log "waiting for ${#AR_IDS[@]} job(s), up to ${timeout}s"

cancel_rc=0
# shellcheck disable=SC2329  # refresh and cancel are called by ar_wait_loop
refresh() {  # one `sky jobs queue` listing per poll serves every managed job
    local dir
    sk_mq_forget
    for dir in "$@"; do sk_refresh "$dir"; done
}
# shellcheck disable=SC2329
cancel() {  # jobs not yet created first (a freed slot must not launch one), then the others
    local to=$1 reason=$2 dir rc
    shift 2
    while IFS= read -r dir; do
        rc=0
        sk_cancel "$dir" "$to" "$reason" || rc=$?
        ((rc != 4)) || cancel_rc=1
    done < <(sk_cancel_order "$@")
}
ar_wait_loop "$timeout" "${AR_SKY_POLL_S:-10}" refresh cancel
((cancel_rc == 0)) || ar_warn "some cancels could not be confirmed (see above); check with: sky queue / sky jobs queue"
ar_wait_exit
