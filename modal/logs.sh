#!/usr/bin/env bash
# logs.sh -- print a Modal job's log (trainer stdout + stderr and [ar-modal] notes).
#
# Usage: modal/logs.sh ID
#
# stdout: a finished job's full log as collected with its result (the run's own copy is on the Volume
# under runs/<ID>/log). While the job is queued or running: the live tail from Modal
# (FunctionCall.logs, the last 1000 lines; empty while queued), with a note on stderr.
# Exit: 0, 2 usage error or unknown id, 3 Modal unavailable.
#
# Env: AR_STATE_DIR, AR_MODAL_PYTHON (see submit-async.sh).
# Contract: docs/contract.md
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
# shellcheck source=modal/_lib.sh
source "$here/_lib.sh"
# shellcheck source=modal/_modal.sh
source "$here/_modal.sh"
AR_PROG=logs.sh

ar_parse_ids "$@"
(($# == 1)) || ar_die 2 "one job id at a time (see --help)"
dir=$(ar_job_dir "$(ar_state_root "$repo" modal)" "$1")
if ar_is_terminal "$(ar_state "$dir")"; then
    cat "$dir/log" 2>/dev/null || true
    exit 0
fi
python=$(am_python "$repo")
rc=0
am_client "$python" logs "$1" || rc=$?
exit "$rc"
