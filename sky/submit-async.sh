#!/usr/bin/env bash
# submit-async.sh -- run one commit of this project as a SkyPilot managed job; prints its job id.
#
# Usage: sky/submit-async.sh [--commit REV] [--name NAME]
#
#   --commit REV  the commit to run; default HEAD, and then changes to tracked files are refused
#   --name NAME   ^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$, default ar-<first 10 hex of the commit>. The
#                 managed job is named NAME-<first 7 hex of the commit>; while a job of that name is
#                 queued, running or succeeded, its id is printed and nothing starts.
#
# stdout: the managed job id (`sky jobs queue`). The job runs sky/experiment.yaml on a `git archive`
# of the commit. Settings: AR_SKY_BUCKET (required), AR_SKY_GPU (e.g. H200); AR_TRAIN_CMD, AR_PROFILE,
# AR_DATA, AR_CACHE_DIR reach the job when set (sky/README.md). It returns once the job exists; on
# SIGINT or SIGTERM before that it cancels the launch request (`sky api cancel`) and any job it made.
# Exit: 0 submitted (or the existing job), 2 usage or precondition, 3 AR_SKY_BUCKET unset, sky, jq or
#       flock missing, or SkyPilot unavailable (run 'sky check' and 'sky api status'), 130/143 interrupted (nothing left).
set -euo pipefail
sig=""
trap 'sig=INT' INT; trap 'sig=TERM' TERM  # acted on between the sky calls, which are never cut short
me=submit-async.sh here=$(cd "$(dirname "$0")" && pwd)
die() { echo "$me: $2" >&2; exit "$1"; }
commit="" name=""
while (($#)); do
    case $1 in
        -h | --help) sed -n '2,/^set -/s/^# \{0,1\}//p' "$0"; exit 0 ;;
        --commit | --name) (($# > 1)) || die 2 "$1 needs a value (see --help)"; printf -v "${1#--}" %s "$2"; shift 2 ;;
        *) die 2 "unknown argument '$1' (see --help)" ;;
    esac
done
[[ -z $name || $name =~ ^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$ ]] \
    || die 2 "bad --name '$name': lowercase letters, digits and '-', at most 63, no '-' at either end"
bucket=${AR_SKY_BUCKET:-} gpu=${AR_SKY_GPU:-}
[[ -n $bucket ]] || die 3 "AR_SKY_BUCKET is not set: export AR_SKY_BUCKET=autoresearch-\$USER-<something unique> (sky/README.md)"
[[ $bucket =~ ^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$ ]] || die 2 "bad AR_SKY_BUCKET '$bucket': 3-63 lowercase letters, digits, '.' and '-'"
[[ -z $gpu || $gpu =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,40}(:[0-9]{1,2})?$ ]] || die 2 "bad AR_SKY_GPU '$gpu': e.g. H200 or A100-80GB:1"
for t in git jq flock; do command -v "$t" >/dev/null || die 3 "$t not found: install it"; done
command -v sky >/dev/null || die 3 "sky not found: pip install \"skypilot[<your infra>]\", then run 'sky check'"
root=$(git -C "$here" rev-parse --show-toplevel 2>/dev/null) || die 2 "$here is not inside a git repository"
[[ -n $commit || -z $(git -C "$root" status --porcelain --untracked-files=no) ]] \
    || die 2 "uncommitted changes to tracked files: commit them, or pass --commit REV to run a commit as it is"
commit=${commit:-HEAD}
[[ $commit != -* ]] || die 2 "unknown commit '$commit'"
sha=$(git -C "$root" rev-parse --verify --quiet "$commit^{commit}") || die 2 "unknown commit '$commit'"
name=${name:-ar-${sha:0:10}} && job=$name-${sha:0:7}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
queue() {  # queue -- this user's managed jobs as JSON into $tmp/q ([] before the first one); --refresh
    if sky jobs queue -o json --refresh -a >"$tmp/out" 2>"$tmp/err"; then  # starts a stopped controller
        sed -n '/^\[/,$p' "$tmp/out" >"$tmp/q"
    elif grep -q "does not exist\|No in-progress managed jobs" "$tmp/out" "$tmp/err"; then echo '[]' >"$tmp/q"
    else die 3 "'sky jobs queue' failed ($(tail -n 1 "$tmp/err")): run 'sky check' and 'sky api status'"; fi
}
mine() {  # mine JQ_FILTER -- the ids of the jobs named $job in $tmp/q that pass the filter, oldest first
    jq -r --arg n "$job" "[.[] | select(.job_name == \$n) | select($1)] | sort_by(.job_id)[].job_id" "$tmp/q"
}
mkdir -p "$root/.ar"
[[ -e $root/.ar/.gitignore ]] || echo '*' >"$root/.ar/.gitignore"  # keeps .ar/ out of git status
exec 9>>"$root/.ar/sky-submit.lock"
flock 9  # one submit at a time: looking the name up and launching are one step
live='.status | IN("PENDING", "SUBMITTED", "STARTING", "RUNNING", "RECOVERING", "WINDING_DOWN", "SUCCEEDED")'
queue
last=$(mine "$live" | tail -n 1)
[[ -z $last ]] || { echo "$me: $job is managed job $last (queued, running or succeeded); starting nothing" >&2
    echo "$last"; exit 0; }
before=$(mine true | tail -n 1)
cancel_new() {  # cancel_new -- cancel every unfinished job of this name newer than $before (this launch's)
    local ids=()
    (queue) || return 0  # no answer: nothing to cancel that can be found
    mapfile -t ids < <(mine ".job_id > ${before:-0} and (.status | IN(\"SUCCEEDED\", \"CANCELLED\") or startswith(\"FAILED\") | not)")
    ((!${#ids[@]})) || sky jobs cancel -y "${ids[@]}" >&2 || true
}
interrupted() {  # interrupted [REQUEST] -- a signal before the job existed: cancel the request, then its job
    trap '' INT TERM
    [[ -z ${1:-} ]] || { sky api cancel -y "$1" >&2 || true; cancel_new; }
    echo "$me: interrupted${1:+: launch request $1 cancelled, and the job it may have made}" >&2
    [[ $sig == INT ]] && exit 130 || exit 143
}
mkdir "$tmp/src"
git -C "$root" archive "$sha" | tar -x -C "$tmp/src"
args=(jobs launch "$here/experiment.yaml" -n "$job" -y -d --async --workdir "$tmp/src" --env "AR_SKY_BUCKET=$bucket")
for v in AR_TRAIN_CMD AR_PROFILE AR_DATA AR_CACHE_DIR; do [[ -z ${!v:-} ]] || args+=(--env "$v=${!v}"); done
[[ -z $gpu ]] || args+=(--gpus "$gpu")
[[ -z $sig ]] || interrupted
# --async: the request id comes back at once, so an interrupt can always cancel the launch on the server
sky "${args[@]}" >"$tmp/launch" 2>&1 || die 3 "'sky jobs launch' failed: $(tail -n 1 "$tmp/launch")"
req=$(sed 's/\x1b\[[0-9;]*m//g' "$tmp/launch" | sed -n 's/^.*Submitted sky\.jobs\.launch request: *\([0-9a-f-]\{8,\}\).*$/\1/p')
[[ -n $req ]] || die 3 "no request id in the output of 'sky jobs launch': $(tail -n 1 "$tmp/launch")"
sky api logs "$req" </dev/null >&2 &  # the launch's progress; killing this stream does not stop the request
pid=$! rc=0
while :; do
    [[ -z $sig ]] || { kill "$pid" 2>/dev/null || true; interrupted "$req"; }
    rc=0 && wait "$pid" || rc=$?
    [[ -z $sig ]] && ! kill -0 "$pid" 2>/dev/null && break  # ended by itself (not cut short by a signal)
done
queue
id=$(mine ".job_id > ${before:-0}" | tail -n 1)
((!rc)) && [[ -n $id ]] || { cancel_new; die 3 "the launch of $job failed (request $req: 'sky api logs $req'); no job is left"; }
echo "$me: $id: commit ${sha:0:10} submitted as managed job $job" >&2
echo "$id"
