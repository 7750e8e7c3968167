#!/usr/bin/env bash
# logs.sh -- print a SkyPilot managed job's whole log so far (the train command's output).
#
# Usage: sky/logs.sh ID
#
# `sky jobs logs --refresh --no-follow ID` (the jobs controller keeps the log after the job's cluster
# is gone), with SkyPilot's own lines, colour and `(task, pid=N) ` prefixes left out. Empty while the
# job is queued. Exit: 0, 2 usage or unknown id, 3 SkyPilot unavailable.
set -euo pipefail
me=logs.sh
die() { echo "$me: $2" >&2; exit "$1"; }
case ${1:-} in
    -h | --help) sed -n '2,/^set -/s/^# \{0,1\}//p' "$0"; exit 0 ;;
    "" | -*) die 2 "usage: $me ID (see --help)" ;;
esac
(($# == 1)) || die 2 "one job id at a time (see --help)"
[[ $1 =~ ^[0-9]{1,9}$ ]] || die 2 "unknown job id '$1' (a managed job id is a number)"
for t in jq sky; do command -v "$t" >/dev/null || die 3 "$t not found: install it (sky/README.md)"; done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if sky jobs queue -o json --refresh -a >"$tmp/q" 2>"$tmp/err"; then
    sed -n '/^\[/,$p' "$tmp/q" | jq -e --argjson i "$1" 'any(.[]; .job_id == $i)' >/dev/null || die 2 "unknown job id '$1'"
elif grep -q "does not exist\|No in-progress managed jobs" "$tmp/q" "$tmp/err"; then die 2 "unknown job id '$1'"
else die 3 "'sky jobs queue' failed ($(tail -n 1 "$tmp/err")): run 'sky check' and 'sky api status'"; fi
# --no-follow exits 0 whatever the job's state (wait-jobs.sh reads the state); the log is what counts
sky jobs logs --refresh --no-follow "$1" >"$tmp/log" 2>"$tmp/err" \
    || die 3 "'sky jobs logs $1' failed ($(tail -n 1 "$tmp/err"))"
sed 's/\x1b\[[0-9;?]*[ -\/]*[@-~]//g' "$tmp/log" \
    | sed -nE '/^\([^()]*pid=[0-9]+[^()]*\) /{s///; s/\r\([^()]*pid=[0-9]+[^()]*\) /\r/g; p}'
