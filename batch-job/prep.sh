#!/usr/bin/env bash
# prep.sh -- one-time job that fills the object volume with the data and the tokenizer (and builds the
# job venv on it), so that every experiment job starts with nothing to download.
#
# Usage: batch-job/prep.sh [--profile full|tiny|smoke] [--data offline|climbmix] [--num-shards N]
#                          [--commit REV]
#
# Runs `python prepare/prepare.py` of commit REV (default HEAD; uncommitted changes are not shipped)
# as a VESSL job with AR_CACHE_DIR=autoresearch/cache on the volume, and waits for it. Idempotent:
# prepare.py skips what is already there, and the venv is reused. Run it again with another
# --profile / --data when you need those.
# stdout: the job's `prepared: ...` line. stderr: progress; the log tail when it failed.
# Exit: 0 prepared, 1 the job failed, 2 usage error, 3 VESSL unavailable, 130/143 interrupted
#       (after terminating the job).
#
# Env: AUTORESEARCH_CACHE_VOLUME (required), AUTORESEARCH_PREP_RESOURCE_SPEC (a CPU spec; default
#      AUTORESEARCH_RESOURCE_SPEC, with a warning), AUTORESEARCH_IMAGE, AUTORESEARCH_PYTHON,
#      AUTORESEARCH_GIT_REMOTE, VESSLCTL_ORG / VESSLCTL_TEAM, AR_PROFILE / AR_DATA (defaults of
#      --profile / --data; unset: full / the profile's), AR_CLIMBMIX_URL, AR_TIMEOUT_S (default 7200),
#      AR_STATE_DIR, AR_VESSL_POLL_S.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
# shellcheck source=batch-job/_lib.sh
source "$here/_lib.sh"
# shellcheck source=batch-job/_vessl.sh
source "$here/_vessl.sh"
AR_PROG=prep.sh

profile=${AR_PROFILE:-full} data=${AR_DATA:-} shards="" rev=HEAD
while (($#)); do
    case $1 in
        -h | --help) ar_usage "$0"; exit 0 ;;
        --profile | --data | --num-shards | --commit)
            (($# >= 2)) || ar_die 2 "$1 needs a value (see --help)"
            case $1 in
                --profile) profile=$2 ;;
                --data) data=$2 ;;
                --num-shards) shards=$2 ;;
                --commit) rev=$2 ;;
            esac
            shift 2 ;;
        --profile=* | --data=* | --num-shards=* | --commit=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
        *) ar_die 2 "unknown argument '$1' (see --help)" ;;
    esac
done
[[ $profile =~ ^[a-z][a-z0-9-]{0,19}$ ]] || ar_die 2 "bad --profile '$profile'"
[[ -z $data || $data =~ ^[a-z][a-z0-9-]{0,19}$ ]] || ar_die 2 "bad --data '$data'"
[[ -z $shards || $shards =~ ^[1-9][0-9]{0,5}$ ]] || ar_die 2 "bad --num-shards '$shards': a positive integer"
[[ $rev != -* ]] || ar_die 2 "bad --commit '$rev'"
ar_need git jq flock sha256sum
git -C "$repo" rev-parse --git-dir >/dev/null 2>&1 || ar_die 2 "$repo is not a git repository"
sha=$(git -C "$repo" rev-parse --verify --quiet "$rev^{commit}") || ar_die 2 "unknown commit '$rev'"
spec_var=AUTORESEARCH_PREP_RESOURCE_SPEC
[[ -n ${AUTORESEARCH_PREP_RESOURCE_SPEC:-} || -z ${AUTORESEARCH_RESOURCE_SPEC:-} ]] || spec_var=AUTORESEARCH_RESOURCE_SPEC
vs_config "$spec_var"
vs_need_cli
vs_auth_check
[[ $spec_var == AUTORESEARCH_PREP_RESOURCE_SPEC ]] \
    || ar_warn "note: AUTORESEARCH_PREP_RESOURCE_SPEC is not set; preparing on the GPU spec $VS_SPEC (set it to a CPU spec to pay less)"
timeout_s=$(ar_timeout_s 7200)

root=$(ar_state_root "$repo" vessl)
mkdir -p "$root/jobs" "$root/names" "$root/uploads"
exec 9>>"$root/submit.lock"
flock -w 300 9 || ar_die 3 "another submit holds $root/submit.lock for 5 minutes; is one stuck?"
name=ar-prep-$profile-${sha:0:7}
runid=$(date -u +%Y%m%d-%H%M%S)-$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
VS_JOB_ENV=("AR_VESSL_MODE=prepare" "AR_VESSL_COMMIT=$sha" "AR_VESSL_RUN=$name/$runid"
    "AR_VESSL_MAX_S=$((timeout_s + 600))" "AR_PROFILE=$profile")
[[ -z $data ]] || VS_JOB_ENV+=("AR_DATA=$data")
[[ -z $shards ]] || VS_JOB_ENV+=("AR_NUM_SHARDS=$shards")
[[ -z ${AR_CLIMBMIX_URL:-} ]] || VS_JOB_ENV+=("AR_CLIMBMIX_URL=$AR_CLIMBMIX_URL")
[[ -z $VS_PYTHON ]] || VS_JOB_ENV+=("AR_VESSL_PYTHON=$VS_PYTHON")
VS_TAGS=(autoresearch ar-prep "c-${sha:0:7}" "r-$runid")
vs_list - || ar_die 3 "cannot list VESSL jobs: $VS_ERR"
known=$(mktemp)
vs_slugs_in_list "$name" >"$known"
vs_ship_code "$root" "$repo" "$sha"
vs_ship_entry "$root" "$here"

child=""
vs_create_guarded "$root" "$name" "$known" prep.sh
slug=$VS_SLUG dir=$root/jobs/$VS_SLUG
mkdir -p "$dir"
jq -n '{backend: "vessl", id: $id, slug: $id, name: $name, tag: "prep", commit: $commit, commit_short: $commit[:7],
        env: {AR_PROFILE: $profile}, mode: "prepare", volume: $vol, spec: $spec, image: $image, run: $run,
        cmd: $cmd, org: $org, team: $team, repo: $repo, state: "queued", submitted_at: $now,
        started_at: null, finished_at: null, native_state: null}' \
    --arg id "$slug" --arg name "$name" --arg commit "$sha" --arg profile "$profile" --arg vol "$VS_VOLUME" \
    --arg spec "$VS_SPEC" --arg image "$VS_IMAGE" --arg run "$name/$runid" --arg cmd "$VS_CMD" \
    --arg org "${VESSLCTL_ORG:-}" --arg team "${VESSLCTL_TEAM:-}" --arg repo "$repo" --arg now "$(ar_now)" \
    | ar_write "$dir/meta.json"
echo queued | ar_write "$dir/state"
vs_handed_out
exec 9>&-
ar_warn "$slug: preparing profile $profile${data:+ ($data)} on $VS_VOLUME with $VS_SPEC; waiting (batch-job/logs.sh $slug)"

# Wait with wait-jobs.sh (deadline, terminate on signals); forward our signals to it.
trap '[[ -z $child ]] || kill -TERM "$child" 2>/dev/null || true' INT TERM
AR_TIMEOUT_S=$timeout_s "$here/wait-jobs.sh" "$slug" >/dev/null &
child=$!
rc=0
while :; do
    wait "$child" && rc=0 || rc=$?
    kill -0 "$child" 2>/dev/null || break
done
if [[ $(ar_state "$dir") == succeeded ]]; then
    grep '^prepared: ' "$dir/log" || ar_warn "note: the job succeeded but its log has no 'prepared:' line"
    exit 0
fi
ar_warn "$slug: preparation $(ar_state "$dir"); the last lines of its log:"
tail -n 25 "$dir/log" >&2 || true
((rc != 0)) || rc=1
exit "$rc"
