"""batch-job/ (VESSL) only: how the commit travels, the job-side entry, idempotency, failure modes.

Everything runs against the vesslctl test double (tests/fakes/vesslctl/vesslctl), which follows the
documented surface and really runs each job's command here, the object volume being a local folder.
A fake trainer (a few lines of Python, no torch) keeps these fast; tests/contract/ runs the same
scripts against the real trainer.
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

FAKES = REPO / "tests" / "fakes" / "vesslctl"
FAKE_TRAINER = '''\
"""A stand-in for trainer/train.py: optional noise, a summary and the result line."""
import json, os, sys, time
MARKER = "v1"
SLEEP_S = 0.0
LINES = 0
LABEL = "x"
SEED = 42

def main():
    for i in range(int(os.environ.get("AR_LINES", LINES))):
        print(f"step {i:05d} | noise")
    time.sleep(float(os.environ.get("AR_SLEEP_S", SLEEP_S)))
    result = dict(status="ok", val_bpb=1.25, marker=MARKER, cwd=os.getcwd(), python=sys.executable,
                  env={k: v for k, v in os.environ.items() if k.startswith("AR_")})
    print("---")
    print("val_bpb:          1.250000")
    print("training_seconds: 0.1")
    with open(os.environ["AR_RESULT_PATH"], "w") as f:
        json.dump(result, f, sort_keys=True)
    print("AR_RESULT_JSON: " + json.dumps(result, sort_keys=True), flush=True)

main()
'''
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@test.invalid"]


class Vessl:
    def __init__(self, tmp, pyproject=None):
        self.tmp, self.repo, self.root, self.state = tmp, tmp / "repo", tmp / "vessl", tmp / "state"
        (self.repo / "trainer").mkdir(parents=True)
        (self.repo / "prepare").mkdir()
        shutil.copytree(REPO / "batch-job", self.repo / "batch-job", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(REPO / "prepare" / "prepare.py", self.repo / "prepare" / "prepare.py")
        (self.repo / "trainer" / "train.py").write_text(FAKE_TRAINER)
        if pyproject is not None:
            (self.repo / "pyproject.toml").write_text(pyproject)
        subprocess.run(["git", "init", "-q"], cwd=self.repo, check=True)
        self.sha = self.commit("fake trainer")
        self.volume = self.root / "volumes" / "vol1"
        self.volume.mkdir(parents=True)
        bindir = tmp / "bin"  # python3 = this interpreter: no pyenv-style shim to start on every call
        bindir.mkdir()
        (bindir / "python3").symlink_to(sys.executable)
        self.env = clean_env(PATH=os.pathsep.join([str(FAKES), str(bindir), os.environ["PATH"]]),
                             FAKE_VESSL_ROOT=self.root,
                             FAKE_VESSL_QUEUE_S="0.1", FAKE_VESSL_KILL_GRACE_S="3",
                             AUTORESEARCH_CACHE_VOLUME="vol1", AUTORESEARCH_RESOURCE_SPEC="gpu-fake",
                             AUTORESEARCH_PYTHON=sys.executable, AR_STATE_DIR=self.state, AR_TAG="t",
                             AR_VESSL_POLL_S="0.2", AR_VESSL_LIST_DELAY_S="0.1")
        for var in ("VESSLCTL_ORG", "VESSLCTL_TEAM"):
            self.env.pop(var, None)

    def commit(self, message):
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
        lines = (self.root / "calls.jsonl").read_text().splitlines()
        calls = [json.loads(line) for line in lines]
        return [c for c in calls if c["argv"][:len(prefix)] == list(prefix)]

    def fake_job(self, slug):
        return json.loads((self.root / "jobs" / slug / "job.json").read_text())

    def record(self, slug):
        return self.state / "vessl" / "jobs" / slug

    def result(self, slug):
        return json.loads((self.record(slug) / "result.json").read_text())


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


# ---- how the commit travels ----------------------------------------------------------------------
def test_commit_travels_as_a_bundle_without_any_push_or_new_ref(v):
    refs_before = subprocess.run(["git", "for-each-ref"], cwd=v.repo, capture_output=True, text=True).stdout
    job = v.submit()
    proc = v.wait(job)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert blocks(proc.stdout)[job][0] == "succeeded"
    assert (v.volume / "autoresearch" / "code" / f"{v.sha}.bundle").is_file()
    assert subprocess.run(["git", "for-each-ref"], cwd=v.repo, capture_output=True, text=True).stdout == refs_before
    log = (v.record(job) / "log").read_text()
    assert f"commit {v.sha}" in log
    result = v.result(job)
    assert result["marker"] == "v1" and result["env"]["AR_VESSL_COMMIT"] == v.sha
    assert result["python"] == sys.executable  # AUTORESEARCH_PYTHON: the image's own interpreter
    # the job's command carries no user value; the slug is not the name
    create = v.calls("job", "create")[0]["argv"]
    cmd = create[create.index("--cmd") + 1]
    assert cmd.startswith("bash /mnt/ar-cache/autoresearch/bin/job-") and cmd.endswith(".sh") and " " in cmd
    assert job != create[create.index("-n") + 1]


def test_the_job_refuses_a_checkout_that_is_not_the_submitted_commit(v):
    # Another commit's bundle where this commit's should be (and marked as uploaded): the job must
    # fail loudly, not run it.
    base_sha = v.sha
    (v.repo / "trainer" / "train.py").write_text(FAKE_TRAINER.replace('"v1"', '"v2"'))
    other = v.commit("v2")
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
    text = "\n".join(body)
    assert f"checked out {other}, but the job was submitted for {base_sha}" in text
    assert '"status": "fail"' in text or '"status":"fail"' in text
    assert v.result(job)["stage"] == "code"


def test_push_mode_pushes_a_ref_not_a_branch(v):
    bare = v.tmp / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    job = v.submit(env={"AUTORESEARCH_GIT_REMOTE": str(bare)})
    proc = v.wait(job)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    refs = subprocess.run(["git", "-C", str(bare), "for-each-ref", "--format=%(refname) %(objectname)"],
                          capture_output=True, text=True, check=True).stdout.split("\n")
    assert f"refs/autoresearch/commits/{v.sha} {v.sha}" in refs
    assert not any(r.startswith("refs/heads/") for r in refs)
    assert not (v.volume / "autoresearch" / "code").exists()  # no bundle in push mode
    assert v.result(job)["env"]["AR_VESSL_GIT_URL"] == str(bare)


# ---- the job side: python, overhead, hard limit ----------------------------------------------------
def venv_key(pyproject_text):
    ver = subprocess.run(["python3", "-c", 'import sys; print("%d.%d" % sys.version_info[:2])'], capture_output=True,
                         text=True, check=True).stdout.strip()
    return hashlib.sha256(pyproject_text.encode() + f"\npython {ver}\n".encode()).hexdigest()[:16]


def test_venv_is_built_once_on_the_volume_then_reused(tmp_path):
    pyproject = '[project]\nname = "t"\nversion = "0"\ndependencies = []\n'
    v = Vessl(tmp_path, pyproject=pyproject)
    v.env.pop("AUTORESEARCH_PYTHON")
    key = venv_key(pyproject)
    venv = v.volume / "autoresearch" / "venv" / key
    first = v.submit()
    proc = v.wait(first)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"building venv {key}" in (v.record(first) / "log").read_text()
    assert (venv.parent / f"{key}.ready").is_file()
    second = v.submit("--env", "AR_SEED=1")
    assert v.wait(second).returncode == 0
    log = (v.record(second) / "log").read_text()
    assert f"venv {key} reused" in log and "building" not in log and "installing" not in log
    assert all(v.result(j)["python"] == str(venv / "bin" / "python") for j in (first, second))


def test_a_venv_seeded_on_the_volume_is_used_as_it_is(tmp_path):
    """The fake's "image" is this machine: a venv key dir that links to the project's .venv is reused."""
    pyproject = '[project]\nname = "t"\nversion = "0"\ndependencies = ["torch"]\n'
    v = Vessl(tmp_path, pyproject=pyproject)
    v.env.pop("AUTORESEARCH_PYTHON")
    key = venv_key(pyproject)
    venvs = v.volume / "autoresearch" / "venv"
    venvs.mkdir(parents=True)
    (venvs / key).symlink_to(Path(sys.prefix))
    (venvs / f"{key}.ready").write_text("seeded by the test\n")
    (v.repo / "trainer" / "train.py").write_text("import torch  # needs the venv's packages\n" + FAKE_TRAINER)
    v.commit("trainer imports torch")
    job = v.submit()
    proc = v.wait(job)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (v.record(job) / "log").read_text()
    assert f"venv {key} reused" in log
    ready = [line for line in log.splitlines() if "] " in line and " ready in " in line]
    assert ready, log
    overhead = float(ready[0].split(" ready in ")[1].split(" s ")[0])
    assert overhead < 20  # the job's own setup (here: local disk, no network)


def test_the_job_has_its_own_hard_limit(tmp_path):
    """_job.sh re-runs itself under `timeout AR_VESSL_MAX_S`: a lost waiter cannot leave it running."""
    v = Vessl(tmp_path)
    base = tmp_path / "mnt" / "autoresearch"
    (base / "bin").mkdir(parents=True)
    (base / "code").mkdir()
    shutil.copy(REPO / "batch-job" / "_job.sh", base / "bin" / "job-x.sh")
    subprocess.run(["git", "bundle", "create", "-q", str(tmp_path / "b.bundle"), "HEAD"], cwd=v.repo, check=True)
    subprocess.run(["git", "init", "-q", "--bare", str(tmp_path / "b.git")], check=True)
    subprocess.run(["git", "-C", str(tmp_path / "b.git"), "fetch", "-q", str(tmp_path / "b.bundle"),
                    "HEAD:refs/heads/autoresearch-job"], check=True)
    subprocess.run(["git", "-C", str(tmp_path / "b.git"), "bundle", "create", "-q",
                    str(base / "code" / f"{v.sha}.bundle"), "refs/heads/autoresearch-job"], check=True)
    env = dict(PATH=os.environ["PATH"], HOME=str(tmp_path), TMPDIR=str(tmp_path), AR_VESSL_COMMIT=v.sha,
               AR_VESSL_RUN="ar-x/r1", AR_VESSL_MAX_S="2", AR_VESSL_PYTHON=sys.executable, AR_SLEEP_S="60")
    t0 = time.time()
    proc = subprocess.run(["bash", str(base / "bin" / "job-x.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode in (124, 137, 143), proc.stdout + proc.stderr
    assert time.time() - t0 < 30
    assert (base / "runs" / "ar-x" / "r1" / "log").read_text().startswith("[ar-vessl]")


# ---- idempotency -------------------------------------------------------------------------------------
def test_resubmit_returns_the_job_from_the_record_then_from_the_list(v):
    job = v.submit("--env", "AR_SLEEP_S=3")
    assert v.submit("--env", "AR_SLEEP_S=3") == job
    name = v.fake_job(job)["name"]
    assert (v.state / "vessl" / "names" / name).read_text().strip() == job
    shutil.rmtree(v.state)  # records lost (another machine, a wiped .ar): found by name in `job list`
    assert v.submit("--env", "AR_SLEEP_S=3") == job
    assert len(v.calls("job", "create")) == 1
    assert json.loads((v.record(job) / "meta.json").read_text())["adopted"] is True
    proc = v.wait(job)
    assert proc.returncode == 0 and blocks(proc.stdout)[job][0] == "succeeded"
    assert v.submit("--env", "AR_SLEEP_S=3") == job  # succeeded: still the same job
    assert len(v.calls("job", "create")) == 1


def test_failed_job_is_retried_under_a_new_slug_with_the_same_name(v):
    bad = v.submit(env={"FAKE_VESSL_FAIL_JOBS": "*"})
    proc = v.wait(bad)
    assert proc.returncode == 1
    state, body = blocks(proc.stdout)[bad]
    assert state == "failed" and any("failed to pull image" in line for line in body)
    retry = v.submit()
    assert retry != bad and v.fake_job(retry)["name"] == v.fake_job(bad)["name"]  # names are not unique
    proc = v.run("submit.sh")  # blocking: the same (live) job, waited for
    assert proc.returncode == 0, proc.stderr
    assert list(blocks(proc.stdout)) == [retry] and blocks(proc.stdout)[retry][0] == "succeeded"


def test_a_name_taken_by_another_experiment_is_refused(v):
    job = v.submit("--name", "my-exp")
    proc = v.run("submit-async.sh", "--name", "my-exp", "--env", "AR_SEED=5")
    assert proc.returncode == 2
    assert "my-exp" in one_error_line(proc)
    shutil.rmtree(v.state)  # also when only VESSL knows the job: its tags name another commit/overrides
    proc = v.run("submit-async.sh", "--name", "my-exp", "--env", "AR_SEED=5")
    assert proc.returncode == 2, proc.stderr
    assert v.wait(job).returncode == 2  # no record of it any more: an unknown id here


# ---- flaky or hostile CLI ----------------------------------------------------------------------------
def test_backend_names_cannot_be_overridden(v):
    proc = v.run("submit-async.sh", "--env", "AR_VESSL_COMMIT=0000000000000000000000000000000000000000")
    assert proc.returncode == 2
    assert "set by the backend" in one_error_line(proc)
    assert not (v.root / "calls.jsonl").exists()  # refused before anything was asked of VESSL


def test_slug_missing_from_the_first_list_calls_and_non_json_output(v):
    env = {"FAKE_VESSL_LIST_HIDE": "3", "FAKE_VESSL_NONJSON": "list:1,show:3,create:1"}
    job = v.submit(env=env)
    # lookup (garbage, retried) + 3 calls that miss the new job + the hit
    assert job.startswith("job-") and len(v.calls("job", "list")) >= 6
    assert len(v.calls("job", "create")) == 1
    proc = v.wait(job, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert blocks(proc.stdout)[job][0] == "succeeded"
    assert "no JSON" in proc.stderr


def test_logged_out_is_exit_3_naming_the_login(v):
    job = v.submit()
    out = {"FAKE_VESSL_LOGGED_OUT": "1"}
    for script, args in (("submit-async.sh", ["--env", "AR_SEED=3"]), ("wait-jobs.sh", [job]),
                         ("cancel-jobs.sh", [job]), ("prep.sh", [])):
        proc = v.run(script, *args, env=out)
        assert proc.returncode == 3, (script, proc.stderr)
        assert "vesslctl auth login" in one_error_line(proc)
    assert v.wait(job).returncode == 0


@pytest.mark.parametrize("output, rc, logged_in", [
    ("Logged in as ada@example.com (organization: acme)", 0, True),
    ("Logged in as ada. Run `vesslctl auth login` to switch accounts.", 0, True),
    ("Not logged in. Run `vesslctl auth login`.", 0, False),
    ("You are logged out", 0, False),
    ("Error: token has expired", 0, False),
    ("no credentials found", 0, False),
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


@pytest.mark.parametrize("drop, fix", [
    ("AUTORESEARCH_CACHE_VOLUME", "AUTORESEARCH_CACHE_VOLUME"),
    ("AUTORESEARCH_RESOURCE_SPEC", "AUTORESEARCH_RESOURCE_SPEC"),
    ("PATH", "install the VESSL CLI"),
])
def test_missing_configuration_is_exit_3_with_the_fix(v, drop, fix):
    env = dict(v.env)
    if drop == "PATH":
        env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != str(FAKES))
    else:
        env.pop(drop)
    proc = subprocess.run([str(v.repo / "batch-job" / "submit-async.sh")], cwd=v.repo, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 3
    assert fix in one_error_line(proc)


def test_a_create_that_errors_after_creating_is_terminated(v):
    proc = v.run("submit-async.sh", "--env", "AR_SLEEP_S=30", env={"FAKE_VESSL_CREATE_ERROR": "1"})
    assert proc.returncode == 3 and proc.stdout == ""
    [job] = [p.name for p in (v.root / "jobs").iterdir()]
    fake = v.fake_job(job)
    assert fake["terminateCalls"] >= 1 and fake["workloadState"] == "terminated"


def test_hostile_values_are_data_and_org_team_are_remembered(v):
    nasty = "$(touch PWNED1); `touch PWNED2`; \"q\" 'q' a b & | > x\\"
    job = v.submit("--env", f"AR_LABEL={nasty}", env={"VESSLCTL_ORG": "acme", "VESSLCTL_TEAM": "lab"})
    proc = v.wait(job)  # no VESSLCTL_* here: the record's are used (the fake scopes jobs by them)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert v.result(job)["env"]["AR_LABEL"] == nasty
    assert not list(v.root.rglob("PWNED*")) and not list(v.repo.rglob("PWNED*"))
    create = v.calls("job", "create")[0]
    assert "PWNED" not in create["argv"][create["argv"].index("--cmd") + 1]
    assert f"AR_LABEL={nasty}" in create["argv"]
    assert create["org"] == "acme" and v.fake_job(job)["org"] == "acme"
    assert all(c["org"] == "acme" and c["team"] == "lab" for c in v.calls("job", "show"))


# ---- the result survives the log cap ------------------------------------------------------------------
def test_truncated_log_the_result_comes_from_the_volume(v):
    job = v.submit("--env", "AR_LINES=1500", env={"FAKE_VESSL_LOG_CAP": "1000"})
    proc = v.wait(job, env={"FAKE_VESSL_LOG_CAP": "1000"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    state, body = blocks(proc.stdout)[job]
    assert state == "succeeded"
    assert body[0] == "---" and body[1].startswith("val_bpb:") and "1.250000" in body[1]
    assert json.loads(body[-1].removeprefix("AR_RESULT_JSON: "))["val_bpb"] == 1.25
    cli = subprocess.run(["vesslctl", "job", "logs", "--limit", "1000", job], env=v.env, capture_output=True,
                         text=True).stdout
    assert "AR_RESULT_JSON" not in cli  # the platform's log really lost it
    logs = v.run("logs.sh", job)
    assert logs.returncode == 0 and "AR_RESULT_JSON: " in logs.stdout  # the volume copy is complete


def test_without_volume_download_the_result_comes_from_the_log_line(v):
    env = {"FAKE_VESSL_NO_DOWNLOAD": "1"}
    job = v.submit()
    proc = v.wait(job, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert blocks(proc.stdout)[job][0] == "succeeded"
    assert v.result(job)["marker"] == "v1"
    assert "result taken from the log's AR_RESULT_JSON line" in (v.record(job) / "log").read_text()


# ---- deadline, signals, never following logs ---------------------------------------------------------
def test_stuck_job_is_terminated_at_the_deadline(v):
    job = v.submit(env={"FAKE_VESSL_STUCK": "*"})
    proc = v.wait(job, env={"AR_TIMEOUT_S": "2"})
    assert proc.returncode == 1
    assert blocks(proc.stdout)[job][0] == "timeout"
    fake = v.fake_job(job)
    assert fake["terminateCalls"] == 1 and fake["workloadState"] == "terminated"
    assert not [p for p in Path("/proc").glob("[0-9]*") if _mentions(p, str(v.root))]
    assert v.run("cancel-jobs.sh", job).returncode == 0  # idempotent
    assert v.fake_job(job)["terminateCalls"] == 1


def _mentions(proc, text):
    try:
        cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        return text in cmdline or os.readlink(proc / "cwd").startswith(text)
    except OSError:
        return False


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


def test_prep_fills_the_volume_cache(v):
    (v.repo / "prepare" / "prepare.py").write_text(
        "import os, pathlib\n"
        "root = pathlib.Path(os.environ['AR_CACHE_DIR'])\n"
        "(root / os.environ['AR_PROFILE']).mkdir(parents=True, exist_ok=True)\n"
        "(root / os.environ['AR_PROFILE'] / 'meta.json').write_text('{}')\n"
        "print(f\"prepared: profile={os.environ['AR_PROFILE']} data={os.environ.get('AR_DATA', '-')} dir={root}\")\n")
    v.commit("fake prepare")
    env = {"AUTORESEARCH_PREP_RESOURCE_SPEC": "cpu-fake"}
    proc = v.run("prep.sh", "--profile", "smoke", "--data", "offline", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("prepared: profile=smoke data=offline")
    assert (v.volume / "autoresearch" / "cache" / "smoke" / "meta.json").is_file()
    create = v.calls("job", "create")[0]["argv"]
    assert create[create.index("-r") + 1] == "cpu-fake" and "AR_VESSL_MODE=prepare" in create
    bad = v.run("prep.sh", "--profile", "Bad Profile")
    assert bad.returncode == 2


def test_lib_is_a_verbatim_copy_of_local():
    assert (REPO / "batch-job" / "_lib.sh").read_bytes() == (REPO / "local" / "_lib.sh").read_bytes()
