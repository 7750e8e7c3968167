#!/usr/bin/env bash
# submit-async.sh -- submit one experiment to Modal (the deployed app); prints its job id.
#
# Usage: modal/submit-async.sh [--commit REV] [--name NAME]
#
#   --commit REV     commit to run (default HEAD; without it a dirty working tree is refused)
#   --name NAME      job name instead of ar-<tag>-<shortsha>[-<hash of AR_PROFILE/AR_DATA>]; the
#                    idempotency key
#
# Spawns run_experiment of the deployed Modal app with a snapshot of the commit (`git archive`) and
# AR_PROFILE / AR_DATA, and returns at once. stdout: exactly one line, the job id -- the Modal
# FunctionCall id (fc-...). The same (tag, commit, profile, data) again returns the existing call while it
# is queued, running or succeeded (name -> id records under ${AR_STATE_DIR:-<repo>/.ar}/modal/).
# The call's server-side limit: the Function's timeout (AR_MODAL_TIMEOUT_S at deploy time, default
# 1800 s); the trainer itself is stopped after AR_TIMEOUT_S (or the wait's default for its profile) + 300 s.
# Exit: 0 submitted, 2 usage/precondition error, 3 Modal unavailable (package missing, `modal setup`
#       not done, app not deployed: `make modal-deploy`).
#
# Env: AR_TAG (default "default"), AR_PROFILE / AR_DATA (passed to the job and part of its name),
#      AR_STATE_DIR, AR_MODAL_APP (default autoresearch), AR_MODAL_PYTHON (default
#      <repo>/.venv/bin/python, else python3; needs the `modal` package), AR_CLIMBMIX_URL
#      (forwarded to the job).
# Contract: docs/contract.md
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
# shellcheck source=modal/_lib.sh
source "$here/_lib.sh"
# shellcheck source=modal/_modal.sh
source "$here/_modal.sh"
AR_PROG=submit-async.sh

ar_parse_submit_args "$@"
ar_need git jq sha256sum
ar_resolve_submit "$repo"
python=$(am_python "$repo")

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git -C "$repo" archive --format=tar "$AR_RES_SHA" >"$tmp/src.tar"
[[ $(git get-tar-commit-id <"$tmp/src.tar") == "$AR_RES_SHA" ]] \
    || ar_die 3 "the snapshot of $AR_RES_SHA does not carry that commit id"

env_json=$(jq -n '$ARGS.positional | map(index("=") as $i | {(.[:$i]): .[$i + 1:]}) | add // {}' \
    --args "${AR_RES_PAIRS[@]}")
forward=$(jq -n '$ARGS.named | with_entries(select(.value != ""))' \
    --arg AR_CLIMBMIX_URL "${AR_CLIMBMIX_URL:-}")
# The trainer's own limit inside the call: the wait's deadline for this profile, plus a margin.
profile=$(jq -r '.AR_PROFILE // ""' <<<"$env_json")
limit=$(( $(ar_timeout_s $(( 3 * $(ar_profile_budget "$profile") + 600 ))) + 300 ))

rc=0
am_client "$python" submit --name "$AR_RES_NAME" --tag "$AR_RES_TAG" --commit "$AR_RES_SHA" \
    --env-json "$env_json" --forward-json "$forward" --tar "$tmp/src.tar" --limit-s "$limit" || rc=$?
exit "$rc"
