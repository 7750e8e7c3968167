#!/usr/bin/env python3
"""
tools/round.py -- the round driver: K experiments in parallel on a backend, keep the best.

    make round K=4 [BACKEND=local] [TAG=...] [SWEEP="KNOB=v1,v2 ..."] [DETACH=1]  # tools/round.py round --k=4 ...
    make baseline REPEATS=2 [BACKEND=...] [TAG=...] [DETACH=1]                    # tools/round.py baseline ...
    make status [TAG=...]                                                         # tools/round.py status ...
    make round-wait [TAG=...] [TIMEOUT=100]                                       # tools/round.py wait ...
    python tools/round.py abandon [--tag TAG]  # stop the tag's driver, cancel its unfinished round's jobs, close it

Vocabulary
  tag         a line of research, `^[a-z0-9][a-z0-9-]{0,19}$`. Default: the tag of the checked-out
              branch `autoresearch/<tag>` (or of a candidate branch `autoresearch/<tag>-r<N>-c<i>`),
              else `default`.
  best        branch `autoresearch/<tag>`, created from HEAD on first use; a round's winner advances it.
  candidates  either the K branches prepared for round N, `autoresearch/<tag>-r<N>-c1` .. `-c<K>`, each
              containing the current best (dashes, not slashes: git cannot hold both
              `autoresearch/<tag>` and `autoresearch/<tag>/...`), or, with SWEEP, K knob-override
              variants of the best and no branches: `SWEEP="MATRIX_LR=0.03,0.05"`; knobs separated by
              spaces form the cartesian product, which must have exactly K variants. Knob names and
              value types are checked against the best's trainer/train.py (read with ast).
  baseline    when the best has no measured val_bpb yet for this (tag, profile, gpu, backend), the
              round also runs it unchanged as candidate c0.
  winner      the lowest val_bpb among the succeeded candidates, kept only when it beats the best by
              more than the noise threshold: AR_MIN_DELTA if set, else the sigma `make baseline`
              stored, else 0. The best's score is the mean of its keep rows in results.tsv (or c0's
              result); if it has none (c0 crashed) the best succeeded candidate wins.
  advancing   a branch winner fast-forwards the best branch to its commit; a SWEEP winner becomes a
              new commit on the best branch that rewrites train.py's `ADOPTED = {...}` with the merged
              overrides (the message names them). Only refs move (git plumbing: a temporary index,
              commit-tree, update-ref): no checkout, no working tree or index of yours is touched. If
              the best branch is checked out in a worktree it is left where it is (as git refuses to
              move a checked-out branch) and the driver prints the `git merge --ff-only <sha>` that
              adopts the winner. Every winner is also kept as `refs/autoresearch/<tag>/r<N>`.

Profiles and GPUs never mix: the best's score, the baseline and the noise are keyed by
(tag, profile, gpu, backend). Profile: AR_PROFILE, else `full` (local without nvidia-smi: `tiny`).
GPU: AR_<BACKEND>_GPU (e.g. AR_VESSL_GPU=H100; default H100 on cloud backends), locally what
nvidia-smi reports, else `cpu`. Every job gets `--env AR_PROFILE=<profile>`.

State (under ${AR_STATE_DIR:-.ar}/rounds/<tag>/, every file written atomically)
  r<N>.json   the round ledger: spec, candidates, job ids, results, winner, status
              (submitting -> running -> finalizing -> done | interrupted | abandoned). Written before
              anything is submitted; each job id is recorded as soon as its submit returns.
  r<N>-abandoned.json  round N closed by `abandon` (then r<N>-abandoned-2.json, ...): no longer an
              r<N>.json, so the next round is N again.
  b<N>.json   the same for `make baseline`: repeat 1 runs the best unchanged, repeat i > 1 with
              SEED=<SEED+i-1> (distinct effective overrides, hence distinct job names; seeds also
              measure the init noise any code change brings). results.tsv rows: round b<N>, base<i>.
  noise.json  sigma, mean, n per "profile/gpu/backend", from `make baseline`.
  lock        flock: one round or baseline per tag at a time (a second one exits 1 at once); holds
              "<pid> <round|baseline|abandon>". A driver runs exactly while the lock is held (the
              kernel drops it when the driver dies, even by kill -9): that is how status and wait tell.
  r<N>.log, b<N>.log, driver.json   a detached driver's output (appended on each start) and record:
              pid, ledger, log, the command that starts it again, and once it ends: rc and error.
results.tsv (repo root) gets every experiment as keep|discard|crash (tools/results.py).

Resume and interrupts
  * The driver died (kill -9, closed terminal): run the same command again. It waits on the recorded
    jobs and submits only candidates without a recorded id; one whose submit may have happened without
    its id being recorded is submitted again and the backend's idempotent submit returns the existing
    job. Nothing is submitted twice. (Without K/SWEEP, `make round` resumes with the ledger's values.)
  * SIGINT/SIGTERM (Ctrl-C): wait-jobs.sh is stopped (it cancels its jobs), cancel-jobs.sh is run on
    every unfinished job of the round, those jobs are recorded as crash rows ("cancelled
    (interrupted)": their time is paid for), the ledger is marked interrupted and the driver exits 130.
    Running the same command again restarts the cancelled candidates as new jobs (the backend starts a
    new attempt `<name>-2` for a name whose last job was cancelled); candidates whose jobs had already
    ended keep their results.
  * A different command while a round is unfinished is refused; `abandon` cancels and closes it.
  * abandon: a driver still running on the tag is sent SIGTERM first (see above) and waited for. Then
    every unfinished job is cancelled and recorded (cancelled: crash; ended but never recorded:
    discard or crash, "(abandoned)"), and round N is archived: r<N>.json becomes r<N>-abandoned.json,
    its results.tsv rows (also those an earlier interrupt wrote) get round "<N>-abandoned", its log and
    a winner ref refs/autoresearch/<tag>/r<N> the same suffix. The next round is N again and takes the
    candidate branches prepared for N (`autoresearch/<tag>-r<N>-c<i>`), no renaming. An abandoned
    baseline b<N> stays b<N> (status abandoned); the next baseline is b<N+1>. An abandon that dies
    half-way is run again (each step is idempotent).

Detached (DETACH=1, --detach): for agent shells that kill commands after a few minutes. Everything
that can refuse without running a job is checked in the foreground first, with the usual one-line
error and exit code (arguments, unfinished or locked round, candidate branches, SWEEP, budget); then
the driver forks into its own session (setsid; stdin /dev/null; stdout and stderr appended to
<state>/rounds/<tag>/r<N>.log), keeping the tag's lock (the same open file, so a second start is
refused at once: "another round on tag ... is running (pid P, detached, log ...)"), records itself in
driver.json, and the foreground prints the log path on stdout and exits 0. Data preparation, the
ledger, submits, waiting and finalizing happen detached; a failure there is in the log, in driver.json,
in `make status` and `make round-wait`. SIGTERM to the detached pid (shown by `make status`) cancels
the round's jobs as Ctrl-C does; kill -9 leaves them running for a rerun of the same command (with
DETACH=1 again or not) to resume.
  make status      per unfinished round: `driver: running (pid P, detached); log ...` or `driver: NOT
                   running (...)` with the command that resumes it; after a detached round, its outcome.
  make round-wait  waits until no driver holds the tag's lock, at most TIMEOUT (default 100) seconds.
                   Exit 0: the tag's round (or baseline) is done, its table and winner printed (the
                   same as the foreground's stdout). Exit 3: still running, call it again. Exit 1: it
                   ended unfinished (failed, interrupted, died), the message says why and what to run.
                   Through make any non-zero exit is make's 2 ("Error 3" on stderr); read the message.

Budget (fails closed): AR_BUDGET_USD (unset = no limit). spent = sum of cost_usd in results.tsv +
the expected cost of submitted, not yet recorded jobs of unfinished rounds. A round starts only if
spent + n_jobs x (profile time budget + overhead_s[backend]) / 3600 x price[backend][gpu] <= budget
(tools/prices.yaml; a GPU without a price refuses). Recorded per job: cost_usd = wall_s x price,
wall_s = submit to end as the driver saw it, clamped to [trainer total_seconds, + overhead_s].

Env: K BACKEND TAG SWEEP REPEATS DETACH TIMEOUT reach the script as --k/--backend/... (make passes them
via AR_ROUND_*); AR_PROFILE, AR_BUDGET_USD, AR_MIN_DELTA, AR_<BACKEND>_GPU, AR_TIMEOUT_S (read by wait-jobs.sh),
AR_STATE_DIR, AR_TEST_BACKEND_DIR (tests: use this folder as the backend).
stdout: the result table (detached: the log path); progress on stderr. Exit: 0 done (detached: started),
1 refused or failed at run time (lock, budget, submit, git), 2 bad arguments (nothing done), 3 `wait`:
still running, 130 interrupted.
"""

import argparse
import ast
import contextlib
import datetime
import fcntl
import functools
import importlib.util
import itertools
import json
import math
import os
import re
import shutil
import signal
import statistics
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
VALUE_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")
MAX_K = 64
TRAIN_PY = "trainer/train.py"
PREPARE_PY = "prepare/prepare.py"
STATE_ROOT = Path(os.environ.get("AR_STATE_DIR") or REPO / ".ar")
STATE = STATE_ROOT / "rounds"
RESULTS_TSV = REPO / "results.tsv"
PROG = "round"
JOB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # docs/contract.md, "Job ids"


class UsageError(Exception):
    """Bad arguments: one line, exit 2, nothing done."""


class RoundError(Exception):
    """A run-time refusal or failure: one line, exit 1."""


class Interrupted(Exception):
    pass


def log(msg):
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def now():
    return time.time()


def iso(ts=None):
    return datetime.datetime.fromtimestamp(ts or now()).astimezone().isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------
# git
# ----------------------------------------------------------------------------------------------
def git(*args, check=True, input=None, env=None):
    p = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, input=input,
                       env={**os.environ, **(env or {})})
    if check and p.returncode:
        why = ((p.stderr or p.stdout).strip().splitlines() or ["no output"])[-1]
        raise RoundError(f"git {' '.join(args[:2])} failed: {why}")
    return p.stdout.strip() if check else p


def rev(ref):
    p = git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False)
    return p.stdout.strip() if p.returncode == 0 else None


def rel(path):
    """A path for messages: relative to the repo when inside it."""
    try:
        return str(Path(path).relative_to(REPO))
    except ValueError:
        return str(path)


def short(sha):
    """results.tsv keeps the reference's 7-character commit."""
    return sha[:7]


def best_ref(tag):
    return f"refs/heads/autoresearch/{tag}"


def checked_out_in(ref):
    """Worktree paths where branch `ref` is checked out."""
    out = git("worktree", "list", "--porcelain", check=False).stdout
    paths, cur = [], None
    for line in out.splitlines():
        if line.startswith("worktree "):
            cur = line[len("worktree "):]
        elif line == f"branch {ref}" and cur:
            paths.append(cur)
    return paths


def default_tag():
    p = git("symbolic-ref", "--quiet", "--short", "HEAD", check=False)
    branch = p.stdout.strip() if p.returncode == 0 else ""
    m = re.fullmatch(r"autoresearch/(.+)-r\d+-c\d+", branch)
    if m and TAG_RE.fullmatch(m.group(1)) and rev(best_ref(m.group(1))):
        return m.group(1)
    m = re.fullmatch(r"autoresearch/(.+)", branch)
    if m and TAG_RE.fullmatch(m.group(1)):
        return m.group(1)
    return "default"


def show_file(commit, path):
    p = git("show", f"{commit}:{path}", check=False)
    if p.returncode:
        raise RoundError(f"{path} not found in commit {commit[:10]}")
    return p.stdout


# ----------------------------------------------------------------------------------------------
# train.py knobs and prepare.py profiles, read with ast (never imported)
# ----------------------------------------------------------------------------------------------
_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b,
           ast.Pow: lambda a, b: a**b if abs(b) <= 64 else None}


def const_value(node):
    """A literal, or constant arithmetic on numbers (`2**19`, `16 * 256`); ValueError otherwise."""
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = const_value(node.left), const_value(node.right)
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b)):
            value = _BINOPS[type(node.op)](a, b)
            if value is not None:
                return value
        raise ValueError("not a constant")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = const_value(node.operand)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return -v if isinstance(node.op, ast.USub) else v
        raise ValueError("not a constant")
    return ast.literal_eval(node)


def parse_knobs(source):
    """{KNOB: default} from train.py: uppercase literal assignments between `_NOT_KNOBS = ...` and
    `KNOBS = ...` (all module-level uppercase literals if those markers are missing)."""
    tree = ast.parse(source)
    body = tree.body
    start = next((i for i, n in enumerate(body) if isinstance(n, ast.Assign)
                  and any(isinstance(t, ast.Name) and t.id == "_NOT_KNOBS" for t in n.targets)), None)
    end = next((i for i, n in enumerate(body) if isinstance(n, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "KNOBS" for t in n.targets)), None)
    section = body[start + 1:end] if start is not None and end is not None else body
    knobs = {}
    for node in section:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name.isupper() and not name.startswith("_"):
                try:
                    knobs[name] = const_value(node.value)
                except (ValueError, TypeError, SyntaxError, ZeroDivisionError, OverflowError):
                    continue
    return knobs


def parse_profiles(source):
    """{name: time_budget_seconds} from prepare.py's PROFILES = {"x": Profile("x", T, budget, ...)}."""
    profiles = {}
    for node in ast.parse(source).body:
        if (isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Dict)
                and any(isinstance(t, ast.Name) and t.id == "PROFILES"
                        for t in (node.targets if isinstance(node, ast.Assign) else [node.target]))):
            for k, v in zip(node.value.keys, node.value.values, strict=True):
                if isinstance(k, ast.Constant) and isinstance(v, ast.Call):
                    budget = None
                    for kw in v.keywords:
                        if kw.arg == "time_budget":
                            budget = ast.literal_eval(kw.value)
                    if budget is None and len(v.args) >= 3:
                        budget = ast.literal_eval(v.args[2])
                    profiles[k.value] = float(budget)
    return profiles


def typed_value(name, raw, default):
    """A SWEEP value as train.py would parse AR_<name>=raw (same rules), or UsageError."""
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if isinstance(default, str):
            return raw
        raise UsageError(f"SWEEP value {name}={raw} is not a valid {type(default).__name__}") from None
    if isinstance(default, bool):
        if value in (0, 1) and not isinstance(value, float):
            return bool(value)
    elif isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isfinite(value):
            return float(value)
    elif type(value) is type(default):
        return value
    raise UsageError(f"SWEEP value {name}={raw} is not a valid {type(default).__name__}")


def sweep_syntax(sweep):
    """'A=1,2 B=x,y' -> [(name, [raw values])]; only the shape and the characters are checked here."""
    axes = []
    for token in sweep.split():
        name, sep, values = token.partition("=")
        if not sep or not KNOB_RE.fullmatch(name):
            raise UsageError(f"SWEEP item {token!r} is not KNOB=v1,v2,... (knob names are UPPER_CASE)")
        for v in values.split(","):
            if not VALUE_RE.fullmatch(v):
                raise UsageError(f"SWEEP value {v!r} for {name} may only contain letters, digits and . _ + -")
        axes.append((name, values.split(",")))
    return axes


def parse_sweep(sweep, knobs):
    """'A=1,2 B=x,y' -> list of {knob: raw_value} (cartesian product, in order)."""
    axes = []
    for name, vals in sweep_syntax(sweep):
        if name not in knobs:
            raise UsageError(f"SWEEP knob {name} is not a knob of {TRAIN_PY}; valid: {', '.join(sorted(knobs))}")
        if name in (a[0] for a in axes):
            raise UsageError(f"SWEEP names {name} twice")
        typed = [typed_value(name, v, knobs[name]) for v in vals]
        if len({repr(t) for t in typed}) != len(typed):
            raise UsageError(f"SWEEP lists a value of {name} twice")
        axes.append((name, vals))
    if not axes:
        raise UsageError("SWEEP is empty")
    return [dict(zip([a[0] for a in axes], combo, strict=True)) for combo in itertools.product(*[a[1] for a in axes])]


# ----------------------------------------------------------------------------------------------
# prices, GPU, profile
# ----------------------------------------------------------------------------------------------
def load_prices():
    import yaml  # pyyaml: only needed here

    with open(HERE / "prices.yaml") as f:
        data = yaml.safe_load(f) or {}
    return data.get("prices") or {}, data.get("overhead_s") or {}


def gpu_key(name, backend_prices):
    """Normalise a GPU name ('NVIDIA H100 80GB HBM3') to a price key ('H100'); 'cpu' stays 'cpu'."""
    if not name:
        return None
    low = name.lower()
    if low == "cpu":
        return "cpu"
    keys = sorted({k for table in backend_prices.values() for k in table if k != "default"}, key=len, reverse=True)
    for k in keys:
        if "-" in k:  # 'A100-80GB' matches 'NVIDIA A100-SXM4-80GB' and 'A100 80GB PCIe'
            base, _, mem = k.partition("-")
            if base.lower() in low and mem.lower() in low:
                return k
        elif k.lower() in low:
            return k
    return re.sub(r"[^A-Za-z0-9-]+", "-", name).strip("-")[:40] or None


@functools.cache
def local_gpu_name():
    if not shutil.which("nvidia-smi"):
        return None
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = [n.strip() for n in p.stdout.splitlines() if n.strip()] if p.returncode == 0 else []
    return names[0] if names else None


def resolve_gpu(backend, prices):
    """The GPU results are keyed and priced by. AR_<BACKEND>_GPU may use the backends' own spellings:
    'H100!' (Modal: pinned type), 'H100:8' (8 GPUs -> key 'H100x8', priced 8x), 'H100!,A100-80GB' (a fallback
    list: the first choice is what the round is keyed by)."""
    var = f"AR_{backend.upper()}_GPU"
    configured = os.environ.get(var, "").strip()
    if configured:
        first = configured.split(",")[0].strip()
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9_.-]{0,40})!?(?::([1-9][0-9]?))?!?", first)
        if not m:
            raise UsageError(f"{var}={configured!r} is not a GPU type like H100, H100!, H100:8 or H100!,A100-80GB")
        key = gpu_key(m.group(1), prices)
        count = int(m.group(2) or 1)
        return f"{key}x{count}" if count > 1 else key
    if backend == "local":
        return gpu_key(local_gpu_name(), prices) or "cpu"
    return "H100"


def resolve_profile(backend, profiles):
    name = os.environ.get("AR_PROFILE", "").strip()
    if not name:
        name = "full" if backend != "local" or local_gpu_name() else "tiny"
    if name not in profiles:
        raise UsageError(f"AR_PROFILE={name!r} is not a profile; use one of {', '.join(profiles)}")
    return name


def price_of(prices, backend, gpu):
    table = prices.get(backend) or {}
    multi = re.fullmatch(r"(.+)x([0-9]+)", gpu or "")
    if multi and multi.group(1) in table:  # 'H100x8': eight GPUs at the per-GPU price
        return float(table[multi.group(1)]) * int(multi.group(2))
    if gpu in table:
        return float(table[gpu])
    if "default" in table:
        return float(table["default"])
    return None


# ----------------------------------------------------------------------------------------------
# ledger, lock
# ----------------------------------------------------------------------------------------------
def tag_dir(tag):
    return STATE / tag


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_json(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return default
    except ValueError as e:
        raise RoundError(f"{path} is not valid JSON ({e}); fix or remove it") from None


def ledgers(tag, prefix="r"):
    """[(number, path)] of a tag's ledgers, ascending."""
    out = []
    d = tag_dir(tag)
    if d.is_dir():
        for p in d.iterdir():
            m = re.fullmatch(rf"{prefix}(\d+)\.json", p.name)
            if m:
                out.append((int(m.group(1)), p))
    return sorted(out)


def all_unfinished():
    """Every (tag, path, ledger) whose status is not final, over all tags."""
    out = []
    if STATE.is_dir():
        for d in sorted(STATE.iterdir()):
            if d.is_dir():
                for prefix in ("r", "b"):
                    for _, p in ledgers(d.name, prefix):
                        led = read_json(p)
                        if led and led.get("status") not in ("done", "abandoned"):
                            out.append((d.name, p, led))
    return out


def _lock_owner(fd):
    """(pid or None, role) from a lock file's `<pid> <role>` line (role: round|baseline|abandon)."""
    words = os.pread(fd, 64, 0).decode(errors="replace").split()
    pid = int(words[0]) if words and words[0].isdigit() else None
    return pid, (words[1] if len(words) > 1 else "round")


def _set_lock_owner(fd, role):
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {role}\n".encode(), 0)


@contextlib.contextmanager
def tag_lock(tag, role="round"):
    """One driver per tag. Yields the lock's fd (a detached driver inherits it, so the lock is never free
    between the foreground checks and the detached run). A `make status` or `round-wait` probes the lock
    for microseconds (lock_holder), hence a few retries before giving up."""
    d = tag_dir(tag)
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for attempt in range(7):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == 6:
                    pid, what = _lock_owner(fd)
                    rec = driver_record(tag) or {}
                    where = f", detached, log {rec['log']}" if pid and rec.get("pid") == pid and rec.get("log") else ""
                    who = f" (pid {pid}{where})" if pid else ""
                    raise RoundError(f"another {what} on tag {tag!r} is running{who}; `make status` shows it, "
                                     "`make round-wait` waits for its end, or pick another TAG") from None
                time.sleep(0.05)
        _set_lock_owner(fd, role)
        try:
            yield fd
        except BaseException as e:
            if DETACHED:
                finish_detached(e)
            raise
        else:
            if DETACHED:
                finish_detached(None)
    finally:
        os.close(fd)


def lock_holder(tag):
    """None when no driver holds the tag's lock, else (pid or None, role). Exact even for a driver killed
    with -9 (the kernel drops its lock) or left a zombie; the probe holds a shared lock for microseconds."""
    try:
        fd = os.open(tag_dir(tag) / "lock", os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _lock_owner(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# detached drivers (DETACH=1)
# ----------------------------------------------------------------------------------------------
DRIVER = "driver.json"  # <state>/rounds/<tag>/driver.json: the tag's last detached driver
DETACHED = None  # in a detached driver: the path of its driver.json


def parse_detach(raw):
    raw = (raw or "").strip()
    if raw not in ("", "0", "1"):
        raise UsageError(f"DETACH must be 1 (run detached) or 0, not {raw!r}")
    return raw == "1"


def driver_record(tag):
    """The tag's driver.json, or None (missing or unreadable)."""
    try:
        rec = read_json(tag_dir(tag) / DRIVER)
    except RoundError:
        return None
    return rec if isinstance(rec, dict) else None


def _close_fds_except(keep):
    try:
        fds = [int(x) for x in os.listdir("/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd")]
    except OSError:
        fds = range(3, 1024)
    for fd in fds:
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def detach(tag, name, lock_fd, command, kind):
    """Fork the driver into its own session (setsid: a shell tool that kills its command's process group
    does not reach it), stdin /dev/null, stdout and stderr appended to <state>/rounds/<tag>/<name>.log.
    It keeps the tag's lock (the same open file), records itself in driver.json, and only then lets the
    foreground process print the log path and exit 0. Returns True in the foreground, False in the driver."""
    global DETACHED
    d = tag_dir(tag)
    log_path = d / f"{name}.log"
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(w)
        with os.fdopen(r, "rb") as f:
            started = f.read(1) == b"1"
        if not started:
            raise RoundError(f"the detached driver (pid {pid}) did not start; see {rel(log_path)}")
        what = f"baseline {name}" if kind == "baseline" else f"round {name[1:]}"
        log(f"{what} of tag {tag} runs detached (pid {pid}), log "
            f"{rel(log_path)}; `make status` shows its jobs, `make round-wait TAG={tag}` waits for its end")
        print(rel(log_path), flush=True)
        return True
    try:
        os.close(r)
        os.setsid()
        out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        _close_fds_except({lock_fd, w})
        sys.stdout.reconfigure(line_buffering=True)
        _set_lock_owner(lock_fd, kind)
        DETACHED = d / DRIVER
        write_json(DETACHED, dict(pid=os.getpid(), kind=kind, ledger=name, log=rel(log_path), command=command,
                                  started=now(), started_iso=iso()))
        print(f"=== {iso()} detached driver pid {os.getpid()}: {command} ===", flush=True)
        os.write(w, b"1")
        os.close(w)
    except BaseException:
        os._exit(1)
    return False


def exit_code(exc):
    if exc is None:
        return 0
    if isinstance(exc, UsageError):
        return 2
    if isinstance(exc, (Interrupted, KeyboardInterrupt)):
        return 130
    return 1


def finish_detached(exc):
    """Record a detached driver's exit in its driver.json (still under the tag's lock)."""
    rec = driver_record(DETACHED.parent.name) or {}
    if rec.get("pid") != os.getpid():
        return
    rc = exit_code(exc)
    error = None
    if isinstance(exc, Interrupted):
        error = f"interrupted (signal {exc.args[0]})"
    elif exc is not None:
        error = str(exc) or type(exc).__name__
    rec.update(rc=rc, error=error, finished=now(), finished_iso=iso())
    with contextlib.suppress(OSError):
        write_json(DETACHED, rec)


# ----------------------------------------------------------------------------------------------
# backend
# ----------------------------------------------------------------------------------------------
class Backend:
    def __init__(self, name, tag):
        self.name, self.tag = name, tag
        override = os.environ.get("AR_TEST_BACKEND_DIR")
        self.dir = Path(override) if override else REPO / BACKENDS[name]
        self.env = {**os.environ, "AR_TAG": tag, "AR_BACKEND": name}

    def script(self, name):
        path = self.dir / name
        if not path.is_file():
            raise RoundError(f"backend {self.name}: {path} is missing")
        return [str(path)] if os.access(path, os.X_OK) else ["bash", str(path)]

    def check(self):
        for s in ("submit-async.sh", "wait-jobs.sh", "cancel-jobs.sh"):
            self.script(s)

    def prepare_data(self, profile):
        """Local jobs read the data cache of this machine: prepare it (idempotent, seconds when done) so that
        `make round` works on a fresh clone. Cloud backends prepare their volume with their own prep step."""
        if self.name != "local" or os.environ.get("AR_TEST_BACKEND_DIR"):
            return
        log(f"preparing data for profile {profile} (a no-op when already prepared)")
        p = subprocess.run([sys.executable, str(REPO / PREPARE_PY), "--profile", profile], cwd=REPO,
                           stdout=sys.stderr, stderr=sys.stderr)
        if p.returncode != 0:
            raise RoundError(f"preparing data for profile {profile} failed (exit {p.returncode}); see above")

    def submit(self, commit, env, name=None):
        cmd = self.script("submit-async.sh") + ["--commit", commit]
        for k, v in env.items():
            cmd += ["--env", f"{k}={v}"]
        if name:
            cmd += ["--name", name]
        p = subprocess.run(cmd, capture_output=True, text=True, env=self.env, cwd=REPO, start_new_session=True)
        lines = [ln.strip() for ln in p.stdout.splitlines() if ln.strip()]
        if p.returncode != 0 or len(lines) != 1 or not JOB_ID_RE.fullmatch(lines[0]):
            why = (p.stderr.strip().splitlines() or p.stdout.strip().splitlines() or ["no output"])[-1]
            kind = {2: "refused the job", 3: "is unavailable"}.get(p.returncode, "failed")
            raise RoundError(f"backend {self.name} {kind} (submit-async.sh exit {p.returncode}): {why}")
        return lines[0]

    def cancel(self, ids):
        """cancel-jobs.sh (idempotent). An unknown id makes it cancel nothing (exit 2): retry one by one."""
        ids = list(ids)
        if not ids:
            return 0
        cmd = self.script("cancel-jobs.sh")
        p = subprocess.run(cmd + ids, capture_output=True, text=True, env=self.env, cwd=REPO, start_new_session=True)
        if p.returncode == 2 and len(ids) > 1:
            rcs = [subprocess.run(cmd + [i], capture_output=True, text=True, env=self.env, cwd=REPO,
                                  start_new_session=True).returncode for i in ids]
            return max(rcs)
        if p.returncode:
            log(f"warning: cancel-jobs.sh exit {p.returncode}: {p.stderr.strip()[-300:]}")
        return p.returncode

    def wait(self, ids, sig, names=None):
        """Run wait-jobs.sh (own session: the driver decides what a Ctrl-C does); one progress line per
        job as it ends (wait-jobs.sh's own stderr passes through).
        Returns (exit code, stdout, {job id: time its block arrived}).
        A SIGINT/SIGTERM meanwhile is forwarded as SIGTERM (wait-jobs then cancels the jobs and prints
        their blocks); a third one kills it."""
        proc = subprocess.Popen(self.script("wait-jobs.sh") + list(ids), stdout=subprocess.PIPE, text=True,
                                env=self.env, cwd=REPO, start_new_session=True, errors="replace")
        chunks, arrivals = [], {}
        sig.child = proc
        try:
            for line in proc.stdout:
                chunks.append(line)
                m = re.match(r"^=== (\S+) \(([a-z]+)\) ===", line)
                if m:
                    arrivals[m.group(1)] = now()
                    left = len(ids) - len(arrivals)
                    log(f"{(names or {}).get(m.group(1), '?')} {m.group(1)}: {m.group(2)} ({left} to go)")
            rc = proc.wait()
        finally:
            sig.child = None
            if proc.poll() is None:  # only on an unexpected exception
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
        return rc, "".join(chunks), arrivals


class Signals:
    """SIGINT/SIGTERM -> Interrupted. Inside `critical()` the exception is deferred to its end; while a
    wait-jobs.sh child runs the signal is forwarded to it (it cancels and reports) and noted in
    `pending`, which the caller checks when the wait returns."""

    def __init__(self):
        self.pending, self.count, self.depth, self.child = None, 0, 0, None

    def __enter__(self):
        self.old = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)

    def _handler(self, signum, frame):
        self.pending = signum
        self.count += 1
        child = self.child
        if child is not None:
            log(f"signal {signum}: stopping the wait; wait-jobs.sh cancels the round's jobs")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL if self.count >= 3 else signal.SIGTERM)
            return
        if self.depth == 0:
            raise Interrupted(signum)

    def check(self):
        if self.pending and self.depth == 0:
            raise Interrupted(self.pending)

    @contextlib.contextmanager
    def critical(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        self.check()


# ----------------------------------------------------------------------------------------------
# the round
# ----------------------------------------------------------------------------------------------
def parse_int(name, raw, lo, hi):
    raw = (raw or "").strip()
    if not re.fullmatch(r"[0-9]{1,4}", raw) or not lo <= int(raw) <= hi:
        raise UsageError(f"{name} must be an integer from {lo} to {hi}, not {raw!r}")
    return int(raw)


def validate_tag(tag):
    if tag is None or tag == "":
        return default_tag()
    if not TAG_RE.fullmatch(tag):
        raise UsageError(f"TAG {tag!r} must match ^[a-z0-9][a-z0-9-]{{0,19}}$ (lowercase letters, digits, dashes)")
    return tag


def validate_backend(backend):
    backend = backend or "local"
    if backend not in BACKENDS:
        raise UsageError(f"unknown BACKEND {backend!r}; use one of {', '.join(BACKENDS)}")
    return backend


def env_float(name, lo=0.0):
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        x = float(raw)
    except ValueError:
        x = float("nan")
    if not math.isfinite(x) or x < lo:
        raise UsageError(f"{name}={raw!r} must be a number >= {lo:g}")
    return x


class Context:
    """Everything a round needs that does not depend on the round number."""

    def __init__(self, args, require_k=True):
        self.backend_name = validate_backend(args.backend)
        self.tag = validate_tag(args.tag)
        k = getattr(args, "k", None)
        self.k = parse_int("K", k, 1, MAX_K) if (k or require_k) else None
        self.sweep = (getattr(args, "sweep", None) or "").strip()
        sweep_syntax(self.sweep)
        self.budget = env_float("AR_BUDGET_USD")
        self.min_delta = env_float("AR_MIN_DELTA")
        timeout = os.environ.get("AR_TIMEOUT_S", "").strip()
        if timeout and not re.fullmatch(r"[0-9]{1,7}", timeout):
            raise UsageError(f"AR_TIMEOUT_S={timeout!r} must be a whole number of seconds")
        if rev("HEAD") is None:
            raise RoundError("the repository has no commits yet; commit trainer/train.py first")
        self.prices, self.overheads = load_prices()
        try:
            self.profiles = parse_profiles((REPO / PREPARE_PY).read_text())
        except (OSError, SyntaxError, ValueError) as e:
            raise RoundError(f"cannot read the profiles from {PREPARE_PY}: {e}") from None
        self.profile = resolve_profile(self.backend_name, self.profiles)
        self.gpu = resolve_gpu(self.backend_name, self.prices)
        self.backend = Backend(self.backend_name, self.tag)
        self.ref = best_ref(self.tag)

    @property
    def key(self):
        return f"{self.profile}/{self.gpu}/{self.backend_name}"

    def price(self):
        return price_of(self.prices, self.backend_name, self.gpu)

    def expected_job_usd(self, profile=None):
        price = self.price()
        if price is None:
            return None
        budget_s = self.profiles[profile or self.profile]
        return (budget_s + float(self.overheads.get(self.backend_name, 0))) / 3600 * price

    def best_commit(self, create=True):
        sha = rev(self.ref)
        if sha is None and create:
            head = rev("HEAD")
            git("update-ref", self.ref, head, "0" * 40)
            log(f"created branch autoresearch/{self.tag} at HEAD {head[:10]}")
            sha = head
        return sha


def measured_best(ctx, commit):
    """Mean val_bpb of the keep rows of `commit` for this (tag, profile, gpu, backend), or None."""
    vals = [R.to_float(r["val_bpb"]) for r in R.read_rows(RESULTS_TSV)
            if r["commit"] and commit.startswith(r["commit"]) and r["status"] == "keep" and r["tag"] == ctx.tag
            and r["profile"] == ctx.profile and r["gpu"] == ctx.gpu and r["backend"] == ctx.backend_name]
    vals = [v for v in vals if v is not None and v > 0]
    return statistics.fmean(vals) if vals else None


def noise_threshold(ctx):
    if ctx.min_delta is not None:
        return ctx.min_delta, "AR_MIN_DELTA"
    noise = read_json(tag_dir(ctx.tag) / "noise.json", {}) or {}
    entry = noise.get(ctx.key)
    if entry and isinstance(entry.get("sigma"), (int, float)):
        return float(entry["sigma"]), f"sigma from make baseline (n={entry.get('n')})"
    return 0.0, "no AR_MIN_DELTA or baseline sigma"


def spent_usd():
    """(recorded, pending): sum of cost_usd in results.tsv; expected cost of unfinished rounds' jobs."""
    recorded = sum(R.to_float(r.get("cost_usd"), 0.0) for r in R.read_rows(RESULTS_TSV))
    pending = 0.0
    for _, _, led in all_unfinished():
        for c in led.get("candidates", []):
            if c.get("job_id") and not c.get("recorded"):
                pending += float(led.get("expected_job_usd") or 0.0)
    return recorded, pending


def check_budget(ctx, n_new):
    if ctx.budget is None:
        return
    per_job = ctx.expected_job_usd()
    if per_job is None:
        raise RoundError(f"AR_BUDGET_USD is set but tools/prices.yaml has no price for backend "
                         f"{ctx.backend_name} GPU {ctx.gpu}; add one (the budget fails closed)")
    recorded, pending = spent_usd()
    need = n_new * per_job
    if recorded + pending + need > ctx.budget + 1e-9:
        raise RoundError(
            f"budget refused: spent ${recorded:.2f} + unfinished ${pending:.2f} + {n_new} jobs x ${per_job:.2f} "
            f"(({ctx.profiles[ctx.profile]:g}s + {ctx.overheads.get(ctx.backend_name, 0)}s overhead)/3600 x "
            f"${ctx.price():.2f}/h {ctx.gpu} on {ctx.backend_name}) = ${recorded + pending + need:.2f} "
            f"> AR_BUDGET_USD ${ctx.budget:.2f}; nothing submitted")
    log(f"budget: spent ${recorded:.2f} + unfinished ${pending:.2f} + {n_new} x ${per_job:.2f} "
        f"<= ${ctx.budget:.2f}")


def candidate_branches(tag, n):
    prefix = f"refs/heads/autoresearch/{tag}-r{n}-c"
    out = git("for-each-ref", "--format=%(refname)", prefix.rsplit("/", 1)[0] + "/", check=False).stdout
    found = {}
    for ref in out.split():
        m = re.fullmatch(re.escape(prefix) + r"(\d+)", ref)
        if m:
            found[int(m.group(1))] = ref
    return found


def build_candidates(ctx, n, best, knobs):
    cands = []
    branches = candidate_branches(ctx.tag, n)
    if ctx.sweep:
        if branches:
            raise UsageError(f"round {n} has candidate branches (autoresearch/{ctx.tag}-r{n}-c*) and a SWEEP; "
                             "use one or the other")
        variants = parse_sweep(ctx.sweep, knobs)
        if len(variants) != ctx.k:
            raise UsageError(f"SWEEP gives {len(variants)} variants but K={ctx.k}; they must be equal")
        for i, ov in enumerate(variants, 1):
            typed = {k: typed_value(k, v, knobs[k]) for k, v in ov.items()}
            cands.append(dict(index=i, name=f"c{i}", kind="sweep", commit=best, overrides=ov, typed=typed,
                              description=" ".join(f"{k}={v}" for k, v in ov.items())))
    else:
        want = [f"autoresearch/{ctx.tag}-r{n}-c{i}" for i in range(1, ctx.k + 1)]
        missing = [w for i, w in enumerate(want, 1) if i not in branches]
        extra = sorted(i for i in branches if i > ctx.k)
        if missing:
            raise UsageError(f"round {n} needs {ctx.k} candidate branches autoresearch/{ctx.tag}-r{n}-c1..c{ctx.k} "
                             f"(missing {', '.join(missing)}) or a SWEEP=\"KNOB=v1,v2\"")
        if extra:
            raise UsageError(f"round {n} has {len(branches)} candidate branches but K={ctx.k}")
        for i in range(1, ctx.k + 1):
            sha = rev(branches[i])
            if git("merge-base", "--is-ancestor", best, sha, check=False).returncode:
                raise UsageError(f"autoresearch/{ctx.tag}-r{n}-c{i} does not contain the current best "
                                 f"autoresearch/{ctx.tag} ({best[:10]}); rebase it onto the best")
            subject = git("log", "-1", "--format=%s", sha)
            cands.append(dict(index=i, name=f"c{i}", kind="branch", commit=sha, overrides={}, typed={},
                              branch=f"autoresearch/{ctx.tag}-r{n}-c{i}", description=subject))
    seen = {}
    for c in cands:
        key = (c["commit"], json.dumps(c["overrides"], sort_keys=True))
        if key in seen:
            raise UsageError(f"candidates {seen[key]} and {c['name']} are the same experiment")
        if c["commit"] == best and not c["overrides"]:
            raise UsageError(f"candidate {c['name']} is the current best unchanged")
        seen[key] = c["name"]
    return cands


def job_env(ctx, cand):
    env = {"AR_PROFILE": ctx.profile}
    env.update({f"AR_{k}": v for k, v in cand["overrides"].items()})
    return env


def job_name(ctx, cand):
    return cand.get("job_name")


def submit_all(ctx, path, led, sig):
    for c in led["candidates"]:
        if c.get("job_id"):
            continue
        with sig.critical():
            c["submit_started"] = now()
            write_json(path, led)
            jid = ctx.backend.submit(c["commit"], job_env(ctx, c), job_name(ctx, c))
            c["job_id"], c["submitted_at"] = jid, now()
            write_json(path, led)
        log(f"submitted {c['name']} ({c['description'][:60]}) as {jid}")


def wait_all(ctx, path, led, sig):
    ids = [c["job_id"] for c in led["candidates"] if c.get("job_id") and not c.get("result")]
    if not ids:
        return
    log(f"waiting for {len(ids)} job(s): {' '.join(ids)}")
    with sig.critical():  # a signal now is forwarded to wait-jobs.sh, then raised once the output is saved
        names = {c["job_id"]: c["name"] for c in led["candidates"] if c.get("job_id")}
        rc, out, arrivals = ctx.backend.wait(ids, sig, names)
        records = {r["job_id"]: r for r in R.parse_output(out) if r["job_id"]}
        t = now()
        missing = []
        for c in led["candidates"]:
            jid = c.get("job_id")
            if jid not in ids:
                continue
            rec = records.get(jid)
            if rec is None or (sig.pending and rec["state"] == "cancelled"):
                missing.append(jid)  # interrupted: cancelled below and restarted by a rerun
                continue
            c["state"] = rec["state"]
            c["result"] = {k: v for k, v in rec.items() if k != "result"}
            c["finished_at"] = arrivals.get(jid, t)
        write_json(path, led)
        if sig.pending:
            return
        if missing:
            raise RoundError(f"wait-jobs.sh (exit {rc}) reported no final state for {' '.join(missing)}; "
                             "rerun the same command to resume waiting")


def wall_seconds(overhead, c):
    """The job's wall time: from its submit to the arrival of its wait-jobs block, clamped to
    [trainer total_seconds, trainer total_seconds + overhead_s] when the trainer reported its time
    (a queued local job or a resumed driver would otherwise count the waiting)."""
    overhead = float(overhead or 0)
    total = (c.get("result") or {}).get("total_seconds")
    observed = None
    if c.get("submitted_at") and c.get("finished_at"):
        observed = max(0.0, c["finished_at"] - c["submitted_at"])
    if total is None:
        return observed if observed is not None else overhead
    total = float(total)
    return total + overhead if observed is None else min(max(observed, total), total + overhead)


# ----------------------------------------------------------------------------------------------
# advancing the best branch
# ----------------------------------------------------------------------------------------------
def rewrite_adopted(source, new_values):
    """train.py text with `ADOPTED = {...}` replaced by repr(existing | new_values)."""
    tree = ast.parse(source)
    node = next((n for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                 and any(isinstance(t, ast.Name) and t.id == "ADOPTED"
                         for t in (n.targets if isinstance(n, ast.Assign) else [n.target]))), None)
    if node is None:
        raise RoundError(f"{TRAIN_PY} has no `ADOPTED = {{...}}` line to write the winning overrides into")
    current = ast.literal_eval(node.value)
    merged = {**current, **new_values}
    lines = source.splitlines(keepends=True)
    start, end = node.lineno - 1, node.end_lineno - 1
    tail = lines[end][node.end_col_offset:]
    new_line = lines[start][:node.col_offset] + f"ADOPTED = {merged!r}" + tail
    if not new_line.endswith("\n"):
        new_line += "\n"
    out = "".join(lines[:start] + [new_line] + lines[end + 1:])
    ast.parse(out)
    return out


def make_adopted_commit(best, cand, tag, n):
    source = show_file(best, TRAIN_PY)
    text = rewrite_adopted(source, cand["typed"])
    mode = git("ls-tree", best, "--", TRAIN_PY).split()[0]
    blob = git("hash-object", "-w", "--stdin", input=text)
    with tempfile.TemporaryDirectory() as td:
        env = {"GIT_INDEX_FILE": str(Path(td) / "index")}
        git("read-tree", best, env=env)
        git("update-index", "--add", "--cacheinfo", f"{mode},{blob},{TRAIN_PY}", env=env)
        tree = git("write-tree", env=env)
    msg = (f"adopt {cand['description']} (round {n} winner, tag {tag})\n\n"
           f"Writes the winning SWEEP overrides into ADOPTED in {TRAIN_PY}:\n"
           + "".join(f"  {k} = {v!r}\n" for k, v in cand["typed"].items()))
    return git("commit-tree", tree, "-p", best, input=msg)


def advance(ctx, led):
    """Move the best branch from led['best_commit'] to led['advance_to'] (idempotent)."""
    new, old = led.get("advance_to"), led["best_commit"]
    if not new or led.get("advanced") is not None:
        return
    git("update-ref", f"refs/autoresearch/{ctx.tag}/r{led['round']}", new)
    current = rev(ctx.ref)
    where = checked_out_in(ctx.ref)
    if current == new:
        led["advanced"] = True
    elif current != old:
        log(f"warning: autoresearch/{ctx.tag} moved to {current[:10]} during the round; not advancing it "
            f"(winner {new[:10]}, kept as refs/autoresearch/{ctx.tag}/r{led['round']})")
        led["advanced"] = False
    elif where:
        log(f"note: autoresearch/{ctx.tag} is checked out in {where[0]}, so it was left at {old[:10]}; "
            f"adopt the winner there with: git merge --ff-only {new[:10]}")
        led["advanced"] = False
    else:
        git("update-ref", "-m", f"autoresearch round {led['round']} winner", ctx.ref, new, old)
        led["advanced"] = True


# ----------------------------------------------------------------------------------------------
# finalize and report
# ----------------------------------------------------------------------------------------------
def decide(ctx, led):
    """Pick the winner and each candidate's status; stored in the ledger (idempotent)."""
    if led.get("decided"):
        return
    cands = led["candidates"]
    best_val = led.get("best_val_bpb")
    base = next((c for c in cands if c["kind"] == "baseline"), None)
    if base and (base.get("result") or {}).get("ok"):
        best_val = base["result"]["val_bpb"]
    led["best_val_bpb"] = best_val
    threshold, why = noise_threshold(ctx)
    led["threshold"], led["threshold_source"] = threshold, why
    ok = [c for c in cands if c["kind"] != "baseline" and (c.get("result") or {}).get("ok")]
    winner = min(ok, key=lambda c: c["result"]["val_bpb"], default=None)
    if winner and best_val is not None and not best_val - winner["result"]["val_bpb"] > threshold:
        winner = None
    for c in cands:
        res = c.get("result") or {}
        if not res.get("ok"):
            c["status"] = "crash"
        elif c["kind"] == "baseline" or c is winner:
            c["status"] = "keep"
        else:
            c["status"] = "discard"
    led["winner"] = winner["name"] if winner else None
    if winner:
        if winner["kind"] == "branch":
            led["advance_to"] = winner["commit"]
        else:
            led["advance_to"] = make_adopted_commit(led["best_commit"], winner, ctx.tag, led["round"])
        winner["kept_commit"] = led["advance_to"]
    led["decided"] = True


def record_rows(ctx, led):
    price = ctx.price()
    label = str(led.get("round_label", led["round"]))
    # a job the backend returned again (same experiment, already succeeded) was paid for once
    earlier = {r["job_id"] for r in R.read_rows(RESULTS_TSV)
               if r["job_id"] and not (r["tag"] == ctx.tag and r["round"] == label)}
    rows = []
    for c in led["candidates"]:
        res = c.get("result") or {}
        wall = wall_seconds(ctx.overheads.get(ctx.backend_name, 0), c)
        cost = wall / 3600 * price if price is not None else 0.0
        desc = c["description"]
        if c.get("job_id") in earlier:
            cost, desc = 0.0, f"{desc} (result of an earlier identical job)"
        c["wall_s"], c["cost_usd"] = round(wall, 1), round(cost, 4)
        if c["status"] == "crash":
            desc = f"{desc} -- crash: {res.get('error') or c.get('state') or 'unknown'}"
        gpu = gpu_key(res.get("gpu"), ctx.prices) or ctx.gpu
        rows.append(R.make_row(res, commit=short(c.get("kept_commit") or c["commit"]), status=c["status"],
                               description=desc, round=led.get("round_label", led["round"]),
                               candidate=c["name"], backend=ctx.backend_name, gpu=gpu,
                               profile=res.get("profile") or ctx.profile, job_id=c.get("job_id"), wall_s=wall,
                               cost_usd=cost, overrides=c.get("typed") or c.get("overrides") or {}, tag=ctx.tag))
    R.append_rows(RESULTS_TSV, rows)
    for c in led["candidates"]:
        c["recorded"] = True


def print_table(led):
    spec, tag = led["spec"], led["tag"]
    best_val = led.get("best_val_bpb")
    rows = []
    for c in led["candidates"]:
        res = c.get("result") or {}
        val = res.get("val_bpb") if res.get("ok") else None
        delta = "-" if val is None or best_val is None or c["kind"] == "baseline" else f"{val - best_val:+.6f}"
        rows.append([c["name"], c.get("job_id") or "-", c.get("state") or "-",
                     "-" if val is None else f"{val:.6f}", delta, c.get("status", "-"),
                     (c["description"] if c.get("status") != "crash" else
                      f"{c['description']} -- {res.get('error') or ''}")[:70]])
    label = led.get("round_label", f"round {led['round']}")
    print(f"{label} of tag {tag}: backend {spec['backend']}, profile {spec['profile']}, gpu {spec['gpu']}; best before "
          f"{led['best_commit'][:10]} val_bpb {'-' if best_val is None else f'{best_val:.6f}'}"
          f" (threshold {led.get('threshold', 0):.6f}: {led.get('threshold_source', '')})")
    print(R.table(["candidate", "job_id", "state", "val_bpb", "delta_vs_best", "status", "description"], rows))


def outcome_lines(led):
    """What a finished round (winner, next round) or baseline (noise) came to: the lines under its table."""
    tag = led["tag"]
    if led["kind"] == "baseline":
        vals = [c["result"]["val_bpb"] for c in led["candidates"] if c.get("status") == "keep"]
        if len(vals) < 2:
            return [f"noise: only {len(vals)} run(s) succeeded; sigma not stored"]
        key = "/".join(led["spec"][k] for k in ("profile", "gpu", "backend"))
        return [f"noise: sigma {statistics.stdev(vals):.6f} over {len(vals)} runs (mean {statistics.fmean(vals):.6f}) "
                f"stored in {rel(tag_dir(tag) / 'noise.json')} for {key}"]
    w = next((c for c in led["candidates"] if c["name"] == led.get("winner")), None)
    if w:
        moved = "now at" if led.get("advanced") else "NOT moved; winner is"
        first = (f"winner: {w['name']} val_bpb {w['result']['val_bpb']:.6f} -> autoresearch/{tag} {moved} "
                 f"{led['advance_to'][:10]}")
    else:
        first = f"no winner: autoresearch/{tag} stays at {led['best_commit'][:10]}"
    n = led["round"] + 1
    return [first, f"next round: {n}  (candidate branches autoresearch/{tag}-r{n}-c1.., or SWEEP=...)"]


def print_report(led):
    print_table(led)
    print("\n".join(outcome_lines(led)))


def finalize(ctx, path, led):
    led["status"] = "finalizing"
    decide(ctx, led)
    write_json(path, led)
    if not all(c.get("recorded") for c in led["candidates"]):
        record_rows(ctx, led)
        write_json(path, led)
    advance(ctx, led)
    led["status"], led["finished"] = "done", iso()
    write_json(path, led)
    print_report(led)


def spec_of(ctx):
    return dict(backend=ctx.backend_name, profile=ctx.profile, gpu=ctx.gpu, k=ctx.k, sweep=" ".join(ctx.sweep.split()))


def run_ledger(ctx, path, led, sig):
    """Submit what is missing, wait, finalize. Interrupts cancel every job and mark the ledger."""
    try:
        if led["status"] in ("submitting", "running"):
            submit_all(ctx, path, led, sig)
            led["status"] = "running"
            write_json(path, led)
            wait_all(ctx, path, led, sig)
            sig.check()
        return True
    except Interrupted as e:
        ids = [c["job_id"] for c in led["candidates"] if c.get("job_id") and not c.get("result")]
        log(f"interrupted (signal {e.args[0]}): cancelling {len(ids)} job(s) of the round")
        with sig.critical():
            sig.pending = None
            ctx.backend.cancel(ids)
            cancel_candidates(path, led, "interrupted")
            led["status"], led["interrupted"] = "interrupted", iso()
            write_json(path, led)
        log(f"round marked interrupted; rerun the same command to restart its unfinished candidates ({path})")
        raise


def cancel_candidates(path, led, why, label=None):
    """After cancel-jobs.sh: record each cancelled job as a crash row (its time was paid for) and
    clear its id, so that a restart submits the candidate as a new attempt."""
    spec, tag = led["spec"], led["tag"]
    prices, _ = load_prices()
    price = price_of(prices, spec["backend"], spec["gpu"]) or 0.0
    rows, t = [], now()
    todo = [c for c in led["candidates"] if c.get("job_id") and not c.get("result")]
    for c in todo:
        wall = max(0.0, t - (c.get("submitted_at") or t))
        rows.append(R.make_row({}, commit=short(c["commit"]), status="crash",
                               description=f"{c['description']} -- crash: cancelled ({why})",
                               round=label or led.get("round_label", led["round"]), candidate=c["name"],
                               backend=spec["backend"], gpu=spec["gpu"], profile=spec["profile"],
                               job_id=c["job_id"], wall_s=wall, cost_usd=wall / 3600 * price,
                               overrides=c.get("typed") or c.get("overrides") or {}, tag=tag))
    if rows:  # rows first (deduplicated on a repeat), then the ledger forgets the ids
        R.append_rows(RESULTS_TSV, rows)
    for c in todo:
        c["cancelled_job_ids"] = c.get("cancelled_job_ids", []) + [c["job_id"]]
        c["job_id"], c["attempt"] = None, c.get("attempt", 1) + 1
        c.pop("state", None)
        c.pop("submitted_at", None)
    write_json(path, led)


def prepare_resume(ctx, path, led, sig):
    if led["status"] == "interrupted":
        todo = [c for c in led["candidates"] if not c.get("result")]
        log(f"restarting interrupted {path.stem}: {len(todo)} candidate(s) as new jobs")
        check_budget(ctx, len(todo))
        led["status"] = "submitting"
        write_json(path, led)
    else:
        todo = [c for c in led["candidates"] if not c.get("job_id")]
        if todo and led["status"] == "submitting":
            check_budget(ctx, len(todo))
        log(f"resuming {path.stem} ({led['status']}): {sum(1 for c in led['candidates'] if c.get('job_id'))} "
            f"job(s) recorded, {len(todo)} to submit")


def rerun_command(kind, tag, spec, detach=True):
    """The make command that starts (or resumes) a round or baseline with these values."""
    default_profile = "full" if spec["backend"] != "local" or local_gpu_name() else "tiny"
    cmd = "" if spec["profile"] == default_profile else f"AR_PROFILE={spec['profile']} "
    if kind == "baseline":
        cmd += f"make baseline REPEATS={spec['k']}"
    else:
        cmd += f"make round K={spec['k']}" + (f' SWEEP="{spec["sweep"]}"' if spec.get("sweep") else "")
    return cmd + f" TAG={tag} BACKEND={spec['backend']}" + (" DETACH=1" if detach else "")


def cmd_round(args):
    ctx = Context(args, require_k=False)
    detached = parse_detach(args.detach)
    with tag_lock(ctx.tag) as lock_fd, Signals() as sig:
        led_list = ledgers(ctx.tag)
        last = read_json(led_list[-1][1]) if led_list else None
        bl = ledgers(ctx.tag, "b")
        last_b = read_json(bl[-1][1]) if bl else None
        if last_b and last_b.get("status") not in ("done", "abandoned"):
            raise RoundError(f"baseline {bl[-1][1].stem} of tag {ctx.tag} is unfinished; rerun `make baseline` with "
                             f"the same values to finish it, or: python tools/round.py abandon --tag {ctx.tag}")
        if last and last.get("status") not in ("done", "abandoned"):
            path, led = led_list[-1][1], last
            spec = spec_of(ctx)
            if ctx.k is None:
                spec["k"], spec["sweep"] = led["spec"]["k"], spec["sweep"] or led["spec"]["sweep"]
            if spec != led["spec"]:
                raise RoundError(
                    f"round {led['round']} of tag {ctx.tag} is unfinished ({led['status']}) with "
                    + " ".join(f"{k}={v}" for k, v in led["spec"].items())
                    + f"; rerun with those values to resume it, or close it: python tools/round.py abandon "
                    f"--tag {ctx.tag}")
            prepare_resume(ctx, path, led, sig)
            ctx.backend.check()
            if detached and detach(ctx.tag, path.stem, lock_fd, rerun_command("round", ctx.tag, led["spec"]), "round"):
                return 0
        else:
            if ctx.k is None:
                raise UsageError("K is required: make round K=4 [SWEEP=...]")
            n = (last["round"] + 1) if last else 1
            ctx.backend.check()
            best = rev(ctx.ref) or rev("HEAD")  # the best branch is created only once all checks passed
            knobs = parse_knobs(show_file(best, TRAIN_PY))
            cands = build_candidates(ctx, n, best, knobs)
            where = checked_out_in(ctx.ref)
            if where:
                log(f"note: autoresearch/{ctx.tag} is checked out in {where[0]}; a winner will not move it "
                    f"(the driver never touches a working tree)")
            best_val = measured_best(ctx, best)
            if best_val is None:
                cands.insert(0, dict(index=0, name="c0", kind="baseline", commit=best, overrides={}, typed={},
                                     description="baseline (current best, unchanged)"))
            check_budget(ctx, len(cands))
            if detached and detach(ctx.tag, f"r{n}", lock_fd, rerun_command("round", ctx.tag, spec_of(ctx)), "round"):
                return 0  # the checks above ran here; data, ledger, jobs are the detached driver's
            ctx.backend.prepare_data(ctx.profile)
            if ctx.best_commit() != best:
                raise RoundError(f"autoresearch/{ctx.tag} moved while the round was being set up; run it again")
            path = tag_dir(ctx.tag) / f"r{n}.json"
            led = dict(version=1, kind="round", tag=ctx.tag, round=n, spec=spec_of(ctx), status="submitting",
                       created=iso(), best_commit=best, best_val_bpb=best_val, best_ref=ctx.ref,
                       expected_job_usd=ctx.expected_job_usd(), time_budget_s=ctx.profiles[ctx.profile],
                       overhead_s=ctx.overheads.get(ctx.backend_name, 0), candidates=cands)
            write_json(path, led)
            log(f"round {n} of tag {ctx.tag}: {len(cands)} job(s) on {ctx.backend_name} "
                f"(profile {ctx.profile}, gpu {ctx.gpu}), best {best[:10]} "
                f"val_bpb {'unmeasured' if best_val is None else f'{best_val:.6f}'}; ledger {path}")
        ctx.backend.check()
        run_ledger(ctx, path, led, sig)
        with sig.critical():
            if led["kind"] == "baseline":
                finalize_baseline(ctx, path, led)
            else:
                finalize(ctx, path, led)
    return 0


# ----------------------------------------------------------------------------------------------
# baseline, status, abandon
# ----------------------------------------------------------------------------------------------
def finalize_baseline(ctx, path, led):
    led["status"] = "finalizing"
    for c in led["candidates"]:
        c["status"] = "keep" if (c.get("result") or {}).get("ok") else "crash"
    write_json(path, led)
    if not all(c.get("recorded") for c in led["candidates"]):
        record_rows(ctx, led)
        write_json(path, led)
    vals = [c["result"]["val_bpb"] for c in led["candidates"] if c["status"] == "keep"]
    noise_path = tag_dir(ctx.tag) / "noise.json"
    if len(vals) >= 2:
        noise = read_json(noise_path, {}) or {}
        noise[ctx.key] = dict(sigma=statistics.stdev(vals), mean=statistics.fmean(vals), n=len(vals), values=vals,
                              commit=led["best_commit"], updated=iso(), ledger=path.name)
        write_json(noise_path, noise)
    led["status"], led["finished"] = "done", iso()
    led["best_val_bpb"] = statistics.fmean(vals) if vals else None
    led["threshold"], led["threshold_source"] = noise_threshold(ctx)
    write_json(path, led)
    print_report(led)


def cmd_baseline(args):
    ctx = Context(args, require_k=False)
    repeats = parse_int("REPEATS", args.repeats or "2", 2, MAX_K)
    detached = parse_detach(args.detach)
    with tag_lock(ctx.tag, "baseline") as lock_fd, Signals() as sig:
        rounds = ledgers(ctx.tag)
        last_r = read_json(rounds[-1][1]) if rounds else None
        if last_r and last_r.get("status") not in ("done", "abandoned"):
            raise RoundError(f"round {last_r['round']} of tag {ctx.tag} is unfinished; finish or abandon it first")
        bl = ledgers(ctx.tag, "b")
        last = read_json(bl[-1][1]) if bl else None
        spec = dict(spec_of(ctx), k=repeats, sweep="")
        if last and last.get("status") not in ("done", "abandoned"):
            path, led = bl[-1][1], last
            if spec != led["spec"]:
                raise RoundError(f"baseline {path.stem} of tag {ctx.tag} is unfinished with "
                                 + " ".join(f"{k}={v}" for k, v in led["spec"].items())
                                 + "; rerun with those values, or: python tools/round.py abandon --tag " + ctx.tag)
            prepare_resume(ctx, path, led, sig)
            ctx.backend.check()
            if detached and detach(ctx.tag, path.stem, lock_fd, rerun_command("baseline", ctx.tag, spec), "baseline"):
                return 0
        else:
            ctx.backend.check()
            best = rev(ctx.ref) or rev("HEAD")
            knobs = parse_knobs(show_file(best, TRAIN_PY))
            n = (last["round"] + 1) if last else 1
            cands = []
            for i in range(1, repeats + 1):
                c = dict(index=i, name=f"base{i}", kind="repeat", commit=best, overrides={}, typed={},
                         description=f"baseline repeat {i}")
                if i > 1:
                    if "SEED" in knobs and isinstance(knobs["SEED"], int):
                        c["overrides"] = {"SEED": str(knobs["SEED"] + i - 1)}
                        c["typed"] = {"SEED": knobs["SEED"] + i - 1}
                        c["description"] += f" (SEED={knobs['SEED'] + i - 1})"
                    else:
                        c["job_name"] = f"ar-{ctx.tag}-{best[:7]}-base{i}"
                cands.append(c)
            check_budget(ctx, len(cands))
            if detached and detach(ctx.tag, f"b{n}", lock_fd, rerun_command("baseline", ctx.tag, spec), "baseline"):
                return 0
            ctx.backend.prepare_data(ctx.profile)
            ctx.best_commit()
            path = tag_dir(ctx.tag) / f"b{n}.json"
            led = dict(version=1, kind="baseline", tag=ctx.tag, round=n, round_label=f"b{n}", spec=spec,
                       status="submitting", created=iso(), best_commit=best, best_val_bpb=None, best_ref=ctx.ref,
                       expected_job_usd=ctx.expected_job_usd(), time_budget_s=ctx.profiles[ctx.profile],
                       overhead_s=ctx.overheads.get(ctx.backend_name, 0), candidates=cands)
            write_json(path, led)
            log(f"baseline b{n} of tag {ctx.tag}: {repeats} run(s) of {best[:10]} on {ctx.backend_name} "
                f"(profile {ctx.profile}, gpu {ctx.gpu}); ledger {path}")
        run_ledger(ctx, path, led, sig)
        with sig.critical():
            finalize_baseline(ctx, path, led)
    return 0


def recorded_state(backend, job_id):
    """The job's state as its backend last recorded it (docs/contract.md: <state dir>/<backend>/jobs/<id>/state)."""
    if not JOB_ID_RE.fullmatch(job_id or ""):
        return None
    for folder in dict.fromkeys((backend, BACKENDS.get(backend, backend))):
        with contextlib.suppress(OSError):
            word = (STATE_ROOT / folder / "jobs" / job_id / "state").read_text().strip()
            if re.fullmatch(r"[a-z]+", word):
                return word
    return None


def fmt_s(s):
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def last_ledgers(tag):
    """[(path, ledger)] of the tag's last round and last baseline (those that exist)."""
    out = []
    for prefix in ("r", "b"):
        found = ledgers(tag, prefix)
        led = read_json(found[-1][1]) if found else None
        if led:
            out.append((found[-1][1], led))
    return out


def unfinished(led):
    return led.get("status") not in ("done", "abandoned")


def current_ledger(tag):
    """(path, ledger) that the tag's driver works on or last finished: the unfinished one, else the more
    recently written of the last round and the last baseline; (None, None) if the tag has none."""
    items = last_ledgers(tag)
    for p, led in items:
        if unfinished(led):
            return p, led
    return max(items, key=lambda x: x[0].stat().st_mtime, default=(None, None))


def current_driver(tag):
    """The tag's driver.json unless a later run (another ledger written after it started) made it stale."""
    rec = driver_record(tag)
    if not rec or not isinstance(rec.get("started"), (int, float)) or not isinstance(rec.get("ledger"), str):
        return None
    for prefix in ("r", "b"):
        for _, p in ledgers(tag, prefix):
            if p.stem != rec["ledger"] and p.stat().st_mtime > rec["started"]:
                return None
    return rec


def exited(rec):
    if rec.get("rc") is None:
        return "the detached driver died"
    return f"the detached driver exited {rec['rc']}" + (f": {rec['error']}" if rec.get("error") else "")


def driver_line(tag, path, led):
    """Whether an unfinished round's driver runs, and what to do when it does not."""
    holder, rec = lock_holder(tag), current_driver(tag)
    rec = rec if rec and rec["ledger"] == path.stem else None
    logp = f"; log {rec['log']}" if rec else ""
    if holder:
        pid = holder[0]
        how = ", detached" if rec and pid and rec.get("pid") == pid else ""
        return (f"driver: running (pid {pid or '?'}{how}){logp}; `make round-wait TAG={tag}` waits for the end, "
                f"`python tools/round.py abandon --tag {tag}` stops it and closes the round")
    return (f"driver: NOT running{f' ({exited(rec)})' if rec else ''}{logp}; the round is stopped: rerun to resume "
            f"it: {rerun_command(led['kind'], tag, led['spec'])} (or abandon it: python tools/round.py abandon --tag "
            f"{tag})")


def detached_lines(tag):
    """Status lines for the tag's detached driver when no unfinished ledger shows it: still starting, ended
    before its round began, or done (its outcome)."""
    rec = current_driver(tag)
    if not rec:
        holder = lock_holder(tag)
        return [f"tag {tag}: a driver is starting (pid {holder[0] or '?'}), no ledger yet"] if holder else []
    name, path = rec["ledger"], tag_dir(tag) / f"{rec['ledger']}.json"
    led = read_json(path) if path.exists() else None
    if led is None:
        holder = lock_holder(tag)
        if holder:
            return [f"tag {tag} {name}: the detached driver (pid {holder[0] or '?'}) is starting (checks done; "
                    f"preparing data, writing the ledger); log {rec['log']}"]
        return [f"tag {tag} {name}: {exited(rec)} before the round started; log {rec['log']}; fix the cause and "
                f"rerun: {rec.get('command')}"]
    if led.get("status") == "done":
        return [f"tag {tag} {name}: done (detached, {exited(rec).replace('the detached driver ', '')}): "
                f"{outcome_lines(led)[0]}; log {rec['log']}"]
    return []


def cmd_status(args):
    tag = args.tag
    if tag:
        validate_tag(tag)
    recorded, pending = spent_usd()
    budget = os.environ.get("AR_BUDGET_USD", "").strip()
    items = [(t, p, led) for t, p, led in all_unfinished() if not tag or t == tag]
    if not items:
        print("no unfinished rounds" + (f" for tag {tag}" if tag else ""))
    t = now()
    for t_name, p, led in items:
        spec = led.get("spec", {})
        print(f"tag {t_name} {p.stem} ({led.get('status')}): backend {spec.get('backend')}, profile "
              f"{spec.get('profile')}, gpu {spec.get('gpu')}, best {led.get('best_commit', '')[:10]}; ledger "
              f"{rel(p)}")
        print(driver_line(t_name, p, led))
        expect = float(led.get("time_budget_s") or 0) + float(led.get("overhead_s") or 0)
        rows = []
        for c in led.get("candidates", []):
            if c.get("result"):
                state = c.get("state") or "done"
                elapsed = (c.get("finished_at") or t) - (c.get("submitted_at") or t)
                remaining = "-"
            elif c.get("job_id"):
                state = recorded_state(spec.get("backend"), c["job_id"]) or "submitted"
                elapsed = t - (c.get("submitted_at") or t)
                remaining = fmt_s(expect - elapsed) if expect - elapsed > 0 else "overdue"
            else:
                state, elapsed, remaining = "not submitted", 0, "-"
            val = (c.get("result") or {}).get("val_bpb")
            rows.append([c["name"], c.get("job_id") or "-", state, fmt_s(elapsed), remaining,
                         "-" if val is None else f"{val:.6f}", c.get("description", "")[:50]])
        print(R.table(["candidate", "job_id", "state", "elapsed", "remaining", "val_bpb", "description"], rows))
        print()
    busy = {t_name for t_name, _, _ in items}
    tags = [tag] if tag else sorted(d.name for d in STATE.iterdir() if d.is_dir()) if STATE.is_dir() else []
    for t_name in tags:
        if t_name not in busy:
            for line in detached_lines(t_name):
                print(line)
    try:
        of = f" of AR_BUDGET_USD ${float(budget):.2f}" if budget else ""
    except ValueError:
        of = f" (AR_BUDGET_USD={budget!r} is not a number)"
    print(f"spent ${recorded:.2f} recorded + ${pending:.2f} expected for unfinished jobs" + of)
    return 0


WAIT_RUNNING = 3  # `wait`: the round is still running at the timeout


def cmd_wait(args):
    """Block until the tag's driver ends or TIMEOUT seconds pass. 0: the round (or baseline) is done, its
    table printed; 3: still running, call again; 1: it ended without finishing (what to do is printed)."""
    tag = validate_tag(args.tag)
    timeout = parse_int("TIMEOUT", args.timeout or "100", 0, 9999)
    if not tag_dir(tag).is_dir():
        raise RoundError(f"tag {tag!r} has no round or baseline to wait for")
    deadline = now() + timeout
    holder = lock_holder(tag)
    while holder and now() < deadline:
        time.sleep(max(0.0, min(0.5, deadline - now())))
        holder = lock_holder(tag)
    path, led = current_ledger(tag)
    rec = current_driver(tag)
    if holder:
        pid = holder[0] or "?"
        if led and unfinished(led):
            cands = led.get("candidates", [])
            done = sum(1 for c in cands if c.get("result"))
            print(f"{path.stem} of tag {tag} is still running after {timeout}s ({led.get('status')}, {done} of "
                  f"{len(cands)} job(s) ended; driver pid {pid}): run `make round-wait TAG={tag}` again; "
                  "`make status` shows its jobs")
        else:
            print(f"a driver of tag {tag} (pid {pid}) is still starting after {timeout}s (no ledger yet): run "
                  f"`make round-wait TAG={tag}` again")
        return WAIT_RUNNING
    if rec and not (tag_dir(tag) / f"{rec['ledger']}.json").exists():
        print(f"{rec['ledger']} of tag {tag}: {exited(rec)} before the round started; log {rec['log']}; fix the "
              f"cause and rerun: {rec.get('command')}")
        return 1
    if led is None:
        raise RoundError(f"tag {tag!r} has no round or baseline to wait for")
    logp = f"; log {rec['log']}" if rec and rec["ledger"] == path.stem else ""
    if unfinished(led):
        why = f" ({exited(rec)})" if logp else ""
        print(f"{path.stem} of tag {tag} is unfinished ({led.get('status')}) and no driver is running{why}{logp}; "
              f"rerun to resume it: {rerun_command(led['kind'], tag, led['spec'])} (or abandon it: python "
              f"tools/round.py abandon --tag {tag})")
        return 1
    if led.get("status") != "done":
        print(f"{path.stem} of tag {tag} was abandoned")
        return 1
    print_report(led)
    return 0


def stop_driver(tag, timeout=300):
    """SIGTERM the driver running on the tag (it cancels its jobs, as Ctrl-C does) and wait until it has exited."""
    holder = lock_holder(tag)
    if holder is None:
        return
    pid, role = holder
    if not pid or role not in ("round", "baseline"):
        raise RoundError(f"another {role} on tag {tag!r} is running" + (f" (pid {pid})" if pid else "")
                         + "; wait for it, then rerun abandon")
    log(f"stopping the running {role} driver of tag {tag} (pid {pid}) with SIGTERM; it cancels its jobs")
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    except PermissionError:
        raise RoundError(f"cannot signal the driver of tag {tag!r} (pid {pid}): not yours") from None
    deadline = now() + timeout
    while lock_holder(tag) is not None:
        if now() > deadline:
            raise RoundError(f"the driver of tag {tag!r} (pid {pid}) is still running {timeout}s after SIGTERM; "
                             f"`kill {pid}` again or wait, then rerun abandon")
        time.sleep(0.2)


def abandon_label(tag, n):
    """`<N>-abandoned`, `<N>-abandoned-2`, ...: the first label whose archived ledger does not exist."""
    k = 1
    while True:
        label = f"{n}-abandoned" + (f"-{k}" if k > 1 else "")
        if not (tag_dir(tag) / f"r{label}.json").exists():
            return label
        k += 1


def record_finished(led, label):
    """An abandoned ledger is never finalized: rows for its jobs that ended but were never recorded (their
    time was paid for): discard with a result, else crash."""
    spec, tag = led["spec"], led["tag"]
    prices, _ = load_prices()
    price = price_of(prices, spec["backend"], spec["gpu"]) or 0.0
    todo = [c for c in led["candidates"] if c.get("result") and not c.get("recorded")]
    rows = []
    for c in todo:
        res = c["result"]
        wall = wall_seconds(led.get("overhead_s"), c)
        if res.get("ok"):
            status, desc = "discard", f"{c['description']} (abandoned)"
        else:
            status, desc = "crash", f"{c['description']} -- crash: {res.get('error') or c.get('state') or 'unknown'}"
        rows.append(R.make_row(res, commit=short(c["commit"]), status=status, description=desc, round=label,
                               candidate=c["name"], backend=spec["backend"],
                               gpu=gpu_key(res.get("gpu"), prices) or spec["gpu"],
                               profile=res.get("profile") or spec["profile"], job_id=c.get("job_id"), wall_s=wall,
                               cost_usd=wall / 3600 * price, overrides=c.get("typed") or c.get("overrides") or {},
                               tag=tag))
    if rows:
        R.append_rows(RESULTS_TSV, rows)
    for c in todo:
        c["recorded"] = True


def abandon_ledger(tag, path, led):
    """Cancel the ledger's jobs and close it. A round's ledger r<N>.json is archived as r<N>-abandoned.json
    (its rows in results.tsv get round `<N>-abandoned`, its log and winner ref the same suffix), so the next
    round is N again and uses the candidate branches prepared for N. Each step is idempotent: an abandon
    that dies half-way is simply run again."""
    backend = Backend(led["spec"]["backend"], tag)
    ids = [c["job_id"] for c in led["candidates"] if c.get("job_id") and not c.get("result")]
    if led.get("kind") == "baseline":
        label = led.get("round_label", path.stem)
        backend.cancel(ids)
        cancel_candidates(path, led, "abandoned")
        record_finished(led, label)
        led["status"], led["abandoned"] = "abandoned", iso()
        write_json(path, led)
        log(f"abandoned {path.stem} of tag {tag}; cancelled {len(ids)} job(s)")
        return
    n = led["round"]
    label = led.get("abandon_label") or abandon_label(tag, n)
    if led.get("abandon_label") != label:
        led["abandon_label"] = label
        write_json(path, led)
    backend.cancel(ids)
    cancel_candidates(path, led, "abandoned", label=label)
    record_finished(led, label)
    relabelled = R.relabel_round(RESULTS_TSV, tag, str(n), label)  # e.g. rows of an earlier interrupt
    old_ref = f"refs/autoresearch/{tag}/r{n}"
    sha = rev(old_ref)
    if sha:
        git("update-ref", f"refs/autoresearch/{tag}/r{label}", sha)
        git("update-ref", "-d", old_ref, sha)
    led["status"], led["abandoned"], led["round_label"] = "abandoned", iso(), label
    archive = tag_dir(tag) / f"r{label}.json"
    write_json(archive, led)
    path.unlink()
    log_file = tag_dir(tag) / f"r{n}.log"
    if log_file.exists():
        os.replace(log_file, tag_dir(tag) / f"r{label}.log")
    log(f"abandoned round {n} of tag {tag}; cancelled {len(ids)} job(s); its ledger is now {rel(archive)} and its "
        f"results.tsv rows are round {label}" + (f" ({relabelled} relabelled)" if relabelled else ""))
    log(f"the next round is {n} again: candidate branches autoresearch/{tag}-r{n}-c1.. (as prepared), or SWEEP=...")


def cmd_abandon(args):
    tag = validate_tag(args.tag)
    stop_driver(tag)
    with tag_lock(tag, "abandon"):
        found = False
        for prefix in ("r", "b"):
            for _, p in ledgers(tag, prefix):
                led = read_json(p)
                if led and unfinished(led):
                    found = True
                    abandon_ledger(tag, p, led)
        rec = driver_record(tag)
        if rec and not (tag_dir(tag) / f"{rec.get('ledger')}.json").exists():
            (tag_dir(tag) / DRIVER).unlink(missing_ok=True)  # it named the archived ledger, or one never written
        if not found:
            log(f"no unfinished round for tag {tag}")
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(prog="tools/round.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    env = os.environ.get
    helps = {"round": "one round of K experiments (--detach: run it in the background)",
             "baseline": "run the best REPEATS times; stores the noise sigma (--detach: in the background)",
             "status": "unfinished rounds: their jobs, whether their driver runs, its log; the spend",
             "wait": "wait for the tag's round or baseline to end, at most --timeout seconds (exit 3: still running)",
             "abandon": "stop the tag's driver, cancel its unfinished round's jobs and close it"}
    for name in ("round", "baseline", "status", "wait", "abandon"):
        p = sub.add_parser(name, help=helps[name])
        p.add_argument("--tag", default=env("AR_ROUND_TAG") or None)
        if name in ("round", "baseline"):
            p.add_argument("--backend", default=env("AR_ROUND_BACKEND") or None)
            p.add_argument("--detach", nargs="?", const="1", default=env("AR_ROUND_DETACH") or None,
                           help="1: check everything here, then run detached (own session, log under the state "
                           "dir); prints the log path and exits 0")
        if name == "wait":
            p.add_argument("--timeout", default=env("AR_ROUND_TIMEOUT") or None,
                           help="seconds, 0 to 9999 (default 100)")
        if name == "round":
            p.add_argument("--k", default=env("AR_ROUND_K") or None)
            p.add_argument("--sweep", default=env("AR_ROUND_SWEEP") or None)
        if name == "baseline":
            p.add_argument("--repeats", default=env("AR_ROUND_REPEATS") or None)
    args = ap.parse_args(argv)
    commands = {"round": cmd_round, "baseline": cmd_baseline, "status": cmd_status, "wait": cmd_wait,
                "abandon": cmd_abandon}
    try:
        rc = commands[args.cmd](args)
    except UsageError as e:
        log(f"error: {e}")
        rc = 2
    except RoundError as e:
        log(f"error: {e}")
        rc = 1
    except Interrupted:
        rc = 130
    except KeyboardInterrupt:
        log("interrupted")
        rc = 130
    if DETACHED:  # the detached driver's last line in its log
        print(f"=== {iso()} detached driver pid {os.getpid()} exits {rc} ===", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
