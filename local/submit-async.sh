#!/usr/bin/env bash
# submit-async.sh -- run one commit of this project as a job on this machine; prints the job id.
#
# Usage: local/submit-async.sh [--commit REV] [--name NAME]
#
#   --commit REV  the commit to run; default HEAD, and then changes to tracked files are refused
#   --name NAME   ^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$, default ar-<first 10 hex of the commit>. A name
#                 whose job is queued, running or succeeded prints that job's id and starts nothing;
#                 after a failed, timed-out or cancelled one a new job <name>-2 (-3, ...) starts.
#
# stdout: the job id. The job runs detached, from a snapshot of the commit in .ar/local/jobs/<id>/,
# when a slot is free. Settings: AR_TRAIN_CMD, AR_LOCAL_SLOTS (local/README.md).
# Exit: 0 submitted (or the existing job), 2 usage or precondition, 3 git, flock, python or uv missing.
set -euo pipefail
me=submit-async.sh here=$(cd "$(dirname "$0")" && pwd)
die() { echo "$me: $2" >&2; exit "$1"; }
commit="" name=""
while (($#)); do
    case $1 in
        -h | --help) sed -n '2,/^set -/s/^# \{0,1\}//p' "$0"; exit 0 ;;
        --commit | --name) (($# > 1)) || die 2 "$1 needs a value (see --help)"; printf -v "${1#--}" %s "$2"; shift 2 ;;
        *) die 2 "unknown argument '$1' (see --help)" ;;
    esac
done
[[ -z $name || $name =~ ^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$ ]] \
    || die 2 "bad --name '$name': lowercase letters, digits and '-', at most 63, no '-' at either end"
for t in git flock setsid; do
    command -v "$t" >/dev/null || die 3 "$t not found: install it (flock and setsid are in util-linux)"
done
root=$(git -C "$here" rev-parse --show-toplevel 2>/dev/null) || die 2 "$here is not inside a git repository"
[[ -n $commit || -z $(git -C "$root" status --porcelain --untracked-files=no) ]] \
    || die 2 "uncommitted changes to tracked files: commit them, or pass --commit REV to run a commit as it is"
commit=${commit:-HEAD}
[[ $commit != -* ]] || die 2 "unknown commit '$commit'"
sha=$(git -C "$root" rev-parse --verify --quiet "$commit^{commit}") || die 2 "unknown commit '$commit'"
name=${name:-ar-${sha:0:10}}
need=python  # what the default train command needs
if git -C "$root" cat-file -e "$sha:uv.lock" 2>/dev/null; then need=uv; fi
[[ -n ${AR_TRAIN_CMD:-} ]] || PATH=$root/.venv/bin:$PATH command -v "$need" >/dev/null \
    || die 3 "$need not found: install it (or create .venv), or set AR_TRAIN_CMD"
# Slots: one per GPU (CUDA_VISIBLE_DEVICES, else nvidia-smi -L), else one per CPU core; AR_LOCAL_SLOTS wins.
gpus=()
if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
    IFS=, read -ra gpus <<<"$CUDA_VISIBLE_DEVICES"
elif command -v nvidia-smi >/dev/null; then
    mapfile -t gpus < <(nvidia-smi -L 2>/dev/null | sed -n 's/^GPU \([0-9]*\):.*/\1/p')
fi
slots=${AR_LOCAL_SLOTS:-${#gpus[@]}}
[[ $slots != 0 || -n ${AR_LOCAL_SLOTS:-} ]] || slots=$(nproc)
[[ $slots =~ ^[1-9][0-9]{0,3}$ ]] || die 2 "bad AR_LOCAL_SLOTS '$slots': the number of jobs at a time, e.g. 2"

jobs=$root/.ar/local/jobs
mkdir -p "$jobs"
[[ -e $root/.ar/.gitignore ]] || echo '*' >"$root/.ar/.gitignore"  # keeps .ar/ out of git status
exec 9>>"$jobs/.submit.lock"
flock 9  # one submit at a time: looking the name up and creating its job are one step
state() {  # state JOB_DIR -- derived from its files (README.md); the lock is looked at before `ended`
    if flock -n "$1/lock" true && [[ ! -s $1/ended ]]; then echo failed  # no process left, no end recorded
    elif [[ -s $1/ended ]]; then cat "$1/ended"
    elif [[ -e $1/slot ]]; then echo running; else echo queued; fi
}
id=$name last="" n=1
while [[ -e $jobs/$id ]]; do  # the jobs of a name: NAME, NAME-2, NAME-3, ... (skipping other names')
    [[ $(sed -n 1p "$jobs/$id/meta" 2>/dev/null) != "$name" ]] || last=$id
    n=$((n + 1)) id=$name-$n
done
st=$([[ -z $last ]] || state "$jobs/$last")
if [[ $st == queued || $st == running || $st == succeeded ]]; then
    echo "$me: $name is job $last ($st, commit $(sed -n 2p "$jobs/$last/meta" | cut -c1-10)); starting nothing" >&2
    echo "$last"
    exit 0
fi
[[ -z $last ]] || echo "$me: $name: job $last ended $st; starting $id" >&2

d=$jobs/$id
trap 'rm -rf "$d"' EXIT  # until the job has started: a failed submit leaves no job behind
mkdir -p "$d/src"
printf '%s\n' "$name" "$sha" "$slots" >"$d/meta"  # name, commit, slots
git -C "$root" archive "$sha" | tar -x -C "$d/src"
exec 8>>"$d/lock"
flock 8  # held until the job's last process exits (the runner and the train command inherit it)
setsid "$here/_run-job.sh" "$d" "$slots" "${gpus[@]}" </dev/null >>"$d/log" 2>&1 9>&- &
echo "$!" >"$d/pid"  # setsid did not fork (a background child leads no group): this is the group id
trap - EXIT
echo "$me: $id: commit ${sha:0:10} submitted ($slots slot(s))" >&2
echo "$id"
