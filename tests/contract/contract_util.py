"""Helpers shared by the contract suite and the per-backend setup modules (backend_<name>.py)."""

import os
from pathlib import Path


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
