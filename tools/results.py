#!/usr/bin/env python3
"""
tools/results.py -- turn trainer output into rows, and keep results.tsv.

Parses what `wait-jobs.sh` prints (`=== ID (STATE) ===` blocks) or a raw trainer log. Logs come from
many places, so the parser copes with `\\r` progress lines, ANSI colour, SkyPilot's `(task, pid=N) `
prefix, truncated logs, crash traces, NaN and a missing summary. Per job it prefers the trainer's
`AR_RESULT_JSON: {...}` line, falls back to the `---` summary block of `key: value` lines, and
otherwise reports a crash with the reason (`FAIL: ...` line, exception, `train: error:`, job state).

results.tsv keeps the reference's first five tab-separated columns
(commit val_bpb memory_gb status description; status is keep|discard|crash, memory_gb is
peak_vram_mb/1024 rounded to .1, crash rows have val_bpb 0.000000) and adds round, candidate,
backend, gpu, profile, job_id, wall_s, cost_usd, overrides (compact JSON), tag and timestamp.
Appends are atomic: an flock on the file's directory, a temporary file, then a rename, so
existing rows are never lost and concurrent writers never drop each other's rows. An older file
with fewer columns keeps its rows; its header is extended.

    python tools/results.py parse FILE [FILE ...]    # '-' reads stdin; --json for the records
    python tools/results.py show [--last N] [--file results.tsv] [--tag TAG]

Library use (the round driver loads this file by path, the repo root never goes on sys.path):
parse_output(text) -> [record], parse_log(text) -> record, append_rows(path, rows), read_rows(path),
relabel_round(path, tag, old, new).
"""

import argparse
import contextlib
import fcntl
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

COLUMNS = [
    "commit", "val_bpb", "memory_gb", "status", "description",  # the reference's five columns
    "round", "candidate", "backend", "gpu", "profile", "job_id", "wall_s", "cost_usd", "overrides",
    "tag", "timestamp",
]
STATUSES = ("keep", "discard", "crash")
JOB_STATES = ("succeeded", "failed", "timeout", "cancelled")
RESULT_PREFIX = "AR_RESULT_JSON:"

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
# SkyPilot prefixes every line of a task's output: `(task, pid=1234) `, `(worker1, rank=1, pid=99, ip=...) `
_SKY_PREFIX = re.compile(r"^\((?:[^()]*?[,\s]\s*)?pid=\d+[^()]*\)\s?")  # "(task, pid=N) ", "(setup pid=N) "
_HEADER = re.compile(r"^=== (\S+) \(([a-z]+)\) ===\s*$")
_SUMMARY_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):\s+(\S.*?)\s*$")
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit)(?::\s*(.*))?$")


# ----------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------
def clean_lines(text):
    """Logical lines of a log: ANSI removed, SkyPilot prefix removed, `\\r`-overwritten text resolved."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    out = []
    for raw in text.split("\n"):
        raw = _ANSI.sub("", raw)
        raw = _SKY_PREFIX.sub("", raw)
        segments = [_SKY_PREFIX.sub("", s) for s in raw.split("\r")]
        visible = [s for s in segments if s.strip()]
        out.append(visible[-1].rstrip() if visible else "")
    return out


def _number(text):
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _last_json(lines):
    for line in reversed(lines):
        pos = line.find(RESULT_PREFIX)
        if pos < 0:
            continue
        try:
            data = json.loads(line[pos + len(RESULT_PREFIX):].strip())
        except ValueError:
            continue  # truncated or garbled: try an earlier one, then the summary block
        if isinstance(data, dict):
            return data
    return None


def _summary(lines):
    starts = [i for i, line in enumerate(lines) if line.strip() == "---"]
    for start in reversed(starts):
        values = {}
        for line in lines[start + 1:]:
            m = _SUMMARY_LINE.match(line.strip())
            if not m:
                break
            values[m.group(1)] = _number(m.group(2))
        if "val_bpb" in values:
            return values
    return None


def _crash_reason(lines, data):
    for line in reversed(lines):
        s = line.strip()
        if s.startswith("FAIL:"):
            return s[5:].strip() or "FAIL"
    if data and data.get("error"):
        return str(data["error"])
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("Traceback (most recent call last)"):
            for line in lines[i + 1:]:
                if _EXCEPTION_LINE.match(line.strip()):
                    return line.strip()
            return "crashed (traceback, log truncated)"
    for line in reversed(lines):
        s = line.strip()
        if s.startswith("train: error:"):
            return s[len("train: "):]
    return None


def parse_log(text, state=None, job_id=None):
    """One job's output -> a record dict.

    Keys: job_id, state, ok (bool), val_bpb, peak_vram_mb, training_seconds, total_seconds, profile,
    gpu, overrides (dict), error (crash reason or None), source ('json'|'summary'|None), result (dict).
    `ok` needs a finite val_bpb and, when the backend reported a state, state == 'succeeded'.
    """
    lines = clean_lines(text)
    data, source = _last_json(lines), None
    values = None
    if data is not None and data.get("status", "ok") == "ok" and "val_bpb" in data:
        values, source = data, "json"
    elif data is None or data.get("status", "ok") == "ok":
        summary = _summary(lines)
        if summary is not None:
            values, source = summary, "summary"
    rec = dict(job_id=job_id, state=state, ok=False, val_bpb=None, peak_vram_mb=None, training_seconds=None,
               total_seconds=None, profile=None, gpu=None, overrides={}, error=None, source=source,
               result=values if values is not None else (data or {}))
    base = values if values is not None else (data or {})
    for key in ("peak_vram_mb", "training_seconds", "total_seconds"):
        if _finite(base.get(key)):
            rec[key] = float(base[key])
    rec["profile"] = base.get("profile") if isinstance(base.get("profile"), str) else None
    gpu = base.get("gpu") or base.get("device")
    rec["gpu"] = gpu if isinstance(gpu, str) else None
    if isinstance(base.get("overrides"), dict):
        rec["overrides"] = base["overrides"]

    val = values.get("val_bpb") if values is not None else None
    if isinstance(val, str) and val.strip().lower() in ("nan", "inf", "-inf", "+inf"):
        val = float(val)
    reason = _crash_reason(lines, data)
    if values is not None and not _finite(val):
        reason = reason or f"val_bpb is {val}"
    elif values is not None:
        rec["val_bpb"] = float(val)
    if rec["val_bpb"] is not None and state in (None, "succeeded"):
        rec["ok"] = True
        return rec
    if state not in (None, "succeeded"):
        reason = f"{state}: {reason}" if reason else f"job {state}"
    elif reason is None:
        reason = "no result in output (missing summary or truncated log)"
    rec["error"] = reason
    rec["val_bpb"] = None
    return rec


def parse_output(text):
    """wait-jobs.sh output (`=== ID (STATE) ===` blocks) or one raw log -> list of records."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    blocks, current = [], None
    for raw in text.split("\n"):
        m = _HEADER.match(_SKY_PREFIX.sub("", _ANSI.sub("", raw)).strip("\r"))
        if m:
            current = [m.group(1), m.group(2), []]
            blocks.append(current)
        elif current is not None:
            current[2].append(raw)
    if not blocks:
        return [parse_log(text)]
    return [parse_log("\n".join(body), state=state, job_id=job_id) for job_id, state, body in blocks]


# ----------------------------------------------------------------------------------------------
# results.tsv
# ----------------------------------------------------------------------------------------------
def sanitize(value):
    """One TSV field: no tabs or newlines, ever."""
    if value is None:
        return ""
    if isinstance(value, float):
        value = f"{value:g}" if math.isfinite(value) else str(value)
    return re.sub(r"[\t\r\n\x0b\x0c]+", " ", str(value)).strip()


def format_overrides(overrides):
    return json.dumps(overrides, sort_keys=True, separators=(",", ":")) if overrides else ""


def make_row(record, *, commit, status, description, **extra):
    """A results.tsv row (dict of strings) from a parser record plus driver fields."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, not {status!r}")
    crash = status == "crash"
    val = record.get("val_bpb")
    mem = record.get("peak_vram_mb")
    row = dict(
        commit=commit,
        val_bpb="0.000000" if crash or val is None else f"{val:.6f}",
        memory_gb="0.0" if crash or mem is None else f"{mem / 1024:.1f}",
        status=status,
        description=description,
        timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    if "overrides" in extra and isinstance(extra["overrides"], dict):
        extra["overrides"] = format_overrides(extra["overrides"])
    for key in ("wall_s",):
        if isinstance(extra.get(key), float):
            extra[key] = f"{extra[key]:.1f}"
    if isinstance(extra.get("cost_usd"), float):
        extra["cost_usd"] = f"{extra['cost_usd']:.4f}"
    row.update(extra)
    return {k: sanitize(v) for k, v in row.items()}


@contextlib.contextmanager
def _dir_lock(directory):
    """An exclusive flock on a directory: stable across the rename that replaces the file."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _split_existing(text):
    lines = text.splitlines()
    if not lines:
        return None, []
    first = lines[0].split("\t")
    if "val_bpb" in first and "commit" in first:
        return first, lines[1:]
    return None, lines  # headerless: keep every line as a row


def append_rows(path, rows, dedupe=True):
    """Append rows (dicts) to a results.tsv atomically; returns how many were written.

    Rows follow the file's own header (extended with any missing standard columns); existing lines
    are kept verbatim. With dedupe, a row whose (tag, round, candidate, job_id) is already in the
    file is skipped, so a resumed driver never records a job twice.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _dir_lock(path.parent):
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = ""
        header, lines = _split_existing(text)
        header = list(header or [])
        header += [c for c in COLUMNS if c not in header]
        key_cols = ("tag", "round", "candidate", "job_id")
        seen = set()
        if dedupe:
            idx = [header.index(c) for c in key_cols]
            for line in lines:
                f = line.split("\t")
                key = tuple(f[i] if i < len(f) else "" for i in idx)
                if all(key):
                    seen.add(key)
        new = []
        for row in rows:
            key = tuple(sanitize(row.get(c)) for c in key_cols)
            if dedupe and all(key) and key in seen:
                continue
            seen.add(key)
            new.append("\t".join(sanitize(row.get(c)) for c in header))
        if not new and text:
            return 0
        _replace(path, "\n".join(["\t".join(header)] + lines + new) + "\n")
        return len(new)


def _replace(path, body):
    """Write body to path atomically (temporary file, fsync, rename), keeping the file's mode."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        else:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def relabel_round(path, tag, old, new):
    """Set the round column of the rows of (tag, round old) to new, atomically; returns how many changed.
    `abandon` uses it so that an abandoned round's rows stay apart from the round that reuses its number.
    Every other line is kept verbatim."""
    path = Path(path)
    if not path.exists():
        return 0
    with _dir_lock(path.parent):
        header, lines = _split_existing(path.read_text())
        if not header or "round" not in header or "tag" not in header:
            return 0
        i_round, i_tag = header.index("round"), header.index("tag")
        out, changed = [], 0
        for line in lines:
            f = line.split("\t")
            if len(f) > max(i_round, i_tag) and f[i_tag] == tag and f[i_round] == old:
                f[i_round] = sanitize(new)
                line, changed = "\t".join(f), changed + 1
            out.append(line)
        if changed:
            _replace(path, "\n".join(["\t".join(header)] + out) + "\n")
        return changed


def read_rows(path):
    """results.tsv -> list of dicts (every standard column present, '' when missing)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    header, lines = _split_existing(text)
    header = header or COLUMNS
    rows = []
    for line in lines:
        if not line.strip():
            continue
        f = line.split("\t")
        row = {c: "" for c in COLUMNS}
        row.update({h: (f[i] if i < len(f) else "") for i, h in enumerate(header)})
        rows.append(row)
    return rows


def to_float(text, default=None):
    try:
        x = float(text)
    except (TypeError, ValueError):
        return default
    return x if math.isfinite(x) else default


# ----------------------------------------------------------------------------------------------
# Tables and CLI
# ----------------------------------------------------------------------------------------------
def table(headers, rows):
    """A plain aligned text table."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
    return "\n".join([fmt(headers), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def _round_key(row):
    try:
        return int(row.get("round") or 0)
    except ValueError:
        return 0


def show(path, last=5, tag=None):
    rows = [r for r in read_rows(path) if not tag or r.get("tag") == tag]
    if not rows:
        return f"no results in {path} yet" + (f" for tag {tag}" if tag else "")
    groups = []
    for r in rows:
        key = (r.get("tag", ""), r.get("round", ""))
        if not groups or groups[-1][0] != key:
            groups.append((key, []))
        groups[-1][1].append(r)
    cols = ["tag", "round", "candidate", "commit", "val_bpb", "memory_gb", "status", "profile", "gpu", "backend",
            "cost_usd", "description"]
    keep = groups[-last:] if last else groups
    body = [[r.get(c, "")[:7] if c == "commit" else r.get(c, "")[:60] for c in cols] for _, g in keep for r in g]
    spent = sum(to_float(r.get("cost_usd"), 0.0) for r in read_rows(path))
    return table(cols, body) + f"\n{len(rows)} experiments, {len(groups)} rounds; spent ${spent:.2f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("parse", help="parse wait-jobs output or raw logs")
    p.add_argument("files", nargs="+")
    p.add_argument("--json", action="store_true", help="one JSON record per line")
    s = sub.add_parser("show", help="the last rounds of results.tsv as a table")
    s.add_argument("--file", default=os.environ.get("AR_RESULTS_TSV", "results.tsv"))
    s.add_argument("--last", type=int, default=5, help="rounds to show (0 = all)")
    s.add_argument("--tag", default=None)
    args = ap.parse_args(argv)
    if args.cmd == "show":
        print(show(args.file, args.last, args.tag))
        return 0
    records = []
    for name in args.files:
        try:
            text = sys.stdin.read() if name == "-" else Path(name).read_text(errors="replace")
        except OSError as e:
            print(f"results: error: {e}", file=sys.stderr)
            return 2
        records += parse_output(text)
    if args.json:
        for r in records:
            print(json.dumps({k: v for k, v in r.items() if k != "result"}, sort_keys=True, default=str))
    else:
        print(table(["job_id", "state", "ok", "val_bpb", "peak_vram_mb", "source", "error"],
                    [[r["job_id"] or "-", r["state"] or "-", "yes" if r["ok"] else "no",
                      "-" if r["val_bpb"] is None else f"{r['val_bpb']:.6f}",
                      "-" if r["peak_vram_mb"] is None else r["peak_vram_mb"], r["source"] or "-", r["error"] or ""]
                     for r in records]))
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
