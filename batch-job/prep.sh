#!/usr/bin/env bash
# prep.sh -- fill the object volume once: run the project's prepare script as a VESSL job and wait.
#
# Usage: batch-job/prep.sh [--commit REV] [ARG...]      e.g. batch-job/prep.sh --profile full
#
# Runs `python prepare/prepare.py ARG...` (or `python prepare.py ARG...` in a karpathy-layout project;
# `uv run` in front when the commit has uv.lock) of commit REV (default HEAD, clean tree) as a job of
# submit-async.sh named ar-prep-<commit>-<hash of the ARGs>. The script writes its cache on the job's
# local disk; the job then copies the files the volume does not have yet onto it (plain writes:
# nothing on the volume is overwritten, renamed or linked). Run it once per data set / profile.
# Settings: submit-async.sh's (a CPU resource spec is enough: AUTORESEARCH_RESOURCE_SPEC=<cpu spec>
# batch-job/prep.sh); AR_TIMEOUT_S, default 7200.
# stdout: the job's `prepared:` lines. stderr: progress, and the log tail when it failed.
# Exit: 0 prepared, 1 the job failed, 2 usage or precondition, 3 VESSL unavailable, 130/143 interrupted
# (the job terminated).
set -euo pipefail
me=prep.sh here=$(cd "$(dirname "$0")" && pwd)
die() { echo "$me: $2" >&2; exit "$1"; }
commit="" args=()
while (($#)); do
    case $1 in
        -h | --help) sed -n '2,/^set -/s/^# \{0,1\}//p' "$0"; exit 0 ;;
        --commit) (($# > 1)) || die 2 "--commit needs a value (see --help)"; commit=$2; shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
root=$(git -C "$here" rev-parse --show-toplevel 2>/dev/null) || die 2 "$here is not inside a git repository"
[[ $commit != -* ]] || die 2 "unknown commit '$commit'"
sha=$(git -C "$root" rev-parse --verify --quiet "${commit:-HEAD}^{commit}") || die 2 "unknown commit '$commit'"
entry=prepare.py
if git -C "$root" cat-file -e "$sha:prepare/prepare.py" 2>/dev/null; then entry=prepare/prepare.py; fi
git -C "$root" cat-file -e "$sha:$entry" 2>/dev/null || die 2 "commit ${sha:0:10} has no prepare.py nor prepare/prepare.py"
cmd="python $entry${args[*]:+ $(printf '%q ' "${args[@]}")}"
if git -C "$root" cat-file -e "$sha:uv.lock" 2>/dev/null; then cmd="uv run $cmd"; fi
name=ar-prep-${sha:0:10}-$(printf %s "$cmd" | cksum | cut -c1-6)
slug=$(AR_TRAIN_CMD=$cmd AR_PREP=1 "$here/submit-async.sh" ${commit:+--commit "$sha"} --name "$name") || exit
echo "$me: $slug runs '$cmd'; waiting (Ctrl-C terminates it)" >&2
out=$(mktemp)
trap 'rm -f "$out"' EXIT
AR_TIMEOUT_S=${AR_TIMEOUT_S:-7200} "$here/wait-jobs.sh" "$slug" >"$out" &
pid=$! sig=""
trap 'sig=130; kill -TERM "$pid" 2>/dev/null || true' INT  # a background job ignores SIGINT: it gets a TERM
trap 'sig=143; kill -TERM "$pid" 2>/dev/null || true' TERM
rc=0
wait "$pid" || rc=$?
while kill -0 "$pid" 2>/dev/null; do rc=0; wait "$pid" || rc=$?; done  # a trap ended the wait: again
[[ -z $sig ]] || exit "$sig"
if ((rc == 0)); then grep '^prepared' "$out" || true; exit 0; fi
cat "$out" >&2
exit "$((rc == 1 ? 1 : rc))"
