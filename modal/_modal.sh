# shellcheck shell=bash
# _modal.sh -- the Modal backend's shell helpers (sourced after _lib.sh, never run).
#
# The job records live under ${AR_STATE_DIR:-<repo>/.ar}/modal/ (see modal/README.md); everything that
# talks to Modal is in ar_modal.py, run with the interpreter that has the `modal` package.

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
