# # Parallel autoresearch on Modal: K commits, K GPUs, one summary block each

# An autoresearch round trains K candidate commits of the training script at once, each for the same
# wall-clock budget, and keeps the one with the lowest `val_bpb`. On Modal each candidate is one call
# of a deployed Function: a GPU container starts for it, runs the train command on that commit and
# returns karpathy's summary block, then goes away. K calls are K GPUs; between rounds, zero.

# This file is the whole recipe. Top to bottom: the settings, the image, the Volume, the GPU function
# `train`, the data step `prep`, a debug Sandbox, and the fan-out from your machine (submit, wait,
# cancel, logs), which the four scripts next to this file call. Deploy it once, then fan out:

#     modal deploy modal/app.py                                      # the image, the Volume, `train`
#     modal run modal/app.py::prepare                                # data and tokenizer, once
#     modal/submit-async.sh --commit SHA --name ar-x-r1-c0           # prints a FunctionCall id
#     modal/wait-jobs.sh fc-...                                      # the summary block

import io
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

try:
    import modal
except ImportError:  # the scripts run this file with your project's python: it needs the package
    print(f"{(sys.argv[1:] or ['app.py'])[0]}: no 'modal' package for {sys.executable}: uv add modal "
          "(or pip install modal)", file=sys.stderr)
    sys.exit(3)

# ## Settings

# Read where the app is deployed (and passed on to its containers through `env=`). The GPU defaults to
# `H100!`: an H100 and nothing else. Without the `!` Modal may move a call to a faster GPU, and a
# fixed time budget on another GPU is another experiment: results are compared on one GPU type only.
# `AR_MODAL_GPU=A100-80GB` or `H100:8` picks another; then compare only runs of that deployment.

APP_NAME = os.environ.get("AR_MODAL_APP") or "autoresearch"
GPU = os.environ.get("AR_MODAL_GPU") or "H100!"
VOLUME_NAME = os.environ.get("AR_MODAL_VOLUME") or "autoresearch-cache"
TIMEOUT_S = int(os.environ.get("AR_MODAL_TIMEOUT_S") or 1800)  # the server-side limit of every call
SETTINGS = {k: v for k, v in os.environ.items() if k.startswith("AR_MODAL_")}  # for the containers
ROOT = Path(__file__).resolve().parents[1]  # your project (on your machine)
CACHE = "/root/.cache/autoresearch"  # karpathy's prepare.py and train.py keep data here (~ is /root)

app = modal.App(APP_NAME)

# ## The image: your project's locked dependencies

# `uv_sync` installs the `pyproject.toml` and `uv.lock` of your project (read when you deploy) with
# `uv sync --frozen`, so the container trains with the stack you locked. The code is not in the
# image: every call brings the commit it runs, so one image serves every candidate. In the container
# `python` is that synced environment, so the train command runs without `uv run`.

image = (
    modal.Image.debian_slim(python_version="3.11")
    .apt_install("build-essential")  # a C compiler for Triton (torch.compile)
    .uv_sync(str(ROOT))
    .env({"AR_CACHE_DIR": CACHE, "TORCHINDUCTOR_CACHE_DIR": f"{CACHE}/inductor", "PYTHONUNBUFFERED": "1"})
)

# ## The Volume: data, tokenizer and compile cache

# Mounted where the trainer looks for its cache, the Volume holds the shards and the tokenizer that
# `prep` writes once, and `inductor/`, the kernels `torch.compile` built, so later containers skip
# most of the compilation. A container sees the Volume as of its start (`reload()` catches up) and
# its writes reach others after `commit()`; version 2 Volumes take commits from K containers at once.

volume = modal.Volume.from_name(VOLUME_NAME, create_if_missing=True, version=2)

# ## One experiment: `train`

# A call carries `git archive <commit>` (bytes) and the settings of the submitting shell
# (`AR_PROFILE`, `AR_DATA`, `AR_CACHE_DIR`, `AR_TRAIN_CMD` when set). It unpacks the archive, runs the
# train command from its root, and streams the output to the container's stdout, which Modal keeps
# as the call's log (`FunctionCall.logs`, what `logs.sh` prints). The command is `AR_TRAIN_CMD`,
# else `python trainer/train.py` when that file exists, else `python train.py` (karpathy's layout).

# The call returns the summary block: the last line that is exactly `---` and the `key: value` lines
# after it ("" when the trainer printed none). A train command that exits non-zero makes the call
# raise, with the last 40 lines of its output, so Modal shows the call as failed and `get()` raises.

TAIL = 40
KV = re.compile(r"^[A-Za-z_]\w*:\s+\S")


def clean(line: str) -> str:
    return line.rstrip("\r\n").rsplit("\r", 1)[-1]  # a line redrawn with \r: its last frame


def summary_block(lines: list[str]) -> str:
    for i in reversed([i for i, line in enumerate(lines) if line == "---"]):
        block = ["---"]
        for line in lines[i + 1:]:
            if not KV.match(line):
                break
            block.append(line)
        if len(block) > 1:
            return "\n".join(block)
    return ""


def unpack(archive: bytes, dest: str) -> None:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")  # no absolute paths, no links out of dest


@app.function(image=image, gpu=GPU, volumes={CACHE: volume}, timeout=TIMEOUT_S, env=SETTINGS)
def train(archive: bytes, env: dict) -> str:
    if not modal.is_local():
        volume.reload()  # the data and kernels committed since this container started
    with tempfile.TemporaryDirectory(prefix="ar-") as src:
        unpack(archive, src)
        script = "trainer/train.py" if Path(src, "trainer/train.py").is_file() else "train.py"
        cmd = shlex.split(env.get("AR_TRAIN_CMD", "")) or ["python", script]
        proc = subprocess.Popen(cmd, cwd=src, env={**os.environ, **env}, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        lines = []
        try:
            for raw in proc.stdout:
                lines.append(clean(text := raw.decode(errors="replace")))
                print(text, end="", flush=True)  # the call's log, live
            code = proc.wait()
        finally:  # a cancelled call (InputCancellation) or any error: the trainer goes too
            if proc.poll() is None:
                proc.kill()
            if not modal.is_local():
                volume.commit()  # what the compile cache learned
    if code != 0:
        raise RuntimeError("\n".join([*lines[-TAIL:], f"note: {shlex.join(cmd)} exited with code {code}"]))
    return summary_block(lines)


# ## Filling the Volume: `prep`

# Runs your project's prepare script (`prepare/prepare.py`, else karpathy's `prepare.py`) of a commit
# in a CPU container with the Volume mounted as its cache. Once per data set or profile:

#     modal run modal/app.py::prepare                        # karpathy: shards + tokenizer
#     modal run modal/app.py::prepare --profile smoke        # this project's profiles


@app.function(image=image, volumes={CACHE: volume}, timeout=3 * 3600, cpu=8.0, memory=32768, env=SETTINGS)
def prep(archive: bytes, args: list) -> None:
    with tempfile.TemporaryDirectory(prefix="ar-") as src:
        unpack(archive, src)
        script = "prepare/prepare.py" if Path(src, "prepare/prepare.py").is_file() else "prepare.py"
        subprocess.run(["python", script, *args], cwd=src, check=True)
    volume.commit()


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True)


@app.local_entrypoint()
def prepare(profile: str = "", num_shards: int = 0, commit: str = "HEAD"):
    args = (["--profile", profile] if profile else []) + (["--num-shards", str(num_shards)] if num_shards else [])
    prep.remote(git("archive", commit).stdout, args)


# ## Debugging: an interactive GPU Sandbox

# When a candidate fails on the GPU in a way its log does not explain, open a container with the same
# image, GPU and Volume, and your working tree (uncommitted edits included) at `/repo`:

#     modal run modal/app.py::debug          # prints the sandbox id; Enter or Ctrl-C stops it
#     modal shell sb-...                     # in another terminal: a shell in it

# However the entrypoint ends, `Sandbox.terminate()` stops the sandbox, so its GPU stops billing now
# rather than at its timeout (`--hours`).


@app.local_entrypoint()
def debug(hours: float = 1.0):
    tree = image.add_local_dir(ROOT, "/repo", ignore=[".git", ".venv", ".ar", "**/__pycache__"])
    sb = modal.Sandbox.create("sleep", "infinity", app=app, image=tree, gpu=GPU, volumes={CACHE: volume},
                              workdir="/repo", timeout=int(hours * 3600))
    try:
        print(f"sandbox {sb.object_id} ({GPU}): in another terminal, `modal shell {sb.object_id}`; "
              "press Enter here to stop it")
        input()
    finally:
        sb.terminate()


# ## The fan-out, from your machine

# The scripts call this file: `python modal/app.py SCRIPT ARGS...`. Nothing is stored locally; Modal
# is the record. The job id is the FunctionCall id that `spawn` returns, and a job's state and result
# come from `FunctionCall.from_id(id).get(timeout=0)`: it returns the summary block, raises the
# builtin `TimeoutError` while the call runs, re-raises the error of a failed call, and raises
# `OutputExpiredError` once Modal no longer keeps the result (a late collection: reported as
# `expired`, not as a failed experiment; the log stays readable). `FunctionCall.cancel()` stops a call.

# Names make a submit idempotent (a round driver killed between submit and ledger must not pay twice),
# so the name -> id map lives in a `modal.Dict` next to the app, as does the way a call we cancelled
# ended (cancelled, or timeout at a wait's deadline), which Modal does not tell apart. Keys:
# ("name", NAME, n) -> the id of the n-th job of NAME (or "claimed T" while it is being spawned);
# ("call", ID) -> NAME; ("end", ID) -> (state, note).

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
ID_RE = re.compile(r"^fc-[A-Za-z0-9]{1,64}$")
FORWARD = ("AR_TRAIN_CMD", "AR_PROFILE", "AR_DATA", "AR_CACHE_DIR")
PROG = "app.py"


def refuse(code: int, message: str):
    print(f"{PROG}: {message}", file=sys.stderr)
    sys.exit(code)


def jobs() -> "modal.Dict":
    return modal.Dict.from_name(f"{APP_NAME}-jobs", create_if_missing=True)


def submit(argv: list[str]) -> int:
    opts = {"--commit": "", "--name": ""}
    while argv:
        if argv[0] not in opts:
            refuse(2, f"unknown argument '{argv[0]}' (see --help)")
        if len(argv) < 2:
            refuse(2, f"{argv[0]} needs a value (see --help)")
        opts[argv[0]], argv = argv[1], argv[2:]
    commit, name = opts["--commit"], opts["--name"]
    if name and not NAME_RE.match(name):
        refuse(2, f"bad --name '{name}': lowercase letters, digits and '-', at most 63, no '-' at either end")
    if not commit and git("status", "--porcelain", "--untracked-files=no").stdout.strip():
        refuse(2, "uncommitted changes to tracked files: commit them, or pass --commit REV to run a commit")
    rev = git("rev-parse", "--verify", "--quiet", f"{commit or 'HEAD'}^{{commit}}")
    if commit.startswith("-") or rev.returncode:
        refuse(2, f"unknown commit '{commit or 'HEAD'}'")
    sha = rev.stdout.decode().strip()
    name = name or f"ar-{sha[:10]}"
    env = {k: os.environ[k] for k in FORWARD if os.environ.get(k)}
    d, n = jobs(), 1
    while True:  # claim ("name", NAME, n): put(skip_if_exists=True) lets one submit of a name win
        key = ("name", name, n)
        if d.put(key, f"claimed {time.time()}", skip_if_exists=True):
            break
        got = d.get(key) or f"claimed {time.time()}"  # gone again: a failed submit released it
        if got.startswith("claimed"):  # another submit is spawning it: wait, unless it died doing so
            if time.time() - float(got.split()[1]) > 120:
                n += 1
            time.sleep(0.2)
            continue
        now = ended(got)
        if now is None or now[0] == "succeeded":  # running or succeeded: that job is the answer
            print(f"{PROG}: {name} is job {got} ({now[0] if now else 'running'}); starting nothing", file=sys.stderr)
            print(got)
            return 0
        n += 1  # it failed, was cancelled or expired: the next job of the name
    call = None
    try:
        call = modal.Function.from_name(APP_NAME, "train").spawn(git("archive", sha).stdout, env)
        d[("call", call.object_id)] = name
        d[key] = call.object_id
    except BaseException as e:  # no job may outlive a failed submit
        if call is not None:
            call.cancel(terminate_containers=True)
        d.pop(key, None)
        if isinstance(e, modal.exception.NotFoundError):
            refuse(3, f"app '{APP_NAME}' is not deployed: run `modal deploy modal/app.py`")
        raise
    print(f"{PROG}: {call.object_id}: {name}, commit {sha[:10]}, on {APP_NAME}", file=sys.stderr)
    print(call.object_id)
    return 0


def log_tail(call) -> list[str]:
    try:
        text = "".join(e.message for e in call.logs.tail(TAIL, source="stdout"))
    except modal.exception.Error:
        return []
    return [clean(line) for line in text.splitlines()[-TAIL:]]


def ended(call_id: str):
    """None while the call runs, else (state, lines of its block)."""
    call = modal.FunctionCall.from_id(call_id)
    try:
        block = call.get(timeout=0)
        return "succeeded", (block or "note: exit code 0 but no summary block in the log").splitlines()
    except (modal.exception.AuthError, modal.exception.ConnectionError):
        raise
    except Exception as e:
        error = e
    mark = jobs().get(("end", call_id))
    if mark:  # we cancelled it
        return mark[0], [*log_tail(call), mark[1]]
    if type(error) is TimeoutError:
        return None
    if isinstance(error, modal.exception.OutputExpiredError):
        return "expired", [f"note: Modal no longer keeps this call's result (OutputExpiredError); the experiment "
                           f"may have succeeded: modal/logs.sh {call_id} shows its log"]
    if isinstance(error, RuntimeError):  # `train` raised: the tail and the exit code
        return "failed", str(error).splitlines()
    return "failed", [*log_tail(call), f"note: {type(error).__name__}: {error}"]


def known(ids: list[str]) -> list[str]:
    if not ids:
        refuse(2, f"usage: {PROG} ID... (see --help)")
    d = jobs()
    for call_id in ids:
        if not ID_RE.match(call_id) or d.get(("call", call_id)) is None:
            refuse(2, f"unknown job id '{call_id}'")
    return list(dict.fromkeys(ids))


def cancel(ids: list[str], end=("cancelled", "note: cancelled")) -> int:
    for call_id in known(ids):
        now = ended(call_id)
        if now is None or now[0] in ("cancelled", "timeout"):  # an ended call keeps its outcome
            jobs().put(("end", call_id), end, skip_if_exists=True)  # the first end recorded wins
            modal.FunctionCall.from_id(call_id).cancel(terminate_containers=True)
    return 0


def wait(ids: list[str]) -> int:
    got = []
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda signum, _: got.append(signum))
    pending, timeout = known(ids), os.environ.get("AR_TIMEOUT_S") or "1500"
    if not re.fullmatch(r"[0-9]{1,9}", timeout):
        refuse(2, f"bad AR_TIMEOUT_S '{timeout}': a number of seconds")
    print(f"{PROG}: waiting for {len(pending)} job(s), up to {timeout}s", file=sys.stderr)
    start, seen, failed = time.monotonic(), {}, 0
    while pending:
        for call_id in list(pending):
            try:
                out = ended(call_id)
            except (modal.exception.Error, ConnectionError) as e:
                if not seen:
                    raise  # the first look: Modal is unavailable (exit 3)
                print(f"{PROG}: {call_id}: {type(e).__name__}: {e}; asking again", file=sys.stderr)
                continue
            state = out[0] if out else "running"
            if seen.get(call_id) != state:
                print(f"{PROG}: {call_id}: {seen[call_id] + ' -> ' if call_id in seen else ''}{state}", file=sys.stderr)
            seen[call_id] = state
            if out:
                print(f"=== {call_id} ({state}) ===", *out[1], sep="\n", flush=True)
                pending.remove(call_id)
                failed = failed or state != "succeeded"
        if pending and (got or time.monotonic() - start >= int(timeout)):
            for s in (signal.SIGINT, signal.SIGTERM):
                signal.signal(s, signal.SIG_IGN)  # nothing interrupts the cancel
            cancel(pending, ("cancelled", "note: cancelled") if got else
                   ("timeout", f"note: cancelled at the deadline (AR_TIMEOUT_S={timeout})"))
        elif pending:
            time.sleep(0.2 if time.monotonic() - start < 10 else 2)  # quick ends show at once
    return {signal.SIGINT: 130, signal.SIGTERM: 143}.get(got[0], 1) if got else int(failed)


def logs(ids: list[str]) -> int:
    if len(known(ids)) != 1:
        refuse(2, f"usage: {PROG} ID (see --help)")
    for entry in modal.FunctionCall.from_id(ids[0]).logs.fetch(source="stdout"):
        sys.stdout.write(entry.message)
    return 0


def main(script: str, argv: list[str]) -> int:
    global PROG
    PROG = script
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed submit still cancels what it spawned
    run = {"submit-async.sh": submit, "wait-jobs.sh": wait, "cancel-jobs.sh": cancel, "logs.sh": logs}[script]
    try:
        return run(argv)
    except KeyboardInterrupt:
        return 130
    except modal.exception.AuthError as e:
        print(f"{PROG}: not logged in to Modal ({e}): run `modal setup`", file=sys.stderr)
        return 3
    except (modal.exception.ConnectionError, ConnectionError) as e:
        print(f"{PROG}: cannot reach Modal ({e}): check the network, then run this again", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
