#!/usr/bin/env python3
"""tools/results.py -- wait-jobs.sh output -> records -> results.tsv rows.

    python tools/results.py parse FILE|-    # a JSON record per `=== ID (STATE) ===` block
    python tools/results.py show [--tag T] [--last N]

A succeeded job's result is its summary block (the last `---` line and the `key: value` lines after it);
otherwise the crash reason is the last error-looking line of its log tail. results.tsv starts with the
reference's five columns (commit, the metric, memory_gb, keep|discard|crash, description); writes are
atomic (a lock on the folder, a temporary file, a rename).
"""

import argparse
import fcntl
import itertools
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

EXTRA = ["tag", "round", "candidate", "job_id", "backend", "gpu", "profile", "num_steps",
         "training_seconds", "wall_s", "cost_usd", "time"]
HEADER = re.compile(r"^=== (\S+) \(([a-z]+)\) ===\s*$")
KV = re.compile(r"^([A-Za-z_]\w*):\s+(\S.*?)\s*$")
EXPIRED = "expired: the backend no longer keeps the result (the run itself did not fail); run it again"
NUM = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
CONTROL = re.compile(r"c0b?|base\d+")  # a candidate label that is the best re-run: c0, c0b, make baseline's
ERROR = re.compile(r"^(FAIL\b|[\w.]*(Error|Exception|Interrupt)\b)|\b(error|killed|out of memory)\b", re.I)


def clean(line):
    """A log line as a person reads it: the last `\\r` frame, no colour (a recipe strips its CLI's prefixes)."""
    return ANSI.sub("", line.rstrip("\r").rsplit("\r", 1)[-1]).rstrip()


def number(text):
    """A finite number, else None (`nan`, `inf`, words, nothing)."""
    return float(text) if isinstance(text, str) and NUM.fullmatch(text.strip()) else None


def summary(lines):
    """The last summary block in lines, as {key: text}; {} when there is none."""
    for i in reversed([i for i, s in enumerate(lines) if s.strip() == "---"]):
        block = dict(m.groups() for m in itertools.takewhile(bool, (KV.match(s.strip()) for s in lines[i + 1:])))
        if block:
            return block
    return {}


def crash_reason(lines):
    """The last error-looking line of a log tail, else its last non-empty line."""
    lines = [s.strip() for s in lines if s.strip()]
    return next((s for s in reversed(lines) if ERROR.search(s)), lines[-1] if lines else "")


def record(job_id, state, lines, metric="val_bpb"):
    block = summary(lines) if state == "succeeded" else {}
    value = number(block.get(metric))
    if state != "succeeded":
        reason = EXPIRED if state == "expired" else state if state in ("timeout", "cancelled") else crash_reason(lines)
        reason = reason or state
    elif not block:
        reason = "no summary block in the log"
    else:
        reason = "" if value is not None else f"{metric} is {block.get(metric, 'missing')}"
    return dict(job_id=job_id, state=state, summary=block, value=None if reason else value, reason=reason)


def parse(text, metric="val_bpb"):
    """wait-jobs.sh output -> one record per block (job_id, state, summary, value, reason)."""
    jobs = []
    for line in map(clean, text.splitlines()):
        m = HEADER.match(line)
        if m:
            jobs.append((m[1], m[2], []))
        elif jobs:
            jobs[-1][2].append(line)
    return [record(j, s, body, metric) for j, s, body in jobs]


def make_row(rec, metric, *, commit, status, description, **extra):
    crash = status == "crash"
    mem = number(rec["summary"].get("peak_vram_mb"))
    if crash and rec.get("reason"):
        description = f"{description} -- crash: {rec['reason']}"
    row = {"commit": commit, metric: "0.000000" if crash else f"{rec['value']:.6f}",
           "memory_gb": "0.0" if crash or mem is None else f"{mem / 1024:.1f}", "status": status,
           "description": description[:200], "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           **{k: rec["summary"].get(k, "") for k in ("num_steps", "training_seconds")}, **extra}
    return {k: re.sub(r"\s+", " ", str(v)).strip() for k, v in row.items()}  # a TSV field: no tab, no newline


class Row(dict):
    """A results.tsv row: its columns, and `.score`, the metric as a number (None for a crash)."""
    score = None


def _load(path, metric):
    lines = path.read_text().splitlines() if path.exists() else []
    header = lines[0].split("\t") if lines else ["commit", metric, "memory_gb", "status", "description", *EXTRA]
    if header[:2] != ["commit", metric]:
        sys.exit(f"results: error: {path} scores {header[1] if len(header) > 1 else '?'}, not {metric} "
                 "(AR_METRIC); move it aside or set AR_METRIC to match")
    header += [c for c in EXTRA if c not in header]  # a karpathy 5-column file gains the driver's columns
    rows = [Row(dict.fromkeys(header, ""), **dict(zip(header, x.split("\t"), strict=False))) for x in lines[1:] if x]
    for r in rows:
        r.score = None if r["status"] == "crash" else number(r[metric])
    return header, rows


def _update(path, metric, change):
    """rows -> change(rows) -> a temporary file -> rename, under an flock on the folder (it outlives the
    rename), so concurrent writers never drop each other's rows. change returns None to write nothing."""
    path = Path(path)
    lock = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        header, rows = _load(path, metric)
        rows = change(rows)
        if rows is not None:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            with os.fdopen(fd, "w") as f:
                f.writelines("\t".join(r.get(c, "") for c in header) + "\n" for r in [{c: c for c in header}, *rows])
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
    finally:
        os.close(lock)


def append_rows(path, rows, metric="val_bpb"):
    """Append rows; a row whose (tag, round, candidate, job_id) is already there is skipped."""
    key = lambda r: tuple(r.get(c, "") for c in ("tag", "round", "candidate", "job_id"))
    new = []

    def change(old):
        seen = {key(r) for r in old}
        new.extend(r for r in rows if key(r) not in seen and not seen.add(key(r)))
        return old + new if new or not old else None
    _update(path, metric, change)
    return len(new)


def read_rows(path, metric="val_bpb"):
    """results.tsv -> Row dicts (with .score)."""
    return _load(Path(path), metric)[1]


def relabel_round(path, tag, old, new, metric="val_bpb"):
    """Rename round `old` of a tag to `new` (abandon keeps an abandoned round apart from its rerun)."""
    _update(path, metric, lambda rows: [{**r, "round": new} if (r.get("tag"), r.get("round")) == (tag, old) else r
                                        for r in rows])


def table(headers, rows):
    rows = [[str(c) for c in r] for r in rows]
    w = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    return "\n".join("  ".join(c.ljust(n) for c, n in zip(r, w, strict=True)).rstrip() for r in [headers, *rows])


def main(argv=None):
    ap = argparse.ArgumentParser(description="wait-jobs.sh output -> records; results.tsv as a table")
    ap.add_argument("cmd", choices=["parse", "show"])
    ap.add_argument("file", nargs="?", default="-")
    ap.add_argument("--tag", default="")
    ap.add_argument("--last", type=int, default=5, help="show: how many rounds")
    a = ap.parse_args(argv)
    metric = os.environ.get("AR_METRIC") or "val_bpb"
    if a.cmd == "parse":
        for rec in parse(sys.stdin.read() if a.file == "-" else Path(a.file).read_text(), metric):
            print(json.dumps(rec))
        return 0
    rows = [r for r in read_rows("results.tsv", metric) if r["tag"] == a.tag or not a.tag]
    last = list(dict.fromkeys((r["tag"], r["round"]) for r in rows))[-a.last:]
    cols = ["tag", "round", "candidate", "commit", metric, "num_steps", "status", "description"]
    body = [[r[c][:70] for c in cols] for r in rows if (r["tag"], r["round"]) in last]
    print(table(cols, body) if body else "no results yet" + (f" for tag {a.tag}" if a.tag else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
