"""Modal-specific tests of the recipe (modal/). The contract itself (ok, crash, hang, signals, resubmit ...)
runs through tests/contract/backend_modal.py. Here: app.py's declarations read from the real `modal`
package, the `train` body through Modal's own `Function.local()` on the CPU profile, and against the
double (tests/fakes/modal/modal.py): an expired result, the name -> id map in a modal.Dict, a
not-deployed app, the debug Sandbox terminated. Nothing here reaches Modal."""

import importlib.util
import io
import os
import pickle
import re
import shutil
import subprocess
import sys
import tarfile
import warnings

import pytest
from conftest import REPO, clean_env

sys.path.insert(0, str(REPO / "tests" / "contract"))
import backend_modal  # noqa: E402
from contract_util import Project  # noqa: E402


def load_app(name="ar_modal_app"):
    spec = importlib.util.spec_from_file_location(name, REPO / "modal" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def archive(files):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_app_declares_one_gpu_type_the_volume_and_a_timeout(monkeypatch):
    for name in ("AR_MODAL_GPU", "AR_MODAL_TIMEOUT_S", "AR_MODAL_APP", "AR_MODAL_VOLUME"):
        monkeypatch.delenv(name, raising=False)
    a = load_app()
    spec = a.train._spec_
    assert spec.gpus == "H100!"  # no silent upgrade to a faster GPU
    assert list(spec.volumes) == [a.CACHE] and a.CACHE == "/root/.cache/autoresearch"
    assert a.TIMEOUT_S == 1800 and a.SETTINGS == {}  # the defaults: nothing to pass on to the containers
    assert a.prep._spec_.gpus is None and list(a.prep._spec_.volumes) == [a.CACHE]
    monkeypatch.setenv("AR_MODAL_GPU", "A100-80GB")
    monkeypatch.setenv("AR_MODAL_TIMEOUT_S", "900")
    b = load_app("ar_modal_app_b")
    assert b.train._spec_.gpus == "A100-80GB" and b.TIMEOUT_S == 900
    assert b.SETTINGS == {"AR_MODAL_GPU": "A100-80GB", "AR_MODAL_TIMEOUT_S": "900"}  # the containers see them


def test_local_runs_the_job_function_on_the_cpu_profile(ar_cache, monkeypatch, tmp_path):
    """Modal's own Function.local(): the body of `train`, offline, on a snapshot of this repository."""
    (tmp_path / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # `python`, as in the image
    (tmp_path / "python").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("AR_CACHE_DIR", str(ar_cache))
    a = load_app()
    snapshot = subprocess.run(["git", "-C", str(REPO), "archive", "HEAD", "trainer", "prepare", "pyproject.toml"],
                              check=True, capture_output=True).stdout
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # .local() warns that the Volume is not mounted here
        block = a.train.local(snapshot, {"AR_PROFILE": "smoke"})
    lines = block.splitlines()
    assert lines[0] == "---" and lines[1].startswith("val_bpb:") and re.search(r"^profile:\s+smoke$", block, re.M)
    failing = archive({"train.py": 'import sys\nprint("step 1\\rstep 2")\nsys.exit("FAIL: loss is NaN")\n'})
    with pytest.raises(RuntimeError) as e, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a.train.local(failing, {"AR_TRAIN_CMD": f"{sys.executable} train.py"})
    assert str(e.value).splitlines() == ["step 2", "FAIL: loss is NaN", f"note: {sys.executable} train.py exited "
                                         "with code 1"]


@pytest.fixture
def project(tmp_path):
    p = Project(tmp_path, "modal", backend_modal)
    yield p
    p.cleanup()


def dict_of(p):
    return pickle.loads((p.tmp / "modal-server" / "dicts" / "autoresearch-jobs.pkl").read_bytes())


def test_expired_output_is_reported_as_expired(project):
    project.commit("ok")
    job = project.submit()
    assert project.wait(job)[0].returncode == 0
    (project.tmp / "modal-server" / "calls" / job / "expired").touch()  # Modal dropped the result
    proc = project.run("wait-jobs.sh", job)
    header, note = proc.stdout.splitlines()
    assert proc.returncode == 1 and header == f"=== {job} (expired) ===", proc.stdout
    assert "OutputExpiredError" in note and "failed" not in proc.stdout + proc.stderr
    assert project.run("logs.sh", job).stdout.endswith("depth:            8\n")  # the log is still there


def test_the_name_to_id_map_is_a_modal_dict(project):
    project.commit("crash")
    first = project.submit("--name", "retry-me")
    assert project.wait(first)[1][first][0] == "failed"
    project.commit("ok")
    second = project.submit("--name", "retry-me")
    d = dict_of(project)
    assert d[("name", "retry-me", 1)] == first and d[("name", "retry-me", 2)] == second
    assert d[("call", first)] == d[("call", second)] == "retry-me"
    assert project.git("status", "--porcelain") == "?? modal/" and not (project.repo / ".ar").exists()  # no local state
    assert project.wait(second)[0].returncode == 0


def test_not_deployed_is_exit_3_and_starts_nothing(project):
    (project.tmp / "modal-server" / "apps" / "autoresearch").unlink()
    project.commit("ok")
    proc = project.run("submit-async.sh")
    assert proc.returncode == 3 and "modal deploy modal/app.py" in proc.stderr and proc.stdout == ""
    assert dict_of(project) == {}  # the claim of the name was released


def test_the_debug_sandbox_is_terminated(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_MODAL_DIR", str(tmp_path))
    monkeypatch.setitem(sys.modules, "modal", backend_modal.fake_modal())
    a = load_app("ar_modal_app_fake")
    monkeypatch.setattr("builtins.input", lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))  # Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        a.debug(hours=0.5)
    [sandbox] = (tmp_path / "sandboxes").iterdir()
    assert sandbox.read_text() == "terminated\n"


def test_scripts_say_when_the_modal_package_is_missing(tmp_path):
    proc = subprocess.run([sys.executable, "-S", str(REPO / "modal" / "app.py"), "logs.sh", "fc-x"],
                          capture_output=True, text=True, env=clean_env())
    assert proc.returncode == 3 and proc.stderr.startswith("logs.sh: no 'modal' package")


def test_a_round_on_backend_modal_end_to_end(tmp_path):
    """tools/ and modal/ copied into a karpathy-layout project; `round.py round --backend=modal` against the
    double: the sweep's two candidates and the controls run as Modal calls, the winner is kept."""
    from test_round import GIT_ID, TRAIN

    p = tmp_path / "autoresearch"
    p.mkdir()
    for d in ("tools", "modal"):
        shutil.copytree(REPO / d, p / d, ignore=shutil.ignore_patterns("__pycache__", "README.md"))
    (p / "train.py").write_text(TRAIN)
    (p / "prepare.py").write_text("TIME_BUDGET = 300  # fixed\n")
    (p / ".gitignore").write_text("results.tsv\n")
    backend_modal.fake_modal().deploy(tmp_path / "server", p / "modal" / "app.py")
    env = clean_env(**GIT_ID, FAKE_MODAL_DIR=tmp_path / "server", PYTHONPATH=backend_modal.FAKE,
                    AR_TRAIN_CMD=f"{sys.executable} train.py")
    for cmd in (["git", "init", "-q", "-b", "master"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=p, env=env, check=True)
    r = subprocess.run([sys.executable, "tools/round.py", "round", "--k=2", "--backend=modal", "--tag=t",
                        "--sweep=MATRIX_LR=0.05,0.09"], cwd=p, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and "winner: c1" in r.stdout, r.stdout + r.stderr
    lines = (p / "results.tsv").read_text().splitlines()
    rows = [dict(zip(lines[0].split("\t"), x.split("\t"), strict=True)) for x in lines[1:]]
    assert {x["backend"] for x in rows} == {"modal"} and all(x["job_id"].startswith("fc-") for x in rows)
    assert [x["status"] for x in rows] == ["keep", "keep", "keep", "discard"]
    status = subprocess.run(["git", "status", "--porcelain"], cwd=p, capture_output=True, text=True).stdout
    assert status == "", status  # the driver's .ar/ keeps itself out of git status
