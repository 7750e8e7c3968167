"""Contract-suite entry for the VESSL backend (batch-job/): the vesslctl test double on PATH.

The double (tests/fakes/vesslctl/vesslctl) really runs each job's command on this machine, with the
object volume a local folder. The volume stands in for one prep.sh already filled: its cache is a
link to the session's prepared cache (FAKE_VESSL_LINK_CACHE), and the jobs use this interpreter as
the image's own (AUTORESEARCH_PYTHON), as an image with the dependencies baked in would.
"""

import json
import os
import sys
from pathlib import Path

from contract_util import processes_under

FOLDER = "batch-job"
FAKES = Path(__file__).resolve().parents[1] / "fakes" / "vesslctl"


def setup(tmp):
    root = tmp / "vessl"
    (root / "volumes" / "ar-cache").mkdir(parents=True)
    bindir = tmp / "bin"  # python3 = this interpreter: no pyenv-style shim to start on every vesslctl call
    bindir.mkdir()
    (bindir / "python3").symlink_to(sys.executable)
    env = dict(PATH=os.pathsep.join([str(FAKES), str(bindir), os.environ["PATH"]]), FAKE_VESSL_ROOT=root,
               FAKE_VESSL_QUEUE_S="0.2",
               FAKE_VESSL_LINK_CACHE="autoresearch/cache", FAKE_VESSL_KILL_GRACE_S="5",
               AUTORESEARCH_CACHE_VOLUME="ar-cache", AUTORESEARCH_RESOURCE_SPEC="cpu-fake",
               AUTORESEARCH_PYTHON=sys.executable, AR_STATE_DIR=tmp / "state", AR_VESSL_POLL_S="0.3",
               AR_VESSL_LIST_DELAY_S="0.2")

    def leftovers():
        live = []
        for job in sorted((root / "jobs").glob("*/job.json")):
            state = json.loads(job.read_text())["workloadState"]
            if state in ("queued", "running"):
                live.append(f"{job.parent.name}: {state}")
        return live + processes_under(root)

    return env, leftovers
