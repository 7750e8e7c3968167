#!/usr/bin/env bash
# submit-async.sh -- run one commit of this project as a VESSL batch job; prints the job slug.
#
# Usage: batch-job/submit-async.sh [--commit REV] [--name NAME]
#
#   --commit REV  the commit to run; default HEAD, and then changes to tracked files are refused
#   --name NAME   ^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$, default ar-<first 10 hex of the commit>: the VESSL
#                 job name. A name whose job is queued, running or succeeded (vesslctl job list) prints
#                 that job's slug and starts nothing; after a failed or terminated one a new job starts.
#
# stdout: the job slug. The commit travels as ar-code/<sha>.tar.gz on the object volume (uploaded once
# per commit; nothing is pushed) and runs as batch-job/_job.sh says. Settings (batch-job/README.md):
# AUTORESEARCH_CACHE_VOLUME, AUTORESEARCH_RESOURCE_SPEC (both required), AUTORESEARCH_IMAGE, AR_TRAIN_CMD;
# AR_PROFILE, AR_DATA and AR_CACHE_DIR reach the job when set.
# Exit: 0 submitted (or the existing job), 2 usage or precondition, 3 vesslctl, jq or a setting missing,
# not logged in, or VESSL refused (the message says which).
set -euo pipefail
me=submit-async.sh here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=batch-job/_vessl.sh
. "$here/_vessl.sh"
commit="" name=""
while (($#)); do
    case $1 in
        -h | --help) help ;;
        --commit | --name) (($# > 1)) || die 2 "$1 needs a value (see --help)"; printf -v "${1#--}" %s "$2"; shift 2 ;;
        *) die 2 "unknown argument '$1' (see --help)" ;;
    esac
done
[[ -z $name || $name =~ ^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$ ]] \
    || die 2 "bad --name '$name': lowercase letters, digits and '-', at most 63, no '-' at either end"
root=$(git -C "$here" rev-parse --show-toplevel 2>/dev/null) || die 2 "$here is not inside a git repository"
[[ -n $commit || -z $(git -C "$root" status --porcelain --untracked-files=no) ]] \
    || die 2 "uncommitted changes to tracked files: commit them, or pass --commit REV to run a commit as it is"
commit=${commit:-HEAD}
[[ $commit != -* ]] || die 2 "unknown commit '$commit'"
sha=$(git -C "$root" rev-parse --verify --quiet "$commit^{commit}") || die 2 "unknown commit '$commit'"
name=${name:-ar-${sha:0:10}}
need_volume
spec=${AUTORESEARCH_RESOURCE_SPEC:-}
[[ -n $spec ]] || die 3 "AUTORESEARCH_RESOURCE_SPEC is not set: a single-GPU resource spec of your team (vesslctl resource-spec list)"
auth=$(vesslctl auth status 2>&1 </dev/null) || true  # it exits 0 when logged out: its words decide
if [[ -z ${auth//[[:space:]]/} ]] || grep -Eqi 'not (logged|authenticated)|logged out|expired|unauthori[sz]ed|login required' <<<"$auth"; then
    die 3 "not logged in to VESSL (vesslctl auth status: ${auth%%$'\n'*}): run 'vesslctl auth login'"
fi

exec 9<"$0"
flock 9  # one submit at a time in this project: looking the name up and creating its job are one step
named() {  # named -- "slug<TAB>state" of the jobs called $name, newest first
    local out
    out=$(vesslctl job list -o json 2>&1 </dev/null) || die 3 "vesslctl job list: ${out%%$'\n'*}"
    [[ $(jq -r type <<<"$out" 2>/dev/null) == array ]] || die 3 "vesslctl job list -o json printed no JSON list"
    jq -r --arg n "$name" 'map(select(.name == $n)) | sort_by(.createdAt) | reverse | .[]
        | "\(.slug)\t\(.workloadState | ascii_downcase)"' <<<"$out"
}
jobs=$(named)
known=$(cut -f1 <<<"$jobs")  # the slugs of that name before this submit
while IFS=$'\t' read -r slug native; do
    st=$(state "$native")
    [[ $st == failed || $st == cancelled ]] && continue
    echo "$me: $name is job $slug ($native); starting nothing" >&2
    echo "$slug"
    exit 0
done < <([[ -z $jobs ]] || echo "$jobs")

fresh() { named | cut -f1 | grep -vxF -f <(echo "$known"); }  # the slugs of that name this submit made
tmp=$(mktemp -d)
creating="" slug=""
# shellcheck disable=SC2329  # the EXIT trap: a job created but never handed out is terminated
cleanup() {
    local rc=$? try found="" s
    trap '' INT TERM
    if ((rc)) && [[ -n $creating ]]; then
        for ((try = 1; try <= 20; try++)); do  # it may not be listed yet: up to ~30 s
            found=$(fresh) && break
            sleep "$((try < 10 ? 0 : 2)).$((try < 10 ? 5 : 0))"
        done
        for s in $found; do
            echo "$me: terminating $s: it was created, but this submit failed" >&2
            terminate "$s" || echo "$me: $s may still run: 'vesslctl job terminate $s'" >&2
        done
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
# The code: one archive per commit on the volume; already there (another submit of that commit) is fine.
key=ar-code/$sha.tar.gz
have() { vesslctl volume download "$VOLUME" "$tmp/dl" --remote-prefix "$key" >/dev/null 2>&1 </dev/null; [[ -n $(find "$tmp/dl" -name "${key#*/}" 2>/dev/null) ]]; }
if ! have; then
    git -C "$root" archive --format=tar.gz -o "$tmp/$sha.tar.gz" "$sha"
    out=$(vesslctl volume upload "$VOLUME" "$tmp/$sha.tar.gz" --remote-prefix ar-code/ 2>&1 </dev/null) || have \
        || die 3 "vesslctl volume upload to $VOLUME: ${out%%$'\n'*} (is AUTORESEARCH_CACHE_VOLUME an object volume of this team?)"
fi

script=$(<"$here/_job.sh")
args=(job create -n "$name" -r "$spec" -i "${AUTORESEARCH_IMAGE:-pytorch/pytorch:2.4.1-cuda12.4-cudnn9-devel}"
    --object-volume "$VOLUME:/root/.cache/autoresearch" --tag autoresearch --env "AR_COMMIT=$sha"
    --cmd "bash -c '${script//\'/\'\\\'\'}'")
for var in AR_TRAIN_CMD AR_PROFILE AR_DATA AR_CACHE_DIR AR_PREP; do
    if [[ -n ${!var:-} ]]; then args+=(--env "$var=${!var}"); fi
done
creating=1
out=$(vesslctl "${args[@]}" 2>&1 </dev/null) \
    || die 3 "vesslctl job create: ${out%%$'\n'*} (check AUTORESEARCH_RESOURCE_SPEC, AUTORESEARCH_IMAGE, credits)"
for ((try = 1; try <= 50; try++)); do  # create prints no slug: the new job of that name in the list
    slug=$(fresh | head -n 1) || true
    [[ -z $slug ]] || break
    sleep "$((try < 10 ? 0 : 3)).$((try < 10 ? 5 : 0))"
done
[[ -n $slug ]] || die 3 "job $name was created but is not in 'vesslctl job list' after 2 minutes"
[[ $slug =~ $ID_RE ]] || die 3 "VESSL named the job '$slug', which is not a usable id"
echo "$me: $slug: $name, commit ${sha:0:10} on $spec" >&2
echo "$slug"
creating=""
