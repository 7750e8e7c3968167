# _vessl.sh -- sourced by the scripts of batch-job/: the few vesslctl calls they share.
# shellcheck shell=bash
die() { echo "${me:-batch-job}: $2" >&2; exit "$1"; }
help() { sed -n '2,/^set -/s/^# \{0,1\}//p' "$0"; exit 0; }
case ${1:-} in -h | --help) help ;; esac  # needs no vesslctl
command -v vesslctl >/dev/null || die 3 "vesslctl not found: install it (VESSL Cloud docs, 'CLI') and run 'vesslctl auth login'"
command -v jq >/dev/null || die 3 "jq not found: install it (apt-get install jq, brew install jq)"
VOLUME=${AUTORESEARCH_CACHE_VOLUME:-} ID_RE='^[a-z0-9][a-z0-9-]{0,80}$'
need_volume() {
    [[ -n $VOLUME ]] || die 3 "AUTORESEARCH_CACHE_VOLUME is not set: the slug of your object volume (vesslctl volume list)"
}
native() {  # native SLUG -- the job's workloadState; exit 2 for an unknown id, 3 when VESSL cannot be asked
    local out
    [[ $1 =~ $ID_RE ]] || die 2 "unknown job id '$1'"
    out=$(vesslctl job show "$1" -o json 2>&1 </dev/null) \
        || { [[ ${out,,} != *"not found"* ]] || die 2 "unknown job id '$1'"; die 3 "vesslctl job show $1: ${out%%$'\n'*}"; }
    jq -er '.workloadState | ascii_downcase' <<<"$out" 2>/dev/null || die 3 "vesslctl job show $1 printed no workloadState"
}
state() {  # state NATIVE -- VESSL's state as the contract's: queued running succeeded failed cancelled
    case $1 in
        succeeded | completed) echo succeeded ;;
        failed | error) echo failed ;;
        terminated | cancelled | canceled | stopped) echo cancelled ;;
        running) echo running ;;
        *) echo queued ;;  # scheduling, pending, ... and anything new: not ended
    esac
}
terminate() {  # terminate SLUG -- ends it; a job that ended meanwhile is not an error
    local out
    out=$(vesslctl job terminate "$1" 2>&1 </dev/null) && return 0
    case $(state "$(native "$1")") in succeeded | failed | cancelled) return 0 ;; esac
    echo "${me:-batch-job}: vesslctl job terminate $1: ${out%%$'\n'*}" >&2
    return 1
}
