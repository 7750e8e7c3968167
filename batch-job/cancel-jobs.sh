#!/usr/bin/env bash
# cancel-jobs.sh -- terminate VESSL jobs (idempotent).
#
# Usage: batch-job/cancel-jobs.sh ID...      (IDs: slugs printed by submit-async.sh or prep.sh)
#
# A queued or running job gets `vesslctl job terminate` (retried) and is recorded as cancelled; the
# script returns once VESSL accepted every terminate (the machine is being torn down). A job that
# already ended stays as it is. stdout: nothing. stderr: what changed.
# Exit: 0 done, 1 a terminate failed (the job may still run: run this again), 2 usage error or
#       unknown id (checked before anything is terminated), 3 vesslctl missing / not logged in.
#
# Env: AR_STATE_DIR, VESSLCTL_ORG / VESSLCTL_TEAM (default: those recorded at submit).
# Contract: docs/contract.md
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
# shellcheck source=batch-job/_lib.sh
source "$here/_lib.sh"
# shellcheck source=batch-job/_vessl.sh
source "$here/_vessl.sh"
AR_PROG=cancel-jobs.sh

ar_parse_ids "$@"
ar_need jq flock
root=$(ar_state_root "$repo" vessl)
dirs=()
for id in "$@"; do dirs+=("$(ar_job_dir "$root" "$id" "not submitted from this state dir: ${root%/vessl}")"); done

checked=0 rc=0
for dir in "${dirs[@]}"; do
    id=$(basename "$dir")
    if ar_is_terminal "$(ar_state "$dir")"; then
        ar_warn "$id: already $(ar_state "$dir")"
        continue
    fi
    if ((!checked)); then
        vs_need_cli
        vs_auth_check
        checked=1
    fi
    vs_poll "$dir" || ar_warn "note: $VS_ERR"
    before=$(ar_state "$dir")
    if ar_is_terminal "$before"; then
        ar_warn "$id: already $before"
        continue
    fi
    r=0
    vs_cancel "$dir" cancelled "cancel-jobs.sh" || r=$?
    case $r in
        0) ar_log "$id: $before -> cancelled" ;;
        1) ar_warn "$id: already $(ar_state "$dir")" ;;
        *) rc=1 ;;
    esac
done
exit "$rc"
