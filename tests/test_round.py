"""The round driver (tools/round.py, make round/baseline/status/results/plot).

Most tests run the driver in a throwaway git repo (a copy of the project's files) against a fake
backend folder (AR_TEST_BACKEND_DIR) that implements docs/contract.md with tiny scripts: jobs are
background processes that sleep briefly and print a trainer-like summary whose val_bpb is computed
from the commit's train.py (`# FAKE_VAL=...`, ADOPTED) and the overrides:
    val_bpb = FAKE_VAL (default 1.0) + (MATRIX_LR - 0.04) + 0.01 * (SEED - 42);  DEPTH=0 crashes.
The last test runs a real round on the local backend with the real trainer (smoke profile, with a kill -9
and a resume; tests/test_prompts.py runs `make round` on the tiny profile, as the agent prompts do).
"""

import ast
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import clean_env, local_repo

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable

FAKE_COMMON = r'''#!/usr/bin/env python3
import json, os, re, signal, subprocess, sys, time, hashlib, ast
STATE = os.environ["AR_TEST_FAKE_STATE"]
JOBS = os.path.join(STATE, "jobs")
TERMINAL = ("succeeded", "failed", "timeout", "cancelled")

def put(path, text):
    tmp = path + ".tmp%d" % os.getpid()
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)

def get(job, name, default=""):
    try:
        with open(os.path.join(JOBS, job, name)) as f:
            return f.read().strip()
    except FileNotFoundError:
        return default

def logline(name, text):
    with open(os.path.join(STATE, name), "a") as f:
        f.write(text + "\n")

def cancel(job):
    if get(job, "state") in TERMINAL:
        return
    put(os.path.join(JOBS, job, "state"), "cancelled")
    logline("cancels.log", job)
    pid = get(job, "pid")
    if pid:
        try:
            os.killpg(int(pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
'''

FAKE_SUBMIT = FAKE_COMMON + r'''
import fcntl
args, commit, envs, name = sys.argv[1:], "HEAD", [], None
while args:
    opt = args.pop(0)
    if opt == "--commit": commit = args.pop(0)
    elif opt == "--env": envs.append(args.pop(0))
    elif opt == "--name": name = args.pop(0)
    else: print("submit-async.sh: bad option " + opt, file=sys.stderr); sys.exit(2)
os.makedirs(JOBS, exist_ok=True)
logline("calls.log", " ".join(sys.argv[1:]))
if os.environ.get("AR_TEST_FAKE_SUBMIT_EXIT"):
    print("submit-async.sh: fake backend unavailable: run fake login", file=sys.stderr); sys.exit(3)
sha = subprocess.run(["git", "rev-parse", commit + "^{commit}"], capture_output=True, text=True,
                     check=True).stdout.strip()
tag = os.environ.get("AR_TAG", "default")
if not name:
    name = "ar-%s-%s" % (tag, sha[:7])
    if envs:
        name += "-" + hashlib.sha256("".join(e + "\n" for e in sorted(envs)).encode()).hexdigest()[:8]
with open(os.path.join(STATE, "lock"), "w") as lk:
    fcntl.flock(lk, fcntl.LOCK_EX)
    job, n = name, 1
    while os.path.isdir(os.path.join(JOBS, job)):
        if get(job, "state") in ("failed", "timeout", "cancelled"):
            n += 1; job = "%s-%d" % (name, n)
        else:
            print("submit-async.sh: returning existing job " + job, file=sys.stderr)
            print(job); sys.exit(0)
    os.makedirs(os.path.join(JOBS, job))
    put(os.path.join(JOBS, job, "meta.json"), json.dumps(dict(commit=sha, env=envs, name=name)))
    put(os.path.join(JOBS, job, "state"), "running")
    logline("submissions.log", job)
    here = os.path.dirname(os.path.abspath(__file__))
    p = subprocess.Popen([sys.executable, os.path.join(here, "fake_job.py"), job], start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    put(os.path.join(JOBS, job, "pid"), str(p.pid))
time.sleep(float(os.environ.get("AR_TEST_FAKE_SUBMIT_DELAY", "0")))
print(job)
'''

FAKE_JOB = FAKE_COMMON + r'''
job = sys.argv[1]
meta = json.loads(get(job, "meta.json"))
env = dict(e.split("=", 1) for e in meta["env"])
time.sleep(float(os.environ.get("AR_TEST_FAKE_SLEEP", "0.5")))
src = subprocess.run(["git", "show", meta["commit"] + ":trainer/train.py"], capture_output=True, text=True).stdout
m = re.search(r"FAKE_VAL=([0-9.]+)", src)
base = float(m.group(1)) if m else 1.0
adopted = {}
for line in src.splitlines():
    if line.startswith("ADOPTED = "):
        adopted = ast.literal_eval(line[len("ADOPTED = "):].split("#")[0])
knobs = dict(MATRIX_LR=0.04, SEED=42, DEPTH=8)
knobs.update({k: ast.literal_eval(v) for k, v in re.findall(r"^(MATRIX_LR|SEED|DEPTH) = (\S+)", src, re.M)})
knobs.update(adopted)
knobs.update({k[3:]: ast.literal_eval(v) for k, v in env.items() if k[3:] in knobs})
out = ["profile: %s | data: offline | device: cpu" % env.get("AR_PROFILE", "tiny")]
out += ["\rstep %05d (%d%%) | loss 6.0" % (i, i * 10) for i in range(3)]
if knobs["DEPTH"] == 0:
    out += ["", "FAIL: loss is nan at step 2",
            "AR_RESULT_JSON: " + json.dumps(dict(status="fail", error="loss is nan at step 2", gpu="cpu"))]
    state = "failed"
else:
    val = base + (knobs["MATRIX_LR"] - 0.04) + 0.01 * (knobs["SEED"] - 42)
    gpu = os.environ.get("AR_TEST_FAKE_GPU", "cpu")
    res = dict(status="ok", val_bpb=round(val, 6), training_seconds=0.5, total_seconds=1.0, peak_vram_mb=512.0,
               profile=env.get("AR_PROFILE", "tiny"), device=gpu, gpu=gpu, overrides={})
    out += ["---", "val_bpb:          %.6f" % val, "peak_vram_mb:     512.0", "profile:          " + res["profile"],
            "AR_RESULT_JSON: " + json.dumps(res)]
    state = "succeeded"
put(os.path.join(JOBS, job, "log"), "\n".join(out) + "\n")
if get(job, "state") not in TERMINAL:
    put(os.path.join(JOBS, job, "state"), state)
'''

FAKE_WAIT = FAKE_COMMON + r'''
ids = sys.argv[1:]
for j in ids:
    if not os.path.isdir(os.path.join(JOBS, j)):
        print("wait-jobs.sh: unknown job id " + j, file=sys.stderr); sys.exit(2)
logline("waits.log", " ".join(ids))
stop = []
signal.signal(signal.SIGTERM, lambda s, f: stop.append(143))
signal.signal(signal.SIGINT, lambda s, f: stop.append(130))

def block(j):
    st = get(j, "state")
    print("=== %s (%s) ===" % (j, st))
    print(get(j, "log"), flush=True)

pending, failed = list(ids), False
while pending:
    if stop:
        for j in pending:
            cancel(j)
    for j in list(pending):
        if get(j, "state") in TERMINAL:
            block(j); pending.remove(j)
            failed = failed or get(j, "state") != "succeeded"
    if stop:
        sys.exit(stop[0])
    time.sleep(0.1)
sys.exit(1 if failed else 0)
'''

FAKE_CANCEL = FAKE_COMMON + r'''
for j in sys.argv[1:]:
    if not os.path.isdir(os.path.join(JOBS, j)):
        print("cancel-jobs.sh: unknown job id " + j, file=sys.stderr); sys.exit(2)
for j in sys.argv[1:]:
    cancel(j)
'''

FAKE_LOGS = FAKE_COMMON + r'''
print(get(sys.argv[1], "log"))
'''

TRAIN_PY = '''"""A stand-in trainer for the driver tests (the fake backend never runs it)."""
_NOT_KNOBS = set(globals())
DEPTH = 8                 # blocks
MATRIX_LR = 0.04          # Muon learning rate
SEED = 42
COMPILE = True
KNOBS = sorted(k for k in set(globals()) - _NOT_KNOBS if k.isupper())

# Overrides adopted by `make round` from a winning SWEEP candidate (one entry per knob).
ADOPTED = {}  # keep this comment

UNTIMED_STEPS = 1
'''


@pytest.fixture
def world(tmp_path):
    """A throwaway git repo with the project's tools + Makefile, a fake backend and its state dir."""
    repo = tmp_path / "repo"
    for rel in ("tools/round.py", "tools/results.py", "tools/plot.py", "tools/prices.yaml", "Makefile",
                "prepare/prepare.py", ".gitignore", "pyproject.toml"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, repo / rel)
    (repo / "trainer").mkdir()
    (repo / "trainer" / "train.py").write_text(TRAIN_PY)
    os.symlink(REPO / ".venv", repo / ".venv")
    git_env = dict(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.invalid", GIT_COMMITTER_NAME="t",
                   GIT_COMMITTER_EMAIL="t@example.invalid")
    env = clean_env(**git_env)
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True)
    fake = tmp_path / "fake"
    fake.mkdir()
    for name, text in (("submit-async.sh", FAKE_SUBMIT), ("wait-jobs.sh", FAKE_WAIT),
                       ("cancel-jobs.sh", FAKE_CANCEL), ("logs.sh", FAKE_LOGS), ("fake_job.py", FAKE_JOB)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    state = repo / ".ar" / "local"  # the contract's record layout: <state dir>/<backend>/jobs/<id>/state
    state.mkdir(parents=True)
    env.update(AR_TEST_BACKEND_DIR=str(fake), AR_TEST_FAKE_STATE=str(state), AR_PROFILE="smoke",
               AR_TEST_FAKE_SLEEP="0.3")
    w = type("World", (), {})()
    w.repo, w.fake, w.state, w.env, w.tmp = repo, fake, state, env, tmp_path

    def run(*args, timeout=120, **extra):
        return subprocess.run([PY, "tools/round.py", *args], cwd=repo, env={**env, **extra}, capture_output=True,
                              text=True, timeout=timeout)

    def make(*args, timeout=120, **extra):
        return subprocess.run(["make", "--no-print-directory", "-o", ".venv/.setup-stamp", *args], cwd=repo,
                              env={**env, **extra}, capture_output=True, text=True, timeout=timeout)

    def git(*args):
        return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True,
                              text=True).stdout.strip()

    def lines(name):
        p = state / name
        return p.read_text().splitlines() if p.exists() else []

    def rows():
        p = repo / "results.tsv"
        if not p.exists():
            return []
        text = p.read_text().splitlines()
        header = text[0].split("\t")
        return [dict(zip(header, line.split("\t"), strict=True)) for line in text[1:]]

    def ledger(tag, n, prefix="r"):
        p = repo / ".ar" / "rounds" / tag / f"{prefix}{n}.json"
        return json.loads(p.read_text()) if p.exists() else None

    w.run, w.make, w.git, w.lines, w.rows, w.ledger = run, make, git, lines, rows, ledger
    return w


def snapshot(root):
    """{relative path: (size, mtime_ns)} of every file under root, skipping .git internals that git
    itself may touch on read-only commands and the driver's own state dir."""
    out = {}
    for p in Path(root).rglob("*"):
        rel = p.relative_to(root).as_posix()
        if rel.startswith((".ar/", ".venv")) or rel == ".ar" or p.is_dir():
            continue
        if rel.startswith(".git/") and not rel.startswith(".git/refs/"):
            continue
        st = p.lstat()
        out[rel] = (st.st_size, st.st_mtime_ns)
    return out


# ---------------------------------------------------------------------------------------------
# hostile inputs: one clear line, non-zero exit, nothing executed, nothing written outside .ar/
# ---------------------------------------------------------------------------------------------
HOSTILE = [
    (["K=0"], "K must be an integer from 1 to 64"),
    (["K=-1"], "K must be an integer from 1 to 64"),
    (["K=abc"], "K must be an integer from 1 to 64"),
    (["K=1000"], "K must be an integer from 1 to 64"),
    (["K=$(touch pwned)"], "K must be an integer"),
    (["K=2", "BACKEND=nope"], "unknown BACKEND 'nope'"),
    (["K=2", "TAG=$(touch pwned)"], "TAG '$(touch pwned)' must match"),
    (["K=2", "TAG=`touch pwned`"], "must match"),
    (["K=2", "TAG=a;touch pwned"], "must match"),
    (["K=2", "TAG=a b"], "must match"),
    (["K=2", "TAG=Upper"], "must match"),
    (["K=2", 'SWEEP=MATRIX_LR="0.1",0.2'], "may only contain"),
    (["K=2", "SWEEP=MATRIX_LR='0.1',0.2"], "may only contain"),
    (["K=2", "SWEEP=MATRIX_LR=0.1,$(touch pwned)"], "may only contain"),
    (["K=2", "SWEEP=MATRIX_LR=0.1;touch pwned"], "may only contain"),
    (["K=2", "SWEEP=NOPE=1,2"], "NOPE is not a knob"),
    (["K=3", "SWEEP=MATRIX_LR=0.1,0.2"], "SWEEP gives 2 variants but K=3"),
    (["K=2", "SWEEP=DEPTH=1.5,2"], "not a valid int"),
]


@pytest.mark.parametrize("args,message", HOSTILE, ids=[" ".join(a) for a, _ in HOSTILE])
def test_hostile_make_round(world, args, message):
    before = snapshot(world.repo)
    p = world.make("round", *args)
    assert p.returncode != 0
    errors = [line for line in p.stderr.splitlines() if line.startswith("round: ")]
    assert len(errors) == 1 and message in errors[0], p.stderr
    assert p.stdout == ""
    assert not list(world.tmp.rglob("pwned")) and not Path("pwned").exists()
    assert snapshot(world.repo) == before  # nothing written (the .ar/ state dir aside)
    assert world.lines("calls.log") == []  # nothing submitted


def test_hostile_values_from_the_environment(world):
    before = snapshot(world.repo)
    for extra in (dict(TAG="$(touch pwned)", K="2"), dict(K="2", SWEEP="MATRIX_LR=$(touch${IFS}pwned),1")):
        p = world.make("round", **extra)
        assert p.returncode == 2 and "round: error:" in p.stderr, p.stderr
    assert not list(world.tmp.rglob("pwned")) and snapshot(world.repo) == before


def test_missing_candidate_branches_is_a_usage_error(world):
    p = world.run("round", "--k=2")
    assert p.returncode == 2 and "needs 2 candidate branches" in p.stderr and "-r1-c1" in p.stderr
    assert world.lines("calls.log") == []


# ---------------------------------------------------------------------------------------------
# budget
# ---------------------------------------------------------------------------------------------
def test_budget_refusal_submits_nothing(world):
    p = world.run("round", "--k=2", "--sweep=MATRIX_LR=0.02,0.03", "--backend=vessl", AR_BUDGET_USD="0.5",
                  AR_VESSL_GPU="H100")
    assert p.returncode == 1, p.stderr
    # 3 jobs (2 candidates + baseline) x (5 s smoke + 300 s overhead)/3600 x $2.39
    assert "budget refused" in p.stderr and "3 jobs x $0.20" in p.stderr and "AR_BUDGET_USD $0.50" in p.stderr
    assert world.lines("calls.log") == [] and not (world.repo / "results.tsv").exists()
    assert world.ledger("default", 1) is None


def test_budget_counts_recorded_spend_and_fails_closed_without_price(world):
    p = world.run("round", "--k=2", "--sweep=MATRIX_LR=0.02,0.03", "--backend=vessl", AR_BUDGET_USD="5",
                  AR_TEST_FAKE_GPU="NVIDIA H100 80GB HBM3")
    assert p.returncode == 0, p.stderr
    costs = [float(r["cost_usd"]) for r in world.rows()]
    assert len(costs) == 3 and all(0 < c < 0.35 for c in costs)  # wall_s x $2.39/h
    assert {r["backend"] for r in world.rows()} == {"vessl"} and {r["gpu"] for r in world.rows()} == {"H100"}
    p = world.run("round", "--k=2", "--sweep=MATRIX_LR=0.01,0.005", "--backend=vessl",
                  AR_BUDGET_USD=f"{sum(costs) + 0.4}")
    assert p.returncode == 1 and "budget refused: spent $" in p.stderr
    p = world.run("round", "--k=2", "--sweep=MATRIX_LR=0.01,0.005", "--backend=vessl", AR_BUDGET_USD="100",
                  AR_VESSL_GPU="MI300X")
    assert p.returncode == 1 and "no price for backend vessl GPU MI300X" in p.stderr
    assert len(world.lines("submissions.log")) == 3


# ---------------------------------------------------------------------------------------------
# winners
# ---------------------------------------------------------------------------------------------
def test_sweep_round_override_winner_then_threshold_keeps_best(world):
    head = world.git("rev-parse", "HEAD")
    (world.repo / "notes.txt").write_text("user's uncommitted work\n")
    p = world.make("round", "K=3", "SWEEP=MATRIX_LR=0.02,0.03,0.06", "TAG=exp1")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "candidate" in out and "delta_vs_best" in out and "next round: 2" in out
    assert re.search(r"c0\s+ar-exp1-\S+\s+succeeded\s+1\.000000\s+-\s+keep", out), out
    assert re.search(r"c1\s+\S+\s+succeeded\s+0\.980000\s+-0\.020000\s+keep\s+MATRIX_LR=0.02", out), out
    assert re.search(r"c3\s+\S+\s+succeeded\s+1\.020000\s+\+0\.020000\s+discard", out), out
    best = world.git("rev-parse", "autoresearch/exp1")
    assert best != head and world.git("rev-parse", "autoresearch/exp1^") == head
    assert "ADOPTED = {'MATRIX_LR': 0.02}  # keep this comment" in world.git("show", f"{best}:trainer/train.py")
    assert "MATRIX_LR=0.02" in world.git("log", "-1", "--format=%B", best)
    # the user's checkout is untouched
    assert world.git("rev-parse", "HEAD") == head and world.git("symbolic-ref", "HEAD") == "refs/heads/main"
    assert (world.repo / "trainer" / "train.py").read_text() == TRAIN_PY
    assert world.git("status", "--porcelain") == "?? notes.txt"
    rows = world.rows()
    assert [(r["candidate"], r["status"]) for r in rows] == [("c0", "keep"), ("c1", "keep"), ("c2", "discard"),
                                                               ("c3", "discard")]
    assert rows[1]["commit"] == best[:7] and rows[0]["commit"] == head[:7]
    assert rows[1]["overrides"] == '{"MATRIX_LR":0.02}'
    assert {r["round"] for r in rows} == {"1"} and {r["profile"] for r in rows} == {"smoke"}
    assert rows[1]["memory_gb"] == "0.5" and rows[1]["tag"] == "exp1"
    # round 2: the best (0.98, measured) is not re-run; a 0.005 gain is below AR_MIN_DELTA=0.01
    p = world.run("round", "--k=2", "--sweep=MATRIX_LR=0.015,0.05", "--tag=exp1", AR_MIN_DELTA="0.01")
    assert p.returncode == 0, p.stderr
    assert "no winner" in p.stdout and not re.search(r"^c0 ", p.stdout, re.M)
    assert world.git("rev-parse", "autoresearch/exp1") == best
    assert [r["status"] for r in world.rows()[4:]] == ["discard", "discard"]
    assert world.ledger("exp1", 2)["status"] == "done" and world.ledger("exp1", 2)["threshold"] == 0.01
    # round 3 with ADOPTED already holding MATRIX_LR: the dict is merged, one entry per knob
    p = world.run("round", "--k=2", "--sweep=MATRIX_LR=0.01 SEED=42,43", "--tag=exp1")
    assert p.returncode == 0, p.stderr
    best3 = world.git("rev-parse", "autoresearch/exp1")
    assert "ADOPTED = {'MATRIX_LR': 0.01, 'SEED': 42}" in world.git("show", f"{best3}:trainer/train.py")
    assert len(world.lines("submissions.log")) == 4 + 2 + 2


def test_branch_winner_fast_forwards_and_crash_rows(world):
    head = world.git("rev-parse", "HEAD")
    world.git("branch", "autoresearch/t1", head)
    for i, val in ((1, "0.95"), (2, "0.90"), (3, None)):
        world.git("switch", "-q", "-c", f"autoresearch/t1-r1-c{i}", head)
        if val is None:
            text = TRAIN_PY.replace("DEPTH = 8", "DEPTH = 0")  # crashes in the fake
        else:
            text = TRAIN_PY + f"# FAKE_VAL={val}\n"
        (world.repo / "trainer" / "train.py").write_text(text)
        world.git("commit", "-qam", f"candidate {i}: val {val}")
    world.git("switch", "-q", "autoresearch/t1-r1-c3")  # the agent sits on a candidate branch: TAG defaults to t1
    p = world.run("round", "--k=3")
    assert p.returncode == 0, p.stderr
    assert "round 1 of tag t1" in p.stdout
    c2 = world.git("rev-parse", "autoresearch/t1-r1-c2")
    assert world.git("rev-parse", "autoresearch/t1") == c2
    assert world.git("rev-parse", "refs/autoresearch/t1/r1") == c2
    assert world.git("symbolic-ref", "HEAD") == "refs/heads/autoresearch/t1-r1-c3"
    rows = world.rows()
    status = {r["candidate"]: r for r in rows}
    assert status["c2"]["status"] == "keep" and status["c1"]["status"] == "discard"
    assert status["c3"]["status"] == "crash" and status["c3"]["val_bpb"] == "0.000000"
    assert "loss is nan at step 2" in status["c3"]["description"] and "candidate 3" in status["c3"]["description"]
    assert status["c0"]["status"] == "keep" and status["c0"]["commit"] == head[:7]


def test_checked_out_best_branch_is_not_moved(world):
    world.git("switch", "-q", "-c", "autoresearch/co")
    p = world.run("round", "--k=1", "--sweep=MATRIX_LR=0.02")
    assert p.returncode == 0, p.stderr
    assert "checked out in" in p.stderr and "git merge --ff-only" in p.stderr
    led = world.ledger("co", 1)
    assert led["advanced"] is False and world.git("rev-parse", "autoresearch/co") == led["best_commit"]
    assert world.git("rev-parse", "refs/autoresearch/co/r1") == led["advance_to"]
    assert world.git("status", "--porcelain") == ""


def test_baseline_noise_threshold(world):
    p = world.make("baseline", "REPEATS=3", "TAG=nz")
    assert p.returncode == 0, p.stderr
    noise = json.loads((world.repo / ".ar/rounds/nz/noise.json").read_text())["smoke/cpu/local"]
    assert noise["n"] == 3 and noise["sigma"] == pytest.approx(0.01) and noise["mean"] == pytest.approx(1.01)
    assert "sigma 0.010000 over 3 runs" in p.stdout
    rows = world.rows()
    assert [r["candidate"] for r in rows] == ["base1", "base2", "base3"] and {r["status"] for r in rows} == {"keep"}
    assert rows[1]["overrides"] == '{"SEED":43}' and rows[0]["round"] == "b1"
    # the best's measured val_bpb is the mean, 1.01; 1.0005 beats it by 0.0095 < sigma: no winner
    p = world.run("round", "--k=1", "--sweep=MATRIX_LR=0.0405", "--tag=nz")
    assert p.returncode == 0 and "no winner" in p.stdout and "sigma from make baseline" in p.stdout, p.stdout
    p = world.run("round", "--k=1", "--sweep=MATRIX_LR=0.039", "--tag=nz")  # 0.999: beats 1.01 by 0.011
    assert p.returncode == 0 and "winner: c1" in p.stdout, p.stdout


# ---------------------------------------------------------------------------------------------
# resume, interrupt, lock
# ---------------------------------------------------------------------------------------------
def wait_for(pred, timeout=30):
    t = time.time()
    while time.time() - t < timeout:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


def start(world, *args, **extra):
    return subprocess.Popen([PY, "tools/round.py", *args], cwd=world.repo, env={**world.env, **extra},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_resume_after_kill9_never_submits_twice(world):
    sweep = "--sweep=MATRIX_LR=0.02,0.03,0.05"
    # first life: killed while the 2nd submit is in flight (job created, id not yet recorded)
    proc = start(world, "round", "--k=3", sweep, AR_TEST_FAKE_SLEEP="3", AR_TEST_FAKE_SUBMIT_DELAY="1")
    wait_for(lambda: len(world.lines("submissions.log")) >= 2)
    proc.kill()
    proc.wait()
    led = world.ledger("default", 1)
    assert led["status"] == "submitting"
    assert sum(1 for c in led["candidates"] if c.get("job_id")) == 1
    # second life: killed while waiting
    proc = start(world, "round", "--k=3", sweep, AR_TEST_FAKE_SLEEP="3")
    wait_for(lambda: (world.ledger("default", 1) or {}).get("status") == "running")
    proc.kill()
    proc.wait()
    assert len(world.lines("submissions.log")) == 4
    # third life: same command, finishes the round
    p = world.run("round", "--k=3", sweep)
    assert p.returncode == 0, p.stderr
    assert "resuming r1 (running): 4 job(s) recorded, 0 to submit" in p.stderr
    subs = world.lines("submissions.log")
    assert len(subs) == 4 and len(set(subs)) == 4  # K + baseline, each exactly once
    assert len(world.lines("calls.log")) == 5  # the unrecorded one was re-submitted and got its existing job
    rows = world.rows()
    assert sorted(r["candidate"] for r in rows) == ["c0", "c1", "c2", "c3"]
    assert {r["job_id"] for r in rows} == set(subs)
    assert all(r["status"] in ("keep", "discard") for r in rows)
    assert world.ledger("default", 1)["status"] == "done"


def test_ctrl_c_during_wait_cancels_every_job_and_rerun_restarts(world):
    # `make round` in its own process group, then SIGINT to the whole group, as a terminal's Ctrl-C does
    proc = subprocess.Popen(["make", "--no-print-directory", "-o", ".venv/.setup-stamp", "round", "K=2",
                             "SWEEP=MATRIX_LR=0.02,0.03"], cwd=world.repo,
                            env={**world.env, "AR_TEST_FAKE_SLEEP": "30"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(lambda: (world.ledger("default", 1) or {}).get("status") == "running"
             and world.lines("waits.log"))
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "round marked interrupted" in err, err
    subs = world.lines("submissions.log")
    assert len(subs) == 3 and sorted(set(world.lines("cancels.log"))) == sorted(subs)
    for job in subs:
        assert (world.state / "jobs" / job / "state").read_text() == "cancelled"
        pid = int((world.state / "jobs" / job / "pid").read_text())
        wait_for(lambda pid=pid: not Path(f"/proc/{pid}").exists() or
                 Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z", timeout=10)
    led = world.ledger("default", 1)
    assert led["status"] == "interrupted" and all(not c.get("job_id") for c in led["candidates"])
    assert [r["status"] for r in world.rows()] == ["crash"] * 3  # the cancelled jobs' time is on record
    assert "cancelled (interrupted)" in world.rows()[0]["description"]
    # a rerun restarts the cancelled candidates as new attempts (<name>-2) and finishes
    p = world.run("round", "--k=2", "--sweep=MATRIX_LR=0.02,0.03")
    assert p.returncode == 0, p.stderr
    subs2 = world.lines("submissions.log")[3:]
    assert sorted(subs2) == sorted(f"{s}-2" for s in subs)
    assert [r["status"] for r in world.rows()[3:]] == ["keep", "keep", "discard"]


def test_sigterm_while_submitting_cancels_submitted(world):
    proc = start(world, "round", "--k=3", "--sweep=MATRIX_LR=0.02,0.03,0.05", AR_TEST_FAKE_SLEEP="30",
                 AR_TEST_FAKE_SUBMIT_DELAY="0.7")
    wait_for(lambda: len(world.lines("submissions.log")) >= 2)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    subs = world.lines("submissions.log")
    assert sorted(set(world.lines("cancels.log"))) == sorted(subs)  # the in-flight submit was waited for
    assert world.ledger("default", 1)["status"] == "interrupted"


def test_second_round_on_same_tag_is_locked_out(world):
    lock_dir = world.repo / ".ar" / "rounds" / "lk"
    lock_dir.mkdir(parents=True)
    with open(lock_dir / "lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        p = world.run("round", "--k=1", "--sweep=MATRIX_LR=0.02", "--tag=lk")
    assert p.returncode == 1 and "another round on tag 'lk' is running" in p.stderr
    assert world.lines("calls.log") == []


def test_rerun_with_other_arguments_refused_and_abandon(world):
    proc = start(world, "round", "--k=1", "--sweep=MATRIX_LR=0.02", AR_TEST_FAKE_SLEEP="30")
    wait_for(lambda: (world.ledger("default", 1) or {}).get("status") == "running")
    proc.kill()
    proc.wait()
    p = world.run("status")
    assert p.returncode == 0 and "r1 (running)" in p.stdout and "running" in p.stdout
    assert re.search(r"c1\s+ar-default-\S+\s+running", p.stdout), p.stdout
    assert "driver: NOT running" in p.stdout  # the foreground driver was killed: the jobs run on, unwatched
    assert 'rerun to resume it: AR_PROFILE=smoke make round K=1 SWEEP="MATRIX_LR=0.02" TAG=default' in p.stdout
    p = world.run("round", "--k=1", "--sweep=MATRIX_LR=0.03")
    assert p.returncode == 1 and "rerun with those values" in p.stderr and "abandon" in p.stderr
    p = world.run("abandon")
    assert p.returncode == 0 and world.ledger("default", "1-abandoned")["status"] == "abandoned", p.stderr
    assert world.ledger("default", 1) is None and "the next round is 1 again" in p.stderr
    assert sorted(world.lines("cancels.log")) == sorted(world.lines("submissions.log"))
    p = world.run("round", "--k=1", "--sweep=MATRIX_LR=0.03")
    assert p.returncode == 0 and "round 1 of tag default" in p.stdout, p.stderr
    assert [(r["round"], r["status"]) for r in world.rows()] == [("1-abandoned", "crash")] * 2 + [("1", "keep")] * 2


def test_submit_unavailable_leaves_round_resumable(world):
    p = world.run("round", "--k=1", "--sweep=MATRIX_LR=0.02", AR_TEST_FAKE_SUBMIT_EXIT="3")
    assert p.returncode == 1 and "is unavailable (submit-async.sh exit 3): " in p.stderr and "fake login" in p.stderr
    assert world.ledger("default", 1)["status"] == "submitting"
    p = world.run("round", "--k=1", "--sweep=MATRIX_LR=0.02")
    assert p.returncode == 0, p.stderr
    assert len(world.lines("submissions.log")) == 2


# ---------------------------------------------------------------------------------------------
# detached rounds (DETACH=1), round-wait, and abandon keeping the round number
# ---------------------------------------------------------------------------------------------
def driver(world, tag="default"):
    return json.loads((world.repo / ".ar" / "rounds" / tag / "driver.json").read_text())


def round_errors(p):
    return [line for line in p.stderr.splitlines() if line.startswith("round: ")]


def test_detached_round_returns_at_once_and_finishes_in_the_background(world):
    t = time.time()
    p = world.make("round", "K=2", "SWEEP=MATRIX_LR=0.02,0.03", "DETACH=1", AR_TEST_FAKE_SLEEP="2")
    assert p.returncode == 0, p.stderr
    assert time.time() - t < 10  # the foreground only checks; the jobs take 2 s more
    assert p.stdout == ".ar/rounds/default/r1.log\n"
    assert "runs detached (pid" in p.stderr and "make round-wait TAG=default" in p.stderr
    pid = driver(world)["pid"]
    assert os.getsid(pid) == pid  # its own session: a shell tool killing its command's process group misses it
    wait_for(lambda: (world.ledger("default", 1) or {}).get("status") == "running")
    p = world.make("status")
    assert f"driver: running (pid {pid}, detached); log .ar/rounds/default/r1.log" in p.stdout, p.stdout
    # a second start of the same round is refused in the foreground; nothing is submitted twice
    p = world.make("round", "K=2", "SWEEP=MATRIX_LR=0.02,0.03", "DETACH=1")
    assert p.returncode != 0 and p.stdout == "" and len(round_errors(p)) == 1, p.stderr
    assert (f"another round on tag 'default' is running (pid {pid}, detached, log .ar/rounds/default/r1.log)"
            in round_errors(p)[0])
    p = world.run("wait", "--timeout=0")
    assert p.returncode == 3 and "r1 of tag default is still running after 0s" in p.stdout, p.stdout
    p = world.make("round-wait", "TIMEOUT=60")
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.startswith("round 1 of tag default") and "delta_vs_best" in p.stdout
    assert "winner: c1 val_bpb 0.980000" in p.stdout and "next round: 2" in p.stdout
    assert [(r["round"], r["candidate"], r["status"]) for r in world.rows()] == [
        ("1", "c0", "keep"), ("1", "c1", "keep"), ("1", "c2", "discard")]
    assert len(world.lines("submissions.log")) == 3
    log = (world.repo / ".ar/rounds/default/r1.log").read_text()
    assert "next round: 2" in log and f"detached driver pid {pid} exits 0" in log
    assert driver(world)["rc"] == 0
    p = world.make("status")
    assert "no unfinished rounds" in p.stdout
    assert "tag default r1: done (detached, exited 0): winner: c1 val_bpb 0.980000" in p.stdout, p.stdout
    # a detached baseline, waited for the same way
    p = world.make("baseline", "REPEATS=2", "DETACH=1")
    assert p.returncode == 0 and p.stdout == ".ar/rounds/default/b1.log\n", p.stderr
    p = world.make("round-wait", "TIMEOUT=60")
    assert p.returncode == 0 and p.stdout.startswith("b1 of tag default") and "noise: sigma" in p.stdout, p.stdout


def test_detach_checks_everything_in_the_foreground(world):
    sweep = "SWEEP=MATRIX_LR=0.02,0.03"
    cases = [
        (["K=0"], {}, "K must be an integer from 1 to 64"),
        (["K=2", "BACKEND=nope"], {}, "unknown BACKEND 'nope'"),
        (["K=3", sweep], {}, "SWEEP gives 2 variants but K=3"),
        (["K=2"], {}, "needs 2 candidate branches"),
        (["K=2", sweep], {"DETACH": "yes"}, "DETACH must be 1 (run detached) or 0, not 'yes'"),
        (["K=2", sweep, "BACKEND=vessl"], {"AR_BUDGET_USD": "0.5"}, "budget refused"),
    ]
    for args, extra, message in cases:
        p = world.make("round", *args, **{"DETACH": "1", **extra})
        assert p.returncode != 0 and p.stdout == "", (args, p.stdout)
        assert len(round_errors(p)) == 1 and message in round_errors(p)[0], (args, p.stderr)
    # an unfinished round (its submit failed) refuses other values, in the foreground too
    p = world.run("round", "--k=1", "--sweep=MATRIX_LR=0.02", AR_TEST_FAKE_SUBMIT_EXIT="3")
    assert p.returncode == 1 and world.ledger("default", 1)["status"] == "submitting"
    p = world.make("round", "K=1", "SWEEP=MATRIX_LR=0.03", "DETACH=1")
    assert p.returncode != 0 and "is unfinished (submitting)" in round_errors(p)[0]
    p = world.make("baseline", "DETACH=1")
    assert p.returncode != 0 and "round 1 of tag default is unfinished" in round_errors(p)[0]
    assert not list((world.repo / ".ar" / "rounds" / "default").glob("*.log"))
    assert not (world.repo / ".ar" / "rounds" / "default" / "driver.json").exists()
    assert world.lines("submissions.log") == []
    # what fails only once detached (the submit) is in round-wait and make status, with the command to rerun
    p = world.make("round", "K=1", "SWEEP=MATRIX_LR=0.02", "DETACH=1", AR_TEST_FAKE_SUBMIT_EXIT="3")
    assert p.returncode == 0, p.stderr
    p = world.make("round-wait", "TIMEOUT=30")
    assert p.returncode != 0 and "r1 of tag default is unfinished (submitting) and no driver is running" in p.stdout
    assert "the detached driver exited 1: backend local is unavailable (submit-async.sh exit 3)" in p.stdout
    rerun = ('rerun to resume it: AR_PROFILE=smoke make round K=1 SWEEP="MATRIX_LR=0.02" TAG=default BACKEND=local '
             'DETACH=1')
    assert rerun in p.stdout, p.stdout
    p = world.make("status")
    assert "driver: NOT running (the detached driver exited 1: backend local is unavailable" in p.stdout
    assert rerun in p.stdout
    p = world.make("round", "K=1", "SWEEP=MATRIX_LR=0.02", "DETACH=1")
    assert p.returncode == 0 and world.make("round-wait", "TIMEOUT=60").returncode == 0
    assert [r["status"] for r in world.rows()] == ["keep", "keep"]


def test_detached_driver_sigterm_cancels_kill9_resumes(world):
    sweep = "SWEEP=MATRIX_LR=0.02,0.03"
    # SIGTERM, as Ctrl-C in the foreground: every job cancelled, the round marked interrupted
    assert world.make("round", "K=2", sweep, "DETACH=1", AR_TEST_FAKE_SLEEP="30").returncode == 0
    pid = driver(world)["pid"]
    wait_for(lambda: (world.ledger("default", 1) or {}).get("status") == "running" and world.lines("waits.log"))
    os.kill(pid, signal.SIGTERM)
    p = world.make("round-wait", "TIMEOUT=30")
    assert p.returncode != 0 and "the detached driver exited 130: interrupted (signal 15)" in p.stdout, p.stdout
    subs = world.lines("submissions.log")
    assert len(subs) == 3 and sorted(set(world.lines("cancels.log"))) == sorted(subs)
    assert world.ledger("default", 1)["status"] == "interrupted"
    # the rerun command round-wait printed restarts the jobs; the driver then dies (kill -9) while waiting
    rerun = re.search(r"rerun to resume it: (.*?) \(or abandon", p.stdout).group(1)
    words = shlex.split(rerun)
    assert words[:3] == ["AR_PROFILE=smoke", "make", "round"] and words[-1] == "DETACH=1"
    assert world.make(*words[2:], AR_TEST_FAKE_SLEEP="2").returncode == 0
    pid2 = driver(world)["pid"]
    assert pid2 != pid
    wait_for(lambda: len(world.lines("waits.log")) == 2)
    os.kill(pid2, signal.SIGKILL)
    p = world.make("round-wait", "TIMEOUT=10")
    assert p.returncode != 0 and "no driver is running (the detached driver died)" in p.stdout, p.stdout
    p = world.make("status")
    assert "driver: NOT running (the detached driver died); log .ar/rounds/default/r1.log" in p.stdout, p.stdout
    assert world.make(*words[2:]).returncode == 0  # resumes: waits on the recorded jobs
    p = world.make("round-wait", "TIMEOUT=60")
    assert p.returncode == 0 and "round 1 of tag default" in p.stdout, p.stdout
    subs2 = world.lines("submissions.log")[3:]
    assert sorted(subs2) == sorted(f"{s}-2" for s in subs)  # each restarted once, nothing submitted twice
    assert [r["status"] for r in world.rows()] == ["crash"] * 3 + ["keep", "keep", "discard"]


def test_abandon_stops_the_driver_and_the_next_round_reuses_the_number(world):
    head = world.git("rev-parse", "HEAD")
    world.git("branch", "autoresearch/ab", head)
    for i, val in ((1, "0.95"), (2, "0.90")):
        world.git("switch", "-q", "-c", f"autoresearch/ab-r1-c{i}", head)
        (world.repo / "trainer" / "train.py").write_text(TRAIN_PY + f"# FAKE_VAL={val}\n")
        world.git("commit", "-qam", f"candidate {i}")
    world.git("switch", "-q", "main")
    assert world.make("round", "K=2", "TAG=ab", "DETACH=1", AR_TEST_FAKE_SLEEP="30").returncode == 0
    pid = driver(world, "ab")["pid"]
    wait_for(lambda: (world.ledger("ab", 1) or {}).get("status") == "running" and world.lines("waits.log"))
    p = world.run("abandon", "--tag=ab")
    assert p.returncode == 0, p.stderr
    assert f"stopping the running round driver of tag ab (pid {pid})" in p.stderr
    assert "the next round is 1 again: candidate branches autoresearch/ab-r1-c1.." in p.stderr
    state = world.repo / ".ar" / "rounds" / "ab"
    assert world.ledger("ab", 1) is None and world.ledger("ab", "1-abandoned")["status"] == "abandoned"
    assert (state / "r1-abandoned.log").exists() and not (state / "r1.log").exists()
    assert not (state / "driver.json").exists()
    subs = world.lines("submissions.log")
    assert len(subs) == 3 and sorted(set(world.lines("cancels.log"))) == sorted(subs)
    rows = world.rows()  # written by the stopped driver as round 1, relabelled by abandon
    assert [(r["round"], r["status"]) for r in rows] == [("1-abandoned", "crash")] * 3
    assert all("cancelled (interrupted)" in r["description"] for r in rows)
    # the branches prepared for round 1 are round 1's again, no renaming
    p = world.make("round", "K=2", "TAG=ab")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("round 1 of tag ab") and "winner: c2" in p.stdout and "next round: 2" in p.stdout
    c2 = world.git("rev-parse", "autoresearch/ab-r1-c2")
    assert world.git("rev-parse", "autoresearch/ab") == c2 == world.git("rev-parse", "refs/autoresearch/ab/r1")
    assert [(r["round"], r["candidate"], r["status"]) for r in world.rows()[3:]] == [
        ("1", "c0", "keep"), ("1", "c1", "discard"), ("1", "c2", "keep")]
    # each abandon of the same number is archived under its own name
    for _ in range(2):
        p = world.run("round", "--k=1", "--sweep=MATRIX_LR=0.02", "--tag=ab", AR_TEST_FAKE_SUBMIT_EXIT="3")
        assert p.returncode == 1 and world.run("abandon", "--tag=ab").returncode == 0
    assert world.ledger("ab", "2-abandoned") and world.ledger("ab", "2-abandoned-2") and not world.ledger("ab", 2)
    p = world.run("round", "--k=1", "--sweep=MATRIX_LR=0.02", "--tag=ab")
    assert p.returncode == 0 and "round 2 of tag ab" in p.stdout, p.stderr


def test_results_status_plot_targets(world):
    p = world.make("results")
    assert p.returncode == 0 and "no results" in p.stdout
    assert world.run("round", "--k=2", "--sweep=MATRIX_LR=0.02,0.03").returncode == 0
    p = world.make("results")
    assert p.returncode == 0 and "3 experiments, 1 rounds" in p.stdout
    p = world.make("status")
    assert p.returncode == 0 and "no unfinished rounds" in p.stdout and "spent $0.00" in p.stdout
    p = world.make("plot")
    assert p.returncode == 0, p.stderr
    png = (world.repo / "progress.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


# ---------------------------------------------------------------------------------------------
# end to end: the real local backend and the real trainer (smoke profile; the tiny-profile rounds are in
# tests/test_prompts.py)
# ---------------------------------------------------------------------------------------------
LOCAL_FILES = ("local/submit-async.sh", "local/wait-jobs.sh", "local/cancel-jobs.sh")


@pytest.mark.skipif(not all((REPO / f).exists() for f in LOCAL_FILES), reason="local backend not built yet")
def test_end_to_end_local_backend(tmp_path, ar_cache):
    repo, env = local_repo(tmp_path, AR_CACHE_DIR=ar_cache, AR_PROFILE="smoke", AR_LOCAL_SLOTS="2",
                           AR_LOCAL_THREADS="1")
    sweep = "MATRIX_LR=0.02,0.06 WARMDOWN_RATIO=0.3,0.7"
    # the driver dies (kill -9) once every job is submitted ...
    proc = subprocess.Popen([PY, "tools/round.py", "round", "--k=4", "--backend=local", "--tag=e2e",
                             f"--sweep={sweep}"], cwd=repo, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ledger = repo / ".ar" / "rounds" / "e2e" / "r1.json"
    wait_for(lambda: ledger.exists() and json.loads(ledger.read_text())["status"] == "running", timeout=120)
    proc.kill()
    proc.wait()
    # ... and the same command through make resumes: waits on the recorded jobs, submits nothing twice
    p = subprocess.run(["make", "--no-print-directory", "-o", ".venv/.setup-stamp", "round", "K=4", "BACKEND=local",
                        "TAG=e2e", f"SWEEP={sweep}"], cwd=repo, env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    assert "resuming r1 (running): 5 job(s) recorded, 0 to submit" in p.stderr
    jobs = sorted(d.name for d in (repo / ".ar" / "local" / "jobs").iterdir())
    assert len(jobs) == 5, jobs
    text = (repo / "results.tsv").read_text().splitlines()
    header = text[0].split("\t")
    rows = [dict(zip(header, line.split("\t"), strict=True)) for line in text[1:]]
    assert sorted(r["candidate"] for r in rows) == ["c0", "c1", "c2", "c3", "c4"]
    assert sorted(r["job_id"] for r in rows) == jobs
    assert all(r["status"] in ("keep", "discard") for r in rows), rows
    assert all(0 < float(r["val_bpb"]) < 20 and r["profile"] == "smoke" and r["gpu"] == "cpu" for r in rows)
    assert all(r["backend"] == "local" and r["job_id"].startswith("ar-e2e-") for r in rows)
    assert p.stdout.startswith("round 1 of tag e2e") and "delta_vs_best" in p.stdout and "next round: 2" in p.stdout
    assert sum(r["status"] == "keep" for r in rows) in (1, 2)
    best = subprocess.run(["git", "show", "autoresearch/e2e:trainer/train.py"], cwd=repo, capture_output=True,
                          text=True, check=True).stdout
    winner = [r for r in rows if r["status"] == "keep" and r["candidate"] != "c0"]
    adopted = ast.literal_eval(re.search(r"^ADOPTED = (\{.*\})", best, re.M).group(1))
    assert adopted == (json.loads(winner[0]["overrides"]) if winner else {})  # the winner's overrides, adopted


def test_gpu_spellings_of_the_backends_are_keyed_and_priced():
    """AR_MODAL_GPU=H100! / H100:8 / fallback lists and AR_SKY_GPU=H100:8 resolve to a key and a price."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("round_tool", REPO / "tools" / "round.py")
    rt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rt)
    prices, _ = rt.load_prices()
    cases = {"H100!": ("H100", 1), "H100": ("H100", 1), "H100:8": ("H100x8", 8), "H100!,A100-80GB": ("H100", 1),
             "A100-80GB": ("A100-80GB", 1)}
    for raw, (key, count) in cases.items():
        os.environ["AR_MODAL_GPU"] = raw
        try:
            gpu = rt.resolve_gpu("modal", prices)
        finally:
            del os.environ["AR_MODAL_GPU"]
        assert gpu == key, raw
        assert rt.price_of(prices, "modal", gpu) == pytest.approx(prices["modal"][key.split("x")[0]] * count)
    os.environ["AR_MODAL_GPU"] = "H100; rm -rf /"
    try:
        with pytest.raises(rt.UsageError):
            rt.resolve_gpu("modal", prices)
    finally:
        del os.environ["AR_MODAL_GPU"]
