"""Contract-suite entry for the SkyPilot backend in managed-jobs mode (AR_SKY_MANAGED=1): every
experiment is a `sky jobs launch` managed job on the `sky` test double, which runs it on a cluster of
its own (setup + run) the way the jobs controller would. Same folder and scripts as backend_sky.py.
"""

import importlib.util
import time
from pathlib import Path

from contract_util import processes_under

_spec = importlib.util.spec_from_file_location("contract_backend_sky_base", Path(__file__).with_name("backend_sky.py"))
_sky = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_sky)

FOLDER = "sky"


def setup(tmp):
    env, _ = _sky.setup(tmp)
    env.update(AR_SKY_MANAGED="1")
    state, fake = tmp / "state", tmp / "sky-fake"

    def leftovers():
        # `sky jobs cancel` only schedules the cancel (CANCELLING); the controller finishes it
        t = time.time()
        while any(j.endswith(" CANCELLING") for j in _sky.unfinished_fake_jobs(fake)) and time.time() - t < 15:
            time.sleep(0.2)
        return processes_under(state) + processes_under(fake) + _sky.unfinished_fake_jobs(fake)

    return env, leftovers
