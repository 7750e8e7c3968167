"""trainer/train.py end to end on the smoke profile: the summary block, knobs as plain constants, fast fails."""

import ast
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import PY, REPO, clean_env, run_train

TRAIN = REPO / "trainer" / "train.py"
SUMMARY_KEYS = ["val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent", "total_tokens_M",
                "num_steps", "num_params_M", "depth", "profile", "data", "device", "startup_seconds", "tokens_per_sec"]


def summary_block(stdout):
    """The `key: value` lines after the last `---`, which must run to the end of stdout."""
    lines = stdout.rstrip("\n").splitlines()
    start = len(lines) - 1 - lines[::-1].index("---")
    summary = {}
    for line in lines[start + 1:]:
        m = re.fullmatch(r"(\w+): +(\S+)", line)
        assert m, f"not a summary line: {line!r}"
        summary[m.group(1)] = m.group(2)
    return summary


def knobs_line(stdout):
    line = next(line for line in stdout.splitlines() if line.startswith("knobs: "))
    return dict(item.split("=", 1) for item in line[len("knobs: "):].split())


def edited_trainer(tmp_path, **values):
    """A copy of trainer/train.py beside a link to prepare/, each NAME's line rewritten to `NAME = value` (keeping
    its comment) the way a sweep commit does. Returns the copy's repo root."""
    root = tmp_path / "repo"
    (root / "trainer").mkdir(parents=True)
    (root / "prepare").symlink_to(REPO / "prepare")
    text = TRAIN.read_text()
    for name, value in values.items():
        text, n = re.subn(rf"^{name} = [^#\n]*?(\s*#.*)?$", rf"{name} = {value}\g<1>", text, flags=re.M)
        assert n == 1, name
    (root / "trainer" / "train.py").write_text(text)
    return root


def run_copy(root, cache, **env):
    return subprocess.run([PY, "trainer/train.py"], cwd=root, env=clean_env(AR_CACHE_DIR=cache, **env),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def smoke_run(ar_cache):
    """The trainer as committed, with AR_ variables that v1 read as knob overrides (now ignored)."""
    t0 = time.time()
    proc = run_train(ar_cache, AR_PROFILE="smoke", AR_MATRIX_LR="1e9", AR_DEPTH="7", AR_MATRX_LR="0.05")
    return proc, time.time() - t0


def test_smoke_run_ends_with_the_reference_summary(smoke_run):
    proc, wall = smoke_run
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = summary_block(proc.stdout)
    assert list(summary) == SUMMARY_KEYS  # the reference keys in its order, then ours, and nothing after
    assert re.fullmatch(r"\d+\.\d{6}", summary["val_bpb"]) and 0 < float(summary["val_bpb"]) < 20
    assert summary["profile"] == "smoke" and summary["data"] == "offline" and summary["device"] == "cpu"
    assert summary["depth"] == "2" and int(summary["num_steps"]) > 1
    assert 4.9 <= float(summary["training_seconds"]) < 15  # the smoke profile's 5 s budget, not much more
    assert float(summary["tokens_per_sec"]) > 0 and float(summary["startup_seconds"]) > 0
    assert "AR_RESULT_JSON" not in proc.stdout + proc.stderr
    assert wall < 120


def test_ar_variables_are_not_knob_overrides(smoke_run):
    proc, _ = smoke_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    knobs = knobs_line(proc.stdout)
    assert knobs["MATRIX_LR"] == "0.04" and knobs["DEPTH"] == "2"  # the file's values, not AR_MATRIX_LR=1e9
    assert knobs["EMBEDDING_LR"] == "0.3" and knobs["HEAD_DIM"] == "32"  # the CPU side of `X if SMALL else Y`
    assert "AR_MATRX_LR" not in proc.stdout + proc.stderr  # an AR_ name the trainer does not know is no error


def test_progress_is_throttled_when_not_a_tty(smoke_run):
    proc, _ = smoke_run
    progress = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert "\r" not in proc.stdout
    assert 1 <= len(progress) <= 5  # one line every 5 s plus the final one, not one per step


def test_every_knob_is_one_module_level_line(smoke_run):
    """What a sweep relies on: each printed knob is one single-line `NAME = value` at module level, assigned
    nowhere else (no later override, no `global`)."""
    tree = ast.parse(TRAIN.read_text())
    body = [n for n in tree.body if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name)]
    names = [n.targets[0].id for n in body]
    knob_lines = {n.targets[0].id: n for n in body[names.index("SMALL") + 1:] if n.targets[0].id.isupper()}
    assert list(knob_lines) == list(knobs_line(smoke_run[0].stdout))  # what is printed, in file order
    assert {"DEPTH", "MATRIX_LR", "TOTAL_BATCH_SIZE", "COMPILE"} <= set(knob_lines) and "SEED" not in knob_lines
    stores = [n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)]
    declared_global = {name for n in ast.walk(tree) if isinstance(n, ast.Global) for name in n.names}
    for name, node in knob_lines.items():
        assert node.lineno == node.end_lineno and len(node.targets) == 1, name
        assert stores.count(name) == 1 and names.count(name) == 1 and name not in declared_global, name
    assert not re.search(r"globals\(\)(\[[^]]*\]\s*=|\.update)|setattr\(", TRAIN.read_text())


def test_an_edited_knob_line_is_what_the_run_uses(ar_cache, tmp_path):
    root = edited_trainer(tmp_path, DEPTH=3, MATRIX_LR=0.05)
    proc = run_copy(root, ar_cache, AR_PROFILE="smoke")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    knobs = knobs_line(proc.stdout)
    assert knobs["DEPTH"] == "3" and knobs["MATRIX_LR"] == "0.05" and knobs["HEAD_DIM"] == "32"
    assert "model: dim=192 heads=6 " in proc.stdout
    assert summary_block(proc.stdout)["depth"] == "3"


def test_huge_learning_rate_fails_fast(ar_cache, tmp_path):
    root = edited_trainer(tmp_path, UNEMBEDDING_LR="1e6", EMBEDDING_LR="1e6")
    t0 = time.time()
    proc = run_copy(root, ar_cache, AR_PROFILE="smoke")
    wall = time.time() - t0
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert knobs_line(proc.stdout)["UNEMBEDDING_LR"] == "1000000.0"
    last = proc.stdout.rstrip().splitlines()[-1]
    assert re.fullmatch(r"FAIL: loss (is nan|exploded to \S+ \(> \S+\)) at step \d+", last), last
    assert "---" not in proc.stdout.splitlines()  # no summary for a failed run
    assert wall < 30  # well before the end of the budget + eval


@pytest.mark.parametrize("edit, word", [(dict(WARMDOWN_RATIO=-0.5), "WARMDOWN_RATIO"),
                                        (dict(TOTAL_BATCH_SIZE=1000), "TOTAL_BATCH_SIZE"),
                                        (dict(DEVICE_BATCH_SIZE=0), "TOTAL_BATCH_SIZE")])
def test_bad_configuration_is_a_one_line_error(ar_cache, tmp_path, edit, word):
    proc = run_copy(edited_trainer(tmp_path, **edit), ar_cache, AR_PROFILE="smoke")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("train: error: ") and word in proc.stderr
    assert "step " not in proc.stdout


def test_unknown_profile_is_a_one_line_error(ar_cache):
    proc = run_train(ar_cache, AR_PROFILE="huge")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "huge" in proc.stderr


def test_unprepared_data_names_the_fix(tmp_path):
    proc = run_train(tmp_path / "empty-cache", AR_PROFILE="smoke")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "make prepare" in proc.stderr


def test_sigterm_ends_with_a_fail_line_and_143(ar_cache):
    """A cancelled or preempted job still leaves its reason as the last line."""
    proc = subprocess.Popen([sys.executable, "trainer/train.py"], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env=clean_env(AR_CACHE_DIR=ar_cache, AR_PROFILE="smoke"))
    for line in proc.stdout:  # wait until training has started
        if line.startswith("step "):
            break
    os.kill(proc.pid, signal.SIGTERM)
    out = proc.stdout.read()
    assert proc.wait(timeout=30) == 143
    assert out.rstrip().splitlines()[-1] == "FAIL: terminated (SIGTERM)"
