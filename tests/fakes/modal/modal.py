"""A test double of the `modal` package: only what modal/app.py calls, each behaviour citing modal 1.6.4's
source (.venv/lib/python3.11/site-packages/modal/...).

With tests/fakes/modal on PYTHONPATH, `import modal` in app.py gets this module. Its "server" is the
directory $FAKE_MODAL_DIR:
    apps/<app name>         a deployed app: the path of its app.py (deploy() below, `modal deploy`)
    calls/<fc-id>/          args.pkl, out (the container's stdout: the call's log), pgid, result.pkl
                            (("ok", value) | ("err", exception)), cancelled; expired (a test's switch)
    dicts/<name>.pkl        a modal.Dict, under dicts/<name>.lock
    sandboxes/<sb-id>       "running" | "terminated"
A spawned call is a "container": a detached process group that imports the deployed app.py (with this
module as `modal`) and runs the function body with a container's environment (the image's `env`, the
Function's `env=`, and none of the submitter's variables), its output the call's log.
"""

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


class exception:  # modal/exception.py: the classes app.py catches, with modal's hierarchy
    Error = type("Error", (Exception,), {})
    AuthError, NotFoundError = type("AuthError", (Error,), {}), type("NotFoundError", (Error,), {})
    ConnectionError, RemoteError = type("ConnectionError", (Error,), {}), type("RemoteError", (Error,), {})
    TimeoutError = type("TimeoutError", (Error,), {})  # modal.exception.TimeoutError, not the builtin
    OutputExpiredError = type("OutputExpiredError", (TimeoutError,), {})


def _server():
    return Path(os.environ["FAKE_MODAL_DIR"])


def _new_id(prefix):
    return prefix + secrets.token_hex(12).upper()  # object ids look like fc-01JCX7Y5W8P3R2Q1ZK6M4N9B0T


def is_local():
    """_runtime/execution_context.py is_local: True unless this process runs a Modal Function (also here)."""
    return True


# ---- the app's declarations (app.py, image.py, volume.py): recorded, nothing is built ---------------
class _Image:
    def __init__(self, env=None):
        self.env_vars = dict(env or {})

    @staticmethod
    def debian_slim(python_version=None):
        return _Image()

    def apt_install(self, *packages):
        return self

    def uv_sync(self, uv_project_dir="./", **_):  # _image.py uv_sync: lazy, reads pyproject.toml at build
        return self

    def add_local_dir(self, local_path, remote_path, *, ignore=()):
        return self

    def env(self, vars):  # _image.py env: the container's environment variables
        return _Image({**self.env_vars, **vars})


Image = _Image


class Volume:
    @staticmethod
    def from_name(name, *, create_if_missing=False, version=None):  # volume.py from_name: lazy
        return Volume()

    def reload(self):
        raise AssertionError("app.py reloads the Volume only in a container (modal.is_local() is False)")

    commit = reload


class _LocalFunction:
    """What @app.function returns; .local() is _functions.py _Function.local: `info.raw_f(*args)`."""

    def __init__(self, f, spec):
        self.raw_f, self.spec = f, spec

    def local(self, *args, **kwargs):
        return self.raw_f(*args, **kwargs)


class App:
    def __init__(self, name):
        self.name = name

    def function(self, **spec):
        return lambda f: _LocalFunction(f, spec)

    def local_entrypoint(self):
        return lambda f: f


# ---- Function.from_name(...).spawn, FunctionCall (_functions.py) ------------------------------------
class Function:
    def __init__(self, app_name, name):
        self.app_name, self.name = app_name, name

    @staticmethod
    def from_name(app_name, name):  # _functions.py from_name: lazy; the lookup happens at the first use
        return Function(app_name, name)

    def spawn(self, *args):
        app_file = _server() / "apps" / self.app_name
        if not app_file.is_file():  # the lookup of an app that is not deployed
            raise exception.NotFoundError(f"Lookup failed for Function '{self.name}' from the '{self.app_name}' app")
        call = FunctionCall(_new_id("fc-"))
        (call.dir / "tmp").mkdir(parents=True)
        (call.dir / "args.pkl").write_bytes(pickle.dumps((app_file.read_text(), self.name, args)))
        with open(call.dir / "out", "ab") as out:  # spawn returns at once; the container runs on
            subprocess.Popen([sys.executable, __file__, str(call.dir)], stdin=subprocess.DEVNULL, stdout=out,
                             stderr=subprocess.STDOUT, cwd=call.dir, start_new_session=True, env=_container_env())
        return call


def _container_env():
    keep = ("PATH", "HOME", "LANG", "PYTHONPATH", "FAKE_MODAL_DIR")  # a container has none of your settings
    return {k: os.environ[k] for k in keep if k in os.environ}


class _Logs:
    """_logs_manager.py _FunctionCallLogsManager: entries with .message (newline included) and .source."""

    def __init__(self, call):
        self.call = call

    def fetch(self, *, source=None):
        text = (self.call.dir / "out").read_text(errors="replace") if (self.call.dir / "out").exists() else ""
        return [types.SimpleNamespace(message=line, source="stdout") for line in text.splitlines(keepends=True)
                if source in (None, "stdout")]  # the container's stdout and stderr are both one file here

    def tail(self, entries=100, *, source=None):
        return self.fetch(source=source)[-entries:]


class FunctionCall:
    def __init__(self, call_id):
        self.object_id, self.dir = call_id, _server() / "calls" / call_id

    @staticmethod
    def from_id(call_id):  # _functions.py _FunctionCall.from_id: lazy, any id
        return FunctionCall(call_id)

    @property
    def logs(self):
        return _Logs(self)

    def get(self, timeout=None):
        end = time.monotonic() + (timeout if timeout is not None else 1e9)
        while True:
            if (self.dir / "expired").exists():  # poll_function: no outputs, no unfinished inputs
                raise exception.OutputExpiredError()
            if (self.dir / "result.pkl").exists():  # function_utils.py _process_result
                kind, value = pickle.loads((self.dir / "result.pkl").read_bytes())
                if kind == "ok":
                    return value
                raise value  # the remote exception, deserialized and re-raised
            if (self.dir / "cancelled").exists() or ((self.dir / "pgid").exists() and not _alive(self.dir)):
                # a cancelled input ends TERMINATED (TERMINAL_STATUSES), a dead container fails it: a
                # non-success result without data -> RemoteError(result.exception) in _process_result
                raise exception.RemoteError("the call was terminated")
            if time.monotonic() >= end:
                raise TimeoutError()  # poll_function: the builtin TimeoutError while the call runs
            time.sleep(0.05)

    def cancel(self, terminate_containers=False):
        """_functions.py cancel: FunctionCallCancel; terminate_containers stops the container. The real
        call returns once the request is made and the container goes down soon after; here it is gone."""
        (self.dir / "cancelled").touch()
        try:
            pgid = int((self.dir / "pgid").read_text())
            os.killpg(pgid, signal.SIGKILL)
        except (OSError, ValueError):
            return
        while _group_alive(pgid):
            time.sleep(0.02)


def _alive(call_dir):
    """True while the container (its process group) lives."""
    try:
        return _group_alive(int((call_dir / "pgid").read_text()))
    except (OSError, ValueError):
        return True  # starting


def _group_alive(pgid):
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


# ---- Dict (dict.py) ---------------------------------------------------------------------------------
class Dict:
    def __init__(self, name):
        self.path = _server() / "dicts" / f"{name}.pkl"

    @staticmethod
    def from_name(name, *, create_if_missing=False):  # dict.py from_name
        return Dict(name)

    def _update(self, change):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:  # one server-side update at a time
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = pickle.loads(self.path.read_bytes()) if self.path.exists() else {}
            result = change(data)
            self.path.write_bytes(pickle.dumps(data))
            return result

    def get(self, key, default=None):  # dict.py get: `default` when the key is missing
        return self._update(lambda data: data.get(key, default))

    def put(self, key, value, *, skip_if_exists=False):  # dict.py put: False when skipped (exists)
        def change(data):
            if skip_if_exists and key in data:
                return False
            data[key] = value
            return True
        return self._update(change)

    def __setitem__(self, key, value):
        self.put(key, value)

    def pop(self, key, default=None):
        return self._update(lambda data: data.pop(key, default))


# ---- Sandbox (sandbox/_sandbox.py) -------------------------------------------------------------------
class Sandbox:
    def __init__(self, sandbox_id):
        self.object_id, self.path = sandbox_id, _server() / "sandboxes" / sandbox_id

    @staticmethod
    def create(*args, app=None, image=None, gpu=None, volumes=None, workdir=None, timeout=300):
        if app is None:  # _sandbox.py create: an app is required outside a container
            raise exception.Error("App is required")
        sb = Sandbox(_new_id("sb-"))
        sb.path.parent.mkdir(parents=True, exist_ok=True)
        sb.path.write_text("running\n")
        return sb

    def terminate(self):  # _sandbox.py terminate: a no-op once it has finished
        self.path.write_text("terminated\n")


# ---- the fake platform's side -----------------------------------------------------------------------
def deploy(server, app_py, app_name="autoresearch"):
    """`modal deploy app.py` on the server directory `server`: the app can now be looked up by name."""
    (Path(server) / "apps").mkdir(parents=True, exist_ok=True)
    (Path(server) / "apps" / app_name).write_text(str(Path(app_py).resolve()))


def _container(call_dir):
    sys.dont_write_bytecode = True  # the deployed app.py is Modal's copy: nothing lands next to yours
    (call_dir / "pgid").write_text(str(os.getpgid(0)))
    app_py, name, args = pickle.loads((call_dir / "args.pkl").read_bytes())
    spec = importlib.util.spec_from_file_location("app", app_py)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    function = getattr(module, name)
    os.environ.update({**function.spec["image"].env_vars, **function.spec.get("env", {})})
    os.environ["TMPDIR"] = str(call_dir / "tmp")  # the snapshot lands inside the call's directory
    try:
        result = ("ok", function.local(*args))
    except Exception as e:  # noqa: BLE001 -- the call's exception, re-raised by get()
        result = ("err", e)
    sys.stdout.flush()
    tmp = call_dir / "result.tmp"
    tmp.write_bytes(pickle.dumps(result))
    tmp.rename(call_dir / "result.pkl")


if __name__ == "__main__":
    _container(Path(sys.argv[1]))
