#!/usr/bin/env bash
# submit.sh -- run one experiment on VESSL and wait for it (a linear keep/discard loop's one step).
#
# Usage: batch-job/submit.sh [--commit REV] [--name NAME]
#
# submit-async.sh with the same arguments, then wait-jobs.sh on the job id (printed on stderr).
# stdout: the wait-jobs.sh block: `=== ID (STATE) ===` and the summary block or the log tail.
# Exit: that of submit-async.sh when it fails, else that of wait-jobs.sh (0 only if the job succeeded;
#       130/143 interrupted, after terminating the job).
#
# Env: everything submit-async.sh and wait-jobs.sh read (AUTORESEARCH_*, AR_TAG, AR_PROFILE,
#      AR_TIMEOUT_S, ...).
# Contract: docs/contract.md
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=batch-job/_lib.sh
source "$here/_lib.sh"
AR_PROG=submit.sh

case ${1:-} in
    -h | --help) ar_usage "$0"; exit 0 ;;
esac
id=$("$here/submit-async.sh" "$@")
ar_warn "job $id submitted; waiting (batch-job/logs.sh $id shows its log)"
exec "$here/wait-jobs.sh" "$id"
