"""
trainer/train.py -- the one file the agent edits.

A small GPT trained for a fixed wall-clock budget and scored by val_bpb (bits per byte on a fixed
validation set, lower is better). What defines the game -- each profile's context length, time
budget, vocabulary, data, tokenizer, dataloader and the metric -- lives in prepare/prepare.py, which
agents must not edit. Everything here is fair game: the model, the optimizer, the schedule.

    python trainer/train.py                  # profile from AR_PROFILE (full on CUDA, tiny on CPU)
    AR_PROFILE=smoke python trainer/train.py # the test suite's 5-second run

The hyperparameters are the plain constants below, one assignment each; to try a value, edit its
line (a SWEEP round does the same: one commit per value). Nothing is read from the environment
except the harness's AR_PROFILE, AR_DATA and AR_CACHE_DIR.

Output: a header and the effective hyperparameters, progress lines, then the summary block as the
last thing on stdout: `---`, then val_bpb, training_seconds, total_seconds, peak_vram_mb,
mfu_percent, total_tokens_M, num_steps, num_params_M, depth (the reference's keys, in its order),
profile, data, device, startup_seconds, tokens_per_sec. NaN or exploding loss, a crash or SIGTERM
end with a `FAIL: <reason>` line and exit 1 (143 for SIGTERM); bad configuration is one
`train: error: ...` line on stderr and exit 2.
"""

import time

T_PROCESS_START = time.time()  # startup_seconds counts from here

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


def config_error(message):
    """Bad configuration: one line on stderr, exit code 2."""
    print(f"train: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


# Fixed rules of this file that keep runs comparable (not hyperparameters).
UNTIMED_STEPS_CUDA = 10   # the first steps compile kernels; they train but do not count toward the budget
UNTIMED_STEPS_CPU = 1
FAIL_LOSS_FACTOR = 2.0    # loss above FAIL_LOSS_FACTOR * ln(vocab) (twice uniform guessing) = exploded
SEED = 42                 # one seed for every run: another seed is a re-roll of the noise, not an idea
VE_GATE_CHANNELS = 32     # the value-embedding gate looks at this many leading channels of x
PEAK_BF16_FLOPS = [       # dense bf16 peak by GPU name substring, first match wins (for MFU)
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989.5e12), ("H200", 989.5e12),
    ("H20", 148e12), ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12),
    ("A10G", 70e12), ("A10", 125e12), ("L4", 121e12), ("4090", 165e12), ("A6000", 155e12),
]

try:
    PROFILE = P.get_profile()  # $AR_PROFILE, else full on CUDA and tiny on CPU
except P.PrepareError as e:
    config_error(e)

# =============================================================================================
# Hyperparameters: every plain constant after SMALL is one (printed at start as `knobs: ...`).
# =============================================================================================
# The CPU profiles (tiny, smoke) train a model small enough to learn something in tens of seconds
# on two cores: `X if SMALL else Y` gives a knob its CPU value X and its GPU (full) value Y. An edit
# that replaces the whole value (`DEPTH = 4`) applies on every profile.
SMALL = PROFILE.name != "full"

# ---- Model shape ----
DEPTH = 2 if SMALL else 8  # transformer blocks
ASPECT_RATIO = 64         # model_dim = DEPTH * ASPECT_RATIO, rounded up to a multiple of HEAD_DIM
HEAD_DIM = 32 if SMALL else 128  # size of one attention head
KV_HEAD_RATIO = 1         # query heads per key/value head (1 = plain multi-head, 2+ = GQA)
MLP_RATIO = 4             # MLP hidden width = MLP_RATIO * model_dim
LOGIT_SOFTCAP = 15.0      # logits = cap * tanh(logits / cap); keeps early training stable
ROPE_BASE = 10000.0       # rotary embedding base frequency
VALUE_EMBEDS = True       # value embeddings (ResFormer) on alternating layers, gated per head

# ---- Batch ----
TOTAL_BATCH_SIZE = 16 * 256 if SMALL else 2**19  # tokens per optimizer step: a multiple of DEVICE_BATCH_SIZE * context
DEVICE_BATCH_SIZE = 16 if SMALL else 128  # sequences per forward/backward pass; lower it if you run out of memory

# ---- Optimizer: Muon for the 2-D weight matrices, AdamW for embeddings and scalars ----
MATRIX_LR = 0.04          # Muon learning rate
MUON_MOMENTUM = 0.95      # Muon momentum after its warmup (starts at 0.85)
MUON_MOMENTUM_WARMUP_STEPS = 50 if SMALL else 300
WEIGHT_DECAY = 0.2        # Muon's cautious weight decay, fades out with the LR schedule
EMBEDDING_LR = 0.3 if SMALL else 0.6  # AdamW, token embedding (scaled by (model_dim/768)**-0.5)
UNEMBEDDING_LR = 0.008 if SMALL else 0.004  # AdamW, output head (scaled likewise)
SCALAR_LR = 0.5           # AdamW, per-layer residual mixing scalars
ADAM_BETA1 = 0.8
ADAM_BETA2 = 0.95

# ---- Schedule, as fractions of the time budget (not of steps: the budget is wall clock) ----
WARMUP_RATIO = 0.0        # linear warmup
WARMDOWN_RATIO = 0.5      # linear decay over the last part of the budget
FINAL_LR_FRAC = 0.0       # LR multiplier at the very end

# ---- Misc ----
COMPILE = True            # torch.compile the model on CUDA (always off on CPU)


def hyperparameters():
    """The hyperparameter block's constants (plain values defined after SMALL), in file order."""
    items = list(globals().items())
    start = [k for k, _ in items].index("SMALL") + 1
    return {k: v for k, v in items[start:] if k.isupper() and isinstance(v, (bool, int, float, str))}


# =============================================================================================
# Model
# =============================================================================================
def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x, cos, sin):
    cos, sin, d = cos.to(x.dtype), sin.to(x.dtype), x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)



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


def lr_multiplier(progress):
    if progress < WARMUP_RATIO:
        return (progress + 1e-8) / WARMUP_RATIO
    if progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    cooldown = (1.0 - progress) / max(WARMDOWN_RATIO, 1e-8)
    return cooldown + (1.0 - cooldown) * FINAL_LR_FRAC


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


class Progress:
    """\\r-overwritten line on a TTY; otherwise one plain line every 5 seconds."""

    def __init__(self):
        self.tty = sys.stdout.isatty()
        self.interval = 5.0
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


class ConfigError(Exception):
    """Bad configuration: one line, exit code 2."""


class TrainingFailed(Exception):
    pass


class Terminated(BaseException):
    """SIGTERM (a cancelled or preempted job): reported like a crash, exit 143."""


def _on_sigterm(signum, frame):
    raise Terminated()


def check_config(T):
    negative = [k for k, v in hyperparameters().items() if not isinstance(v, (bool, str)) and v < 0]
    if negative:
        raise ConfigError(f"hyperparameters must not be negative: {', '.join(negative)}")
    if DEVICE_BATCH_SIZE < 1 or TOTAL_BATCH_SIZE < 1 or TOTAL_BATCH_SIZE % (DEVICE_BATCH_SIZE * T):
        raise ConfigError(f"TOTAL_BATCH_SIZE={TOTAL_BATCH_SIZE} must be a positive multiple of "
                          f"DEVICE_BATCH_SIZE * seq_len = {DEVICE_BATCH_SIZE} * {T}")
    if min(DEPTH, HEAD_DIM, KV_HEAD_RATIO, ASPECT_RATIO) < 1 or HEAD_DIM % 2:
        raise ConfigError("DEPTH, ASPECT_RATIO, KV_HEAD_RATIO must be >= 1 and HEAD_DIM even and >= 2")


def main():
    profile = PROFILE
    source = P.get_data_source(profile)
    T = profile.max_seq_len
    check_config(T)
    P.ensure_prepared(profile, source)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    is_cuda = device.type == "cuda"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(P.inductor_cache_dir()))
    os.environ.setdefault("TRITON_CACHE_DIR", str(Path(P.inductor_cache_dir()) / "triton"))
    torch.manual_seed(SEED)
    if is_cuda:
        torch.cuda.manual_seed(SEED)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = torch.amp.autocast("cuda", dtype=torch.bfloat16) if is_cuda else nullcontext()
    use_compile = is_cuda and COMPILE

    tokenizer = P.Tokenizer.load(profile, source)
    vocab_size = tokenizer.get_vocab_size()
    dim = -(-DEPTH * ASPECT_RATIO // HEAD_DIM) * HEAD_DIM
    n_head = dim // HEAD_DIM
    if n_head % KV_HEAD_RATIO:
        raise ConfigError(f"n_head={n_head} is not divisible by KV_HEAD_RATIO={KV_HEAD_RATIO}")
    n_kv_head = n_head // KV_HEAD_RATIO
    with device:
        model = GPT(vocab_size, T, DEPTH, dim, n_head, n_kv_head, HEAD_DIM, MLP_RATIO * dim,
                    LOGIT_SOFTCAP, ROPE_BASE, VALUE_EMBEDS)
    model.init_weights()

    num_params = sum(p.numel() for p in model.parameters())
    emb_params = model.wte.weight.numel() + sum(p.numel() for p in model.value_embeds.parameters())
    # Training FLOPs per token: 6 per non-embedding weight, plus attention (the reference's formula).
    flops_per_token = 6 * (num_params - emb_params) + 12 * DEPTH * n_head * HEAD_DIM * T
    grad_accum = TOTAL_BATCH_SIZE // (DEVICE_BATCH_SIZE * T)
    device_name = gpu_name(device)
    peak = peak_flops(device_name)

    print(f"profile: {profile.name} | data: {source} | device: {device_name} | seq_len: {T} | "
          f"time_budget: {profile.time_budget:g}s | vocab: {vocab_size} | "
          f"corpus: {str(tokenizer.meta.get('corpus_sha256'))[:16]}", flush=True)
    print("knobs: " + " ".join(f"{k}={v!r}" for k, v in hyperparameters().items()), flush=True)
    print(f"model: dim={dim} heads={n_head} kv_heads={n_kv_head} params={num_params / 1e6:.2f}M "
          f"grad_accum={grad_accum}", flush=True)

    matrices = [p for b in model.blocks for p in b.parameters()]
    scale = (dim / 768) ** -0.5
    adam_groups = [
        dict(params=[model.wte.weight, *model.value_embeds.parameters()], lr=EMBEDDING_LR * scale),
        dict(params=[model.lm_head.weight], lr=UNEMBEDDING_LR * scale),
        dict(params=[model.resid_lambdas, model.x0_lambdas], lr=SCALAR_LR),
    ]
    for g in adam_groups:
        g["initial_lr"] = g["lr"]
    adamw = torch.optim.AdamW(adam_groups, betas=(ADAM_BETA1, ADAM_BETA2), eps=1e-10, weight_decay=0.0,
                              fused=is_cuda)
    muon = Muon(matrices, lr=MATRIX_LR, momentum=MUON_MOMENTUM, weight_decay=WEIGHT_DECAY, compile_step=use_compile)
    train_model = torch.compile(model, dynamic=False) if use_compile else model

    budget = float(profile.time_budget)
    untimed = UNTIMED_STEPS_CUDA if is_cuda else UNTIMED_STEPS_CPU
    fail_loss = FAIL_LOSS_FACTOR * math.log(vocab_size)
    loader = prefetch(P.make_dataloader(tokenizer, DEVICE_BATCH_SIZE, T, "train", profile, source, device))
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
        lrm = lr_multiplier(progress)
        for g in adamw.param_groups:
            g["lr"] = g["initial_lr"] * lrm
        frac = min(step / max(MUON_MOMENTUM_WARMUP_STEPS, 1), 1.0)
        for g in muon.param_groups:
            g["lr"] = MATRIX_LR * lrm
            g["momentum"] = (1 - frac) * 0.85 + frac * MUON_MOMENTUM
            g["weight_decay"] = WEIGHT_DECAY * (1 - progress)
        adamw.step()
        muon.step()
        model.zero_grad(set_to_none=True)
        loss_f = loss.item()  # one sync per step; also the fast-fail check
        dt = time.time() - t0
        if not math.isfinite(loss_f):
            raise TrainingFailed(f"loss is {loss_f} at step {step}")
        if loss_f > fail_loss:
            raise TrainingFailed(f"loss exploded to {loss_f:.2f} (> {fail_loss:.2f}) at step {step}")
        if step >= untimed:
            training_time += dt
        smooth = loss_f if smooth is None else 0.9 * smooth + 0.1 * loss_f
        tok_s = TOTAL_BATCH_SIZE / dt
        mfu = 100 * flops_per_token * tok_s / peak if peak else 0.0
        step += 1
        done = step > untimed and training_time >= budget
        progress_out.update(
            f"step {step:05d} ({100 * min(training_time / budget, 1):5.1f}%) | loss {smooth:.4f} | lrm {lrm:.2f} | "
            f"dt {dt * 1000:6.0f}ms | tok/s {tok_s:,.0f} | mfu {mfu:4.1f}% | epoch {epoch} | "
            f"remaining {max(budget - training_time, 0):.0f}s", final=done)
        if done:
            break

    tokens_per_sec = (step - untimed) * TOTAL_BATCH_SIZE / training_time
    mfu = 100 * flops_per_token * tokens_per_sec / peak if peak else 0.0
    model.eval()
    with autocast:
        val_bpb = P.evaluate_bpb(train_model, tokenizer, DEVICE_BATCH_SIZE, profile, source, device)
    if not math.isfinite(val_bpb):
        raise TrainingFailed(f"val_bpb is {val_bpb}")

    summary = dict(
        val_bpb=f"{val_bpb:.6f}",
        training_seconds=f"{training_time:.1f}",
        total_seconds=f"{time.time() - T_PROCESS_START:.1f}",
        peak_vram_mb=f"{peak_memory_mb(device):.1f}",
        mfu_percent=f"{mfu:.2f}",
        total_tokens_M=f"{step * TOTAL_BATCH_SIZE / 1e6:.1f}",
        num_steps=step,
        num_params_M=f"{num_params / 1e6:.1f}",
        depth=DEPTH,
        profile=profile.name,
        data=source,
        device=device_name,
        startup_seconds=f"{startup_seconds:.1f}",
        tokens_per_sec=round(tokens_per_sec),
    )
    print("---\n" + "\n".join(f"{key + ':':<18}{value}" for key, value in summary.items()), flush=True)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        main()
    except (ConfigError, P.PrepareError) as e:
        config_error(e)
    except (Exception, KeyboardInterrupt, Terminated) as e:  # every crash ends with a FAIL line
        if isinstance(e, TrainingFailed):
            reason = str(e)
        elif isinstance(e, (KeyboardInterrupt, Terminated)):
            reason = "interrupted (SIGINT)" if isinstance(e, KeyboardInterrupt) else "terminated (SIGTERM)"
        else:
            traceback.print_exc()
            name = type(e).__qualname__
            name = name if type(e).__module__ == "builtins" else f"{type(e).__module__}.{name}"
            reason = f"{name}: {e}".splitlines()[0]  # e.g. torch.OutOfMemoryError: CUDA out of memory. ...
        sys.stderr.flush()
        print(f"\nFAIL: {reason}", flush=True)
        sys.exit(130 if isinstance(e, KeyboardInterrupt) else 143 if isinstance(e, Terminated) else 1)
