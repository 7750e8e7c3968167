#!/usr/bin/env bash
# wait-jobs.sh -- wait for VESSL jobs to end; print each one's result as it ends.
#
# Usage: batch-job/wait-jobs.sh SLUG...
#
# stdout, per job as it ends: `=== SLUG (STATE) ===` (succeeded, failed, timeout, cancelled), then the
# summary block of a succeeded job (the last line `---` and the `key: value` lines right after it, read
# from `vesslctl job logs`), else the last 40 lines of its log and a `note:` line. stderr: one line per
# state change (VESSL's own state words). AR_TIMEOUT_S: deadline in seconds, default 1500. At the
# deadline the unfinished jobs are terminated (timeout: recorded as ar-ended/<slug> on the volume, so a
# later wait says so too), and on SIGINT or SIGTERM (cancelled).
# Exit: 0 all succeeded, 1 some did not, 2 usage or unknown id (nothing waited for), 3 vesslctl or jq
# missing or VESSL cannot be asked, 130/143 interrupted.
set -euo pipefail
sig=""
trap 'sig=INT' INT; trap 'sig=TERM' TERM  # first thing: a signal during the setup still terminates
me=wait-jobs.sh here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=batch-job/_vessl.sh
. "$here/_vessl.sh"
case ${1:-} in
    -h | --help) help ;;
    "" | -*) die 2 "usage: $me SLUG... (see --help)" ;;
esac
timeout=${AR_TIMEOUT_S:-1500}
[[ $timeout =~ ^[0-9]{1,9}$ ]] || die 2 "bad AR_TIMEOUT_S '$timeout': a number of seconds"
declare -A seen=()
ids=()
for id; do
    seen[$id]=$(native "$id") || exit  # every id is checked before anything is waited for
    echo "$me: $id: ${seen[$id]}" >&2
    [[ " ${ids[*]} " == *" $id "* ]] || ids+=("$id")
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
ended() {  # ended SLUG -- the ar-ended/<slug> record on the volume ("timeout AR_TIMEOUT_S=N"), if any
    [[ -n $VOLUME ]] || return 0
    vesslctl volume download "$VOLUME" "$tmp/$1" --remote-prefix "ar-ended/$1" >/dev/null 2>&1 </dev/null || true
    find "$tmp/$1" -type f -name "$1" -exec cat {} + 2>/dev/null || true
}
block() {  # block SLUG STATE [NOTE] -- the job's block on stdout
    local log summary=""
    log=$(vesslctl job logs --limit 1000 "$1" 2>&1 </dev/null) || log="(vesslctl job logs failed: ${log%%$'\n'*})"
    echo "=== $1 ($2) ==="
    [[ $2 != succeeded ]] || summary=$(awk '$0 == "---" { c = $0; on = 1; next }
        on && /^[A-Za-z_][A-Za-z0-9_]*:[ \t]+[^ \t]/ { c = c "\n" $0; b = c; next } { on = 0 } END { print b }' <<<"$log")
    if [[ -n $summary ]]; then echo "$summary"; return 0; fi
    tail -n 40 <<<"$log" | awk '{ sub(/\r+$/, ""); sub(/.*\r/, "") } 1'  # a \r progress line: its last frame
    echo "note: ${3:-VESSL state ${seen[$1]}}"
}
report() {  # report SLUG [TIMED_OUT] -- the block of an ended job; returns 1 when it did not succeed
    local st note="" rec
    st=$(state "${seen[$1]}")
    if [[ $st == cancelled ]]; then
        note="cancelled (vesslctl job terminate)"
        rec=${2:+timeout AR_TIMEOUT_S=$timeout}
        rec=${rec:-$(ended "$1")}
        if [[ $rec == timeout* ]]; then st=timeout note="cancelled at the deadline (${rec#timeout })"; fi
    fi
    [[ $st != succeeded ]] || note="exit code 0 but no summary block in the log"
    block "$1" "$st" "$note"
    [[ $st == succeeded ]]
}
echo "$me: waiting for ${#ids[@]} job(s), up to ${timeout}s" >&2
pending=("${ids[@]}") failed=0 start=$SECONDS deadline=$((SECONDS + timeout + 1))  # SECONDS ticks on whole seconds: never early
while :; do
    left=()
    for id in "${pending[@]}"; do
        native=$(native "$id" 2>"$tmp/err") || { echo "$me: $id: $(cat "$tmp/err"), asking again" >&2; left+=("$id"); continue; }
        [[ $native == "${seen[$id]}" ]] || echo "$me: $id: ${seen[$id]} -> $native" >&2
        seen[$id]=$native
        case $(state "$native") in queued | running) left+=("$id") ;; *) report "$id" || failed=1 ;; esac
    done
    pending=("${left[@]}")
    if ((!${#pending[@]})); then break
    elif [[ -n $sig ]] || ((SECONDS >= deadline)); then
        trap '' INT TERM  # nothing interrupts the terminate (a second Ctrl-C included)
        for id in "${pending[@]}"; do  # the deadline: recorded first, so whoever sees the job ended knows why
            [[ -n $sig || -z $VOLUME ]] || { mkdir -p "$tmp/up" && echo "timeout AR_TIMEOUT_S=$timeout" >"$tmp/up/$id"
                vesslctl volume upload "$VOLUME" "$tmp/up/$id" --remote-prefix ar-ended/ >/dev/null 2>&1 </dev/null || true; }
        done
        "$here/cancel-jobs.sh" "${pending[@]}" || failed=3
        late="" as=cancelled
        [[ -n $sig ]] || late=1 as=timeout
        for id in "${pending[@]}"; do  # as they ended: one that succeeded a moment before stays succeeded
            if s=$(native "$id"); then seen[$id]=$s; fi
            case $(state "${seen[$id]}") in
                queued | running) block "$id" "$as" "NOT terminated: batch-job/cancel-jobs.sh $id" ;;
                *) report "$id" "$late" || ((failed)) || failed=1 ;;
            esac
        done
        break
    else
        nap=$((200 + (SECONDS - start) * 100))  # ms: 0.2 s at first, 1.2 s after 10 s, at most 15 s
        sleep "$((nap > 15000 ? 15 : nap / 1000)).$(printf %03d $((nap > 15000 ? 0 : nap % 1000)))" &
        wait "$!" || true  # returns at once on a signal
    fi
done
case $sig in INT) exit 130 ;; TERM) exit 143 ;; esac
exit "$failed"
