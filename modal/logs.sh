#!/usr/bin/env bash
# logs.sh -- print a Modal job's whole log so far (the call's stdout, as Modal keeps it).
#
# Usage: modal/logs.sh ID
#
# Exit: 0, 2 usage or unknown id, 3 Modal unavailable.
set -euo pipefail
case ${1:-} in -h | --help) sed -n '2,/^set -/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
here=$(cd "$(dirname "$0")" && pwd)
py=$(git -C "$here" rev-parse --show-toplevel 2>/dev/null)/.venv/bin/python  # needs the modal package
[[ -x $py ]] || py=python3
exec "$py" "$here/app.py" logs.sh "$@"
