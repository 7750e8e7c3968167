# shellcheck shell=bash
# _lib.sh -- helpers shared by the fan-out scripts of a backend (sourced, never run).
#
# Backend-neutral: argument checks, job names, the summary block of wait-jobs.sh, messages. Every
# backend folder carries a verbatim copy, so a folder can be copied and read on its own.
# The calling script sets AR_PROG (its name, for messages) before using these.
# The contract these implement: docs/contract.md.

AR_PROG=${AR_PROG:-ar}
AR_TAG_RE='^[a-z0-9][a-z0-9-]{0,19}$'
AR_NAME_RE='^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$'
AR_ID_RE='^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$'
AR_TERMINAL_STATES=" succeeded failed timeout cancelled "

# ---- messages ------------------------------------------------------------------------------------
ar_now() { date -u +%Y-%m-%dT%H:%M:%SZ; }
ar_log() { printf '%s %s: %s\n' "$(ar_now)" "$AR_PROG" "$*" >&2; }
ar_warn() { printf '%s: %s\n' "$AR_PROG" "$*" >&2; }
ar_die() {  # ar_die CODE MESSAGE -- one line on stderr, then exit CODE
    local code=$1
    shift
    printf '%s: error: %s\n' "$AR_PROG" "$*" >&2
    exit "$code"
}
ar_usage() {  # print the header comment of script $1 (line 2 up to the first non-comment line)
    awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$1"
}
ar_need() {  # ar_need CMD... -- exit 3 naming what to install
    local cmd
    for cmd in "$@"; do
        command -v "$cmd" >/dev/null 2>&1 || ar_die 3 "'$cmd' not found; install it (e.g. apt-get install $cmd)"
    done
}
ar_is_terminal() { [[ $AR_TERMINAL_STATES == *" $1 "* ]]; }

# ---- job records ---------------------------------------------------------------------------------
# A backend keeps one directory per job, ROOT/jobs/<id>/, with meta.json, state (one word: queued,
# running, succeeded, failed, timeout, cancelled) and .lock, under which the state changes.
ar_state_root() {  # ar_state_root REPO BACKEND -- ${AR_STATE_DIR:-REPO/.ar}/BACKEND, absolute
    local dir=${AR_STATE_DIR:-$1/.ar}
    [[ $dir == /* ]] || dir=$PWD/$dir
    printf '%s/%s\n' "$dir" "$2"
}
ar_state() { cat "$1/state" 2>/dev/null || echo unknown; }  # ar_state DIR
ar_meta() { jq -r "$2" "$1/meta.json"; }  # ar_meta DIR FILTER
ar_job_dir() {  # ar_job_dir ROOT ID [HINT] -- the job's directory; exit 2 (one line) for an unknown id
    [[ $2 =~ $AR_ID_RE && -f $1/jobs/$2/meta.json ]] || ar_die 2 "unknown job id '$2'${3:+ ($3)}"
    printf '%s/jobs/%s\n' "$1" "$2"
}
ar_meta_set() {  # ar_meta_set DIR JQ_FILTER [jq args...] -- update meta.json atomically
    local dir=$1 filter=$2 out
    shift 2
    out=$(jq "$@" "$filter" "$dir/meta.json") && printf '%s\n' "$out" | ar_write "$dir/meta.json"
}
# ar_transition DIR NEW FROM... -- NEW if the current state is one of FROM (atomic, under the job's
# lock; stamps started_at for running, finished_at otherwise, once); returns 1 and changes nothing
# otherwise.
ar_transition() {
    local dir=$1 new=$2 cur fd rc=1 field
    shift 2
    exec {fd}>>"$dir/.lock"
    flock "$fd"
    cur=$(ar_state "$dir")
    if [[ " $* " == *" $cur "* ]]; then
        echo "$new" | ar_write "$dir/state"
        field=finished_at
        [[ $new != running ]] || field=started_at
        # shellcheck disable=SC2016  # a jq program
        ar_meta_set "$dir" '.[$f] = (.[$f] // $t) | .state = $s' --arg f "$field" --arg t "$(ar_now)" --arg s "$new"
        rc=0
    fi
    exec {fd}>&-
    return "$rc"
}

# ---- arguments -----------------------------------------------------------------------------------
# ar_reuse_job ROOT NAME SHA ENV_JSON REFRESH STATE -- the idempotent half of a submit, for a backend that
# keeps ROOT/names/<name> (the latest id of a name) and ROOT/jobs/<id>/meta.json (.commit, .env). REFRESH and
# STATE are the backend's functions taking a job dir. When the latest job of NAME is queued, running or
# succeeded: print its id and exit 0 (exit 2 if it ran another commit or another AR_PROFILE / AR_DATA). Otherwise set
# AR_NEW_ID to a fresh id: NAME, or NAME-2, NAME-3, ... after failed, timed-out or cancelled attempts.
ar_reuse_job() {
    local root=$1 name=$2 sha=$3 env_json=$4 refresh=$5 state=$6 old old_dir st same n
    if [[ -f $root/names/$name ]]; then
        old=$(cat "$root/names/$name")
        if [[ -f $root/jobs/$old/meta.json ]]; then
            old_dir=$root/jobs/$old
            "$refresh" "$old_dir"
            st=$("$state" "$old_dir")
            if [[ $st == queued || $st == running || $st == succeeded ]]; then
                same=$(jq --arg c "$sha" --argjson e "$env_json" '.commit == $c and .env == $e' "$old_dir/meta.json")
                [[ $same == true ]] \
                    || ar_die 2 "name '$name' is taken by job $old ($st) for another commit or AR_PROFILE/AR_DATA; choose another --name"
                ar_warn "$name: already submitted as $old ($st); not starting another"
                echo "$old"
                exit 0
            fi
            ar_warn "$name: the last job $old ended $st; starting a new one"
        fi
    fi
    AR_NEW_ID=$name
    for ((n = 2; ; n++)); do
        [[ -e $root/jobs/$AR_NEW_ID ]] || break
        AR_NEW_ID=$name-$n
    done
}

ar_parse_ids() {  # ar_parse_ids "$@" -- for the ID... scripts: --help prints the usage of $0 and exits 0;
    # no id, or an option, is a one-line error and exit 2. Checking that the ids exist is the backend's job.
    case ${1:-} in
        -h | --help) ar_usage "$0"; exit 0 ;;
        "") ar_die 2 "no job id given (see --help)" ;;
        -*) ar_die 2 "unknown option '$1' (see --help)" ;;
    esac
}
ar_check_ids() {  # ar_check_ids ID... -- exit 2 on a malformed id (existence is the backend's check)
    local id
    for id in "$@"; do
        [[ $id =~ $AR_ID_RE ]] || ar_die 2 "unknown job id '$id'"
    done
}

# ar_parse_submit_args "$@" -- sets AR_ARG_COMMIT and AR_ARG_NAME; exits 0 on --help (usage of $0),
# 2 on anything malformed.
ar_parse_submit_args() {
    AR_ARG_COMMIT="" AR_ARG_NAME=""
    while (($#)); do
        case $1 in
            -h | --help) ar_usage "$0"; exit 0 ;;
            --commit | --name)
                (($# >= 2)) || ar_die 2 "$1 needs a value (see --help)"
                case $1 in
                    --commit) AR_ARG_COMMIT=$2 ;;
                    --name) AR_ARG_NAME=$2 ;;
                esac
                shift 2 ;;
            --commit=* | --name=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
            --env | --env=*) ar_die 2 "--env is gone: a candidate is a commit (edit the constant in the train file and commit it)" ;;
            *) ar_die 2 "unknown argument '$1' (see --help)" ;;
        esac
    done
    [[ -z $AR_ARG_COMMIT || $AR_ARG_COMMIT != -* ]] || ar_die 2 "bad --commit '$AR_ARG_COMMIT'"
    [[ -z $AR_ARG_NAME || $AR_ARG_NAME =~ $AR_NAME_RE ]] \
        || ar_die 2 "bad --name '$AR_ARG_NAME': use lowercase [a-z0-9-], at most 63 characters"
}

# ar_resolve_submit REPO -- after ar_parse_submit_args: resolves the tag, the commit (refusing a
# dirty tree without --commit), what the job gets from this environment and the job name. Sets
# AR_RES_TAG, AR_RES_SHA, AR_RES_PAIRS (sorted KEY=VALUE array: AR_PROFILE / AR_DATA when set here)
# and AR_RES_NAME.
ar_resolve_submit() {
    local repo=$1 rev extra
    AR_RES_TAG=${AR_TAG:-default}
    [[ $AR_RES_TAG =~ $AR_TAG_RE ]] || ar_die 2 "bad AR_TAG '$AR_RES_TAG': must match $AR_TAG_RE"
    git -C "$repo" rev-parse --git-dir >/dev/null 2>&1 || ar_die 2 "$repo is not a git repository"
    rev=${AR_ARG_COMMIT:-HEAD}
    if [[ -z $AR_ARG_COMMIT && -n $(git -C "$repo" status --porcelain --untracked-files=no) ]]; then
        ar_die 2 "the working tree has uncommitted changes; commit them, or pass --commit REV to run a commit as it is"
    fi
    AR_RES_SHA=$(git -C "$repo" rev-parse --verify --quiet "$rev^{commit}") \
        || ar_die 2 "unknown commit '$rev'"
    AR_RES_PAIRS=()
    for extra in AR_DATA AR_PROFILE; do  # sorted
        [[ -z ${!extra:-} ]] || AR_RES_PAIRS+=("$extra=${!extra}")
    done
    for extra in "${AR_RES_PAIRS[@]}"; do
        [[ $extra != *$'\n'* ]] || ar_die 2 "bad ${extra%%=*}: the value contains a newline"
    done
    if [[ -n $AR_ARG_NAME ]]; then
        AR_RES_NAME=$AR_ARG_NAME
    else
        AR_RES_NAME="ar-$AR_RES_TAG-${AR_RES_SHA:0:7}"
        if ((${#AR_RES_PAIRS[@]})); then
            AR_RES_NAME+="-$(printf '%s\n' "${AR_RES_PAIRS[@]}" | sha256sum | cut -c1-8)"
        fi
    fi
}

# ---- timeouts ------------------------------------------------------------------------------------
ar_profile_budget() {  # seconds of training of profile $1 (unknown or empty: full)
    case ${1:-} in
        smoke) echo 5 ;;
        tiny) echo 20 ;;
        *) echo 300 ;;
    esac
}
ar_timeout_s() {  # ar_timeout_s DEFAULT -- $AR_TIMEOUT_S validated, else DEFAULT
    local t=${AR_TIMEOUT_S:-$1}
    [[ $t =~ ^[0-9]+$ && $t -gt 0 ]] || ar_die 2 "bad AR_TIMEOUT_S '$t': a positive number of seconds"
    echo "$t"
}

# ---- the wait loop -------------------------------------------------------------------------------
# The skeleton of every wait-jobs.sh; the backend supplies how to refresh and how to cancel.
AR_SIGNAL=""       # INT or TERM once one came (ar_trap_signals)
AR_WAIT_FAILED=0   # 1 once a waited job ended other than succeeded (ar_wait_loop)
declare -A AR_WAIT_STUCK=()
ar_trap_signals() {  # remember SIGINT/SIGTERM in AR_SIGNAL; install it first (bash drops a SIGINT that
    # arrives while it waits on a child before any trap is set)
    trap 'AR_SIGNAL=INT' INT
    trap 'AR_SIGNAL=TERM' TERM
}
ar_collect_jobs() {  # ar_collect_jobs ROOT HINT ID... -- AR_IDS, AR_DIRS: the distinct ids and their
    # records (exit 2, one line, for an unknown id; HINT is added to that message)
    local root=$1 hint=$2 id
    shift 2
    AR_IDS=() AR_DIRS=()
    for id in "$@"; do
        [[ " ${AR_IDS[*]} " == *" $id "* ]] && continue
        AR_DIRS+=("$(ar_job_dir "$root" "$id" "$hint")")
        AR_IDS+=("$id")
    done
}
# ar_wait_loop TIMEOUT POLL_S REFRESH CANCEL -- wait for the jobs AR_IDS / AR_DIRS. Backend-specific:
#   REFRESH DIR...           bring these records up to date (before the first look and after every
#                            sleep; never once a signal came). Not reaching the backend is its to
#                            report: the loop looks again after the next sleep.
#   CANCEL TO REASON DIR...  cancel these unfinished jobs (-> TO: cancelled or timeout). A job it could
#                            not stop goes in AR_WAIT_STUCK[<id>]=<message>: its block says so.
# Logs each state change on stderr, prints each job's block (ar_print_block) on stdout once it ends,
# cancels what is left at the deadline (-> timeout) or on a signal (-> cancelled). A job not ended after
# three cancel passes is reported stuck. Then `ar_wait_exit`.
ar_wait_loop() {
    local timeout=$1 poll=$2 refresh_fn=$3 cancel_fn=$4 deadline k id dir st reason="" to="" passes=0
    local -a pending still live
    local -A seen=()
    deadline=$((SECONDS + timeout))
    pending=("${!AR_IDS[@]}")
    live=()
    for k in "${pending[@]}"; do ar_is_terminal "$(ar_state "${AR_DIRS[k]}")" || live+=("${AR_DIRS[k]}"); done
    [[ -n $AR_SIGNAL || ${#live[@]} -eq 0 ]] || "$refresh_fn" "${live[@]}"
    while :; do
        still=()
        for k in "${pending[@]}"; do
            id=${AR_IDS[k]} dir=${AR_DIRS[k]}
            st=$(ar_state "$dir")
            if [[ ${seen[$id]:-} != "$st" ]]; then
                ar_log "$id: ${seen[$id]:-submitted} -> $st"
                seen[$id]=$st
            fi
            if ar_is_terminal "$st"; then
                ar_print_block "$id" "$st" "$dir/log"
                [[ $st == succeeded ]] || AR_WAIT_FAILED=1
            elif [[ -n ${AR_WAIT_STUCK[$id]:-} ]]; then
                printf '=== %s (%s) ===\n%s\n' "$id" "${to:-cancelled}" "${AR_WAIT_STUCK[$id]}"
                ar_log "$id: NOT stopped: ${AR_WAIT_STUCK[$id]}"
                AR_WAIT_FAILED=1
            else
                still+=("$k")
            fi
        done
        pending=("${still[@]}")
        ((${#pending[@]})) || break
        live=()
        for k in "${pending[@]}"; do live+=("${AR_DIRS[k]}"); done
        if [[ -n $AR_SIGNAL ]]; then
            to=cancelled reason="wait-jobs.sh got SIG$AR_SIGNAL"
        elif ((SECONDS >= deadline)); then
            to=timeout reason="wait-jobs.sh deadline of ${timeout}s (AR_TIMEOUT_S) passed"
        fi
        if [[ -n $reason ]]; then
            if ((passes++ >= 3)); then  # cancelled three times and still not ended: give up on them
                for k in "${pending[@]}"; do
                    AR_WAIT_STUCK[${AR_IDS[k]}]="[$AR_PROG] could not cancel it, it may still be running: run $(basename "$(dirname "$0")")/cancel-jobs.sh ${AR_IDS[k]}"
                done
                continue
            fi
            ar_log "$reason: cancelling ${#pending[@]} job(s)"
            "$cancel_fn" "$to" "$reason" "${live[@]}"
            ((passes > 1)) || continue  # print what the first pass ended at once
        fi
        sleep "$poll" &
        wait $! || true
        [[ -n $AR_SIGNAL ]] || "$refresh_fn" "${live[@]}"
    done
}
ar_wait_exit() {  # the exit of wait-jobs.sh: 130 / 143 after a signal, else 1 if a job did not succeed
    case $AR_SIGNAL in
        INT) exit 130 ;;
        TERM) exit 143 ;;
    esac
    exit "$AR_WAIT_FAILED"
}

# ---- output --------------------------------------------------------------------------------------
# ar_print_block ID STATE LOG -- one wait-jobs.sh block. A succeeded job prints the summary block of
# LOG: its last line that is exactly `---` and the `key: value` lines right after it (nothing when
# there is none); any other job prints its last 40 log lines.
ar_print_block() {
    local id=$1 state=$2 log=$3 block=""
    printf '=== %s (%s) ===\n' "$id" "$state"
    [[ -f $log ]] || return 0
    if [[ $state == succeeded ]]; then
        block=$(awk '{ sub(/\r$/, ""); l[NR] = $0 } $0 == "---" { d = NR }
            END { if (d) for (i = d + 1; i <= NR && l[i] ~ /^[A-Za-z_][A-Za-z0-9_]*:([ \t]|$)/; i++) {
                if (i == d + 1) print "---"; print l[i] } }' "$log")
    else
        block=$(tail -n 40 "$log")
    fi
    [[ -z $block ]] || printf '%s\n' "$block"
}

# ar_write FILE -- stdin to FILE atomically (temporary file in the same directory, then rename).
ar_write() {
    local tmp="$1.tmp.$$.$RANDOM"
    cat >"$tmp" && mv -f "$tmp" "$1"
}
