"""batch-job/ (VESSL): submit -> wait -> summary block, a crash, the deadline and SIGTERM, idempotency,
how the commit travels and is verified, the job's own hard limit, logged out, prep.

Everything runs against the vesslctl test double (tests/fakes/vesslctl/vesslctl), which follows the
documented surface and really runs each job's command here, the object volume being a local folder.
The job runs a fake trainer (a few lines of Python, no torch) committed as trainer/train.py: each
behaviour (crash, sleep, a long log) is a commit, as every candidate is. To be rewritten with the
recipe (issue 12).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, clean_env

FAKES = REPO / "tests" / "fakes" / "vesslctl"
FAKE_TRAINER = '''\
"""A stand-in for trainer/train.py: MODE, SLEEP_S and LINES are edited and committed."""
import os, sys, time
MODE = "ok"
SLEEP_S = 0.0
LINES = 0
print(f"fake trainer cwd={os.getcwd()} python={sys.executable} profile={os.environ.get('AR_PROFILE', '-')}")
for i in range(LINES):
    print(f"step {i:05d} | loss: 3.250000")
sys.stdout.flush()
time.sleep(SLEEP_S)
if MODE == "crash":
    print("Traceback (most recent call last):", file=sys.stderr)
    print("torch.OutOfMemoryError: CUDA out of memory.", file=sys.stderr)
    sys.exit(1)
print("---")
print("val_bpb:          1.250000")
print("training_seconds: 0.1")
print("depth:            8", flush=True)
'''
BLOCK = ["---", "val_bpb:          1.250000", "training_seconds: 0.1", "depth:            8"]
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@test.invalid"]


class Vessl:
    def __init__(self, tmp):
        self.tmp, self.repo, self.root, self.state = tmp, tmp / "repo", tmp / "vessl", tmp / "state"
        (self.repo / "trainer").mkdir(parents=True)
        shutil.copytree(REPO / "batch-job", self.repo / "batch-job", ignore=shutil.ignore_patterns("__pycache__"))
        (self.repo / "trainer" / "train.py").write_text(FAKE_TRAINER)
        subprocess.run(["git", "init", "-q"], cwd=self.repo, check=True)
        self.sha = self.commit("fake trainer")
        self.volume = self.root / "volumes" / "vol1"
        self.volume.mkdir(parents=True)
        bindir = tmp / "bin"  # python3 = this interpreter: no pyenv-style shim to start on every call
        bindir.mkdir()
        (bindir / "python3").symlink_to(sys.executable)
        self.env = clean_env(PATH=os.pathsep.join([str(FAKES), str(bindir), os.environ["PATH"]]),
                             FAKE_VESSL_ROOT=self.root, FAKE_VESSL_QUEUE_S="0.1", FAKE_VESSL_KILL_GRACE_S="3",
                             AUTORESEARCH_CACHE_VOLUME="vol1", AUTORESEARCH_RESOURCE_SPEC="gpu-fake",
                             AUTORESEARCH_PYTHON=sys.executable, AR_STATE_DIR=self.state, AR_TAG="t",
                             AR_PROFILE="smoke", AR_VESSL_POLL_S="0.2", AR_VESSL_LIST_DELAY_S="0.1")
        for var in ("VESSLCTL_ORG", "VESSLCTL_TEAM"):
            self.env.pop(var, None)

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

    def run(self, script, *args, env=None, timeout=60):
        return subprocess.run([str(self.repo / "batch-job" / script), *args], cwd=self.repo, capture_output=True,
                              text=True, env={**self.env, **(env or {})}, timeout=timeout)

    def submit(self, *args, env=None):
        proc = self.run("submit-async.sh", *args, env=env)
        assert proc.returncode == 0, proc.stderr
        assert len(proc.stdout.splitlines()) == 1, proc.stdout
        return proc.stdout.strip()

    def wait(self, *ids, env=None, timeout=60):
        return self.run("wait-jobs.sh", *ids, env=env, timeout=timeout)

    def calls(self, *prefix):
        calls = [json.loads(line) for line in (self.root / "calls.jsonl").read_text().splitlines()]
        return [c for c in calls if c["argv"][:len(prefix)] == list(prefix)]

    def fake_job(self, slug):
        return json.loads((self.root / "jobs" / slug / "job.json").read_text())

    def record(self, slug):
        return self.state / "vessl" / "jobs" / slug


@pytest.fixture
def v(tmp_path):
    return Vessl(tmp_path)


def blocks(stdout):
    out, current = {}, None
    for line in stdout.splitlines():
        if line.startswith("=== ") and line.endswith(") ==="):
            job_id, state = line[4:-5].split(" (")
            current = out[job_id] = [state, []]
        elif current is not None:
            current[1].append(line)
    return out


def one_error_line(proc):
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


# ---- submit -> wait -> summary block ---------------------------------------------------------------
def test_submit_wait_prints_the_summary_block_and_resubmit_returns_the_job(v):
    refs_before = subprocess.run(["git", "for-each-ref"], cwd=v.repo, capture_output=True, text=True).stdout
    job = v.submit()
    assert v.submit() == job  # the name is the idempotency key
    proc = v.wait(job)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert blocks(proc.stdout) == {job: ["succeeded", BLOCK]}
    log = v.run("logs.sh", job).stdout
    assert f"commit {v.sha}" in log and f"python={sys.executable}" in log and "profile=smoke" in log
    # the commit travels as a bundle on the volume: nothing pushed, no ref of ours changed
    assert (v.volume / "autoresearch" / "code" / f"{v.sha}.bundle").is_file()
    assert subprocess.run(["git", "for-each-ref"], cwd=v.repo, capture_output=True, text=True).stdout == refs_before
    create = v.calls("job", "create")[0]["argv"]  # the job's command carries no user value
    assert create[create.index("--cmd") + 1].startswith("bash /mnt/ar-cache/autoresearch/bin/job-")
    assert "AR_PROFILE=smoke" in create and not any(a.startswith("AR_RESULT") for a in create)
    # succeeded: still the same job; records lost: found by name (and tags) in `vesslctl job list`
    assert v.submit() == job
    shutil.rmtree(v.state)
    assert v.submit() == job
    assert len(v.calls("job", "create")) == 1
    proc = v.run("submit-async.sh", "--env", "AR_DEPTH=4")
    assert proc.returncode == 2 and "--env is gone" in one_error_line(proc)


def test_a_long_log_keeps_its_summary_block_through_the_volume_copy(v):
    v.commit("long log", LINES=1500)
    job = v.submit(env={"FAKE_VESSL_LOG_CAP": "1000"})
    proc = v.wait(job, env={"FAKE_VESSL_LOG_CAP": "1000"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert blocks(proc.stdout)[job] == ["succeeded", BLOCK]  # the CLI log (capped) lost it; the volume has it


def test_a_crash_is_failed_with_its_log_tail_and_a_retry_gets_a_new_slug(v):
    v.commit("crash", MODE="crash")
    bad = v.submit()
    proc = v.wait(bad)
    assert proc.returncode == 1
    state, body = blocks(proc.stdout)[bad]
    assert state == "failed" and "torch.OutOfMemoryError: CUDA out of memory." in body
    retry = v.submit()  # failed: the same name starts a new job (VESSL names are not unique)
    assert retry != bad and v.fake_job(retry)["name"] == v.fake_job(bad)["name"]
    v.run("cancel-jobs.sh", retry)


def test_the_job_refuses_a_checkout_that_is_not_the_submitted_commit(v):
    # Another commit's bundle where this commit's should be (and marked as uploaded): the job must
    # fail loudly, not run it.
    base_sha = v.sha
    other = v.commit("v2", SLEEP_S=0.01)
    subprocess.run(["git", "bundle", "create", "-q", str(v.tmp / "other.bundle"), "HEAD"], cwd=v.repo, check=True)
    bundle = v.volume / "autoresearch" / "code" / f"{base_sha}.bundle"
    bundle.parent.mkdir(parents=True)
    marker = v.state / "vessl" / "uploads" / "vol1" / f"autoresearch_code_{base_sha}.bundle"
    marker.parent.mkdir(parents=True)
    marker.write_text("uploaded\n")
    subprocess.run(["git", "init", "-q", "--bare", str(v.tmp / "b.git")], check=True)
    subprocess.run(["git", "-C", str(v.tmp / "b.git"), "fetch", "-q", str(v.tmp / "other.bundle"),
                    "HEAD:refs/heads/autoresearch-job"], check=True)
    subprocess.run(["git", "-C", str(v.tmp / "b.git"), "bundle", "create", "-q", str(bundle),
                    "refs/heads/autoresearch-job"], check=True)
    job = v.submit("--commit", base_sha)
    proc = v.wait(job)
    assert proc.returncode == 1
    state, body = blocks(proc.stdout)[job]
    assert state == "failed"
    assert f"FAIL: checked out {other}, but the job was submitted for {base_sha}" in "\n".join(body)


# ---- deadline, signals, never following logs ---------------------------------------------------------
def test_stuck_job_is_terminated_at_the_deadline(v):
    job = v.submit(env={"FAKE_VESSL_STUCK": "*"})
    proc = v.wait(job, env={"AR_TIMEOUT_S": "2"})
    assert proc.returncode == 1
    assert blocks(proc.stdout)[job][0] == "timeout"
    fake = v.fake_job(job)
    assert fake["terminateCalls"] == 1 and fake["workloadState"] == "terminated"
    assert v.run("cancel-jobs.sh", job).returncode == 0  # idempotent
    assert v.fake_job(job)["terminateCalls"] == 1


def test_sigterm_terminates_and_wait_never_follows_logs(v):
    job = v.submit(env={"FAKE_VESSL_STUCK": "*"})
    wait = subprocess.Popen([str(v.repo / "batch-job" / "wait-jobs.sh"), job], cwd=v.repo, env=v.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    wait.send_signal(signal.SIGTERM)
    out, err = wait.communicate(timeout=60)
    assert wait.returncode == 143, err
    assert blocks(out)[job][0] == "cancelled"
    assert v.fake_job(job)["workloadState"] == "terminated"
    assert not any("-f" in c["argv"] or "--follow" in c["argv"] for c in v.calls("job", "logs"))


def test_a_create_that_errors_after_creating_is_terminated(v):
    v.commit("slow", SLEEP_S=30)
    proc = v.run("submit-async.sh", env={"FAKE_VESSL_CREATE_ERROR": "1"})
    assert proc.returncode == 3 and proc.stdout == ""
    [job] = [p.name for p in (v.root / "jobs").iterdir()]
    fake = v.fake_job(job)
    assert fake["terminateCalls"] >= 1 and fake["workloadState"] == "terminated"


def test_the_job_has_its_own_hard_limit(v, tmp_path):
    """_job.sh re-runs itself under `timeout AR_VESSL_MAX_S`: a lost waiter cannot leave it running."""
    sha = v.commit("hang", SLEEP_S=60)
    base = tmp_path / "mnt" / "autoresearch"
    (base / "bin").mkdir(parents=True)
    (base / "code").mkdir()
    shutil.copy(REPO / "batch-job" / "_job.sh", base / "bin" / "job-x.sh")
    subprocess.run(["git", "bundle", "create", "-q", str(tmp_path / "b.bundle"), "HEAD"], cwd=v.repo, check=True)
    subprocess.run(["git", "init", "-q", "--bare", str(tmp_path / "b.git")], check=True)
    subprocess.run(["git", "-C", str(tmp_path / "b.git"), "fetch", "-q", str(tmp_path / "b.bundle"),
                    "HEAD:refs/heads/autoresearch-job"], check=True)
    subprocess.run(["git", "-C", str(tmp_path / "b.git"), "bundle", "create", "-q",
                    str(base / "code" / f"{sha}.bundle"), "refs/heads/autoresearch-job"], check=True)
    env = dict(PATH=os.environ["PATH"], HOME=str(tmp_path), TMPDIR=str(tmp_path), AR_VESSL_COMMIT=sha,
               AR_VESSL_RUN="ar-x/r1", AR_VESSL_MAX_S="2", AR_VESSL_PYTHON=sys.executable)
    t0 = time.time()
    proc = subprocess.run(["bash", str(base / "bin" / "job-x.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode in (124, 137, 143), proc.stdout + proc.stderr
    assert time.time() - t0 < 30
    assert (base / "runs" / "ar-x" / "r1" / "log").read_text().startswith("[ar-vessl]")


# ---- setup problems -----------------------------------------------------------------------------------
def test_logged_out_or_unconfigured_is_exit_3_naming_the_fix(v):
    job = v.submit()
    out = {"FAKE_VESSL_LOGGED_OUT": "1"}
    for script, args in (("submit-async.sh", ["--name", "other"]), ("wait-jobs.sh", [job]),
                         ("cancel-jobs.sh", [job])):
        proc = v.run(script, *args, env=out)
        assert proc.returncode == 3, (script, proc.stderr)
        assert "vesslctl auth login" in one_error_line(proc)
    env = {k: val for k, val in v.env.items() if k != "AUTORESEARCH_RESOURCE_SPEC"}
    proc = subprocess.run([str(v.repo / "batch-job" / "submit-async.sh")], cwd=v.repo, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and "AUTORESEARCH_RESOURCE_SPEC" in one_error_line(proc)
    assert v.wait(job).returncode == 0


@pytest.mark.parametrize("output, rc, logged_in", [
    ("Logged in as ada@example.com (organization: acme)", 0, True),
    ("Logged in as ada. Run `vesslctl auth login` to switch accounts.", 0, True),
    ("Not logged in. Run `vesslctl auth login`.", 0, False),
    ("Error: token has expired", 0, False),
    ("", 0, False),
    ("Logged in as ada", 1, False),
])
def test_auth_status_is_judged_by_its_words(tmp_path, output, rc, logged_in):
    script = (f'source "{REPO}/batch-job/_lib.sh"; source "{REPO}/batch-job/_vessl.sh"; AR_PROG=t\n'
              'vesslctl() { printf "%s\\n" "$FAKE_OUT"; return "$FAKE_RC"; }\n'
              'vs_auth_check && echo OK\n')
    proc = subprocess.run(["bash", "-c", script], env=clean_env(FAKE_OUT=output, FAKE_RC=rc), capture_output=True,
                          text=True, timeout=30)
    assert (proc.returncode == 0 and proc.stdout == "OK\n") is logged_in, proc.stderr
    if not logged_in:
        assert proc.returncode == 3 and "run 'vesslctl auth login'" in proc.stderr


def test_prep_fills_the_volume_cache(v):
    (v.repo / "prepare").mkdir()
    (v.repo / "prepare" / "prepare.py").write_text(
        "import os, pathlib\n"
        "root = pathlib.Path(os.environ['AR_CACHE_DIR'])\n"
        "(root / os.environ['AR_PROFILE']).mkdir(parents=True, exist_ok=True)\n"
        "(root / os.environ['AR_PROFILE'] / 'meta.json').write_text('{}')\n"
        "print(f\"prepared: profile={os.environ['AR_PROFILE']} data={os.environ.get('AR_DATA', '-')} dir={root}\")\n")
    v.commit("fake prepare")
    proc = v.run("prep.sh", "--profile", "smoke", "--data", "offline",
                 env={"AUTORESEARCH_PREP_RESOURCE_SPEC": "cpu-fake"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("prepared: profile=smoke data=offline")
    assert (v.volume / "autoresearch" / "cache" / "smoke" / "meta.json").is_file()
    create = v.calls("job", "create")[0]["argv"]
    assert create[create.index("-r") + 1] == "cpu-fake" and "AR_VESSL_MODE=prepare" in create
    assert v.run("prep.sh", "--profile", "Bad Profile").returncode == 2


def test_lib_is_the_same_file_in_every_cloud_recipe():
    copies = [p for p in (REPO / d / "_lib.sh" for d in ("batch-job", "sky", "modal")) if p.exists()]
    assert copies and len({p.read_bytes() for p in copies}) == 1, copies


def test_no_result_file_or_knob_override_is_left():
    for d in ("batch-job", "sky", "modal"):
        for path in (REPO / d).iterdir():
            if path.is_file() and path.suffix in (".sh", ".py", ".yaml"):
                text = path.read_text()
                for word in ("AR_RESULT", "result.json", "HARNESS_ENV", "ADOPTED"):
                    assert word not in text, f"{path.relative_to(REPO)} mentions {word}"
