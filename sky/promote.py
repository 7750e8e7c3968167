#!/usr/bin/env python3
"""
sky/promote.py -- re-run the best results of a tag on another accelerator; log them as their own rows.

    make promote TOP=2 GPU=H200 [TAG=...]      # sky/promote.py --top 2 --gpu H200 --tag ...

Screen cheap, promote winners: the TOP succeeded rows of the tag in results.tsv (lowest val_bpb; one
per distinct commit + overrides + profile; rows already on that GPU are skipped) run again on
SkyPilot with AR_SKY_GPU=GPU, in their own pool of clusters ar-<tag>-<gpu>-NN, each with the row's
commit, overrides and profile (AR_PROFILE overrides the profile). Every re-run is appended to
results.tsv through tools/results.py as its own row: round `promote`, candidate p1..pN, backend sky,
the GPU the trainer reported, status discard (measured, not adopted: promoting never moves the best
branch) or crash, and a description naming the row it re-ran. The job names end in the GPU
(ar-<tag>-<sha>-<hash>-<gpu>), so running the same promote again returns the same jobs and adds no
duplicate rows.

Env: AR_PROFILE, AR_BUDGET_USD (refuses when the expected cost would pass it, like make round),
AR_STATE_DIR, and the sky backend's settings (sky/README.md). stdout: a table; progress on stderr.
Exit: 0 every re-run succeeded, 1 some failed or a refusal, 2 bad arguments, 130 interrupted.
"""

import argparse
import hashlib
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
_spec = importlib.util.spec_from_file_location("ar_round", REPO / "tools" / "round.py")
RD = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(RD)  # the round driver: tag rules, prices, git helpers, and tools/results.py as RD.R
R = RD.R
GPU_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,40}")


def log(msg):
    print(f"promote: {msg}", file=sys.stderr, flush=True)


def knob_value(value):
    """A results.tsv override (JSON) as the trainer parses it: a Python literal, or a plain string."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def pick_rows(rows, tag, gpu, top):
    """The `top` best succeeded rows of `tag` not already measured on `gpu`, one per experiment."""
    best, seen = [], set()
    ok = [r for r in rows if r["tag"] == tag and r["status"] in ("keep", "discard")
          and (R.to_float(r["val_bpb"]) or 0) > 0 and r["commit"]]
    on_target = {(r["commit"], r["overrides"], r["profile"]) for r in ok if r["gpu"] == gpu}
    for r in sorted(ok, key=lambda r: R.to_float(r["val_bpb"])):
        key = (r["commit"], r["overrides"], r["profile"])
        if key in seen or key in on_target:
            continue
        seen.add(key)
        best.append(r)
        if len(best) == top:
            break
    return best


def job_name(tag, sha, pairs, slug):
    """ar-<tag>-<shortsha>-<overrides hash>-<gpu>: the backend's name (docs/contract.md) plus the GPU."""
    h = hashlib.sha256("".join(p + "\n" for p in sorted(pairs, key=lambda p: p.encode())).encode()).hexdigest()[:8]
    return f"ar-{tag}-{sha[:7]}-{h}-{slug}"[:63].rstrip("-")


def main(argv=None):
    env = os.environ.get
    ap = argparse.ArgumentParser(prog="sky/promote.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--top", default=env("AR_SKY_PROMOTE_TOP") or "2")
    ap.add_argument("--gpu", default=env("AR_SKY_PROMOTE_GPU") or "H200")
    ap.add_argument("--tag", default=env("AR_ROUND_TAG") or None)
    args = ap.parse_args(argv)
    args.top, args.gpu = args.top or "2", args.gpu or "H200"  # make passes empty values for unset TOP/GPU
    try:
        top = RD.parse_int("TOP", args.top, 1, 16)
        if not GPU_RE.fullmatch(args.gpu):
            raise RD.UsageError(f"GPU {args.gpu!r} is not an accelerator name like H200 or A100-80GB")
        tag = RD.validate_tag(args.tag)
        budget = RD.env_float("AR_BUDGET_USD")
    except RD.UsageError as e:
        log(f"error: {e}")
        return 2
    prices, overheads = RD.load_prices()
    gpu = RD.gpu_key(args.gpu, prices)
    slug = re.sub(r"[^a-z0-9-]+", "-", args.gpu.lower()).strip("-")
    rows = pick_rows(R.read_rows(RD.RESULTS_TSV), tag, gpu, top)
    if not rows:
        log(f"error: no succeeded rows of tag {tag} in {RD.rel(RD.RESULTS_TSV)} that are not on {gpu} yet")
        return 1
    profiles = RD.parse_profiles((REPO / "prepare" / "prepare.py").read_text())
    price = RD.price_of(prices, "sky", gpu)
    if budget is not None:
        if price is None:
            log(f"error: AR_BUDGET_USD is set but tools/prices.yaml has no sky price for {gpu}; add one")
            return 1
        per_job = [(profiles.get(env("AR_PROFILE") or r["profile"], 300) + float(overheads.get("sky", 0))) / 3600
                   * price for r in rows]
        recorded, pending = RD.spent_usd()
        if recorded + pending + sum(per_job) > budget + 1e-9:
            log(f"error: budget refused: spent ${recorded:.2f} + unfinished ${pending:.2f} + {len(rows)} promoted "
                f"job(s) ${sum(per_job):.2f} > AR_BUDGET_USD ${budget:.2f}; nothing submitted")
            return 1

    job_env = {**os.environ, "AR_TAG": tag, "AR_SKY_GPU": args.gpu}
    job_env.pop("AR_PROFILE", None)  # the profile goes with --env, per row
    plan = []
    for i, r in enumerate(rows, 1):
        sha = RD.rev(r["commit"])
        if sha is None:
            log(f"error: commit {r['commit']} of a {tag} row is not in this repository")
            return 1
        overrides = json.loads(r["overrides"]) if r["overrides"] else {}
        profile = env("AR_PROFILE") or r["profile"] or "full"
        pairs = [f"AR_{k}={knob_value(v)}" for k, v in overrides.items()] + [f"AR_PROFILE={profile}"]
        name = job_name(tag, sha, pairs, slug)
        cmd = [str(HERE / "submit-async.sh"), "--commit", sha, "--name", name]
        for p in pairs:
            cmd += ["--env", p]
        p = subprocess.run(cmd, capture_output=True, text=True, env=job_env, cwd=REPO)
        sys.stderr.write(p.stderr)
        if p.returncode != 0 or len(p.stdout.split()) != 1:
            log(f"error: submit of {r['commit']} failed (exit {p.returncode})")
            cancel([c["job_id"] for c in plan], job_env)
            return 1
        plan.append(dict(row=r, name=f"p{i}", job_id=p.stdout.strip(), overrides=overrides, profile=profile,
                         submitted_at=time.time()))
        log(f"p{i}: {r['commit']} {r['description'][:50]!r} (val_bpb {r['val_bpb']} on {r['gpu'] or '?'}) "
            f"-> {plan[-1]['job_id']} on {args.gpu}")

    ids = [c["job_id"] for c in plan]
    wait = subprocess.Popen([str(HERE / "wait-jobs.sh"), *ids], stdout=subprocess.PIPE, text=True, env=job_env,
                            cwd=REPO, start_new_session=True)
    chunks, arrivals = [], {}
    try:
        for line in wait.stdout:
            chunks.append(line)
            m = re.match(r"^=== (\S+) \(([a-z]+)\) ===", line)
            if m:
                arrivals[m.group(1)] = time.time()
        rc = wait.wait()
    except KeyboardInterrupt:
        os.killpg(wait.pid, signal.SIGTERM)  # wait-jobs.sh cancels the jobs and reports them
        wait.wait()
        log("interrupted: the promoted jobs were cancelled; nothing recorded")
        return 130
    records = {rec["job_id"]: rec for rec in R.parse_output("".join(chunks)) if rec["job_id"]}

    out_rows, table = [], []
    for c in plan:
        rec = records.get(c["job_id"]) or dict(ok=False, error="no result from wait-jobs.sh", state=None)
        c.update(result=rec, finished_at=arrivals.get(c["job_id"], time.time()))
        wall = RD.wall_seconds(overheads.get("sky", 0), c)
        got_gpu = RD.gpu_key(rec.get("gpu"), prices) if rec.get("gpu") not in (None, "cpu") else None
        row_gpu = got_gpu or gpu
        row_price = RD.price_of(prices, "sky", row_gpu)
        cost = wall / 3600 * row_price if row_price is not None else 0.0
        src = c["row"]
        desc = (f"promote round {src['round']} {src['candidate']} ({src['val_bpb']} on {src['gpu'] or '?'}) "
                f"to {args.gpu}: {src['description']}")
        status = "discard" if rec.get("ok") else "crash"
        if status == "crash":
            desc += f" -- crash: {rec.get('error') or rec.get('state') or 'unknown'}"
        out_rows.append(R.make_row(rec, commit=src["commit"], status=status, description=desc, round="promote",
                                   candidate=c["name"], backend="sky", gpu=row_gpu, profile=c["profile"],
                                   job_id=c["job_id"], wall_s=wall, cost_usd=cost, overrides=c["overrides"], tag=tag))
        val = rec.get("val_bpb")
        table.append([c["name"], src["commit"], src["gpu"] or "-", src["val_bpb"], row_gpu,
                      "-" if val is None or not math.isfinite(val) else f"{val:.6f}", c["job_id"], status])
    written = R.append_rows(RD.RESULTS_TSV, out_rows)
    headers = ["cand", "commit", "screened_on", "val_bpb", "promoted_to", "val_bpb_now", "job_id", "status"]
    print(R.table(headers, table))
    log(f"{written} row(s) appended to {RD.rel(RD.RESULTS_TSV)} (round promote)")
    return 0 if rc == 0 and all(c["result"].get("ok") for c in plan) else 1


def cancel(ids, env):
    if ids:
        subprocess.run([str(HERE / "cancel-jobs.sh"), *ids], env=env, cwd=REPO, capture_output=True)


if __name__ == "__main__":
    sys.exit(main())
