"""The round driver as a user meets it: tools/ and local/ copied into a karpathy-layout project
(train.py at the root printing only the reference summary block), driven through tools/round.py."""

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

# A karpathy-layout train.py: knobs as constants, only the reference block at the end. Its val_bpb is
# a function of MATRIX_LR (best at 0.05) plus a little noise; SLEEP and CRASH let a test make it hang
# or fail the way a real trainer does.
TRAIN = """\
import os, random, sys, time
MATRIX_LR = 0.04          # Muon learning rate
DEPTH = 8                 # transformer blocks
SLEEP = 0.3               # seconds of "training"
CRASH = False
EXTRA_SECONDS = 0         # a cheat: train longer than the budget
STEPS = 953               # as many as a quiet machine does in the budget
for i in range(200):
    print(f"step {i:05d} | loss {3.0 - i / 100:.4f}")
time.sleep(SLEEP)
if CRASH:
    print("Traceback (most recent call last):", file=sys.stderr)
    print('  File "train.py", line 9, in <module>', file=sys.stderr)
    print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", file=sys.stderr)
    sys.exit(1)
v = 1.0 + abs(MATRIX_LR - 0.05) * 10 + random.gauss(0, 0.001) - DEPTH / 1000
print("---")
print(f"val_bpb:          {v:.6f}")
print(f"training_seconds: {300.1 + EXTRA_SECONDS:.1f}")
print("total_seconds:    325.9")
print("peak_vram_mb:     45060.2")
print("mfu_percent:      39.80")
print("total_tokens_M:   499.6")
print(f"num_steps:        {STEPS}")
print("num_params_M:     50.3")
print(f"depth:            {DEPTH}")
"""

GIT_ID = dict(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.invalid", GIT_COMMITTER_NAME="t",
              GIT_COMMITTER_EMAIL="t@example.invalid")


class Project(type(Path())):
    env: dict  # the environment every command of a test runs with


@pytest.fixture
def proj(tmp_path):
    """A karpathy-layout project with tools/ and local/ copied in, committed on master."""
    p = Project(tmp_path / "autoresearch")
    p.mkdir()
    for d in ("tools", "local"):
        shutil.copytree(REPO / d, p / d, ignore=shutil.ignore_patterns("__pycache__", "README.md"))
    (p / "train.py").write_text(TRAIN)
    (p / "prepare.py").write_text("TIME_BUDGET = 300  # fixed\n")
    (p / ".gitignore").write_text(".ar/\nresults.tsv\n")
    env = clean_env(**GIT_ID, AR_LOCAL_SLOTS="4", AR_TRAIN_CMD=f"{sys.executable} train.py")
    for cmd in (["git", "init", "-q", "-b", "master"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=p, env=env, check=True)
    p.env = env
    return p


def rnd(p, *args, check=None, **env):
    r = subprocess.run([sys.executable, "tools/round.py", *args], cwd=p, env={**p.env, **env},
                       capture_output=True, text=True, timeout=240)
    if check is not None:
        assert r.returncode == check, r.stdout + r.stderr
    return r


def git(p, *args):
    return subprocess.run(["git", *args], cwd=p, env=p.env, capture_output=True, text=True, check=True).stdout.strip()


def rows(p):
    lines = (p / "results.tsv").read_text().splitlines()
    head = lines[0].split("\t")
    return [dict(zip(head, x.split("\t"), strict=True)) for x in lines[1:]]


def branch(p, name, edit, message="edit", base="autoresearch/t"):
    git(p, "switch", "-q", "-c", name, base)
    path, old, new = edit
    f = p / path
    f.write_text(f.read_text().replace(old, new) if old else new)
    git(p, "add", "-A")
    git(p, "commit", "-qm", message)
    git(p, "switch", "-q", "master")


def jobs(p):
    d = p / ".ar" / "local" / "jobs"
    return sorted(x.name for x in d.iterdir() if x.is_dir()) if d.is_dir() else []


def test_copied_project_sweep_round_keeps_the_winner_as_plain_code(proj):
    r = rnd(proj, "round", "--k=2", "--sweep=MATRIX_LR=0.05,0.09", "--tag=t", check=0)
    assert "winner: c1" in r.stdout and "(the code the tag started from) val_bpb" in r.stdout.splitlines()[0], r.stdout
    best = git(proj, "show", "autoresearch/t:train.py")
    assert "MATRIX_LR = 0.05          # Muon learning rate" in best.splitlines()
    assert git(proj, "diff", "--name-only", "master", "autoresearch/t") == "train.py"
    got = rows(proj)
    assert list(got[0])[:5] == ["commit", "val_bpb", "memory_gb", "status", "description"]
    assert [(x["candidate"], x["status"]) for x in got] == [("c0", "keep"), ("c0b", "keep"), ("c1", "keep"),
                                                             ("c2", "discard")]
    assert got[2]["num_steps"] == "953" and got[2]["memory_gb"] == "44.0"
    assert "sigma" in r.stdout and "NOISE NOT MEASURED" not in r.stdout  # the two controls measured it
    # the candidates are kept as refs, not as branches
    assert git(proj, "branch", "--list", "autoresearch/t-r1-*") == ""
    assert git(proj, "rev-parse", "refs/autoresearch/t/r1-c2")
    # round 2 runs two controls: the new best's only run is its winning one
    hostile = """depth 12 $(touch pwned); `touch pwned` "quoted" 'too'"""
    branch(proj, "autoresearch/t-r2-c1", ("train.py", "DEPTH = 8 ", "DEPTH = 12"), hostile)
    r = rnd(proj, "round", "--k=1", "--tag=t", check=0)
    header = r.stdout.splitlines()[0]  # names the best's idea
    assert header.startswith("round 2 of tag t on local/") and "(sweep: MATRIX_LR=0.05) val_bpb" in header
    assert [x["candidate"] for x in rows(proj)[4:]] == ["c0", "c0b", "c1"]  # the winner's own run is no control
    assert rows(proj)[6]["description"] == hostile and not (proj / "pwned").exists()


def test_a_round_without_controls_keeps_no_winner_when_every_candidate_ran_far_fewer_steps(proj):
    """A busier machine (here: STEPS) slows every candidate alike; with no control in the round, no score
    compares with the best's: no winner, and the candidates may run again once the best is measured."""
    rnd(proj, "round", "--k=1", "--sweep=MATRIX_LR=0.09", "--tag=t", check=0)  # no winner: the best keeps 2 runs
    for i, lr in ((1, "0.05"), (2, "0.07")):
        branch(proj, f"autoresearch/t-r2-c{i}", ("train.py", "STEPS = 953", f"STEPS = 600\nMATRIX_LR = {lr}"))
    r = rnd(proj, "round", "--k=2", "--tag=t", check=0)
    assert "c0 " not in r.stdout and "note: no winner kept: every candidate ran fewer steps (600-600) than the " \
        "best's runs (953" in r.stdout and "refs/autoresearch/t/r2-c<i>" in r.stdout, r.stdout
    assert "no winner: autoresearch/t stays at" in r.stdout, r.stdout  # c1 beat the best by far, all the same
    assert [x["status"] for x in rows(proj)[-2:]] == ["discard", "discard"]
    assert all("not compared" in x["description"] for x in rows(proj)[-2:])
    score = [ln for ln in r.stdout.splitlines() if ln.startswith("round 2")][0].split("val_bpb ")[1]
    # measured again, the best's score leaves the not-compared rows out, and c1 may run again
    rnd(proj, "baseline", "--repeats=2", "--tag=t", check=0)
    git(proj, "branch", "autoresearch/t-r3-c1", "refs/autoresearch/t/r2-c1")
    r = rnd(proj, "round", "--k=1", "--tag=t", check=0)
    assert "winner: c1" in r.stdout and "note: the winner ran 600 steps, the old best 953" in r.stdout, r.stdout
    assert "(mean of 4 run(s))" in r.stdout.splitlines()[0] and score.split()[0] not in r.stdout.splitlines()[0]
    # the new best's only compared run is its winning one: the next round measures it twice
    r = rnd(proj, "round", "--k=1", "--sweep=DEPTH=7", "--tag=t", check=0)
    assert [x["candidate"] for x in rows(proj)[-3:]] == ["c0", "c0b", "c1"], r.stdout
    assert "(mean of 3 run(s))" in r.stdout.splitlines()[0], r.stdout


def test_rules_of_the_game_refuse_before_anything_runs(proj):
    rnd(proj, "round", "--k=1", "--sweep=MATRIX_LR=0.05", "--tag=t", check=0)
    n_jobs = len(jobs(proj))
    branch(proj, "autoresearch/t-r2-c1", ("prepare.py", "300", "600"), "longer budget")
    r = rnd(proj, "round", "--k=1", "--tag=t", check=2)
    assert "changes prepare.py" in r.stderr and "only train.py" in r.stderr
    git(proj, "branch", "-D", "autoresearch/t-r2-c1")
    branch(proj, "autoresearch/t-r2-c1", ("local/submit-async.sh", "", "#!/bin/sh\n"), "harness")
    assert "changes local/submit-async.sh" in rnd(proj, "round", "--k=1", "--tag=t", check=2).stderr
    git(proj, "branch", "-D", "autoresearch/t-r2-c1")
    git(proj, "branch", "autoresearch/t-r2-c1", "autoresearch/t")
    assert "changes nothing" in rnd(proj, "round", "--k=1", "--tag=t", check=2).stderr
    git(proj, "branch", "-D", "autoresearch/t-r2-c1")
    branch(proj, "autoresearch/t-r2-c1", ("train.py", "# Muon learning rate", "# Muon, re-rolled"), "a free re-roll")
    assert "changes only comments or layout" in rnd(proj, "round", "--k=1", "--tag=t", check=2).stderr
    assert "No newline" not in git(proj, "diff", "master", "autoresearch/t")  # a SWEEP keeps the last newline
    assert "missing candidate branch(es) autoresearch/t-r2-c2" in rnd(proj, "round", "--k=2", "--tag=t", check=2).stderr
    assert len(jobs(proj)) == n_jobs and not (proj / ".ar/rounds/t/r2.json").exists()
    # a commit that already ran is not a new candidate
    git(proj, "branch", "-D", "autoresearch/t-r2-c1")
    branch(proj, "autoresearch/t-r2-c1", ("train.py", "MATRIX_LR = 0.05", "MATRIX_LR = 0.09"), "worse")
    assert "winner" not in rnd(proj, "round", "--k=1", "--tag=t", check=0).stdout.replace("no winner", "")
    git(proj, "branch", "autoresearch/t-r3-c1", "refs/autoresearch/t/r2-c1")
    assert "already ran on tag t" in rnd(proj, "round", "--k=1", "--tag=t", check=2).stderr
    git(proj, "branch", "-D", "autoresearch/t-r3-c1")
    assert "already ran on tag t" in rnd(proj, "round", "--k=1", "--sweep=MATRIX_LR=0.09", "--tag=t", check=2).stderr
    assert "changes nothing" in rnd(proj, "round", "--k=1", "--sweep=MATRIX_LR=0.05", "--tag=t", check=2).stderr
    assert "the best's own value, written another way" in rnd(proj, "round", "--k=1", "--sweep=MATRIX_LR=5e-2",
                                                              "--tag=t", check=2).stderr
    # the same value, written as an expression that is that value on every profile, already ran too
    branch(proj, "autoresearch/t-r3-c1", ("train.py", "MATRIX_LR = 0.05", "MATRIX_LR = 0.09 if DEPTH else 0.09"))
    # every refused candidate is named at once, one line each
    branch(proj, "autoresearch/t-r3-c2", ("prepare.py", "300", "600"), "longer budget")
    git(proj, "branch", "autoresearch/t-r3-c3", "autoresearch/t")
    err = rnd(proj, "round", "--k=3", "--tag=t", check=2).stderr.splitlines()
    assert [x.split(" ")[2] for x in err] == [f"autoresearch/t-r3-c{i}" for i in (1, 2, 3)], err
    assert "already ran on tag t" in err[0] and "changes prepare.py" in err[1] and "empty commit" in err[2], err


def test_a_candidate_that_trains_longer_is_not_kept(proj):
    rnd(proj, "round", "--k=1", "--sweep=DEPTH=8.0", "--tag=t", "--backend=local", check=0)
    branch(proj, "autoresearch/t-r2-c1", ("train.py", "EXTRA_SECONDS = 0", "EXTRA_SECONDS = 100\nMATRIX_LR = 0.05"))
    branch(proj, "autoresearch/t-r2-c2", ("train.py", "EXTRA_SECONDS = 0", "EXTRA_SECONDS = 40\nMATRIX_LR = 0.09"))
    r = rnd(proj, "round", "--k=2", "--tag=t", check=0)
    assert r.stdout.count("(over the budget)") == 2 and "no winner" in r.stdout, r.stdout  # flagged, won or not
    assert "note: c1 trained 400 s, the best 300 s: over the budget" in r.stdout, r.stdout  # below the table


def test_a_sweep_over_an_expression_says_so_below_the_table(proj):
    f = proj / "train.py"
    f.write_text(f.read_text().replace("SLEEP = 0.3 ", "SLEEP = 0.3 if DEPTH else 0.2 "))
    git(proj, "commit", "-qam", "an expression")
    r = rnd(proj, "round", "--k=1", "--sweep=SLEEP=0.31", "--tag=t", check=0)
    below = r.stdout[r.stdout.index("\nc1 "):]
    assert "note: train.py has SLEEP = 0.3 if DEPTH else 0.2; SWEEP SLEEP=0.31 replaced it on every profile" in below
    assert "note:" not in r.stderr  # said once, where the table is read


def test_crash_reason_reaches_results_tsv(proj):
    r = rnd(proj, "round", "--k=1", "--sweep=CRASH=True", "--tag=t", check=0)
    crash = rows(proj)[-1]
    assert crash["status"] == "crash" and crash["val_bpb"] == "0.000000"
    assert "torch.OutOfMemoryError: CUDA out of memory" in crash["description"]
    assert "no winner" in r.stdout


def test_metric_and_goal_are_settings(proj):
    score = 'print(f"score: {MATRIX_LR * 10:.3f}")\nprint("val_pass: 1")'
    t = TRAIN.replace('print(f"val_bpb:          {v:.6f}")', score)

    (proj / "train.py").write_text(t)
    git(proj, "commit", "-qam", "score fork")
    r = rnd(proj, "round", "--k=2", "--sweep=MATRIX_LR=0.03,0.06", "--tag=t", AR_METRIC="score",
            AR_METRIC_GOAL="max", check=0)
    assert "winner: c2" in r.stdout, r.stdout
    assert (proj / "results.tsv").read_text().startswith("commit\tscore\t")
    r = rnd(proj, "round", "--k=1", "--sweep=MATRIX_LR=0.07", "--tag=t")  # the file scores `score`
    assert r.returncode != 0 and "AR_METRIC" in r.stderr


@pytest.mark.parametrize("args, env, msg", [
    (["--k=0"], {}, "K must be"), (["--k=-1"], {}, "K must be"), (["--k=abc"], {}, "K must be"),
    (["--k=1000000"], {}, "K must be"), (["--k=2", "--backend=aws"], {}, "unknown BACKEND"),
    (["--k=2", "--tag=$(touch pwned)"], {}, "TAG"), (["--k=2", "--tag=a;b"], {}, "TAG"),
    (["--k=2", "--tag=it's"], {}, "TAG"), (["--k=1", "--sweep=MATRIX_LR=$(touch pwned)"], {}, "SWEEP value"),
    (["--k=1", "--sweep=MATRIX_LR=0.1;touch pwned"], {}, "SWEEP value"),
    (["--k=2", "--sweep=MATRIX_LR=0.1"], {}, "SWEEP makes 1 candidates but K=2"),
    (["--k=1", "--sweep=NOPE=1"], {}, "NOPE is not assigned"), (["--k=1", "--sweep=MATRIX_LR='x'"], {}, "(float)"),
    (["--k=1", "--detach=yes"], {}, "DETACH"), (["--k=1"], {"AR_BUDGET_USD": "ten"}, "AR_BUDGET_USD"),
    (["--k=1"], {"AR_METRIC_GOAL": "up"}, "AR_METRIC_GOAL"),
])
def test_hostile_and_bad_input_is_one_line_and_runs_nothing(proj, args, env, msg):
    r = rnd(proj, "round", "--tag=t", *args, **env) if not any(a.startswith("--tag") for a in args) \
        else rnd(proj, "round", *args, **env)
    assert r.returncode == 2, r.stderr
    assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (proj / "pwned").exists() and jobs(proj) == []


def test_make_passes_hostile_values_as_data(proj):
    shutil.copy2(REPO / "Makefile", proj / "Makefile")
    shutil.copy2(REPO / "pyproject.toml", proj / "pyproject.toml")
    (proj / ".venv").symlink_to(REPO / ".venv")
    r = subprocess.run(["make", "-s", "round", "K=$(touch pwned)", "BACKEND=x;touch pwned"], cwd=proj,
                       env=proj.env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "must be" in r.stderr, r.stderr
    assert not (proj / "pwned").exists() and jobs(proj) == []


def test_budget_fails_closed(proj):
    shutil.copytree(proj / "local", proj / "sky")  # a priced backend that runs locally
    git(proj, "add", "-A")
    git(proj, "commit", "-qm", "sky")
    r = rnd(proj, "round", "--k=2", "--sweep=MATRIX_LR=0.05,0.06", "--tag=t", "--backend=sky", AR_BUDGET_USD="1",
            AR_GPU="H100", check=1)
    assert "over budget" in r.stderr and "AR_BUDGET_USD $1.00" in r.stderr
    r = rnd(proj, "round", "--k=2", "--sweep=MATRIX_LR=0.05,0.06", "--tag=t", "--backend=sky", AR_BUDGET_USD="100",
            AR_GPU="TPUv9", check=1)
    assert "no price for sky/TPUv9" in r.stderr
    assert jobs(proj) == [] and not list((proj / ".ar/rounds/t").glob("r*.json"))


def alive(p):
    """The local jobs' processes that are still alive (their pid files name their process groups)."""
    out = []
    for f in (p / ".ar" / "local" / "jobs").glob("*/pid"):
        try:
            os.killpg(int(f.read_text()), 0)
            out.append(f.parent.name)
        except (ProcessLookupError, ValueError):
            pass
    return out


def wait_for(pred, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.2)
    return False


def ledger(p, name="r1"):
    return json.loads((p / ".ar" / "rounds" / "t" / f"{name}.json").read_text())


def test_sigint_cancels_every_job_and_the_same_command_restarts_them(proj):
    (proj / "train.py").write_text(TRAIN.replace("SLEEP = 0.3", "SLEEP = 600"))
    git(proj, "commit", "-qam", "slow")
    d = subprocess.Popen([sys.executable, "tools/round.py", "round", "--k=2", "--sweep=MATRIX_LR=0.05,0.06",
                          "--tag=t"], cwd=proj, env=proj.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: (proj / ".ar/rounds/t/r1.json").exists()
                    and all(c["job_id"] for c in ledger(proj)["candidates"]))
    time.sleep(1)
    d.send_signal(signal.SIGINT)
    out, err = d.communicate(timeout=60)
    assert d.returncode == 130, err
    assert ledger(proj)["status"] == "interrupted"
    assert wait_for(lambda: alive(proj) == [], 10)
    assert {x["status"] for x in rows(proj)} == {"crash"} and len(rows(proj)) == 4
    assert all("cancelled (interrupted)" in x["description"] for x in rows(proj))
    # the same command restarts the cancelled candidates as new attempts, after the slow part is fixed
    r = rnd(proj, "round", "--k=2", "--sweep=MATRIX_LR=0.05,0.06", "--tag=t", AR_TRAIN_CMD=f"{sys.executable} -c "
            "\"exec(open('train.py').read().replace('SLEEP = 600', 'SLEEP = 0'))\"", check=0)
    assert "resuming r1" in r.stderr and "winner: c1" in r.stdout
    assert len(jobs(proj)) == 8  # four cancelled + four new attempts (<name>-2)


def test_driver_killed_and_resumed_submits_nothing_twice(proj):
    (proj / "train.py").write_text(TRAIN.replace("SLEEP = 0.3", "SLEEP = 4"))
    git(proj, "commit", "-qam", "slower")
    d = subprocess.Popen([sys.executable, "tools/round.py", "round", "--k=2", "--sweep=MATRIX_LR=0.05,0.06",
                          "--tag=t"], cwd=proj, env=proj.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert wait_for(lambda: len(jobs(proj)) >= 2)
    d.kill()
    d.wait()
    r = rnd(proj, "round", "--tag=t", check=0)  # no K: resume what is unfinished
    assert "resuming r1" in r.stderr and "winner: c1" in r.stdout
    assert jobs(proj) == sorted(["ar-t-r1-c0", "ar-t-r1-c0b", "ar-t-r1-c1", "ar-t-r1-c2"])
    assert len(rows(proj)) == 4
    assert "another driver" not in r.stderr


def test_detached_round_status_wait_and_abandon(proj):
    r = rnd(proj, "round", "--k=1", "--sweep=MATRIX_LR=0.05", "--tag=t", "--detach=1", check=0)
    assert r.stdout.strip() == ".ar/rounds/t/r1.log"
    assert rnd(proj, "wait", "--tag=t", "--timeout=60", check=0).stdout.count("winner: c1") == 1
    # a slow round: status shows its driver, abandon stops it and frees the number
    (proj / "train.py").write_text(TRAIN.replace("SLEEP = 0.3", "SLEEP = 600"))
    git(proj, "commit", "-qam", "slow")
    branch(proj, "autoresearch/t-r2-c1", ("train.py", "DEPTH = 8 ", "DEPTH = 9 "), base="master")
    git(proj, "update-ref", "refs/heads/autoresearch/t", "master")
    rnd(proj, "round", "--k=1", "--tag=t", "--detach=1", check=0)
    assert wait_for(lambda: ledger(proj, "r2")["status"] == "running")
    assert rnd(proj, "wait", "--tag=t", "--timeout=1").returncode == 3
    st = rnd(proj, "status", "--tag=t", check=0).stdout
    assert "r2: running, driver running" in st and "ar-t-r2-c1" in st
    rnd(proj, "abandon", "--tag=t", check=0)
    assert (proj / ".ar/rounds/t/r2-abandoned.json").exists() and not (proj / ".ar/rounds/t/r2.json").exists()
    assert wait_for(lambda: alive(proj) == [], 10)
    assert {x["round"] for x in rows(proj)} == {"1", "2-abandoned"}
    assert "NOT running" not in rnd(proj, "status", "--tag=t", check=0).stdout


def test_baseline_repeats_are_real_reruns_and_pool_into_sigma(proj):
    rnd(proj, "round", "--k=1", "--sweep=MATRIX_LR=0.05", "--tag=t", check=0)
    r = rnd(proj, "baseline", "--repeats=3", "--tag=t", check=0)
    assert len({x["job_id"] for x in rows(proj)}) == len(rows(proj)) == 6
    assert "sigma" in r.stdout and "from 5 runs of 2 commit(s)" in r.stdout, r.stdout
    assert "next round: 2 (branches autoresearch/t-r2-c1.." in r.stdout, r.stdout
    assert "(4 run(s))" in rnd(proj, "status", "--tag=t", check=0).stdout


def test_real_trainer_k4_round_survives_a_killed_driver(tmp_path, ar_cache):
    """This project's trainer on the smoke profile, K=4 SWEEP, the driver killed with -9 mid-round and
    resumed: every job ran once, every result is recorded, the best branch reads the winner as code."""
    from conftest import local_repo

    repo, env = local_repo(tmp_path, AR_PROFILE="smoke", AR_CACHE_DIR=ar_cache)
    p = Project(repo)
    p.env = env
    cmd = [sys.executable, "tools/round.py", "round", "--k=4", "--sweep=MATRIX_LR=0.01,0.02,0.06,0.08", "--tag=t"]
    d = subprocess.Popen(cmd, cwd=p, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for(lambda: len(jobs(p)) >= 3, 120)
    d.kill()
    d.wait()
    r = subprocess.run(cmd, cwd=p, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    assert jobs(p) == ["ar-t-r1-c0", "ar-t-r1-c0b", "ar-t-r1-c1", "ar-t-r1-c2", "ar-t-r1-c3", "ar-t-r1-c4"]
    got = rows(p)
    assert len(got) == 6 and {x["status"] for x in got} <= {"keep", "discard"}, got
    assert all(float(x["val_bpb"]) > 0 and int(x["num_steps"]) > 0 for x in got)
    best = git(p, "show", "autoresearch/t:trainer/train.py")
    win = [x for x in got if x["status"] == "keep" and x["candidate"].startswith("c") and x["candidate"][1:].isdigit()
           and x["candidate"] != "c0"]
    if win:
        assert f"MATRIX_LR = {win[0]['description'].split('=')[1]}" in best
    else:
        assert "no winner" in r.stdout


def test_promote_reruns_the_top_commits_under_another_setting(proj):
    rnd(proj, "round", "--k=3", "--sweep=MATRIX_LR=0.05,0.055,0.09", "--tag=t", check=0)
    r = rnd(proj, "promote", "--top=2", "--tag=t", AR_GPU="H200", check=0)
    got = [x for x in rows(proj) if x["round"] == "p1"]
    assert [x["gpu"] for x in got] == ["H200", "H200"] and all(x["val_bpb"] != "0.000000" for x in got)
    assert got[0]["description"].startswith("promote: MATRIX_LR=0.05")
    assert got[1]["description"].startswith("promote: MATRIX_LR=0.055")
    assert "promote p1 of tag t on local/H200/default" in r.stdout


def test_a_checked_out_best_is_not_moved_under_your_feet(proj):
    git(proj, "switch", "-q", "-c", "autoresearch/t")
    r = rnd(proj, "round", "--k=1", "--sweep=MATRIX_LR=0.05", check=0)  # the tag comes from the branch
    sha = git(proj, "rev-parse", "refs/autoresearch/t/r1-c1")
    assert f"git merge --ff-only {sha[:10]}" in r.stdout and "NOT moved" in r.stdout
    assert git(proj, "rev-parse", "HEAD") == git(proj, "rev-parse", "master") and git(proj, "status", "--short") == ""


@pytest.mark.parametrize("name", ["sky", "vessl"])
def test_a_round_on_a_cloud_backend_double(tmp_path, name):
    """tools/ and a cloud recipe copied into a karpathy-layout project, driven by round.py against the
    backend's double (the same setup as the contract suite): every job that printed the block is scored,
    the crash reason of the failed one reaches results.tsv, and nothing is left running."""
    sys.path.insert(0, str(REPO / "tests" / "contract"))
    from contract_util import load_backends

    backend = load_backends()[name]
    p = Project(tmp_path / "autoresearch")
    p.mkdir()
    for d in ("tools", backend.FOLDER):
        shutil.copytree(REPO / d, p / d, ignore=shutil.ignore_patterns("__pycache__", "README.md"))
    (p / "train.py").write_text(TRAIN.replace("SLEEP = 0.3", "SLEEP = 0"))
    (p / ".gitignore").write_text(".ar/\nresults.tsv\n")
    extra, leftovers = backend.setup(tmp_path, p)
    p.env = clean_env(**GIT_ID, **extra)
    for cmd in (["git", "init", "-q", "-b", "master"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=p, env=p.env, check=True)
    r = rnd(p, "round", "--k=2", f"--backend={name}", "--tag=t", "--sweep=MATRIX_LR=0.05 CRASH=False,True",
            check=0)
    assert "winner: c1" in r.stdout, r.stdout + r.stderr
    got = rows(p)
    assert [(x["candidate"], x["status"]) for x in got] == [("c0", "keep"), ("c0b", "keep"), ("c1", "keep"),
                                                             ("c2", "crash")]
    assert {x["backend"] for x in got} == {name} and all(x["job_id"] for x in got)
    assert "torch.OutOfMemoryError: CUDA out of memory" in got[3]["description"]
    assert wait_for(lambda: leftovers() == [], 20), leftovers()
