# shellcheck shell=bash disable=SC2016  # jq programs are single-quoted on purpose
# _local.sh -- the local backend's job records (sourced after _lib.sh, never run).
#
# A job is a directory ${AR_STATE_DIR:-<repo>/.ar}/local/jobs/<id>/ (see local/README.md). Its
# supervisor (_run-job.sh) and the trainer hold an flock on alive.lock for as long as they live,
# so "nobody holds alive.lock" means "no process of this job is left" (a reboot or kill -9 included)
# without trusting pids. State changes happen under an flock on the job's .lock.

al_alive() {  # true while the job's supervisor or trainer is alive
    ! flock -n "$1/alive.lock" true 2>/dev/null
}

al_note() { printf '[ar-local] %s %s\n' "$(ar_now)" "$2" >>"$1/log"; }  # al_note DIR MESSAGE

# al_reap DIR -- a job that is queued or running but has no process left is marked failed.
al_reap() {
    local dir=$1 st
    st=$(ar_state "$dir")
    [[ $st == queued || $st == running ]] || return 0
    al_alive "$dir" && return 0
    if ar_transition "$dir" failed queued running; then
        al_note "$dir" "failed: the job's supervisor died while $st (reboot or kill?)"
    fi
}

# al_cancel DIR STATE REASON -- mark a queued/running job STATE (cancelled|timeout) and send
# SIGTERM to its process group. Returns 1 when the job was already terminal.
al_cancel() {
    local dir=$1 to=$2 reason=$3 pgid
    ar_transition "$dir" "$to" queued running || return 1
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
