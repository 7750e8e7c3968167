"""ar_modal.py -- the Modal backend's client: spawn, collect, cancel and read logs by call id.

Internal to modal/: the fan-out scripts run it by path (`python modal/ar_modal.py CMD ...`) after
validating their arguments with _lib.sh. It talks to the *deployed* app (modal/app.py, `make
modal-deploy`) through four calls of the `modal` package, and keeps the records of the contract under
${AR_STATE_DIR:-<repo>/.ar}/modal/:

    names/<name>            the latest call id of that job name (the idempotency index)
    jobs/<call id>/         meta.json, state, log (all written atomically), .lock
    submit.lock             one submit at a time

    submit --name N --tag T --commit SHA --env-json JSON --tar FILE [--limit-s S]
                            the existing live/succeeded job of that name, else Function.spawn; prints the id
    poll ID...              one non-blocking FunctionCall.get(timeout=0) per unfinished job; records outcomes
    cancel --to STATE --reason TEXT ID...
                            FunctionCall.cancel(terminate_containers=True) for each unfinished job
    logs ID                 the stored log of a finished job, else the call's live log tail

The `modal` module is the seam: with AR_MODAL_FAKE=<path of a python file> that file is loaded in its
place (the tests' double, tests/fakes/modal/fake_modal.py); it offers the same names
(Function.from_name, FunctionCall.from_id, Volume.from_name, exception.*). Exit codes: 0, 1 (a cancel
that kept failing), 2 (usage, unknown id, name taken), 3 (Modal unavailable: package missing, not
authenticated, app not deployed, unreachable).
"""

import argparse
import contextlib
import fcntl
import importlib.util
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

APP_NAME = os.environ.get("AR_MODAL_APP") or "autoresearch"  # same defaults as modal/app.py
VOLUME_NAME = os.environ.get("AR_MODAL_VOLUME") or "autoresearch-cache"
FUNCTION = "run_experiment"
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TERMINAL = ("succeeded", "failed", "timeout", "cancelled")
LIVE_LOG_LINES = 1000
PROG = os.environ.get("AR_MODAL_PROG") or "ar_modal.py"


class Unavailable(Exception):
    """Modal cannot be used right now (exit 3); the message says how to fix it."""


class UsageError(Exception):
    """Bad request (exit 2)."""


def now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def warn(msg):
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def log_change(msg):
    print(f"{now()} {PROG}: {msg}", file=sys.stderr, flush=True)


# ---- the seam -------------------------------------------------------------------------------------
def load_modal():
    """The real `modal` package, or the test double named by AR_MODAL_FAKE."""
    fake = os.environ.get("AR_MODAL_FAKE")
    if fake:
        spec = importlib.util.spec_from_file_location("ar_modal_fake", fake)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    try:
        import modal
    except ImportError:
        raise Unavailable(f"the 'modal' package is not installed for {sys.executable}: run 'make setup' "
                          "(or pip install modal), or point AR_MODAL_PYTHON at an interpreter that has it") from None
    return modal


def unavailable(m, exc):
    """An Unavailable for errors that mean "fix your setup / try later", else None."""
    ex = m.exception
    if isinstance(exc, ex.AuthError):
        return Unavailable(f"not authenticated with Modal ({first_line(exc)}): run 'modal setup' "
                           "(or 'modal token new')")
    if isinstance(exc, (ex.ConnectionError, ConnectionError)):
        return Unavailable(f"cannot reach Modal ({first_line(exc)}); check the network and retry")
    return None


def first_line(exc):
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# ---- records --------------------------------------------------------------------------------------
def state_root():
    base = os.environ.get("AR_STATE_DIR") or str(Path(__file__).resolve().parent.parent / ".ar")
    return Path(base).absolute() / "modal"


def write_atomic(path, text):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path, obj):
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


class Job:
    def __init__(self, root, job_id):
        self.id = job_id
        self.dir = root / "jobs" / job_id

    def exists(self):
        return bool(ID_RE.match(self.id)) and (self.dir / "meta.json").is_file()

    @property
    def meta(self):
        return json.loads((self.dir / "meta.json").read_text())

    @property
    def state(self):
        try:
            return (self.dir / "state").read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def note(self, text):
        with (self.dir / "log").open("a") as log:
            log.write(f"[ar-modal] {now()} {text}\n")

    @contextlib.contextmanager
    def locked(self):
        """The job's lock: every state change (and what it records) happens under it."""
        with (self.dir / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _set_state(self, new, **fields):
        meta = self.meta
        meta.update(fields, state=new)
        meta["started_at" if new == "running" else "finished_at"] = now()
        write_json(self.dir / "meta.json", meta)
        write_atomic(self.dir / "state", new + "\n")

    def transition(self, new, allowed, **fields):
        """`new` if the state is one of `allowed`, with meta fields; else False."""
        with self.locked():
            if self.state not in allowed:
                return False
            self._set_state(new, **fields)
        return True

    def finish(self, state, log=None, note=None, **fields):
        """Record an outcome of a queued or running job: log, note, then the terminal state.
        A job that is already terminal keeps its records as they are (returns False)."""
        with self.locked():
            if self.state not in ("queued", "running"):
                return False
            if log is not None:
                write_atomic(self.dir / "log", log if log.endswith("\n") or not log else log + "\n")
            if note:
                self.note(note)
            self._set_state(state, **fields)
        return True


# ---- collecting -----------------------------------------------------------------------------------
def collect(m, job, timeout=0.0):
    """One FunctionCall.get(timeout); records the outcome of a finished call. Raises Unavailable."""
    if job.state in TERMINAL:
        return
    call = m.FunctionCall.from_id(job.id)
    ex = m.exception
    try:
        out = call.get(timeout=timeout)
    except ex.OutputExpiredError:  # a subclass of modal's TimeoutError: test it first
        recover_from_volume(m, job)
        return
    except ex.FunctionTimeoutError as e:  # the call ran past the Function's timeout (server-side limit)
        job.finish("failed", note=f"the call hit the Function's timeout ({first_line(e)}) -> failed")
        return
    except TimeoutError:  # builtin: no output yet, the call is queued or running
        if job.state == "queued" and started(call):
            job.transition("running", ("queued",))
        return
    except Exception as e:  # noqa: BLE001 -- anything else: the remote function raised, or Modal did
        if (u := unavailable(m, e)) is not None:
            raise u from None
        job.finish("failed", note=f"the call raised {first_line(e)} -> failed")
        return
    record(job, out)


def started(call):
    """True once a container has picked the call up (best effort: Modal's call graph)."""
    try:
        return any(getattr(i, "task_id", "") for i in call.get_call_graph())
    except Exception:  # noqa: BLE001 -- informational only
        return False


def record(job, out):
    if not isinstance(out, dict) or out.get("state") not in ("succeeded", "failed"):
        job.finish("failed", note=f"unexpected return value from {FUNCTION}: {str(out)[:200]} -> failed")
        return
    note = (f"collected call {job.id}: {out['state']} on {out.get('gpu', '?')} "
            f"(requested {out.get('gpu_requested', '?')}), {out.get('seconds', '?')}s; "
            f"log and exit_code also on the Volume {VOLUME_NAME} under {out.get('run_dir', '?')}/")
    if out.get("log_truncated"):
        note += " (this log is the tail; the full one is on the Volume)"
    job.finish(out["state"], log=out.get("log") or "", note=note, exit_code=out.get("exit_code"),
               gpu=out.get("gpu"), gpu_requested=out.get("gpu_requested"), run_dir=out.get("run_dir"))


def recover_from_volume(m, job):
    """The call's result expired on Modal's side: read what the run left under runs/<id>/ on the Volume."""
    vol = m.Volume.from_name(VOLUME_NAME)

    def read(name):
        try:
            return b"".join(vol.read_file(f"runs/{job.id}/{name}")).decode(errors="replace")
        except Exception as e:  # noqa: BLE001
            if (u := unavailable(m, e)) is not None:
                raise u from None
            return None

    log, code = read("log"), (read("exit_code") or "").strip()
    if not code.lstrip("-").isdigit():
        job.finish("failed", log=log, note="Modal has no result for the call (expired, or cancelled elsewhere) "
                   f"and the Volume has no runs/{job.id}/exit_code -> failed")
        return
    state = "succeeded" if int(code) == 0 else "failed"  # app.py writes exit_code once the trainer has ended
    job.finish(state, log=log, run_dir=f"runs/{job.id}", exit_code=int(code),
               note=f"the call's result expired on Modal; recovered from the Volume (runs/{job.id}/) -> {state}")


# ---- commands -------------------------------------------------------------------------------------
def lock_submit(root):
    root.mkdir(parents=True, exist_ok=True)
    fh = (root / "submit.lock").open("a")
    for _ in range(1200):
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fh
        except BlockingIOError:
            time.sleep(0.1)
    raise Unavailable(f"another submit holds {root / 'submit.lock'} for 2 minutes; is one stuck?")


def cmd_submit(m, args):
    root = state_root()
    env = json.loads(args.env_json)
    lock = lock_submit(root)  # noqa: F841 -- held until exit
    (root / "jobs").mkdir(exist_ok=True)
    (root / "names").mkdir(exist_ok=True)
    index = root / "names" / args.name
    if index.is_file():
        old = Job(root, index.read_text().strip())
        if old.exists():
            collect(m, old)
            st = old.state
            if st in ("queued", "running", "succeeded"):
                meta = old.meta
                if meta.get("commit") != args.commit or meta.get("env") != env:
                    raise UsageError(f"name '{args.name}' is taken by job {old.id} ({st}) for another commit "
                                     "or AR_PROFILE/AR_DATA; choose another --name")
                warn(f"{args.name}: already submitted as {old.id} ({st}); not starting another")
                print(old.id)
                return 0
            warn(f"{args.name}: the last job {old.id} ended {st}; starting a new one")

    job = {"name": args.name, "commit": args.commit, "env": env, "snapshot": Path(args.tar).read_bytes(),
           "forward": json.loads(args.forward_json), "limit_s": args.limit_s}
    try:
        call = m.Function.from_name(APP_NAME, FUNCTION).spawn(job)
    except Exception as e:  # noqa: BLE001
        if isinstance(e, m.exception.NotFoundError):
            raise Unavailable(f"the Modal app '{APP_NAME}' is not deployed ({first_line(e)}): run "
                              "'make modal-deploy' (after 'modal setup')") from None
        raise unavailable(m, e) or Unavailable(f"spawning {APP_NAME}.{FUNCTION} failed: {first_line(e)}") from None
    call_id = call.object_id
    try:  # from here on a call exists: never leave it running without a record
        if not ID_RE.match(call_id or ""):
            raise RuntimeError(f"Modal returned an unusable call id {call_id!r}")
        tmp = root / "jobs" / f".tmp-{call_id}-{os.getpid()}"
        tmp.mkdir()
        write_json(tmp / "meta.json", {
            "backend": "modal", "id": call_id, "name": args.name, "tag": args.tag, "commit": args.commit,
            "commit_short": args.commit[:7], "env": env, "app": APP_NAME, "function": FUNCTION,
            "volume": VOLUME_NAME, "limit_s": args.limit_s, "state": "queued", "submitted_at": now(),
            "started_at": None, "finished_at": None, "exit_code": None, "gpu": None, "run_dir": None})
        write_atomic(tmp / "state", "queued\n")
        write_atomic(tmp / "log", "")
        os.replace(tmp, root / "jobs" / call_id)
        write_atomic(index, call_id + "\n")
    except BaseException:
        try:
            call.cancel(terminate_containers=True)
            warn(f"{call_id}: cancelled again, its record could not be written")
        except Exception as e:  # noqa: BLE001
            warn(f"{call_id}: spawned but could not be recorded or cancelled ({first_line(e)}); cancel it in "
                 f"Modal's dashboard (app {APP_NAME}) or with modal.FunctionCall.from_id('{call_id}').cancel()")
        raise
    warn(f"{call_id}: submitted {args.name} ({args.commit[:7]}"
         f"{' with ' + ' '.join(f'{k}={v}' for k, v in env.items()) if env else ''}) to {APP_NAME}.{FUNCTION}")
    print(call_id)
    return 0


def jobs_of(root, ids):
    jobs = [Job(root, i) for i in ids]
    for job in jobs:
        if not job.exists():
            raise UsageError(f"unknown job id '{job.id}'")
    return jobs


def cmd_poll(m, args):
    for job in jobs_of(state_root(), args.ids):
        collect(m, job, timeout=0)
    return 0


def cmd_cancel(m, args):
    rc = 0
    for job in jobs_of(state_root(), args.ids):
        if job.state in TERMINAL:
            warn(f"{job.id}: already {job.state}")
            continue
        collect(m, job)  # it may have just finished: then its real outcome counts
        if job.state in TERMINAL:
            continue
        before = job.state
        if not send_cancel(m, job):
            rc = 1
            continue
        tail = live_log(m, job.id)
        if job.finish(args.to, log=tail or None, note=f"{args.to}: {args.reason} (FunctionCall.cancel sent)") \
                and not args.quiet:
            log_change(f"{job.id}: {before} -> {args.to}")
    return rc


def send_cancel(m, job):
    """FunctionCall.cancel, terminating the container (it serves this one call); retried, then reported."""
    for attempt in range(3):
        try:
            m.FunctionCall.from_id(job.id).cancel(terminate_containers=True)
            return True
        except Exception as e:  # noqa: BLE001
            if attempt == 2:
                warn(f"{job.id}: cancel failed 3 times ({first_line(e)}); run cancel-jobs.sh {job.id} again")
            else:
                time.sleep(1 + attempt)
    return False


def live_log(m, job_id):
    try:
        entries = m.FunctionCall.from_id(job_id).logs.tail(LIVE_LOG_LINES)
        return "".join(getattr(e, "message", str(e)) for e in entries)
    except Exception as e:  # noqa: BLE001
        warn(f"{job_id}: no live log ({first_line(e)})")
        return ""


def cmd_logs(m, args):
    (job,) = jobs_of(state_root(), [args.id])
    if job.state in TERMINAL:
        sys.stdout.write((job.dir / "log").read_text(errors="replace"))
        return 0
    warn(f"{job.id}: {job.state}; the live log from Modal (the full log is stored once the job ends)")
    sys.stdout.write(live_log(m, job.id))
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="ar_modal.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("submit")
    p.add_argument("--name", required=True)
    p.add_argument("--tag", required=True)
    p.add_argument("--commit", required=True)
    p.add_argument("--env-json", default="{}")
    p.add_argument("--forward-json", default="{}")
    p.add_argument("--tar", required=True)
    p.add_argument("--limit-s", type=int, default=None)
    p = sub.add_parser("poll")
    p.add_argument("ids", nargs="+")
    p = sub.add_parser("cancel")
    p.add_argument("--to", choices=("cancelled", "timeout"), default="cancelled")
    p.add_argument("--reason", default="cancel-jobs.sh")
    p.add_argument("--quiet", action="store_true", help="no state-change lines (the caller prints them)")
    p.add_argument("ids", nargs="+")
    p = sub.add_parser("logs")
    p.add_argument("id")
    args = parser.parse_args(argv)
    try:
        if args.cmd in ("poll", "cancel", "logs"):  # unknown ids first, before anything is touched
            jobs_of(state_root(), args.ids if hasattr(args, "ids") else [args.id])
        m = load_modal()
        return {"submit": cmd_submit, "poll": cmd_poll, "cancel": cmd_cancel, "logs": cmd_logs}[args.cmd](m, args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except Unavailable as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    if sys.argv[1:2] in (["poll"], ["cancel"]):  # a Ctrl-C of the calling script must not cut these short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(main())
