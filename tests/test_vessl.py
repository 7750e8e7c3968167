"""batch-job/ (VESSL), what the generic contract suite (tests/contract, backend_vessl.py) does not check:
the listing that lags, the code archive, login and settings, the object volume's limits, no orphan
after a failed create, a log longer than vesslctl returns, prep.sh, uv, size. Everything runs against
the vesslctl double (tests/fakes/vesslctl), in a karpathy-layout project (train.py at the root)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "contract"))
import backend_vessl  # noqa: E402
from contract_util import REFERENCE_BLOCK, REPO, Project, one_error_line  # noqa: E402


@pytest.fixture
def vessl(tmp_path):
    p = Project(tmp_path, "vessl", backend_vessl)
    p.root = tmp_path / "vessl"
    p.calls = lambda: [json.loads(line) for line in (p.root / "calls.jsonl").read_text().splitlines()]
    p.jobs = lambda: backend_vessl.jobs(p.root)
    yield p
    p.cleanup()
    assert p.leftovers() == []


def count(p, *argv):
    return sum(c[:len(argv)] == list(argv) for c in p.calls())


def test_late_listing_and_the_same_name_creates_once(vessl):
    vessl.commit("ok")
    job = vessl.submit(env={"FAKE_VESSL_LIST_HIDE": "3"})  # create names no slug; the list lags
    assert job in vessl.jobs() and vessl.submit() == job
    assert vessl.wait(job)[0].returncode == 0
    assert vessl.submit() == job and count(vessl, "job", "create") == 1


def test_the_archive_is_uploaded_once_per_commit(vessl):
    sha = vessl.commit("ok")
    a = vessl.submit("--name", "first")
    b = vessl.submit("--name", "second")  # the same commit: the archive is there already
    assert a != b and count(vessl, "volume", "upload") == 1
    assert (vessl.root / "volumes" / "vol1" / "ar-code" / f"{sha}.tar.gz").is_file()
    proc, out = vessl.wait(a, b)
    assert proc.returncode == 0 and {out[a][0], out[b][0]} == {"succeeded"}
    [create] = [c for c in vessl.calls() if c[:2] == ["job", "create"]][:1]
    assert create[create.index("--object-volume") + 1] == "vol1:/root/.cache/autoresearch"
    assert sha not in create[create.index("--cmd") + 1]  # values travel as --env, never in the command


def test_logged_out_is_exit_3(vessl):
    vessl.commit("ok")
    proc = vessl.run("submit-async.sh", env={"FAKE_VESSL_LOGGED_OUT": "1"})  # auth status exits 0 then too
    assert proc.returncode == 3 and "vesslctl auth login" in one_error_line(proc)
    assert count(vessl, "job", "create") == 0


@pytest.mark.parametrize("var, hint", [("AUTORESEARCH_CACHE_VOLUME", "vesslctl volume list"),
                                       ("AUTORESEARCH_RESOURCE_SPEC", "vesslctl resource-spec list")])
def test_a_missing_setting_says_where_to_find_it(vessl, var, hint):
    vessl.commit("ok")
    proc = vessl.run("submit-async.sh", env={var: None})
    assert proc.returncode == 3
    line = one_error_line(proc)
    assert var in line and hint in line


def test_the_volume_refuses_renames_locks_and_symlinks_and_the_recipe_needs_none(vessl):
    vessl.commit("ok")
    job = vessl.submit()
    assert vessl.wait(job)[0].returncode == 0
    assert not (vessl.root / "refused.log").exists()  # the recipe renamed, locked and linked nothing there
    vol = "$HOME/.cache/autoresearch"
    cmds = [f"mv {vol}/ar-code {vol}/moved", f"ln -s /tmp {vol}/link", f"flock {vol}/lock true",
            "python -c 'import os; os.symlink(\"/tmp\", os.path.expanduser(\"~/.cache/autoresearch/l\"))'"]
    jobs = [vessl.submit("--name", f"refused-{i}", env={"AR_TRAIN_CMD": cmd}) for i, cmd in enumerate(cmds)]
    proc, out = vessl.wait(*jobs)
    for job in jobs:
        assert out[job][0] == "failed" and "Operation not supported" in "\n".join(out[job][1]), proc.stdout
    assert len((vessl.root / "refused.log").read_text().splitlines()) == 4
    assert [p.name for p in (vessl.root / "volumes" / "vol1").iterdir()] == ["ar-code"]


def test_a_create_whose_slug_was_never_printed_is_terminated(vessl):
    vessl.commit("hang")
    proc = vessl.run("submit-async.sh", env={"FAKE_VESSL_CREATE_ERROR": "1"})
    assert proc.returncode == 3 and proc.stdout == ""
    assert "terminating job-" in proc.stderr and "context deadline exceeded" in proc.stderr
    [job] = vessl.jobs().values()
    deadline = time.time() + 20
    while vessl.leftovers() and time.time() < deadline:
        time.sleep(0.1)
    assert vessl.jobs()[job["slug"]]["workloadState"] == "terminated" and vessl.leftovers() == []


def test_sigterm_while_the_new_job_is_not_listed_yet_terminates_it(vessl):
    vessl.commit("hang")
    submit = vessl.popen("submit-async.sh", env={"FAKE_VESSL_LIST_HIDE": "4"})
    deadline = time.time() + 20
    while not vessl.jobs() and time.time() < deadline:
        time.sleep(0.05)
    submit.send_signal(signal.SIGTERM)
    out, err = submit.communicate(timeout=60)
    assert submit.returncode == 143 and out == "", err
    [job] = vessl.jobs().values()
    deadline = time.time() + 20
    while vessl.leftovers() and time.time() < deadline:
        time.sleep(0.1)
    assert vessl.jobs()[job["slug"]]["workloadState"] == "terminated"


def test_a_long_log_keeps_its_summary_block(vessl):
    """vesslctl job logs returns at most 1000 lines (the double: the first ones); the job keeps its log
    shorter, so the block at the end of 3000 progress lines still arrives, and so does a crash reason."""
    vessl.commit("ok")
    long_ok = "python -c \"[print('step %05d' % i) for i in range(3000)]\"; python train.py | tail -n 10"
    job = vessl.submit("--name", "long", env={"AR_TRAIN_CMD": long_ok})
    proc, out = vessl.wait(job)
    assert proc.stdout == f"=== {job} (succeeded) ===\n{REFERENCE_BLOCK}\n", proc.stderr
    log = vessl.run("logs.sh", job).stdout.splitlines()
    assert len(log) < 1000 and log[0] == "step 00000" and "\n".join(log).endswith(REFERENCE_BLOCK)
    oom = "python -c \"[print('step %05d' % i) for i in range(3000)]\"; python train.py"
    vessl.commit("crash")
    job = vessl.submit("--name", "long-crash", env={"AR_TRAIN_CMD": oom})
    state, lines = vessl.wait(job)[1][job]
    assert state == "failed" and any(x.startswith("torch.OutOfMemoryError: CUDA out of memory") for x in lines)


def test_prep_fills_the_volume_with_plain_writes(vessl):
    prepare = ("import os, pathlib\nroot = pathlib.Path(os.path.expanduser('~/.cache/autoresearch'))\n"
               "(root / 'data').mkdir(parents=True, exist_ok=True)\n(root / 'data' / 'tmp').write_text('shard')\n"
               "os.rename(root / 'data' / 'tmp', root / 'data' / 'shard_00000.parquet')\nprint('prepared: 1 shard')\n")
    vessl.commit("ok", files={"prepare.py": prepare})
    proc = vessl.run("prep.sh", "--num-shards", "1")
    assert proc.returncode == 0, proc.stderr
    assert "prepared: 1 shard" in proc.stdout
    assert (vessl.root / "volumes" / "vol1" / "data" / "shard_00000.parquet").read_text() == "shard"
    assert not (vessl.root / "refused.log").exists()
    create = [c for c in vessl.calls() if c[:2] == ["job", "create"]][-1]
    assert "AR_TRAIN_CMD=python prepare.py --num-shards 1 " in create and "AR_PREP=1" in create
    again = vessl.run("prep.sh", "--num-shards", "1")  # the same prep: the job that succeeded, nothing new
    assert again.returncode == 0 and count(vessl, "job", "create") == 1


def test_uv_sync_then_uv_run_when_the_project_has_uv_lock(vessl):
    fake_bin = vessl.tmp / "uvbin"
    fake_bin.mkdir()
    (fake_bin / "uv").write_text('#!/bin/sh\necho "fake-uv: $*"\n[ "$1" = run ] && shift && exec "$@"\nexit 0\n')
    (fake_bin / "uv").chmod(0o755)
    vessl.commit("ok", files={"uv.lock": "version = 1\n"})
    job = vessl.submit(env={"PATH": f"{fake_bin}:{vessl.env['PATH']}"})
    proc, out = vessl.wait(job)
    assert proc.returncode == 0, proc.stdout
    assert vessl.run("logs.sh", job).stdout.startswith("fake-uv: run python train.py\n")


def test_the_recipe_is_small_and_shellcheck_clean():
    files = [p for p in (REPO / "batch-job").iterdir() if p.name != "README.md"]
    total = sum(len(p.read_text().splitlines()) for p in files)
    assert total <= 450, f"batch-job/ has {total} lines (README excluded); the target is 450"
    double = REPO / "tests" / "fakes" / "vesslctl" / "vesslctl"
    assert len(double.read_text().splitlines()) <= 300
    shellcheck = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if shellcheck is None:
        pytest.skip("shellcheck not installed")
    proc = subprocess.run([shellcheck, *map(str, sorted(files))], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout

