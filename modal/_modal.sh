# shellcheck shell=bash
# _modal.sh -- the Modal backend's shell helpers (sourced after _lib.sh, never run).
#
# The job records live under ${AR_STATE_DIR:-<repo>/.ar}/modal/ (see modal/README.md); everything that
# talks to Modal is in ar_modal.py, run with the interpreter that has the `modal` package.

am_root() {  # the Modal backend's state dir, for the repo $1
    local dir=${AR_STATE_DIR:-$1/.ar}
    [[ $dir == /* ]] || dir=$PWD/$dir
    printf '%s/modal\n' "$dir"
}
am_state() { cat "$1/state" 2>/dev/null || echo unknown; }

am_job_dir() {  # am_job_dir ROOT ID -- the job's record; exit 2 (one line) for an unknown id
    [[ $2 =~ $AR_ID_RE && -f $1/jobs/$2/meta.json ]] || ar_die 2 "unknown job id '$2'"
    printf '%s/jobs/%s\n' "$1" "$2"
}

# am_python REPO -- the interpreter for ar_modal.py: $AR_MODAL_PYTHON, else <repo>/.venv/bin/python,
# else python3 on PATH; exit 3 when there is none.
am_python() {
    local python=${AR_MODAL_PYTHON:-}
    if [[ -z $python ]]; then
        python=$1/.venv/bin/python
        [[ -x $python ]] || python=python3
    fi
    command -v "$python" >/dev/null 2>&1 \
        || ar_die 3 "python '$python' not found: run 'make setup', or set AR_MODAL_PYTHON"
    printf '%s\n' "$python"
}

am_client() {  # am_client PYTHON ARGS... -- run ar_modal.py; its messages carry this script's name
    local python=$1
    shift
    AR_MODAL_PROG=$AR_PROG "$python" "$(dirname "${BASH_SOURCE[0]}")/ar_modal.py" "$@"
}
