"""The fan-out contract (docs/contract.md), run against every backend's real scripts.

Each backend runs in a throwaway git repo (trainer/, prepare/ and the backend folder copied and
committed) with the smoke profile and the session's prepared cache. Adding a backend is one file,
tests/contract/backend_<name>.py (see below): its folder, and a setup function that returns its
environment (a test double of its CLI on PATH) and a way to list the processes / remote jobs it left
running.

    .venv/bin/python -m pytest -q tests/contract             # every backend
    .venv/bin/python -m pytest -q tests/contract -k local    # one backend
"""

import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = ("submit-async.sh", "wait-jobs.sh", "cancel-jobs.sh", "logs.sh")
HEADER = re.compile(r"^=== (\S+) \((succeeded|failed|timeout|cancelled)\) ===$", re.M)
RESULT_PREFIX = "AR_RESULT_JSON: "


def clean_env(**extra):
    """The parent environment minus any AR_ variable (same rule as tests/conftest.py)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AR_")}
    env.update(PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


# ---------------------------------------------------------------------------------------------
# Backends: one module per backend, tests/contract/backend_<name>.py, defining
#   FOLDER = "<backend folder>"            (local, batch-job, sky, modal)
#   def setup(tmp) -> (extra env, leftovers)   env puts its CLI test double on PATH; leftovers()
#                                              lists processes / remote jobs still running
# Adding a backend = adding such a file; nothing here changes.
# ---------------------------------------------------------------------------------------------
def _load_backends():
    found = {}
    for path in sorted(Path(__file__).parent.glob("backend_*.py")):
        spec = importlib.util.spec_from_file_location(f"contract_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        found[path.stem.removeprefix("backend_")] = (module.FOLDER, module.setup)
    return found


BACKENDS = _load_backends()  # name -> (folder, setup)


@dataclass
class Backend:
    name: str
    folder: str
    repo: Path
    env: dict
    leftovers: callable
    submitted: list = field(default_factory=list)

    def run(self, script, *args, timeout=120, env=None, **kw):
        cmd = [str(self.repo / self.folder / script), *args]
        proc = subprocess.run(cmd, cwd=self.repo, env={**self.env, **(env or {})}, capture_output=True,
                              text=True, timeout=timeout, **kw)
        if script == "submit-async.sh" and proc.returncode == 0:
            self.submitted.append(proc.stdout.strip())
        return proc

    def submit(self, *args, **kw):
        proc = self.run("submit-async.sh", *args, **kw)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert len(lines) == 1, f"submit must print exactly one line, got {proc.stdout!r}"
        return lines[0]

    def git(self, *args):
        return subprocess.run(["git", *args], cwd=self.repo, check=True, capture_output=True, text=True).stdout


def make_repo(path, folder):
    path.mkdir()
    for name in ("trainer", "prepare", folder):
        shutil.copytree(REPO / name, path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / ".gitignore", path / ".gitignore")
    git = ["git", "-c", "user.name=contract", "-c", "user.email=contract@test.invalid"]
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    subprocess.run(["git", "add", "-A"], cwd=path, check=True)
    subprocess.run([*git, "commit", "-qm", "contract test"], cwd=path, check=True)
    return path


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def backend(request, ar_cache, tmp_path_factory):
    folder, setup = BACKENDS[request.param]
    tmp = tmp_path_factory.mktemp(f"contract-{request.param}")
    repo = make_repo(tmp / "repo", folder)
    extra, leftovers = setup(tmp)
    env = clean_env(AR_CACHE_DIR=ar_cache, AR_PROFILE="smoke", AR_TAG="contract", **extra)
    b = Backend(request.param, folder, repo, env, leftovers)
    yield b
    if b.submitted:  # never leave a job behind, whatever failed
        b.run("cancel-jobs.sh", *sorted(set(b.submitted)), timeout=120)


@pytest.fixture(scope="module")
def jobs(backend):
    """One job that succeeds and one that fails, submitted once and left to run meanwhile."""
    ok = backend.submit()
    bad = backend.submit("--env", "AR_MATRIX_LR=1e30")
    return dict(ok=ok, bad=bad)


def one_error_line(proc):
    assert proc.stdout == "", proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def blocks(stdout):
    """{id: (state, body)} from wait-jobs.sh output."""
    parts = HEADER.split(stdout)
    assert parts[0].strip() == "", f"text before the first block: {parts[0]!r}"
    return {parts[i]: (parts[i + 1], parts[i + 2]) for i in range(1, len(parts), 3)}


# ---------------------------------------------------------------------------------------------
# Tests that need no finished job (they run while the `jobs` train)
# ---------------------------------------------------------------------------------------------
def test_submit_prints_one_id(backend, jobs):
    sha = backend.git("rev-parse", "HEAD").strip()
    overrides = "AR_PROFILE=smoke\n"
    expected = f"ar-contract-{sha[:7]}-{hashlib.sha256(overrides.encode()).hexdigest()[:8]}"
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", jobs["ok"])
    assert jobs["ok"] != jobs["bad"]
    if backend.name == "local":  # local ids are the job names
        assert jobs["ok"] == expected
        assert len(jobs["bad"]) <= 63 and re.fullmatch(r"[a-z0-9-]+", jobs["bad"])


def test_resubmit_returns_the_same_job(backend, jobs):
    assert backend.submit() == jobs["ok"]  # queued, running or succeeded by now: the same job either way


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(backend, script):
    proc = backend.run(script, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout and script in proc.stdout


@pytest.mark.parametrize("args, env", [
    (["--bogus"], {}),
    (["--env", "AR_matrix_lr=0.1"], {}),
    (["--env", "1AR=0.1"], {}),
    (["--env", "NOEQUALS"], {}),
    (["--env", "PATH=/tmp"], {}),
    (["--env", "AR_NO_SUCH_KNOB=1"], {}),
    (["--env"], {}),
    (["--name", "Not_Valid"], {}),
    (["--name", "x" * 64], {}),
    (["--commit", "no-such-rev"], {}),
    ([], {"AR_TAG": "Bad Tag"}),
    ([], {"AR_TAG": "x" * 21}),
], ids=["unknown-flag", "lowercase-key", "digit-key", "no-equals", "non-ar-key", "unknown-knob", "missing-value",
        "bad-name", "long-name", "bad-commit", "bad-tag", "long-tag"])
def test_submit_usage_errors(backend, args, env):
    proc = backend.run("submit-async.sh", *args, env=env)
    assert proc.returncode == 2, proc.stderr
    one_error_line(proc)


def test_dirty_tree_refused_unless_commit(backend, jobs):
    train = backend.repo / "trainer" / "train.py"
    original = train.read_text()
    try:
        train.write_text(original + "\n# uncommitted edit\n")
        proc = backend.run("submit-async.sh")
        assert proc.returncode == 2
        assert "commit" in one_error_line(proc)
        assert backend.submit("--commit", "HEAD") == jobs["ok"]  # the committed version: the same job
    finally:
        train.write_text(original)


@pytest.mark.parametrize("script", SCRIPTS[1:])
def test_unknown_id(backend, script):
    proc = backend.run(script, "no-such-job-0000")
    assert proc.returncode == 2
    assert "no-such-job-0000" in one_error_line(proc)


# ---------------------------------------------------------------------------------------------
# Waiting, results, failures
# ---------------------------------------------------------------------------------------------
def test_wait_reports_success_and_failure(backend, jobs):
    proc = backend.run("wait-jobs.sh", jobs["ok"], jobs["bad"], timeout=600)
    assert proc.returncode != 0, "one job failed, so the wait must not exit 0"
    got = blocks(proc.stdout)
    assert set(got) == {jobs["ok"], jobs["bad"]}

    state, body = got[jobs["ok"]]
    assert state == "succeeded", proc.stdout + proc.stderr
    lines = body.strip("\n").splitlines()
    assert lines[0] == "---" and lines[-1].startswith(RESULT_PREFIX)
    assert re.match(r"val_bpb:\s+\d+\.\d{6}$", lines[1])
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    assert result["status"] == "ok" and result["profile"] == "smoke" and result["val_bpb"] > 0

    state, body = got[jobs["bad"]]
    assert state == "failed"
    assert "FAIL" in body and len(body.strip().splitlines()) <= 27
    assert re.search(r'"status": ?"fail"', body)
    assert re.search(r"\d\d:\d\d:\d\dZ? .*succeeded", proc.stderr), "state changes go to stderr, timestamped"

    again = backend.run("wait-jobs.sh", jobs["ok"], timeout=60)  # terminal already: returns at once
    assert again.returncode == 0 and blocks(again.stdout)[jobs["ok"]][0] == "succeeded"

    results_py = REPO / "tools" / "results.py"
    if results_py.exists():  # the round driver's parser understands the output
        import importlib.util
        spec = importlib.util.spec_from_file_location("ar_results", results_py)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        records = mod.parse_output(proc.stdout)
        assert len(records) == 2


def test_logs_prints_the_full_log(backend, jobs):
    backend.run("wait-jobs.sh", jobs["ok"], timeout=600)
    proc = backend.run("logs.sh", jobs["ok"])
    assert proc.returncode == 0
    assert "\n---\n" in proc.stdout and RESULT_PREFIX in proc.stdout and "step " in proc.stdout


def test_cancel_is_idempotent_and_keeps_terminal_states(backend, jobs):
    backend.run("wait-jobs.sh", jobs["ok"], jobs["bad"], timeout=600)
    for _ in range(2):
        assert backend.run("cancel-jobs.sh", jobs["ok"]).returncode == 0
    proc = backend.run("wait-jobs.sh", jobs["ok"])
    assert proc.returncode == 0 and blocks(proc.stdout)[jobs["ok"]][0] == "succeeded"


def test_resubmit_after_failure_starts_a_new_job(backend, jobs):
    backend.run("wait-jobs.sh", jobs["bad"], timeout=600)
    retry = backend.submit("--env", "AR_MATRIX_LR=1e30")
    assert retry != jobs["bad"]
    if backend.name == "local":
        assert retry == jobs["bad"] + "-2"
    assert backend.submit("--env", "AR_MATRIX_LR=1e30") == retry  # live now: returned, not restarted
    for _ in range(2):
        proc = backend.run("cancel-jobs.sh", retry)
        assert proc.returncode == 0, proc.stderr
    proc = backend.run("wait-jobs.sh", retry)
    assert proc.returncode != 0
    assert blocks(proc.stdout)[retry][0] == "cancelled"
    assert backend.leftovers() == []


def test_deadline_cancels_running_jobs(backend):
    job = backend.submit("--env", "AR_SEED=101")
    t0 = time.time()
    proc = backend.run("wait-jobs.sh", job, env={"AR_TIMEOUT_S": "2"}, timeout=120)
    assert proc.returncode != 0
    assert blocks(proc.stdout)[job][0] == "timeout", proc.stdout + proc.stderr
    assert time.time() - t0 < 60
    assert backend.leftovers() == []
    assert backend.run("cancel-jobs.sh", job).returncode == 0  # already terminal: a no-op


def test_sigint_cancels_the_waited_jobs(backend):
    job = backend.submit("--env", "AR_SEED=102")
    wait = subprocess.Popen([str(backend.repo / backend.folder / "wait-jobs.sh"), job], cwd=backend.repo,
                            env=backend.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2)
    wait.send_signal(signal.SIGINT)
    out, err = wait.communicate(timeout=120)
    assert wait.returncode != 0
    assert blocks(out)[job][0] == "cancelled", out + err
    assert backend.leftovers() == []
