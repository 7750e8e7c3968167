#!/usr/bin/env bash
# wait-jobs.sh -- wait for VESSL jobs; print each one's summary (or log tail) when it ends.
#
# Usage: batch-job/wait-jobs.sh ID...        (IDs: slugs printed by submit-async.sh)
#
# Polls `vesslctl job show SLUG -o json` (workloadState) every AR_VESSL_POLL_S seconds; never
# follows logs. When a job ends, its result.json and full log are read from its run folder on the
# object volume (the CLI log, capped at 1000 lines, and its AR_RESULT_JSON line are the fallback) and
# kept in its record under ${AR_STATE_DIR:-<repo>/.ar}/vessl/jobs/<slug>/.
# stdout, per job, when it ends: `=== ID (STATE) ===` (succeeded|failed|timeout|cancelled), then the
# trainer's summary verbatim (`---` through `AR_RESULT_JSON: {...}`; rebuilt from result.json if the
# log lacks it), or the last 25 log lines when the job did not succeed.
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

ar_parse_ids "$@"
ar_need jq flock
root=$(ar_state_root "$repo" vessl)
ids=() dirs=()
for id in "$@"; do
    dir=$(ar_job_dir "$root" "$id" "not submitted from this state dir: ${root%/vessl}")
    [[ " ${ids[*]} " == *" $id "* ]] && continue
    ids+=("$id") dirs+=("$dir")
done

# Default deadline: the longest profile among the jobs that have not ended (prep jobs: 2 hours).
budget=0 open=0 prep=0
for dir in "${dirs[@]}"; do
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
ar_log "waiting for ${#ids[@]} job(s), up to ${timeout}s"

signal=""
trap 'signal=INT' INT
trap 'signal=TERM' TERM
deadline=$((SECONDS + timeout))
declare -A seen=() errors=()
pending=("${!ids[@]}")
failed=0
while :; do
    still=()
    for k in "${pending[@]}"; do
        id=${ids[k]} dir=${dirs[k]}
        if vs_poll "$dir"; then
            errors[$id]=0
        else
            errors[$id]=$((${errors[$id]:-0} + 1))
            (((errors[$id] - 1) % 20 == 0)) && ar_log "$id: $VS_ERR (will retry)"
        fi
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
        ar_log "$reason: terminating ${#pending[@]} job(s)"
        still=() progress=0
        for k in "${pending[@]}"; do
            rc=0
            vs_cancel "${dirs[k]}" "$to" "$reason" || rc=$?
            if ((rc == 2)); then  # terminate failed: reported, and the record stays open for cancel-jobs.sh
                ar_log "${ids[k]}: NOT terminated; run batch-job/cancel-jobs.sh ${ids[k]}"
                printf '=== %s (%s) ===\n[ar-vessl] vesslctl job terminate failed; the job may still be running\n' "${ids[k]}" "$to"
                failed=1
            else
                still+=("$k")
                ((rc != 0)) || progress=1
            fi
        done
        pending=("${still[@]}")
        ((${#pending[@]})) || break
        ((progress == 0)) || continue  # print the blocks of what was just terminated
    fi
    sleep "$poll" &
    wait $! || true
done

case $signal in
    INT) exit 130 ;;
    TERM) exit 143 ;;
esac
exit "$failed"
