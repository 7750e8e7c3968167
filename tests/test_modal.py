"""The Modal backend (modal/): the app's declared configuration through the real `modal` package,
its function body through Modal's own `Function.local()`, and the client's submit/wait/cancel logic
against a test double of the `modal` calls (tests/fakes/modal/fake_modal.py) with its failure modes.
The jobs run a fake trainer (no torch). No Modal account or network: nothing here reaches Modal.
To be rewritten with the recipe (issue 14)."""

import importlib.util
import inspect
import io
import os
import re
import shutil
import subprocess
import tarfile
import time
import tomllib
import types
import warnings

import pytest
from conftest import PY, REPO, clean_env

MODAL_DIR = REPO / "modal"
FAKE = REPO / "tests" / "fakes" / "modal" / "fake_modal.py"
HEADER = re.compile(r"^=== (\S+) \((succeeded|failed|timeout|cancelled)\) ===$", re.M)

modal = pytest.importorskip("modal")


def load(path, name, **env):
    """Import a file by path as module `name`, with `env` set while it is imported."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update({k: str(v) for k, v in env.items()})
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


FAKE_MOD = load(FAKE, "fake_modal_for_tests")  # its exception classes stand in for modal.exception


@pytest.fixture(scope="module")
def app_mod():
    return load(MODAL_DIR / "app.py", "ar_modal_app_test", AR_MODAL_GPU="", AR_MODAL_APP="", AR_MODAL_VOLUME="",
                AR_MODAL_TIMEOUT_S="")


def impl(obj):
    """The implementation object behind a synchronicity-wrapped modal object."""
    from modal._utils.async_utils import synchronizer
    return synchronizer._translate_in(obj)


def loader_vars(obj):
    return inspect.getclosurevars(impl(obj)._load).nonlocals


def function_env(fn):
    """The `env=` of a Function (Modal carries it as a Secret.from_dict)."""
    env = {}
    for secret in fn._spec_.secrets:
        load_env = inspect.getclosurevars(secret._load).nonlocals["load_env_dict"]
        env.update(inspect.getclosurevars(load_env).nonlocals["env_dict_filtered"])
    return env


def image_commands(image):
    """Every Dockerfile command of an image and its base layers (built offline from the definition)."""
    cmds, todo = [], [impl(image)]
    while todo:
        layer = todo.pop()
        nonlocals = loader_vars_impl(layer)
        if nonlocals.get("dockerfile_function"):
            cmds += nonlocals["dockerfile_function"]("2025.06").commands
        todo += [impl_or_self(b) for b in (nonlocals.get("base_images") or {}).values()]
    return cmds


def loader_vars_impl(layer):
    return inspect.getclosurevars(layer._load).nonlocals


def impl_or_self(obj):
    try:
        return impl(obj)
    except Exception:  # noqa: BLE001 -- already an implementation object
        return obj


# ---------------------------------------------------------------------------------------------
# Nothing in modal/ shadows the `modal` package
# ---------------------------------------------------------------------------------------------
def test_modal_folder_never_shadows_the_package():
    assert not (MODAL_DIR / "__init__.py").exists() and not (MODAL_DIR / "modal.py").exists()
    assert not list(MODAL_DIR.glob("modal.*")) and not (MODAL_DIR / "modal").exists()
    # As `python modal/<file>.py` sees it (modal/ first on sys.path) and as `python -m` from the repo
    # root does ('' first): the real package either way.
    probe = "import sys; sys.path[:0] = [sys.argv[1], '']; import modal; print(modal.__file__)"
    out = subprocess.run([PY, "-c", probe, str(MODAL_DIR)], cwd=REPO, capture_output=True, text=True, check=True)
    assert "site-packages" in out.stdout and not out.stdout.startswith(str(MODAL_DIR)), out.stdout
    # The files themselves run by path: app.py defines the app and exits; the client resolves the real package.
    subprocess.run([PY, str(MODAL_DIR / "app.py")], cwd=REPO, check=True, capture_output=True,
                   env=clean_env())
    probe = ("import runpy, sys; sys.path.insert(0, sys.argv[1]); "
             "print(runpy.run_path(sys.argv[2])['load_modal']().__file__)")
    out = subprocess.run([PY, "-c", probe, str(MODAL_DIR), str(MODAL_DIR / "ar_modal.py")], cwd=MODAL_DIR,
                         capture_output=True, text=True, env=clean_env())
    assert out.returncode == 0 and "site-packages" in out.stdout, out.stdout + out.stderr


# ---------------------------------------------------------------------------------------------
# The app's declared configuration, read from the real modal objects
# ---------------------------------------------------------------------------------------------
def test_app_configuration(app_mod):
    a = app_mod
    assert a.app.name == "autoresearch"
    spec = a.run_experiment._spec_
    assert spec.gpus == "H100!"  # pinned type: a run is never moved to a faster GPU
    assert list(spec.volumes) == ["/cache"] and spec.volumes["/cache"] is impl(a.volume)
    assert loader_vars(a.volume) == dict(name="autoresearch-cache", create_if_missing=True, version=2,
                                         create_options=None)
    timeout = loader_vars(a.run_experiment)["timeout"]
    assert timeout == a.TIMEOUT_S >= 1500 + 300  # longer than the longest wait (full: 3 x 300 + 600) + margin
    assert function_env(a.run_experiment)["AR_MODAL_VOLUME"] == "autoresearch-cache"  # the container's config

    prep = a.prep._spec_
    assert prep.gpus is None and prep.volumes["/cache"] is impl(a.volume)
    assert loader_vars(a.prep)["timeout"] >= 3600

    # The image: the project's pinned dependencies, straight from pyproject.toml, and the cache on the Volume.
    assert spec.image is impl(a.image)
    cmds = "\n".join(image_commands(a.image))
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert deps and all(re.search(rf"(^|\s|'){re.escape(d)}(\s|'|$)", cmds, re.M) for d in deps), cmds
    assert all("==" in d for d in deps)
    assert re.search(r"AR_CACHE_DIR=.?/cache", cmds), cmds
    assert "python" in cmds and "3.11" in cmds


@pytest.mark.parametrize("value, expected", [
    ("H100:8", "H100:8"),
    ("H100!,A100-80GB", ["H100!", "A100-80GB"]),
    ("A10G", "A10G"),
])
def test_gpu_is_one_parameter(value, expected):
    a = load(MODAL_DIR / "app.py", f"ar_modal_app_{abs(hash(value))}", AR_MODAL_GPU=value, AR_MODAL_TIMEOUT_S="3600")
    assert a.run_experiment._spec_.gpus == expected
    assert loader_vars(a.run_experiment)["timeout"] == 3600
    assert function_env(a.run_experiment)["AR_MODAL_GPU"] == value


def test_the_double_matches_modal():
    """The names the client uses exist in the real package, with the hierarchy the fake copies: an expired
    result and a function timeout are modal TimeoutErrors, "still running" is the builtin TimeoutError."""
    for name in ("AuthError", "NotFoundError", "ConnectionError", "FunctionTimeoutError", "OutputExpiredError"):
        real, fake = getattr(modal.exception, name), getattr(FAKE_MOD.exception, name)
        assert issubclass(real, modal.exception.Error) and issubclass(fake, FAKE_MOD.exception.Error)
        assert issubclass(real, TimeoutError) is issubclass(fake, TimeoutError) is False
    for name in ("FunctionTimeoutError", "OutputExpiredError"):
        assert issubclass(getattr(modal.exception, name), modal.exception.TimeoutError)
        assert issubclass(getattr(FAKE_MOD.exception, name), FAKE_MOD.exception.TimeoutError)
    for api in (modal.Function.from_name, modal.FunctionCall.from_id, modal.FunctionCall.get,
                modal.FunctionCall.cancel, modal.FunctionCall.get_call_graph, modal.Volume.from_name):
        assert callable(api)
    import modal._functions as functions  # FunctionCall.get's "no output yet" is the builtin TimeoutError
    assert "raise TimeoutError()" in inspect.getsource(functions._Invocation.poll_function)
    assert getattr(functions, "TimeoutError", TimeoutError) is TimeoutError
    assert "terminate_containers" in inspect.signature(modal.FunctionCall.cancel).parameters
    assert "timeout" in inspect.signature(modal.FunctionCall.get).parameters


def test_client_defaults_match_the_app(app_mod):
    client = load(MODAL_DIR / "ar_modal.py", "ar_modal_client_defaults", AR_MODAL_APP="", AR_MODAL_VOLUME="")
    assert client.APP_NAME == app_mod.APP_NAME and client.VOLUME_NAME == app_mod.VOLUME_NAME
    assert hasattr(app_mod, client.FUNCTION)


# ---------------------------------------------------------------------------------------------
# The function body, through Modal's own Function.local(), on a fake trainer
# ---------------------------------------------------------------------------------------------
FAKE_TRAINER = '''\
"""A stand-in for trainer/train.py: MODE and SLEEP_S are edited and committed."""
import os, sys, time
MODE = "ok"
SLEEP_S = 0.0
print(f"fake trainer profile={os.environ.get('AR_PROFILE', '-')} depth_env={os.environ.get('AR_DEPTH', '-')}")
sys.stdout.flush()
time.sleep(SLEEP_S)
if MODE == "crash":
    print("Traceback (most recent call last):", file=sys.stderr)
    print("torch.OutOfMemoryError: CUDA out of memory.", file=sys.stderr)
    sys.exit(1)
print("---")
print("val_bpb:          1.250000")
print("depth:            8", flush=True)
'''
BLOCK = "---\nval_bpb:          1.250000\ndepth:            8\n"


def snapshot(trainer=FAKE_TRAINER):
    """A tar with trainer/train.py (what `git archive` gives a job)."""
    buf = io.BytesIO()
    data = trainer.encode()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("trainer/train.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def run_local(app_mod, monkeypatch, cache, trainer=FAKE_TRAINER):
    monkeypatch.setenv("AR_CACHE_DIR", str(cache))
    monkeypatch.setenv("AR_DEPTH", "4")  # an AR_ variable of the container's environment does not leak in
    job = {"name": "ar-test-0000000", "commit": "0" * 40, "env": {"AR_PROFILE": "smoke"},
           "snapshot": snapshot(trainer)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return app_mod.run_experiment.local(job)


def test_run_experiment_body_local(app_mod, tmp_path, monkeypatch):
    out = run_local(app_mod, monkeypatch, tmp_path)
    assert out["state"] == "succeeded" and out["exit_code"] == 0, out["log"][-3000:]
    assert out["summary"] == BLOCK
    assert "fake trainer profile=smoke depth_env=-" in out["log"] and out["log"].startswith("[ar-modal]")
    assert out["gpu"] == "cpu" and out["gpu_requested"] == "H100!" and not out["log_truncated"]
    run_dir = tmp_path / out["run_dir"]  # its own path on the "Volume"
    assert (run_dir / "log").read_text() == out["log"] and (run_dir / "exit_code").read_text() == "0\n"
    assert "result" not in out


def test_run_experiment_body_failure(app_mod, tmp_path, monkeypatch):
    out = run_local(app_mod, monkeypatch, tmp_path, FAKE_TRAINER.replace('MODE = "ok"', 'MODE = "crash"'))
    assert out["state"] == "failed" and out["exit_code"] == 1 and out["summary"] == ""
    assert "torch.OutOfMemoryError" in out["log"] and "-> failed" in out["log"].splitlines()[-1]


def test_summary_block_is_the_last_dashes_and_the_key_lines_after(app_mod):
    f = app_mod.summary_block
    assert f("x\n---\nold: 1\n" + BLOCK + "[ar-modal] note\n") == BLOCK
    assert f(BLOCK + "AR_RESULT_JSON: {}\n") == BLOCK + "AR_RESULT_JSON: {}\n"  # a JSON line is just another key
    assert f("no block\n") == f("---\n") == f("---\nnot a key line\n") == ""


def test_trainer_time_limit(app_mod, tmp_path):
    log = tmp_path / "log"
    t0 = time.time()
    code = app_mod.run_streaming([PY, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                                 str(tmp_path), clean_env(), log, limit_s=1)
    assert code != 0 and time.time() - t0 < 30
    assert "started" in log.read_text() and "time limit of 1s reached" in log.read_text()


# ---------------------------------------------------------------------------------------------
# Exception handling of the client, at the seam (a stub `modal` module, in process)
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def client(tmp_path, monkeypatch):
    monkeypatch.setenv("AR_STATE_DIR", str(tmp_path / "state"))
    mod = load(MODAL_DIR / "ar_modal.py", "ar_modal_client_test")
    return mod


def stub_modal(get=None, cancel=None, graph=(), files=None):
    fake = FAKE_MOD
    calls = []

    class Call:
        def __init__(self, call_id):
            self.object_id = call_id

        def get(self, timeout=None):
            calls.append(("get", self.object_id, timeout))
            if isinstance(get, BaseException) or (isinstance(get, type) and issubclass(get, BaseException)):
                raise get
            return get

        def cancel(self, terminate_containers=False):
            calls.append(("cancel", self.object_id, terminate_containers))
            if cancel:
                raise cancel

        def get_call_graph(self):
            return [types.SimpleNamespace(task_id=t) for t in graph]

        @property
        def logs(self):
            return types.SimpleNamespace(tail=lambda n: [types.SimpleNamespace(message="live line\n")])

    class Vol:
        def read_file(self, path):
            if path not in (files or {}):
                raise fake.exception.NotFoundError(path)
            yield files[path].encode()

    m = types.SimpleNamespace(
        exception=fake.exception, calls=calls,
        FunctionCall=types.SimpleNamespace(from_id=lambda i: Call(i)),
        Volume=types.SimpleNamespace(from_name=lambda name: Vol()),
        Function=types.SimpleNamespace(from_name=lambda app, fn: types.SimpleNamespace(
            spawn=lambda job: calls.append(("spawn", app, fn, job)) or Call("fc-STUB1"))),
    )
    return m


def make_job(client, job_id="fc-JOB1", state="queued"):
    root = client.state_root()
    d = root / "jobs" / job_id
    d.mkdir(parents=True)
    client.write_json(d / "meta.json", {"id": job_id, "state": state, "env": {}, "commit": "c" * 40})
    client.write_atomic(d / "state", state + "\n")
    client.write_atomic(d / "log", "")
    return client.Job(root, job_id)


def test_still_running_is_not_an_outcome(client):
    job = make_job(client)
    client.collect(stub_modal(get=TimeoutError()), job)
    assert job.state == "queued"
    client.collect(stub_modal(get=TimeoutError(), graph=["ta-1"]), job)  # a container picked it up
    assert job.state == "running" and job.meta["started_at"]


def test_outcome_recorded(client):
    job = make_job(client)
    out = {"state": "succeeded", "exit_code": 0, "log": "---\nx: 1\n", "summary": "---\nx: 1\n",
           "gpu": "NVIDIA H100 80GB HBM3", "gpu_requested": "H100!", "run_dir": "runs/fc-JOB1", "seconds": 400}
    m = stub_modal(get=out)
    client.collect(m, job)
    assert job.state == "succeeded" and job.meta["gpu"] == "NVIDIA H100 80GB HBM3" and job.meta["exit_code"] == 0
    assert (job.dir / "log").read_text().startswith("---\nx: 1\n[ar-modal]")
    assert m.calls == [("get", "fc-JOB1", 0.0)]
    client.collect(m, job)  # terminal: never asked again
    assert len(m.calls) == 1


def test_expired_result_is_read_back_from_the_volume(client):
    fake = FAKE_MOD
    job = make_job(client)
    files = {"runs/fc-JOB1/exit_code": "0\n", "runs/fc-JOB1/log": "log\n", "runs/fc-JOB3/exit_code": "1\n"}
    client.collect(stub_modal(get=fake.exception.OutputExpiredError(), files=files), job)
    assert job.state == "succeeded" and "recovered from the Volume" in (job.dir / "log").read_text()
    crashed = make_job(client, "fc-JOB3")
    client.collect(stub_modal(get=fake.exception.OutputExpiredError(), files=files), crashed)
    assert crashed.state == "failed" and crashed.meta["exit_code"] == 1
    gone = make_job(client, "fc-JOB2")
    client.collect(stub_modal(get=fake.exception.OutputExpiredError()), gone)
    assert gone.state == "failed" and "expired" in (gone.dir / "log").read_text()


@pytest.mark.parametrize("exc, state", [
    ("FunctionTimeoutError", "failed"),  # ran past the Function's timeout: an outcome, not "still running"
    ("RemoteError", "failed"),
    (RuntimeError("boom"), "failed"),
])
def test_call_failures(client, exc, state):
    fake = FAKE_MOD
    err = getattr(fake.exception, exc)("x") if isinstance(exc, str) else exc
    job = make_job(client)
    client.collect(stub_modal(get=err), job)
    assert job.state == state


def test_auth_error_is_unavailable(client):
    fake = FAKE_MOD
    job = make_job(client)
    with pytest.raises(client.Unavailable, match="modal setup"):
        client.collect(stub_modal(get=fake.exception.AuthError("Token missing")), job)
    assert job.state == "queued"


def test_cancel_retries_then_reports(client, monkeypatch, capsys):
    monkeypatch.setattr(client.time, "sleep", lambda s: None)
    job = make_job(client, state="running")
    m = stub_modal(get=TimeoutError(), cancel=RuntimeError("unreachable"))
    monkeypatch.setattr(client, "load_modal", lambda: m)
    assert client.main(["cancel", job.id]) == 1
    assert job.state == "running" and [c[0] for c in m.calls].count("cancel") == 3
    m = stub_modal(get=TimeoutError())
    monkeypatch.setattr(client, "load_modal", lambda: m)
    assert client.main(["cancel", "--to", "timeout", "--reason", "deadline", job.id]) == 0
    assert job.state == "timeout" and ("cancel", job.id, True) in m.calls
    assert "live line" in (job.dir / "log").read_text()


def test_cancel_keeps_a_just_finished_outcome(client, monkeypatch):
    job = make_job(client, state="running")
    m = stub_modal(get={"state": "succeeded", "exit_code": 0, "log": "done\n"})
    monkeypatch.setattr(client, "load_modal", lambda: m)
    assert client.main(["cancel", job.id]) == 0
    assert job.state == "succeeded" and not [c for c in m.calls if c[0] == "cancel"]


def test_spawned_call_is_cancelled_when_its_record_cannot_be_written(client, monkeypatch, tmp_path):
    m = stub_modal()
    monkeypatch.setattr(client, "load_modal", lambda: m)

    def broken(path, obj):
        raise OSError("disk full")

    monkeypatch.setattr(client, "write_json", broken)
    tar = tmp_path / "src.tar"
    tar.write_bytes(b"")
    with pytest.raises(OSError):
        client.main(["submit", "--name", "ar-x-1234567", "--tag", "x", "--commit", "a" * 40, "--tar", str(tar)])
    assert [c[0] for c in m.calls] == ["spawn", "cancel"]


# ---------------------------------------------------------------------------------------------
# The scripts against the fake platform: submit -> wait -> summary block, failures, cancel
# ---------------------------------------------------------------------------------------------
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@test.invalid"]


@pytest.fixture
def fake_repo(tmp_path):
    repo = tmp_path / "repo"
    (repo / "trainer").mkdir(parents=True)
    shutil.copytree(REPO / "modal", repo / "modal", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "trainer" / "train.py").write_text(FAKE_TRAINER)
    (repo / ".gitignore").write_text(".ar/\n")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    server, volume = tmp_path / "server", tmp_path / "volume"
    volume.mkdir()
    env = clean_env(AR_STATE_DIR=tmp_path / "state", AR_MODAL_PYTHON=PY, AR_MODAL_FAKE=FAKE,
                    AR_MODAL_FAKE_DIR=server, AR_MODAL_POLL_S="0.2", AR_CACHE_DIR=volume, AR_PROFILE="smoke",
                    AR_TAG="modal")
    fr = types.SimpleNamespace(repo=repo, env=env, server=server, volume=volume)
    commit(fr, "fake trainer")
    return fr


def commit(fr, message, **constants):
    train = fr.repo / "trainer" / "train.py"
    text = train.read_text()
    for name, value in constants.items():
        old = next(line for line in text.splitlines() if line.startswith(f"{name} = "))
        text = text.replace(old, f"{name} = {value!r}")
    train.write_text(text)
    subprocess.run(["git", "add", "-A"], cwd=fr.repo, check=True)
    subprocess.run([*GIT, "commit", "-qm", message], cwd=fr.repo, check=True)


def sh(fr, script, *args, timeout=120, **env):
    return subprocess.run([str(fr.repo / "modal" / script), *args], cwd=fr.repo, env={**fr.env, **env},
                          capture_output=True, text=True, timeout=timeout)


def deploy(fr):
    subprocess.run([PY, str(FAKE), "deploy", str(fr.repo / "modal" / "app.py")], check=True,
                   env={**fr.env}, capture_output=True)


def blocks(stdout):
    parts = HEADER.split(stdout)
    return {parts[i]: (parts[i + 1], parts[i + 2].removeprefix("\n")) for i in range(1, len(parts), 3)}


def test_submit_wait_prints_the_summary_block_and_resubmit_returns_the_call(fake_repo):
    proc = sh(fake_repo, "submit-async.sh")
    assert proc.returncode == 3 and proc.stdout == ""  # not deployed yet: nothing spawned, exit 3
    assert "make modal-deploy" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    deploy(fake_repo)
    proc = sh(fake_repo, "submit-async.sh", AR_MODAL_FAKE_MODE="unauthenticated")
    assert proc.returncode == 3 and "modal setup" in proc.stderr and proc.stdout == ""
    assert not (fake_repo.server / "calls").exists()
    job = sh(fake_repo, "submit-async.sh").stdout.strip()
    assert job.startswith("fc-") and sh(fake_repo, "submit-async.sh").stdout.strip() == job
    proc = sh(fake_repo, "wait-jobs.sh", job)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"=== {job} (succeeded) ===\n{BLOCK}"
    assert "fake trainer profile=smoke" in sh(fake_repo, "logs.sh", job).stdout
    assert sh(fake_repo, "submit-async.sh").stdout.strip() == job  # succeeded: still the same call
    proc = sh(fake_repo, "submit-async.sh", "--env", "AR_DEPTH=4")
    assert proc.returncode == 2 and "--env is gone" in proc.stderr


def test_modal_package_missing(fake_repo, tmp_path):
    no_site = tmp_path / "python-without-site"
    no_site.write_text(f"#!/bin/sh\nexec {PY} -S \"$@\"\n")
    no_site.chmod(0o755)
    env = {k: v for k, v in fake_repo.env.items() if k != "AR_MODAL_FAKE"}
    proc = subprocess.run([str(fake_repo.repo / "modal" / "submit-async.sh")], cwd=fake_repo.repo,
                          env={**env, "AR_MODAL_PYTHON": str(no_site)}, capture_output=True, text=True)
    assert proc.returncode == 3 and "pip install modal" in proc.stderr, proc.stderr


def test_crashing_trainer_raising_function_and_dying_container(fake_repo):
    deploy(fake_repo)
    raised = sh(fake_repo, "submit-async.sh", "--name", "raised", AR_MODAL_FAKE_MODE="raise").stdout.strip()
    died = sh(fake_repo, "submit-async.sh", "--name", "died", AR_MODAL_FAKE_MODE="crash").stdout.strip()
    commit(fake_repo, "crash", MODE="crash")
    crashed = sh(fake_repo, "submit-async.sh").stdout.strip()
    assert raised.startswith("fc-") and died.startswith("fc-") and crashed.startswith("fc-")
    proc = sh(fake_repo, "wait-jobs.sh", raised, died, crashed)
    assert proc.returncode == 1
    got = blocks(proc.stdout)
    assert got[raised][0] == "failed" and "RuntimeError: the function raised" in got[raised][1]
    assert got[died][0] == "failed" and "without a result" in got[died][1]
    assert got[crashed][0] == "failed" and "torch.OutOfMemoryError: CUDA out of memory." in got[crashed][1]
    # A failed job is retried under a new call id.
    retry = sh(fake_repo, "submit-async.sh", "--name", "raised", AR_MODAL_FAKE_MODE="raise").stdout.strip()
    assert retry.startswith("fc-") and retry != raised
    assert sh(fake_repo, "wait-jobs.sh", retry, AR_MODAL_FAKE_MODE="raise").returncode == 1


def test_expired_result_end_to_end(fake_repo):
    deploy(fake_repo)
    job = sh(fake_repo, "submit-async.sh").stdout.strip()
    proc = sh(fake_repo, "wait-jobs.sh", job, AR_MODAL_FAKE_MODE="expire")
    assert proc.returncode == 0, proc.stderr
    assert blocks(proc.stdout)[job] == ("succeeded", BLOCK)
    assert "recovered from the Volume" in sh(fake_repo, "logs.sh", job).stdout


def test_deadline_cancels_and_a_taken_name_is_refused(fake_repo):
    deploy(fake_repo)
    commit(fake_repo, "slow", SLEEP_S=60)
    job = sh(fake_repo, "submit-async.sh", "--name", "my-run").stdout.strip()
    commit(fake_repo, "other", SLEEP_S=0.0)
    proc = sh(fake_repo, "submit-async.sh", "--name", "my-run")
    assert proc.returncode == 2 and "my-run" in proc.stderr and job in proc.stderr
    proc = sh(fake_repo, "wait-jobs.sh", job, AR_TIMEOUT_S="2")
    assert proc.returncode == 1 and blocks(proc.stdout)[job][0] == "timeout", proc.stdout + proc.stderr
    pgid = int((fake_repo.server / "calls" / job / "pid").read_text())
    assert not FAKE_MOD._group_alive(pgid), "the container is gone"
    assert sh(fake_repo, "cancel-jobs.sh", job).returncode == 0  # idempotent


def test_makefile_deploy_target():
    out = subprocess.run(["make", "-n", "-o", ".venv/.setup-stamp", "modal-deploy",
                          "AR_MODAL_GPU=$(shell echo injected)"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "modal deploy modal/app.py" in out.stdout and "injected" not in out.stdout
