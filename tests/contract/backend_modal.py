"""Contract-suite entry for the Modal backend: its `modal` calls go to a local test double.

tests/fakes/modal/fake_modal.py stands in for the `modal` package (AR_MODAL_FAKE): `deploy` registers
the repo's modal/app.py, and each spawned call runs that file's real run_experiment body
(`Function.local`) in a detached local process group, the "container".
"""

import os
import subprocess
import sys
from pathlib import Path

from contract_util import processes_under

FOLDER = "modal"
FAKE = Path(__file__).resolve().parents[1] / "fakes" / "modal" / "fake_modal.py"


def setup(tmp):
    server = tmp / "modal-server"
    app_py = tmp / "repo" / FOLDER / "app.py"  # the contract repo's copy (make_repo), else ours
    if not app_py.is_file():
        app_py = Path(__file__).resolve().parents[2] / FOLDER / "app.py"
    deploy_env = {k: v for k, v in os.environ.items() if not k.startswith("AR_")}
    subprocess.run([sys.executable, str(FAKE), "deploy", str(app_py)], check=True, stdout=subprocess.DEVNULL,
                   env={**deploy_env, "AR_MODAL_FAKE_DIR": str(server)})
    env = dict(AR_STATE_DIR=tmp / "state", AR_MODAL_PYTHON=sys.executable, AR_MODAL_FAKE=FAKE,
               AR_MODAL_FAKE_DIR=server, AR_MODAL_POLL_S="0.3")
    return env, lambda: processes_under(server)
