#!/usr/bin/env bash
# cancel-jobs.sh -- cancel local jobs (idempotent).
#
# Usage: local/cancel-jobs.sh ID...
#
# A queued or running job becomes cancelled and its process group (supervisor + trainer) gets
# SIGTERM, then SIGKILL after a grace period; the script returns once no process of it is left.
# A job that already ended stays as it is. stdout: nothing. stderr: what changed.
# Exit: 0 done, 1 a job's processes would not die, 2 usage error or unknown id (checked before
#       anything is cancelled), 3 jq/flock missing.
#
# Env: AR_STATE_DIR, AR_LOCAL_KILL_GRACE_S (seconds between SIGTERM and SIGKILL, default 5).
# Contract: docs/contract.md
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
# shellcheck source=local/_lib.sh
source "$here/_lib.sh"
# shellcheck source=local/_local.sh
source "$here/_local.sh"
AR_PROG=cancel-jobs.sh

ar_parse_ids "$@"
ar_need jq flock
root=$(ar_state_root "$repo" local)
dirs=()
for id in "$@"; do dirs+=("$(ar_job_dir "$root" "$id")"); done

for dir in "${dirs[@]}"; do
    al_reap "$dir"
    before=$(ar_state "$dir")
    if al_cancel "$dir" cancelled "cancel-jobs.sh"; then
        ar_log "$(basename "$dir"): $before -> cancelled"
    else
        ar_warn "$(basename "$dir"): already $(ar_state "$dir")"
    fi
done
rc=0
for dir in "${dirs[@]}"; do al_wait_gone "$dir" || rc=1; done
exit "$rc"
