# shellcheck shell=bash disable=SC2016  # jq programs are single-quoted on purpose
# _vessl.sh -- the VESSL backend's records and vesslctl calls (sourced after _lib.sh, never run).
#
# A job id is the VESSL job slug. Its record is ${AR_STATE_DIR:-<repo>/.ar}/vessl/jobs/<slug>/
# (meta.json, state, log, notes); names/<name> holds the latest slug of a job name
# (VESSL job names are not unique, so the name -> slug record is ours). State changes happen under an
# flock on the job's .lock. Everything the backend keeps on the object volume lives under
# autoresearch/ (see batch-job/README.md, "What is on the volume").

VS_MOUNT=/mnt/ar-cache  # where every job mounts the object volume
VS_PREFIX=autoresearch  # the backend's folder on the volume
VS_VOLUME_RE='^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$'
VS_OUT="" VS_ERR=""

# ---- configuration -------------------------------------------------------------------------------
vs_need_cli() {
    command -v vesslctl >/dev/null 2>&1 \
        || ar_die 3 "'vesslctl' not found; install the VESSL CLI, then run 'vesslctl auth login' (see batch-job/README.md)"
}

# vs_config [SPEC_VAR] -- validates the AUTORESEARCH_* settings a new job needs; sets VS_VOLUME,
# VS_SPEC (from $SPEC_VAR, default AUTORESEARCH_RESOURCE_SPEC), VS_IMAGE, VS_PYTHON, VS_GIT_REMOTE.
vs_config() {
    local spec_var=${1:-AUTORESEARCH_RESOURCE_SPEC}
    VS_VOLUME=${AUTORESEARCH_CACHE_VOLUME:-}
    [[ -n $VS_VOLUME ]] || ar_die 3 "AUTORESEARCH_CACHE_VOLUME is not set: create an object volume once and export its slug, e.g. export AUTORESEARCH_CACHE_VOLUME=my-ar-cache (see batch-job/README.md)"
    [[ $VS_VOLUME =~ $VS_VOLUME_RE ]] || ar_die 2 "bad AUTORESEARCH_CACHE_VOLUME '$VS_VOLUME': expected a volume slug [A-Za-z0-9._-]"
    VS_SPEC=${!spec_var:-}
    [[ -n $VS_SPEC ]] || ar_die 3 "$spec_var is not set: export the resource spec name your VESSL team uses for this job, e.g. export $spec_var=<spec from the VESSL console> (see batch-job/README.md)"
    [[ $VS_SPEC =~ ^[A-Za-z0-9][A-Za-z0-9._:/-]*$ ]] || ar_die 2 "bad $spec_var '$VS_SPEC'"
    VS_IMAGE=${AUTORESEARCH_IMAGE:-python:3.12}
    [[ $VS_IMAGE =~ ^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$ ]] || ar_die 2 "bad AUTORESEARCH_IMAGE '$VS_IMAGE'"
    VS_PYTHON=${AUTORESEARCH_PYTHON:-}
    [[ -z $VS_PYTHON || $VS_PYTHON == /* ]] || ar_die 2 "bad AUTORESEARCH_PYTHON '$VS_PYTHON': an absolute path inside the image"
    [[ $VS_PYTHON != *$'\n'* ]] || ar_die 2 "bad AUTORESEARCH_PYTHON: contains a newline"
    VS_GIT_REMOTE=${AUTORESEARCH_GIT_REMOTE:-}
}

# ---- vesslctl ------------------------------------------------------------------------------------
# vs_call DIR ARGS... -- run `vesslctl ARGS`; DIR is a job record ("-" for none) whose VESSLCTL_ORG /
# VESSLCTL_TEAM are used when the caller's environment has none. Sets VS_OUT (stdout) and VS_ERR
# (the first line of stderr, else of stdout); returns vesslctl's exit code.
vs_call() {
    local dir=$1 errf rc=0 org="" team="" scope=()
    shift
    if [[ $dir != - && -f $dir/meta.json ]]; then
        IFS=$'\t' read -r org team < <(jq -r '[.org // "", .team // ""] | @tsv' "$dir/meta.json")
    fi
    [[ -n ${VESSLCTL_ORG:-} || -z $org ]] || scope+=("VESSLCTL_ORG=$org")
    [[ -n ${VESSLCTL_TEAM:-} || -z $team ]] || scope+=("VESSLCTL_TEAM=$team")
    errf=$(mktemp)
    VS_OUT=$(env "${scope[@]}" vesslctl "$@" 2>"$errf" </dev/null) || rc=$?
    VS_ERR=$(head -c 400 "$errf" | grep -m1 -v '^[[:space:]]*$' || true)
    rm -f "$errf"
    [[ -n $VS_ERR ]] || VS_ERR=$(head -c 400 <<<"$VS_OUT" | grep -m1 -v '^[[:space:]]*$' || true)
    return "$rc"
}

# vs_auth_check -- exit 3 unless `vesslctl auth status` says we are logged in. It exits 0 even when
# logged out, so its words are what counts.
vs_auth_check() {
    local out rc=0 re
    out=$(vesslctl auth status 2>&1 </dev/null) || rc=$?
    re='not[[:space:]_-]*(logged|authenticated|signed|authorized)|logged[[:space:]_-]*out|signed[[:space:]_-]*out'
    re+='|no[[:space:]]+(valid[[:space:]]+)?(credential|token|session|api[[:space:]_-]*key)|unauthenticated|unauthori[sz]ed'
    re+='|(token|session|credential)s?[[:space:]]+(has[[:space:]]+|have[[:space:]]+|is[[:space:]]+)?expired|login[[:space:]]+required'
    if ((rc != 0)) || [[ -z ${out//[[:space:]]/} ]] || grep -Eqi "$re" <<<"$out"; then
        ar_die 3 "not logged in to VESSL (vesslctl auth status: $(grep -m1 -v '^[[:space:]]*$' <<<"$out" || echo "exit $rc")); run 'vesslctl auth login'"
    fi
}

# vs_list DIR -- `vesslctl job list -o json` into VS_LIST (a JSON array); returns 1 on failure or
# output that is not JSON. Accepts a bare array or an object wrapping one (items/jobs/results/data).
vs_list() {
    VS_LIST="[]"
    vs_call "$1" job list -o json || return 1
    VS_LIST=$(jq -ce 'if type == "array" then . elif type == "object" then (.items // .jobs // .results // .data)
        | if type == "array" then . else error("no array") end else error("not a list") end' <<<"$VS_OUT" 2>/dev/null) || {
        VS_LIST="[]"
        VS_ERR="vesslctl job list -o json printed no JSON list: ${VS_ERR:-empty output}"
        return 1
    }
}

# vs_list_named NAME -- slugs of VS_LIST entries named NAME, newest first (by createdAt when present).
vs_list_named() {
    jq -r --arg n "$1" '[.[] | select(type == "object" and .name == $n and (.slug | type) == "string")]
        | sort_by(.createdAt // .created_at // "") | reverse | .[].slug' <<<"$VS_LIST"
}

# vs_show DIR SLUG -- sets VS_NATIVE to the job's workloadState (lowercase); returns 1 (VS_ERR set) when
# vesslctl fails or prints no JSON object with that key.
vs_show() {
    VS_NATIVE=""
    vs_call "$1" job show "$2" -o json || return 1
    VS_NATIVE=$(jq -er 'if type == "object" and (.workloadState | type) == "string" then .workloadState | ascii_downcase
        else error("no workloadState") end' <<<"$VS_OUT" 2>/dev/null) || {
        VS_NATIVE=""
        VS_ERR="vesslctl job show $2 -o json printed no JSON object with a workloadState: ${VS_ERR:-empty output}"
        return 1
    }
}

# vs_map NATIVE -- VESSL's state onto queued|running|succeeded|failed|cancelled; "" when unknown.
vs_map() {
    case ${1,,} in
        queued | pending | scheduling | scheduled | created | initializing | waiting | starting | provisioning) echo queued ;;
        running | terminating | stopping) echo running ;;
        succeeded | completed | complete | success) echo succeeded ;;
        failed | error | errored | crashloopbackoff | oomkilled | lost) echo failed ;;
        terminated | cancelled | canceled | stopped | aborted | killed) echo cancelled ;;
        *) echo "" ;;
    esac
}

# vs_terminate DIR SLUG -- `vesslctl job terminate`, retried; success also when VESSL already reports
# the job as ended. Returns 1 (VS_ERR set) when it could not be stopped.
vs_terminate() {
    local dir=$1 slug=$2 try err=""
    for try in 1 2 3; do
        vs_call "$dir" job terminate "$slug" && return 0
        err=$VS_ERR
        if vs_show "$dir" "$slug"; then
            case $(vs_map "$VS_NATIVE") in succeeded | failed | cancelled) return 0 ;; esac
        fi
        sleep "$try"
    done
    VS_ERR=${err:-unknown error}
    return 1
}

# ---- records -------------------------------------------------------------------------------------

vs_note() { printf '[ar-vessl] %s %s\n' "$(ar_now)" "$2" >>"$1/notes"; }  # vs_note DIR MESSAGE

# vs_collect DIR -- copy the job's log into its record (log.raw). The volume copy comes first
# (runs/<run>/log on the volume: complete, never capped); the CLI log (at most 1000 lines) is the
# fallback. Then rewrites the record's log (vs_write_log).
vs_collect() {
    local dir=$1 slug vol run tmp f src=""
    slug=$(basename "$dir")
    IFS=$'\t' read -r vol run < <(jq -r '[.volume, .run] | @tsv' "$dir/meta.json")
    tmp=$(mktemp -d)
    # `volume download` mirrors `volume upload`; where a vesslctl lacks it, the CLI log is used.
    if vs_call "$dir" volume download "$vol" "$tmp/vol" --remote-prefix "$VS_PREFIX/runs/$run/"; then
        f=$(find "$tmp/vol" -type f -name log 2>/dev/null | head -n 1)
        [[ -z $f || ! -s $f ]] || { cp "$f" "$tmp/log" && src=volume; }
    else
        vs_note "$dir" "volume copy of runs/$run not readable (vesslctl volume download: ${VS_ERR:-failed}); using the CLI log"
    fi
    if vs_call "$dir" job logs --limit 1000 "$slug"; then
        printf '%s\n' "$VS_OUT" >"$tmp/cli.log"
        [[ -n $src ]] || { cp "$tmp/cli.log" "$tmp/log" && src=cli; }
    else
        vs_note "$dir" "vesslctl job logs failed: ${VS_ERR:-unknown error}"
    fi
    if [[ -n $src ]]; then ar_write "$dir/log.raw" <"$tmp/log"; fi
    rm -rf "$tmp"
    vs_write_log "$dir"
}

vs_write_log() {  # the record's log: the job's own log, then our notes
    { cat "$1/log.raw" 2>/dev/null || true; cat "$1/notes" 2>/dev/null || true; } | ar_write "$1/log"
}

# vs_settle DIR MAPPED NATIVE -- a job VESSL reports as ended: collect its log, then record MAPPED
# (succeeded: the job's command, so the trainer, exited 0).
vs_settle() {
    local dir=$1 mapped=$2 native=$3 final=$2
    vs_collect "$dir"
    if ar_transition "$dir" "$final" queued running; then
        ar_meta_set "$dir" '.native_state = $n' --arg n "$native"
        vs_note "$dir" "VESSL state $native -> $final"
        vs_write_log "$dir"
    fi
}

# vs_poll DIR -- refresh a job's record from VESSL; sets VS_STATE (the recorded state afterwards).
# Returns 1 (VS_ERR set) when VESSL could not be asked; the record then stays as it was.
vs_poll() {
    local dir=$1 slug mapped
    slug=$(basename "$dir")
    VS_STATE=$(ar_state "$dir")
    ar_is_terminal "$VS_STATE" && return 0
    vs_show "$dir" "$slug" || return 1
    mapped=$(vs_map "$VS_NATIVE")
    case $mapped in
        running) ar_transition "$dir" running queued || true ;;
        succeeded | failed | cancelled) vs_settle "$dir" "$mapped" "$VS_NATIVE" ;;
        queued) ;;
        *) VS_ERR="unknown VESSL state '$VS_NATIVE' for $slug (treated as not ended)"; VS_STATE=$(ar_state "$dir"); return 1 ;;
    esac
    VS_STATE=$(ar_state "$dir")
}

# vs_cancel DIR TO REASON -- terminate a job that has not ended and record TO (cancelled|timeout).
# Returns 1 when it had already ended (nothing done) and 2 when terminate failed (record unchanged,
# so the next cancel-jobs.sh tries again).
vs_cancel() {
    local dir=$1 to=$2 reason=$3 slug
    slug=$(basename "$dir")
    ar_is_terminal "$(ar_state "$dir")" && return 1
    if ! vs_terminate "$dir" "$slug"; then
        vs_note "$dir" "terminate FAILED ($VS_ERR); run batch-job/cancel-jobs.sh $slug or 'vesslctl job terminate $slug'"
        ar_warn "$slug: vesslctl job terminate failed: $VS_ERR (still billing? run batch-job/cancel-jobs.sh $slug)"
        return 2
    fi
    ar_transition "$dir" "$to" queued running || return 1
    vs_note "$dir" "$to: $reason (vesslctl job terminate $slug)"
    vs_collect "$dir"
}

# vs_slugs_in_list NAME -- every slug VS_LIST has for NAME, one per line (for "which one is new?")
vs_slugs_in_list() { vs_list_named "$1" | LC_ALL=C sort; }

# vs_find_new_slug NAME KNOWN_FILE -- the newest slug named NAME that is not in KNOWN_FILE (sorted
# slugs), retried while the new job is not listed yet. Sets VS_SLUG; returns 1 when none appears.
vs_find_new_slug() {
    local name=$1 known=$2 tries=${AR_VESSL_LIST_TRIES:-10} delay=${AR_VESSL_LIST_DELAY_S:-2} i s
    VS_SLUG=""
    [[ $tries =~ ^[1-9][0-9]{0,3}$ ]] || ar_die 2 "bad AR_VESSL_LIST_TRIES '$tries': a positive integer"
    [[ $delay =~ ^[0-9]+([.][0-9]+)?$ ]] || ar_die 2 "bad AR_VESSL_LIST_DELAY_S '$delay': a number of seconds"
    for ((i = 1; i <= tries; i++)); do
        if vs_list -; then
            while IFS= read -r s; do
                [[ -n $s ]] || continue
                if ! grep -qxF -- "$s" "$known"; then VS_SLUG=$s; return 0; fi
            done < <(vs_list_named "$name")
        else
            ar_warn "note: $VS_ERR (try $i of $tries)"
        fi
        ((i == tries)) || sleep "$(awk -v d="$delay" -v i="$i" 'BEGIN { print d * (i < 4 ? i : 4) }')"
    done
    return 1
}

# vs_upload_file ROOT LOCAL_FILE REMOTE_DIR -- `vesslctl volume upload` unless this state dir already
# uploaded that file name to that prefix of the volume (a marker under ROOT/uploads/<volume>/).
vs_upload_file() {
    local root=$1 file=$2 prefix=$3 marker
    marker=$root/uploads/$VS_VOLUME/${prefix//\//_}$(basename "$file")
    [[ -f $marker ]] && return 0
    vs_call - volume upload "$VS_VOLUME" "$file" --remote-prefix "$prefix" \
        || ar_die 3 "vesslctl volume upload to $VS_VOLUME failed: $VS_ERR (does the volume exist? check AUTORESEARCH_CACHE_VOLUME)"
    mkdir -p "$(dirname "$marker")"
    ar_now | ar_write "$marker"
}

# vs_ship_code ROOT REPO SHA -- make commit SHA reachable for the job. Default: a git bundle of that
# commit uploaded to the volume (code/<sha>.bundle; nothing is pushed anywhere). With
# AUTORESEARCH_GIT_REMOTE: push SHA to refs/autoresearch/commits/<sha> of that remote (no branch, no
# force) and let the job fetch it. Adds the job's AR_VESSL_ code settings to VS_JOB_ENV.
vs_ship_code() {
    local root=$1 repo=$2 sha=$3 tmp objects url
    if [[ -n $VS_GIT_REMOTE ]]; then
        url=$(git -C "$repo" remote get-url "$VS_GIT_REMOTE" 2>/dev/null) || url=$VS_GIT_REMOTE
        git -C "$repo" push --quiet "$VS_GIT_REMOTE" "$sha:refs/autoresearch/commits/$sha" >&2 \
            || ar_die 3 "git push of $sha to AUTORESEARCH_GIT_REMOTE '$VS_GIT_REMOTE' failed (unset it to ship a bundle instead)"
        VS_JOB_ENV+=("AR_VESSL_GIT_URL=$url")
        return 0
    fi
    [[ -f $root/uploads/$VS_VOLUME/${VS_PREFIX}_code_$sha.bundle ]] && return 0
    tmp=$(mktemp -d)
    objects=$(git -C "$repo" rev-parse --path-format=absolute --git-common-dir)/objects
    # A throw-away repository borrowing the objects: no ref is created in yours.
    git init --quiet --bare "$tmp/b.git"
    echo "$objects" >"$tmp/b.git/objects/info/alternates"
    git -C "$tmp/b.git" update-ref refs/heads/autoresearch-job "$sha"
    git -C "$tmp/b.git" bundle create --quiet "$tmp/$sha.bundle" refs/heads/autoresearch-job \
        || { rm -rf "$tmp"; ar_die 3 "git bundle of $sha failed"; }
    vs_upload_file "$root" "$tmp/$sha.bundle" "$VS_PREFIX/code/"
    rm -rf "$tmp"
}

# vs_ship_entry ROOT HERE -- upload _job.sh as bin/job-<sha256[:12]>.sh (content-addressed: an edit
# never changes what a queued job runs); sets VS_CMD, the job's command line (no user value in it).
vs_ship_entry() {
    local root=$1 here=$2 hash tmp
    hash=$(sha256sum "$here/_job.sh" | cut -c1-12)
    tmp=$(mktemp -d)
    cp "$here/_job.sh" "$tmp/job-$hash.sh"
    vs_upload_file "$root" "$tmp/job-$hash.sh" "$VS_PREFIX/bin/"
    rm -rf "$tmp"
    VS_CMD="bash $VS_MOUNT/$VS_PREFIX/bin/job-$hash.sh"
}

# vs_create_guarded ROOT NAME KNOWN_FILE WHAT -- vs_create under an EXIT trap: until vs_handed_out,
# a failure, SIGINT or SIGTERM of the calling script terminates the job it created (or that appeared
# around an interrupted create): never an orphan. The trap also removes KNOWN_FILE. WHAT names the
# caller in the warning. Sets VS_SLUG.
VS_GUARD_NAME="" VS_GUARD_KNOWN="" VS_GUARD_WHAT="" VS_GUARD_CREATING="" VS_GUARD_CREATED=""
vs_guard_exit() {
    local rc=$?
    if ((rc != 0)) && [[ -z $VS_GUARD_CREATED && -n $VS_GUARD_CREATING ]] \
        && AR_VESSL_LIST_TRIES=2 vs_find_new_slug "$VS_GUARD_NAME" "$VS_GUARD_KNOWN"; then
        VS_GUARD_CREATED=$VS_SLUG  # interrupted around create: the job exists after all
    fi
    rm -f "$VS_GUARD_KNOWN"
    if ((rc != 0)) && [[ -n $VS_GUARD_CREATED ]]; then
        ar_warn "terminating $VS_GUARD_CREATED: $VS_GUARD_WHAT failed after creating it"
        vs_terminate - "$VS_GUARD_CREATED" \
            || ar_warn "could not terminate $VS_GUARD_CREATED: $VS_ERR; run 'vesslctl job terminate $VS_GUARD_CREATED'"
    fi
}
vs_create_guarded() {
    VS_GUARD_NAME=$2 VS_GUARD_KNOWN=$3 VS_GUARD_WHAT=$4 VS_GUARD_CREATED=""
    trap vs_guard_exit EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    VS_GUARD_CREATING=1
    vs_create "$1" "$2" "$3"
    VS_GUARD_CREATED=$VS_SLUG
}
vs_handed_out() { VS_GUARD_CREATED="" VS_GUARD_CREATING=""; }  # the job is recorded: the caller owns it now

# vs_create ROOT NAME KNOWN_FILE -- `vesslctl job create` with VS_CMD, VS_TAGS and VS_JOB_ENV, then
# the slug: from create's output when it prints JSON with one, else the newest job named NAME that
# is not in KNOWN_FILE (listed after a delay, so retried). Sets VS_SLUG; exits 3 on failure. Call it
# through vs_create_guarded, whose EXIT trap terminates a job that exists after a failure.
vs_create() {
    local root=$1 name=$2 known=$3 args t kv
    args=(job create -n "$name" -r "$VS_SPEC" -i "$VS_IMAGE" --cmd "$VS_CMD"
        --object-volume "$VS_VOLUME:$VS_MOUNT")
    for t in "${VS_TAGS[@]}"; do
        [[ $t =~ ^[a-z0-9]([a-z0-9-]*[a-z0-9])?$ ]] || ar_die 2 "bad tag '$t': lowercase letters, digits and hyphens only"
        args+=(--tag "$t")
    done
    for kv in "${VS_JOB_ENV[@]}"; do args+=(--env "$kv"); done
    VS_SLUG=""
    vs_call - "${args[@]}" \
        || ar_die 3 "vesslctl job create failed: $VS_ERR (check AUTORESEARCH_RESOURCE_SPEC, AUTORESEARCH_IMAGE, quota)"
    VS_SLUG=$(jq -r 'if type == "object" then (.slug // .job.slug // empty) else empty end' <<<"$VS_OUT" 2>/dev/null || true)
    if [[ -z $VS_SLUG ]] && ! vs_find_new_slug "$name" "$known"; then
        ar_die 3 "job '$name' was created but never appeared in 'vesslctl job list' ($VS_ERR); find it there and terminate it if it runs"
    fi
    [[ $VS_SLUG =~ $AR_ID_RE ]] || ar_die 3 "VESSL returned the slug '$VS_SLUG', unusable as a job id"
}
