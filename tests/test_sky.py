"""sky/ (SkyPilot managed jobs), what the contract suite does not cover: the YAMLs under SkyPilot's own
loader, a result collected late (the jobs controller autostopped, the job's cluster gone), a launch request
cancelled on the server when the submit is interrupted, the log exit codes, SkyPilot's line prefixes.

The generic contract (ok, crash reason, hang, SIGINT, resubmit, ...) runs in tests/contract via
tests/contract/backend_sky.py, against the same double (tests/fakes/sky/sky). No SkyPilot server or
cluster is contacted.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import REPO

sys.path.insert(0, str(REPO / "tests" / "contract"))
import backend_sky  # noqa: E402
from contract_util import REFERENCE_BLOCK, Project, one_error_line  # noqa: E402

OOM = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB."


@pytest.fixture
def sky(tmp_path):
    p = Project(tmp_path, "sky", backend_sky)
    p.state = tmp_path / "sky-state"
    yield p
    p.cleanup()
    assert p.leftovers() == []


def cli(p, *args, env=None):
    return subprocess.run(["sky", *args], cwd=p.repo, env=p.environ(env), capture_output=True, text=True, timeout=60)


def job_record(p, job):
    return json.loads((p.state / "jobs" / f"{job}.json").read_text())


def until(predicate, timeout=30):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_yamls_load_with_skypilot():
    """SkyPilot's own loader (offline): valid with a bucket given by --env, refused without one."""
    code = f"""
import sky, yaml
for name in ("experiment.yaml", "prep.yaml"):
    path = {str(REPO / "sky")!r} + "/" + name
    task = sky.Task.from_yaml_config(yaml.safe_load(open(path)), env_overrides=[("AR_SKY_BUCKET", "ar-test-1")])
    print(sorted(task.storage_mounts), task.envs["AR_CACHE_DIR"], [str(r.accelerators) for r in task.resources])
    try:
        sky.Task.from_yaml(path)
    except ValueError as e:
        print("refused:", e)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    experiment, refused, prep, refused_too = proc.stdout.splitlines()[:4]
    assert experiment == "['/ar-data'] /ar-data/cache [\"{'H100': 1}\"]"
    assert prep == "['/ar-data'] /ar-data/cache ['None']"
    for line in (refused, refused_too):
        assert line.startswith("refused: Environment variable 'AR_SKY_BUCKET' is None")


def test_late_collection_after_autostop_and_teardown(sky):
    """A wait that runs after the driver was killed, the jobs controller autostopped and the job's cluster
    went away still gets every result (sky jobs queue / logs --refresh start the controller again)."""
    sky.commit("ok")
    ok = sky.submit()
    sky.commit("crash")
    crash = sky.submit()
    driver = sky.popen("wait-jobs.sh", ok, crash)
    until(lambda: all(job_record(sky, j)["status"] in ("SUCCEEDED", "FAILED") for j in (ok, crash)))
    driver.kill()  # kill -9 of the driver before it collected
    driver.communicate()
    assert not list((sky.state / "clusters").iterdir())  # the jobs' clusters are gone
    env = {"FAKE_SKY_AUTOSTOP_S": "0"}
    stopped = cli(sky, "jobs", "queue", "-o", "json", env=env)  # the controller stops: no answer without -r
    assert stopped.returncode == 1 and "No in-progress managed jobs" in stopped.stderr
    assert json.loads((sky.state / "controller.json").read_text())["status"] == "STOPPED"
    proc, out = sky.wait(ok, crash, env=env)
    assert proc.returncode == 1, proc.stderr
    assert out[ok] == ("succeeded", REFERENCE_BLOCK.splitlines())
    assert out[crash][0] == "failed" and any(line.startswith(OOM) for line in out[crash][1])
    assert out[crash][1][-1] == "note: managed job 2 ended FAILED"
    assert not any("ERROR: Job 1 failed" in line for line in out[crash][1])  # SkyPilot's line is not the reason


def test_log_exit_codes_are_the_job_state_and_the_log_is_kept(sky):
    """sky jobs logs (follow) prints the whole log, then exits 0 / 100 / 103; --no-follow exits 0 whatever
    the state (client/sdk.py stream_response, get_result=follow); logs.sh keeps only the job's own lines."""
    codes = {}
    for mode in ("ok", "crash", "hang"):
        sky.commit(mode)
        codes[mode] = sky.submit()
    until(lambda: "step 00000" in sky.run("logs.sh", codes["hang"]).stdout)
    assert sky.run("cancel-jobs.sh", codes["hang"]).returncode == 0
    assert sky.wait(codes["ok"], codes["crash"])[0].returncode == 1
    for mode, rc in (("ok", 0), ("crash", 100), ("hang", 103)):
        follow = cli(sky, "jobs", "logs", "--tail", "0", codes[mode])
        assert follow.returncode == rc and "fake: argv=[]" in follow.stdout
        assert cli(sky, "jobs", "logs", "--no-follow", codes[mode]).returncode == 0
    raw = cli(sky, "jobs", "logs", "--no-follow", codes["crash"]).stdout
    assert re.search(r"^\(ar-[0-9a-f-]+, pid=[0-9]+\) fake: argv=\[\]", raw, re.M)
    assert "ERROR: \x1b[31mJob 1 failed" in raw
    mine = sky.run("logs.sh", codes["crash"]).stdout
    assert "pid=" not in mine and "ERROR:" not in mine and "Job started" not in mine
    assert mine.splitlines()[-1].startswith(OOM) and mine.startswith("fake: argv=[]")
    out = sky.wait(codes["hang"])[1]
    assert out[codes["hang"]][0] == "cancelled"


def test_interrupted_submit_cancels_its_launch_request(sky):
    """Killing the sky client leaves the launch running on the server (command.py _async_call_or_wait):
    an interrupted submit cancels the request with `sky api cancel`, and no job ever starts."""
    sky.commit("ok")
    slow = {"FAKE_SKY_LAUNCH_S": "1"}
    submit = sky.popen("submit-async.sh", env=slow)
    until(lambda: list((sky.state / "requests").glob("*.json")) if (sky.state / "requests").exists() else False)
    time.sleep(0.3)
    submit.send_signal(signal.SIGTERM)
    out, err = submit.communicate(timeout=60)
    assert submit.returncode == 143 and out == "", err
    assert "launch request" in err and "cancelled" in err
    [request] = [json.loads(p.read_text()) for p in (sky.state / "requests").glob("*.json")]
    assert request["status"] == "CANCELLED"
    time.sleep(1.2)  # the launch would have made its job by now
    assert not (sky.state / "jobs").exists() or not list((sky.state / "jobs").glob("*.json"))
    assert sky.leftovers() == []
    # the client alone killed (kill -9, no trap): the request goes on and the job starts anyway
    submit = sky.popen("submit-async.sh", env=slow)
    until(lambda: len(list((sky.state / "requests").glob("*.json"))) == 2)
    submit.kill()
    submit.communicate()
    until(lambda: list((sky.state / "jobs").glob("*.json")) if (sky.state / "jobs").exists() else False, timeout=10)
    job = sky.submit()  # resubmitted: the job of that name is returned, nothing launches twice
    sky.submitted.add(job)
    assert len(list((sky.state / "jobs").glob("*.json"))) == 1
    assert sky.wait(job)[1][job][0] == "succeeded"


def test_settings_and_unavailable_backend(sky):
    sky.commit("ok")
    for env, word, rc in (({"AR_SKY_BUCKET": None}, "AR_SKY_BUCKET", 3),  # unset: the backend is not set up
                          ({"AR_SKY_BUCKET": "Bad_Bucket"}, "AR_SKY_BUCKET", 2),
                          ({"AR_SKY_GPU": "H200;x"}, "AR_SKY_GPU", 2)):
        proc = sky.run("submit-async.sh", env=env)
        assert proc.returncode == rc and word in one_error_line(proc)
    no_sky = {"PATH": f"{os.path.dirname(shutil.which('git'))}:{os.path.dirname(shutil.which('jq'))}:/usr/bin:/bin"}
    for script in ("submit-async.sh", "wait-jobs.sh", "cancel-jobs.sh", "logs.sh"):
        proc = sky.run(script, *([] if script == "submit-async.sh" else ["1"]), env=no_sky)
        assert proc.returncode == 3 and "sky" in one_error_line(proc), script
    for script in ("wait-jobs.sh", "cancel-jobs.sh", "logs.sh"):  # no controller yet: nothing is known
        assert sky.run(script, "1").returncode == 2
    job = sky.submit(env={"AR_SKY_GPU": "H200"})
    assert job_record(sky, job)["resources"] == "1x[H200]"
    assert sky.wait(job)[0].returncode == 0
    sky.commit("ok", sleep_s=0.1)  # the same name with another commit is another job (another checkout's)
    assert sky.submit("--name", f"ar-{sky.git('rev-parse', 'HEAD~1')[:10]}") != job


def test_recipe_is_small_and_shellcheck_clean():
    files = [p for p in (REPO / "sky").iterdir() if p.name != "README.md"]
    total = sum(len(p.read_text().splitlines()) for p in files)
    assert total <= 400, f"sky/ has {total} lines (README excluded); the budget is 400"
    assert len((REPO / "tests" / "fakes" / "sky" / "sky").read_text().splitlines()) <= 300
    for path in (REPO / "sky").glob("*.yaml"):
        assert yaml.safe_load(path.read_text())["envs"]["AR_SKY_BUCKET"] is None  # no shared default bucket
    shellcheck = shutil.which("shellcheck", path=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    if shellcheck is None:
        pytest.skip("shellcheck not installed")
    proc = subprocess.run([shellcheck, *map(str, sorted(REPO.glob("sky/*.sh")))], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
