#!/usr/bin/env bash
# _sky-job.sh -- the supervisor of one SkyPilot job (internal; started by submit-async.sh).
#
# Usage: _sky-job.sh JOB_DIR     (run detached with setsid: its process group is the job's)
#
# Waits for its cluster's lock (one launch or exec per cluster at a time), puts the job's snapshot
# into the cluster's workdir (clusters/<cluster>/workdir/jobs/<id>/, next to the snapshots of jobs
# still queued there), then creates the SkyPilot job:
#   the cluster is UP and was set up for this pyproject.toml -> sky exec CLUSTER task.yaml -d ...
#   otherwise (absent, stopped, other stack)                -> sky launch -c CLUSTER task.yaml -d -y
#                                                              -i MIN --down --wait-for jobs ...
# and records `Job submitted, ID: N` as sky_job_id. It exits as soon as the job exists (or the
# launch failed: the job is then failed, with SkyPilot's output in its log). SIGTERM (cancel-jobs.sh)
# stops the sky call and cancels whatever it created.
# A managed job (AR_SKY_MANAGED=1) has no cluster of ours: the supervisor waits until fewer than
# SKY_MAX_CLUSTERS managed jobs of its pool are in flight, then runs
#   sky jobs launch task.yaml -n ID -d -y --workdir <snapshot> [--use-spot] [--job-recovery X] ...
# and records the managed job id.

# shellcheck disable=SC2016  # jq programs are single-quoted on purpose
set -euo pipefail

dir=$1
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=sky/_lib.sh
source "$here/_lib.sh"
# shellcheck source=sky/_sky.sh
source "$here/_sky.sh"
AR_PROG=ar-sky

id=$(ar_meta "$dir" .id)
cluster=$(ar_meta "$dir" .cluster)
root=$(dirname "$(dirname "$dir")")
cdir=$root/clusters/$cluster
child=""
mode=""       # managed once this is a managed job
launching=0   # 1 from the moment `sky jobs launch` may have created the job

record_job() {  # record_job N MODE
    ar_meta_set "$dir" '.sky_job_id = $j | .mode = $m | .launched_epoch = ($t | tonumber)' --arg j "$1" --arg m "$2" \
        --arg t "$(date +%s)"
}

on_signal() {
    trap '' TERM INT HUP
    if [[ -n $child ]]; then
        kill -TERM "$child" 2>/dev/null || true
        wait "$child" 2>/dev/null || true
    fi
    local jid
    jid=$(ar_meta "$dir" '.sky_job_id // empty')
    [[ -n $jid ]] || jid=$(sk_submitted_id <"$dir/submit.log")
    if [[ $mode == managed ]]; then
        [[ -n $jid ]] || jid=$(sk_mjob_by_name "$id")
        if [[ -n $jid ]]; then
            record_job "$jid" managed
            sk_sky jobs cancel -y "$jid" >>"$dir/submit.log" 2>&1 || true
        elif [[ $launching == 1 ]]; then  # not listed (yet): cancel by name, in case it is by now
            sk_sky jobs cancel -y -n "$id" >>"$dir/submit.log" 2>&1 || true
        fi
        exit 143
    fi
    [[ -n $jid ]] || jid=$(sk_job_by_name "$cluster" "$id")
    if [[ -n $jid ]]; then
        record_job "$jid" "${mode:-launch}"
        sk_sky cancel -y "$cluster" "$jid" >>"$dir/submit.log" 2>&1 || true
    fi
    exit 143
}
trap on_signal TERM INT HUP

submit_sky() {  # run `sky "${cmd[@]}"` into submit.log (killable by on_signal); sets rc and jid
    printf '%s sky %s\n' "$(ar_now)" "${cmd[*]}" >>"$dir/submit.log"
    rc=0
    sk_sky "${cmd[@]}" </dev/null >>"$dir/submit.log" 2>&1 &
    child=$!
    wait "$child" || rc=$?
    child=""
    jid=$(sk_submitted_id <"$dir/submit.log")
}

echo "$$" | ar_write "$dir/pid"  # setsid made this shell the leader of the job's process group

# The job's environment on SkyPilot: AR_PROFILE / AR_DATA, forwarded settings, and its identity.
envs=()
while IFS= read -r pair; do
    envs+=(--env "$pair")  # one argv element each: a value is never evaluated by a shell
done < <(jq -r '(.env + .forward) | to_entries[] | "\(.key)=\(.value)"' "$dir/meta.json")
envs+=(--env "EXPERIMENT_ID=$id" --env "AR_SKY_COMMIT=$(ar_meta "$dir" .commit)"
    --env "AR_SKY_TRAIN_SHA256=$(ar_meta "$dir" .train_py_sha256)"
    --env "AR_SKY_MAX_RUNTIME_S=$(ar_meta "$dir" .max_runtime_s)")
gpus=$(ar_meta "$dir" .gpus)
infra=$(ar_meta "$dir" .infra)

# ---- a managed job: wait for a slot of the pool, then `sky jobs launch` ------------------------------
if sk_managed "$dir"; then
    mode=managed
    pool=$(ar_meta "$dir" .pool)
    cap=$(ar_meta "$dir" .max_in_flight)
    exec 7>>"$root/managed-${pool%-}.lock"
    waited=""
    while :; do
        flock 7 &  # in the background, so that a cancel's SIGTERM is handled while waiting
        child=$!
        wait "$child"
        child=""
        [[ $(ar_state "$dir") == queued ]] || exit 0  # cancelled while waiting
        sk_mq_forget
        n=$(sk_managed_in_flight "$root" "$pool" "$id")
        ((n >= cap)) || break
        flock -u 7
        if [[ -z $waited ]]; then
            sk_note "$dir" "waiting: $n managed job(s) of ${pool%-} in flight, SKY_MAX_CLUSTERS=$cap"
            waited=1
        fi
        sleep "${AR_SKY_POLL_S:-10}" &
        child=$!
        wait "$child"
        child=""
    done
    cmd=(jobs launch "$dir/bin/task.yaml" -n "$id" -d -y --workdir "$dir/src" ${gpus:+--gpus "$gpus"} "${envs[@]}"
        ${infra:+--infra "$infra"})
    if [[ $(ar_meta "$dir" .spot) == true ]]; then cmd+=(--use-spot); else cmd+=(--no-use-spot); fi
    recovery=$(ar_meta "$dir" '.recovery // empty')
    [[ -z $recovery ]] || cmd+=(--job-recovery "$recovery")
    launching=1
    submit_sky
    if [[ -z $jid ]]; then
        ar_meta_set "$dir" '.mode = "managed"'
        exit 0  # no managed job: the next sk_refresh records failed with this output (exit $rc)
    fi
    record_job "$jid" managed
    sk_note "$dir" "SkyPilot managed job $jid submitted ($(ar_meta "$dir" .placement))"
    exit 0
fi

# ---- pool mode: this job's cluster ------------------------------------------------------------------
mkdir -p "$cdir/workdir/jobs"
exec 7>>"$cdir/lock"
flock 7 &  # in the background, so that a cancel's SIGTERM is handled while waiting
child=$!
wait "$child"
child=""
flock -n 7 || ar_die 1 "could not take $cdir/lock"
[[ $(ar_state "$dir") == queued ]] || exit 0  # cancelled while waiting for the cluster

# The cluster's workdir: this job's snapshot plus those of its jobs that have not ended.
for d in "$cdir"/workdir/jobs/*/; do
    d=${d%/}
    [[ -d $d ]] || continue
    other=$(basename "$d")
    [[ $other != "$id" ]] || continue
    case $(ar_state "$root/jobs/$other") in queued | running) ;; *) rm -rf "$d" ;; esac
done
rm -rf "$cdir/workdir/jobs/$id" "$cdir/workdir/jobs/.tmp-$id"
cp -a "$dir/src" "$cdir/workdir/jobs/.tmp-$id"
mv "$cdir/workdir/jobs/.tmp-$id" "$cdir/workdir/jobs/$id"

key=$(ar_meta "$dir" .setup_key)
common=("$dir/bin/task.yaml" -d -n "$id" --workdir "$cdir/workdir" ${gpus:+--gpus "$gpus"} "${envs[@]}")

status=$(sk_cluster_status "$cluster" || true)
mode=launch
[[ $status == UP && -f $cdir/setup_key && $(cat "$cdir/setup_key") == "$key" ]] && mode="exec"
[[ $status == UP ]] || rm -f "$cdir/setup_key"

for attempt in 1 2; do
    if [[ $mode == exec ]]; then
        cmd=(exec "$cluster" "${common[@]}")
    else
        cmd=(launch -c "$cluster" "${common[@]}" -y -i "$(ar_meta "$dir" .idle_minutes)" --down
            --wait-for jobs ${infra:+--infra "$infra"})
    fi
    submit_sky
    [[ -z $jid ]] || break
    # An exec can lose a race with the cluster's autodown: launch it again, once.
    [[ $mode == exec && $attempt == 1 ]] || break
    mode=launch
    printf '%s sky exec exited %s without a job; launching instead\n' "$(ar_now)" "$rc" >>"$dir/submit.log"
done

if [[ -z $jid ]]; then
    ar_meta_set "$dir" '.mode = $m' --arg m "$mode"
    exit 0  # no SkyPilot job: the next sk_refresh (the lock is free now) records failed with this output
fi
record_job "$jid" "$mode"
[[ $mode != launch ]] || echo "$key" | ar_write "$cdir/setup_key"
sk_note "$dir" "SkyPilot job $cluster:$jid submitted (sky $mode; $(ar_meta "$dir" .placement))"
