"""Contract-suite entry for the Modal recipe (modal/): the scripts run modal/app.py with the double of the
`modal` package (tests/fakes/modal/modal.py) first on PYTHONPATH; its calls are local process groups."""

import importlib.util
import os
import sys

from contract_util import REPO, processes_under

FOLDER = "modal"
FAKE = REPO / "tests" / "fakes" / "modal"


def fake_modal():
    """The double, loaded under another name (this process keeps the real `modal`)."""
    spec = importlib.util.spec_from_file_location("fake_modal", FAKE / "modal.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def setup(tmp, repo):
    server, bin_dir = tmp / "modal-server", tmp / "modal-bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)  # the container's `python`
    fake_modal().deploy(server, repo / FOLDER / "app.py")  # `modal deploy modal/app.py`
    env = dict(FAKE_MODAL_DIR=str(server), PYTHONPATH=str(FAKE), PATH=f"{bin_dir}:{os.environ['PATH']}")
    return env, lambda: processes_under(server)
