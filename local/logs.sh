#!/usr/bin/env bash
# logs.sh -- print a local job's whole log so far (the train command's stdout and stderr).
#
# Usage: local/logs.sh ID
#
# The log is empty while the job is queued. Exit: 0, 2 usage or unknown id.
set -euo pipefail
me=logs.sh here=$(cd "$(dirname "$0")" && pwd)
die() { echo "$me: $2" >&2; exit "$1"; }
case ${1:-} in
    -h | --help) sed -n '2,/^set -/s/^# \{0,1\}//p' "$0"; exit 0 ;;
    "" | -*) die 2 "usage: $me ID (see --help)" ;;
esac
(($# == 1)) || die 2 "one job id at a time (see --help)"
d=$(git -C "$here" rev-parse --show-toplevel)/.ar/local/jobs/$1
[[ $1 =~ ^[a-z0-9][a-z0-9-]{0,80}$ && -d $d ]] || die 2 "unknown job id '$1'"
cat "$d/log"
