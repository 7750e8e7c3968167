"""Contract-suite entry for the local backend: no CLI to fake, jobs are local processes."""

import sys

from contract_util import processes_under

FOLDER = "local"


def setup(tmp):
    state = tmp / "state"
    env = dict(AR_STATE_DIR=state, AR_LOCAL_PYTHON=sys.executable, AR_LOCAL_POLL_S="0.3")
    return env, lambda: processes_under(state)
