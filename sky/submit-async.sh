#!/usr/bin/env bash
# submit-async.sh -- submit one experiment to a pool of SkyPilot clusters; prints its job id.
#
# Usage: sky/submit-async.sh [--commit REV] [--name NAME]
#
#   --commit REV     commit to run (default HEAD; without it a dirty working tree is refused)
#   --name NAME      job name instead of ar-<tag>-<shortsha>[-<hash of AR_PROFILE/AR_DATA>]; the
#                    idempotency key
#
# stdout: exactly one line, the job id (the job name; <name>-<n> for a retry after a failure). The
# SkyPilot job behind it (<cluster>:<N>) is in the record's meta.json and in `logs.sh`.
# The same (tag, commit, profile, data) again returns the existing job while it is queued, running or
# succeeded. The job goes to a cluster of the pool ar-<tag>-01 .. ar-<tag>-NN (NN = SKY_MAX_CLUSTERS;
# ar-<tag>-<gpu>-NN with AR_SKY_GPU): an UP cluster with an empty queue (`sky exec`, no setup), else
# a new one (`sky launch -c NAME ... -d -y -i MIN --down --wait-for jobs`), else, all busy and the
# cap reached, it queues on the least loaded one. The launch or exec runs in a detached supervisor,
# so this returns in seconds; a launch failure shows up in wait-jobs.sh as a failed job.
# With AR_SKY_MANAGED=1 the job is a SkyPilot managed job instead (`sky jobs launch -n ID ... -d -y
# [--use-spot]`): its own cluster, spot by default, recovered by SkyPilot after a preemption; at most
# SKY_MAX_CLUSTERS of a pool's managed jobs are in flight at once (the rest wait in their supervisor).
# Exit: 0 submitted, 2 usage/precondition error, 3 backend unavailable (sky, jq, flock missing, or
#       `sky status` failing: run `sky check` / `sky api status`).
#
# Env: AR_TAG (default "default"), AR_PROFILE / AR_DATA (passed to the job and part of its name),
#      SKY_MAX_CLUSTERS (or AR_SKY_MAX_CLUSTERS; pool size, default 4), AR_SKY_GPU (e.g. H200 or
#      H200:1; default: the YAML's H100:1), AR_SKY_INFRA (e.g. k8s, aws, gcp/us-central1; new
#      clusters only), AR_SKY_IDLE_MIN (autodown after this many idle minutes, default 10),
#      AR_SKY_BUCKET / AR_SKY_MOUNT (the storage prepared by sky/prep.yaml and where it is mounted),
#      AR_SKY_PYTHON (an interpreter on the cluster that already has the pinned stack; skips the
#      install), AR_SKY_YAML (default sky/experiment.yaml), AR_SKY_CWD (directory sky runs in,
#      default $HOME), AR_TIMEOUT_S (sets the job's hard limit), AR_STATE_DIR,
#      AR_SKY_MANAGED (1: managed jobs; default 0: the cluster pool), AR_SKY_SPOT (managed jobs on
#      spot GPUs: 1, the default, or 0 for on-demand), AR_SKY_RECOVERY (FAILOVER or EAGER_NEXT_REGION;
#      default: SkyPilot's).
# Contract: docs/contract.md
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
# shellcheck source=sky/_lib.sh
source "$here/_lib.sh"
# shellcheck source=sky/_sky.sh
source "$here/_sky.sh"
AR_PROG=submit-async.sh

ar_parse_submit_args "$@"
ar_need git jq flock setsid sha256sum timeout
ar_resolve_submit "$repo"
tag=$AR_RES_TAG sha=$AR_RES_SHA name=$AR_RES_NAME

# ---- settings --------------------------------------------------------------------------------------
cap=${AR_SKY_MAX_CLUSTERS:-${SKY_MAX_CLUSTERS:-4}}
[[ $cap =~ ^[0-9]+$ && $cap -ge 1 && $cap -le 99 ]] || ar_die 2 "bad SKY_MAX_CLUSTERS '$cap': a number from 1 to 99"
idle=${AR_SKY_IDLE_MIN:-10}
[[ $idle =~ ^[0-9]+$ ]] || ar_die 2 "bad AR_SKY_IDLE_MIN '$idle': whole minutes"
gpu=${AR_SKY_GPU:-} gpus="" slug=""
if [[ -n $gpu ]]; then
    [[ $gpu =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,40}(:[0-9]+)?$ ]] \
        || ar_die 2 "bad AR_SKY_GPU '$gpu': an accelerator like H100, H200 or A100-80GB:1"
    gpus=$gpu
    [[ $gpus == *:* ]] || gpus+=":1"
    slug=$(tr 'A-Z_.' 'a-z--' <<<"${gpu%%:*}")
    [[ ${gpus#*:} == 1 ]] || slug+="x${gpus#*:}"  # H100:8 -> its own pool ar-<tag>-h100x8-NN
fi
infra=${AR_SKY_INFRA:-}
[[ -z $infra || $infra =~ ^[A-Za-z0-9][A-Za-z0-9_./*-]{0,100}$ ]] \
    || ar_die 2 "bad AR_SKY_INFRA '$infra': e.g. k8s, aws, gcp/us-central1"
managed=${AR_SKY_MANAGED:-0} spot=${AR_SKY_SPOT:-1} recovery=${AR_SKY_RECOVERY:-}
[[ $managed == 0 || $managed == 1 ]] || ar_die 2 "bad AR_SKY_MANAGED '$managed': 1 (managed jobs) or 0 (the cluster pool)"
[[ $spot == 0 || $spot == 1 ]] || ar_die 2 "bad AR_SKY_SPOT '$spot': 1 (spot GPUs) or 0 (on-demand)"
recovery=${recovery^^}
[[ -z $recovery || $recovery == FAILOVER || $recovery == EAGER_NEXT_REGION ]] \
    || ar_die 2 "bad AR_SKY_RECOVERY '${AR_SKY_RECOVERY:-}': FAILOVER or EAGER_NEXT_REGION"
if [[ $managed == 0 ]]; then
    [[ -z ${AR_SKY_SPOT:-} && -z $recovery ]] || ar_die 2 "AR_SKY_SPOT and AR_SKY_RECOVERY apply to managed jobs: set AR_SKY_MANAGED=1"
    spot=0
fi
yaml=${AR_SKY_YAML:-$here/experiment.yaml}
[[ -f $yaml ]] || ar_die 2 "task YAML '$yaml' not found (AR_SKY_YAML)"
profile=""
for pair in "${AR_RES_PAIRS[@]}"; do [[ $pair != AR_PROFILE=* ]] || profile=${pair#AR_PROFILE=}; done
budget=$(ar_profile_budget "$profile")
max_runtime=$(( $(ar_timeout_s $((3 * budget + 600))) + 300 ))  # the job's own hard limit

command -v sky >/dev/null 2>&1 || ar_die 3 "'sky' not found: pip install skypilot (then run 'sky check')"

root=$(ar_state_root "$repo" sky)
mkdir -p "$root/jobs" "$root/names" "$root/clusters"
exec 9>>"$root/submit.lock"  # one submit at a time: name lookup, new id and cluster choice stay consistent
flock -w 300 9 || ar_die 3 "another submit holds $root/submit.lock for 5 minutes; is one stuck?"

env_json=$(jq -n '$ARGS.positional | map(index("=") as $i | {(.[:$i]): .[$i + 1:]}) | add // {}' \
    --args "${AR_RES_PAIRS[@]}")

# ---- idempotency: the latest job of this name, unless it failed, timed out or was cancelled --------
ar_reuse_job "$root" "$name" "$sha" "$env_json" sk_refresh ar_state  # prints the id and exits when reusing
id=$AR_NEW_ID

# ---- the cluster: idle UP one > new one under the cap > queue on the least loaded ------------------
prefix="ar-$tag-${slug:+$slug-}"
declare -A pending=() pending_ids=()
for d in "$root"/jobs/*/; do
    d=${d%/}
    [[ -f $d/meta.json ]] || continue
    case $(ar_state "$d") in queued | running) ;; *) continue ;; esac
    [[ -z $(ar_meta "$d" '.sky_job_id // empty') ]] || continue
    sk_alive "$d" || { sk_refresh "$d"; continue; }  # its supervisor died: -> failed
    ! sk_managed "$d" || continue
    c=$(ar_meta "$d" .cluster)
    pending[$c]=$(( ${pending[$c]:-0} + 1 ))
    pending_ids[$c]+=" $(basename "$d") "
done
# The clusters as they are now: asked after reading our records, so that a launch finishing meanwhile
# is seen either as our pending submission or as a job in its (then UP) cluster's queue.
if ! status_out=$(sk_sky status -o json 2>/dev/null); then
    why=$(sk_sky status -o json 2>&1 | sk_strip | grep -v '^[[:space:]]*$' | tail -n 1 || true)
    ar_die 3 "'sky status' failed (${why:-no output}); run 'sky check' and 'sky api status'"
fi
status_json=$(sed -n '/^\[/,$p' <<<"$status_out")
jq -e 'type == "array"' >/dev/null 2>&1 <<<"$status_json" \
    || ar_die 3 "'sky status -o json' printed no JSON list; is this SkyPilot >= 0.10? (pip install skypilot)"
cluster="" how=""
if [[ $managed == 1 ]]; then
    how="managed job ($([[ $spot == 1 ]] && echo spot || echo on-demand), recovery ${recovery:-default}; at most $cap in flight)"
else
    names=() up=()
    declare -A cstat=() load=()
    for ((i = 1; i <= cap; i++)); do
        c=$(printf '%s%02d' "$prefix" "$i")
        names+=("$c")
        cstat[$c]=$(jq -r --arg c "$c" '[.[] | select(.name == $c) | .status][0] // ""' <<<"$status_json")
        load[$c]=${pending[$c]:-0}
        [[ ${cstat[$c]} != UP ]] || up+=("$c")
    done
    if ((${#up[@]})); then  # unfinished jobs in the UP clusters' queues (ours and anyone else's)
        if q=$(sk_sky queue -s -o json "${up[@]}" 2>/dev/null) \
            && counts=$(sed -n '/^{/,$p' <<<"$q" \
                | jq -r 'to_entries[] | .key as $c | .value[] | "\($c) \(.job_name)"' 2>/dev/null); then
            while read -r c job_name; do  # a pending submission of ours that made it meanwhile counts once
                [[ -n $c && -n ${load[$c]+set} && ${pending_ids[$c]:-} != *" $job_name "* ]] || continue
                load[$c]=$(( ${load[$c]} + 1 ))
            done <<<"$counts"
        else  # no queue: count our own unfinished jobs there
            for d in "$root"/jobs/*/; do
                d=${d%/}
                [[ -f $d/meta.json ]] || continue
                case $(ar_state "$d") in queued | running) ;; *) continue ;; esac
                ! sk_managed "$d" || continue
                c=$(ar_meta "$d" .cluster)
                [[ ${cstat[$c]:-} != UP || -z $(ar_meta "$d" '.sky_job_id // empty') ]] || load[$c]=$(( ${load[$c]} + 1 ))
            done
        fi
    fi
    for c in "${names[@]}"; do
        [[ ${cstat[$c]} == UP && ${load[$c]} -eq 0 ]] && { cluster=$c how="idle cluster (sky exec)"; break; }
    done
    if [[ -z $cluster ]]; then
        for c in "${names[@]}"; do
            [[ ${load[$c]} -eq 0 ]] && { cluster=$c how="new cluster (sky launch)"; break; }
        done
    fi
    if [[ -z $cluster ]]; then
        for c in "${names[@]}"; do
            [[ -n $cluster && ${load[$c]} -ge ${load[$cluster]} ]] || cluster=$c
        done
        how="all $cap cluster(s) busy (SKY_MAX_CLUSTERS): queued behind ${load[$cluster]} job(s)"
    fi
fi

# ---- the record: snapshot of the commit, meta.json, state; then the detached supervisor ------------
tmp=$root/jobs/.tmp-$id-$$
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/src" "$tmp/bin"
git -C "$repo" archive --format=tar "$sha" >"$tmp/src.tar"
[[ $(git get-tar-commit-id <"$tmp/src.tar") == "$sha" ]] || ar_die 3 "snapshot of $sha does not carry that commit id"
tar -xf "$tmp/src.tar" -C "$tmp/src"
rm -f "$tmp/src.tar"
[[ -f $tmp/src/trainer/train.py ]] || ar_die 2 "commit ${sha:0:7} has no trainer/train.py"
train_sha=$(sha256sum "$tmp/src/trainer/train.py" | cut -d' ' -f1)
setup_key=$({ cat "$tmp/src/pyproject.toml" 2>/dev/null || true; printf '\n%s\n' "${AR_SKY_PYTHON:-}"; } | sha256sum | cut -c1-16)
cp "$here/_lib.sh" "$here/_sky.sh" "$here/_sky-job.sh" "$tmp/bin/"  # immune to later edits
cp "$yaml" "$tmp/bin/task.yaml"
forward=$(jq -n '$ARGS.named | with_entries(select(.value != ""))' --arg AR_SKY_BUCKET "${AR_SKY_BUCKET:-}" \
    --arg AR_SKY_MOUNT "${AR_SKY_MOUNT:-}" --arg AR_SKY_PYTHON "${AR_SKY_PYTHON:-}")
jq -n '{backend: "sky", id: $id, name: $name, tag: $tag, commit: $commit, commit_short: $commit[:7],
        env: $env, forward: $forward, cluster: $cluster, placement: $how, gpu: $gpu, gpus: $gpus,
        infra: $infra, idle_minutes: $idle, train_py_sha256: $train, setup_key: $key,
        managed: ($managed == "1"), spot: ($spot == "1"), recovery: $recovery, pool: $pool,
        max_in_flight: $cap,
        max_runtime_s: $maxrt, repo: $repo, state: "queued", submitted_at: $now, started_at: null,
        finished_at: null, mode: null, sky_job_id: null, sky_status: null}' \
    --arg id "$id" --arg name "$name" --arg tag "$tag" --arg commit "$sha" --argjson env "$env_json" \
    --argjson forward "$forward" --arg cluster "$cluster" --arg how "$how" --arg gpu "$gpu" \
    --arg gpus "$gpus" --arg infra "$infra" --argjson idle "$idle" --arg train "$train_sha" \
    --arg key "$setup_key" --argjson maxrt "$max_runtime" --arg repo "$repo" --arg now "$(ar_now)" \
    --arg managed "$managed" --arg spot "$spot" --arg recovery "$recovery" --arg pool "$prefix" --argjson cap "$cap" \
    | ar_write "$tmp/meta.json"
echo queued | ar_write "$tmp/state"
: >"$tmp/log"
: >"$tmp/submit.log"

exec 8>>"$tmp/alive.lock"  # held from here on by the supervisor (inherited), until its sky call returns
flock 8
mv "$tmp" "$root/jobs/$id"
trap - EXIT
job=$root/jobs/$id
echo "$id" | ar_write "$root/names/$name"
setsid bash "$job/bin/_sky-job.sh" "$job" </dev/null >/dev/null 2>>"$job/supervisor.log" 9>&- &
exec 8>&-
ar_warn "$id: submitted ${sha:0:7}${AR_RES_PAIRS[*]:+ with ${AR_RES_PAIRS[*]}} to ${cluster:-SkyPilot} ($how)"
echo "$id"
