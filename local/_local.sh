# shellcheck shell=bash disable=SC2016  # jq programs are single-quoted on purpose
# _local.sh -- the local backend's job records (sourced after _lib.sh, never run).
#
# A job is a directory ${AR_STATE_DIR:-<repo>/.ar}/local/jobs/<id>/ (see local/README.md). Its
# supervisor (_run-job.sh) and the trainer hold an flock on alive.lock for as long as they live,
# so "nobody holds alive.lock" means "no process of this job is left" (a reboot or kill -9 included)
# without trusting pids. State changes happen under an flock on the job's .lock.

al_root() {  # the local backend's state dir, for the repo $1
    local dir=${AR_STATE_DIR:-$1/.ar}
    [[ $dir == /* ]] || dir=$PWD/$dir
    printf '%s/local\n' "$dir"
}
al_state() { cat "$1/state" 2>/dev/null || echo unknown; }
al_meta() { jq -r "$2" "$1/meta.json"; }  # al_meta DIR FILTER

al_job_dir() {  # al_job_dir ROOT ID -- the job's directory; exit 2 (one line) for an unknown id
    [[ $2 =~ $AR_ID_RE && -f $1/jobs/$2/meta.json ]] || ar_die 2 "unknown job id '$2'"
    printf '%s/jobs/%s\n' "$1" "$2"
}

al_alive() {  # true while the job's supervisor or trainer is alive
    ! flock -n "$1/alive.lock" true 2>/dev/null
}

al_note() { printf '[ar-local] %s %s\n' "$(ar_now)" "$2" >>"$1/log"; }  # al_note DIR MESSAGE

al_meta_set() {  # al_meta_set DIR JQ_FILTER [jq args...] -- update meta.json atomically
    local dir=$1 filter=$2 out
    shift 2
    out=$(jq "$@" "$filter" "$dir/meta.json") && printf '%s\n' "$out" | ar_write "$dir/meta.json"
}

# al_transition DIR NEW FROM... -- NEW if the current state is one of FROM (atomic, under the job's
# lock; records the time); returns 1 and changes nothing otherwise.
al_transition() {
    local dir=$1 new=$2 cur fd rc=1 field
    shift 2
    exec {fd}>>"$dir/.lock"
    flock "$fd"
    cur=$(al_state "$dir")
    if [[ " $* " == *" $cur "* ]]; then
        echo "$new" | ar_write "$dir/state"
        field=finished_at
        [[ $new != running ]] || field=started_at
        al_meta_set "$dir" '.[$f] = $t | .state = $s' --arg f "$field" --arg t "$(ar_now)" --arg s "$new"
        rc=0
    fi
    exec {fd}>&-
    return "$rc"
}

# al_reap DIR -- a job that is queued or running but has no process left is marked failed.
al_reap() {
    local dir=$1 st
    st=$(al_state "$dir")
    [[ $st == queued || $st == running ]] || return 0
    al_alive "$dir" && return 0
    if al_transition "$dir" failed queued running; then
        al_note "$dir" "failed: the job's supervisor died while $st (reboot or kill?)"
    fi
}

# al_cancel DIR STATE REASON -- mark a queued/running job STATE (cancelled|timeout) and send
# SIGTERM to its process group. Returns 1 when the job was already terminal.
al_cancel() {
    local dir=$1 to=$2 reason=$3 pgid
    al_transition "$dir" "$to" queued running || return 1
    al_note "$dir" "$to: $reason"
    pgid=$(al_pgid "$dir") && kill -TERM -- "-$pgid" 2>/dev/null || true
}

al_pgid() {  # the supervisor's process group, once it has recorded it (waits up to 2 s)
    local pgid="" i
    for ((i = 0; i < 20; i++)); do
        pgid=$(cat "$1/pid" 2>/dev/null) || pgid=""
        [[ -n $pgid ]] && break
        al_alive "$1" || return 1
        sleep 0.1
    done
    [[ $pgid =~ ^[0-9]+$ && $pgid -gt 1 ]] || return 1
    echo "$pgid"
}

# al_wait_gone DIR [GRACE_S] -- wait until no process of the job is left; SIGKILL after GRACE_S.
al_wait_gone() {
    local dir=$1 grace=${2:-${AR_LOCAL_KILL_GRACE_S:-5}} i pgid
    for ((i = 0; i < grace * 10; i++)); do
        al_alive "$dir" || return 0
        sleep 0.1
    done
    if pgid=$(al_pgid "$dir"); then
        kill -KILL -- "-$pgid" 2>/dev/null || true
    fi
    for ((i = 0; i < 50; i++)); do
        al_alive "$dir" || return 0
        sleep 0.1
    done
    ar_warn "job $(basename "$dir") still has processes holding $dir/alive.lock"
    return 1
}
