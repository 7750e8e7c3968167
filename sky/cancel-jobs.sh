#!/usr/bin/env bash
# cancel-jobs.sh -- cancel SkyPilot managed jobs; cancelling an ended job changes nothing.
#
# Usage: sky/cancel-jobs.sh ID...
#
# `sky jobs cancel -y` for each unfinished job (SkyPilot tears its cluster down), then returns once
# `sky jobs queue` shows them ended (at most 5 minutes; AR_SKY_POLL_S between looks, default 5).
# Exit: 0 (also for jobs that had ended), 1 a job still not ended after 5 minutes, 2 usage or unknown
#       id (nothing cancelled), 3 SkyPilot unavailable.
set -euo pipefail
me=cancel-jobs.sh
die() { echo "$me: $2" >&2; exit "$1"; }
case ${1:-} in
    -h | --help) sed -n '2,/^set -/s/^# \{0,1\}//p' "$0"; exit 0 ;;
    "" | -*) die 2 "usage: $me ID... (see --help)" ;;
esac
for id; do [[ $id =~ ^[0-9]{1,9}$ ]] || die 2 "unknown job id '$id' (a managed job id is a number)"; done
poll=${AR_SKY_POLL_S:-5}
[[ $poll =~ ^[0-9]{1,4}(\.[0-9]+)?$ ]] || die 2 "bad AR_SKY_POLL_S '$poll': a number of seconds"
for t in jq sky; do command -v "$t" >/dev/null || die 3 "$t not found: install it (sky/README.md)"; done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
queue() {  # queue -- this user's managed jobs as JSON into $tmp/q ([] before the first one)
    if sky jobs queue -o json --refresh -a >"$tmp/out" 2>"$tmp/err"; then sed -n '/^\[/,$p' "$tmp/out" >"$tmp/q"
    elif grep -q "does not exist\|No in-progress managed jobs" "$tmp/out" "$tmp/err"; then echo '[]' >"$tmp/q"
    else die 3 "'sky jobs queue' failed ($(tail -n 1 "$tmp/err")): run 'sky check' and 'sky api status'"; fi
}
status() { jq -r --argjson i "$1" '[.[] | select(.job_id == $i)][0].status // "UNKNOWN"' "$tmp/q"; }
ended() { case $1 in SUCCEEDED | CANCELLED | FAILED*) return 0 ;; *) return 1 ;; esac; }
queue
for id; do [[ $(status "$id") != UNKNOWN ]] || die 2 "unknown job id '$id'"; done
open=()
for id; do ended "$(status "$id")" || open+=("$id"); done
((!${#open[@]})) || sky jobs cancel -y "${open[@]}" >&2 || die 3 "'sky jobs cancel ${open[*]}' failed"
deadline=$((SECONDS + 300))
for id; do
    while ! ended "$(status "$id")"; do
        ((SECONDS < deadline)) || die 1 "$id: still $(status "$id") 5 minutes after the cancel: see sky jobs queue"
        sleep "$poll"
        queue
    done
    echo "$me: $id: $(status "$id"), nothing running" >&2
done
