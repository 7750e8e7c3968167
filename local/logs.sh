#!/usr/bin/env bash
# logs.sh -- print a local job's full log (trainer stdout + stderr and [ar-local] notes).
#
# Usage: local/logs.sh ID
#
# stdout: the log as it is now (empty while the job is queued).
# Exit: 0, 2 usage error or unknown id.
#
# Env: AR_STATE_DIR.
# Contract: docs/contract.md
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
# shellcheck source=local/_lib.sh
source "$here/_lib.sh"
# shellcheck source=local/_local.sh
source "$here/_local.sh"
AR_PROG=logs.sh

ar_parse_ids "$@"
(($# == 1)) || ar_die 2 "one job id at a time (see --help)"
dir=$(ar_job_dir "$(ar_state_root "$repo" local)" "$1")
cat "$dir/log" 2>/dev/null || true
