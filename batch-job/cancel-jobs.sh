#!/usr/bin/env bash
# cancel-jobs.sh -- terminate VESSL jobs, queued or running; cancelling an ended job changes nothing.
#
# Usage: batch-job/cancel-jobs.sh SLUG...
#
# `vesslctl job terminate` for each job that has not ended, then waits (up to 5 minutes) until VESSL
# reports each one ended: nothing of it runs, nothing bills.
# Exit: 0 (also for jobs that had ended), 1 a job still runs after 5 minutes, 2 usage or unknown id
# (nothing cancelled), 3 vesslctl or jq missing or VESSL cannot be asked.
set -euo pipefail
me=cancel-jobs.sh here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=batch-job/_vessl.sh
. "$here/_vessl.sh"
case ${1:-} in
    -h | --help) help ;;
    "" | -*) die 2 "usage: $me SLUG... (see --help)" ;;
esac
for id; do native "$id" >/dev/null || exit; done  # every id is checked before anything is terminated
bad=0
for id; do
    case $(state "$(native "$id")") in queued | running) terminate "$id" || bad=1 ;; esac
done
for id; do
    for ((i = 0; ; i++)); do
        st=$(state "$(native "$id")")
        [[ $st == queued || $st == running ]] || break
        ((i < 300)) || die 1 "$id: still $st 5 minutes after 'vesslctl job terminate'; check the VESSL console"
        sleep "$((i < 20 ? 0 : 1)).$((i < 20 ? 2 : 0))"
    done
    echo "$me: $id: $st, nothing running" >&2
done
exit "$bad"
