# ---
# deploy: true
# cmd: ["modal", "run", "modal/app.py::experiment", "--profile", "smoke"]
# ---

# # Parallel autoresearch on Modal: one experiment per GPU, none left running

# An autoresearch round trains K variants of `trainer/train.py` at once, each for a fixed wall-clock
# budget, and keeps the one with the lowest `val_bpb`. Between rounds the agent is thinking, and a
# reserved cluster would sit idle. On Modal each experiment is one call of a deployed Function: a GPU
# container starts for it, runs the trainer, returns the result and goes away. K calls at once are K
# GPUs; zero calls are zero GPUs.

# This file is the whole Modal side of the backend:

# - an Image with the project's pinned dependencies,
# - a Volume with the prepared data, the tokenizer and the compile cache,
# - `prep`, which fills the Volume once,
# - `run_experiment`, which runs one experiment from a code snapshot and returns its log and summary,
# - three local entrypoints: `prepare`, `experiment` (one blocking run, a smoke test) and `sandbox`
#   (an interactive GPU container for debugging).

# The fan-out scripts next to it (`submit-async.sh`, `wait-jobs.sh`, ...) spawn `run_experiment` on
# the *deployed* app (`make modal-deploy`) and collect the results by call id; see `README.md`.

# ## Setup

# Everything that decides what runs where is read from the environment when the app is deployed
# (`modal deploy` imports this file). Inside a container the same names come back from the
# Function's `env`, so the container sees the configuration it was deployed with.

import io
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import modal

APP_NAME = os.environ.get("AR_MODAL_APP") or "autoresearch"
VOLUME_NAME = os.environ.get("AR_MODAL_VOLUME") or "autoresearch-cache"
CACHE_DIR = "/cache"  # where the Volume is mounted; AR_CACHE_DIR of the trainer and prepare.py

# The GPU. `H100!` asks for an H100 and nothing else: without the `!` Modal may upgrade a call to a
# faster GPU, and a 5-minute budget on another GPU is another experiment (its val_bpb is not
# comparable). Scaling is one parameter: `AR_MODAL_GPU=H100:8` gives each call eight H100s (for a
# trainer that uses them), `AR_MODAL_GPU=H100!,A100-80GB` is a fallback list (first available wins;
# every result records the GPU it ran on).
GPU_SPEC = os.environ.get("AR_MODAL_GPU") or "H100!"


def parse_gpu(spec: str) -> str | list[str]:
    """`H100!` -> "H100!"; `H100!,A100-80GB` -> ["H100!", "A100-80GB"] (Modal's fallback list)."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise ValueError("AR_MODAL_GPU is empty; use e.g. H100!, H100:8 or H100!,A100-80GB")
    return parts[0] if len(parts) == 1 else parts


GPU = parse_gpu(GPU_SPEC)

# Modal's default Function timeout is 300 s, shorter than one experiment of the full profile (300 s
# of training plus start-up, compilation and evaluation). The timeout is also the server-side hard
# limit of every call: a lost laptop cannot leave a GPU running for longer than this.
TIMEOUT_S = int(os.environ.get("AR_MODAL_TIMEOUT_S") or 1800)
PREP_TIMEOUT_S = 3 * 3600  # downloading shards and training a tokenizer, once

REPO = Path(__file__).resolve().parent.parent  # meaningful on your machine only
FUNCTION_ENV = {
    "AR_MODAL_APP": APP_NAME,
    "AR_MODAL_VOLUME": VOLUME_NAME,
    "AR_MODAL_GPU": GPU_SPEC,
    "AR_MODAL_TIMEOUT_S": str(TIMEOUT_S),
}

app = modal.App(APP_NAME)

# ## The container image

# The same pinned stack as `make setup`: `pip_install_from_pyproject` reads the `[project]`
# dependencies of `pyproject.toml` (exact pins) when the image is built. Modal caches the built
# image and rebuilds it only when the pins change. The code is *not* baked in: every call brings the
# snapshot it runs, so one image serves every candidate. A C compiler is there for Triton, which
# `torch.compile` uses on the GPU.

image = (
    modal.Image.debian_slim(python_version="3.11")
    .apt_install("build-essential")
    .pip_install_from_pyproject(str(REPO / "pyproject.toml"))
    .env({"AR_CACHE_DIR": CACHE_DIR, "PYTHONUNBUFFERED": "1"})
)

# ## The Volume: data, tokenizer and compile cache

# `prepare/prepare.py` keeps everything under `AR_CACHE_DIR`: the data shards, the tokenizer of each
# profile and `inductor/`, the compile cache that `trainer/train.py` points `TORCHINDUCTOR_CACHE_DIR`
# at. With `AR_CACHE_DIR` on a Volume, a container starts with the data in place and with kernels
# compiled by earlier runs. Each run also writes its log and `exit_code` under its own directory,
# `runs/<call id>/`, so a result survives even when the caller never collects it.

# A container sees the Volume as it was when the container started (`reload()` catches up) and its
# own writes reach other containers after `commit()`. Version 2 Volumes take commits from many
# containers at once, which is what K parallel experiments do.

volume = modal.Volume.from_name(VOLUME_NAME, create_if_missing=True, version=2)

# ## Running code from a snapshot

# A call carries the candidate as a tar of `git archive <commit>` (bytes): the exact commit the agent
# made, not whatever the working tree holds by the time the container starts.


def unpack(snapshot: bytes, dest: str) -> None:
    with tarfile.open(fileobj=io.BytesIO(snapshot)) as tar:
        tar.extractall(dest, filter="data")  # no absolute paths, no escaping links


def git_snapshot(rev: str = "HEAD") -> bytes:
    """`git archive` of a commit of this repository, as bytes (on your machine)."""
    return subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev], check=True,
                          capture_output=True).stdout


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def gpu_name() -> str:
    """The GPU this container got (what `nvidia-smi` says), or "cpu"."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        out = []
    return f"{len(out)} x {out[0]}" if len(out) > 1 else out[0] if out else "cpu"


def run_streaming(cmd: list[str], cwd: str, env: dict, log_path: Path, limit_s: float) -> int:
    """Run `cmd`, copying its output to `log_path` and to this container's stdout (Modal's live
    logs). After `limit_s` seconds it gets SIGTERM (the trainer then prints a FAIL line and exits
    143), SIGKILL 30 s later. Whatever interrupts us (a cancelled call) stops it too."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)

    def stop(note: str | None = None):
        if proc.poll() is None:
            if note:
                with log_path.open("a") as log:
                    log.write(f"[ar-modal] {now()} {note}\n")
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    timer = threading.Timer(limit_s, stop, [f"time limit of {limit_s:.0f}s reached: SIGTERM"])
    timer.daemon = True
    timer.start()
    try:
        with log_path.open("ab") as log:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                sys.stdout.buffer.write(line)
                sys.stdout.flush()
        return proc.wait()
    except BaseException:  # cancelled (Modal raises into the function), interrupted, ...
        stop()
        raise
    finally:
        timer.cancel()


def summary_block(log: str) -> str:
    """The trainer's summary block: the last line that is exactly `---` and the `key: value` lines
    right after it ("" when there is none)."""
    lines = log.splitlines()
    start = max((i for i, line in enumerate(lines) if line == "---"), default=None)
    if start is None:
        return ""
    block = []
    for line in lines[start + 1:]:
        if not re.match(r"[A-Za-z_]\w*:(\s|$)", line):
            break
        block.append(line)
    return "\n".join(["---", *block]) + "\n" if block else ""


# ## Filling the Volume: `prep`

# Runs `prepare/prepare.py` of a snapshot against the Volume: ClimbMix shards for the full profile,
# the offline corpus for tiny and smoke, then the tokenizer. It is idempotent (prepare.py skips what
# is complete) and needs no GPU. Run it once per profile with the `prepare` entrypoint below.


@app.function(image=image, volumes={CACHE_DIR: volume}, timeout=PREP_TIMEOUT_S, cpu=8.0, memory=32768,
              env=FUNCTION_ENV)
def prep(snapshot: bytes, profile: str = "full", data: str = "", num_shards: int = 0) -> str:
    in_container = not modal.is_local()
    if in_container:
        volume.reload()
    cache = os.environ.get("AR_CACHE_DIR") or CACHE_DIR
    cmd = [sys.executable, "prepare/prepare.py", "--profile", profile]
    cmd += ["--data", data] if data else []
    cmd += ["--num-shards", str(num_shards)] if num_shards else []
    env = {k: v for k, v in os.environ.items() if not k.startswith("AR_")}
    env.update(AR_CACHE_DIR=cache, PYTHONUNBUFFERED="1")
    try:
        with tempfile.TemporaryDirectory(prefix="ar-prep-") as work:
            unpack(snapshot, work)
            log = Path(work) / "prep.log"
            code = run_streaming(cmd, work, env, log, PREP_TIMEOUT_S - 120)
            text = log.read_text(errors="replace")
    finally:
        if in_container:
            volume.commit()
    if code != 0:
        raise RuntimeError(f"prepare.py exited with {code}:\n{text[-4000:]}")
    return text


# ## One experiment: `run_experiment`

# The job is a dict: `name` (the job name), `commit`, `env` (`AR_PROFILE`, `AR_DATA` when set at
# submit), `snapshot` (tar bytes), optionally `forward` (harness settings such as
# `AR_CLIMBMIX_URL`) and `limit_s` (the trainer's time limit, below the Function's timeout).

# The trainer gets a clean environment: no `AR_` variable of the container except the job's own and
# `AR_CACHE_DIR` on the Volume. The call returns the trainer's exit code, its summary block, the log
# (its last `LOG_TAIL_BYTES`, in practice all of it) and the GPU it ran on. The experiment succeeded
# when the trainer exited 0; a failed one is a normal return with `state: "failed"`; an exception
# means the function itself broke.

LOG_TAIL_BYTES = 1_000_000


@app.function(image=image, gpu=GPU, volumes={CACHE_DIR: volume}, timeout=TIMEOUT_S, env=FUNCTION_ENV)
def run_experiment(job: dict) -> dict:
    started = time.time()
    in_container = not modal.is_local()
    if in_container:
        volume.reload()  # see the data and compile cache committed since this container started
    cache = Path(os.environ.get("AR_CACHE_DIR") or CACHE_DIR)
    call_id = modal.current_function_call_id() or f"local-{job['name']}-{os.getpid()}-{int(started)}"
    run_dir = cache / "runs" / call_id
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "log"
    gpu = gpu_name()
    limit_s = max(60.0, min(float(job.get("limit_s") or TIMEOUT_S), TIMEOUT_S - 60.0))

    env = {k: v for k, v in os.environ.items() if not k.startswith("AR_")}
    env.update(job.get("forward") or {})
    env.update(job.get("env") or {})
    env.update(AR_CACHE_DIR=str(cache), PYTHONUNBUFFERED="1")
    try:
        with log_path.open("a") as log:
            log.write(f"[ar-modal] {now()} {job['name']}: commit {job.get('commit', '?')} on {gpu} "
                      f"(call {call_id}, limit {limit_s:.0f}s)\n")
        with tempfile.TemporaryDirectory(prefix="ar-run-") as work:
            unpack(job["snapshot"], work)
            code = run_streaming([sys.executable, "trainer/train.py"], work, env, log_path, limit_s)
        state = "succeeded" if code == 0 else "failed"
        (run_dir / "exit_code").write_text(f"{code}\n")
        with log_path.open("a") as log:
            log.write(f"[ar-modal] {now()} trainer exited with code {code} -> {state}\n")
    finally:
        if in_container:
            volume.commit()  # the run's log and result, and what the compile cache learned

    data = log_path.read_bytes()
    log = data[-LOG_TAIL_BYTES:].decode(errors="replace")
    return {
        "name": job["name"], "call_id": call_id, "state": state, "exit_code": code,
        "summary": summary_block(log), "log": log, "log_truncated": len(data) > LOG_TAIL_BYTES,
        "gpu": gpu, "gpu_requested": GPU_SPEC, "run_dir": f"runs/{call_id}",
        "seconds": round(time.time() - started, 1),
    }


# ## From your machine: `modal run` entrypoints

# Fill the Volume for a profile (once; `--profile smoke` for the quick check below):

#     modal run modal/app.py::prepare --profile full


@app.local_entrypoint()
def prepare(profile: str = "full", data: str = "", num_shards: int = 0, commit: str = "HEAD"):
    print(prep.remote(git_snapshot(commit), profile, data, num_shards)[-2000:])


# One experiment, start to finish, blocking: the single-GPU smoke test of the whole path (snapshot,
# image, Volume, trainer, summary block). Rounds use the deployed app instead (`README.md`).

#     modal run modal/app.py::experiment --profile smoke


@app.local_entrypoint()
def experiment(profile: str = "smoke", commit: str = "HEAD"):
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", commit], check=True, capture_output=True,
                         text=True).stdout.strip()
    out = run_experiment.remote({"name": f"ar-try-{sha[:7]}", "commit": sha, "env": {"AR_PROFILE": profile},
                                 "snapshot": git_snapshot(sha)})
    print(out["summary"] or out["log"][-4000:])
    print(f"{out['state']} on {out['gpu']} in {out['seconds']}s; log and exit_code on the Volume "
          f"{VOLUME_NAME} under {out['run_dir']}/")


# ## Debugging: a GPU Sandbox with the Volume and the repository

# When a candidate crashes on the GPU in a way the log does not explain, open a container with the
# same image, GPU and Volume, and your working tree (uncommitted edits included) under `/repo`:

#     modal run modal/app.py::sandbox                # prints the sandbox id
#     modal shell sb-...                             # a shell in it; then: python trainer/train.py
#     modal container stop sb-...                    # when done (or it stops after --hours)

# The Sandbox belongs to the deployed app (looked up by name, created if missing), so it outlives the
# `modal run` that created it. `--gpu` overrides the GPU (e.g. `--gpu H100:8`).


@app.local_entrypoint()
def sandbox(gpu: str = "", hours: float = 1.0):
    ignore = [".venv", ".git", ".ar", "**/__pycache__", ".pytest_cache", ".ruff_cache", "results.tsv"]
    sb = modal.Sandbox.create(
        "sleep", "infinity",
        app=modal.App.lookup(APP_NAME, create_if_missing=True),
        image=image.add_local_dir(REPO, "/repo", ignore=ignore),
        gpu=gpu or (GPU if isinstance(GPU, str) else GPU[0]),
        volumes={CACHE_DIR: volume},
        workdir="/repo",
        timeout=int(hours * 3600),
    )
    print(f"sandbox {sb.object_id}: {gpu or GPU_SPEC}, Volume {VOLUME_NAME} at {CACHE_DIR}, repo at /repo")
    print(f"  modal shell {sb.object_id}            # then: python trainer/train.py")
    print(f"  modal container stop {sb.object_id}   # stops by itself after {hours:g} h")
