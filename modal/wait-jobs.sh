#!/usr/bin/env bash
# wait-jobs.sh -- wait for Modal jobs to end; print each one's result as it ends.
#
# Usage: modal/wait-jobs.sh ID...
#
# stdout, per job as it ends: `=== ID (STATE) ===` (succeeded, failed, timeout, cancelled, or expired:
# Modal no longer keeps the result), then the summary block of a succeeded job, else the last 40
# lines of its log and a `note:` line. stderr: one line per state change. AR_TIMEOUT_S: deadline in
# seconds (default 1500); at the deadline the unfinished jobs are cancelled (timeout), and on SIGINT
# or SIGTERM (cancelled).
# Exit: 0 all succeeded, 1 some did not, 2 usage or unknown id (nothing waited for), 3 Modal
# unavailable, 130/143 interrupted.
set -euo pipefail
case ${1:-} in -h | --help) sed -n '2,/^set -/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
here=$(cd "$(dirname "$0")" && pwd)
py=$(git -C "$here" rev-parse --show-toplevel 2>/dev/null)/.venv/bin/python  # needs the modal package
[[ -x $py ]] || py=python3
exec "$py" "$here/app.py" wait-jobs.sh "$@"
