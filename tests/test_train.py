"""trainer/train.py end to end on the CPU profiles, plus its knob parsing and fast-fail paths."""

import json
import math
import re
import time

import pytest
from conftest import run_train

SUMMARY_KEYS = ["val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent", "total_tokens_M",
                "num_steps", "num_params_M", "depth", "profile", "data", "device", "startup_seconds", "tokens_per_sec"]


def parse_summary(stdout):
    lines = stdout.splitlines()
    start = len(lines) - 1 - lines[::-1].index("---")
    summary = {}
    for line in lines[start + 1:]:
        if line.startswith("AR_RESULT_JSON: "):
            break
        key, _, value = line.partition(":")
        summary[key] = value.strip()
    return summary


def result_json(stdout):
    last = stdout.rstrip().splitlines()[-1]
    assert last.startswith("AR_RESULT_JSON: "), last
    return json.loads(last[len("AR_RESULT_JSON: "):])


@pytest.fixture(scope="module")
def smoke_run(ar_cache, tmp_path_factory):
    result_path = tmp_path_factory.mktemp("result") / "sub" / "result.json"
    t0 = time.time()
    proc = run_train(ar_cache, AR_PROFILE="smoke", AR_MATRIX_LR="0.05", AR_RESULT_PATH=result_path)
    return proc, result_path, time.time() - t0


def test_smoke_run_prints_reference_summary(smoke_run):
    proc, _, wall = smoke_run
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = parse_summary(proc.stdout)
    assert list(summary) == SUMMARY_KEYS  # the reference order, then our extra keys
    assert math.isfinite(float(summary["val_bpb"])) and 0 < float(summary["val_bpb"]) < 20
    assert re.fullmatch(r"\d+\.\d{6}", summary["val_bpb"])
    assert summary["profile"] == "smoke" and summary["data"] == "offline" and summary["device"] == "cpu"
    assert int(summary["num_steps"]) > 1
    assert 4.9 <= float(summary["training_seconds"]) < 15  # the smoke profile's 5 s budget, not much more
    assert float(summary["tokens_per_sec"]) > 0 and float(summary["startup_seconds"]) > 0
    assert wall < 120


def test_smoke_run_writes_machine_readable_result(smoke_run):
    proc, result_path, _ = smoke_run
    line = result_json(proc.stdout)
    on_disk = json.loads(result_path.read_text())
    assert line == on_disk
    assert line["status"] == "ok" and line["gpu"] == "cpu"
    summary = parse_summary(proc.stdout)
    assert f"{line['val_bpb']:.6f}" == summary["val_bpb"]
    assert line["num_steps"] == int(summary["num_steps"])
    assert len(line["train_py_sha256"]) == 64
    assert not list(result_path.parent.glob("*.tmp"))


def test_env_override_changes_the_printed_knob(smoke_run):
    proc, _, _ = smoke_run
    knob_line = next(line for line in proc.stdout.splitlines() if line.startswith("knobs: "))
    assert "MATRIX_LR=0.05*" in knob_line
    assert "EMBEDDING_LR=0.3 " in knob_line  # a CPU-profile value, not overridden: no star
    result = result_json(proc.stdout)
    assert result["overrides"] == {"MATRIX_LR": 0.05}
    assert result["knobs"]["MATRIX_LR"] == 0.05


def test_progress_is_throttled_when_not_a_tty(smoke_run):
    proc, _, _ = smoke_run
    progress = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert "\r" not in proc.stdout
    assert 1 <= len(progress) <= 5  # one line every 5 s plus the final one, not one per step


def test_unknown_knob_is_an_error_listing_valid_knobs(ar_cache):
    t0 = time.time()
    proc = run_train(ar_cache, AR_PROFILE="smoke", AR_MATRX_LR="0.05")
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "unknown knob AR_MATRX_LR" in err[0] and "AR_MATRIX_LR" in err[0]
    assert "step " not in proc.stdout and time.time() - t0 < 30


@pytest.mark.parametrize("value", ['"0.05', "abc", "0.05; touch pwned", "$(touch pwned)", "True"])
def test_bad_knob_value_is_a_one_line_error(ar_cache, value, tmp_path):
    proc = run_train(ar_cache, AR_PROFILE="smoke", AR_MATRIX_LR=value)
    assert proc.returncode == 2, proc.stdout
    assert proc.stderr.strip().count("\n") == 0 and "AR_MATRIX_LR" in proc.stderr
    assert not any(tmp_path.glob("pwned"))


def test_unknown_profile_is_a_one_line_error(ar_cache):
    proc = run_train(ar_cache, AR_PROFILE="huge")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "huge" in proc.stderr


def test_unprepared_data_names_the_fix(tmp_path):
    proc = run_train(tmp_path / "empty-cache", AR_PROFILE="smoke")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "make prepare" in proc.stderr


def test_huge_learning_rate_fails_fast(ar_cache, tmp_path):
    t0 = time.time()
    result_path = tmp_path / "result.json"
    proc = run_train(ar_cache, AR_PROFILE="smoke", AR_UNEMBEDDING_LR="1e6", AR_EMBEDDING_LR="1e6",
                     AR_RESULT_PATH=result_path)
    wall = time.time() - t0
    assert proc.returncode == 1, proc.stdout[-2000:]
    fail = [line for line in proc.stdout.splitlines() if line.startswith("FAIL: ")]
    assert len(fail) == 1 and ("nan" in fail[0] or "exploded" in fail[0]), proc.stdout[-1000:]
    result = result_json(proc.stdout)
    assert result["status"] == "fail" and result["profile"] == "smoke"
    assert json.loads(result_path.read_text())["status"] == "fail"
    assert "---" not in proc.stdout.splitlines()  # no summary for a failed run
    assert wall < 30  # well before the end of the budget + eval


@pytest.mark.parametrize("env", [dict(AR_TOTAL_BATCH_SIZE="1000"), dict(AR_DEVICE_BATCH_SIZE="0")])
def test_bad_batch_geometry_is_a_config_error(ar_cache, env):
    proc = run_train(ar_cache, AR_PROFILE="smoke", **env)
    assert proc.returncode == 2 and "TOTAL_BATCH_SIZE" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


def test_tiny_profile_end_to_end(ar_cache):
    """The CPU/CI profile as `AR_PROFILE=tiny make train` runs it: finite val_bpb well under 3 minutes."""
    t0 = time.time()
    proc = run_train(ar_cache, AR_PROFILE="tiny")
    wall = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = result_json(proc.stdout)
    assert result["profile"] == "tiny" and math.isfinite(result["val_bpb"])
    assert result["val_bpb"] < 8.0  # learned something: a uniform guess over 2048 tokens is far worse
    assert wall < 180


def test_sigterm_ends_with_a_fail_line_and_result(ar_cache, tmp_path):
    """A cancelled or preempted job still leaves a FAIL line and a result.json behind."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import REPO, clean_env

    result_path = tmp_path / "result.json"
    proc = subprocess.Popen([sys.executable, "trainer/train.py"], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env=clean_env(AR_CACHE_DIR=ar_cache, AR_PROFILE="tiny", AR_RESULT_PATH=result_path))
    for line in proc.stdout:  # wait until training has started
        if line.startswith("step "):
            break
    os.kill(proc.pid, signal.SIGTERM)
    out = proc.stdout.read()
    assert proc.wait(timeout=30) == 143
    assert "FAIL: terminated (SIGTERM)" in out
    assert json.loads(result_path.read_text())["status"] == "fail"
