#!/usr/bin/env bash
# _job.sh -- what every VESSL job of batch-job/ runs: submit-async.sh sends this text as the job's --cmd.
#
# In the job: the object volume is ~/.cache/autoresearch (data, tokenizer, and ar-code/<sha>.tar.gz),
# and is only read, except by prep.sh's job, which adds new files with plain writes. The code, the
# environment (uv sync, or pip install -r requirements.txt) and the compile caches live on the job's
# local disk: no venv, lock, rename or symlink on the volume. Env from the submit: AR_COMMIT,
# AR_PREP (1: prep.sh), AR_TRAIN_CMD, AR_PROFILE, AR_DATA, AR_CACHE_DIR.
# The log (what `vesslctl job logs` returns, at most 1000 lines) is the train command's output, cut to
# its first 900 and last 60 lines when longer: the summary block at its end is never lost.
set -euo pipefail
vol=$HOME/.cache/autoresearch work=$(mktemp -d)
fail() { tail -n 30 "$work/setup.log" 2>/dev/null || true; echo "FAIL: $*"; exit 1; }
mkdir "$work/src" && cd "$work/src"
tar -xzf "$vol/ar-code/$AR_COMMIT.tar.gz" 2>"$work/setup.log" || fail "cannot unpack ar-code/$AR_COMMIT.tar.gz of the volume"
export TORCHINDUCTOR_CACHE_DIR=$work/inductor TRITON_CACHE_DIR=$work/triton UV_CACHE_DIR=$work/uv PYTHONUNBUFFERED=1
if [[ -f uv.lock ]]; then
    { command -v uv || python -m pip install -q uv; } >>"$work/setup.log" 2>&1 || fail "cannot install uv (pip install uv)"
    uv sync >>"$work/setup.log" 2>&1 || fail "uv sync failed"
elif [[ -f requirements.txt ]]; then
    python -m pip install -q -r requirements.txt >>"$work/setup.log" 2>&1 || fail "pip install -r requirements.txt failed"
fi
if [[ -n ${AR_PREP:-} ]]; then  # prepare writes its cache here (it renames files), then it is copied over
    export HOME=$work/home AR_CACHE_DIR=$work/home/.cache/autoresearch
    mkdir -p "$AR_CACHE_DIR"
fi
cmd=(python train.py)
if [[ -f trainer/train.py ]]; then cmd=(python trainer/train.py); fi
if [[ -f uv.lock ]]; then cmd=(uv run "${cmd[@]}"); fi
if [[ -n ${AR_TRAIN_CMD:-} ]]; then cmd=(bash -c "$AR_TRAIN_CMD"); fi
{ "${cmd[@]}" </dev/null 2>&1 || echo "$?" >"$work/rc"; } | {
    n=0  # a line as soon as it is printed; past line 900 only into a file, whose last 60 lines end the log
    while IFS= read -r line || [[ -n $line ]]; do
        if ((++n <= 900)); then printf '%s\n' "$line"; else printf '%s\n' "$line" >>"$work/rest"; fi
    done
    if ((n > 900)); then
        echo "[ar-job] $((n > 960 ? n - 960 : 0)) lines not shown here (the log is kept under 1000 lines)"
        tail -n 60 "$work/rest"
    fi
}
rc=$(cat "$work/rc" 2>/dev/null || echo 0)
if [[ -n ${AR_PREP:-} ]] && ((rc == 0)); then  # new files only: an object is never overwritten or renamed
    cd "$AR_CACHE_DIR"
    find . -type f | while IFS= read -r f; do
        [[ -e $vol/$f ]] || { mkdir -p "$vol/${f%/*}" && cp "$f" "$vol/$f"; } || exit 1
    done || fail "copying $AR_CACHE_DIR to the volume failed"
    echo "prepared: $(find . -type f | wc -l) file(s) in the cache, copied onto the volume where new"
fi
exit "$rc"
