"""Contract-suite entry for the SkyPilot backend: the `sky` test double (tests/fakes/sky/sky) on PATH.

The double runs each job's setup and run locally in the background; its buckets start with the
session's prepared cache (SKY_FAKE_BUCKET_SEED=env:AR_CACHE_DIR), as if sky/prep.yaml had filled
them. Leftovers are processes under the state dirs and jobs the double still has queued or running.
"""

import json
import os
import sys
from pathlib import Path

from contract_util import processes_under

FOLDER = "sky"
FAKE_SKY = Path(__file__).resolve().parents[1] / "fakes" / "sky"


def unfinished_fake_jobs(fake):
    """Cluster jobs and managed jobs the double has not finished (CANCELLING included)."""
    out = []
    for path in sorted(fake.glob("clusters/*/jobs/*.json")) + sorted(fake.glob("managed/jobs/*.json")):
        try:
            job = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if job.get("status") not in ("SUCCEEDED", "FAILED", "FAILED_SETUP", "FAILED_DRIVER", "CANCELLED",
                                     "FAILED_PRECHECKS", "FAILED_NO_RESOURCE", "FAILED_CONTROLLER"):
            out.append(f"{path.parent.parent.name}:{job.get('job_id')} {job.get('status')}")
    return out


def setup(tmp):
    state, fake = tmp / "state", tmp / "sky-fake"
    path = os.pathsep.join([str(FAKE_SKY), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = dict(PATH=path, AR_STATE_DIR=state, SKY_FAKE_STATE=fake, SKY_FAKE_MOUNT_ROOT=tmp,
               SKY_FAKE_BUCKET_SEED="env:AR_CACHE_DIR", SKY_FAKE_LAUNCH_DELAY_S="0.3",
               AR_SKY_MOUNT=tmp / "mnt" / "ar-data", AR_SKY_PYTHON=sys.executable, AR_SKY_CWD=tmp,
               AR_SKY_POLL_S="0.3", AR_SKY_KILL_GRACE_S="10")
    return env, lambda: processes_under(state) + processes_under(fake) + unfinished_fake_jobs(fake)
