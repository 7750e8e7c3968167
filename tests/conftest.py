"""Shared fixtures: the repo path, a prepared data cache, and a helper to run the trainer."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# A shell without job control starts background commands with SIGINT ignored, and an ignored signal is
# inherited across exec and cannot be trapped by bash: the scripts under test would then never see the
# SIGINT the tests send them. Give the test process (and so every child) a real SIGINT handler.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
PY = sys.executable


def clean_env(**extra):
    """The parent environment minus any AR_ variables (a developer's shell must not leak knobs into tests)
    and minus make's own variables (under `make test`, a nested `make` would otherwise print
    'Entering directory' lines on stdout)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AR_")}
    for k in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES"):  # `make test` must not leak into nested makes
        env.pop(k, None)
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def local_repo(tmp_path, **extra):
    """A throwaway git repo with what `make round` needs on the local backend (trainer, prepare, tools,
    local, Makefile, pyproject.toml, .gitignore; .venv linked to ours), committed on main. Returns
    (repo, env): clean_env(**extra) plus a git identity."""
    import shutil

    repo = tmp_path / "repo"
    repo.mkdir()
    for rel in ("trainer", "prepare", "tools", "local"):
        shutil.copytree(REPO / rel, repo / rel, ignore=shutil.ignore_patterns("__pycache__"))
    for rel in ("Makefile", "pyproject.toml", ".gitignore"):
        shutil.copy2(REPO / rel, repo / rel)
    (repo / ".venv").symlink_to(REPO / ".venv")
    env = clean_env(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.invalid", GIT_COMMITTER_NAME="t",
                    GIT_COMMITTER_EMAIL="t@example.invalid", **extra)
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True)
    return repo, env


@pytest.fixture(scope="session")
def ar_cache(tmp_path_factory):
    """A cache dir with the smoke and tiny profiles prepared on the offline corpus (built once per session)."""
    cache = tmp_path_factory.mktemp("ar-cache")
    for profile in ("smoke", "tiny"):
        subprocess.run([PY, "prepare/prepare.py", "--profile", profile], cwd=REPO, check=True,
                       env=clean_env(AR_CACHE_DIR=cache), stdout=subprocess.DEVNULL)
    return cache


def run_train(cache, timeout=300, **env):
    """Run trainer/train.py as a user would; returns the CompletedProcess (text mode)."""
    return subprocess.run([PY, "trainer/train.py"], cwd=REPO, env=clean_env(AR_CACHE_DIR=cache, **env),
                          capture_output=True, text=True, timeout=timeout)
