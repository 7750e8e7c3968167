#!/usr/bin/env bash
# submit-async.sh -- submit one experiment as a VESSL batch job; prints its job id (the VESSL slug).
#
# Usage: batch-job/submit-async.sh [--commit REV] [--name NAME]
#
#   --commit REV     commit to run (default HEAD; without it a dirty working tree is refused)
#   --name NAME      job name instead of ar-<tag>-<shortsha>[-<hash of AR_PROFILE/AR_DATA>]; the
#                    idempotency key
#
# stdout: exactly one line, the job id = the VESSL job slug. Returns once the job exists.
# The commit travels as a git bundle uploaded to the object volume (nothing is pushed; the job checks
# out exactly that commit and verifies it). The same (tag, commit, profile, data) again returns the
# existing job while it is queued, running or succeeded: looked up in the name -> slug record under
# ${AR_STATE_DIR:-<repo>/.ar}/vessl/, then by name in `vesslctl job list`.
# Exit: 0 submitted (or the existing job returned), 2 usage/precondition error, 3 VESSL unavailable
#       (vesslctl missing, not logged in, volume/spec not configured, create failed). A job this
#       script created is terminated before it exits non-zero.
#
# Env: AUTORESEARCH_CACHE_VOLUME    object volume slug (required; prepared once with prep.sh)
#      AUTORESEARCH_RESOURCE_SPEC   resource spec of the GPU jobs (required), e.g. your team's H100 x1
#      AUTORESEARCH_IMAGE           container image (default python:3.12; needs bash, git, python3 >= 3.11)
#      AUTORESEARCH_PYTHON          interpreter in the image that already has the dependencies (no venv)
#      AUTORESEARCH_GIT_REMOTE      push the commit to refs/autoresearch/commits/<sha> of this remote
#                                   and fetch it from there, instead of uploading a bundle
#      VESSLCTL_ORG, VESSLCTL_TEAM  passed to vesslctl; recorded, so wait/cancel/logs use the same
#      AR_TAG (default "default"), AR_PROFILE / AR_DATA (passed to the job and part of its name),
#      AR_TIMEOUT_S (the job's own hard limit is this + 600 s; default: the profile's wait deadline
#      + 600 s), AR_STATE_DIR, AR_VESSL_LIST_TRIES (10) / AR_VESSL_LIST_DELAY_S (2): finding the new
#      job's slug in `vesslctl job list`.
# Contract: docs/contract.md
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
# shellcheck source=batch-job/_lib.sh
source "$here/_lib.sh"
# shellcheck source=batch-job/_vessl.sh
source "$here/_vessl.sh"
AR_PROG=submit-async.sh

ar_parse_submit_args "$@"
ar_need git jq flock sha256sum
ar_resolve_submit "$repo"
tag=$AR_RES_TAG sha=$AR_RES_SHA name=$AR_RES_NAME
vs_config
vs_need_cli
vs_auth_check

root=$(ar_state_root "$repo" vessl)
mkdir -p "$root/jobs" "$root/names" "$root/uploads"
exec 9>>"$root/submit.lock"  # one submit at a time: lookup, create and record stay consistent
flock -w 300 9 || ar_die 3 "another submit holds $root/submit.lock for 5 minutes; is one stuck?"

env_json=$(jq -n '$ARGS.positional | map(index("=") as $i | {(.[:$i]): .[$i + 1:]}) | add // {}' \
    --args "${AR_RES_PAIRS[@]}")
ohash=none
((${#AR_RES_PAIRS[@]} == 0)) || ohash=$(printf '%s\n' "${AR_RES_PAIRS[@]}" | sha256sum | cut -c1-8)
commit_tag=c-${sha:0:7} overrides_tag=o-$ohash

same_experiment() {  # same_experiment DIR -- the record ran this commit with this AR_PROFILE / AR_DATA
    [[ $(jq --arg c "$sha" --argjson e "$env_json" '.commit == $c and .env == $e' "$1/meta.json") == true ]]
}
reuse() {  # reuse SLUG STATE -- print the existing job and stop
    ar_warn "$name: already submitted as $1 ($2); not starting another"
    echo "$1"
    exit 0
}

# ---- idempotency 1: our record of the name --------------------------------------------------------
declare -A ended=()
if [[ -f $root/names/$name ]]; then
    old=$(cat "$root/names/$name")
    if [[ $old =~ $AR_ID_RE && -f $root/jobs/$old/meta.json ]]; then
        old_dir=$root/jobs/$old
        if ! vs_poll "$old_dir"; then
            ar_warn "note: cannot ask VESSL about $old ($VS_ERR); assuming it is still alive"
        fi
        st=$(ar_state "$old_dir")
        if [[ $st == queued || $st == running || $st == succeeded ]]; then
            same_experiment "$old_dir" \
                || ar_die 2 "name '$name' is taken by job $old ($st) for another commit or AR_PROFILE/AR_DATA; choose another --name"
            reuse "$old" "$st"
        fi
        ended[$old]=1
        ar_warn "$name: the last job $old ended $st; starting a new one"
    fi
fi

# ---- idempotency 2: a job of that name VESSL knows but we have no record of ---------------------------
# (a submit that died between create and record, another state dir, another machine)
listed=0
for try in 1 2 3; do
    if vs_list -; then listed=1; break; fi
    ar_warn "note: $VS_ERR (try $try of 3)"
    sleep "$try"
done
((listed)) || ar_die 3 "cannot list VESSL jobs: $VS_ERR"
known=$(mktemp)
trap 'rm -f "$known"' EXIT
vs_slugs_in_list "$name" >"$known"
while IFS=$'\t' read -r slug native tags; do
    [[ -n $slug && -z ${ended[$slug]:-} && $slug =~ $AR_ID_RE ]] || continue
    [[ ! -f $root/jobs/$slug/meta.json ]] || continue  # ours and ended (else step 1 returned it)
    mapped=$(vs_map "$native")
    [[ $mapped == queued || $mapped == running || $mapped == succeeded ]] || continue
    if [[ -n $tags ]]; then
        if [[ " $tags " != *" $commit_tag "* || " $tags " != *" $overrides_tag "* ]]; then
            [[ -z $AR_ARG_NAME ]] || ar_die 2 "name '$name' is taken by VESSL job $slug ($mapped) for another commit or AR_PROFILE/AR_DATA; choose another --name"
            continue
        fi
    else
        ar_warn "note: VESSL job $slug has no tags to check its commit against; taking it as this experiment"
    fi
    # Adopt it: a record like our own (its run folder is in its r-<run id> tag when it has one).
    runid=$(tr ' ' '\n' <<<"$tags" | sed -n 's/^r-//p' | head -n 1)
    mkdir -p "$root/jobs/$slug"
    jq -n '{backend: "vessl", id: $id, slug: $id, name: $name, tag: $tag, commit: $commit, commit_short: $commit[:7],
            env: $env, mode: "train", volume: $vol, run: (if $runid == "" then "" else $name + "/" + $runid end),
            org: $org, team: $team, adopted: true, state: "queued", submitted_at: $now, started_at: null,
            finished_at: null}' \
        --arg id "$slug" --arg name "$name" --arg tag "$tag" --arg commit "$sha" --argjson env "$env_json" \
        --arg vol "$VS_VOLUME" --arg runid "$runid" --arg org "${VESSLCTL_ORG:-}" --arg team "${VESSLCTL_TEAM:-}" \
        --arg now "$(ar_now)" | ar_write "$root/jobs/$slug/meta.json"
    echo queued | ar_write "$root/jobs/$slug/state"
    vs_note "$root/jobs/$slug" "adopted from vesslctl job list (no record of it here)"
    echo "$slug" | ar_write "$root/names/$name"
    vs_poll "$root/jobs/$slug" || true
    reuse "$slug" "$(ar_state "$root/jobs/$slug")"
done < <(jq -r --arg n "$name" '[.[] | select(type == "object" and .name == $n and (.slug | type) == "string")]
    | sort_by(.createdAt // .created_at // "") | reverse | .[]
    | [.slug, (.workloadState // "" | ascii_downcase), ((.tags // []) | map(tostring) | join(" "))] | @tsv' <<<"$VS_LIST")

# ---- a new job -------------------------------------------------------------------------------------
runid=$(date -u +%Y%m%d-%H%M%S)-$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
run=$name/$runid
profile=""
for pair in "${AR_RES_PAIRS[@]}"; do [[ $pair != AR_PROFILE=* ]] || profile=${pair#AR_PROFILE=}; done
budget=$(ar_profile_budget "$profile")
max_s=$(($(ar_timeout_s $((3 * budget + 600))) + 600))

VS_JOB_ENV=("AR_VESSL_MODE=train" "AR_VESSL_COMMIT=$sha" "AR_VESSL_RUN=$run" "AR_VESSL_MAX_S=$max_s")
[[ -z $VS_PYTHON ]] || VS_JOB_ENV+=("AR_VESSL_PYTHON=$VS_PYTHON")
[[ -z ${AR_CLIMBMIX_URL:-} ]] || VS_JOB_ENV+=("AR_CLIMBMIX_URL=$AR_CLIMBMIX_URL")
VS_JOB_ENV+=("${AR_RES_PAIRS[@]}")
vs_ship_code "$root" "$repo" "$sha"
vs_ship_entry "$root" "$here"
VS_TAGS=(autoresearch "ar-$tag" "$commit_tag" "$overrides_tag" "r-$runid")

vs_create_guarded "$root" "$name" "$known" submit  # a job we created but could not hand out is terminated
slug=$VS_SLUG
dir=$root/jobs/$slug
mkdir -p "$dir"
forward=$(jq -n '$ARGS.positional | map(index("=") as $i | {(.[:$i]): .[$i + 1:]}) | add // {}' --args "${VS_JOB_ENV[@]}")
jq -n '{backend: "vessl", id: $id, slug: $id, name: $name, tag: $tag, commit: $commit, commit_short: $commit[:7],
        env: $env, job_env: $forward, mode: "train", volume: $vol, spec: $spec, image: $image, run: $run,
        cmd: $cmd, tags: $tags, code: $code, max_s: $max, org: $org, team: $team, repo: $repo,
        state: "queued", submitted_at: $now, started_at: null, finished_at: null, native_state: null}' \
    --arg id "$slug" --arg name "$name" --arg tag "$tag" --arg commit "$sha" --argjson env "$env_json" \
    --argjson forward "$forward" --arg vol "$VS_VOLUME" --arg spec "$VS_SPEC" --arg image "$VS_IMAGE" \
    --arg run "$run" --arg cmd "$VS_CMD" --argjson tags "$(jq -n '$ARGS.positional' --args "${VS_TAGS[@]}")" \
    --arg code "$([[ -n $VS_GIT_REMOTE ]] && echo push || echo bundle)" --argjson max "$max_s" \
    --arg org "${VESSLCTL_ORG:-}" --arg team "${VESSLCTL_TEAM:-}" --arg repo "$repo" --arg now "$(ar_now)" \
    | ar_write "$dir/meta.json"
echo queued | ar_write "$dir/state"
echo "$slug" | ar_write "$root/names/$name"
vs_handed_out
ar_warn "$slug: submitted $name (${sha:0:7}${AR_RES_PAIRS[*]:+ with ${AR_RES_PAIRS[*]}}) on $VS_SPEC"
echo "$slug"
