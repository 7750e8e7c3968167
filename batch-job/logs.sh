#!/usr/bin/env bash
# logs.sh -- print a VESSL job's log (the job's stdout + stderr and [ar-vessl] notes).
#
# Usage: batch-job/logs.sh ID
#
# stdout: for a job that ended and was collected by wait-jobs.sh / cancel-jobs.sh, its full log as
# kept in the record (the copy from the volume, not capped); otherwise what
# `vesslctl job logs --limit 1000 ID` returns now (empty while the job is queued).
# Exit: 0, 2 usage error or unknown id, 3 vesslctl failed and there is no recorded log.
#
# Env: AR_STATE_DIR, VESSLCTL_ORG / VESSLCTL_TEAM (default: those recorded at submit).
# Contract: docs/contract.md
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
# shellcheck source=batch-job/_lib.sh
source "$here/_lib.sh"
# shellcheck source=batch-job/_vessl.sh
source "$here/_vessl.sh"
AR_PROG=logs.sh

ar_parse_ids "$@"
(($# == 1)) || ar_die 2 "one job id at a time (see --help)"
ar_need jq
root=$(ar_state_root "$repo" vessl)
dir=$(ar_job_dir "$root" "$1" "not submitted from this state dir: ${root%/vessl}")
if ar_is_terminal "$(ar_state "$dir")" && [[ -f $dir/log ]]; then
    cat "$dir/log"
    exit 0
fi
vs_need_cli
if vs_call "$dir" job logs --limit 1000 "$1"; then
    [[ -z $VS_OUT ]] || printf '%s\n' "$VS_OUT"
elif [[ -f $dir/log ]]; then
    cat "$dir/log"
else
    ar_die 3 "vesslctl job logs $1 failed: $VS_ERR"
fi
