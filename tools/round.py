#!/usr/bin/env python3
"""
tools/round.py -- the round driver: K candidate commits in parallel on a backend, keep the best.

    make round K=4 [BACKEND=local] [TAG=..] [SWEEP="MATRIX_LR=0.02,0.05"] [DETACH=1]   # round --k=4 ...
    make baseline REPEATS=4 [BACKEND=..] [TAG=..] [DETACH=1]   # run the best unchanged: measure the noise
    make status [TAG=..]        make round-wait [TAG=..] [TIMEOUT=100]
    python tools/round.py abandon [--tag T]        python tools/round.py promote --top 2 --backend sky

A round, step by step (each step a command you could run by hand):
  best        branch autoresearch/<tag>, created from HEAD on first use.
  candidates  K commits on top of the best that change only the train file (trainer/train.py, or
              train.py in the karpathy layout): the branches autoresearch/<tag>-r<N>-c1..c<K> you
              prepared, or with SWEEP="KNOB=v1,v2 ..." K commits the driver makes, each rewriting the
              knob's constant line (`MATRIX_LR = 0.05`); knobs separated by spaces multiply. A candidate
              that changes another file, changes nothing or already ran is refused before anything runs
              (all of them named at once).
  controls    the best, unchanged (c0, c0b) until it has two control runs under this setting (its
              winning run does not count): the noise is measured on every new best.
  submit      <recipe>/submit-async.sh --commit SHA --name ar-<tag>-r<N>-<cand> per job (the name makes
              a resubmit return the same job); the ledger .ar/rounds/<tag>/r<N>.json gets each id.
  wait        <recipe>/wait-jobs.sh ID... -> summary blocks -> tools/results.py -> rows in results.tsv.
  winner      the best score among the candidates (AR_METRIC, default val_bpb; AR_METRIC_GOAL min or
              max), kept when it beats the best's score (the mean of every run of the best commit under
              this setting) by more than the threshold: AR_MIN_DELTA, else 2 sigma, sigma pooled over
              the control runs of each commit (c0, c0b, make baseline's) under this setting. A
              candidate that trained more than 10% longer than the best is not kept; nor is any in a
              round without controls whose candidates all ran >25% more or >20% fewer steps than the
              best (the machine's load changed: they may run again after a baseline). The winner is
              fast-forwarded, so the best branch reads as plain code (a checked-out best is left
              alone: the table names the `git merge --ff-only` to run). Candidate branches move to
              refs/autoresearch/<tag>/r<N>-c<i>.
A setting is backend/gpu/profile (AR_GPU: a label for prices, default the local GPU, `cpu`, or H100 on
a cloud; AR_PROFILE, default `default`): runs of different settings are never compared.

Resume: the driver died? Run the same command again: it waits for the recorded jobs and submits the
rest under the same names, so nothing runs twice. Ctrl-C/SIGTERM cancels every job of the round (crash
rows, ledger `interrupted`); the same command restarts those candidates. One driver per tag at a time.
abandon stops the tag's driver, cancels its jobs and archives round N as r<N>-abandoned, so the next
round is N again. DETACH=1 checks everything in the foreground, then runs the driver in its own session
(log .ar/rounds/<tag>/r<N>.log) and returns; `round.py wait` exits 0 with the table once it is done,
3 while it runs, 1 if it ended unfinished (through `make round-wait`, make turns 3 and 1 into 2).
Budget: AR_BUDGET_USD refuses a round whose expected cost (tools/prices.yaml x the setting's mean job
time, else 300 s + overhead) does not fit what is left.
Exit: 0 done; 2 bad arguments or a refused candidate (nothing done); 1 refused at run time (budget,
another driver, an unfinished round) or failed; 3 `wait`: still running; 130 interrupted.
"""

import argparse
import ast
import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
_spec = importlib.util.spec_from_file_location("ar_results", HERE / "results.py")
R = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(R)

BACKENDS = {"local": "local", "vessl": "batch-job", "sky": "sky", "modal": "modal"}
TAG_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,19}$")
KNOB_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
STATE = REPO / ".ar" / "rounds"
RESULTS = REPO / "results.tsv"
METRIC = os.environ.get("AR_METRIC") or "val_bpb"
GOAL = os.environ.get("AR_METRIC_GOAL") or "min"
SIGN = 1 if GOAL == "min" else -1  # SIGN * (a - b) < 0: a is better than b
DETACHED = None  # in a detached driver: its driver.json


NOTES = []  # notes made while preparing the candidates, printed again below the table
NOT_COMPARED = " -- not compared: the machine's load changed"  # such a candidate may run again


class UsageError(Exception):
    """Bad arguments: one line, exit 2, nothing done."""


class RoundError(Exception):
    """Refused or failed at run time: one line, exit 1."""


class Interrupted(Exception):
    pass


def log(msg):
    print(f"round: {msg}", file=sys.stderr, flush=True)


def iso():
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ----------------------------------------------------------------------------------------------
# git
# ----------------------------------------------------------------------------------------------
def git(*args, check=True, input=None, env=None, cwd=REPO):
    p = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, input=input,
                       env={**os.environ, **(env or {})})
    if check and p.returncode:
        why = ((p.stderr or p.stdout).strip().splitlines() or ["no output"])[-1]
        raise RoundError(f"git {' '.join(args[:2])} failed: {why}")
    return p.stdout.strip() if check else p


def rev(ref):
    p = git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False)
    return p.stdout.strip() if p.returncode == 0 else None


def train_file(commit):
    for path in ("trainer/train.py", "train.py"):
        if git("cat-file", "-e", f"{commit}:{path}", check=False).returncode == 0:
            return path
    raise RoundError(f"commit {commit[:10]} has neither trainer/train.py nor train.py")


class _SameEitherWay(ast.NodeTransformer):
    def visit_IfExp(self, node):  # `0.6 if SMALL else 0.6` is the code `0.6`
        self.generic_visit(node)
        return node.body if ast.dump(node.body) == ast.dump(node.orelse) else node


def code_of(revs, path):
    """A fingerprint of the code of `path` at each revision, in one git call: the hash of its syntax tree,
    so comments and layout do not count (of its text where it does not parse); None where git lacks it."""
    out = subprocess.run(["git", "cat-file", "--batch"], cwd=REPO, capture_output=True,
                         input="".join(f"{r}:{path}\n" for r in revs).encode()).stdout
    prints, i = [], 0
    for _ in revs:
        end = out.index(b"\n", i)
        head = out[i:end].split()
        if len(head) != 3:  # `<rev>:<path> missing`
            prints.append(None)
            i = end + 1
            continue
        body, i = out[end + 1:end + 1 + int(head[2])], end + 2 + int(head[2])
        try:
            key = ast.dump(_SameEitherWay().visit(ast.parse(body))).encode()
        except (SyntaxError, ValueError):
            key = body
        prints.append(hashlib.sha256(key).hexdigest())
    return prints


@functools.cache
def identity():
    """commit-tree needs a name and an email; a machine without them still gets commits."""
    env = {}
    if git("config", "user.email", check=False).returncode:
        env.update(GIT_AUTHOR_EMAIL="autoresearch@localhost", GIT_COMMITTER_EMAIL="autoresearch@localhost")
    if git("config", "user.name", check=False).returncode:
        env.update(GIT_AUTHOR_NAME="autoresearch", GIT_COMMITTER_NAME="autoresearch")
    return env


def commit_file(parent, path, text, message):
    """A commit on `parent` whose `path` is `text`, made with plumbing: no checkout, no index of yours.
    Dated like its parent, so the same edit of the same best is the same commit (and is not run twice)."""
    blob = git("hash-object", "-w", "--stdin", input=text)
    date = git("log", "-1", "--format=%cI", parent)
    with tempfile.TemporaryDirectory() as d:
        env = {"GIT_INDEX_FILE": f"{d}/index"}
        git("read-tree", parent, env=env)
        git("update-index", "--cacheinfo", f"100644,{blob},{path}", env=env)
        tree = git("write-tree", env=env)
    return git("commit-tree", tree, "-p", parent, "-m", message,
               env={**identity(), "GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date})


def worktree_of(branch):
    """The worktree that has refs/heads/<branch> checked out, or None."""
    path = None
    for line in git("worktree", "list", "--porcelain").splitlines():
        if line.startswith("worktree "):
            path = line[9:]
        elif line == f"branch refs/heads/{branch}":
            return path
    return None


# ----------------------------------------------------------------------------------------------
# SWEEP: K commits, each rewriting knob constant lines of the train file
# ----------------------------------------------------------------------------------------------
def sweep_values(sweep, k):
    """'A=1,2 B=x,y' -> [{'A': '1', 'B': 'x'}, ...], the cartesian product; its size must be K."""
    axes = []
    for word in sweep.split():
        name, eq, values = word.partition("=")
        vals = values.split(",")
        if not eq or not KNOB_RE.fullmatch(name) or not all(vals) or name in dict(axes):
            raise UsageError(f"SWEEP word {word!r} must look like KNOB=v1,v2 (KNOB in capitals, once)")
        for v in vals:
            try:
                ok = isinstance(ast.literal_eval(v), (int, float, str, bool))
            except (ValueError, SyntaxError):
                ok = False
            if not ok:
                raise UsageError(f"SWEEP value {v!r} for {name} is not a Python number, string or bool literal")
        axes.append((name, vals))
    combos = [dict(zip([a[0] for a in axes], c, strict=True)) for c in itertools.product(*[a[1] for a in axes])]
    if len(combos) != k:
        raise UsageError(f"SWEEP makes {len(combos)} candidates but K={k}; give K={len(combos)} or other values")
    return combos


def set_constant(source, name, value, path):
    """source with the one module-level line `NAME = ...` changed to `NAME = value` (comment kept)."""
    hits = [n for n in ast.parse(source).body if isinstance(n, ast.Assign) and len(n.targets) == 1
            and isinstance(n.targets[0], ast.Name) and n.targets[0].id == name]
    if len(hits) != 1 or hits[0].value.lineno != hits[0].value.end_lineno:
        why = "is not assigned" if not hits else "is assigned more than once" if len(hits) > 1 else "spans lines"
        raise UsageError(f"SWEEP knob {name} {why} as a one-line module constant in {path}")
    node = hits[0]
    old = ast.get_source_segment(source, node.value)
    try:
        a, b = ast.literal_eval(old), ast.literal_eval(value)
    except (ValueError, SyntaxError):  # an expression (`2 if SMALL else 8`): the value replaces all of it
        note = f"{path} has {name} = {old}; SWEEP {name}={value} replaced it on every profile"
        if note not in NOTES:  # a grid sets each value in several candidates; printed below the table
            NOTES.append(note)
    else:
        if type(a) is not type(b) and not {type(a), type(b)} <= {int, float}:
            raise UsageError(f"SWEEP {name}={value}: {path} has {name} = {old} ({type(a).__name__})")
    lines = source.splitlines(keepends=True)
    line = lines[node.lineno - 1].encode()
    s, e = node.value.col_offset, node.value.end_col_offset  # byte offsets
    lines[node.lineno - 1] = (line[:s] + value.encode() + line[e:]).decode()
    return "".join(lines)


# ----------------------------------------------------------------------------------------------
# settings, noise, budget
# ----------------------------------------------------------------------------------------------
def positive(name, raw, lo=0.0):
    raw = (raw or "").strip()
    if not raw:
        return None
    try:
        x = float(raw)
    except ValueError:
        x = float("nan")
    if not math.isfinite(x) or x < lo:
        raise UsageError(f"{name}={raw!r} must be a number >= {lo:g}")
    return x


def setting(backend):
    gpu = os.environ.get("AR_GPU", "").strip()
    if not gpu and backend == "local":
        p = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                           text=True) if shutil.which("nvidia-smi") else None
        gpu = (p.stdout.splitlines() or ["cpu"])[0].strip() if p and p.returncode == 0 else "cpu"
    return dict(backend=backend, gpu=gpu or "H100", profile=os.environ.get("AR_PROFILE", "").strip() or "default")


def rows_of(st, tag=None):
    """results.tsv rows of this setting (and tag)."""
    return [r for r in R.read_rows(RESULTS, METRIC) if all(r[k] == st[k] for k in st) and (not tag or r["tag"] == tag)]


def counted(r):
    """A scored row that compares: not one from a round the machine's load made incomparable."""
    return r.score is not None and NOT_COMPARED not in r["description"]


def best_score(st, tag, commit):
    """(mean score, number of runs, mean training_seconds, mean num_steps) of the best commit under this setting."""
    runs = [r for r in rows_of(st, tag) if counted(r) and commit.startswith(r["commit"])]
    mean = lambda xs: sum(xs) / len(xs) if xs else None
    of = lambda key: mean([v for r in runs if (v := R.number(r[key]))])
    return mean([r.score for r in runs]), len(runs), of("training_seconds"), of("num_steps")


def noise(st):
    """(sigma, runs, commits): the standard deviation pooled over the control runs (c0, c0b, base<i>) of
    each commit. A winner's own run is left out: it was picked for being low, and it ran in another round."""
    groups = {}
    for r in rows_of(st):
        if r.score is not None and R.CONTROL.fullmatch(r["candidate"]):
            groups.setdefault(r["commit"], []).append(r.score)
    groups = [g for g in groups.values() if len(g) > 1]
    dof = sum(len(g) - 1 for g in groups)
    if not dof:
        return None, 0, 0
    ss = sum((x - sum(g) / len(g)) ** 2 for g in groups for x in g)
    return math.sqrt(ss / dof), sum(map(len, groups)), len(groups)


def threshold(st):
    """(threshold, the sentence that says where it comes from)."""
    delta = positive("AR_MIN_DELTA", os.environ.get("AR_MIN_DELTA"))
    if delta is not None:
        return delta, f"threshold {delta:g} (AR_MIN_DELTA)"
    sigma, n, c = noise(st)
    if sigma is None:
        return 0.0, "threshold 0: NOISE NOT MEASURED (no commit has two runs yet; make baseline REPEATS=4)"
    rough = " -- rough, make baseline REPEATS=4 to firm it up" if n - c < 3 else ""
    return 2 * sigma, f"threshold {2 * sigma:.6f} = 2 sigma, sigma {sigma:.6f} from {n} runs of {c} commit(s){rough}"


@functools.cache
def prices():
    import yaml

    try:
        data = yaml.safe_load((HERE / "prices.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise RoundError(f"cannot read tools/prices.yaml: {e}") from None
    return data.get("prices") or {}, data.get("overhead_s") or {}


def price_of(st):
    """USD per GPU-hour for this setting (longest matching GPU key first), or None."""
    table = prices()[0].get(st["backend"]) or {}
    for key in sorted(table, key=len, reverse=True):
        if key != "default" and key.lower() in st["gpu"].lower():
            return float(table[key])
    return float(table["default"]) if "default" in table else None


def expected_usd(st):
    price = price_of(st)
    walls = [R.number(r["wall_s"]) for r in rows_of(st) if R.number(r["wall_s"])]
    secs = sum(walls) / len(walls) if walls else 300 + float(prices()[1].get(st["backend"], 0))
    return None if price is None else secs / 3600 * price


def check_budget(st, n_jobs):
    budget = positive("AR_BUDGET_USD", os.environ.get("AR_BUDGET_USD"))
    if budget is None:
        return
    per_job = expected_usd(st)
    if per_job is None:
        raise RoundError(f"AR_BUDGET_USD is set but tools/prices.yaml has no price for {st['backend']}/{st['gpu']}; "
                         "add one (the budget fails closed)")
    spent = sum(R.number(r["cost_usd"]) or 0 for r in R.read_rows(RESULTS, METRIC))
    pending = sum(1 for _, led in unfinished_ledgers() for c in led["candidates"] if c["job_id"] and not c["result"])
    need = spent + (pending + n_jobs) * per_job
    if need > budget:
        raise RoundError(f"over budget: spent ${spent:.2f} + {pending} running + {n_jobs} new job(s) x ${per_job:.2f} "
                         f"= ${need:.2f} > AR_BUDGET_USD ${budget:.2f}")


# ----------------------------------------------------------------------------------------------
# ledger, lock, detached driver
# ----------------------------------------------------------------------------------------------
def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise RoundError(f"{path} is not valid JSON ({e}); fix or remove it") from None


def ledgers(tag, prefix):
    """[(N, path)] of a tag's r<N>.json or b<N>.json/p<N>.json, ascending."""
    d = STATE / tag
    found = [(int(m[1]), p) for p in (d.iterdir() if d.is_dir() else [])
             if (m := re.fullmatch(rf"{prefix}(\d+)\.json", p.name))]
    return sorted(found)


def next_n(tag, prefix):
    """N of a tag's next round (r), baseline (b) or promote (p): an abandoned N is free again."""
    return max([m for m, _ in ledgers(tag, prefix)] + [0]) + 1


def unfinished_ledgers(tag=None):
    tags = [tag] if tag else [d.name for d in STATE.iterdir() if d.is_dir()] if STATE.is_dir() else []
    return [(p, led) for t in tags for pre in "rbp" for _, p in ledgers(t, pre)
            if (led := read_json(p)) and led["status"] not in ("done", "abandoned")]


def lock_holder(tag):
    """None when no driver holds the tag's lock, else the pid written in it (a driver killed with -9
    loses its lock: the kernel drops it)."""
    try:
        fd = os.open(STATE / tag / "lock", os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        words = os.pread(fd, 32, 0).decode().split()
        return int(words[0]) if words and words[0].isdigit() else 0
    finally:
        os.close(fd)


@contextlib.contextmanager
def tag_lock(tag):
    (STATE / tag).mkdir(parents=True, exist_ok=True)
    if not (STATE.parent / ".gitignore").exists():  # keeps .ar/ out of git status, whatever the backend
        (STATE.parent / ".gitignore").write_text("*\n")
    fd = os.open(STATE / tag / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for attempt in range(20):  # `make status` probes the lock for microseconds
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == 19:
                    pid = os.pread(fd, 32, 0).decode().strip()
                    raise RoundError(f"another driver (pid {pid}) is running on tag {tag}; `make status TAG={tag}` "
                                     f"shows it, `make round-wait TAG={tag}` waits for it") from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield fd
    finally:
        os.close(fd)


def detach(path, lock_fd, command):
    """Fork into a new session (an agent shell that kills its command's group does not reach it), output
    appended to <ledger>.log, the lock kept. True in the foreground (which prints the log path)."""
    global DETACHED
    logf = path.with_suffix(".log")
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(w)
        if os.read(r, 1) != b"1":
            raise RoundError(f"the detached driver (pid {pid}) did not start; see {logf}")
        log(f"{path.stem} runs detached (pid {pid}); `make round-wait TAG={path.parent.name}` waits for it")
        print(logf.relative_to(REPO))
        return True
    os.close(r)
    os.setsid()
    out = os.open(logf, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.pwrite(lock_fd, f"{os.getpid()}\n".encode().ljust(16), 0)
    DETACHED = path.parent / "driver.json"
    write_json(DETACHED, dict(pid=os.getpid(), ledger=path.name, log=str(logf.relative_to(REPO)), command=command))
    print(f"=== {iso()} detached driver pid {os.getpid()}: {command} ===", flush=True)
    os.write(w, b"1")
    os.close(w)
    return False


def finish_detached(rc, error):
    if DETACHED:
        rec = read_json(DETACHED) or {}
        write_json(DETACHED, {**rec, "rc": rc, "error": error, "finished": iso()})


class Signals:
    """SIGINT/SIGTERM -> Interrupted; while wait-jobs.sh runs, forwarded to it as SIGTERM (it cancels
    the jobs and prints their blocks) and raised once it has returned."""

    def __init__(self):
        self.pending, self.child, self.defer = None, None, False

    def __enter__(self):
        self.old = {s: signal.signal(s, self.handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)

    def handler(self, signum, frame):
        self.pending = signum
        if self.child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.child.pid, signal.SIGTERM)
        elif not self.defer:  # deferred while a submit runs: its job id must reach the ledger
            raise Interrupted(signum)

    def check(self):
        if self.pending:
            raise Interrupted(self.pending)


# ----------------------------------------------------------------------------------------------
# the backend, through the contract only
# ----------------------------------------------------------------------------------------------
class Backend:
    def __init__(self, name):
        self.name, self.dir = name, REPO / BACKENDS[name]
        if not (self.dir / "submit-async.sh").is_file():
            raise UsageError(f"backend {name}: {self.dir}/submit-async.sh not found; copy the {BACKENDS[name]}/ "
                             f"recipe next to tools/")

    def run(self, script, *args, **kw):
        return subprocess.run(["bash", str(self.dir / script), *args], cwd=REPO, text=True, capture_output=True,
                              start_new_session=True, **kw)

    def submit(self, commit, name):
        p = self.run("submit-async.sh", "--commit", commit, "--name", name)
        out = p.stdout.split()
        if p.returncode or len(out) != 1 or not ID_RE.fullmatch(out[0]):
            why = (p.stderr.strip().splitlines() or ["no output"])[-1]
            raise RoundError(f"{self.name}/submit-async.sh {name}: exit {p.returncode}: {why}")
        return out[0]

    def cancel(self, ids):
        for i in ids:  # one by one: an id the backend no longer knows must not stop the others' cancel
            p = self.run("cancel-jobs.sh", i)
            if p.returncode:
                log(f"warning: cancel-jobs.sh {i}: exit {p.returncode}: {p.stderr.strip()[-200:]}")

    def wait(self, ids, sig, on_block):
        proc = subprocess.Popen(["bash", str(self.dir / "wait-jobs.sh"), *ids], cwd=REPO, text=True,
                                stdout=subprocess.PIPE, start_new_session=True, errors="replace")
        sig.child, chunk = proc, []
        try:
            for line in proc.stdout:
                if R.HEADER.match(line.rstrip("\n")) and chunk:
                    on_block("".join(chunk))
                    chunk = []
                chunk.append(line)
            if chunk:
                on_block("".join(chunk))
            return proc.wait()
        finally:
            sig.child = None
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()


# ----------------------------------------------------------------------------------------------
# a round
# ----------------------------------------------------------------------------------------------
def int_arg(name, raw, lo, hi):
    raw = (raw or "").strip()
    if not re.fullmatch(r"[0-9]{1,6}", raw) or not lo <= int(raw) <= hi:
        raise UsageError(f"{name} must be a whole number from {lo} to {hi}, not {raw!r}")
    return int(raw)


def tag_arg(raw):
    if not raw:
        head = git("symbolic-ref", "--short", "-q", "HEAD", check=False).stdout.strip()
        m = re.fullmatch(r"autoresearch/([a-z0-9][a-z0-9-]{0,19}?)(-r\d+-c\d+)?", head)
        return m[1] if m else "default"
    if not TAG_RE.fullmatch(raw):
        raise UsageError(f"TAG {raw!r} must match ^[a-z0-9][a-z0-9-]{{0,19}}$")
    return raw


def common(args):
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", METRIC, re.I) or GOAL not in ("min", "max"):
        raise UsageError(f"AR_METRIC={METRIC!r} must be a summary key and AR_METRIC_GOAL={GOAL!r} min or max")
    backend = args.backend or "local"
    if backend not in BACKENDS:
        raise UsageError(f"unknown BACKEND {backend!r}; use one of {', '.join(BACKENDS)}")
    if (args.detach or "0") not in ("0", "1"):
        raise UsageError(f"DETACH must be 1 or 0, not {args.detach!r}")
    for name in ("AR_BUDGET_USD", "AR_MIN_DELTA"):
        positive(name, os.environ.get(name))
    tag = tag_arg(args.tag)
    if rev("HEAD") is None:
        raise RoundError("the repository has no commits yet; commit your train file first")
    return tag, Backend(backend), setting(backend)


def candidates(tag, n, k, sweep, best, st):
    """[(label, commit, description)] for round n, checked against the rules of the game."""
    path = train_file(best)
    branches = [f"autoresearch/{tag}-r{n}-c{i}" for i in range(1, k + 1)]
    have = [b for b in branches if rev(f"refs/heads/{b}")]
    if sweep and have:
        raise UsageError(f"SWEEP given but {have[0]} exists; delete the prepared branches (git branch -D "
                         f"{' '.join(have)}) or drop SWEEP")
    if sweep:
        source, made = git("show", f"{best}:{path}", check=False).stdout, []  # raw: its last newline too
        for combo in sweep_values(sweep, k):
            text = source
            for name, value in combo.items():
                text = set_constant(text, name, value, path)
            desc = " ".join(f"{a}={b}" for a, b in combo.items())
            made.append((f"SWEEP {desc}", commit_file(best, path, text, f"sweep: {desc}"), desc))
    elif len(have) < k:
        missing = [b for b in branches if b not in have]
        raise UsageError(f"missing candidate branch(es) {', '.join(missing)}: create each from autoresearch/{tag} "
                         f"(git switch -c {missing[0]} autoresearch/{tag}; edit {path}; commit), or use SWEEP=")
    else:
        made = [(b, rev(f"refs/heads/{b}"), git("log", "-1", "--format=%s", b)[:100]) for b in branches]
        if rev(f"refs/heads/autoresearch/{tag}-r{n}-c{k + 1}"):
            log(f"warning: autoresearch/{tag}-r{n}-c{k + 1} exists but K={k}; it is not part of this round "
                "(rename it for the next round, or delete it)")
    ran = [r["commit"] for r in rows_of(st, tag) if counted(r)]
    ran = dict(zip(code_of(ran, path), ran, strict=True))  # the same code, whatever the commit or comments
    best_code, *codes = code_of([best] + [sha for _, sha, _ in made], path)
    bad = []  # every refused candidate at once, one line each
    for (what, sha, _), code in zip(made, codes, strict=True):
        files = git("diff", "--name-only", best, sha).split()
        if git("merge-base", "--is-ancestor", best, sha, check=False).returncode:
            bad.append(f"{what} does not contain the best autoresearch/{tag} ({best[:10]}); rebase it on it")
        elif [f for f in files if f != path]:
            bad.append(f"{what} changes {', '.join(f for f in files if f != path)}: a candidate may change "
                       f"only {path} (the rest is the fixed harness)")
        elif not files:
            bad.append(f"{what} changes nothing (an empty commit, or the edit is not committed; a SWEEP value "
                       "must differ from the best's)")
        elif code == best_code:
            bad.append(f"{what} is the best's own value, written another way: the same code is no new candidate"
                       if what.startswith("SWEEP") else
                       f"{what} changes only comments or layout of {path}: the same code is no new candidate")
        elif code in ran:
            bad.append(f"{what} is the code of commit {ran[code]}, which already ran on tag {tag}; results.tsv "
                       "has its score")
    if bad:
        raise UsageError("\nround: error: ".join(bad))
    return [(f"c{i}", sha, desc) for i, (_, sha, desc) in enumerate(made, 1)]


def new_ledger(kind, tag, n, backend, st, spec, best, cands):
    pre = {"round": "r", "baseline": "b", "promote": "p"}[kind]
    return dict(kind=kind, tag=tag, n=n, label=f"{pre}{n}" if kind != "round" else str(n), spec=spec,
                backend=backend.name, setting=st, best=best, status="submitting", started=iso(), plan_notes=NOTES,
                candidates=[dict(label=lb, commit=c, description=d, name=f"ar-{tag}-{pre}{n}-{lb}", job_id=None,
                                 result=None) for lb, c, d in cands])


def controls(st, tag, best):
    """c0 and c0b until the best has two control runs under this setting: a winner's own run does not count
    (it was picked for being low), so the noise is measured on every new best."""
    runs = [r for r in rows_of(st, tag) if r.score is not None and best.startswith(r["commit"])
            and R.CONTROL.fullmatch(r["candidate"])]
    return [(lb, best, "control: the best, unchanged") for lb in ["c0", "c0b"][:max(0, 2 - len(runs))]]


def submit_all(path, led, backend, sig):
    for c in led["candidates"]:
        if c["job_id"] or c["result"]:
            continue
        sig.check()
        c["submitted"], sig.defer = time.time(), True
        try:
            c["job_id"] = backend.submit(c["commit"], c["name"])  # the name makes a repeat return the same job
        finally:
            sig.defer = False
            write_json(path, led)
        log(f"{c['label']}: {c['job_id']} submitted ({c['description']})")
    led["status"] = "running"
    write_json(path, led)


def wait_all(path, led, backend, sig):
    todo = {c["job_id"]: c for c in led["candidates"] if c["job_id"] and not c["result"]}
    if not todo:
        return

    def on_block(text):
        for rec in R.parse(text, METRIC):
            c = todo.get(rec["job_id"])
            if c is not None:
                c["result"], c["ended"] = rec, time.time()
                write_json(path, led)
                log(f"{c['label']}: {rec['state']} {rec['reason'] or rec['value']}")

    rc = backend.wait(list(todo), sig, on_block)
    sig.check()
    if rc not in (0, 1) or any(not c["result"] for c in todo.values()):
        raise RoundError(f"{backend.name}/wait-jobs.sh exit {rc} without a result for every job; run the same "
                         "command again to resume")


def cancel_unfinished(path, led, backend, why):
    """Cancel every job without a result, record crash rows (their time was paid) and forget their ids so a
    rerun starts them again."""
    todo = [c for c in led["candidates"] if c["job_id"] and (c["result"] or {}).get("state") in (None, "cancelled")]
    backend.cancel([c["job_id"] for c in todo])
    rec = lambda: dict(summary={}, value=None, reason=f"cancelled ({why})")
    R.append_rows(RESULTS, [row(led, {**c, "result": rec()}, "crash") for c in todo], METRIC)
    for c in todo:  # a cancelled job is restarted by the next run of the same command
        c["job_id"] = c["result"] = None
    write_json(path, led)
    return len(todo)


def row(led, c, status):
    st, res = led["setting"], c["result"]
    wall = (c.get("ended") or time.time()) - c.get("submitted", time.time())
    total = R.number(res["summary"].get("total_seconds"))
    if total is not None:
        wall = min(wall, total + float(prices()[1].get(st["backend"], 0)))
    return R.make_row(res, METRIC, commit=c["commit"][:7], status=status, description=c["description"],
                      tag=led["tag"], round=led["label"], candidate=c["label"], job_id=c["job_id"] or "",
                      **st, wall_s=f"{wall:.0f}", cost_usd=f"{wall / 3600 * (price_of(st) or 0):.4f}")


def decide(led):
    """Statuses, the winner and the numbers the table prints; stored in the ledger (idempotent)."""
    st, tag = led["setting"], led["tag"]
    cands = led["candidates"]
    ctrl = [c for c in cands if c["commit"] == led["best"]]
    for c in cands:
        c["status"] = "crash" if c["result"]["value"] is None else "keep" if c in ctrl else "discard"
    rows = [row(led, c, c["status"]) for c in ctrl]
    R.append_rows(RESULTS, rows, METRIC)  # the controls count in the best's score and the noise
    score, runs, secs, best_steps = best_score(st, tag, led["best"])
    thr, why = threshold(st)
    led.update(best_score=score, best_runs=runs, threshold=thr, threshold_why=why, winner=None,
               notes=list(led.get("plan_notes", [])))
    steps = [x for c in cands if c not in ctrl and (x := R.number(c["result"]["summary"].get("num_steps")))]
    moved = (led["kind"] == "round" and not ctrl and best_steps and len(steps) > 1
             and (max(steps) < 0.8 * best_steps or min(steps) > 1.25 * best_steps))  # all slower or all faster
    if moved:  # the machine's load changed since the best ran: no score here compares with the best's
        led["notes"].append(f"no winner kept: every candidate ran {'fewer' if max(steps) < best_steps else 'more'} "
                            f"steps ({min(steps):.0f}-{max(steps):.0f}) than the best's runs ({best_steps:.0f} on "
                            "average) and no control ran, so the machine's load changed and no score compares with "
                            "the best's; run make baseline REPEATS=4, then these candidates may run again (their "
                            f"commits are refs/autoresearch/{tag}/r{led['n']}-c<i>, or the same SWEEP)")
    ok = []
    for c in cands if led["kind"] == "round" else []:  # a candidate that trained longer is never kept
        t = R.number(c["result"]["summary"].get("training_seconds"))
        if c["status"] == "discard" and secs and t and t > 1.1 * secs + 2:
            if "over the budget" not in c["description"]:
                c["description"] += f" -- not kept: trained {t:.0f} s, the best {secs:.0f} s (over the budget)"
            led["notes"].append(f"{c['label']} trained {t:.0f} s, the best {secs:.0f} s: over the budget, so its "
                                "score is not comparable and it is never kept")
        elif c["status"] == "discard" and moved:
            if NOT_COMPARED not in c["description"]:
                c["description"] += NOT_COMPARED
        elif c["status"] == "discard":
            ok.append(c)
    for c in sorted(ok, key=lambda c: SIGN * c["result"]["value"]):
        if score is None or SIGN * (c["result"]["value"] - score) < -thr:
            c["status"], led["winner"] = "keep", c["label"]
            if score is None:
                led["notes"].append("the best has no score under this setting (its controls crashed): "
                                    "the best candidate is kept without a comparison")
            mine = R.number(c["result"]["summary"].get("num_steps"))
            if best_steps and mine and abs(mine - best_steps) > 0.25 * best_steps:
                led["notes"].append(f"the winner ran {mine:.0f} steps, the old best {best_steps:.0f}: the noise "
                                    "may have changed; the next round's two controls measure it")
        break
    R.append_rows(RESULTS, [row(led, c, c["status"]) for c in cands if c not in ctrl], METRIC)


def advance(led):
    """Fast-forward the best branch to the winner; park the round's candidate branches under refs/."""
    tag, n = led["tag"], led["n"]
    win = next((c for c in led["candidates"] if c["label"] == led.get("winner")), None)
    for c in led["candidates"] if led["kind"] == "round" else []:
        if c["commit"] != led["best"]:
            git("update-ref", f"refs/autoresearch/{tag}/r{n}-{c['label']}", c["commit"])
            b = f"autoresearch/{tag}-r{n}-{c['label']}"
            if rev(f"refs/heads/{b}") == c["commit"] and not worktree_of(b):
                git("update-ref", "-d", f"refs/heads/{b}")
    if not win or rev(f"refs/heads/autoresearch/{tag}") == win["commit"]:
        return
    where = worktree_of(f"autoresearch/{tag}")
    if where is None:
        git("update-ref", f"refs/heads/autoresearch/{tag}", win["commit"], led["best"])
    else:  # moving a checked-out branch would leave its files behind: the person decides
        led["notes"].append(f"autoresearch/{tag} is checked out in {where}, so it was not moved: adopt the winner "
                            f"there with git merge --ff-only {win['commit'][:10]}")


def report(led):
    st, tag, score = led["setting"], led["tag"], led.get("best_score")
    what = {"round": f"round {led['n']}", "baseline": f"baseline {led['label']}", "promote": f"promote {led['label']}"}
    won = any(r["status"] == "keep" and not R.CONTROL.fullmatch(r["candidate"]) and led["best"].startswith(r["commit"])
              for r in rows_of(st, tag))  # which idea the best is: a winner's subject, or where the tag began
    subject = git("log", "-1", "--format=%s", led["best"]) if won else "the code the tag started from"
    subject = subject if len(subject) <= 60 else subject[:57].rstrip() + "..."
    print(f"{what[led['kind']]} of tag {tag} on {st['backend']}/{st['gpu']}/{st['profile']}: best "
          f"{led['best'][:7]} ({subject}) {METRIC} {'-' if score is None else f'{score:.6f}'} "
          f"(mean of {led.get('best_runs', 0)} run(s)); {led.get('threshold_why', '')}")
    body = []
    for c in led["candidates"]:
        res = c["result"] or {}
        v = res.get("value")
        delta = "-" if v is None or score is None or c["commit"] == led["best"] else f"{v - score:+.6f}"
        desc = c["description"]
        if c.get("status") == "crash":  # the reason in full: it is what the agent needs
            desc = f"{desc[:60]} -- crash: {res.get('reason')}"
        body.append([c["label"], c["job_id"] or "-", res.get("state", "-"), "-" if v is None else f"{v:.6f}", delta,
                     res.get("summary", {}).get("num_steps", "-"), c.get("status", "-"), desc[:160]])
    print(R.table(["cand", "job_id", "state", METRIC, "delta", "steps", "status", "description"], body))
    for note in led.get("notes", []):
        print(f"note: {note}")
    if led["kind"] == "round":
        w = next((c for c in led["candidates"] if c["label"] == led.get("winner")), None)
        moved = w and rev(f"refs/heads/autoresearch/{tag}") == w["commit"]
        print(f"winner: {w['label']} {w['result']['value']:.6f} -> autoresearch/{tag} "
              f"{'now at' if moved else 'NOT moved (see the note); the winner is'} {w['commit'][:10]}" if w
              else f"no winner: autoresearch/{tag} stays at {led['best'][:10]}")
    if led["kind"] != "promote":  # a baseline is followed by the round after the last one
        nxt = led["n"] + 1 if led["kind"] == "round" else next_n(tag, "r")
        print(f"next round: {nxt} (branches autoresearch/{tag}-r{nxt}-c1.. from autoresearch/{tag}, or SWEEP=...)")


def run(path, led, backend, sig):
    """Submit what has no job yet, wait, decide, record, advance. Ctrl-C cancels every job."""
    try:
        submit_all(path, led, backend, sig)
        wait_all(path, led, backend, sig)
    except (Interrupted, RoundError) as e:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # finish the cancel even on a second Ctrl-C
        n = cancel_unfinished(path, led, backend, "interrupted" if isinstance(e, Interrupted) else "driver error")
        led["status"] = "interrupted"
        write_json(path, led)
        log(f"cancelled {n} job(s); {path.stem} marked interrupted: the same command restarts them")
        raise
    led["status"] = "finalizing"
    write_json(path, led)
    decide(led)
    advance(led)
    led.update(status="done", finished=iso())
    write_json(path, led)
    report(led)


def start(args, kind, make_cands, spec, given=True):
    """The shared skeleton of round, baseline and promote: lock, resume or new ledger, detach, run."""
    tag, backend, st = common(args)
    with tag_lock(tag) as fd:
        open_ = unfinished_ledgers(tag)
        if open_:
            path, led = open_[0]
            if led["kind"] != kind or (given and spec != led["spec"]):
                raise RoundError(f"{path.stem} of tag {tag} is unfinished ({led['status']}); run "
                                 f"{rerun(led)} to resume it, or python tools/round.py abandon --tag {tag}")
            backend = Backend(led["backend"])
            log(f"resuming {path.stem} ({led['status']}): "
                f"{sum(1 for c in led['candidates'] if c['job_id'] or c['result'])} job(s) recorded")
            check_budget(led["setting"], sum(1 for c in led["candidates"] if not c["job_id"] and not c["result"]))
        else:
            pre = {"round": "r", "baseline": "b", "promote": "p"}[kind]
            n = next_n(tag, pre)
            best = rev(f"refs/heads/autoresearch/{tag}")
            cands = make_cands(tag, n, best or rev("HEAD"), st)
            check_budget(st, len(cands))
            if best is None:
                best = rev("HEAD")
                git("update-ref", f"refs/heads/autoresearch/{tag}", best, "0" * 40)
                log(f"created the best branch autoresearch/{tag} at HEAD {best[:10]}")
            led = new_ledger(kind, tag, n, backend, st, spec, best, cands)
            path = STATE / tag / f"{pre}{n}.json"
            write_json(path, led)
        if args.detach == "1" and detach(path, fd, rerun(led)):
            return 0
        with Signals() as sig:
            try:
                run(path, led, backend, sig)
            except BaseException as e:
                finish_detached(130 if isinstance(e, Interrupted) else 1, str(e) or type(e).__name__)
                raise
        finish_detached(0, None)
    return 0


def rerun(led):
    s, t = led["spec"], led["tag"]
    base = {"round": f"make round K={s.get('k')}" + (f' SWEEP="{s["sweep"]}"' if s.get("sweep") else ""),
            "baseline": f"make baseline REPEATS={s.get('repeats')}",
            "promote": f"python tools/round.py promote --top {s.get('top')} --backend {led['backend']}"}[led["kind"]]
    return base + (f" TAG={t} BACKEND={led['backend']}" if led["kind"] != "promote" else f" --tag {t}")


def cmd_round(args):
    k = int_arg("K", args.k, 1, 64) if args.k else None
    sweep = " ".join((args.sweep or "").split())
    if sweep and k:
        sweep_values(sweep, k)  # syntax and count before anything else
    spec = dict(k=k, sweep=sweep)  # without K: resume whatever round is unfinished

    def make(tag, n, best, st):
        if not k:
            raise UsageError("K is required for a new round (e.g. make round K=4)")
        return controls(st, tag, best) + candidates(tag, n, k, sweep, best, st)
    return start(args, "round", make, spec, given=bool(k))


def cmd_baseline(args):
    reps = int_arg("REPEATS", args.repeats or "4", 1, 64)
    make = lambda tag, n, best, st: [(f"base{i}", best, "control: the best, unchanged") for i in range(1, reps + 1)]
    rc = start(args, "baseline", make, dict(repeats=reps), given=bool(args.repeats))
    st = setting(args.backend or "local")
    if args.detach != "1":
        print(threshold(st)[1])
    return rc


def cmd_promote(args):
    top = int_arg("--top", args.top, 1, 16)

    def make(tag, n, best, st):
        scored = [r for r in R.read_rows(RESULTS, METRIC) if r["tag"] == tag and r.score is not None
                  and any(r[x] != st[x] for x in st)]
        picked = {}
        for r in sorted(scored, key=lambda r: SIGN * r.score):
            picked.setdefault(r["commit"], r)
        full = {c[:7]: c for c in git("rev-list", "--all").split()}
        out = [(f"c{i}", full[r["commit"]], f"promote: {r['description'][:60]} ({r.score:.4f} on "
                f"{r['backend']}/{r['gpu']})") for i, r in enumerate(list(picked.values())[:top], 1)
               if r["commit"] in full]
        if not out:
            raise RoundError(f"no scored commit of tag {tag} under another setting than {st} to promote")
        return out
    return start(args, "promote", make, dict(top=top))


# ----------------------------------------------------------------------------------------------
# status, wait, abandon
# ----------------------------------------------------------------------------------------------
def last_ledger(tag):
    found = [(p.stat().st_mtime, p) for pre in "rbp" for _, p in ledgers(tag, pre)]
    return read_json(max(found)[1]) if found else None


def cmd_status(args):
    tags = sorted(d.name for d in STATE.iterdir() if d.is_dir()) if STATE.is_dir() else []
    tags = [tag_arg(args.tag)] if args.tag else tags
    for tag in tags:
        pid = lock_holder(tag)
        for path, led in unfinished_ledgers(tag):
            print(f"{tag} {path.stem}: {led['status']}, driver " + (f"running (pid {pid})" if pid is not None else
                  f"NOT running: `{rerun(led)}` resumes it, `python tools/round.py abandon --tag {tag}` drops it"))
            for c in led["candidates"]:
                state = (c["result"] or {}).get("state") or ("submitted" if c["job_id"] else "not submitted")
                print(f"  {c['label']:5} {c['job_id'] or '-':28} {state:13} {c['description'][:60]}")
        st = (last_ledger(tag) or {}).get("setting")
        if st:
            score, runs, _, _ = best_score(st, tag, rev(f"refs/heads/autoresearch/{tag}") or "-")
            print(f"{tag}: best autoresearch/{tag} {METRIC} {'-' if score is None else f'{score:.6f}'} "
                  f"({runs} run(s)); {threshold(st)[1]}")
    if not tags:
        print("no rounds yet")
    return 0


def cmd_wait(args):
    tag = tag_arg(args.tag)
    deadline = time.time() + int_arg("TIMEOUT", args.timeout or "100", 1, 86400)
    while lock_holder(tag) is not None and time.time() < deadline:
        time.sleep(1)
    if lock_holder(tag) is not None:
        print(f"still running (tag {tag}); call make round-wait again", file=sys.stderr)
        return 3
    led = last_ledger(tag)
    if led is None:
        raise RoundError(f"no round on tag {tag}")
    if led["status"] != "done":
        why = (read_json(STATE / tag / "driver.json") or {}).get("error") or "the driver died"
        raise RoundError(f"{led['label']} of tag {tag} ended {led['status']} ({why}); `{rerun(led)}` resumes it")
    report(led)
    return 0


def cmd_abandon(args):
    tag = tag_arg(args.tag)
    pid = lock_holder(tag)
    if pid:
        log(f"stopping the driver (pid {pid})")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        for _ in range(600):
            if lock_holder(tag) is None:
                break
            time.sleep(0.5)
    with tag_lock(tag):
        for path, led in unfinished_ledgers(tag):
            cancel_unfinished(path, led, Backend(led["backend"]), "abandoned")
            led["status"] = "abandoned"
            i = 1
            while (new := path.with_name(f"{path.stem}-abandoned{'' if i == 1 else f'-{i}'}.json")).exists():
                i += 1
            R.relabel_round(RESULTS, tag, led["label"], f"{led['label']}-abandoned", METRIC)
            write_json(path, led)
            path.rename(new)
            log(f"{path.stem} abandoned (now {new.name}); the next round reuses its number")
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(prog="round.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, extra in (("round", ("k", "sweep")), ("baseline", ("repeats",)), ("promote", ("top",)),
                        ("status", ()), ("wait", ("timeout",)), ("abandon", ())):
        p = sub.add_parser(name)
        for a in ("tag",) + extra + (("backend", "detach") if name in ("round", "baseline", "promote") else ()):
            p.add_argument(f"--{a}", default="")
    args = ap.parse_args(argv)
    try:
        return {"round": cmd_round, "baseline": cmd_baseline, "promote": cmd_promote, "status": cmd_status,
                "wait": cmd_wait, "abandon": cmd_abandon}[args.cmd](args)
    except UsageError as e:
        print(f"round: error: {e}", file=sys.stderr)
        return 2
    except RoundError as e:
        print(f"round: error: {e}", file=sys.stderr)
        return 1
    except Interrupted:
        return 130


if __name__ == "__main__":
    sys.exit(main())
