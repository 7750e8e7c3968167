#!/usr/bin/env bash
# submit-async.sh -- submit one experiment to the local backend; prints its job id.
#
# Usage: local/submit-async.sh [--commit REV] [--env KEY=VALUE]... [--name NAME]
#
#   --commit REV     commit to run (default HEAD; without it a dirty working tree is refused)
#   --env KEY=VALUE  trainer override, e.g. --env AR_MATRIX_LR=0.05 (AR_<KNOB> or a harness name)
#   --name NAME      job name instead of ar-<tag>-<shortsha>[-<overrides hash>]; the idempotency key
#
# stdout: exactly one line, the job id (the job name; <name>-<n> for a retry after a failure).
# The same (tag, commit, overrides) again returns the existing job while it is queued, running or
# succeeded. The job runs detached from a snapshot of the commit under
# ${AR_STATE_DIR:-<repo>/.ar}/local/jobs/<id>/ and waits for a free slot.
# Exit: 0 submitted, 2 usage/precondition error, 3 backend unavailable (python, jq, flock missing).
#
# Env: AR_TAG (default "default"), AR_PROFILE / AR_DATA (passed to the job and part of its name),
#      AR_CACHE_DIR (passed to the job), AR_STATE_DIR, AR_LOCAL_SLOTS (default: GPUs, else CPU
#      cores), AR_LOCAL_THREADS (default cores / slots), AR_LOCAL_PYTHON (default <repo>/.venv/bin/python).
# Contract: docs/contract.md
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
# shellcheck source=local/_lib.sh
source "$here/_lib.sh"
# shellcheck source=local/_local.sh
source "$here/_local.sh"
AR_PROG=submit-async.sh

ar_parse_submit_args "$@"
ar_need git jq flock setsid sha256sum
ar_resolve_submit "$repo"
tag=$AR_RES_TAG sha=$AR_RES_SHA name=$AR_RES_NAME

python=${AR_LOCAL_PYTHON:-$repo/.venv/bin/python}
[[ -x $python ]] || command -v "$python" >/dev/null 2>&1 \
    || ar_die 3 "python '$python' not found: run 'make setup', or set AR_LOCAL_PYTHON"
[[ $python == */* ]] || python=$(command -v "$python")
[[ $python == /* ]] || python=$PWD/$python

# Slots: one per GPU (CUDA_VISIBLE_DEVICES, else nvidia-smi), else AR_LOCAL_SLOTS or the CPU cores.
gpus=()
if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
    IFS=, read -r -a gpus <<<"$CUDA_VISIBLE_DEVICES"
elif command -v nvidia-smi >/dev/null 2>&1; then
    n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
    for ((i = 0; i < n; i++)); do gpus+=("$i"); done
fi
cores=$(nproc 2>/dev/null || echo 1)
slots=${AR_LOCAL_SLOTS:-$(( ${#gpus[@]} > 0 ? ${#gpus[@]} : cores ))}
[[ $slots =~ ^[0-9]+$ && $slots -ge 1 ]] || ar_die 2 "bad AR_LOCAL_SLOTS '$slots': a positive integer"
threads=${AR_LOCAL_THREADS:-$(( cores / slots > 1 ? cores / slots : 1 ))}
[[ $threads =~ ^[0-9]+$ && $threads -ge 1 ]] || ar_die 2 "bad AR_LOCAL_THREADS '$threads': a positive integer"

root=$(ar_state_root "$repo" local)
mkdir -p "$root/jobs" "$root/names" "$root/slots"
exec 9>>"$root/submit.lock"  # one submit at a time: the name lookup and the new id stay consistent
flock -w 120 9 || ar_die 3 "another submit holds $root/submit.lock for 2 minutes; is one stuck?"

env_json=$(jq -n '$ARGS.positional | map(index("=") as $i | {(.[:$i]): .[$i + 1:]}) | add // {}' \
    --args "${AR_RES_PAIRS[@]}")

# Idempotency: the latest job of this name, unless it failed, timed out or was cancelled.
ar_reuse_job "$root" "$name" "$sha" "$env_json" al_reap ar_state  # prints the id and exits when reusing
id=$AR_NEW_ID

# Build the job directory under a temporary name, then rename it into place.
tmp=$root/jobs/.tmp-$id-$$
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/src" "$tmp/bin"
git -C "$repo" archive --format=tar "$sha" >"$tmp/src.tar"
[[ $(git get-tar-commit-id <"$tmp/src.tar") == "$sha" ]] || ar_die 3 "snapshot of $sha does not carry that commit id"
tar -xf "$tmp/src.tar" -C "$tmp/src"
rm -f "$tmp/src.tar"
cp "$here/_lib.sh" "$here/_local.sh" "$here/_run-job.sh" "$tmp/bin/"  # immune to later edits
forward=$(jq -n '$ARGS.named | with_entries(select(.value != ""))' --arg AR_CACHE_DIR "${AR_CACHE_DIR:-}" \
    --arg AR_CLIMBMIX_URL "${AR_CLIMBMIX_URL:-}" --arg AR_PROGRESS_INTERVAL_S "${AR_PROGRESS_INTERVAL_S:-}")
jq -n '{backend: "local", id: $id, name: $name, tag: $tag, commit: $commit, commit_short: $commit[:7],
        env: $env, forward: $forward, python: $python, slots: $slots, threads: $threads, gpus: $gpus,
        repo: $repo, state: "queued", submitted_at: $now, started_at: null, finished_at: null,
        slot: null, gpu: null, pid: null, exit_code: null}' \
    --arg id "$id" --arg name "$name" --arg tag "$tag" --arg commit "$sha" --argjson env "$env_json" \
    --argjson forward "$forward" --arg python "$python" --argjson slots "$slots" \
    --argjson threads "$threads" --argjson gpus "$(jq -n '$ARGS.positional' --args "${gpus[@]}")" \
    --arg repo "$repo" --arg now "$(ar_now)" | ar_write "$tmp/meta.json"
echo queued | ar_write "$tmp/state"
: >"$tmp/log"

exec 8>>"$tmp/alive.lock"  # held from here on by the supervisor and the trainer (inherited)
flock 8
mv "$tmp" "$root/jobs/$id"
trap - EXIT
job=$root/jobs/$id
echo "$id" | ar_write "$root/names/$name"
setsid bash "$job/bin/_run-job.sh" "$job" </dev/null >/dev/null 2>>"$job/supervisor.log" 9>&- &
exec 8>&-
ar_warn "$id: submitted ${sha:0:7}${AR_RES_PAIRS[*]:+ with ${AR_RES_PAIRS[*]}} (slots: $slots)"
echo "$id"
