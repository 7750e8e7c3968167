#!/usr/bin/env python3
"""
tools/plot.py -- progress.png from results.tsv: every experiment a point (crashes as x marks on the
floor of the plot), winners filled, controls hollow, and the best as a step line: at each point, the commit of
the latest kept row, scored as the round driver scores it (the mean of all its runs).

    python tools/plot.py [--file results.tsv] [--out progress.png] [--tag TAG] [--profile P]

Results of different tags, profiles, GPUs or backends are never mixed on one plot: by default it shows
the (tag, profile, gpu, backend) of the most recent row; --tag/--profile pick another.
"""

import argparse
import importlib.util
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
R_METRIC = os.environ.get("AR_METRIC") or "val_bpb"
R_GOAL = os.environ.get("AR_METRIC_GOAL") or "min"
_spec = importlib.util.spec_from_file_location("ar_results", HERE / "results.py")
R = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(R)


def select(rows, tag=None, profile=None):
    rows = [r for r in rows if (not tag or r["tag"] == tag) and (not profile or r["profile"] == profile)]
    if not rows:
        return None, []
    last = rows[-1]
    key = (last["tag"], last["profile"], last["gpu"], last["backend"])
    return key, [r for r in rows if (r["tag"], r["profile"], r["gpu"], r["backend"]) == key]


def plot(rows, key, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    xs = list(range(1, len(rows) + 1))
    vals = [r.score for r in rows]
    ok = [(x, v, r) for x, v, r in zip(xs, vals, rows, strict=True) if v is not None]
    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=120)
    disc = [(x, v) for x, v, r in ok if r["status"] != "keep"]
    keep = [(x, v, r) for x, v, r in ok if r["status"] == "keep"]
    if disc:
        ax.scatter(*zip(*disc, strict=True), s=18, c="#b0b0b0", label="discarded", zorder=2)
    won = [(x, v) for x, v, r in keep if not R.CONTROL.fullmatch(r["candidate"])]
    ctl = [(x, v) for x, v, r in keep if R.CONTROL.fullmatch(r["candidate"])]
    if ctl:
        ax.scatter(*zip(*ctl, strict=True), s=30, facecolors="none", edgecolors="#1f9e4a", linewidths=1.2,
                   label="control (the best, re-run)", zorder=4)
    if won:
        ax.scatter(*zip(*won, strict=True), s=46, c="#1f9e4a", edgecolors="black", linewidths=0.5,
                   label="kept (a winner)", zorder=4)
    runs = {}
    for _, v, r in keep:
        runs.setdefault(r["commit"], []).append(v)
    best, line_x, line_y = None, [], []
    for x, _, r in ok:
        if r["status"] == "keep":
            best = sum(runs[r["commit"]]) / len(runs[r["commit"]])
        if best is not None:
            line_x.append(x)
            line_y.append(best)
    if line_x:
        ax.step(line_x, line_y, where="post", c="#d62728", lw=1.6, label="best (mean of its runs)", zorder=3)
    crashes = [x for x, r in zip(xs, rows, strict=True) if r["status"] == "crash"]
    if crashes:  # drawn just below the lowest score: a crash has none
        lo, hi = min((v for _, v, _ in ok), default=1.0), max((v for _, v, _ in ok), default=1.0)
        floor = lo - 0.05 * ((hi - lo) or abs(lo) or 1.0)
        ax.scatter(crashes, [floor] * len(crashes), marker="x", c="#d62728", s=28, label="crash", zorder=2)
    ax.set_xlabel("experiment #")
    ax.set_ylabel(f"{R_METRIC} ({'lower' if R_GOAL == 'min' else 'higher'} is better)")
    tag, profile, gpu, backend = key
    title = f"autoresearch/{tag}: profile {profile}, {gpu} on {backend} -- {len(rows)} experiments"
    if best is not None:
        title += f", best {best:.6f}"
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    tmp = Path(out).with_name(f".{Path(out).name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)


def main(argv=None):
    ap = argparse.ArgumentParser(description="progress.png from results.tsv")
    ap.add_argument("--file", default="results.tsv")
    ap.add_argument("--out", default="progress.png")
    ap.add_argument("--tag", default=os.environ.get("AR_ROUND_TAG") or None)
    ap.add_argument("--profile", default=os.environ.get("AR_PROFILE") or None)
    args = ap.parse_args(argv)
    key, rows = select(R.read_rows(args.file, R_METRIC), args.tag, args.profile)
    if not rows:
        print(f"plot: error: no results in {args.file}" + (f" for tag {args.tag}" if args.tag else ""),
              file=sys.stderr)
        return 1
    plot(rows, key, args.out)
    print(f"plot: wrote {args.out} ({len(rows)} experiments of tag {key[0]}, profile {key[1]}, {key[2]} on {key[3]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
