#!/usr/bin/env bash
# cancel-jobs.sh -- cancel SkyPilot jobs (idempotent).
#
# Usage: sky/cancel-jobs.sh ID...
#
# A queued or running job becomes cancelled: `sky cancel -y CLUSTER N` once its SkyPilot job exists;
# while its `sky launch` / `sky exec` is still running, that call is stopped and whatever it created
# is cancelled. The cluster stays up for the next job and autodowns after AR_SKY_IDLE_MIN idle
# minutes (`sky down -y CLUSTER` to stop paying at once). A job that already ended stays as it is.
# stdout: nothing. stderr: what changed.
# Exit: 0 done, 1 a cancel could not be confirmed (retried; the message says what to run), 2 usage
#       error or unknown id (checked before anything is cancelled), 3 jq/flock/sky missing.
#
# Env: AR_STATE_DIR, AR_SKY_CWD, AR_SKY_KILL_GRACE_S (seconds a stopped supervisor gets, default 30).
# Contract: docs/contract.md
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
# shellcheck source=sky/_lib.sh
source "$here/_lib.sh"
# shellcheck source=sky/_sky.sh
source "$here/_sky.sh"
AR_PROG=cancel-jobs.sh

ar_parse_ids "$@"
ar_need jq flock timeout
root=$(ar_state_root "$repo" sky)
dirs=()
for id in "$@"; do dirs+=("$(ar_job_dir "$root" "$id")"); done
command -v sky >/dev/null 2>&1 || ar_die 3 "'sky' not found: pip install skypilot (then run 'sky check')"

rc=0
while IFS= read -r dir; do
    sk_refresh "$dir"
    before=$(ar_state "$dir")
    r=0
    sk_cancel "$dir" cancelled "cancel-jobs.sh" || r=$?
    case $r in
        0) ar_log "$(basename "$dir"): $before -> cancelled" ;;
        1) ar_warn "$(basename "$dir"): already $(ar_state "$dir")" ;;
        *) ar_log "$(basename "$dir"): $before -> cancelled (unconfirmed)"; rc=1 ;;
    esac
done < <(sk_cancel_order "${dirs[@]}")
exit "$rc"
