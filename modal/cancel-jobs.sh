#!/usr/bin/env bash
# cancel-jobs.sh -- stop Modal jobs (FunctionCall.cancel); an ended job keeps its outcome.
#
# Usage: modal/cancel-jobs.sh ID...
#
# Exit: 0 (also for jobs that had ended), 2 usage or unknown id (nothing cancelled), 3 Modal unavailable.
set -euo pipefail
case ${1:-} in -h | --help) sed -n '2,/^set -/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
here=$(cd "$(dirname "$0")" && pwd)
py=$(git -C "$here" rev-parse --show-toplevel 2>/dev/null)/.venv/bin/python  # needs the modal package
[[ -x $py ]] || py=python3
exec "$py" "$here/app.py" cancel-jobs.sh "$@"
