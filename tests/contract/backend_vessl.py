"""Contract-suite entry for VESSL (batch-job/): vesslctl is the double in tests/fakes/vesslctl, which runs
each job's command here, under $FAKE_VESSL_ROOT, with the object volume `vol1` a folder of objects."""

import json
import os
import sys
from pathlib import Path

from contract_util import REPO, processes_under

FOLDER = "batch-job"


def setup(tmp, repo):
    root = tmp / "vessl"
    (root / "volumes" / "vol1").mkdir(parents=True)
    bindir = tmp / "bin"  # python: the fake image's, this interpreter without site-packages (fast)
    bindir.mkdir()
    for name in ("python", "python3"):
        (bindir / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
        (bindir / name).chmod(0o755)
    path = os.pathsep.join([str(REPO / "tests" / "fakes" / "vesslctl"), str(bindir), os.environ["PATH"]])
    env = dict(PATH=path, FAKE_VESSL_ROOT=root, FAKE_VESSL_QUEUE_S="0.05", AUTORESEARCH_CACHE_VOLUME="vol1",
               AUTORESEARCH_RESOURCE_SPEC="resourcespec-fake-gpu1")

    def leftovers():
        live = [f"{p.parent.name}: {json.loads(p.read_text())['workloadState']}"
                for p in (root / "jobs").glob("*/job.json")
                if json.loads(p.read_text())["workloadState"] not in ("succeeded", "failed", "terminated")]
        return live + processes_under(root / "jobs")

    return env, leftovers


def jobs(root: Path):
    """{slug: job.json} of the double's state."""
    return {p.parent.name: json.loads(p.read_text()) for p in (root / "jobs").glob("*/job.json")}
