"""Contract-suite entry for SkyPilot (sky/): managed jobs run by the `sky` double (tests/fakes/sky/sky),
which keeps its "API server" and "jobs controller" under tmp/sky-state and runs each job's setup and run
locally in a per-job "cluster" directory there."""

import json
import os
import sys
from pathlib import Path

from contract_util import processes_under

FOLDER = "sky"
FAKE_SKY = Path(__file__).resolve().parents[1] / "fakes" / "sky" / "sky"
TERMINAL = {"SUCCEEDED", "CANCELLED", "FAILED", "FAILED_SETUP", "FAILED_PRECHECKS", "FAILED_NO_RESOURCE",
            "FAILED_CONTROLLER"}


def setup(tmp, repo):
    bin_dir, state = tmp / "sky-bin", tmp / "sky-state"
    bin_dir.mkdir()
    (bin_dir / "sky").write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_SKY}" "$@"\n')
    (bin_dir / "sky").chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)  # the cluster image's python
    env = dict(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_SKY_STATE=str(state),
               FAKE_SKY_LAUNCH_S="0.05", AR_SKY_BUCKET="ar-contract-test", AR_SKY_POLL_S="0.1")
    return env, lambda: leftovers(state)


def leftovers(state):
    """Processes of the double's clusters and request workers, unfinished jobs, launch requests in flight."""
    jobs = [json.loads(p.read_text()) for p in (state / "jobs").glob("*.json")]
    requests = [json.loads(p.read_text()) for p in (state / "requests").glob("*.json")]
    return (processes_under(state / "clusters")
            + [f"job {j['job_id']} {j['status']}" for j in jobs if j["status"] not in TERMINAL]
            + [f"request {r['request_id']} RUNNING" for r in requests if r["status"] == "RUNNING"])
