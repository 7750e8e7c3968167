"""Helpers for the contract suite: the throwaway project a backend runs in, and reading its output.

A backend is a module tests/contract/backend_<name>.py with
    FOLDER = "<the recipe folder>"                     (local, batch-job, sky, modal)
    def setup(tmp, repo) -> (env, leftovers)           env: what the scripts need (a double of the
                                                       backend's CLI on PATH ...); leftovers(): the
                                                       processes or remote jobs it still has running
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import clean_env

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FAKE_TRAIN = HERE / "fake_train.py"
SCRIPTS = ("submit-async.sh", "wait-jobs.sh", "cancel-jobs.sh", "logs.sh")
HEADER = re.compile(r"^=== (\S+) \((succeeded|failed|timeout|cancelled)\) ===$", re.M)
GIT_ID = dict(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.invalid", GIT_COMMITTER_NAME="t",
              GIT_COMMITTER_EMAIL="t@example.invalid")
# the reference summary block, as fake_train.py prints it
REFERENCE_BLOCK = re.search(r'print\("""(---\n.*?)"""', FAKE_TRAIN.read_text(), re.S)[1]


def load_backends():
    found = {}
    for path in sorted(HERE.glob("backend_*.py")):
        spec = importlib.util.spec_from_file_location(f"contract_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        found[path.stem.removeprefix("backend_")] = module
    return found


def processes_under(path):
    """Live processes whose command line or working directory mentions `path`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if str(path) in cmd or cwd.startswith(str(path)):
            found.append(f"{proc.name}: {cmd.strip()}")
    return found


def blocks(stdout):
    """wait-jobs.sh stdout -> {id: (state, body lines)}; nothing may come before the first header."""
    parts = HEADER.split(stdout)
    assert parts[0] == "", f"text before the first block: {parts[0]!r}"
    return {parts[i]: (parts[i + 1], parts[i + 2].strip("\n").splitlines()) for i in range(1, len(parts), 3)}


class Project:
    """A karpathy/autoresearch-like checkout (train.py = fake_train.py, prepare.py, .venv/bin/python)
    with the recipe folder copied in, uncommitted, as a user would."""

    def __init__(self, tmp, backend_name, module):
        self.name, self.folder, self.tmp = backend_name, module.FOLDER, tmp
        self.repo = repo = tmp / "repo"
        repo.mkdir()
        shutil.copy(FAKE_TRAIN, repo / "train.py")
        (repo / "prepare.py").write_text('print("prepared")\n')
        (repo / ".gitignore").write_text(".venv/\n__pycache__/\n")
        venv_python = repo / ".venv" / "bin" / "python"  # a wrapper, so a test can tell it was used
        venv_python.parent.mkdir(parents=True)
        venv_python.write_text(f'#!/bin/sh\nexport FAKE_VENV=1\nexec "{sys.executable}" "$@"\n')
        venv_python.chmod(0o755)
        shutil.copytree(REPO / self.folder, repo / self.folder, ignore=shutil.ignore_patterns("__pycache__"))
        extra, self.leftovers = module.setup(tmp, repo)
        self.env = clean_env(**GIT_ID, **extra)
        self.git("init", "-q", "-b", "main")
        self.git("add", "train.py", "prepare.py", ".gitignore")
        self.git("commit", "-qm", "init")
        self.submitted = set()

    def git(self, *args):
        return subprocess.run(["git", *args], cwd=self.repo, env=self.env, check=True, capture_output=True,
                              text=True).stdout.strip()

    def commit(self, mode="ok", sleep_s=0, files=None):
        """Commit train.py in MODE (see fake_train.py) plus `files` ({path: text}); returns the sha."""
        train = self.repo / "train.py"
        text = re.sub(r'(?m)^MODE = .*$', f'MODE = "{mode}"', train.read_text())
        train.write_text(re.sub(r"(?m)^SLEEP_S = .*$", f"SLEEP_S = {sleep_s}", text))
        for path, content in (files or {}).items():
            (self.repo / path).write_text(content)
            self.git("add", path)
        self.git("commit", "-qam", f"{mode} {sleep_s}", "--allow-empty")
        return self.git("rev-parse", "HEAD")

    def cmd(self, script, *args):
        return [str(self.repo / self.folder / script), *args]

    def environ(self, env=None):
        merged = {**self.env, **(env or {})}
        return {k: str(v) for k, v in merged.items() if v is not None}  # None: unset it

    def run(self, script, *args, env=None, timeout=60):
        proc = subprocess.run(self.cmd(script, *args), cwd=self.repo, env=self.environ(env), capture_output=True,
                              text=True, timeout=timeout)
        if script == "submit-async.sh" and proc.returncode == 0:
            self.submitted.add(proc.stdout.strip())
        return proc

    def popen(self, script, *args, env=None):
        return subprocess.Popen(self.cmd(script, *args), cwd=self.repo, env=self.environ(env),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def submit(self, *args, env=None):
        proc = self.run("submit-async.sh", *args, env=env)
        assert proc.returncode == 0, proc.stderr
        assert len(proc.stdout.splitlines()) == 1, f"submit must print exactly one line: {proc.stdout!r}"
        return proc.stdout.strip()

    def wait(self, *ids, env=None, timeout=120):
        """(CompletedProcess, blocks) of wait-jobs.sh."""
        proc = self.run("wait-jobs.sh", *ids, env=env, timeout=timeout)
        return proc, blocks(proc.stdout)

    def cleanup(self):
        if self.submitted:
            self.run("cancel-jobs.sh", *sorted(self.submitted), timeout=120)


def one_error_line(proc):
    """The one stderr line of a refused call (nothing on stdout)."""
    assert proc.stdout == "", proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]
