#!/usr/bin/env bash
# submit-async.sh -- run one commit of this project on a Modal GPU; prints the job id.
#
# Usage: modal/submit-async.sh [--commit REV] [--name NAME]
#
#   --commit REV  the commit to run; default HEAD, and then changes to tracked files are refused
#   --name NAME   ^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$, default ar-<first 10 hex of the commit>. A name
#                 whose job is running or succeeded prints that job's id and starts nothing; after a
#                 failed, timed-out or cancelled one a new job starts.
#
# stdout: the job id, the FunctionCall id (fc-...) of `train` of the deployed app (modal/app.py),
# spawned on `git archive` of the commit with AR_TRAIN_CMD, AR_PROFILE, AR_DATA, AR_CACHE_DIR when set.
# Exit: 0 submitted (or the existing job), 2 usage or precondition, 3 Modal unavailable (no modal
# package, not logged in, app not deployed: the message says which).
set -euo pipefail
case ${1:-} in -h | --help) sed -n '2,/^set -/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
here=$(cd "$(dirname "$0")" && pwd)
py=$(git -C "$here" rev-parse --show-toplevel 2>/dev/null)/.venv/bin/python  # needs the modal package
[[ -x $py ]] || py=python3
exec "$py" "$here/app.py" submit-async.sh "$@"
