#!/usr/bin/env bash
# cancel-jobs.sh -- stop local jobs, queued or running; cancelling an ended job changes nothing.
#
# Usage: local/cancel-jobs.sh ID...
#
# Marks each unfinished job cancelled, sends SIGTERM to its process group, SIGKILL 5 s later if
# anything is left, and returns once no process of the job is left.
# Exit: 0 (also for jobs that had ended), 2 usage or unknown id (nothing cancelled).
set -euo pipefail
me=cancel-jobs.sh here=$(cd "$(dirname "$0")" && pwd)
die() { echo "$me: $2" >&2; exit "$1"; }
case ${1:-} in
    -h | --help) sed -n '2,/^set -/s/^# \{0,1\}//p' "$0"; exit 0 ;;
    "" | -*) die 2 "usage: $me ID... (see --help)" ;;
esac
jobs=$(git -C "$here" rev-parse --show-toplevel)/.ar/local/jobs
for id; do [[ $id =~ ^[a-z0-9][a-z0-9-]{0,80}$ && -d $jobs/$id ]] || die 2 "unknown job id '$id'"; done
for id; do  # a job whose lock is free has no process left: it ended, and stays as it ended
    flock -n "$jobs/$id/lock" true && continue
    (set -C && echo cancelled >"$jobs/$id/ended") 2>/dev/null || true  # the first end recorded wins
    kill -TERM -- "-$(cat "$jobs/$id/pid")" 2>/dev/null || true
done
for id; do  # SIGKILL what is left after 5 s
    if ! flock -w 5 "$jobs/$id/lock" true; then
        kill -KILL -- "-$(cat "$jobs/$id/pid")" 2>/dev/null || true
        flock -w 5 "$jobs/$id/lock" true || die 1 "$id: process group $(cat "$jobs/$id/pid") survives SIGKILL"
    fi
    echo "$me: $id: $(cat "$jobs/$id/ended" 2>/dev/null || echo failed), nothing running" >&2
done
