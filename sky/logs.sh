#!/usr/bin/env bash
# logs.sh -- print a SkyPilot job's full log (trainer stdout + stderr and [ar-sky] notes).
#
# Usage: sky/logs.sh ID
#
# stdout: the log as it is now, without SkyPilot's `(task, pid=N) ` line prefixes: for a job that
# ended, the copy fetched when it ended; for a running one, `sky logs CLUSTER N --no-follow --tail 0`
# (a managed job: `sky jobs logs N --no-follow --tail 0`; never follows). Empty while the job is queued. The SkyPilot job is named in the first [ar-sky] line.
# Exit: 0, 2 usage error or unknown id.
#
# Env: AR_STATE_DIR, AR_SKY_CWD.
# Contract: docs/contract.md
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
# shellcheck source=sky/_lib.sh
source "$here/_lib.sh"
# shellcheck source=sky/_sky.sh
source "$here/_sky.sh"
AR_PROG=logs.sh

ar_parse_ids "$@"
(($# == 1)) || ar_die 2 "one job id at a time (see --help)"
ar_need jq flock timeout
dir=$(ar_job_dir "$(ar_state_root "$repo" sky)" "$1")
if command -v sky >/dev/null 2>&1; then
    sk_refresh "$dir"
fi
cat "$dir/log" 2>/dev/null || true
jid=$(ar_meta "$dir" '.sky_job_id // empty')
if [[ -n $jid ]] && ! ar_is_terminal "$(ar_state "$dir")"; then
    sk_remote_log "$dir" 2>/dev/null | sk_strip || true
fi
