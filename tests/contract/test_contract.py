"""The fan-out contract (docs/contract.md), run against every backend's real scripts.

Each test gets a throwaway karpathy-layout project (train.py is tests/contract/fake_train.py: no torch,
each behaviour a commit) with the backend's folder copied in. A backend is one module,
tests/contract/backend_<name>.py (see contract_util.py). The last section is local-only.

    .venv/bin/python -m pytest -q tests/contract             # every backend
    .venv/bin/python -m pytest -q tests/contract -k local    # one backend
"""

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from contract_util import REFERENCE_BLOCK, REPO, SCRIPTS, Project, blocks, load_backends, one_error_line

BACKENDS = load_backends()


@pytest.fixture(params=sorted(BACKENDS))
def project(request, tmp_path):
    p = Project(tmp_path, request.param, BACKENDS[request.param])
    yield p
    p.cleanup()  # never leave a job running, whatever failed


@pytest.fixture
def local(tmp_path):
    p = Project(tmp_path, "local", BACKENDS["local"])
    yield p
    p.cleanup()


def results_module():
    spec = importlib.util.spec_from_file_location("ar_results", REPO / "tools" / "results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def until(predicate, timeout=30, what="condition"):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def started(project, job):
    """True once the job's train command has printed its first line."""
    return "fake: argv=" in project.run("logs.sh", job).stdout


# ---------------------------------------------------------------------------------------------
# The contract, any backend
# ---------------------------------------------------------------------------------------------
def test_ok_job_prints_the_summary_block(project):
    sha = project.commit("ok")
    job = project.submit()
    if project.name == "local":
        assert job == f"ar-{sha[:10]}"  # the default name, which is the local id
    proc, out = project.wait(job)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"=== {job} (succeeded) ===\n{REFERENCE_BLOCK}\n"
    assert job in proc.stderr and "succeeded" in proc.stderr
    records = results_module().parse(proc.stdout)
    assert [(r["job_id"], r["state"], r["value"]) for r in records] == [(job, "succeeded", 0.9979)]


@pytest.mark.parametrize("mode, reason", [
    ("crash", "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB."),
    ("nan", "FAIL: loss is NaN"),
])
def test_failed_job_shows_the_crash_reason(project, mode, reason):
    project.commit(mode)
    job = project.submit()
    proc, out = project.wait(job)
    assert proc.returncode == 1
    state, body = out[job]
    assert state == "failed"
    assert any(line.startswith(reason) for line in body), proc.stdout
    assert "\r" not in proc.stdout  # a \r progress line (crash mode) shows its last frame
    if mode == "nan":  # 300 progress lines: the tail is about 40 of them
        assert 38 <= len(body) <= 45 and not any("step 00001 " in line for line in body)
    [record] = results_module().parse(proc.stdout)
    assert record["reason"].startswith(reason)


def test_succeeded_without_a_block_is_still_succeeded(project):
    project.commit("noblock")
    job = project.submit()
    proc, out = project.wait(job)
    assert proc.returncode == 0 and out[job][0] == "succeeded"
    assert results_module().parse(proc.stdout)[0]["reason"] == "no summary block in the log"


def test_deadline_cancels_a_hanging_job(project):
    project.commit("hang-hard")  # ignores SIGTERM: only the SIGKILL that follows stops it
    job = project.submit()
    t0 = time.time()
    proc, out = project.wait(job, env={"AR_TIMEOUT_S": "1"})
    assert proc.returncode == 1
    assert out[job][0] == "timeout", proc.stdout + proc.stderr
    assert out[job][1][-1] == "note: cancelled at the deadline (AR_TIMEOUT_S=1)"
    assert 1 <= time.time() - t0 < 30
    assert project.leftovers() == []
    assert project.run("cancel-jobs.sh", job).returncode == 0  # already ended: a no-op
    assert project.wait(job)[1][job][0] == "timeout"


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_cancels_the_waited_jobs(project, sig, code):
    project.commit("hang")
    hung = project.submit()
    project.commit("ok")
    done = project.submit()
    until(lambda: started(project, hung), what="the job to start")
    wait = project.popen("wait-jobs.sh", hung, done)
    until(lambda: project.run("wait-jobs.sh", done).returncode == 0, what="the ok job")
    time.sleep(0.3)
    wait.send_signal(sig)
    out, err = wait.communicate(timeout=60)
    assert wait.returncode == code, err
    got = blocks(out)
    assert got[hung][0] == "cancelled" and got[done][0] == "succeeded", out + err
    assert project.leftovers() == []


def test_same_name_starts_one_job(project):
    project.commit("ok", sleep_s=1)
    procs = [project.popen("submit-async.sh") for _ in range(5)]  # racing submits of one commit
    ids = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert len(ids) == 1 and all(p.returncode == 0 for p in procs)
    [job] = ids
    project.submitted.add(job)
    assert project.submit() == job  # queued or running: the same job
    assert project.wait(job)[0].returncode == 0
    assert project.run("logs.sh", job).stdout.count("fake: argv=") == 1  # it ran once
    assert project.submit() == job  # succeeded: still the same job, nothing runs again
    if project.name == "local":
        assert len(list((project.repo / ".ar" / "local" / "jobs").glob("ar-*"))) == 1


def test_a_failed_name_starts_a_new_job(project):
    project.commit("crash")
    first = project.submit("--name", "retry-me")
    assert project.wait(first)[1][first][0] == "failed"
    project.commit("hang")
    second = project.submit("--name", "retry-me")
    assert second != first
    if project.name == "local":
        assert second == "retry-me-2"
    assert project.submit("--name", "retry-me") == second  # running: returned, not started again
    assert project.run("cancel-jobs.sh", second).returncode == 0
    assert project.wait(second)[1][second][0] == "cancelled"
    assert project.submit("--name", "retry-me") not in (first, second)


def test_dirty_tree_is_refused_without_commit(project):
    project.commit("ok")
    (project.repo / "untracked.txt").write_text("untracked files do not count\n")
    clean = project.submit()
    train = project.repo / "train.py"
    train.write_text(train.read_text().replace('MODE = "ok"', 'MODE = "crash"'))  # uncommitted
    proc = project.run("submit-async.sh")
    assert proc.returncode == 2
    assert "--commit" in one_error_line(proc)
    job = project.submit("--commit", "HEAD")  # runs the commit as it is: the edit is not in the snapshot
    assert job == clean  # the same commit: the same job
    proc, out = project.wait(job)
    assert proc.returncode == 0 and out[job][0] == "succeeded"


def test_unknown_ids(project):
    project.commit("ok", sleep_s=1)
    job = project.submit()
    for script in ("wait-jobs.sh", "cancel-jobs.sh", "logs.sh"):
        proc = project.run(script, "no-such-job", timeout=10)
        assert proc.returncode == 2 and "no-such-job" in one_error_line(proc)
    t0 = time.time()
    proc = project.run("wait-jobs.sh", job, "no-such-job", timeout=10)  # nothing is waited for
    assert proc.returncode == 2 and time.time() - t0 < 5
    proc = project.run("cancel-jobs.sh", job, "no-such-job", timeout=10)
    assert proc.returncode == 2
    assert project.wait(job)[1][job][0] == "succeeded"  # nothing was cancelled


HOSTILE = ["$(touch pwned1)", "`touch pwned2`", "a;touch pwned3", "x'y\"z", "a b", "HEAD;touch pwned4", "-x"]


def test_hostile_values_never_run(project):
    project.commit("ok")
    for value in HOSTILE:
        for args in (["--name", value], ["--commit", value]):
            proc = project.run("submit-async.sh", *args)
            assert proc.returncode == 2, (args, proc.stderr)
            one_error_line(proc)
        for script in ("wait-jobs.sh", "cancel-jobs.sh", "logs.sh"):
            assert project.run(script, value).returncode == 2
    assert project.submitted == set() and project.leftovers() == []
    found = [p for root in (project.tmp, Path.cwd()) for p in root.rglob("pwned*")]
    assert found == []


@pytest.mark.parametrize("args", [["--bogus"], ["--name"], ["--commit"], ["--name", "Not_Valid"], ["--name", "x" * 64],
                                  ["--name", "-ab"], ["--name", "ab-"], ["--commit", "no-such-rev"], ["extra"]])
def test_submit_usage_errors(project, args):
    project.commit("ok")
    proc = project.run("submit-async.sh", *args)
    assert proc.returncode == 2
    one_error_line(proc)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_and_no_arguments(project, script):
    proc = project.run(script, "--help")
    assert proc.returncode == 0 and proc.stderr == ""
    assert "Usage:" in proc.stdout and script in proc.stdout and "Exit" in proc.stdout
    if script != "submit-async.sh":
        proc = project.run(script)
        assert proc.returncode == 2
        one_error_line(proc)


def test_logs_prints_the_whole_log(project):
    project.commit("ok")
    job = project.submit()
    project.wait(job)
    proc = project.run("logs.sh", job)
    assert proc.returncode == 0 and proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("fake: argv=[]") and sum(x.startswith("step ") for x in lines) == 300
    assert proc.stdout.endswith(REFERENCE_BLOCK + "\n")


def test_cancel_is_idempotent_and_keeps_ended_jobs(project):
    project.commit("hang")
    hung = project.submit()
    project.commit("ok")
    ok = project.submit()
    assert project.wait(ok)[0].returncode == 0
    until(lambda: started(project, hung), what="the job to start")
    for _ in range(2):
        assert project.run("cancel-jobs.sh", hung, ok).returncode == 0
    assert project.leftovers() == []  # cancel returns once the job is gone
    proc, out = project.wait(hung, ok)
    assert proc.returncode == 1 and out[hung][0] == "cancelled" and out[ok][0] == "succeeded"


def test_train_cmd_and_environment_reach_the_job(project):
    project.commit("ok")
    env = {"AR_TRAIN_CMD": "python train.py --from-ar-train-cmd", "AR_PROFILE": "smoke", "AR_DATA": "offline",
           "AR_CACHE_DIR": str(project.tmp / "cache")}
    job = project.submit(env=env)
    assert project.wait(job)[0].returncode == 0
    log = project.run("logs.sh", job).stdout
    assert "fake: argv=['--from-ar-train-cmd']" in log
    assert "fake: AR_PROFILE=smoke" in log and "fake: AR_DATA=offline" in log
    assert f"fake: AR_CACHE_DIR={project.tmp / 'cache'}" in log


# ---------------------------------------------------------------------------------------------
# local/ only: slots and queueing, the job directory, python / uv, dead supervisors, size
# ---------------------------------------------------------------------------------------------
def job_dir(p, job):
    return p.repo / ".ar" / "local" / "jobs" / job


def test_local_queues_beyond_the_slots(local):
    env = {"AR_LOCAL_SLOTS": "1"}
    local.commit("ok", sleep_s=1.5)
    first = local.submit(env=env)
    local.commit("ok", sleep_s=1)
    second = local.submit(env=env)
    until(lambda: started(local, first), what="the first job")
    time.sleep(0.5)
    assert local.run("logs.sh", second).stdout == ""  # queued: nothing ran yet
    proc, out = local.wait(first, second)
    assert proc.returncode == 0, proc.stderr
    assert list(out) == [first, second]  # blocks in the order the jobs ended
    assert f"{second}: queued\n" in proc.stderr and f"{second}: queued -> running" in proc.stderr
    assert f"fake: OMP_NUM_THREADS={os.cpu_count()}" in local.run("logs.sh", first).stdout  # cores / 1 slot
    assert (job_dir(local, second) / "slot").stat().st_mtime >= (job_dir(local, first) / "rc").stat().st_mtime


def test_local_submits_take_turns(local):
    """Looking a name up and creating its job is one step under .ar/local/jobs/.submit.lock."""
    import fcntl

    local.commit("ok")
    jobs = local.repo / ".ar" / "local" / "jobs"
    jobs.mkdir(parents=True)
    with open(jobs / ".submit.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        submit = local.popen("submit-async.sh")
        time.sleep(0.5)
        assert submit.poll() is None and [p.name for p in jobs.iterdir()] == [".submit.lock"]  # it waits its turn
    out, err = submit.communicate(timeout=30)
    assert submit.returncode == 0 and out.strip() in {p.name for p in jobs.iterdir()}, err
    local.submitted.add(out.strip())


def test_local_gpu_slots(local):
    fake_bin = local.tmp / "bin"
    fake_bin.mkdir()
    smi = fake_bin / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: Fake (UUID: GPU-a)'\necho 'GPU 1: Fake (UUID: GPU-b)'\n")
    smi.chmod(0o755)
    env = {"PATH": f"{fake_bin}:{local.env['PATH']}", "CUDA_VISIBLE_DEVICES": None, "AR_LOCAL_SLOTS": None}
    local.commit("ok", sleep_s=1)
    a = local.submit(env=env)
    local.commit("ok", sleep_s=1.1)
    b = local.submit(env=env)
    assert local.wait(a, b)[0].returncode == 0
    logs = local.run("logs.sh", a).stdout + local.run("logs.sh", b).stdout
    assert "fake: CUDA_VISIBLE_DEVICES=0" in logs and "fake: CUDA_VISIBLE_DEVICES=1" in logs  # side by side
    assert f"fake: OMP_NUM_THREADS={max(1, os.cpu_count() // 2)}" in logs
    local.commit("ok")
    c = local.submit(env={"CUDA_VISIBLE_DEVICES": "GPU-b,7", "AR_LOCAL_SLOTS": None})
    assert local.wait(c)[0].returncode == 0
    assert "fake: CUDA_VISIBLE_DEVICES=GPU-b\n" in local.run("logs.sh", c).stdout


def test_local_job_directory(local):
    sha = local.commit("ok")
    job = local.submit()
    assert local.wait(job)[0].returncode == 0
    d = job_dir(local, job)
    assert (d / "meta").read_text().splitlines() == [job, sha, "4"]
    assert (d / "rc").read_text() == "0\n" and (d / "ended").read_text() == "succeeded\n"
    assert (d / "src" / "train.py").read_text() == local.git("show", f"{sha}:train.py") + "\n"
    assert not (d / "src" / "local").exists()  # the snapshot is the commit, and local/ is not committed
    log = local.run("logs.sh", job).stdout
    assert "fake: FAKE_VENV=1" in log  # python is the project's .venv/bin/python
    assert f"cwd={d / 'src'}" in log
    assert local.git("status", "--porcelain") == "?? local/"  # .ar/ ignores itself


def test_local_uv_run_when_the_project_has_uv_lock(local):
    local.commit("ok", files={"uv.lock": "version = 1\n"})
    fake_bin = local.tmp / "bin"
    fake_bin.mkdir()
    uv = fake_bin / "uv"
    uv.write_text('#!/bin/sh\necho "fake-uv: $* env=$UV_PROJECT_ENVIRONMENT"\n[ "$1" = run ] && shift\nexec "$@"\n')
    uv.chmod(0o755)
    job = local.submit(env={"PATH": f"{fake_bin}:{local.env['PATH']}"})
    assert local.wait(job)[0].returncode == 0
    log = local.run("logs.sh", job).stdout
    assert log.startswith(f"fake-uv: run python train.py env={local.repo / '.venv'}\n")
    if shutil.which("uv", path=local.env["PATH"]) is None:  # no uv at all: the submit says what is missing
        proc = local.run("submit-async.sh", "--name", "no-uv")
        assert proc.returncode == 3 and "uv" in one_error_line(proc)


def test_local_dead_supervisor_is_failed(local):
    local.commit("hang")
    job = local.submit()
    until(lambda: started(local, job), what="the job to start")
    os.killpg(int((job_dir(local, job) / "pid").read_text()), signal.SIGKILL)
    until(lambda: local.leftovers() == [], what="the job's processes to die")
    proc, out = local.wait(job)
    assert proc.returncode == 1
    state, body = out[job]
    assert state == "failed" and body[-1].startswith("note: no exit code"), proc.stdout
    assert local.run("cancel-jobs.sh", job).returncode == 0
    assert local.wait(job)[1][job][0] == "failed"  # cancel leaves an ended job as it ended
    assert local.submit() == job + "-2"  # it failed: the same name starts a new job


def test_local_recipe_is_small_and_shellcheck_clean():
    files = [p for p in (REPO / "local").iterdir() if p.name != "README.md"]
    total = sum(len(p.read_text().splitlines()) for p in files)
    assert total <= 250, f"local/ has {total} lines (README excluded); the budget is 250"
    shellcheck = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if shellcheck is None:
        pytest.skip("shellcheck not installed")
    proc = subprocess.run([shellcheck, *map(str, sorted(files))], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
