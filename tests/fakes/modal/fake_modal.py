"""A test double of the few `modal` calls the Modal backend's client makes (modal/ar_modal.py).

ar_modal.py loads this file in place of the `modal` package when AR_MODAL_FAKE=<this file>. It keeps
its "server" under AR_MODAL_FAKE_DIR:

    apps/<app name>          `deploy`ed apps: the path of their app.py
    calls/<fc-id>/           job.pkl, outcome.pkl (("ok", value) | ("err", exception)), worker.out
                             (the container's stdout: the live log), pid, alive.lock, started, cancelled

A spawned call runs in a detached local process (a "container", its own process group) that imports
the deployed app.py and calls `run_experiment.local(job)` -- the real function body, on this machine,
with AR_CACHE_DIR (inherited from the submitter) standing in for the Volume and
`modal.current_function_call_id()` returning the fake call id. Cancel kills that process group and
returns once it is gone.

Failure modes, from AR_MODAL_FAKE_MODE (comma-separated), read by whichever process hits them:
    unauthenticated   every call raises exception.AuthError (no `modal setup`)
    expire            get() of a finished call raises exception.OutputExpiredError
    raise             the function raises instead of running the trainer
    crash             the container dies without an outcome

    python tests/fakes/modal/fake_modal.py deploy path/to/modal/app.py   # needs AR_MODAL_FAKE_DIR
"""

import builtins
import fcntl
import importlib.util
import os
import pickle
import secrets
import signal
import subprocess
import sys
import time
import types
from pathlib import Path


class exception:  # the names ar_modal.py catches, with modal's hierarchy where it matters
    class Error(Exception):
        pass

    class AuthError(Error):
        pass

    class NotFoundError(Error):
        pass

    class ConnectionError(Error):
        pass

    class ExecutionError(Error):
        pass

    class RemoteError(Error):
        pass

    class TimeoutError(Error):  # modal.exception.TimeoutError: not the builtin one
        pass

    class FunctionTimeoutError(TimeoutError):
        pass

    class OutputExpiredError(TimeoutError):
        pass


def _modes():
    return set(filter(None, os.environ.get("AR_MODAL_FAKE_MODE", "").split(",")))


def _server():
    root = os.environ.get("AR_MODAL_FAKE_DIR")
    if not root:
        raise exception.ConnectionError("AR_MODAL_FAKE_DIR is not set")
    return Path(root)


def _check_auth():
    if "unauthenticated" in _modes():
        raise exception.AuthError("Token missing. Could not authenticate client. (fake)")


def _dump(path, obj):
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(pickle.dumps(obj))
    os.replace(tmp, path)


def _alive(call_dir):
    """True while the call's container process lives (it holds alive.lock)."""
    try:
        with (call_dir / "alive.lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
    except BlockingIOError:
        return True


def _group_alive(pgid):
    """True while a non-zombie process of process group `pgid` exists."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


class _Function:
    def __init__(self, app_name, name):
        self.app_name, self.name = app_name, name

    def spawn(self, job):
        _check_auth()
        app_file = _server() / "apps" / self.app_name
        if not app_file.is_file():
            raise exception.NotFoundError(f"Lookup failed for Function '{self.name}' from the "
                                          f"'{self.app_name}' app: App '{self.app_name}' not found (fake)")
        call_id = "fc-" + secrets.token_hex(13).upper()
        call_dir = _server() / "calls" / call_id
        (call_dir / "tmp").mkdir(parents=True)
        _dump(call_dir / "job.pkl", {"app": app_file.read_text().strip(), "function": self.name, "job": job})
        # Launch through a short-lived parent, so the container is nobody's child here (no zombie).
        subprocess.run([sys.executable, __file__, "launch", str(call_dir)], check=True)
        return FunctionCall(call_id)


class Function:
    @staticmethod
    def from_name(app_name, name, **_):
        return _Function(app_name, name)


class _Logs:
    def __init__(self, call_dir):
        self.call_dir = call_dir

    def tail(self, entries=100, **_):
        _check_auth()
        try:
            lines = (self.call_dir / "worker.out").read_text(errors="replace").splitlines(keepends=True)
        except OSError:
            lines = []
        return [types.SimpleNamespace(message=line) for line in lines[-entries:]]


class FunctionCall:
    def __init__(self, call_id):
        self.object_id = call_id
        self.dir = _server() / "calls" / call_id

    @staticmethod
    def from_id(call_id, **_):
        return FunctionCall(call_id)

    @property
    def logs(self):
        return _Logs(self.dir)

    def get(self, timeout=None):
        _check_auth()
        if not (self.dir / "job.pkl").exists():
            raise exception.NotFoundError(f"function call {self.object_id} not found (fake)")
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            outcome = self.dir / "outcome.pkl"
            if outcome.exists():
                if "expire" in _modes():
                    raise exception.OutputExpiredError()
                kind, value = pickle.loads(outcome.read_bytes())
                if kind == "ok":
                    return value
                name, message = value  # re-raised as its builtin type where there is one, like modal does
                cls = getattr(builtins, name, None)
                raise (cls if isinstance(cls, type) and issubclass(cls, Exception) else exception.RemoteError)(message)
            if (self.dir / "cancelled").exists():
                raise exception.ExecutionError("the call was cancelled (fake)")
            if (self.dir / "pid").exists() and not _alive(self.dir):
                raise exception.RemoteError("the container exited without a result (fake)")
            if end is not None and time.monotonic() >= end:
                raise TimeoutError()  # the builtin, as modal's FunctionCall.get raises it
            time.sleep(0.05)

    def get_call_graph(self):
        _check_auth()
        task = "ta-fake" if (self.dir / "started").exists() else ""
        return [types.SimpleNamespace(task_id=task, function_call_id=self.object_id)]

    def cancel(self, terminate_containers=False):
        _check_auth()
        (self.dir / "cancelled").touch()
        try:
            pgid = int((self.dir / "pid").read_text())
        except (OSError, ValueError):
            return
        for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                return
            end = time.monotonic() + wait_s
            while time.monotonic() < end:
                if not _group_alive(pgid):
                    return
                time.sleep(0.05)


class _Volume:
    """The Volume: AR_CACHE_DIR of the caller (where the fake containers' runs/ land)."""

    def read_file(self, path):
        _check_auth()
        file = Path(os.environ["AR_CACHE_DIR"]) / path
        if not file.is_file():
            raise exception.NotFoundError(f"no such file {path} (fake)")
        yield file.read_bytes()


class Volume:
    @staticmethod
    def from_name(name, **_):
        return _Volume()


# ---- the fake platform's side ---------------------------------------------------------------------
def deploy(app_py):
    """`modal deploy`: register app.py under its app's name."""
    spec = importlib.util.spec_from_file_location("ar_modal_app_deploy", app_py)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    apps = _server() / "apps"
    apps.mkdir(parents=True, exist_ok=True)
    (apps / module.app.name).write_text(str(Path(app_py).resolve()) + "\n")
    return module.app.name


def _launch(call_dir):
    out = (call_dir / "worker.out").open("ab")
    env = dict(os.environ, TMPDIR=str(call_dir / "tmp"))
    subprocess.Popen([sys.executable, __file__, "worker", str(call_dir)], stdin=subprocess.DEVNULL, stdout=out,
                     stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=str(call_dir))


def _worker(call_dir):
    lock = (call_dir / "alive.lock").open("a")
    fcntl.flock(lock, fcntl.LOCK_EX)
    (call_dir / "pid").write_text(f"{os.getpgid(0)}\n")
    spec = pickle.loads((call_dir / "job.pkl").read_bytes())
    (call_dir / "started").touch()
    modes = _modes()
    if "crash" in modes:
        os._exit(1)
    try:
        if "raise" in modes:
            raise RuntimeError("the function raised (fake)")
        import modal  # the real package: app.py defines its app with it

        modal.current_function_call_id = lambda: call_dir.name  # what a container would report
        mod_spec = importlib.util.spec_from_file_location("ar_modal_app", spec["app"])
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # .local() warns that the Volume is not mounted here
            value = getattr(module, spec["function"]).local(spec["job"])
        outcome = ("ok", value)
    except Exception as e:  # noqa: BLE001 -- the remote exception, re-raised by get()
        outcome = ("err", (type(e).__name__, str(e)))
    _dump(call_dir / "outcome.pkl", outcome)


if __name__ == "__main__":
    cmd, arg = sys.argv[1], sys.argv[2]
    if cmd == "deploy":
        print(deploy(arg))
    elif cmd == "launch":
        _launch(Path(arg))
    elif cmd == "worker":
        _worker(Path(arg))
    else:
        sys.exit(f"fake_modal.py: unknown command {cmd!r}")
