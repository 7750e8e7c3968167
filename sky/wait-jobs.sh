#!/usr/bin/env bash
# wait-jobs.sh -- wait for SkyPilot managed jobs to end; print each one's result as it ends.
#
# Usage: sky/wait-jobs.sh ID...
#
# stdout, per job as it ends: `=== ID (STATE) ===` (succeeded, failed, timeout, cancelled), then the
# summary block of a succeeded job (the last line `---` and the `key: value` lines right after it),
# else the last 40 lines of its log and a `note:` line. stderr: one line per state change.
# Every AR_SKY_POLL_S seconds (default 15) it asks `sky jobs queue --refresh` (which starts a stopped
# jobs controller again); a job that ended gives its log with `sky jobs logs --tail 0`, whose exit
# code is its state. The controller keeps the logs after the job's cluster is gone, so a wait that
# runs hours late still gets every result. AR_TIMEOUT_S: deadline in seconds, default 2100 (1500 +
# 600 for provisioning and setup). At the deadline the unfinished jobs are cancelled (timeout), and
# on SIGINT or SIGTERM (cancelled); .ar/sky-timeouts remembers which cancels were the deadline's.
# Exit: 0 all succeeded, 1 some did not, 2 usage or unknown id (nothing waited for), 3 SkyPilot
#       unavailable, 130/143 interrupted.
set -euo pipefail
sig=""
trap 'sig=INT' INT; trap 'sig=TERM' TERM  # first thing: a signal during the setup still cancels
me=wait-jobs.sh here=$(cd "$(dirname "$0")" && pwd)
die() { echo "$me: $2" >&2; exit "$1"; }
case ${1:-} in
    -h | --help) sed -n '2,/^set -/s/^# \{0,1\}//p' "$0"; exit 0 ;;
    "" | -*) die 2 "usage: $me ID... (see --help)" ;;
esac
for id; do [[ $id =~ ^[0-9]{1,9}$ ]] || die 2 "unknown job id '$id' (a managed job id is a number)"; done
timeout=${AR_TIMEOUT_S:-2100} poll=${AR_SKY_POLL_S:-15}
[[ $timeout =~ ^[0-9]{1,9}$ ]] || die 2 "bad AR_TIMEOUT_S '$timeout': a number of seconds"
[[ $poll =~ ^[0-9]{1,4}(\.[0-9]+)?$ ]] || die 2 "bad AR_SKY_POLL_S '$poll': a number of seconds"
for t in jq sky; do command -v "$t" >/dev/null || die 3 "$t not found: install it (sky/README.md)"; done
ar=$(git -C "$here" rev-parse --show-toplevel 2>/dev/null)/.ar || die 2 "$here is not inside a git repository"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
queue() {  # queue -- this user's managed jobs as JSON into $tmp/q ([] before the first one); 1: no answer
    if sky jobs queue -o json --refresh -a >"$tmp/out" 2>"$tmp/err"; then sed -n '/^\[/,$p' "$tmp/out" >"$tmp/q"
    elif grep -q "does not exist\|No in-progress managed jobs" "$tmp/out" "$tmp/err"; then echo '[]' >"$tmp/q"
    else return 1; fi
}
queue || die 3 "'sky jobs queue' failed ($(tail -n 1 "$tmp/err")): run 'sky check' and 'sky api status'"
ids=()
for id; do
    jq -e --argjson i "$id" 'any(.[]; .job_id == $i)' "$tmp/q" >/dev/null || die 2 "unknown job id '$id'"
    [[ " ${ids[*]} " == *" $id "* ]] || ids+=("$id")
done
own() {  # own FILE -- the lines the job printed, without colour and SkyPilot's `(task, pid=N) ` prefixes
    sed 's/\x1b\[[0-9;?]*[ -\/]*[@-~]//g' "$1" \
        | sed -nE '/^\([^()]*pid=[0-9]+[^()]*\) /{s///; s/\r\([^()]*pid=[0-9]+[^()]*\) /\r/g; p}'
}
block() {  # block ID STATE SKY_STATUS -- the job's block on stdout, from its log in $tmp/log
    local summary=""
    own "$tmp/log" >"$tmp/own"
    echo "=== $1 ($2) ==="
    [[ $2 != succeeded ]] || summary=$(awk '$0 == "---" { c = $0; on = 1; next }
        on && /^[A-Za-z_][A-Za-z0-9_]*:[ \t]+[^ \t]/ { c = c "\n" $0; b = c; next } { on = 0 } END { print b }' "$tmp/own")
    if [[ -n $summary ]]; then echo "$summary"; return 0; fi
    [[ -s $tmp/own ]] || sed 's/\x1b\[[0-9;?]*[ -\/]*[@-~]//g' "$tmp/log" >"$tmp/own"  # it never ran: SkyPilot's words
    tail -n 40 "$tmp/own" | awk '{ sub(/\r+$/, ""); sub(/.*\r/, "") } 1'  # a \r progress line: its last frame
    case $2 in
        succeeded) echo "note: exit code 0 but no summary block in the log" ;;
        timeout) echo "note: cancelled at the deadline (AR_TIMEOUT_S=$timeout)" ;;
        cancelled) echo "note: cancelled" ;;
        *) echo "note: managed job $1 ended $3" ;;
    esac
}
echo "$me: waiting for ${#ids[@]} job(s), up to ${timeout}s" >&2
declare -A seen=() gaveup=()
pending=("${ids[@]}") failed=0 deadline=$((SECONDS + timeout + 1)) hard=""  # SECONDS counts whole seconds
while :; do
    left=()
    if ! queue; then
        echo "$me: 'sky jobs queue' gave no answer ($(tail -n 1 "$tmp/err")); asking again" >&2
        left=("${pending[@]}")
    else
        for id in "${pending[@]}"; do
            st=$(jq -r --argjson i "$id" '[.[] | select(.job_id == $i)][0].status // "UNKNOWN"' "$tmp/q")
            case $st in
                SUCCEEDED | CANCELLED | FAILED*) now="ended ($st)" ;;
                RUNNING | RECOVERING | WINDING_DOWN | CANCELLING) now="running ($st)" ;; *) now="queued ($st)" ;;
            esac
            [[ $now == "${seen[$id]:-}" ]] || echo "$me: $id: ${seen[$id]:+${seen[$id]} -> }$now" >&2
            seen[$id]=$now
            [[ $now == ended* ]] || { left+=("$id"); continue; }
            rc=0 && sky jobs logs --refresh --tail 0 "$id" >"$tmp/log" 2>"$tmp/err" || rc=$?
            case $rc in  # the exit code is the job's state (sky/exceptions.py JobExitCode); the log is kept
                0) state=succeeded ;; 100) state=failed ;; 103) state=cancelled ;;
                *) echo "$me: $id: 'sky jobs logs' exit $rc ($(tail -n 1 "$tmp/err")); asking again" >&2
                   left+=("$id"); continue ;;
            esac
            # a cancel at the deadline is the one fact SkyPilot cannot hold: .ar/sky-timeouts keeps it
            if [[ $state == cancelled ]] && grep -qx "$id" "$ar/sky-timeouts" 2>/dev/null; then state=timeout; fi
            echo "$me: $id: $state" >&2
            block "$id" "$state" "$st"
            [[ $state == succeeded ]] || failed=1
        done
    fi
    pending=("${left[@]}")
    if ((!${#pending[@]})); then break; fi
    if [[ -n $hard ]] && ((SECONDS >= hard)); then  # cancelled, and still not gone 5 minutes later
        for id in "${pending[@]}"; do
            printf '=== %s (%s) ===\nnote: cancel requested, still %s: see sky jobs queue\n' "$id" "${gaveup[$id]}" "${seen[$id]#* }"
        done
        failed=1 && break
    fi
    if [[ -n $hard || -n $sig ]] || ((SECONDS >= deadline)); then  # give up: cancel (again, until they end)
        trap '' INT TERM  # nothing interrupts the cancel (a second Ctrl-C included)
        for id in "${pending[@]}"; do
            [[ -n ${gaveup[$id]:-} ]] || gaveup[$id]=$([[ -n $sig ]] && echo cancelled || echo timeout)
            [[ ${gaveup[$id]} == cancelled ]] || grep -qx "$id" "$ar/sky-timeouts" 2>/dev/null || { mkdir -p "$ar" && echo "$id" >>"$ar/sky-timeouts"; }
        done
        sky jobs cancel -y "${pending[@]}" >"$tmp/out" 2>&1 || echo "$me: 'sky jobs cancel' failed: $(tail -n 1 "$tmp/out")" >&2
        hard=${hard:-$((SECONDS + 300))} poll=$(awk -v p="$poll" 'BEGIN { print (p < 2 ? p : 2) }')
    fi
    sleep "$poll" &
    wait "$!" || true  # returns at once on a signal
done
case $sig in INT) exit 130 ;; TERM) exit 143 ;; esac
exit "$failed"
