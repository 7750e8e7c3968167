#!/usr/bin/env bash
# wait-jobs.sh -- wait for local jobs to end; print each one's result as it ends.
#
# Usage: local/wait-jobs.sh ID...
#
# stdout, per job as it ends: `=== ID (STATE) ===` (succeeded, failed, timeout, cancelled), then the
# summary block of a succeeded job (the last line `---` and the `key: value` lines right after it),
# else the last 40 lines of its log and a `note:` line. stderr: one line per state change.
# AR_TIMEOUT_S: deadline in seconds, default 1500 per wave (unfinished jobs / slots, rounded up). At
# the deadline the unfinished jobs are cancelled (timeout), and on SIGINT or SIGTERM (cancelled).
# Exit: 0 all succeeded, 1 some did not, 2 usage or unknown id (nothing waited for), 130/143 interrupted.
set -euo pipefail
sig=""
trap 'sig=INT' INT; trap 'sig=TERM' TERM  # first thing: a signal during the setup still cancels
me=wait-jobs.sh here=$(cd "$(dirname "$0")" && pwd)
die() { echo "$me: $2" >&2; exit "$1"; }
case ${1:-} in
    -h | --help) sed -n '2,/^set -/s/^# \{0,1\}//p' "$0"; exit 0 ;;
    "" | -*) die 2 "usage: $me ID... (see --help)" ;;
esac
jobs=$(git -C "$here" rev-parse --show-toplevel)/.ar/local/jobs
ids=()
for id; do
    [[ $id =~ ^[a-z0-9][a-z0-9-]{0,80}$ && -d $jobs/$id ]] || die 2 "unknown job id '$id'"
    [[ " ${ids[*]} " == *" $id "* ]] || ids+=("$id")
done
state() {  # state JOB_DIR -- derived from its files (README.md); the lock is looked at before `ended`
    if flock -n "$1/lock" true && [[ ! -s $1/ended ]]; then echo failed  # no process left, no end recorded
    elif [[ -s $1/ended ]]; then cat "$1/ended"
    elif [[ -e $1/slot ]]; then echo running; else echo queued; fi
}
block() {  # block ID STATE -- the job's block on stdout
    local d=$jobs/$1 summary=""
    echo "=== $1 ($2) ==="
    [[ $2 != succeeded ]] || summary=$(awk '$0 == "---" { c = $0; on = 1; next }
        on && /^[A-Za-z_][A-Za-z0-9_]*:[ \t]+[^ \t]/ { c = c "\n" $0; b = c; next } { on = 0 } END { print b }' "$d/log")
    if [[ -n $summary ]]; then echo "$summary"; return 0; fi
    tail -n 40 "$d/log" | awk '{ sub(/\r+$/, ""); sub(/.*\r/, "") } 1'  # a \r progress line: its last frame
    case $2 in
        succeeded) echo "note: exit code 0 but no summary block in the log" ;;
        timeout) echo "note: cancelled at the deadline (AR_TIMEOUT_S=$timeout)" ;;
        cancelled) echo "note: cancelled" ;;
        *) if [[ -s $d/rc ]]; then echo "note: exit code $(cat "$d/rc")"
           else echo "note: no exit code: the job's processes were killed (kill -9, out of memory, reboot)"; fi ;;
    esac
}
open=0 slots=9999
for id in "${ids[@]}"; do
    case $(state "$jobs/$id") in queued | running) open=$((open + 1)) ;; esac
    s=$(sed -n 3p "$jobs/$id/meta") && slots=$((s < slots ? s : slots))
done
timeout=${AR_TIMEOUT_S:-$((1500 * ((open + slots - 1) / slots)))}
[[ $timeout =~ ^[0-9]{1,9}$ ]] || die 2 "bad AR_TIMEOUT_S '$timeout': a number of seconds"
echo "$me: waiting for ${#ids[@]} job(s), up to ${timeout}s" >&2
declare -A seen=()
pending=("${ids[@]}") failed=0 deadline=$((SECONDS + timeout + 1))  # SECONDS ticks on whole seconds: never early
while :; do
    left=()
    for id in "${pending[@]}"; do
        st=$(state "$jobs/$id")
        [[ $st == "${seen[$id]:-}" ]] || echo "$me: $id: ${seen[$id]:+${seen[$id]} -> }$st" >&2
        seen[$id]=$st
        if [[ $st == queued || $st == running ]]; then left+=("$id"); continue; fi
        block "$id" "$st"
        [[ $st == succeeded ]] || failed=1
    done
    pending=("${left[@]}")
    if ((!${#pending[@]})); then break
    elif [[ -n $sig ]] || ((SECONDS >= deadline)); then
        trap '' INT TERM  # nothing interrupts the cancel (a second Ctrl-C included)
        for id in "${pending[@]}"; do  # the deadline: the first end recorded wins, as in cancel-jobs.sh
            [[ -n $sig ]] || (set -C && echo timeout >"$jobs/$id/ended") 2>/dev/null || true
        done
        "$here/cancel-jobs.sh" "${pending[@]}" || true
    else
        sleep "0.$((SECONDS < 10 ? 2 : 9))" &  # 0.2 s for the first 10 s: quick ends show at once
        wait "$!" || true  # returns at once on a signal
    fi
done
case $sig in INT) exit 130 ;; TERM) exit 143 ;; esac
exit "$failed"
