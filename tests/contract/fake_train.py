"""A stand-in for karpathy/autoresearch's train.py (no torch): the contract suite commits it as train.py.

MODE picks the behaviour; a test edits this line and commits, so each behaviour is a commit, as every
candidate is. SLEEP_S delays the end (queueing tests).
  ok         300 progress lines, then only the reference summary block; exit 0
  crash      progress, then a Python traceback ending in torch.OutOfMemoryError; exit 1
  nan        progress with loss nan, then `FAIL: loss is NaN`; exit 1
  hang       one progress line, then sleeps until killed
  hang-hard  the same, but ignores SIGTERM (only SIGKILL stops it)
  noblock    progress only; exit 0
"""

import os
import signal
import sys
import time

MODE = "ok"
SLEEP_S = 0

print(f"fake: argv={sys.argv[1:]} executable={sys.executable} cwd={os.getcwd()}", flush=True)
for key in ("AR_PROFILE", "AR_DATA", "AR_CACHE_DIR", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "FAKE_VENV"):
    print(f"fake: {key}={os.environ.get(key, '<unset>')}", flush=True)
if MODE.startswith("hang"):
    if MODE == "hang-hard":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("step 00000 (0.0%) | loss: 9.000000", flush=True)
    while True:
        time.sleep(60)
loss = "nan" if MODE == "nan" else "3.250000"
REDRAW = MODE == "crash"  # karpathy's trainer redraws one line with \r; a crash report shows its last frame
for step in range(300):
    line = f"step {step:05d} ({step / 3:.1f}%) | loss: {loss} | dt: 20ms"
    print("\r" + line if REDRAW else line, end="" if REDRAW else "\n")
print(flush=True)
time.sleep(SLEEP_S)
if MODE == "crash":
    print("Traceback (most recent call last):\n  File \"train.py\", line 512, in <module>\n    loss.backward()",
          file=sys.stderr)
    print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
          "of 79.11 GiB of which 1.06 GiB is free.", file=sys.stderr, flush=True)
    sys.exit(1)
if MODE == "nan":
    print("FAIL: loss is NaN", flush=True)
    sys.exit(1)
if MODE == "ok":
    print("""---
val_bpb:          0.997900
training_seconds: 300.1
total_seconds:    325.9
peak_vram_mb:     45060.2
mfu_percent:      39.80
total_tokens_M:   499.6
num_steps:        953
num_params_M:     50.3
depth:            8""", flush=True)
