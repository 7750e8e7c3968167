"""sky/ (SkyPilot): the task YAML under SkyPilot's own loader, submit -> wait -> summary block on the
cluster pool (reuse, cap, queueing, snapshots), the train.py hash check, the deadline and signals,
failures, managed jobs (the in-flight cap, spot, recovery, cancel).

Everything runs against the `sky` test double (tests/fakes/sky/sky), which runs the YAML's setup and
run locally, and a fake trainer (no torch) committed as trainer/train.py: each behaviour (crash,
sleep, wait for a gate file) is a commit, as every candidate is. No SkyPilot cluster is ever
contacted. To be rewritten with the recipe (issue 13).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, clean_env
from contract.contract_util import processes_under

FAKE_SKY = REPO / "tests" / "fakes" / "sky"
FAKE_TRAINER = '''\
"""A stand-in for trainer/train.py: MODE, SLEEP_S, GATE and MARKER are edited and committed."""
import os, sys, time
MODE = "ok"
SLEEP_S = 0.1
GATE = ""
MARKER = "v1"
print(f"fake trainer {MARKER} cwd={os.getcwd()} profile={os.environ.get('AR_PROFILE', '-')}", flush=True)
t = time.time()
while GATE and not os.path.exists(GATE) and time.time() - t < 60:  # held until the test opens the gate
    time.sleep(0.1)
time.sleep(SLEEP_S)
if MODE == "crash":
    print("Traceback (most recent call last):", file=sys.stderr)
    print("torch.OutOfMemoryError: CUDA out of memory.", file=sys.stderr)
    sys.exit(1)
print("---")
print("val_bpb:          1.500000")
print("depth:            8", flush=True)
'''
BLOCK = "---\nval_bpb:          1.500000\ndepth:            8"
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@test.invalid"]
TERMINAL = ("SUCCEEDED", "FAILED", "FAILED_SETUP", "FAILED_DRIVER", "CANCELLED")
MANAGED_TERMINAL = ("SUCCEEDED", "CANCELLED", "FAILED", "FAILED_SETUP", "FAILED_PRECHECKS", "FAILED_NO_RESOURCE",
                    "FAILED_CONTROLLER")


def managed_jobs(sky):
    """The double's managed jobs by name."""
    return {m["job_name"]: m for m in (json.loads(p.read_text()) for p in sky.fake.glob("managed/jobs/*.json"))}


class Sky:
    def __init__(self, tmp):
        self.tmp, self.repo, self.state, self.fake = tmp, tmp / "repo", tmp / "state", tmp / "sky-fake"
        shutil.copytree(REPO / "sky", self.repo / "sky", ignore=shutil.ignore_patterns("__pycache__"))
        (self.repo / "trainer").mkdir()
        (self.repo / "trainer" / "train.py").write_text(FAKE_TRAINER)
        (self.repo / ".gitignore").write_text(".ar/\n")
        subprocess.run(["git", "init", "-q"], cwd=self.repo, check=True)
        self.commit("fake trainer")
        (tmp / "skyhome").mkdir()
        path = os.pathsep.join([str(FAKE_SKY), str(Path(sys.executable).parent), os.environ["PATH"]])
        self.env = clean_env(PATH=path, AR_STATE_DIR=self.state, AR_TAG="t", AR_PROFILE="smoke",
                             SKY_FAKE_STATE=self.fake, SKY_FAKE_MOUNT_ROOT=tmp, SKY_FAKE_LAUNCH_DELAY_S="0.2",
                             AR_SKY_MOUNT=tmp / "mnt" / "ar-data", AR_SKY_PYTHON=sys.executable,
                             AR_SKY_CWD=tmp / "skyhome", AR_SKY_POLL_S="0.2")

    def commit(self, message, **constants):
        train = self.repo / "trainer" / "train.py"
        text = train.read_text()
        for name, value in constants.items():
            old = next(line for line in text.splitlines() if line.startswith(f"{name} = "))
            text = text.replace(old, f"{name} = {value!r}")
        train.write_text(text)
        subprocess.run(["git", "add", "-A"], cwd=self.repo, check=True)
        subprocess.run([*GIT, "commit", "-qm", message], cwd=self.repo, check=True)
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=self.repo, check=True, capture_output=True,
                              text=True).stdout.strip()

    def run(self, script, *args, env=None, timeout=120):
        return subprocess.run([str(self.repo / "sky" / script), *args], cwd=self.repo, capture_output=True,
                              text=True, env={**self.env, **(env or {})}, timeout=timeout)

    def sky(self, *args, env=None):
        return subprocess.run(["sky", *args], cwd=self.tmp, capture_output=True, text=True,
                              env={**self.env, **(env or {})}, timeout=60)

    def submit(self, *args, env=None):
        proc = self.run("submit-async.sh", *args, env=env)
        assert proc.returncode == 0, proc.stderr
        assert len(proc.stdout.splitlines()) == 1
        return proc.stdout.strip()

    def meta(self, job_id):
        return json.loads((self.state / "sky" / "jobs" / job_id / "meta.json").read_text())

    def calls(self, command=None):
        calls = [json.loads(line) for line in (self.fake / "calls.jsonl").read_text().splitlines()]
        return [c for c in calls if command is None or c["argv"][:1] == [command]]

    def fake_jobs(self):
        return {f"{p.parent.parent.name}:{p.stem}": json.loads(p.read_text())
                for p in self.fake.glob("clusters/*/jobs/*.json")}

    def wait_fake(self, key, timeout=60):
        t = time.time()
        while time.time() - t < timeout:
            job = self.fake_jobs().get(key)
            if job and job["status"] in TERMINAL:
                return job
            time.sleep(0.2)
        raise AssertionError(f"fake job {key} did not end")

    def wait_log(self, cluster, n, text, timeout=60):
        log, t = self.fake / "clusters" / cluster / "jobs" / f"{n}.log", time.time()
        while time.time() - t < timeout:
            if log.exists() and text in log.read_text(errors="replace"):
                return
            time.sleep(0.2)
        raise AssertionError(f"{text!r} never appeared in {log}")

    def leftovers(self):
        """Processes and fake jobs still running; a managed job's cancel (CANCELLING) may take a moment."""
        t = time.time()
        while any(m["status"] == "CANCELLING" for m in managed_jobs(self).values()) and time.time() - t < 15:
            time.sleep(0.2)
        running = [k for k, j in self.fake_jobs().items() if j["status"] not in TERMINAL]
        running += [f"managed:{k}" for k, m in managed_jobs(self).items() if m["status"] not in MANAGED_TERMINAL]
        return processes_under(self.state) + processes_under(self.fake) + running


@pytest.fixture
def sky(tmp_path):
    s = Sky(tmp_path)
    yield s
    ids = [p.name for p in (s.state / "sky" / "jobs").iterdir()] if (s.state / "sky" / "jobs").is_dir() else []
    if ids:
        s.run("cancel-jobs.sh", *ids)


def blocks(stdout):
    out, cur = {}, None
    for line in stdout.splitlines():
        if line.startswith("=== ") and line.endswith(" ==="):
            job_id, state = line[4:-4].rsplit(" ", 1)
            cur = out[job_id] = [state.strip("()"), []]
        elif cur is not None:
            cur[1].append(line)
    return {k: (s, "\n".join(b)) for k, (s, b) in out.items()}


# ---------------------------------------------------------------------------------------------
# The YAML, under SkyPilot itself
# ---------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # SkyPilot's own SQLAlchemy / passlib imports
def test_experiment_yaml_loads_with_skypilot():
    import sky

    assert "site-packages" in sky.__file__, sky.__file__  # the package, not the folder
    assert not (REPO / "sky" / "__init__.py").exists(), "sky/ must stay a plain folder"
    task = sky.Task.from_yaml(str(REPO / "sky" / "experiment.yaml"))
    assert {"EXPERIMENT_ID", "AR_PROFILE", "AR_SKY_TRAIN_SHA256", "AR_SKY_BUCKET"} <= set(task.envs)
    (res,) = task.resources
    assert res.accelerators == {"H100": 1}
    (dst, storage), = task.storage_mounts.items()
    assert dst == "/ar-data" and storage.name == "autoresearch-data" and storage.mode.value == "MOUNT_CACHED"
    assert "sha256sum" in task.run and "TORCHINDUCTOR_CACHE_DIR" in task.run and "nothing to do" in task.setup
    assert "AR_RESULT" not in task.run and task.run.rstrip().endswith("trainer/train.py 2>&1")
    # what submit-async.sh does with --env and --gpus: the mount follows AR_SKY_MOUNT / AR_SKY_BUCKET
    config = yaml.safe_load((REPO / "sky" / "experiment.yaml").read_text())
    task = sky.Task.from_yaml_config(config, env_overrides=[("AR_SKY_MOUNT", "/data"), ("AR_SKY_BUCKET", "mine")])
    task.set_resources_override({"accelerators": "H200:1"})
    assert list(task.storage_mounts) == ["/data"] and task.storage_mounts["/data"].name == "mine"
    assert [r.accelerators for r in task.resources] == [{"H200": 1}]
    prep = sky.Task.from_yaml(str(REPO / "sky" / "prep.yaml"))
    assert "prepare/prepare.py" in prep.run and list(prep.storage_mounts) == ["/ar-data"]
    assert not list(prep.resources)[0].accelerators


def test_yaml_run_checks_the_train_py_hash_and_setup_is_a_noop_when_set_up(sky):
    yaml_path, wd = str(sky.repo / "sky" / "experiment.yaml"), str(sky.repo)
    common = ["-d", "-y", "--workdir", wd, "--env", f"AR_SKY_PYTHON={sys.executable}",
              "--env", f"AR_SKY_MOUNT={sky.env['AR_SKY_MOUNT']}"]
    p = sky.sky("launch", "-c", "ar-x-01", yaml_path, *common, "--env", "AR_SKY_TRAIN_SHA256=" + "0" * 64)
    assert p.returncode == 0, p.stderr
    job = sky.wait_fake("ar-x-01:1")
    log = Path(job["log_path"]).read_text()
    assert job["status"] == "FAILED" and "FAIL: trainer/train.py has sha256" in log and "fake trainer" not in log
    assert "setup: done" in log

    sky.sky("launch", "-c", "ar-x-01", yaml_path, *common)  # same cluster again: setup has nothing to do
    job = sky.wait_fake("ar-x-01:2")
    log = Path(job["log_path"]).read_text()
    assert job["status"] == "SUCCEEDED", log
    assert "setup: this cluster is already set up" in log and "setup: done" not in log
    assert log.rstrip().endswith("depth:            8")  # the summary block is the last thing the job prints
    sky.sky("down", "-y", "ar-x-01")


# ---------------------------------------------------------------------------------------------
# The pool: submit -> wait -> summary block
# ---------------------------------------------------------------------------------------------
def test_pool_launches_up_to_the_cap_queues_then_reuses(sky):
    sky.env["SKY_MAX_CLUSTERS"] = "2"
    gate = sky.tmp / "go"
    sky.commit("gated", GATE=str(gate))
    a = sky.submit("--name", "a")
    b = sky.submit("--name", "b")
    assert sky.submit("--name", "a") == a  # the name is the idempotency key
    sky.commit("v2", GATE="", MARKER="v2")
    c = sky.submit()  # both clusters busy, cap reached: queued on ar-t-01
    assert [sky.meta(j)["cluster"] for j in (a, b, c)] == ["ar-t-01", "ar-t-02", "ar-t-01"]
    assert "busy" in sky.meta(c)["placement"]
    gate.touch()

    proc = sky.run("wait-jobs.sh", a, b, c)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert blocks(proc.stdout) == {j: ("succeeded", BLOCK) for j in (a, b, c)}
    # each job ran its own commit's snapshot, even c, synced while a still ran on the same cluster
    log_a, log_c = sky.run("logs.sh", a).stdout, sky.run("logs.sh", c).stdout
    assert "fake trainer v1" in log_a and "profile=smoke" in log_a
    assert "fake trainer v2" in log_c and f"/jobs/{c} " in log_c
    assert sky.meta(a)["train_py_sha256"] != sky.meta(c)["train_py_sha256"]
    assert "pid=" not in log_a and "\x1b" not in log_a and "SkyPilot job ar-t-01:1" in log_a

    d = sky.submit("--name", "d")  # an idle UP cluster: sky exec, no launch
    assert sky.meta(d)["cluster"] == "ar-t-01" and "idle" in sky.meta(d)["placement"]
    assert sky.run("wait-jobs.sh", d).returncode == 0

    launches, execs = sky.calls("launch"), sky.calls("exec")
    assert sorted(call["argv"][2] for call in launches) == ["ar-t-01", "ar-t-02"]
    for call in launches:  # the name goes through -c; autodown that waits on jobs only
        argv = call["argv"]
        assert argv[1] == "-c" and {"-d", "-y", "--down"} <= set(argv)
        assert argv[argv.index("-i") + 1] == "10" and argv[argv.index("--wait-for") + 1] == "jobs"
    assert [call["argv"][1] for call in execs] == ["ar-t-01", "ar-t-01"]
    assert {call["cwd"] for call in sky.calls()} == {str(sky.tmp / "skyhome")}, "sky runs from one stable dir"
    assert sky.leftovers() == []


# ---------------------------------------------------------------------------------------------
# Cancelling
# ---------------------------------------------------------------------------------------------
def test_deadline_cancels_with_sky_cancel_and_nothing_is_left(sky):
    sky.commit("slow", SLEEP_S=60)
    job = sky.submit()
    sky.wait_log("ar-t-01", 1, "fake trainer")
    proc = sky.run("wait-jobs.sh", job, env={"AR_TIMEOUT_S": "2"})
    assert proc.returncode == 1
    assert blocks(proc.stdout)[job][0] == "timeout", proc.stdout + proc.stderr
    assert ["cancel", "-y", "ar-t-01", "1"] in [c["argv"] for c in sky.calls("cancel")]
    assert sky.fake_jobs()["ar-t-01:1"]["status"] == "CANCELLED"
    assert sky.leftovers() == []
    assert sky.run("cancel-jobs.sh", job).returncode == 0  # terminal already: a no-op
    assert (sky.state / "sky" / "jobs" / job / "state").read_text().strip() == "timeout"


@pytest.mark.parametrize("sig, code, delay", [(signal.SIGINT, 130, "8"), (signal.SIGTERM, 143, "0.2")],
                         ids=["sigint-while-launching", "sigterm-while-running"])
def test_signals_cancel_the_waited_jobs(sky, sig, code, delay):
    sky.commit("slow", SLEEP_S=60)
    job = sky.submit(env={"SKY_FAKE_LAUNCH_DELAY_S": delay})
    wait = subprocess.Popen([str(sky.repo / "sky" / "wait-jobs.sh"), job], cwd=sky.repo, env=sky.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if sig == signal.SIGTERM:
        sky.wait_log("ar-t-01", 1, "fake trainer")  # the trainer runs
    else:
        time.sleep(1)  # the supervisor is still in `sky launch`
        assert not (sky.state / "sky" / "jobs" / job / "log").read_text()
    wait.send_signal(sig)
    out, err = wait.communicate(timeout=90)
    assert wait.returncode == code, err
    assert blocks(out)[job][0] == "cancelled", out + err
    assert sky.leftovers() == []
    if sig == signal.SIGTERM:
        assert ["cancel", "-y", "ar-t-01", "1"] in [c["argv"] for c in sky.calls("cancel")]


# ---------------------------------------------------------------------------------------------
# Failures
# ---------------------------------------------------------------------------------------------
def test_crash_launch_and_setup_failures_are_failed_jobs_and_a_failed_setup_is_torn_down(sky):
    bad_launch = sky.submit("--name", "no-gpu", env={"SKY_FAKE_FAIL_LAUNCH": "1"})
    bad_setup = sky.submit("--name", "bad-setup", env={"SKY_FAKE_FAIL_SETUP": "1"})
    sky.commit("crash", MODE="crash")
    crash = sky.submit()
    proc = sky.run("wait-jobs.sh", bad_launch, bad_setup, crash)
    assert proc.returncode == 1
    got = blocks(proc.stdout)
    assert got[bad_launch][0] == "failed" and "ResourcesUnavailableError" in got[bad_launch][1]
    assert got[bad_setup][0] == "failed" and "FAILED_SETUP" in got[bad_setup][1]
    assert got[crash][0] == "failed" and "torch.OutOfMemoryError: CUDA out of memory." in got[crash][1]
    assert ["down", "-y", "--async", sky.meta(bad_setup)["cluster"]] in [c["argv"] for c in sky.calls("down")]
    assert sky.leftovers() == []


def test_backend_unavailable_is_exit_3_and_bad_settings_exit_2(sky):
    proc = sky.run("submit-async.sh", env={"SKY_FAKE_DOWN": "1"})
    assert proc.returncode == 3 and proc.stdout == ""
    assert "sky check" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    no_sky = os.pathsep.join(p for p in sky.env["PATH"].split(os.pathsep) if not (Path(p) / "sky").exists())
    proc = sky.run("submit-async.sh", env={"PATH": no_sky})
    assert proc.returncode == 3 and "pip install skypilot" in proc.stderr
    for env in ({"AR_SKY_GPU": "H200;rm -rf /"}, {"SKY_MAX_CLUSTERS": "0"}, {"AR_SKY_MANAGED": "yes"},
                {"AR_SKY_MANAGED": "1", "AR_SKY_SPOT": "maybe"}, {"AR_SKY_RECOVERY": "retry"}):
        proc = sky.run("submit-async.sh", env=env)
        assert proc.returncode == 2 and proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, env
    proc = sky.run("submit-async.sh", "--env", "AR_DEPTH=4")
    assert proc.returncode == 2 and "--env is gone" in proc.stderr


# ---------------------------------------------------------------------------------------------
# Managed jobs (AR_SKY_MANAGED=1): `sky jobs launch`, spot, recovery, the in-flight cap
# ---------------------------------------------------------------------------------------------
def test_managed_jobs_spot_recovery_and_the_in_flight_cap(sky):
    sky.env.update(AR_SKY_MANAGED="1", SKY_MAX_CLUSTERS="2")
    sky.commit("slower", SLEEP_S=1.0)
    a = sky.submit("--name", "a")
    b = sky.submit("--name", "b", env={"SKY_FAKE_PREEMPT_AFTER_S": "0.3"})
    c = sky.submit("--name", "c")  # a third one waits in its supervisor: the cap is 2 in flight
    proc = sky.run("wait-jobs.sh", a, b, c)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert blocks(proc.stdout) == {j: ("succeeded", BLOCK) for j in (a, b, c)}

    launches = [call["argv"] for call in sky.calls("jobs") if call["argv"][1] == "launch"]
    assert len(launches) == 3 and not sky.calls("launch") and not sky.calls("exec"), "no cluster pool"
    for argv in launches:
        job = argv[argv.index("-n") + 1]
        assert {"-d", "-y", "--use-spot"} <= set(argv) and "--job-recovery" not in argv
        assert argv[argv.index("--workdir") + 1] == str(sky.state / "sky" / "jobs" / job / "src")
    fake = managed_jobs(sky)
    assert fake[c]["submitted_at"] >= min(fake[a]["end_at"], fake[b]["end_at"]), "c launched only when a slot freed"
    # b was preempted once: SkyPilot recovered it on a new cluster, it trained again from the start
    assert fake[b]["recovery_count"] == 1 and sky.meta(b)["recovery_count"] == 1
    log = (sky.state / "sky" / "jobs" / b / "log").read_text()
    assert log.count("fake trainer v1") == 2 and "recovered it (recovery 1)" in log and "pid=" not in log
    assert sky.leftovers() == []


def test_managed_cancel_while_waiting_for_a_slot_and_while_running(sky):
    sky.env.update(AR_SKY_MANAGED="1", SKY_MAX_CLUSTERS="1", AR_SKY_SPOT="0", AR_SKY_RECOVERY="failover")
    sky.commit("slow", SLEEP_S=60)
    a = sky.submit("--name", "a")
    b = sky.submit("--name", "b")
    wait = subprocess.Popen([str(sky.repo / "sky" / "wait-jobs.sh"), a, b], cwd=sky.repo, env=sky.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t = time.time()
    while "fake trainer" not in "".join(p.read_text() for p in sky.fake.glob("managed/jobs/*.log")):
        assert time.time() - t < 60, "the first managed job never started training"
        time.sleep(0.2)
    wait.send_signal(signal.SIGINT)
    out, err = wait.communicate(timeout=90)
    assert wait.returncode == 130, err
    assert {k: v[0] for k, v in blocks(out).items()} == {a: "cancelled", b: "cancelled"}, out + err
    assert ["jobs", "cancel", "-y", "1"] in [call["argv"] for call in sky.calls("jobs")]
    assert list(managed_jobs(sky)) == [a], "b was never launched"
    (argv,) = [call["argv"] for call in sky.calls("jobs") if call["argv"][1] == "launch"]
    assert "--no-use-spot" in argv and argv[argv.index("--job-recovery") + 1] == "FAILOVER"
    assert sky.leftovers() == []
