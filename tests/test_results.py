"""tools/results.py: wait-jobs.sh output -> records -> results.tsv."""

import importlib.util
import subprocess
import sys
import threading

import pytest
from conftest import REPO

spec = importlib.util.spec_from_file_location("ar_results", REPO / "tools" / "results.py")
R = importlib.util.module_from_spec(spec)
spec.loader.exec_module(R)

BLOCK = """---
val_bpb:          0.997900
training_seconds: 300.1
total_seconds:    325.9
peak_vram_mb:     45060.2
mfu_percent:      39.80
total_tokens_M:   499.6
num_steps:        953
num_params_M:     50.3
depth:            8
"""
PROGRESS = "".join(f"\rstep {i:05d} (42.0%) | loss: 3.1 | dt: 310ms | tok/sec: 1,690,000 | remaining: 174s"
                   for i in range(300)) + "\n"
OOM = """Traceback (most recent call last):
  File "train.py", line 530, in <module>
    loss.backward()
torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.1 GiB
[W ProcessGroupNCCL.cpp:1250] Warning: destroy_process_group() was not called before program exit
"""


def test_reference_block_at_the_end_of_a_long_log():
    text = "=== ar-t-r1-c1 (succeeded) ===\n" + PROGRESS + "---\n" * 2 + BLOCK
    (rec,) = R.parse(text)
    assert rec["value"] == pytest.approx(0.9979) and rec["reason"] == ""
    assert rec["summary"]["num_steps"] == "953" and rec["summary"]["depth"] == "8"


def test_several_blocks_and_colour():
    sky = "".join(f"\x1b[32m{line}\x1b[0m\n" for line in BLOCK.splitlines())
    text = f"=== a (succeeded) ===\n{sky}=== b (failed) ===\n{OOM}=== c (timeout) ===\nstep 9\n=== d (expired) ===\n"
    a, b, c, d = R.parse(text)
    assert d["value"] is None and "the run itself did not fail" in d["reason"]
    assert a["value"] == pytest.approx(0.9979)
    assert b["value"] is None and b["reason"].startswith("torch.OutOfMemoryError: CUDA out of memory")
    assert c["reason"] == "timeout"


@pytest.mark.parametrize("body, reason", [
    ("step 1\n", "no summary block in the log"),                          # truncated before the block
    (BLOCK.replace("0.997900", "nan"), "val_bpb is nan"),
    (BLOCK.replace("val_bpb:          0.997900\n", ""), "val_bpb is missing"),
])
def test_a_succeeded_job_without_a_usable_score_is_a_crash(body, reason):
    (rec,) = R.parse(f"=== x (succeeded) ===\n{body}")
    assert rec["value"] is None and rec["reason"] == reason


def test_fail_line_is_the_reason_and_other_metric():
    (rec,) = R.parse("=== x (failed) ===\nstep 3 | loss nan\nFAIL: loss is NaN at step 3\n")
    assert rec["reason"] == "FAIL: loss is NaN at step 3"
    (rec,) = R.parse("=== x (succeeded) ===\n---\nscore: 0.71\nval_pass: 1\n", metric="score")
    assert rec["value"] == 0.71


def row(**kw):
    rec = dict(summary={"peak_vram_mb": "45060.2", "num_steps": "953"}, value=0.9979, reason="")
    return R.make_row(rec, "val_bpb", commit="abc1234", status="keep", description="MATRIX_LR=0.05\tnew",
                      tag="t", round="1", candidate="c1", job_id=kw.pop("job_id", "j1"), **kw)


def test_rows_keep_the_reference_columns_first_and_never_a_tab(tmp_path):
    f = tmp_path / "results.tsv"
    assert R.append_rows(f, [row(), row()]) == 1  # same (tag, round, candidate, job id): once
    lines = f.read_text().splitlines()
    assert lines[0].split("\t")[:5] == ["commit", "val_bpb", "memory_gb", "status", "description"]
    assert lines[1].split("\t")[:5] == ["abc1234", "0.997900", "44.0", "keep", "MATRIX_LR=0.05 new"]
    crash = R.make_row(dict(summary={}, value=None, reason="torch.OutOfMemoryError: CUDA out of memory"), "val_bpb",
                       commit="def5678", status="crash", description="bigger", tag="t", round="1", candidate="c2",
                       job_id="j2")
    R.append_rows(f, [crash])
    got = R.read_rows(f)
    assert [r.score for r in got] == [0.9979, None]
    assert got[1]["description"] == "bigger -- crash: torch.OutOfMemoryError: CUDA out of memory"
    R.relabel_round(f, "t", "1", "1-abandoned")
    assert {r["round"] for r in R.read_rows(f)} == {"1-abandoned"}
    with pytest.raises(SystemExit, match="scores val_bpb, not score"):
        R.read_rows(f, "score")


def test_a_reference_results_tsv_keeps_its_rows_and_gains_the_columns(tmp_path):
    """karpathy's program.md has the agent write a 5-column results.tsv; the driver's rows must not lose theirs."""
    f = tmp_path / "results.tsv"
    f.write_text("commit\tval_bpb\tmemory_gb\tstatus\tdescription\na1b2c3d\t0.997900\t44.0\tkeep\tbaseline\n")
    R.append_rows(f, [row()])
    got = R.read_rows(f)
    assert [(r["commit"], r["tag"], r["job_id"]) for r in got] == [("a1b2c3d", "", ""), ("abc1234", "t", "j1")]
    assert f.read_text().splitlines()[0].split("\t") == list(R.read_rows(f)[1])


def test_concurrent_appends_lose_nothing(tmp_path):
    f = tmp_path / "results.tsv"
    threads = [threading.Thread(target=R.append_rows, args=(f, [row(job_id=f"j{i}")])) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r["job_id"] for r in R.read_rows(f)) == sorted(f"j{i}" for i in range(20))


def test_cli(tmp_path):
    (tmp_path / "out").write_text("=== x (failed) ===\n" + OOM)
    p = subprocess.run([sys.executable, str(REPO / "tools/results.py"), "parse", "out"], cwd=tmp_path,
                       capture_output=True, text=True, check=True)
    assert '"reason": "torch.OutOfMemoryError' in p.stdout
    R.append_rows(tmp_path / "results.tsv", [row()])
    p = subprocess.run([sys.executable, str(REPO / "tools/results.py"), "show"], cwd=tmp_path,
                       capture_output=True, text=True, check=True)
    assert "abc1234" in p.stdout and "MATRIX_LR=0.05" in p.stdout
