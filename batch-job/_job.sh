#!/usr/bin/env bash
# _job.sh -- the entry point of every VESSL job of this backend (runs inside the job's container).
#
# submit-async.sh / prep.sh upload it to the object volume as autoresearch/bin/job-<sha256[:12]>.sh
# and start the job with `--cmd "bash <mount>/autoresearch/bin/job-<hash>.sh"`; the volume root is
# found from this file's own path. Every user value (the commit, profile, paths) arrives as an
# environment variable set with `vesslctl job create --env K=V`; nothing is spliced into a command.
#
# Env (set by the submitter):
#   AR_VESSL_MODE     train (default): python trainer/train.py | prepare: python prepare/prepare.py
#   AR_VESSL_COMMIT   the full sha to run; the checkout is verified against it (else exit 1, loudly)
#   AR_VESSL_RUN      <job name>/<run id>: this run's folder under autoresearch/runs/ on the volume
#   AR_VESSL_GIT_URL  fetch refs/autoresearch/commits/<sha> from this URL (AUTORESEARCH_GIT_REMOTE)
#                     instead of autoresearch/code/<sha>.bundle on the volume
#   AR_VESSL_PYTHON   an interpreter of the image that already has the dependencies: no venv at all
#   AR_VESSL_MAX_S    hard limit of the whole job, seconds (SIGTERM, SIGKILL 30 s later)
#   AR_PROFILE, AR_DATA (and AR_CLIMBMIX_URL) when set at submit, as they are
#
# What it does, and what it does not (the per-job overhead; see batch-job/README.md):
#   1. git fetch of the commit from the bundle on the volume (or the remote), HEAD verified.
#   2. Python: AR_VESSL_PYTHON, else the venv autoresearch/venv/<key>/ on the volume, <key> = sha256
#      of (pyproject.toml, python X.Y); built once (pip) by the first job that needs it, reused by
#      every later job. No apt-get unless the image lacks git.
#   3. AR_CACHE_DIR=autoresearch/cache on the volume (data, tokenizer from prep.sh; the trainer puts
#      TORCHINDUCTOR_CACHE_DIR under it, so compiled kernels persist across jobs).
#   4. The trainer; its exit_code and its full log (tee'd all along) are in autoresearch/runs/<run>/
#      on the volume. Its result is the summary block at the end of that log.
# Exit: the trainer's code; 1 setup failure; 143 terminated; 124 hard limit.
set -euo pipefail

if [[ -z ${AR_VESSL_INNER:-} && ${AR_VESSL_MAX_S:-} =~ ^[1-9][0-9]*$ ]] && command -v timeout >/dev/null 2>&1; then
    export AR_VESSL_INNER=1
    exec timeout -k 30 "$AR_VESSL_MAX_S" bash "$0" "$@"
fi

t_start=${EPOCHREALTIME//[!0-9]/}
base=$(cd "$(dirname "$0")/.." && pwd)  # <mount>/autoresearch
mode=${AR_VESSL_MODE:-train}
sha=${AR_VESSL_COMMIT:-}
run=${AR_VESSL_RUN:-}

ms_since() { echo $(((${EPOCHREALTIME//[!0-9]/} - $1) / 1000)); }
secs() { awk -v m="$1" 'BEGIN { printf "%.1f", m / 1000 }'; }
note() { printf '[ar-vessl] %s %s\n' "$(date -u +%H:%M:%S)" "$*" || true; }

work=$(mktemp -d "${TMPDIR:-/tmp}/ar-job.XXXXXX")
rundir=""
if [[ $run =~ ^[a-z0-9][a-z0-9-]*/[a-z0-9][a-z0-9-]*$ ]] && mkdir -p "$base/runs/$run" 2>/dev/null; then
    rundir=$base/runs/$run
fi

# Everything this script and the trainer print goes to the job's stdout and to the volume's log.
# tee -p: a failed write to the volume never stops the job's own output.
trap '' PIPE
exec 3>&1 4>&2
tee_pid=""
if [[ -n $rundir ]]; then
    mkfifo "$work/out"
    tee -p "$rundir/log" <"$work/out" >&3 2>&4 &
    tee_pid=$!
    exec >"$work/out" 2>&1
fi
# shellcheck disable=SC2329  # invoked by the EXIT trap
finish() {
    local rc=$? i
    trap - EXIT
    exec 1>&3 2>&4
    if [[ -n $tee_pid ]]; then  # tee ends when the last writer is gone; a stray child may hold the fifo
        for ((i = 0; i < 100; i++)); do kill -0 "$tee_pid" 2>/dev/null || break; sleep 0.1; done
        kill "$tee_pid" 2>/dev/null || true
        wait "$tee_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
    exit "$rc"
}
trap finish EXIT

fail() {  # fail STAGE MESSAGE -- a setup failure: a note and the FAIL line (the crash reason), exit 1
    local stage=$1
    shift
    note "setup stage '$stage' failed"
    printf 'FAIL: %s\n' "$*"
    [[ -z $rundir ]] || echo 1 >"$rundir/exit_code" 2>/dev/null || true
    exit 1
}

child=""
# shellcheck disable=SC2329  # invoked by the TERM/INT trap
on_signal() {
    if [[ -n $child ]]; then
        kill -TERM "$child" 2>/dev/null || true
    else
        fail setup "terminated before the trainer started"
    fi
}
trap on_signal TERM INT

[[ -n $rundir ]] || fail setup "AR_VESSL_RUN '$run' is not <name>/<run id>, or $base/runs is not writable"
[[ $sha =~ ^[0-9a-f]{40}$ ]] || fail setup "AR_VESSL_COMMIT '$sha' is not a full commit sha"
[[ $mode == train || $mode == prepare ]] || fail setup "AR_VESSL_MODE '$mode' is neither train nor prepare"
note "job ${run%%/*}: commit $sha, mode $mode, volume $base, host $(hostname 2>/dev/null || echo '?')"

# ---- 1. the code ---------------------------------------------------------------------------------
t0=${EPOCHREALTIME//[!0-9]/}
if ! command -v git >/dev/null 2>&1; then
    note "git is not in the image: installing it (costs every job time; use an image that has git)"
    if command -v apt-get >/dev/null 2>&1; then
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends git ca-certificates; } >/dev/null 2>&1 \
            || fail code "git is missing from the image and apt-get could not install it"
    else
        fail code "git is missing from the image (and no apt-get); set AUTORESEARCH_IMAGE to an image with git"
    fi
fi
src=$work/src
git init --quiet "$src"
if [[ -n ${AR_VESSL_GIT_URL:-} ]]; then
    from=$AR_VESSL_GIT_URL
    git -C "$src" fetch --quiet --no-tags --depth 1 "$from" "refs/autoresearch/commits/$sha" \
        || git -C "$src" fetch --quiet --no-tags "$from" "refs/autoresearch/commits/$sha" \
        || fail code "cannot fetch refs/autoresearch/commits/$sha from AR_VESSL_GIT_URL (credentials? was it pushed?)"
else
    from=$base/code/$sha.bundle
    [[ -f $from ]] || from=$(find "$base/code" -type f -name "$sha.bundle" 2>/dev/null | head -n 1)
    [[ -n $from && -f $from ]] || fail code "no bundle $sha.bundle under $base/code (was it uploaded to this volume?)"
    git -C "$src" fetch --quiet --no-tags "$from" refs/heads/autoresearch-job \
        || fail code "cannot fetch the commit from $from"
fi
git -C "$src" -c advice.detachedHead=false checkout --quiet FETCH_HEAD || fail code "checkout of $sha failed"
head=$(git -C "$src" rev-parse HEAD)
[[ $head == "$sha" ]] || fail code "checked out $head, but the job was submitted for $sha; refusing to run other code"
ms_code=$(ms_since "$t0")

# ---- 2. python -----------------------------------------------------------------------------------
t0=${EPOCHREALTIME//[!0-9]/}
venv_build() {  # venv_build BASE_PY VENV -- build VENV (pip-installs pyproject's dependencies)
    local base_py=$1 venv=$2 reqs=()
    if [[ -f $src/pyproject.toml ]]; then
        mapfile -t reqs < <("$base_py" -c 'import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"].get("dependencies", [])))' "$src/pyproject.toml" | grep -v '^$' || true)
    fi
    rm -rf "$venv"
    if ((${#reqs[@]} == 0)); then
        "$base_py" -m venv --without-pip "$venv" 2>/dev/null || "$base_py" -m venv --without-pip --copies "$venv"
        return
    fi
    # symlinks by default; --copies where the volume cannot hold symlinks
    "$base_py" -m venv "$venv" 2>/dev/null || { rm -rf "$venv"; "$base_py" -m venv --copies "$venv"; }
    "$venv/bin/python" -m pip install --quiet --no-input --disable-pip-version-check "${reqs[@]}"
}
if [[ -n ${AR_VESSL_PYTHON:-} ]]; then
    py=$AR_VESSL_PYTHON
    [[ -x $py ]] || fail python "AR_VESSL_PYTHON '$py' is not an executable in this image"
    note "python: $py (AUTORESEARCH_PYTHON; no venv)"
else
    base_py=$(command -v python3) || fail python "python3 not found in the image; set AUTORESEARCH_IMAGE or AUTORESEARCH_PYTHON"
    ver=$("$base_py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    "$base_py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || fail python "python3 is $ver; the trainer needs >= 3.11"
    key=$({ cat "$src/pyproject.toml" 2>/dev/null || true; printf '\npython %s\n' "$ver"; } | sha256sum | cut -c1-16)
    venv=$base/venv/$key
    py=$venv/bin/python
    if [[ -f $venv.ready && -x $py ]]; then
        note "python: venv $key reused from the volume"
    else
        mkdir -p "$base/venv"
        wait_s=${AR_VESSL_VENV_WAIT_S:-1200}
        [[ $wait_s =~ ^[0-9]+$ ]] || wait_s=1200
        for ((waited = 0; ; waited += 2)); do
            if mkdir "$venv.lock" 2>/dev/null; then
                note "python: building venv $key on the volume (once per pyproject.toml and python version)"
                venv_build "$base_py" "$venv" || { rm -rf "$venv.lock"; fail python "building the venv $venv failed"; }
                date -u +%Y-%m-%dT%H:%M:%SZ >"$venv.ready"
                rm -rf "$venv.lock"
                break
            fi
            [[ -f $venv.ready && -x $py ]] && { note "python: venv $key built by another job, reused"; break; }
            if ((waited >= wait_s)); then  # the builder died: take its lock over
                note "python: venv lock $venv.lock is older than ${wait_s}s; breaking it"
                rm -rf "$venv.lock"
                waited=0
            fi
            sleep 2
        done
    fi
fi
ms_python=$(ms_since "$t0")

# ---- 3. run --------------------------------------------------------------------------------------
export AR_CACHE_DIR=${AR_CACHE_DIR:-$base/cache}
mkdir -p "$AR_CACHE_DIR"
export PYTHONUNBUFFERED=1
note "ready in $(secs "$(ms_since "$t_start")") s (code $(secs "$ms_code") s, python $(secs "$ms_python") s); AR_CACHE_DIR=$AR_CACHE_DIR"
cd "$src"
if [[ $mode == prepare ]]; then
    "$py" prepare/prepare.py </dev/null &
else
    "$py" trainer/train.py </dev/null &
fi
child=$!
rc=0
while :; do
    wait "$child" && rc=0 || rc=$?
    kill -0 "$child" 2>/dev/null || break
done
child=""
echo "$rc" >"$rundir/exit_code" 2>/dev/null || true
note "exit $rc after $(secs "$(ms_since "$t_start")") s"
exit "$rc"
