"""
trainer/train.py -- the one file the agent edits.

A small GPT trained for a fixed wall-clock budget and scored by val_bpb (bits per byte on a
fixed validation set, lower is better). Everything that defines the game -- the profile's
context length, time budget, vocabulary, data, tokenizer, dataloader and the metric -- lives
in prepare/prepare.py, which agents must not edit. Everything here is fair game: the model,
the optimizer, the schedule, the knobs.

    python trainer/train.py                     # profile from AR_PROFILE (full on CUDA, tiny on CPU)
    AR_MATRIX_LR=0.05 AR_DEPTH=10 python trainer/train.py   # override any knob below

Every knob below can be overridden by an environment variable named AR_<KNOB>. The
effective values are printed at start; an unknown AR_ variable is an error that lists the
valid knobs (so a typo never silently trains the baseline).

Output contract (parsers and backends rely on it):
  * progress lines (\\r-overwritten on a TTY, one line every few seconds otherwise)
  * a summary block starting with `---`, keys in the reference order
    (val_bpb, training_seconds, total_seconds, peak_vram_mb, mfu_percent, total_tokens_M,
    num_steps, num_params_M, depth) followed by profile, data, device, startup_seconds,
    tokens_per_sec
  * the same figures as one JSON line `AR_RESULT_JSON: {...}` at the end of stdout, and in
    $AR_RESULT_PATH when set (written atomically)
  * on NaN / exploding loss or a crash: a `FAIL: ...` line, a JSON line with
    "status": "fail", and exit code 1. Bad configuration exits 2.
"""

import time

T_PROCESS_START = time.time()  # startup_seconds counts from here

import ast  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import queue  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
from contextlib import nullcontext  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "prepare"))  # only prepare/, never the repo root (sky/, modal/ would shadow packages)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import prepare as P  # noqa: E402

# =============================================================================================
# Knobs. Each is overridable as AR_<NAME>=value (parsed as a Python literal of the same type).
# =============================================================================================
_NOT_KNOBS = set(globals())

# ---- Model shape ----
DEPTH = 8                 # transformer blocks
ASPECT_RATIO = 64         # model_dim = DEPTH * ASPECT_RATIO, rounded up to a multiple of HEAD_DIM
HEAD_DIM = 128            # size of one attention head
KV_HEAD_RATIO = 1         # query heads per key/value head (1 = plain multi-head, 2+ = GQA)
MLP_RATIO = 4             # MLP hidden width = MLP_RATIO * model_dim
LOGIT_SOFTCAP = 15.0      # logits = cap * tanh(logits / cap); keeps early training stable
ROPE_BASE = 10000.0       # rotary embedding base frequency
VALUE_EMBEDS = True       # value embeddings (ResFormer) on alternating layers, gated per head

# ---- Batch ----
TOTAL_BATCH_SIZE = 2**19  # tokens per optimizer step (gradient accumulation makes up the rest)
DEVICE_BATCH_SIZE = 128   # sequences per forward/backward pass; lower it if you run out of memory

# ---- Optimizer: Muon for the 2-D weight matrices, AdamW for embeddings and scalars ----
MATRIX_LR = 0.04          # Muon learning rate
MUON_MOMENTUM = 0.95      # Muon momentum after its warmup (starts at 0.85)
MUON_MOMENTUM_WARMUP_STEPS = 300
WEIGHT_DECAY = 0.2        # Muon's cautious weight decay, fades out with the LR schedule
EMBEDDING_LR = 0.6        # AdamW, token embedding (scaled by (model_dim/768)**-0.5)
UNEMBEDDING_LR = 0.004    # AdamW, output head (scaled likewise)
SCALAR_LR = 0.5           # AdamW, per-layer residual mixing scalars
ADAM_BETA1 = 0.8
ADAM_BETA2 = 0.95

# ---- Schedule, as fractions of the time budget (not of steps: the budget is wall clock) ----
WARMUP_RATIO = 0.0        # linear warmup
WARMDOWN_RATIO = 0.5      # linear decay over the last part of the budget
FINAL_LR_FRAC = 0.0       # LR multiplier at the very end

# ---- Misc ----
SEED = 42
COMPILE = True            # torch.compile the model on CUDA (always off on CPU)

KNOBS = sorted(k for k in set(globals()) - _NOT_KNOBS if k.isupper() and not k.startswith("_"))

# CPU profiles (tiny, smoke) keep the same code but a model small enough to learn something
# in tens of seconds on two cores. Applied after the defaults above, before ADOPTED.
CPU_PROFILE_KNOBS = dict(
    DEPTH=2, ASPECT_RATIO=64, HEAD_DIM=32, DEVICE_BATCH_SIZE=16, TOTAL_BATCH_SIZE=16 * 256,
    EMBEDDING_LR=0.3, UNEMBEDDING_LR=0.008, MUON_MOMENTUM_WARMUP_STEPS=50,
)

# Overrides adopted by `make round` from a winning SWEEP candidate (one entry per knob).
# Applied on every profile, after CPU_PROFILE_KNOBS and before AR_ environment overrides.
ADOPTED = {}

# Not knobs: fixed rules of this file that keep runs comparable.
UNTIMED_STEPS_CUDA = 10   # the first steps compile kernels; they train but do not count toward the budget
UNTIMED_STEPS_CPU = 1
FAIL_LOSS_FACTOR = 2.0    # loss above FAIL_LOSS_FACTOR * ln(vocab) (twice uniform guessing) = exploded
PEAK_BF16_FLOPS = [       # dense bf16 peak by GPU name substring, first match wins (for MFU)
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989.5e12), ("H200", 989.5e12),
    ("H20", 148e12), ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12),
    ("A10G", 70e12), ("A10", 125e12), ("L4", 121e12), ("4090", 165e12), ("A6000", 155e12),
]
RESULT_PREFIX = "AR_RESULT_JSON: "


class ConfigError(Exception):
    """Bad configuration: one line, exit code 2."""


def _parse_knob(name, raw, default):
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if isinstance(default, str):
            return raw
        raise ConfigError(f"AR_{name}={raw!r} is not a valid {type(default).__name__}") from None
    if isinstance(default, bool):
        if value in (0, 1) and not isinstance(value, float):
            return bool(value)
    elif isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif type(value) is type(default):
        return value
    raise ConfigError(f"AR_{name}={raw!r} is not a valid {type(default).__name__}")


def resolve_knobs(profile, environ):
    """defaults -> CPU profile values -> ADOPTED -> AR_ environment overrides. Returns (knobs, overrides)."""
    g = globals()
    knobs = {k: g[k] for k in KNOBS}
    if profile.name != "full":
        knobs.update(CPU_PROFILE_KNOBS)
    for name, value in ADOPTED.items():
        if name not in knobs:
            raise ConfigError(f"ADOPTED names unknown knob {name!r}; valid: {', '.join(KNOBS)}")
        knobs[name] = value
    overrides = {}
    for key in sorted(environ):
        if not key.startswith("AR_"):
            continue
        name = key[3:]
        if name in knobs:
            knobs[name] = overrides[name] = _parse_knob(name, environ[key], knobs[name])
        elif key not in P.HARNESS_ENV_VARS and not key.startswith(P.HARNESS_ENV_PREFIXES):
            raise ConfigError(f"unknown knob {key}; valid knobs: {', '.join('AR_' + k for k in KNOBS)}")
    bad = [k for k, v in knobs.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0]
    if bad:
        raise ConfigError(f"knobs must not be negative: {', '.join(bad)}")
    return knobs, overrides


# =============================================================================================
# Model
# =============================================================================================
def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x, cos, sin):
    cos, sin, d = cos.to(x.dtype), sin.to(x.dtype), x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


VE_GATE_CHANNELS = 32  # the value-embedding gate looks at this many leading channels of x


class Attention(nn.Module):
    def __init__(self, dim, n_head, n_kv_head, head_dim, value_embed):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.c_q = nn.Linear(dim, n_head * head_dim, bias=False)
        self.c_k = nn.Linear(dim, n_kv_head * head_dim, bias=False)
        self.c_v = nn.Linear(dim, n_kv_head * head_dim, bias=False)
        self.c_proj = nn.Linear(n_head * head_dim, dim, bias=False)
        self.ve_gate = nn.Linear(min(VE_GATE_CHANNELS, dim), n_kv_head, bias=False) if value_embed else None

    def forward(self, x, cos, sin, ve=None):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # mix in this layer's value embedding of the input tokens, gated per head
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., : self.ve_gate.in_features]))
            v = v + gate.unsqueeze(-1) * ve.view_as(v)
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))  # QK-norm
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_head != self.n_kv_head)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden, bias=False)
        self.c_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())  # squared ReLU


class Block(nn.Module):
    def __init__(self, dim, n_head, n_kv_head, head_dim, mlp_hidden, value_embed):
        super().__init__()
        self.attn = Attention(dim, n_head, n_kv_head, head_dim, value_embed)
        self.mlp = MLP(dim, mlp_hidden)

    def forward(self, x, cos, sin, ve=None):
        x = x + self.attn(norm(x), cos, sin, ve)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, vocab_size, seq_len, depth, dim, n_head, n_kv_head, head_dim, mlp_hidden, softcap, rope_base,
                 value_embeds=False):
        super().__init__()
        self.vocab_size, self.softcap = vocab_size, softcap
        self.wte = nn.Embedding(vocab_size, dim)
        # Value embeddings on alternating layers, the last one included.
        self.ve_layers = [i for i in range(depth) if value_embeds and i % 2 == (depth - 1) % 2]
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(vocab_size, n_kv_head * head_dim)
                                           for i in self.ve_layers})
        self.blocks = nn.ModuleList(Block(dim, n_head, n_kv_head, head_dim, mlp_hidden, i in self.ve_layers)
                                    for i in range(depth))
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        # Per-layer residual mixing: x <- resid[i] * x + x0[i] * (the normed embedding).
        self.resid_lambdas = nn.Parameter(torch.ones(depth))
        self.x0_lambdas = nn.Parameter(torch.zeros(depth))
        inv_freq = 1.0 / (rope_base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", freqs.cos()[None, :, None, :], persistent=False)
        self.register_buffer("sin", freqs.sin()[None, :, None, :], persistent=False)

    @torch.no_grad()
    def init_weights(self):
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for emb in self.value_embeds.values():
            bound = 3**0.5 * emb.embedding_dim**-0.5
            nn.init.uniform_(emb.weight, -bound, bound)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                bound = 3**0.5 * lin.in_features**-0.5
                nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)  # each block starts as the identity
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)  # gate starts at 1

    def forward(self, idx, targets=None, reduction="mean"):
        T = idx.size(1)
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        x = x0 = norm(self.wte(idx))
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if i in self.ve_layers else None
            x = block(x, cos, sin, ve)
        logits = self.lm_head(norm(x)).float()
        logits = self.softcap * torch.tanh(logits / self.softcap)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, self.vocab_size), targets.view(-1), reduction=reduction)


# =============================================================================================
# Optimizer: Muon (momentum, then an approximate orthogonalisation by Newton-Schulz)
# =============================================================================================
def orthogonalize(G, steps=5):
    """Quintic Newton-Schulz iteration towards the nearest semi-orthogonal matrix, batched over dim 0."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


def muon_update(params, grads, bufs, lr, momentum, wd):
    """One Muon step for a stack of same-shaped matrices [N, rows, cols]."""
    bufs.lerp_(grads, 1 - momentum)
    update = orthogonalize(grads.lerp(bufs, momentum))  # Nesterov
    update = update.to(params.dtype) * max(1.0, params.size(-2) / params.size(-1)) ** 0.5
    mask = (update * params) > 0  # cautious weight decay: only shrink weights the update also shrinks
    params.sub_(lr * wd * params * mask)
    params.sub_(lr * update)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weights. Same-shaped matrices are updated together as one batched stack."""

    def __init__(self, params, lr, momentum, weight_decay, compile_step=False):
        params = list(params)
        shapes = sorted({tuple(p.shape) for p in params})
        groups = [dict(params=[p for p in params if tuple(p.shape) == s]) for s in shapes]
        super().__init__(groups, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self._update = torch.compile(muon_update, dynamic=False) if compile_step else muon_update
        # Hyperparameters travel as 0-d tensors so a compiled step never recompiles when the schedule moves them.
        self._hp = torch.zeros(3, device=params[0].device)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            ps = group["params"]
            state = self.state[ps[0]]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros(len(ps), *ps[0].shape, device=ps[0].device, dtype=ps[0].dtype)
            stacked = torch.stack([p.detach() for p in ps])
            grads = torch.stack([p.grad for p in ps])
            self._hp.copy_(torch.tensor([group["lr"], group["momentum"], group["weight_decay"]]), non_blocking=True)
            self._update(stacked, grads, state["momentum_buffer"], self._hp[0], self._hp[1], self._hp[2])
            torch._foreach_copy_([p.detach() for p in ps], list(stacked.unbind(0)))


def lr_multiplier(progress, k):
    if progress < k["WARMUP_RATIO"]:
        return (progress + 1e-8) / k["WARMUP_RATIO"]
    if progress < 1.0 - k["WARMDOWN_RATIO"]:
        return 1.0
    cooldown = (1.0 - progress) / max(k["WARMDOWN_RATIO"], 1e-8)
    return cooldown + (1.0 - cooldown) * k["FINAL_LR_FRAC"]


# =============================================================================================
# Run
# =============================================================================================
def gpu_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_flops(name):
    return next((f for sub, f in PEAK_BF16_FLOPS if sub in name), 0.0)


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**2
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS on CPU (Linux reports KiB)


def emit_result(result):
    line = RESULT_PREFIX + json.dumps(result, sort_keys=True, default=str)
    print(line, flush=True)
    path = os.environ.get("AR_RESULT_PATH")
    if path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, path)


class Progress:
    """\\r-overwritten line on a TTY; otherwise one plain line every AR_PROGRESS_INTERVAL_S seconds."""

    def __init__(self):
        self.tty = sys.stdout.isatty()
        self.interval = float(os.environ.get("AR_PROGRESS_INTERVAL_S", "5"))
        self.last = -math.inf

    def update(self, text, final=False):
        if self.tty:
            print("\r" + text + " " * 8, end="\n" if final else "", flush=True)
        elif final or time.time() - self.last >= self.interval:
            self.last = time.time()
            print(text, flush=True)


def prefetch(iterator, depth=2):
    """Run a batch iterator in a background thread so tokenizing and packing overlap the GPU's work
    (the main thread mostly waits on the GPU, with the GIL released)."""
    q = queue.Queue(maxsize=depth)

    def work():
        try:
            for item in iterator:
                q.put(item)
        except BaseException as e:  # hand the error to the consumer
            q.put(e)

    threading.Thread(target=work, daemon=True, name="dataloader").start()
    while True:
        item = q.get()
        if isinstance(item, BaseException):
            raise item
        yield item


class TrainingFailed(Exception):
    pass


class Terminated(BaseException):
    """SIGTERM (a cancelled or preempted job): reported like a crash, exit 143."""


def _on_sigterm(signum, frame):
    raise Terminated()


RUN = {}  # what is known about this run so far; a failure result reports it


def main():
    profile = P.get_profile()
    source = P.get_data_source(profile)
    knobs, overrides = resolve_knobs(profile, os.environ)
    k = knobs
    T = profile.max_seq_len
    if k["DEVICE_BATCH_SIZE"] < 1 or k["TOTAL_BATCH_SIZE"] < 1 or k["TOTAL_BATCH_SIZE"] % (k["DEVICE_BATCH_SIZE"] * T):
        raise ConfigError(f"TOTAL_BATCH_SIZE={k['TOTAL_BATCH_SIZE']} must be a positive multiple of "
                          f"DEVICE_BATCH_SIZE * seq_len = {k['DEVICE_BATCH_SIZE']} * {T}")
    if min(k["DEPTH"], k["HEAD_DIM"], k["KV_HEAD_RATIO"], k["ASPECT_RATIO"]) < 1 or k["HEAD_DIM"] % 2:
        raise ConfigError("DEPTH, ASPECT_RATIO, KV_HEAD_RATIO must be >= 1 and HEAD_DIM even and >= 2")
    RUN.update(profile=profile.name, data=source)
    P.ensure_prepared(profile, source)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    is_cuda = device.type == "cuda"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(P.inductor_cache_dir()))
    os.environ.setdefault("TRITON_CACHE_DIR", str(Path(P.inductor_cache_dir()) / "triton"))
    torch.manual_seed(k["SEED"])
    if is_cuda:
        torch.cuda.manual_seed(k["SEED"])
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = torch.amp.autocast("cuda", dtype=torch.bfloat16) if is_cuda else nullcontext()
    use_compile = is_cuda and k["COMPILE"]

    tokenizer = P.Tokenizer.load(profile, source)
    vocab_size = tokenizer.get_vocab_size()
    head_dim = k["HEAD_DIM"]
    dim = -(-k["DEPTH"] * k["ASPECT_RATIO"] // head_dim) * head_dim
    n_head = dim // head_dim
    if n_head % k["KV_HEAD_RATIO"]:
        raise ConfigError(f"n_head={n_head} is not divisible by KV_HEAD_RATIO={k['KV_HEAD_RATIO']}")
    n_kv_head = n_head // k["KV_HEAD_RATIO"]
    with device:
        model = GPT(vocab_size, T, k["DEPTH"], dim, n_head, n_kv_head, head_dim, k["MLP_RATIO"] * dim,
                    k["LOGIT_SOFTCAP"], k["ROPE_BASE"], k["VALUE_EMBEDS"])
    model.init_weights()

    num_params = sum(p.numel() for p in model.parameters())
    emb_params = model.wte.weight.numel() + sum(p.numel() for p in model.value_embeds.parameters())
    # Training FLOPs per token: 6 per non-embedding weight, plus attention (the reference's formula).
    flops_per_token = 6 * (num_params - emb_params) + 12 * k["DEPTH"] * n_head * head_dim * T
    tokens_per_micro = k["DEVICE_BATCH_SIZE"] * T
    grad_accum = k["TOTAL_BATCH_SIZE"] // tokens_per_micro
    device_name = gpu_name(device)
    peak = peak_flops(device_name)
    RUN.update(device=device_name, gpu=device_name, depth=k["DEPTH"], knobs=knobs, overrides=overrides)

    print(f"profile: {profile.name} | data: {source} | device: {device_name} | seq_len: {T} | "
          f"time_budget: {profile.time_budget:g}s | vocab: {vocab_size}", flush=True)
    print("knobs: " + " ".join(f"{name}={knobs[name]!r}" + ("*" if name in overrides else "") for name in KNOBS),
          flush=True)
    print(f"model: dim={dim} heads={n_head} kv_heads={n_kv_head} params={num_params / 1e6:.2f}M "
          f"grad_accum={grad_accum}" + ("  (* = overridden)" if overrides else ""), flush=True)

    matrices = [p for b in model.blocks for p in b.parameters()]
    scale = (dim / 768) ** -0.5
    adam_groups = [
        dict(params=[model.wte.weight, *model.value_embeds.parameters()], lr=k["EMBEDDING_LR"] * scale),
        dict(params=[model.lm_head.weight], lr=k["UNEMBEDDING_LR"] * scale),
        dict(params=[model.resid_lambdas, model.x0_lambdas], lr=k["SCALAR_LR"]),
    ]
    for g in adam_groups:
        g["initial_lr"] = g["lr"]
    adamw = torch.optim.AdamW(adam_groups, betas=(k["ADAM_BETA1"], k["ADAM_BETA2"]), eps=1e-10,
                              weight_decay=0.0, fused=is_cuda)
    muon = Muon(matrices, lr=k["MATRIX_LR"], momentum=k["MUON_MOMENTUM"], weight_decay=k["WEIGHT_DECAY"],
                compile_step=use_compile)
    train_model = torch.compile(model, dynamic=False) if use_compile else model

    budget = float(profile.time_budget)
    untimed = UNTIMED_STEPS_CUDA if is_cuda else UNTIMED_STEPS_CPU
    fail_loss = FAIL_LOSS_FACTOR * math.log(vocab_size)
    loader = prefetch(P.make_dataloader(tokenizer, k["DEVICE_BATCH_SIZE"], T, "train", profile, source, device))
    x, y, epoch = next(loader)
    progress_out = Progress()
    step, training_time, smooth, startup_seconds = 0, 0.0, None, None

    while True:
        if is_cuda:
            torch.cuda.synchronize()
        t0 = time.time()
        if step == untimed:
            startup_seconds = t0 - T_PROCESS_START
        for _ in range(grad_accum):
            with autocast:
                loss = train_model(x, y)
            (loss / grad_accum).backward()
            x, y, epoch = next(loader)  # the next batch is prepared while the GPU works
        progress = min(training_time / budget, 1.0)
        lrm = lr_multiplier(progress, k)
        for g in adamw.param_groups:
            g["lr"] = g["initial_lr"] * lrm
        frac = min(step / max(k["MUON_MOMENTUM_WARMUP_STEPS"], 1), 1.0)
        for g in muon.param_groups:
            g["lr"] = k["MATRIX_LR"] * lrm
            g["momentum"] = (1 - frac) * 0.85 + frac * k["MUON_MOMENTUM"]
            g["weight_decay"] = k["WEIGHT_DECAY"] * (1 - progress)
        adamw.step()
        muon.step()
        model.zero_grad(set_to_none=True)
        loss_f = loss.item()  # one sync per step; also the fast-fail check
        dt = time.time() - t0
        RUN["num_steps"] = step
        if not math.isfinite(loss_f):
            raise TrainingFailed(f"loss is {loss_f} at step {step}")
        if loss_f > fail_loss:
            raise TrainingFailed(f"loss exploded to {loss_f:.2f} (> {fail_loss:.2f}) at step {step}")
        if step >= untimed:
            training_time += dt
        smooth = loss_f if smooth is None else 0.9 * smooth + 0.1 * loss_f
        tok_s = k["TOTAL_BATCH_SIZE"] / dt
        mfu = 100 * flops_per_token * tok_s / peak if peak else 0.0
        step += 1
        done = step > untimed and training_time >= budget
        progress_out.update(
            f"step {step:05d} ({100 * min(training_time / budget, 1):5.1f}%) | loss {smooth:.4f} | lrm {lrm:.2f} | "
            f"dt {dt * 1000:6.0f}ms | tok/s {tok_s:,.0f} | mfu {mfu:4.1f}% | epoch {epoch} | "
            f"remaining {max(budget - training_time, 0):.0f}s", final=done)
        if done:
            break

    timed_steps = step - untimed
    tokens_per_sec = timed_steps * k["TOTAL_BATCH_SIZE"] / training_time
    mfu = 100 * flops_per_token * tokens_per_sec / peak if peak else 0.0
    model.eval()
    with autocast:
        val_bpb = P.evaluate_bpb(train_model, tokenizer, k["DEVICE_BATCH_SIZE"], profile, source, device)
    if not math.isfinite(val_bpb):
        raise TrainingFailed(f"val_bpb is {val_bpb}")

    result = dict(
        status="ok",
        val_bpb=round(val_bpb, 6),
        training_seconds=round(training_time, 1),
        total_seconds=round(time.time() - T_PROCESS_START, 1),
        peak_vram_mb=round(peak_memory_mb(device), 1),
        mfu_percent=round(mfu, 2),
        total_tokens_M=round(step * k["TOTAL_BATCH_SIZE"] / 1e6, 1),
        num_steps=step,
        num_params_M=round(num_params / 1e6, 1),
        depth=k["DEPTH"],
        profile=profile.name,
        data=source,
        device=device_name,
        startup_seconds=round(startup_seconds, 1),
        tokens_per_sec=round(tokens_per_sec),
    )
    summary_keys = list(result)[1:]
    print("---")
    for key in summary_keys:
        value = result[key]
        print(f"{key + ':':<18}{value:.6f}" if key == "val_bpb" else f"{key + ':':<18}{value}")
    result.update(gpu=device_name, knobs=knobs, overrides=overrides, train_py_sha256=train_py_sha256(),
                  data_sha256=tokenizer.meta.get("corpus_sha256"))
    emit_result(result)


def train_py_sha256():
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        main()
    except (ConfigError, P.PrepareError) as e:
        print(f"train: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except (Exception, KeyboardInterrupt, Terminated) as e:  # every crash ends with a FAIL line and a JSON result
        if isinstance(e, TrainingFailed):
            reason = str(e)
        elif isinstance(e, (KeyboardInterrupt, Terminated)):
            reason = "interrupted (SIGINT)" if isinstance(e, KeyboardInterrupt) else "terminated (SIGTERM)"
        else:
            traceback.print_exc()
            reason = f"{type(e).__name__}: {e}".splitlines()[0]
        print(f"\nFAIL: {reason}", flush=True)
        emit_result(dict(RUN, status="fail", error=reason, total_seconds=round(time.time() - T_PROCESS_START, 1),
                         train_py_sha256=train_py_sha256()))
        sys.exit(130 if isinstance(e, KeyboardInterrupt) else 143 if isinstance(e, Terminated) else 1)
