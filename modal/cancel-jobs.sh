#!/usr/bin/env bash
# cancel-jobs.sh -- cancel Modal jobs (idempotent).
#
# Usage: modal/cancel-jobs.sh ID...
#
# A queued or running job gets FunctionCall.cancel(terminate_containers=True): Modal drops the input
# or stops the container running it (and with it the GPU). The record becomes cancelled once Modal has
# accepted the cancel; a call that had just finished keeps its real outcome. A job that already ended
# stays as it is. stdout: nothing. stderr: what changed.
# Exit: 0 done, 1 a cancel kept failing (retried 3 times; run it again), 2 usage error or unknown id
#       (checked before anything is cancelled), 3 Modal unavailable.
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
AR_PROG=cancel-jobs.sh

ar_parse_ids "$@"
root=$(ar_state_root "$repo" modal)
for id in "$@"; do ar_job_dir "$root" "$id" >/dev/null; done
python=$(am_python "$repo")
rc=0
am_client "$python" cancel --to cancelled --reason "cancel-jobs.sh" "$@" || rc=$?
exit "$rc"
