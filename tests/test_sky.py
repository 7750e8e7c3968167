"""sky/ only: the task YAML under SkyPilot's own loader, the cluster pool (reuse, cap, queueing),
snapshots and the train.py hash check, cancel on timeout / SIGINT / SIGTERM, failures, promote.

Everything runs against the `sky` test double (tests/fakes/sky/sky), which runs the YAML's setup
and run locally, and a fake trainer (no torch) so each job takes a second; tests/contract/ runs the
same scripts with the real trainer. No SkyPilot cluster is ever contacted.
"""

import importlib.util
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

FAKE_SKY = REPO / "tests" / "fakes" / "sky"
_spec = importlib.util.spec_from_file_location("contract_util", REPO / "tests" / "contract" / "contract_util.py")
_util = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_util)
processes_under = _util.processes_under
FAKE_TRAINER = '''\
"""A stand-in for trainer/train.py: sleeps, then prints a summary and the result line."""
import json, os, time
MARKER = "v1"
SLEEP_S = 0.1
LABEL = "x"
GATE = ""

def main():
    print("fake trainer", MARKER, flush=True)
    gate, t = os.environ.get("AR_GATE", GATE), time.time()
    while gate and not os.path.exists(gate) and time.time() - t < 60:  # held until the test opens the gate
        time.sleep(0.1)
    time.sleep(float(os.environ.get("AR_SLEEP_S", SLEEP_S)))
    gpu = "NVIDIA " + os.environ["FAKE_TRAINER_GPU"] if os.environ.get("FAKE_TRAINER_GPU") else "cpu"
    val = {"x": 1.5}.get(os.environ.get("AR_LABEL", LABEL), 1.4)
    result = dict(status="ok", val_bpb=val, peak_vram_mb=100.0, total_seconds=1.0, profile="smoke", gpu=gpu,
                  marker=MARKER, cwd=os.getcwd(), env={k: v for k, v in os.environ.items() if k.startswith("AR_")})
    print("---")
    print(f"val_bpb:          {val:.6f}")
    os.makedirs(os.path.dirname(os.environ["AR_RESULT_PATH"]), exist_ok=True)
    with open(os.environ["AR_RESULT_PATH"], "w") as f:
        f.write(json.dumps(result, sort_keys=True))
    print("AR_RESULT_JSON: " + json.dumps(result, sort_keys=True), flush=True)

main()
'''
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@test.invalid"]
TERMINAL = ("SUCCEEDED", "FAILED", "FAILED_SETUP", "FAILED_DRIVER", "CANCELLED")
MANAGED_TERMINAL = ("SUCCEEDED", "CANCELLED", "FAILED", "FAILED_SETUP", "FAILED_PRECHECKS", "FAILED_NO_RESOURCE",
                    "FAILED_CONTROLLER")


def managed_jobs(sky):
    """The double's managed jobs by name."""
    return {m["job_name"]: m for m in (json.loads(p.read_text()) for p in sky.fake.glob("managed/jobs/*.json"))}


class Sky:
    def __init__(self, tmp, **env):
        self.tmp, self.repo, self.state, self.fake = tmp, tmp / "repo", tmp / "state", tmp / "sky-fake"
        for name in ("sky", "tools"):
            shutil.copytree(REPO / name, self.repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        (self.repo / "prepare").mkdir()
        shutil.copy(REPO / "prepare" / "prepare.py", self.repo / "prepare" / "prepare.py")
        (self.repo / "trainer").mkdir()
        (self.repo / "trainer" / "train.py").write_text(FAKE_TRAINER)
        (self.repo / ".gitignore").write_text(".ar/\nresults.tsv\n")
        subprocess.run(["git", "init", "-q"], cwd=self.repo, check=True)
        self.commit("fake trainer")
        (tmp / "skyhome").mkdir()
        path = os.pathsep.join([str(FAKE_SKY), str(Path(sys.executable).parent), os.environ["PATH"]])
        self.env = clean_env(PATH=path, AR_STATE_DIR=self.state, AR_TAG="t", AR_PROFILE="smoke",
                             SKY_FAKE_STATE=self.fake, SKY_FAKE_MOUNT_ROOT=tmp, SKY_FAKE_LAUNCH_DELAY_S="0.2",
                             AR_SKY_MOUNT=tmp / "mnt" / "ar-data", AR_SKY_PYTHON=sys.executable,
                             AR_SKY_CWD=tmp / "skyhome", AR_SKY_POLL_S="0.2", **env)

    def commit(self, message):
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

    def result(self, job_id):
        return json.loads((self.state / "sky" / "jobs" / job_id / "result.json").read_text())

    def calls(self, command=None):
        lines = (self.fake / "calls.jsonl").read_text().splitlines()
        calls = [json.loads(line) for line in lines]
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
def sky(tmp_path, request):
    s = Sky(tmp_path)
    yield s
    ids = [p.name for p in (s.state / "sky" / "jobs").glob("ar-*")] if (s.state / "sky" / "jobs").is_dir() else []
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
def test_sky_package_is_skypilot_not_the_folder():
    import sky

    assert "site-packages" in sky.__file__, sky.__file__
    assert not (REPO / "sky" / "__init__.py").exists(), "sky/ must stay a plain folder"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_experiment_yaml_loads_with_skypilot():
    import sky

    task = sky.Task.from_yaml(str(REPO / "sky" / "experiment.yaml"))
    assert {"EXPERIMENT_ID", "AR_PROFILE", "AR_SKY_TRAIN_SHA256", "AR_SKY_BUCKET"} <= set(task.envs)
    assert not [k for k in task.envs if k.startswith("AR_") and not k.startswith("AR_SKY_")
                and k not in ("AR_PROFILE", "AR_DATA")], "every other AR_ env would be an unknown knob"
    (res,) = task.resources
    assert res.accelerators == {"H100": 1}
    (dst, storage), = task.storage_mounts.items()
    assert dst == "/ar-data" and storage.name == "autoresearch-data" and storage.mode.value == "MOUNT_CACHED"
    assert "EXPERIMENT_STATUS:" in task.run and "EXPERIMENT_RESULT:" in task.run and "sha256sum" in task.run
    assert "TORCHINDUCTOR_CACHE_DIR" in task.run and "nothing to do" in task.setup
    # what submit-async.sh does with --env and --gpus: the mount follows AR_SKY_MOUNT / AR_SKY_BUCKET
    config = yaml.safe_load((REPO / "sky" / "experiment.yaml").read_text())
    task = sky.Task.from_yaml_config(config, env_overrides=[("AR_SKY_MOUNT", "/data"), ("AR_SKY_BUCKET", "mine")])
    task.set_resources_override({"accelerators": "H200:1"})
    assert list(task.storage_mounts) == ["/data"] and task.storage_mounts["/data"].name == "mine"
    assert [r.accelerators for r in task.resources] == [{"H200": 1}]
    prep = sky.Task.from_yaml(str(REPO / "sky" / "prep.yaml"))
    assert "prepare/prepare.py" in prep.run and list(prep.storage_mounts) == ["/ar-data"]
    assert not list(prep.resources)[0].accelerators


# ---------------------------------------------------------------------------------------------
# The pool
# ---------------------------------------------------------------------------------------------
def test_pool_launches_up_to_the_cap_queues_then_reuses(sky):
    sky.env["SKY_MAX_CLUSTERS"] = "2"
    gate = sky.tmp / "go"
    a = sky.submit("--env", f"AR_GATE={gate}")
    b = sky.submit("--env", f"AR_GATE={gate}", "--env", "AR_LABEL=b")
    train = sky.repo / "trainer" / "train.py"
    train.write_text(train.read_text().replace('MARKER = "v1"', 'MARKER = "v2"'))
    sky.commit("v2")
    c = sky.submit("--env", "AR_SLEEP_S=0.1")  # both clusters busy, cap reached: queued on ar-t-01
    assert [sky.meta(j)["cluster"] for j in (a, b, c)] == ["ar-t-01", "ar-t-02", "ar-t-01"]
    assert "busy" in sky.meta(c)["placement"]
    gate.touch()

    proc = sky.run("wait-jobs.sh", a, b, c)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {k: v[0] for k, v in blocks(proc.stdout).items()} == {a: "succeeded", b: "succeeded", c: "succeeded"}
    # each job ran its own commit's snapshot, even c, synced while a still ran on the same cluster
    assert sky.result(a)["marker"] == "v1" and sky.result(c)["marker"] == "v2"
    assert sky.result(c)["cwd"].endswith(f"/jobs/{c}")
    assert sky.result(a)["env"]["AR_SKY_TRAIN_SHA256"] != sky.result(c)["env"]["AR_SKY_TRAIN_SHA256"]
    assert sky.result(b)["env"]["AR_LABEL"] == "b" and "AR_LABEL" not in sky.result(a)["env"]

    d = sky.submit("--env", "AR_LABEL=d")  # an idle UP cluster: sky exec, no launch
    assert sky.meta(d)["cluster"] == "ar-t-01" and "idle" in sky.meta(d)["placement"]
    assert sky.run("wait-jobs.sh", d).returncode == 0

    launches, execs = sky.calls("launch"), sky.calls("exec")
    assert sorted(call["argv"][2] for call in launches) == ["ar-t-01", "ar-t-02"]
    for call in launches:  # the name goes through -c; autodown that waits on jobs only
        argv = call["argv"]
        assert argv[1] == "-c" and {"-d", "-y", "--down"} <= set(argv)
        assert argv[argv.index("-i") + 1] == "10" and argv[argv.index("--wait-for") + 1] == "jobs"
    assert [call["argv"][1] for call in execs] == ["ar-t-01", "ar-t-01"]
    assert all("-d" in call["argv"] and "-y" not in call["argv"] for call in execs)
    assert {call["cwd"] for call in sky.calls()} == {str(sky.tmp / "skyhome")}, "sky runs from one stable dir"
    status = json.loads(sky.sky("status", "-o", "json").stdout)
    assert {(s["name"], s["autostop"], s["to_down"], s["wait_for"]) for s in status} == {
        ("ar-t-01", 10, True, "jobs"), ("ar-t-02", 10, True, "jobs")}

    # logs: SkyPilot's line prefixes and colours are gone; the raw log had them
    raw = (sky.fake / "clusters" / "ar-t-01" / "jobs" / "1.log").read_text()
    assert "(task, pid=" in raw and "(setup pid=" in raw
    assert "\x1b[" in (sky.state / "sky" / "jobs" / a / "submit.log").read_text()
    out = sky.run("logs.sh", a).stdout
    assert "\nval_bpb:          1.500000\n" in out and "EXPERIMENT_STATUS: ok" in out and "fake trainer v1" in out
    assert "pid=" not in out and "\x1b" not in out
    assert "SkyPilot job ar-t-01:1" in out
    assert sky.leftovers() == []


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

    p = sky.sky("launch", "-c", "ar-x-01", yaml_path, *common)  # same cluster again: setup has nothing to do
    job = sky.wait_fake("ar-x-01:2")
    log = Path(job["log_path"]).read_text()
    assert job["status"] == "SUCCEEDED", log
    assert "setup: this cluster is already set up" in log and "setup: done" not in log
    result_line = next(ln for ln in log.splitlines() if "EXPERIMENT_RESULT: " in ln)
    summary = json.loads(result_line.split("EXPERIMENT_RESULT: ", 1)[1])
    assert summary["status"] == "ok" and summary["val_bpb"] == 1.5 and summary["id"] == "manual"
    assert "EXPERIMENT_STATUS: ok" in log
    assert (sky.tmp / "mnt" / "ar-data" / "results" / "manual" / "result.json").exists(), "result on the storage"


# ---------------------------------------------------------------------------------------------
# Cancelling
# ---------------------------------------------------------------------------------------------
def test_deadline_cancels_with_sky_cancel_and_nothing_is_left(sky):
    job = sky.submit("--env", "AR_SLEEP_S=60")
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
    job = sky.submit("--env", "AR_SLEEP_S=60", env={"SKY_FAKE_LAUNCH_DELAY_S": delay})
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
def test_launch_and_setup_failures_are_failed_jobs_and_a_failed_setup_is_torn_down(sky):
    bad_launch = sky.submit(env={"SKY_FAKE_FAIL_LAUNCH": "1"})
    bad_setup = sky.submit("--env", "AR_LABEL=s", env={"SKY_FAKE_FAIL_SETUP": "1"})
    proc = sky.run("wait-jobs.sh", bad_launch, bad_setup)
    assert proc.returncode == 1
    got = blocks(proc.stdout)
    assert got[bad_launch][0] == "failed" and "ResourcesUnavailableError" in got[bad_launch][1]
    assert got[bad_setup][0] == "failed" and "FAILED_SETUP" in got[bad_setup][1]
    assert ["down", "-y", "--async", "ar-t-02"] in [c["argv"] for c in sky.calls("down")]
    assert "ar-t-02" not in sky.sky("status").stdout
    assert sky.leftovers() == []


def test_backend_unavailable_is_exit_3(sky):
    proc = sky.run("submit-async.sh", env={"SKY_FAKE_DOWN": "1"})
    assert proc.returncode == 3 and proc.stdout == ""
    assert "sky check" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    no_sky = os.pathsep.join(p for p in sky.env["PATH"].split(os.pathsep) if not (Path(p) / "sky").exists())
    proc = sky.run("submit-async.sh", env={"PATH": no_sky})
    assert proc.returncode == 3 and "pip install skypilot" in proc.stderr
    assert sky.run("submit-async.sh", env={"AR_SKY_GPU": "H200;rm -rf /"}).returncode == 2
    assert sky.run("submit-async.sh", env={"SKY_MAX_CLUSTERS": "0"}).returncode == 2


def test_cluster_gone_fails_the_job_and_autodown_then_relaunch(sky):
    sky.env.update(AR_SKY_IDLE_MIN="1", SKY_FAKE_MINUTE_S="2.5")
    job = sky.submit("--env", "AR_SLEEP_S=60")
    sky.wait_log("ar-t-01", 1, "fake trainer")
    assert sky.sky("down", "-y", "ar-t-01").returncode == 0  # torn down behind our back (or preempted)
    proc = sky.run("wait-jobs.sh", job)
    assert blocks(proc.stdout)[job][0] == "failed" and "is gone" in proc.stdout, proc.stdout

    first = sky.submit("--env", "AR_LABEL=one")
    assert sky.run("wait-jobs.sh", first).returncode == 0
    time.sleep(3)  # one idle "minute": the cluster autodowns
    assert json.loads(sky.sky("status", "-o", "json").stdout) == []
    second = sky.submit("--env", "AR_LABEL=two")
    assert sky.run("wait-jobs.sh", second).returncode == 0
    assert sky.meta(first)["sky_job_id"] == sky.meta(second)["sky_job_id"] == "1"  # a new cluster, a new job 1
    assert sky.meta(second)["mode"] == "launch" and first != second
    assert sky.leftovers() == []


def test_hostile_values_travel_verbatim_and_the_gpu_has_its_own_pool(sky):
    marker = sky.tmp / "pwned"
    value = f"a b;$(touch {marker}) `touch {marker}` '\"$HOME"
    job = sky.submit("--env", f"AR_LABEL={value}", env={"AR_SKY_GPU": "H200"})
    assert sky.run("wait-jobs.sh", job).returncode == 0
    assert sky.result(job)["env"]["AR_LABEL"] == value and not marker.exists()
    assert sky.meta(job)["cluster"] == "ar-t-h200-01"
    (launch,) = sky.calls("launch")
    assert launch["argv"][launch["argv"].index("--gpus") + 1] == "H200:1"
    assert sky.submit("--env", f"AR_LABEL={value}", env={"AR_SKY_GPU": "H200"}) == job  # idempotent


# ---------------------------------------------------------------------------------------------
# promote
# ---------------------------------------------------------------------------------------------
def test_promote_reruns_the_best_rows_on_another_gpu_as_their_own_rows(sky):
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=sky.repo, capture_output=True, text=True).stdout[:7]
    spec = importlib_results(sky)
    rows = [dict(commit=sha, val_bpb=v, memory_gb="0.1", status=st, description=f"label {lab}", round="1",
                 candidate=f"c{i}", backend="sky", gpu="H100", profile="smoke", job_id=f"j{i}", wall_s="1",
                 cost_usd="0.01", overrides=json.dumps({"LABEL": lab}) if lab else "", tag=tag, timestamp="t")
            for i, (v, st, lab, tag) in enumerate([("1.300000", "discard", "c", "t"), ("1.200000", "keep", "b", "t"),
                                                   ("1.500000", "discard", "", "t"), ("0.000000", "crash", "e", "t"),
                                                   ("0.900000", "keep", "z", "other")], 1)]
    spec.append_rows(sky.repo / "results.tsv", rows)
    env = {**sky.env, "FAKE_TRAINER_GPU": "H200"}
    cmd = [sys.executable, "sky/promote.py", "--top", "2", "--gpu", "H200", "--tag", "t"]
    proc = subprocess.run(cmd, cwd=sky.repo, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    new = [r for r in spec.read_rows(sky.repo / "results.tsv") if r["round"] == "promote"]
    assert [(r["candidate"], json.loads(r["overrides"])["LABEL"], r["gpu"], r["backend"], r["status"]) for r in new] \
        == [("p1", "b", "H200", "sky", "discard"), ("p2", "c", "H200", "sky", "discard")]
    assert all(r["job_id"].endswith("-h200") and r["commit"] == sha and float(r["cost_usd"]) > 0 for r in new)
    assert "promote round 1 c2 (1.200000 on H100) to H200" in new[0]["description"]
    assert {sky.meta(r["job_id"])["cluster"] for r in new} <= {"ar-t-h200-01", "ar-t-h200-02"}
    again = subprocess.run(cmd, cwd=sky.repo, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and len(spec.read_rows(sky.repo / "results.tsv")) == len(rows) + 2
    assert len(sky.calls("launch")) == 2, "the same promote again returns the same jobs"


def importlib_results(sky):
    spec = importlib.util.spec_from_file_location("ar_results_test", sky.repo / "tools" / "results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_make_promote_passes_values_as_data():
    proc = subprocess.run(["make", "-n", "promote", "TOP=2", "GPU=H200$(touch /tmp/x)"], cwd=REPO,
                          capture_output=True, text=True, env=clean_env())
    assert 'sky/promote.py --top="$AR_SKY_PROMOTE_TOP" --gpu="$AR_SKY_PROMOTE_GPU"' in proc.stdout, proc.stderr


# ---------------------------------------------------------------------------------------------
# Managed jobs (AR_SKY_MANAGED=1): `sky jobs launch`, spot, recovery, the in-flight cap
# ---------------------------------------------------------------------------------------------
def test_managed_jobs_spot_recovery_and_the_in_flight_cap(sky):
    sky.env.update(AR_SKY_MANAGED="1", SKY_MAX_CLUSTERS="2")
    a = sky.submit("--env", "AR_SLEEP_S=1.5")
    b = sky.submit("--env", "AR_LABEL=b", "--env", "AR_SLEEP_S=1.5", env={"SKY_FAKE_PREEMPT_AFTER_S": "0.5"})
    c = sky.submit("--env", "AR_LABEL=c")  # a third one waits in its supervisor: the cap is 2 in flight
    proc = sky.run("wait-jobs.sh", a, b, c)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {k: v[0] for k, v in blocks(proc.stdout).items()} == {a: "succeeded", b: "succeeded", c: "succeeded"}

    launches = [call["argv"] for call in sky.calls("jobs") if call["argv"][1] == "launch"]
    assert len(launches) == 3 and not sky.calls("launch") and not sky.calls("exec"), "no cluster pool"
    assert sorted(argv[argv.index("-n") + 1] for argv in launches) == sorted([a, b, c])
    for argv in launches:
        job = argv[argv.index("-n") + 1]
        assert {"-d", "-y", "--use-spot"} <= set(argv)
        assert argv[argv.index("--workdir") + 1] == str(sky.state / "sky" / "jobs" / job / "src")
        assert "--job-recovery" not in argv  # SkyPilot's default strategy
    fake = managed_jobs(sky)
    assert fake[c]["submitted_at"] >= min(fake[a]["end_at"], fake[b]["end_at"]), "c launched only when a slot freed"
    assert fake[a]["resources"].endswith("[Spot]")

    # b was preempted once: SkyPilot recovered it on a new cluster, it trained again from the start
    assert fake[b]["recovery_count"] == 1 and sky.meta(b)["recovery_count"] == 1
    log = (sky.state / "sky" / "jobs" / b / "log").read_text()
    assert log.count("fake trainer v1") == 2 and "recovered it (recovery 1)" in log and "pid=" not in log
    assert sky.result(b)["env"]["AR_LABEL"] == "b" and sky.result(c)["env"]["AR_LABEL"] == "c"
    assert sky.meta(a)["mode"] == "managed" and sky.meta(a)["sky_job_id"] == str(fake[a]["job_id"])
    assert "waiting: 2 managed job(s)" in (sky.state / "sky" / "jobs" / c / "log").read_text()
    assert "SkyPilot managed job 3 submitted" in sky.run("logs.sh", c).stdout, "c was launched last"
    # the jobs controller is the one cluster left: the extra VM managed jobs cost
    assert [s["name"] for s in json.loads(sky.sky("status", "-o", "json").stdout)] == ["sky-jobs-controller-abcd1234"]
    assert sky.submit("--env", "AR_LABEL=c") == c  # idempotent
    assert sky.leftovers() == []


def test_managed_on_demand_recovery_strategy_and_bad_settings(sky):
    sky.env.update(AR_SKY_MANAGED="1", AR_SKY_SPOT="0", AR_SKY_RECOVERY="failover")
    job = sky.submit()
    assert sky.run("wait-jobs.sh", job).returncode == 0
    (argv,) = [call["argv"] for call in sky.calls("jobs") if call["argv"][1] == "launch"]
    assert "--no-use-spot" in argv and argv[argv.index("--job-recovery") + 1] == "FAILOVER"
    for env in ({"AR_SKY_MANAGED": "yes"}, {"AR_SKY_SPOT": "maybe"}, {"AR_SKY_RECOVERY": "retry;rm -rf /"},
                {"AR_SKY_MANAGED": "0", "AR_SKY_SPOT": "1"}):
        proc = sky.run("submit-async.sh", "--env", "AR_LABEL=x", env=env)
        assert proc.returncode == 2 and proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, env


def test_managed_cancel_while_waiting_for_a_slot_and_while_running(sky):
    sky.env.update(AR_SKY_MANAGED="1", SKY_MAX_CLUSTERS="1")
    a = sky.submit("--env", "AR_SLEEP_S=60")
    b = sky.submit("--env", "AR_LABEL=b")
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
    assert sky.leftovers() == []


def test_managed_late_listing_bad_json_and_no_resources(sky):
    sky.env.update(AR_SKY_MANAGED="1")
    late = sky.submit(env={"SKY_FAKE_LISTING_LAG_S": "2"})  # not in `sky jobs queue` for 2 s: still queued
    proc = sky.run("wait-jobs.sh", late)
    assert proc.returncode == 0 and blocks(proc.stdout)[late][0] == "succeeded", proc.stdout + proc.stderr

    stuck = sky.submit("--env", "AR_SLEEP_S=60")
    proc = sky.run("wait-jobs.sh", stuck, env={"SKY_FAKE_QUEUE_GARBAGE": "1", "AR_TIMEOUT_S": "3"})
    assert blocks(proc.stdout)[stuck][0] == "timeout", "no JSON is no answer, not a failure; the deadline cancels"
    assert ["jobs", "cancel", "-y", "2"] in [call["argv"] for call in sky.calls("jobs")]

    none = sky.submit("--env", "AR_LABEL=n", env={"SKY_FAKE_FAIL_LAUNCH": "1"})
    proc = sky.run("wait-jobs.sh", none)
    state, text = blocks(proc.stdout)[none]
    assert proc.returncode == 1 and state == "failed"
    assert "FAILED_NO_RESOURCE" in text and "ResourcesUnavailable" in text
    assert sky.leftovers() == []
