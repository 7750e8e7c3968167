#!/usr/bin/env bash
# logs.sh -- print a VESSL job's log so far (`vesslctl job logs --limit 1000`: the job keeps its log
# under 1000 lines, so that is all of it; see batch-job/_job.sh).
#
# Usage: batch-job/logs.sh SLUG
#
# The log is empty while the job is queued. Exit: 0, 2 usage or unknown id, 3 VESSL cannot be asked.
set -euo pipefail
me=logs.sh here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=batch-job/_vessl.sh
. "$here/_vessl.sh"
case ${1:-} in
    -h | --help) help ;;
    "" | -*) die 2 "usage: $me SLUG (see --help)" ;;
esac
(($# == 1)) || die 2 "one job id at a time (see --help)"
[[ $1 =~ $ID_RE ]] || die 2 "unknown job id '$1'"
{ err=$(vesslctl job logs --limit 1000 "$1" </dev/null 2>&1 >&3); } 3>&1 && exit 0  # stdout: the log
[[ ${err,,} != *"not found"* ]] || die 2 "unknown job id '$1'"
die 3 "vesslctl job logs $1: ${err%%$'\n'*}"
