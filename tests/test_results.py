"""tools/results.py: the output parser on crafted logs, and results.tsv's atomic appends."""

import importlib.util
import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("ar_results_under_test", REPO / "tools" / "results.py")
R = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(R)

RESULT = {"status": "ok", "val_bpb": 2.197529, "training_seconds": 5.1, "total_seconds": 8.1,
          "peak_vram_mb": 589.3, "mfu_percent": 0.0, "num_steps": 29, "profile": "smoke", "data": "offline",
          "device": "cpu", "gpu": "cpu", "overrides": {"MATRIX_LR": 0.05}}
SUMMARY = """---
val_bpb:          2.197529
training_seconds: 5.1
total_seconds:    8.1
peak_vram_mb:     589.3
mfu_percent:      0.0
total_tokens_M:   0.1
num_steps:        29
num_params_M:     0.7
depth:            2
profile:          smoke
data:             offline
device:           cpu
startup_seconds:  2.8
tokens_per_sec:   22529
"""
HEAD = "profile: smoke | data: offline | device: cpu | seq_len: 128 | time_budget: 5s | vocab: 1024\n"
GOOD = HEAD + "step 00001 (0.0%) | loss 6.9\n" + SUMMARY + "AR_RESULT_JSON: " + json.dumps(RESULT) + "\n"


def test_good_summary_prefers_json():
    rec = R.parse_log(GOOD)
    assert rec["ok"] and rec["source"] == "json" and rec["error"] is None
    assert rec["val_bpb"] == pytest.approx(2.197529)
    assert rec["peak_vram_mb"] == pytest.approx(589.3)
    assert rec["overrides"] == {"MATRIX_LR": 0.05} and rec["gpu"] == "cpu" and rec["profile"] == "smoke"


def test_summary_fallback_without_json():
    rec = R.parse_log(HEAD + SUMMARY)
    assert rec["ok"] and rec["source"] == "summary"
    assert rec["val_bpb"] == pytest.approx(2.197529) and rec["profile"] == "smoke" and rec["gpu"] == "cpu"


def test_carriage_return_progress_lines():
    progress = "".join(f"\rstep {i:05d} ({i}%) | loss {7 - i / 10:.4f}        " for i in range(1, 40))
    text = HEAD + progress + "\n" + SUMMARY.replace("\n", "\r\n") + "AR_RESULT_JSON: " + json.dumps(RESULT) + "\r\n"
    rec = R.parse_log(text)
    assert rec["ok"] and rec["val_bpb"] == pytest.approx(2.197529)
    # progress and summary glued on one \r line: the summary still counts
    glued = HEAD + progress + "\r---\n" + SUMMARY.split("---\n", 1)[1]
    assert R.parse_log(glued)["val_bpb"] == pytest.approx(2.197529)


def test_truncated_log_json_cut_falls_back_to_summary():
    line = "AR_RESULT_JSON: " + json.dumps(RESULT)
    rec = R.parse_log(HEAD + SUMMARY + line[: len(line) // 2])
    assert rec["ok"] and rec["source"] == "summary"


def test_truncated_log_without_summary_is_a_crash():
    rec = R.parse_log(HEAD + "step 00001 (0.0%) | loss 6.9\nstep 00002 (3.0%) | lo")
    assert not rec["ok"] and rec["val_bpb"] is None
    assert "no result" in rec["error"]


def test_crash_trace():
    text = HEAD + (
        "Traceback (most recent call last):\n"
        '  File "trainer/train.py", line 500, in main\n'
        "    loss = train_model(x, y)\n"
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n")
    rec = R.parse_log(text, state="failed", job_id="j1")
    assert not rec["ok"] and rec["job_id"] == "j1"
    assert rec["error"].startswith("failed: torch.OutOfMemoryError: CUDA out of memory")


def test_nan_fail_line_and_fail_json():
    fail = {"status": "fail", "error": "loss is nan at step 3", "profile": "smoke", "gpu": "cpu",
            "total_seconds": 3.2}
    text = HEAD + "step 00003 (1.0%) | loss nan\n\nFAIL: loss is nan at step 3\nAR_RESULT_JSON: " + json.dumps(fail)
    rec = R.parse_log(text)
    assert not rec["ok"] and rec["error"] == "loss is nan at step 3" and rec["total_seconds"] == 3.2
    # a summary reporting nan (no FAIL line) is a crash too, never a score
    rec = R.parse_log(HEAD + SUMMARY.replace("2.197529", "nan"))
    assert not rec["ok"] and "nan" in rec["error"]
    rec = R.parse_log(HEAD + "AR_RESULT_JSON: " + json.dumps(dict(RESULT, val_bpb=float("nan"))))
    assert not rec["ok"] and rec["val_bpb"] is None


def test_missing_summary_config_error():
    rec = R.parse_log("train: error: AR_DEPTH='x' is not a valid int\n", state="failed")
    assert not rec["ok"] and rec["error"] == "failed: error: AR_DEPTH='x' is not a valid int"
    rec = R.parse_log("", state="timeout")
    assert not rec["ok"] and rec["error"] == "job timeout"


def test_ansi_colour_and_sky_prefix():
    coloured = GOOD.replace("val_bpb:", "\x1b[1;32mval_bpb:\x1b[0m").replace("---", "\x1b[2m---\x1b[0m")
    no_json = coloured.rsplit("AR_RESULT_JSON", 1)[0]
    rec = R.parse_log(no_json)
    assert rec["ok"] and rec["source"] == "summary" and rec["val_bpb"] == pytest.approx(2.197529)
    sky = "".join(f"(task, pid=4242) {line}\n" for line in GOOD.splitlines())
    sky = sky.replace("(task, pid=4242) step", "(task, pid=4242) \rstep 00000\r(task, pid=4242) step")
    rec = R.parse_log(sky)
    assert rec["ok"] and rec["source"] == "json" and rec["val_bpb"] == pytest.approx(2.197529)
    multi = "".join(f"(worker1, rank=1, pid=77, ip=10.0.0.2) {line}\n" for line in (HEAD + SUMMARY).splitlines())
    assert R.parse_log(multi)["val_bpb"] == pytest.approx(2.197529)
    setup = "".join(f"(setup pid=12) {line}\n" for line in (HEAD + SUMMARY).splitlines())
    assert R.parse_log(setup)["val_bpb"] == pytest.approx(2.197529)


def test_wait_jobs_blocks():
    fail = {"status": "fail", "error": "loss exploded", "gpu": "cpu"}
    out = (f"=== ar-t-abc1234-1 (succeeded) ===\n{SUMMARY}AR_RESULT_JSON: {json.dumps(RESULT)}\n"
           f"=== ar-t-abc1234-2 (failed) ===\nstep 1\nFAIL: loss exploded\nAR_RESULT_JSON: {json.dumps(fail)}\n"
           "=== ar-t-abc1234-3 (cancelled) ===\nstep 00001 (0.0%)\n"
           f"=== ar-t-abc1234-4 (timeout) ===\n{SUMMARY}")
    recs = R.parse_output(out)
    assert [r["job_id"] for r in recs] == [f"ar-t-abc1234-{i}" for i in range(1, 5)]
    assert [r["state"] for r in recs] == ["succeeded", "failed", "cancelled", "timeout"]
    assert recs[0]["ok"] and recs[0]["val_bpb"] == pytest.approx(2.197529)
    assert not recs[1]["ok"] and recs[1]["error"] == "failed: loss exploded"
    assert recs[2]["error"] == "job cancelled"
    assert not recs[3]["ok"]  # a score from a job the backend did not call succeeded is not trusted


def test_cli_parse(tmp_path):
    (tmp_path / "good.log").write_text(GOOD)
    (tmp_path / "bad.log").write_text(HEAD + "FAIL: boom\n")
    p = subprocess.run([sys.executable, "tools/results.py", "parse", "--json", str(tmp_path / "good.log"),
                        str(tmp_path / "bad.log")], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 1, p.stderr  # not every record ok
    recs = [json.loads(line) for line in p.stdout.splitlines()]
    assert recs[0]["ok"] and not recs[1]["ok"] and recs[1]["error"] == "boom"


# ---------------------------------------------------------------------------------------------
# results.tsv
# ---------------------------------------------------------------------------------------------
def row(i, **kw):
    rec = R.parse_log(GOOD)
    fields = dict(commit=f"{i:07x}", status="keep", description=f"exp {i}", round=1, candidate=f"c{i}",
                  backend="local", gpu="cpu", profile="smoke", job_id=f"job-{i}", wall_s=10.0, cost_usd=0.0,
                  overrides={"MATRIX_LR": 0.05}, tag="t")
    fields.update(kw)
    return R.make_row(rec, **fields)


def test_row_format_and_header(tmp_path):
    path = tmp_path / "results.tsv"
    assert R.append_rows(path, [row(1), row(2, status="crash", description="bad\tdesc\nwith newline")]) == 2
    lines = path.read_text().splitlines()
    assert lines[0].split("\t") == R.COLUMNS
    assert lines[0].startswith("commit\tval_bpb\tmemory_gb\tstatus\tdescription\t")
    first = dict(zip(R.COLUMNS, lines[1].split("\t"), strict=True))
    assert first["val_bpb"] == "2.197529" and first["memory_gb"] == "0.6" and first["status"] == "keep"
    assert first["overrides"] == '{"MATRIX_LR":0.05}' and first["job_id"] == "job-1"
    crash = lines[2].split("\t")
    assert len(crash) == len(R.COLUMNS)
    assert crash[1:4] == ["0.000000", "0.0", "crash"] and crash[4] == "bad desc with newline"
    assert R.read_rows(path)[1]["description"] == "bad desc with newline"


def test_existing_rows_kept_and_old_header_extended(tmp_path):
    path = tmp_path / "results.tsv"
    path.write_text("commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
                    "a1b2c3d\t0.997900\t44.0\tkeep\tbaseline\n")
    R.append_rows(path, [row(1)])
    lines = path.read_text().splitlines()
    assert lines[0].split("\t") == R.COLUMNS
    assert lines[1] == "a1b2c3d\t0.997900\t44.0\tkeep\tbaseline"
    rows = R.read_rows(path)
    assert [r["commit"] for r in rows] == ["a1b2c3d", "0000001"] and rows[0]["tag"] == ""
    # dedupe: the same (tag, round, candidate, job) is never recorded twice
    assert R.append_rows(path, [row(1), row(3)]) == 1
    assert len(R.read_rows(path)) == 3
    assert not list(tmp_path.glob(".results.tsv.*"))  # no temp files left


def test_relabel_round_touches_only_that_round_of_that_tag(tmp_path):
    path = tmp_path / "results.tsv"
    R.append_rows(path, [row(1), row(2, round=2), row(3, round=2, tag="u"), row(4, round=2)])
    before = path.read_text().splitlines()
    assert R.relabel_round(path, "t", "2", "2-abandoned") == 2
    after = path.read_text().splitlines()
    assert [r["round"] for r in R.read_rows(path)] == ["1", "2-abandoned", "2", "2-abandoned"]
    assert after[:2] == before[:2] and after[3] == before[3]  # every other line kept verbatim
    assert after[2] == before[2].replace("\t2\tc2\t", "\t2-abandoned\tc2\t")
    assert R.relabel_round(path, "t", "2", "x") == 0 and R.relabel_round(tmp_path / "none.tsv", "t", "1", "x") == 0
    assert not list(tmp_path.glob(".results.tsv.*"))


def _writer(path, start, n):
    for i in range(start, start + n):
        R.append_rows(path, [row(i)])


def test_concurrent_appends_lose_nothing(tmp_path):
    path = tmp_path / "results.tsv"
    R.append_rows(path, [row(0)])
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, 1000 * (w + 1), 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    rows = R.read_rows(path)
    assert len(rows) == 101
    assert len({r["job_id"] for r in rows}) == 101
    assert path.read_text().count("commit\tval_bpb") == 1


def test_show_table(tmp_path):
    path = tmp_path / "results.tsv"
    R.append_rows(path, [row(1, cost_usd=0.25), row(2, round=2, status="discard")])
    out = R.show(path, last=1)
    body = out.splitlines()[2:-1]
    assert len(body) == 1 and " c2 " in body[0] and "discard" in body[0]
    assert "2 experiments, 2 rounds; spent $0.25" in out
    assert "no results" in R.show(tmp_path / "none.tsv")
