"""local/ only: slots and queueing, snapshot isolation, dead supervisors, hostile values, names.

These use a fake trainer (a few lines of Python, no torch) so the mechanics can be tested in
seconds; tests/contract/ runs the same scripts against the real trainer.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, clean_env

FAKE_TRAINER = '''\
"""A stand-in for trainer/train.py: sleeps, then prints a summary and the result line."""
import json, os, sys, time
MARKER = "v1"
SLEEP_S = 0.2
SEED = 42
LABEL = "x"

def main():
    sleep = float(os.environ.get("AR_SLEEP_S", SLEEP_S))
    print("fake trainer", MARKER, flush=True)
    time.sleep(sleep)
    result = dict(status="ok", val_bpb=1.5, marker=MARKER, cwd=os.getcwd(),
                  env={k: v for k, v in os.environ.items() if k.startswith("AR_")},
                  omp=os.environ.get("OMP_NUM_THREADS"), cuda=os.environ.get("CUDA_VISIBLE_DEVICES"))
    print("---")
    print("val_bpb:          1.500000")
    line = "AR_RESULT_JSON: " + json.dumps(result, sort_keys=True)
    with open(os.environ["AR_RESULT_PATH"] + ".tmp", "w") as f:
        f.write(json.dumps(result, sort_keys=True))
    os.replace(os.environ["AR_RESULT_PATH"] + ".tmp", os.environ["AR_RESULT_PATH"])
    print(line, flush=True)

main()
'''
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@test.invalid"]


class Local:
    def __init__(self, tmp):
        self.repo, self.state = tmp / "repo", tmp / "state"
        (self.repo / "trainer").mkdir(parents=True)
        (self.repo / "prepare").mkdir()
        shutil.copytree(REPO / "local", self.repo / "local", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(REPO / "prepare" / "prepare.py", self.repo / "prepare" / "prepare.py")
        (self.repo / "trainer" / "train.py").write_text(FAKE_TRAINER)
        subprocess.run(["git", "init", "-q"], cwd=self.repo, check=True)
        self.commit("fake trainer")
        self.env = clean_env(AR_STATE_DIR=self.state, AR_LOCAL_PYTHON=sys.executable, AR_LOCAL_POLL_S="0.2",
                             AR_TAG="t")
        self.env.pop("CUDA_VISIBLE_DEVICES", None)

    def commit(self, message):
        subprocess.run(["git", "add", "-A"], cwd=self.repo, check=True)
        subprocess.run([*GIT, "commit", "-qm", message], cwd=self.repo, check=True)
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=self.repo, check=True, capture_output=True,
                              text=True).stdout.strip()

    def run(self, script, *args, env=None, timeout=60):
        return subprocess.run([str(self.repo / "local" / script), *args], cwd=self.repo, capture_output=True,
                              text=True, env={**self.env, **(env or {})}, timeout=timeout)

    def submit(self, *args, env=None):
        proc = self.run("submit-async.sh", *args, env=env)
        assert proc.returncode == 0, proc.stderr
        assert len(proc.stdout.splitlines()) == 1
        return proc.stdout.strip()

    def job(self, job_id):
        return self.state / "local" / "jobs" / job_id

    def st(self, job_id):
        return (self.job(job_id) / "state").read_text().strip()

    def meta(self, job_id):
        return json.loads((self.job(job_id) / "meta.json").read_text())

    def result(self, job_id):
        return json.loads((self.job(job_id) / "result.json").read_text())

    def pgid(self, job_id, timeout=30):
        """The supervisor's process group, once it has recorded it."""
        pid, deadline = self.job(job_id) / "pid", time.time() + timeout
        while not pid.exists():
            assert time.time() < deadline, f"{job_id} never recorded its pid"
            time.sleep(0.05)
        return int(pid.read_text())

    def until(self, job_id, state, timeout=30):
        deadline = time.time() + timeout
        while self.st(job_id) != state:
            assert time.time() < deadline, f"{job_id} stayed {self.st(job_id)}, expected {state}"
            time.sleep(0.1)


@pytest.fixture
def local(tmp_path):
    lb = Local(tmp_path)
    yield lb
    jobs = lb.state / "local" / "jobs"
    ids = [p.name for p in jobs.iterdir() if not p.name.startswith(".")] if jobs.exists() else []
    if ids:
        lb.run("cancel-jobs.sh", *ids)


def test_slots_queue_the_extra_jobs(local):
    env = {"AR_LOCAL_SLOTS": "1"}
    first = local.submit("--env", "AR_SLEEP_S=30", env=env)
    second = local.submit("--env", "AR_SLEEP_S=0.1", env=env)
    local.until(first, "running")
    time.sleep(1.0)
    assert local.st(second) == "queued"
    assert local.meta(first)["slots"] == 1 and local.meta(first)["threads"] == len(os.sched_getaffinity(0))
    assert local.run("cancel-jobs.sh", first).returncode == 0
    proc = local.run("wait-jobs.sh", second, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"=== {second} (succeeded) ===" in proc.stdout
    assert local.meta(second)["slot"] == 0
    assert local.result(second)["omp"] == str(len(os.sched_getaffinity(0)))


def test_gpu_slots_pin_one_gpu_per_job(local, tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    smi = fake_bin / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: Fake (UUID: GPU-0)'\necho 'GPU 1: Fake (UUID: GPU-1)'\n")
    smi.chmod(0o755)
    env = {"PATH": f"{fake_bin}:{local.env['PATH']}"}
    a = local.submit("--env", "AR_SLEEP_S=2", env=env)
    b = local.submit("--env", "AR_SLEEP_S=2.1", env=env)
    assert local.run("wait-jobs.sh", a, b).returncode == 0
    assert local.meta(a)["slots"] == 2 and local.meta(a)["gpus"] == ["0", "1"]
    assert sorted(local.result(j)["cuda"] for j in (a, b)) == ["0", "1"]  # one GPU each, run side by side
    c = local.submit("--env", "AR_SLEEP_S=0.1", env={"CUDA_VISIBLE_DEVICES": "5"})
    assert local.run("wait-jobs.sh", c).returncode == 0
    assert local.meta(c)["slots"] == 1 and local.result(c)["cuda"] == "5"


def test_snapshot_isolation_and_recorded_commit(local):
    sha1 = subprocess.run(["git", "rev-parse", "HEAD"], cwd=local.repo, capture_output=True, text=True).stdout.strip()
    job = local.submit("--env", "AR_SLEEP_S=1")
    train = local.repo / "trainer" / "train.py"
    train.write_text(FAKE_TRAINER.replace('MARKER = "v1"', 'MARKER = "v2"'))  # the agent keeps editing
    assert local.run("wait-jobs.sh", job).returncode == 0
    assert local.result(job)["marker"] == "v1"
    assert local.meta(job)["commit"] == sha1
    assert Path(local.result(job)["cwd"]).resolve() == (local.job(job) / "src").resolve()
    assert local.submit("--commit", "HEAD", "--env", "AR_SLEEP_S=1") == job  # dirty tree, explicit commit
    sha2 = local.commit("v2")
    job2 = local.submit("--env", "AR_SLEEP_S=1")
    assert job2 != job and sha2[:7] in job2
    assert local.run("wait-jobs.sh", job2).returncode == 0
    assert local.result(job2)["marker"] == "v2" and local.meta(job2)["commit"] == sha2
    old = local.submit("--commit", sha1, "--env", "AR_SLEEP_S=1")
    assert old == job


def test_dead_supervisor_is_detected(local):
    job = local.submit("--env", "AR_SLEEP_S=60")
    local.until(job, "running")
    os.killpg(local.pgid(job), signal.SIGKILL)
    time.sleep(0.3)
    proc = local.run("wait-jobs.sh", job)
    assert proc.returncode == 1
    assert f"=== {job} (failed) ===" in proc.stdout and "supervisor died" in proc.stdout
    # a dead job is a failed one: submitting it again starts a new attempt
    assert local.submit("--env", "AR_SLEEP_S=60") == job + "-2"


def test_dead_queued_job_is_failed_by_cancel(local):
    env = {"AR_LOCAL_SLOTS": "1"}
    first = local.submit("--env", "AR_SLEEP_S=30", env=env)
    second = local.submit("--env", "AR_SLEEP_S=0.1", env=env)
    local.until(first, "running")
    os.killpg(local.pgid(second), signal.SIGKILL)
    time.sleep(0.3)
    assert local.run("cancel-jobs.sh", first, second).returncode == 0
    assert local.st(first) == "cancelled" and local.st(second) == "failed"


def test_hostile_values_never_run(local, tmp_path):
    hostile = ["$(touch pwned1)", "`touch pwned2`", "x; touch pwned3", "a 'b' \"c\" $HOME \\ * ?"]
    args = ["--env", f"AR_LABEL={hostile[0]}{hostile[1]}{hostile[2]}{hostile[3]}",
            "--env", "AR_SEED=$(touch pwned4)"]
    job = local.submit(*args, env={"AR_CACHE_DIR": str(tmp_path / "cache $(touch pwned5)")})
    proc = local.run("wait-jobs.sh", job)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    env = local.result(job)["env"]
    assert env["AR_LABEL"] == "".join(hostile) and env["AR_SEED"] == "$(touch pwned4)"
    assert env["AR_CACHE_DIR"].endswith("cache $(touch pwned5)")
    for bad in (["--name", "$(touch pwned6)"], ["--env", "AR_$(touch pwned7)=1"], ["--commit", "$(touch pwned8)"]):
        assert local.run("submit-async.sh", *bad).returncode == 2
    assert local.run("submit-async.sh", env={"AR_TAG": "$(touch pwned9)"}).returncode == 2
    assert local.run("wait-jobs.sh", "$(touch pwned10)").returncode == 2
    found = [*tmp_path.rglob("pwned*"), *REPO.glob("pwned*"), *Path.cwd().glob("pwned*")]
    assert found == []


def test_names_hash_and_environment(local):
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=local.repo, capture_output=True, text=True).stdout.strip()
    plain = local.submit()
    assert plain == f"ar-t-{sha[:7]}"  # no overrides: no hash
    pairs = sorted(["AR_SLEEP_S=0.1", "AR_PROFILE=smoke"])
    digest = hashlib.sha256("".join(p + "\n" for p in pairs).encode()).hexdigest()[:8]
    job = local.submit("--env", "AR_SLEEP_S=0.1", env={"AR_PROFILE": "smoke", "AR_LABEL": "leaked?"})
    assert job == f"ar-t-{sha[:7]}-{digest}"
    other = local.submit("--env", "AR_SLEEP_S=0.1", env={"AR_PROFILE": "tiny"})
    assert other != job  # another profile is another job
    assert local.submit("--env", "AR_PROFILE=smoke", "--env", "AR_SLEEP_S=0.1") == job  # --env or env: same
    assert local.run("wait-jobs.sh", plain, job, other).returncode == 0
    env = local.result(job)["env"]
    assert "AR_LABEL" not in env  # the submitter's stray AR_ variables never reach a job
    assert env["AR_PROFILE"] == "smoke" and env["AR_RESULT_PATH"] == str(local.job(job) / "result.json")
    named = local.submit("--name", "my-run", "--env", "AR_SEED=1")
    assert named == "my-run" and local.submit("--name", "my-run", "--env", "AR_SEED=1") == named
    clash = local.run("submit-async.sh", "--name", "my-run", "--env", "AR_SEED=2")
    assert clash.returncode == 2 and "my-run" in clash.stderr


def test_concurrent_identical_submits_share_one_job(local):
    procs = [subprocess.Popen([str(local.repo / "local" / "submit-async.sh"), "--env", "AR_SLEEP_S=0.5"],
                              cwd=local.repo, env=local.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    ids = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert len(ids) == 1 and all(p.returncode == 0 for p in procs)
    assert len(list((local.state / "local" / "jobs").iterdir())) == 1


def test_summary_is_rebuilt_from_result_json(local):
    job = local.submit()
    assert local.run("wait-jobs.sh", job).returncode == 0
    (local.job(job) / "log").write_text("fake trainer v1\nstep 00001 (truncated here)\n")
    proc = local.run("wait-jobs.sh", job)
    assert proc.returncode == 0
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == f"=== {job} (succeeded) ===" and lines[1] == "---"
    assert lines[2] == "val_bpb:          1.500000"
    assert json.loads(lines[-1].removeprefix("AR_RESULT_JSON: ")) == local.result(job)


def test_missing_python_is_backend_unavailable(local):
    proc = local.run("submit-async.sh", env={"AR_LOCAL_PYTHON": "/nonexistent/python"})
    assert proc.returncode == 3 and "AR_LOCAL_PYTHON" in proc.stderr and proc.stdout == ""


def test_shellcheck_clean():
    shellcheck = Path(sys.executable).parent / "shellcheck"
    if not shellcheck.exists():
        shellcheck = shutil.which("shellcheck")
    if not shellcheck:
        pytest.skip("shellcheck not installed")
    scripts = sorted(str(p) for p in (REPO / "local").glob("*.sh"))
    proc = subprocess.run([str(shellcheck), *scripts], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
