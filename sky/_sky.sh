# shellcheck shell=bash disable=SC2016  # jq programs are single-quoted on purpose
# _sky.sh -- the SkyPilot backend's job records and its calls to the `sky` CLI (sourced after
# _lib.sh, never run).
#
# A job is a directory ${AR_STATE_DIR:-<repo>/.ar}/sky/jobs/<id>/ (see sky/README.md). Until its
# SkyPilot job exists, the job's supervisor (_sky-job.sh, which runs `sky launch`, `sky exec` or
# `sky jobs launch`) holds an flock on alive.lock; afterwards the job lives on SkyPilot's side:
#   pool mode (default)       on its cluster; `sky logs CLUSTER N --status` says how it is doing
#   managed mode              a managed job (AR_SKY_MANAGED=1); `sky jobs queue -o json` says
# Records (meta.json, state, .lock): the ar_* helpers of _lib.sh.

sk_alive() { ! flock -n "$1/alive.lock" true 2>/dev/null; }  # true while the supervisor lives
sk_managed() { [[ $(jq -r '.managed // false' "$1/meta.json") == true ]]; }  # a managed job (sky jobs)?
sk_handle() {  # how SkyPilot knows the job: `managed job N` or `CLUSTER:N`
    if sk_managed "$1"; then
        printf 'managed job %s\n' "$(ar_meta "$1" '.sky_job_id // "?"')"
    else
        printf '%s:%s\n' "$(ar_meta "$1" .cluster)" "$(ar_meta "$1" '.sky_job_id // "?"')"
    fi
}

sk_note() { printf '[ar-sky] %s %s\n' "$(ar_now)" "$2" >>"$1/log"; }  # sk_note DIR MESSAGE

# ---- the sky CLI ---------------------------------------------------------------------------------
# Every call runs from one stable directory: SkyPilot's local API server remembers the directory it
# was started from, so starting it from a temporary checkout that later disappears breaks it.
# fds 7-9 (our locks) are closed for it: a daemon it starts (its API server) must not hold them.
# Calls other than launch/exec (which provision, and run in a killable supervisor) get a time limit,
# so a hung API server cannot stall a wait past its deadline.
sk_sky() {
    local limit=()
    case "$1 ${2:-}" in "launch "* | "exec "* | "jobs launch") ;;
        *) limit=(timeout --foreground -k 10 "${AR_SKY_CALL_TIMEOUT_S:-180}") ;; esac
    (cd "${AR_SKY_CWD:-${HOME:-/}}" && exec "${limit[@]}" sky "$@") </dev/null 7>&- 8>&- 9>&-
}

# sk_strip -- stdin to stdout without ANSI colour codes, carriage returns and SkyPilot's line
# prefixes: `(task, pid=1234) `, `(setup pid=1234) `, `(worker1, rank=1, pid=99, ip=10.0.0.2) `.
sk_strip() {
    sed -E -e $'s#\x1b\\[[0-9;?]*[ -/]*[@-~]##g' -e $'s#\x1b[]][^\a]*\a##g' -e $'s#\r$##' \
        -e 's#^\([^()]*pid=[0-9]+[^()]*\) ?##'
}

sk_submitted_id() {  # the N of the last `Job submitted, ID: N` (or `Managed Job ID: N`) on stdin, or nothing
    sk_strip | sed -nE 's/.*(Job submitted, ID|Managed Job ID): ([0-9]+)[[:space:]]*$/\2/p' | tail -n 1
}

sk_cluster_status() {  # UP | STOPPED | INIT of cluster $1, or nothing when it does not exist
    local out
    out=$(sk_sky status -o json "$1" 2>/dev/null) || return 1
    jq -r --arg c "$1" '[.[] | select(.name == $c) | .status][0] // empty' <<<"$out" 2>/dev/null
}

sk_job_by_name() {  # sk_job_by_name CLUSTER NAME -- the SkyPilot job id of task NAME on CLUSTER
    local out
    out=$(sk_sky queue -o json "$1" 2>/dev/null) || return 0
    sed -n '/^{/,$p' <<<"$out" | jq -r --arg c "$1" --arg n "$2" \
        '[(.[$c] // [])[] | select(.job_name == $n) | .job_id] | max // empty' 2>/dev/null || true
}

# ---- managed jobs: `sky jobs queue -o json` -------------------------------------------------------
# One listing serves every job looked at in one pass (wait-jobs.sh calls sk_mq_forget per poll):
# the unfinished jobs first (short), all jobs (-a -v: with failure reasons) only for a job not in it.
sk_mq_forget() { unset SK_MQ_ACTIVE SK_MQ_ALL; }
sk_mq() {  # sk_mq [ARGS] -- the JSON list `sky jobs queue -o json ARGS` prints; 1 if it is not one
    local out
    out=$(sk_sky jobs queue -o json "$@" 2>/dev/null) || return 1
    out=$(sed -n '/^\[/,$p' <<<"$out")
    jq -e 'type == "array"' >/dev/null 2>&1 <<<"$out" || return 1
    printf '%s\n' "$out"
}
# sk_mjob N -- sets SK_REC to managed job N's record (one line of JSON; empty when it is not listed,
# yet or any more). Returns 1, SK_REC unset, when SkyPilot gave no JSON list (ask again later).
sk_mjob() {
    local pick='first(.[] | select(.job_id == $j and (.task_id // 0) == 0)) // empty'
    unset SK_REC
    if [[ -z ${SK_MQ_ACTIVE+set} ]]; then SK_MQ_ACTIVE=$(sk_mq --skip-finished) || { unset SK_MQ_ACTIVE; return 1; }; fi
    SK_REC=$(jq -c --argjson j "$1" "$pick" <<<"$SK_MQ_ACTIVE")
    [[ -z $SK_REC ]] || return 0
    if [[ -z ${SK_MQ_ALL+set} ]]; then SK_MQ_ALL=$(sk_mq -a -v) || { unset SK_MQ_ALL SK_REC; return 1; }; fi
    SK_REC=$(jq -c --argjson j "$1" "$pick" <<<"$SK_MQ_ALL")
}
sk_mjob_by_name() {  # sk_mjob_by_name NAME -- the newest unfinished managed job of that name, or nothing
    local out
    out=$(sk_mq -a) || return 0
    jq -r --arg n "$1" '[.[] | select(.job_name == $n and (.status | test("^(SUCCEEDED|CANCELLED|FAILED.*)$") | not))
        | .job_id] | max // empty' <<<"$out" 2>/dev/null || true
}

# ---- refreshing a record from SkyPilot -----------------------------------------------------------
# sk_refresh DIR -- bring a queued/running record up to date: a supervisor that died before its
# SkyPilot job existed -> failed; otherwise ask `sky logs CLUSTER N --status` and, once the job has
# ended, fetch its log (sk_finalize).
sk_refresh() {
    local dir=$1 st cluster jid out rc sky_st cst
    st=$(ar_state "$dir")
    [[ $st == queued || $st == running ]] || return 0
    jid=$(ar_meta "$dir" '.sky_job_id // empty')
    cluster=$(ar_meta "$dir" .cluster)
    if [[ -z $jid ]]; then
        sk_alive "$dir" && return 0
        jid=$(ar_meta "$dir" '.sky_job_id // empty')  # recorded just before the supervisor exited
        if [[ -z $jid ]]; then  # a supervisor killed after `sky launch` printed the id: adopt it
            jid=$(sk_submitted_id <"$dir/submit.log" 2>/dev/null || true)
            [[ -z $jid ]] || ar_meta_set "$dir" '.sky_job_id = $j' --arg j "$jid"
        fi
        if [[ -z $jid ]]; then
            if ar_transition "$dir" failed queued running; then
                if sk_managed "$dir"; then
                    sk_note "$dir" "failed: no managed job was created; output of sky jobs launch:"
                else
                    sk_note "$dir" "failed: no SkyPilot job was created on $cluster; output of sky $(ar_meta "$dir" '.mode // "launch"'):"
                fi
                sk_strip <"$dir/submit.log" 2>/dev/null | tail -n 20 >>"$dir/log" || true
                sk_managed "$dir" || sk_reap_cluster "$dir"
            fi
            return 0
        fi
    fi
    if sk_managed "$dir"; then
        sk_refresh_managed "$dir" "$jid"
        return 0
    fi
    rc=0
    out=$(sk_sky logs "$cluster" "$jid" --status 2>&1) || rc=$?
    sky_st=$(sk_strip <<<"$out" | sed -nE 's/^Job [0-9]+: ([A-Z_]+).*/\1/p' | tail -n 1)
    case $rc in
        0) sky_st=SUCCEEDED ;;
        100) [[ $sky_st == FAILED* ]] || sky_st=FAILED ;;
        101) [[ -n $sky_st ]] || sky_st=RUNNING ;;
        102) sky_st=NOT_FOUND ;;
        103) sky_st=CANCELLED ;;
        *)
            if [[ -z $sky_st || $sky_st == None ]]; then  # no answer: is the cluster still there?
                cst=$(sk_cluster_status "$cluster") || return 0  # SkyPilot unreachable: ask again later
                # absent, or stopped (no job runs on a stopped cluster): the job is lost with it
                [[ -z $cst || $cst == STOPPED ]] || return 0
                sky_st=CLUSTER_GONE
            fi ;;
    esac
    ar_meta_set "$dir" '.sky_status = $s' --arg s "$sky_st"
    case $sky_st in
        INIT | PENDING | SETTING_UP) return 0 ;;
        RUNNING)
            ar_transition "$dir" running queued || true
            return 0 ;;
    esac
    sk_finalize "$dir" "$sky_st"
}

# sk_refresh_managed DIR N -- the same for a managed job, from its `sky jobs queue` record. A job not
# listed yet (the controller can list a new job late) stays queued for AR_SKY_LISTING_GRACE_S after
# its launch; RECOVERING (preempted, being relaunched elsewhere) counts as running.
sk_refresh_managed() {
    local dir=$1 jid=$2 sky_st recov old since
    sk_mjob "$jid" || return 0  # no answer: ask again later
    if [[ -z $SK_REC ]]; then
        since=$(ar_meta "$dir" '.launched_epoch // 0')
        (( $(date +%s) - since >= ${AR_SKY_LISTING_GRACE_S:-120} )) || return 0
        sky_st=NOT_FOUND recov=0
    else
        IFS='|' read -r sky_st recov < <(jq -r '[.status // "UNKNOWN", .recovery_count // 0] | map(tostring) | join("|")' <<<"$SK_REC")
    fi
    old=$(ar_meta "$dir" '.recovery_count // 0')
    ar_meta_set "$dir" '.sky_status = $s | .recovery_count = ($r | tonumber) | .failure_reason = $f' \
        --arg s "$sky_st" --arg r "$recov" --arg f "$(jq -r '.failure_reason // empty' <<<"${SK_REC:-null}")"
    if ((recov > old)); then
        sk_note "$dir" "managed job $jid was preempted or its cluster failed: SkyPilot recovered it (recovery $recov); the experiment restarted from the beginning"
    fi
    case $sky_st in
        RUNNING | RECOVERING | WINDING_DOWN) ar_transition "$dir" running queued || true ;;
        SUCCEEDED | CANCELLED | FAILED* | NOT_FOUND) sk_finalize "$dir" "$sky_st" ;;
        *) ;;  # PENDING, SUBMITTED, STARTING, CANCELLING: not decided yet
    esac
}

# sk_finalize DIR SKY_STATUS -- the job has ended on its cluster: fetch its full log (without the
# line prefixes), then record succeeded (SkyPilot SUCCEEDED: the run exited 0), cancelled or failed.
# Never overwrites a terminal state.
sk_finalize() {
    local dir=$1 sky_st=$2 cluster jid out final i
    cluster=$(ar_meta "$dir" .cluster)
    jid=$(ar_meta "$dir" .sky_job_id)
    out=""
    if [[ $sky_st != CLUSTER_GONE && $sky_st != NOT_FOUND ]]; then
        for i in 1 2 3; do
            sk_fetch_log "$dir" && { out=yes; break; }
            sleep "$i"
        done
    fi
    case $sky_st in
        SUCCEEDED) final=succeeded ;;
        CANCELLED) final=cancelled ;;
        *) final=failed ;;
    esac
    if ar_transition "$dir" "$final" queued running; then
        local why
        why=$(ar_meta "$dir" '.failure_reason // empty')
        case $sky_st in
            CLUSTER_GONE) sk_note "$dir" "failed: cluster $cluster is gone (torn down, autodowned or preempted) before the job's end was seen" ;;
            NOT_FOUND) sk_note "$dir" "failed: SkyPilot $(sk_handle "$dir") is not listed any more (sky queue / sky jobs queue -a)" ;;
            *) sk_note "$dir" "SkyPilot $(sk_handle "$dir") ended $sky_st${why:+ ($why)} -> $final" ;;
        esac
        [[ -n $out || $sky_st == CLUSTER_GONE || $sky_st == NOT_FOUND ]] \
            || sk_note "$dir" "warning: could not fetch the log ($(sk_log_cmd "$dir"))"
        sk_managed "$dir" || [[ $sky_st != FAILED_SETUP && $sky_st != FAILED_DRIVER ]] || sk_reap_cluster "$dir"
    fi
}

# sk_log_cmd DIR -- the sky command line that prints the job's whole log, as words (for messages).
# `--tail 0`: the CLI's default is the last 1000 lines.
sk_log_cmd() {
    if sk_managed "$1"; then
        echo "sky jobs logs $(ar_meta "$1" .sky_job_id) --no-follow --tail 0"
    else
        echo "sky logs $(ar_meta "$1" .cluster) $(ar_meta "$1" .sky_job_id) --no-follow --tail 0"
    fi
}
sk_remote_log() {  # sk_remote_log DIR -- the job's log as SkyPilot has it so far (raw)
    if sk_managed "$1"; then
        sk_sky jobs logs "$(ar_meta "$1" .sky_job_id)" --no-follow --tail 0
    else
        sk_sky logs "$(ar_meta "$1" .cluster)" "$(ar_meta "$1" .sky_job_id)" --no-follow --tail 0
    fi
}

# sk_fetch_log DIR -- append the SkyPilot job's whole log (without line prefixes) to DIR/log.
sk_fetch_log() {
    local dir=$1 out
    out=$(sk_remote_log "$dir" 2>/dev/null) || return 1
    [[ -n $out ]] || return 0
    sk_strip <<<"$out" >>"$dir/log"
}

# sk_reap_cluster DIR -- after a launch or setup failure SkyPilot keeps the cluster up for debugging
# (no autodown): tear it down unless another job of ours still needs it.
sk_reap_cluster() {
    local dir=$1 cluster root other
    cluster=$(ar_meta "$dir" .cluster)
    root=$(dirname "$(dirname "$dir")")
    for other in "$root"/jobs/*/; do
        other=${other%/}
        [[ $other != "$dir" && -f $other/meta.json ]] || continue
        case $(ar_state "$other") in queued | running) ;; *) continue ;; esac
        [[ $(ar_meta "$other" .cluster) != "$cluster" ]] || return 0
    done
    [[ -n $(sk_cluster_status "$cluster") ]] || return 0
    sk_note "$dir" "tearing down $cluster (SkyPilot keeps a cluster whose setup failed): sky down -y $cluster"
    sk_sky down -y --async "$cluster" >>"$dir/submit.log" 2>&1 || sk_note "$dir" "warning: sky down $cluster failed; run it yourself"
}

# ---- cancelling ------------------------------------------------------------------------------------
# sk_cancel DIR STATE REASON -- mark a queued/running job STATE (cancelled|timeout) and cancel it:
# `sky cancel` once it is a SkyPilot job, else stop its supervisor (whose trap cancels whatever its
# `sky launch`/`sky exec` managed to create). Returns 1 when the job was already terminal, 4 when a
# cancel could not be confirmed.
sk_cancel() {
    local dir=$1 to=$2 reason=$3 pgid i
    ar_transition "$dir" "$to" queued running || return 1
    sk_note "$dir" "$to: $reason"
    if [[ -z $(ar_meta "$dir" '.sky_job_id // empty') ]] && sk_alive "$dir"; then
        pgid=$(cat "$dir/pid" 2>/dev/null || true)
        [[ ! $pgid =~ ^[0-9]+$ || $pgid -le 1 ]] || kill -TERM -- "-$pgid" 2>/dev/null || true
        for ((i = 0; i < ${AR_SKY_KILL_GRACE_S:-30} * 10; i++)); do
            sk_alive "$dir" || break
            sleep 0.1
        done
        if sk_alive "$dir" && [[ $pgid =~ ^[0-9]+$ && $pgid -gt 1 ]]; then
            kill -KILL -- "-$pgid" 2>/dev/null || true
        fi
    fi
    local rc=0
    sk_cancel_remote "$dir" || rc=$?
    [[ -z $(ar_meta "$dir" '.sky_job_id // empty') ]] || sk_fetch_log "$dir" || true
    return "$rc"
}

# sk_cancel_order DIR... -- the dirs, those whose SkyPilot job does not exist yet first: cancelling a
# running managed job first would free a slot that a waiting supervisor could launch into.
sk_cancel_order() {
    local d
    for d in "$@"; do [[ -n $(ar_meta "$d" '.sky_job_id // empty') ]] || printf '%s\n' "$d"; done
    for d in "$@"; do [[ -z $(ar_meta "$d" '.sky_job_id // empty') ]] || printf '%s\n' "$d"; done
}

# sk_cancel_remote DIR -- cancel the job's SkyPilot job (if any) with retries: `sky cancel -y CLUSTER N`,
# or `sky jobs cancel -y N` for a managed job (which also tears its cluster down). 4 if it failed.
sk_cancel_remote() {
    local dir=$1 cluster jid i out cmd
    cluster=$(ar_meta "$dir" .cluster)
    jid=$(ar_meta "$dir" '.sky_job_id // empty')
    [[ -n $jid ]] || return 0
    if sk_managed "$dir"; then cmd=(jobs cancel -y "$jid"); else cmd=(cancel -y "$cluster" "$jid"); fi
    for i in 1 2 3; do
        if out=$(sk_sky "${cmd[@]}" 2>&1); then
            sk_note "$dir" "sky ${cmd[*]}: done"
            return 0
        fi
        sk_managed "$dir" || [[ -n $(sk_cluster_status "$cluster") ]] || return 0  # no cluster, no job
        sleep "$i"
    done
    sk_note "$dir" "warning: sky ${cmd[*]} failed: $(sk_strip <<<"$out" | tail -n 1)"
    ar_warn "could not cancel SkyPilot $(sk_handle "$dir") ($(basename "$dir")); run: sky ${cmd[*]}"
    return 4
}

# sk_managed_in_flight ROOT POOL SELF -- how many managed jobs of POOL (other than SELF) SkyPilot has
# and has not finished (their records refreshed first). The cap SKY_MAX_CLUSTERS applies to these.
sk_managed_in_flight() {
    local root=$1 pool=$2 self=$3 d n=0
    for d in "$root"/jobs/*/; do
        d=${d%/}
        [[ -f $d/meta.json && $(basename "$d") != "$self" ]] || continue
        case $(ar_state "$d") in queued | running) ;; *) continue ;; esac
        [[ $(jq -r 'select(.managed == true and .sky_job_id != null) | .pool' "$d/meta.json") == "$pool" ]] || continue
        sk_refresh "$d"
        case $(ar_state "$d") in queued | running) n=$((n + 1)) ;; esac
    done
    echo "$n"
}
