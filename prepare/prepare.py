"""Fixed data and evaluation harness for autoresearch. AGENTS MUST NOT EDIT THIS FILE.

The experiment loop edits trainer/train.py, trains for a fixed wall-clock budget and is scored by
`evaluate_bpb`: bits per byte on a fixed validation set. Everything that decides what that number
means lives here and stays fixed: the profiles (sequence length, time budget, number of eval tokens,
vocabulary size), the data (ClimbMix shards or the offline corpus), the train/val split, the
tokenizer, the document packing and the metric itself. If a run could change any of these, val_bpb
values would stop being comparable across runs, so the trainer only imports this module.

Bits per byte is used rather than loss per token because it does not depend on the tokenizer: the
summed loss (nats) over target tokens is divided by ln(2) times the UTF-8 bytes those tokens stand
for. Special tokens (BOS) stand for zero bytes and are left out of both sums.

Usage:
    python prepare/prepare.py [--profile full|tiny|smoke] [--data offline|climbmix] [--num-shards N]
Environment: AR_PROFILE, AR_DATA (defaults for --profile, --data), AR_NUM_SHARDS (--num-shards),
AR_CACHE_DIR (the cache root), AR_CLIMBMIX_URL (where the shards are downloaded from).
The trainer does `sys.path.insert(0, "<repo>/prepare"); import prepare as P`.

Data sources:
  climbmix  karpathy/climbmix-400b-shuffle parquet shards, downloaded over HTTP; train shards
            0..N-1, validation pinned to the last shard (shard_06542).
  offline   a corpus built from text every Python installation carries (the standard library's
            pydoc topics, docstrings and module sources), so a fresh machine with no network can
            still run the whole loop. Its content, and therefore its sha256, depends on the Python
            version and on how that Python was built or patched by the distribution: val_bpb
            numbers are comparable only between runs whose `corpus_sha256` is the same. The hash
            is in meta.json and printed.

Cache layout (root = $AR_CACHE_DIR or ~/.cache/autoresearch):
  <root>/data/climbmix/shard_XXXXX.parquet             downloaded shards
  <root>/data/offline/<sha256[:16]>/{train,val}_*.parquet + corpus.json
  <root>/data/offline/fingerprint-<fp>.json            stdlib fingerprint -> corpus hash
  <root>/<profile>/<source>/tokenizer/                 tokenizer.pkl, token_bytes.pt, meta.json
  <root>/inductor/                                     TORCHINDUCTOR_CACHE_DIR
Every file is written to a temporary name and renamed into place, and meta.json is written last,
so an interrupted run is never mistaken for a finished one.
"""
from __future__ import annotations

import argparse
import ast
import bisect
import contextlib
import hashlib
import http.client
import json
import math
import os
import pickle
import shutil
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import rustbpe
import tiktoken
import torch

# ---- Knobs (fixed: changing any of them changes what val_bpb means) --------------------------------------

DEFAULT_CACHE_DIR = "~/.cache/autoresearch"  # overridden by $AR_CACHE_DIR

# ClimbMix: 6543 shards on the hub, shard_00000 .. shard_06542; the last one is val.
CLIMBMIX_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
MAX_SHARD = 6542
VAL_SHARD = MAX_SHARD
DEFAULT_NUM_SHARDS = 10  # train shards downloaded by default ($AR_NUM_SHARDS)
DOWNLOAD_WORKERS = 8  # parallel shard downloads
DOWNLOAD_TIMEOUT_S = 120.0  # socket timeout of one HTTP attempt

# Tokenizer: BPE trained on the train split only, GPT-4 style pre-split (digits in
# groups of at most 2, which suits small vocabularies), special tokens after merges.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = [f"<|reserved_{i}|>" for i in range(4)]
BOS_TOKEN = SPECIAL_TOKENS[0]  # every document starts with it
TOKENIZER_MAX_CHARS = 1_000_000_000  # training text cap (first chars of the train split)
TOKENIZER_DOC_CAP = 10_000  # at most this many chars of any one document
ENCODE_THREADS = 8  # threads for batch encoding

# Dataloader: BOS-aligned best-fit packing.
PACK_BUFFER_DOCS = 1000  # tokenized documents kept to choose from
PACK_ENCODE_BATCH = 256  # documents tokenized per batch

# Offline corpus built from the Python standard library.
OFFLINE_FORMAT = 1  # bump when the corpus recipe below changes
OFFLINE_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
OFFLINE_NO_SOURCE = ("encodings", "pydoc_data")  # code-page tables; copy of the topics
OFFLINE_SOURCE_MAX_CHARS = 12_000  # module sources are cut (at a line end) to this
OFFLINE_DOC_MAX_CHARS = 600  # texts are split (at blank lines) into documents this long,
# so that the tiny profile's 257-token rows hold whole documents rather than cropped heads
OFFLINE_VAL_PERCENT = 8  # share of document groups in the val split
OFFLINE_SHARD_CHARS = 1_000_000  # chars of text per offline parquet shard
OFFLINE_ROW_GROUP = 256  # documents per parquet row group

DATA_SOURCES = ("offline", "climbmix")

META_FORMAT = 1


class PrepareError(Exception):
    """A user-facing problem; the message is one line and says how to fix it."""


# ---- Profiles --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Profile:
    name: str
    max_seq_len: int  # T: tokens per row seen by the model
    time_budget: float  # seconds of training
    eval_tokens: int  # tokens scored by evaluate_bpb
    vocab_size: int  # including the special tokens
    default_data: str  # data source when neither --data nor $AR_DATA is given


PROFILES = {
    # The reference setting (one GPU, 5 minutes).
    "full": Profile("full", 2048, 300.0, 40 * 524288, 8192, "climbmix"),
    # CPU / CI: small enough to train something in 20 s on a laptop.
    "tiny": Profile("tiny", 256, 20.0, 16 * 256 * 16, 2048, "offline"),
    # The test suite.
    "smoke": Profile("smoke", 128, 5.0, 8 * 128 * 8, 1024, "offline"),
}


def get_profile(name: str | None = None) -> Profile:
    """Profile by name, else $AR_PROFILE, else "full" with CUDA and "tiny" without."""
    if isinstance(name, Profile):
        return name
    name = name or os.environ.get("AR_PROFILE") or ("full" if torch.cuda.is_available() else "tiny")
    if name not in PROFILES:
        raise PrepareError(f"unknown profile {name!r}: use one of {', '.join(PROFILES)}")
    return PROFILES[name]


def get_data_source(profile: Profile | str | None = None, name: str | None = None) -> str:
    """Data source by name, else $AR_DATA, else the profile's default."""
    name = name or os.environ.get("AR_DATA") or get_profile(profile).default_data
    if name not in DATA_SOURCES:
        raise PrepareError(f"unknown data source {name!r}: use one of {', '.join(DATA_SOURCES)}")
    return name


def _resolve(profile, source) -> tuple[Profile, str]:
    prof = get_profile(profile)
    return prof, get_data_source(prof, source)


# ---- Cache layout and atomic writes ----------------------------------------------------------------------
def cache_root() -> Path:
    return Path(os.environ.get("AR_CACHE_DIR") or DEFAULT_CACHE_DIR).expanduser()


def data_dir(source: str) -> Path:
    return cache_root() / "data" / source


def tokenizer_dir(profile: Profile | str | None = None, source: str | None = None) -> Path:
    prof, src = _resolve(profile, source)
    return cache_root() / prof.name / src / "tokenizer"


def inductor_cache_dir() -> Path:
    return cache_root() / "inductor"


def _log(msg: str) -> None:
    print(f"prepare: {msg}", file=sys.stderr, flush=True)


def _tmp_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def _atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename the result onto `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_json(path: Path, obj) -> None:
    _atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_parquet(path: Path, texts: list[str]) -> None:
    table = pa.table({"text": pa.array(texts, type=pa.string())})
    _atomic_write(path, lambda p: pq.write_table(table, p, row_group_size=OFFLINE_ROW_GROUP))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---- Offline corpus: text from the Python standard library -----------------------------------------------
def _stdlib_files() -> tuple[Path, list[Path]]:
    """The stdlib's .py files in sorted order, without tests, site-packages and
    build-specific files (_sysconfigdata*, config-*/)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in OFFLINE_SKIP_DIRS and not d.startswith("config-"))
        for fn in sorted(filenames):
            if fn.endswith(".py") and not fn.startswith("_sysconfigdata"):
                files.append(Path(dirpath) / fn)
    return root, files


def _stdlib_fingerprint() -> str:
    """Cheap identity of the inputs (no parsing), used to skip rebuilding the corpus."""
    root, files = _stdlib_files()
    h = hashlib.sha256(f"{OFFLINE_FORMAT}\0{sys.version}\0{root}\0".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:32]


def _docstrings(tree: ast.Module, module: str) -> str:
    parts = []

    def visit(node, qualname):
        doc = ast.get_docstring(node, clean=True)
        if doc:
            parts.append(f"{qualname}\n{doc.strip()}\n")
        for child in node.body:
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, f"{qualname}.{child.name}")

    visit(tree, module)
    return "\n".join(parts)


def _split_document(text: str, max_chars: int) -> list[str]:
    """Cut text into pieces of at most max_chars, preferring a cut after a blank line
    (when that keeps at least half a piece), else after any line; concatenating the
    pieces gives back the text. Whitespace-only pieces are dropped."""
    out: list[str] = []
    cur: list[str] = []
    size = brk = brk_size = 0  # brk: lines of cur up to its last blank line
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:  # a very long line: hard cut
            out.append("".join(cur))
            cur, size, brk, brk_size = [], 0, 0, 0
            out.append(line[:max_chars])
            line = line[max_chars:]
        while cur and size + len(line) > max_chars:
            cut = brk if brk_size >= max_chars // 2 else len(cur)
            out.append("".join(cur[:cut]))
            cur = cur[cut:]
            size, brk, brk_size = sum(map(len, cur)), 0, 0
        cur.append(line)
        size += len(line)
        if not line.strip():
            brk, brk_size = len(cur), size
    out.append("".join(cur))
    return [piece for piece in out if piece.strip()]


def _in_val(group: str) -> bool:
    digest = hashlib.sha256(f"split\0{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < OFFLINE_VAL_PERCENT


def offline_documents() -> list[tuple[str, str, str]]:
    """All offline documents as (split, doc_id, text), in the fixed corpus order.

    Documents: every pydoc topic; per module, its docstrings (with qualified names);
    per module, its source cut to OFFLINE_SOURCE_MAX_CHARS at a line end. A module's
    docstrings and source share a split (keyed by the module path) so val text is never
    repeated in train. Each text is then split into documents of at most
    OFFLINE_DOC_MAX_CHARS, and the order is a fixed shuffle (sorted by sha256 of the
    document id)."""
    from pydoc_data.topics import topics

    docs = []
    for key in sorted(topics):
        text = topics[key].strip()
        if text:
            docs.append((f"topic/{key}", f"topic/{key}", text))
    root, files = _stdlib_files()
    for path in files:
        rel = path.relative_to(root).as_posix()
        try:
            source = path.read_bytes().decode("utf-8")
            tree = ast.parse(source, filename=rel)
        except (UnicodeDecodeError, SyntaxError, ValueError, OSError):
            continue
        module = rel[: -len(".py")].replace("/", ".").removesuffix(".__init__")
        doc = _docstrings(tree, module)
        if doc:
            docs.append((rel, f"doc/{rel}", doc))
        if rel.split("/")[0] not in OFFLINE_NO_SOURCE and source.strip():
            if len(source) > OFFLINE_SOURCE_MAX_CHARS:
                cut = source[:OFFLINE_SOURCE_MAX_CHARS]
                source = cut[: cut.rfind("\n") + 1] or cut
            docs.append((rel, f"src/{rel}", source))
    pieces = [(group, f"{doc_id}#{k}", piece) for group, doc_id, text in docs
              for k, piece in enumerate(_split_document(text, OFFLINE_DOC_MAX_CHARS))]
    pieces.sort(key=lambda d: hashlib.sha256(d[1].encode()).digest())
    return [("val" if _in_val(group) else "train", doc_id, text) for group, doc_id, text in pieces]


def _corpus_sha256(docs: list[tuple[str, str, str]]) -> str:
    h = hashlib.sha256()
    for split, doc_id, text in docs:
        h.update(f"{split}\0{doc_id}\0".encode())
        h.update(text.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def _chunk_texts(texts: list[str], max_chars: int) -> list[list[str]]:
    shards, cur, n = [], [], 0
    for t in texts:
        cur.append(t)
        n += len(t)
        if n >= max_chars:
            shards.append(cur)
            cur, n = [], 0
    if cur or not shards:
        shards.append(cur)
    return shards


def build_offline_corpus(force: bool = False) -> dict:
    """Build (or find) the offline corpus; returns its corpus.json contents plus "dir".

    The result lives in <root>/data/offline/<sha256[:16]>/ and is reused when the stdlib
    fingerprint matches an earlier build (force=True rebuilds from the stdlib)."""
    base = data_dir("offline")
    pointer = base / f"fingerprint-{_stdlib_fingerprint()}.json"
    if not force:
        ptr = _read_json(pointer)
        if ptr and "corpus_sha256" in ptr:
            d = base / ptr["corpus_sha256"][:16]
            info = _read_json(d / "corpus.json")
            if info and info.get("sha256") == ptr["corpus_sha256"]:
                return {**info, "dir": str(d)}
    t0 = time.time()
    _log("building the offline corpus from the Python standard library ...")
    docs = offline_documents()
    sha = _corpus_sha256(docs)
    final = base / sha[:16]
    info = _read_json(final / "corpus.json")
    if info is None or info.get("sha256") != sha:
        train = [t for s, _, t in docs if s == "train"]
        val = [t for s, _, t in docs if s == "val"]
        tmp = base / f".build-{sha[:16]}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            names = {"train": [], "val": []}
            for split, texts in (("train", train), ("val", val)):
                for i, chunk in enumerate(_chunk_texts(texts, OFFLINE_SHARD_CHARS)):
                    name = f"{split}_{i:05d}.parquet"
                    _write_parquet(tmp / name, chunk)
                    names[split].append(name)
            info = {"format": OFFLINE_FORMAT, "sha256": sha, "python": sys.version,
                    "train_shards": names["train"], "val_shards": names["val"],
                    "train_docs": len(train), "val_docs": len(val),
                    "train_chars": sum(map(len, train)), "val_chars": sum(map(len, val)),
                    "bytes": sum(len(t.encode("utf-8")) for _, _, t in docs)}
            _write_json(tmp / "corpus.json", info)
            shutil.rmtree(final, ignore_errors=True)  # an incomplete earlier build
            try:
                os.replace(tmp, final)
            except OSError:  # another process finished the same build first
                if _read_json(final / "corpus.json") is None:
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        info = _read_json(final / "corpus.json")
    _write_json(pointer, {"corpus_sha256": sha, "python": sys.version})
    _log(f"offline corpus {sha[:16]}: {info['bytes'] / 1e6:.1f} MB, {info['train_docs']} train"
         f" / {info['val_docs']} val docs ({time.time() - t0:.1f}s)")
    return {**info, "dir": str(final)}


# ---- ClimbMix download -----------------------------------------------------------------------------------
def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def _climbmix_url(base_url: str | None = None) -> str:
    return (base_url or os.environ.get("AR_CLIMBMIX_URL") or CLIMBMIX_URL).rstrip("/")


def _download_one(url: str, dest: Path, timeout_s: float) -> None:
    req = urllib.request.Request(url, headers={"User-Agent": "autoresearch-prepare"})
    tmp = _tmp_path(dest)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp, open(tmp, "wb") as f:
            shutil.copyfileobj(resp, f, 1 << 20)
            expected = resp.headers.get("Content-Length")
        size = tmp.stat().st_size
        if expected is not None and int(expected) != size:
            raise OSError(f"truncated: got {size} of {expected} bytes")
        with open(tmp, "rb") as f:
            head = f.read(4)
            f.seek(max(0, size - 4))
            tail = f.read(4)
        if size < 8 or head != b"PAR1" or tail != b"PAR1":
            raise OSError("not a parquet file")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def download_shards(indices, dest_dir, base_url: str | None = None, max_attempts: int = 5, backoff_s: float = 2.0,
                    timeout_s: float = DOWNLOAD_TIMEOUT_S, workers: int = DOWNLOAD_WORKERS) -> list[Path]:
    """Download ClimbMix shards `indices` into dest_dir; returns their paths in order.

    Shards already present are skipped. Each shard is fetched to a temporary name and
    renamed into place; failed attempts are retried with exponential backoff
    (backoff_s, 2*backoff_s, ...); a shard still failing raises PrepareError."""
    base = _climbmix_url(base_url)
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    indices = list(indices)
    for i in indices:
        if not (isinstance(i, int) and 0 <= i <= MAX_SHARD):
            raise PrepareError(f"shard index {i!r} out of range 0..{MAX_SHARD}")
    paths = [dest_dir / shard_name(i) for i in indices]
    todo = sorted({(i, p) for i, p in zip(indices, paths, strict=True) if not p.exists()})

    def fetch(item):
        i, path = item
        url = f"{base}/{shard_name(i)}"
        for attempt in range(1, max_attempts + 1):
            try:
                _download_one(url, path, timeout_s)
                _log(f"downloaded {path.name}")
                return
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
                code = getattr(e, "code", None)
                permanent = code is not None and 400 <= code < 500 and code not in (408, 429)
                if permanent or attempt == max_attempts:
                    raise PrepareError(f"download of {path.name} failed after {attempt} attempt(s) from {url}: {e};"
                                       " check the network or AR_CLIMBMIX_URL, or set AR_DATA=offline") from e
                delay = backoff_s * 2 ** (attempt - 1)
                _log(f"{path.name}: attempt {attempt} failed ({e}); retrying in {delay:.1f}s")
                time.sleep(delay)

    if todo:
        _log(f"downloading {len(todo)} shard(s) from {base}")
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo)))) as pool:
            futures = [pool.submit(fetch, item) for item in todo]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise errors[0]
    return paths


def _prepare_climbmix(num_shards: int) -> dict:
    if not 1 <= num_shards <= MAX_SHARD:
        raise PrepareError(f"--num-shards must be between 1 and {MAX_SHARD}, got {num_shards}")
    paths = download_shards([*range(num_shards), VAL_SHARD], data_dir("climbmix"))
    train, val = paths[:-1], paths[-1:]
    h = hashlib.sha256()
    for p in train + val:
        h.update(f"{p.name}\0{_sha256_file(p)}\0".encode())
    return {"sha256": h.hexdigest(), "dir": str(data_dir("climbmix")),
            "train_shards": [p.name for p in train], "val_shards": [p.name for p in val],
            "train_docs": sum(pq.ParquetFile(p).metadata.num_rows for p in train),
            "val_docs": sum(pq.ParquetFile(p).metadata.num_rows for p in val)}


# ---- Tokenizer -------------------------------------------------------------------------------------------
def _iter_texts(paths):
    """Documents of parquet shards (column "text") in order, in row-group batches."""
    for path in paths:
        pf = pq.ParquetFile(path)
        for rg in range(pf.num_row_groups):
            texts = pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
            yield path, [t or "" for t in texts]


def _train_tokenizer(train_paths: list[Path], vocab_size: int, name: str):
    """Train BPE on the first TOKENIZER_MAX_CHARS of the train split; returns
    (tiktoken.Encoding, stats)."""
    stats = {"chars": 0, "shards": [], "cap_reached": False}

    def texts():
        for path, batch in _iter_texts(train_paths):
            if path.name not in stats["shards"]:
                stats["shards"].append(path.name)
            for t in batch:
                t = t[:TOKENIZER_DOC_CAP]
                stats["chars"] += len(t)
                yield t
                if stats["chars"] >= TOKENIZER_MAX_CHARS:
                    stats["cap_reached"] = True
                    return

    n_merges_vocab = vocab_size - len(SPECIAL_TOKENS)
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(texts(), n_merges_vocab, pattern=SPLIT_PATTERN)
    ranks = {bytes(b): r for b, r in bpe.get_mergeable_ranks()}
    if len(ranks) != n_merges_vocab:
        raise PrepareError(f"tokenizer training found only {len(ranks)} of {n_merges_vocab} tokens:"
                           " the training text is too small for this vocab size")
    special = {tok: n_merges_vocab + i for i, tok in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding(name, pat_str=bpe.get_pattern(), mergeable_ranks=ranks, special_tokens=special)
    return enc, stats


def _token_bytes(enc: tiktoken.Encoding) -> torch.Tensor:
    special = set(enc.special_tokens_set)
    special_ids = {enc.encode_single_token(s) for s in special}
    lengths = [0 if i in special_ids else len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)]
    return torch.tensor(lengths, dtype=torch.int32)


class Tokenizer:
    """A trained BPE tokenizer (a tiktoken Encoding) with one BOS special token."""

    def __init__(self, enc: tiktoken.Encoding, meta: dict | None = None):
        self.enc = enc
        self.meta = meta or {}
        self.bos_token_id = enc.encode_single_token(BOS_TOKEN)

    @classmethod
    def load(cls, profile: Profile | str | None = None, source: str | None = None) -> Tokenizer:
        meta = ensure_prepared(profile, source)
        with open(tokenizer_dir(profile, source) / "tokenizer.pkl", "rb") as f:
            return cls(pickle.load(f), meta)

    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    def encode(self, text, prepend_bos: bool = False, num_threads: int = ENCODE_THREADS):
        """str -> list[int]; list[str] -> list[list[int]] (threads). Special-token text
        in the input is encoded as ordinary text."""
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            return [self.bos_token_id, *ids] if prepend_bos else ids
        batch = self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)
        if prepend_bos:
            for ids in batch:
                ids.insert(0, self.bos_token_id)
        return batch

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.enc.decode(list(ids))


def get_token_bytes(profile=None, source=None, device="cpu") -> torch.Tensor:
    """int32 [vocab]: UTF-8 bytes each token stands for (0 for special tokens)."""
    ensure_prepared(profile, source)
    tb = torch.load(tokenizer_dir(profile, source) / "token_bytes.pt", weights_only=True)
    return tb.to(device)


# ---- prepare / ensure_prepared ---------------------------------------------------------------------------
def _how_to_prepare(prof: Profile, src: str) -> str:
    fix = f"run `AR_PROFILE={prof.name} make prepare DATA={src}`"
    return fix if src == "offline" else fix + " (or set AR_DATA=offline)"


def _shard_paths(meta: dict, split: str) -> list[Path]:
    return [cache_root() / rel for rel in meta[f"{split}_shards"]]


def _is_complete(prof: Profile, src: str, meta) -> bool:
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        return False
    if meta.get("vocab_size") != prof.vocab_size or meta.get("data") != src:
        return False
    tdir = tokenizer_dir(prof, src)
    try:
        shards = _shard_paths(meta, "train") + _shard_paths(meta, "val")
    except (KeyError, TypeError):
        return False
    files = [tdir / "tokenizer.pkl", tdir / "token_bytes.pt", *shards]
    return bool(meta["train_shards"]) and bool(meta["val_shards"]) and all(f.is_file() for f in files)


def ensure_prepared(profile: Profile | str | None = None, source: str | None = None) -> dict:
    """The meta.json of a finished `prepare`; PrepareError saying what to run if not."""
    prof, src = _resolve(profile, source)
    meta = _read_json(tokenizer_dir(prof, src) / "meta.json")
    if not _is_complete(prof, src, meta):
        raise PrepareError(f"data {src!r} for profile {prof.name!r} is not prepared: {_how_to_prepare(prof, src)}")
    return meta


def _env_num_shards() -> int | None:
    raw = os.environ.get("AR_NUM_SHARDS")
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise PrepareError(f"AR_NUM_SHARDS must be an integer, got {raw!r}") from None


def prepare(profile: Profile | str | None = None, source: str | None = None, num_shards: int | None = None) -> dict:
    """Make data + tokenizer for (profile, source) ready; returns meta.json's contents.

    A no-op when everything is already there. num_shards (else $AR_NUM_SHARDS, else
    DEFAULT_NUM_SHARDS) is the number of ClimbMix train shards; ignored for offline. For
    climbmix without an explicit count, an existing preparation is kept as it is."""
    prof, src = _resolve(profile, source)
    tdir = tokenizer_dir(prof, src)
    meta = _read_json(tdir / "meta.json")
    complete = _is_complete(prof, src, meta)
    root = cache_root()

    if src == "offline":
        corpus = build_offline_corpus()
    else:
        if num_shards is None:
            num_shards = _env_num_shards()
        if complete and (num_shards is None or len(meta["train_shards"]) == num_shards):
            return meta
        corpus = _prepare_climbmix(num_shards or DEFAULT_NUM_SHARDS)
    cdir = Path(corpus["dir"])
    train_rel = [(cdir / n).relative_to(root).as_posix() for n in corpus["train_shards"]]
    val_rel = [(cdir / n).relative_to(root).as_posix() for n in corpus["val_shards"]]
    if complete and meta["corpus_sha256"] == corpus["sha256"] and meta["train_shards"] == train_rel:
        return meta

    t0 = time.time()
    for leftover in tdir.glob("*.tmp") if tdir.is_dir() else []:
        leftover.unlink(missing_ok=True)
    reuse = (meta is not None and (tdir / "tokenizer.pkl").is_file() and (tdir / "token_bytes.pt").is_file()
             and meta.get("format") == META_FORMAT and meta.get("vocab_size") == prof.vocab_size
             and meta.get("tokenizer_cap_reached")
             and meta.get("tokenizer_shards") == corpus["train_shards"][: len(meta["tokenizer_shards"])]
             and (src != "offline" or meta.get("corpus_sha256") == corpus["sha256"]))
    if reuse:
        stats = {"chars": meta["tokenizer_chars"], "shards": meta["tokenizer_shards"], "cap_reached": True}
        _log("keeping the tokenizer (trained on shards that are still the first ones)")
    else:
        (tdir / "meta.json").unlink(missing_ok=True)  # not done until meta.json is back
        _log(f"training a {prof.vocab_size}-token BPE tokenizer on the {src} train split ...")
        enc, stats = _train_tokenizer([root / r for r in train_rel], prof.vocab_size, f"autoresearch-{prof.name}-{src}")
        _atomic_write(tdir / "tokenizer.pkl", lambda p: p.write_bytes(pickle.dumps(enc)))
        _atomic_write(tdir / "token_bytes.pt", lambda p: torch.save(_token_bytes(enc), p))
        _log(f"tokenizer trained on {stats['chars'] / 1e6:.1f}M chars ({time.time() - t0:.1f}s)")
    meta = {"format": META_FORMAT, "profile": prof.name, "data": src, "vocab_size": prof.vocab_size,
            "special_tokens": SPECIAL_TOKENS, "bos_token": BOS_TOKEN, "corpus_sha256": corpus["sha256"],
            "train_shards": train_rel, "val_shards": val_rel,
            "train_docs": corpus["train_docs"], "val_docs": corpus["val_docs"],
            "tokenizer_chars": stats["chars"], "tokenizer_shards": stats["shards"],
            "tokenizer_cap_reached": stats["cap_reached"], "python": sys.version if src == "offline" else None}
    _write_json(tdir / "meta.json", meta)  # last: marks the preparation as complete
    return meta


# ---- Dataloader: BOS-aligned best-fit packing ------------------------------------------------------------
def make_dataloader(tokenizer: Tokenizer, B: int, T: int, split: str, profile: Profile | str | None = None,
                    source: str | None = None, device="cpu"):
    """Infinite generator of (x, y, epoch) with x, y int64 [B, T] on `device`.

    Each row holds T+1 tokens made of whole documents (each starting with BOS): the
    largest buffered document that fits the space left is taken, and when none fits the
    shortest one is cropped to fill the row exactly. No padding. x = row[:-1],
    y = row[1:]. Train cycles over the train shards, val over the val shard(s); `epoch`
    counts passes (1, 2, ...), and a pass is used up before the next one starts, so a
    split smaller than the buffer is not repeated within a pass. Deterministic for a
    given split."""
    if split not in ("train", "val"):
        raise PrepareError(f"split must be 'train' or 'val', got {split!r}")
    if B < 1 or T < 1:
        raise PrepareError(f"batch size and sequence length must be positive, got B={B} T={T}")
    meta = ensure_prepared(profile, source)
    paths = _shard_paths(meta, split)
    device = torch.device(device)
    return _packed_batches(tokenizer, B, T, paths, device)


def _document_batches(paths: list[Path]):
    epoch = 1
    while True:
        seen = False
        for _, texts in _iter_texts(paths):
            for i in range(0, len(texts), PACK_ENCODE_BATCH):
                seen = True
                yield texts[i : i + PACK_ENCODE_BATCH], epoch
        if not seen:
            raise PrepareError(f"no documents in {', '.join(p.name for p in paths)}")
        epoch += 1


def _packed_batches(tokenizer: Tokenizer, B: int, T: int, paths: list[Path], device):
    row_len = T + 1
    lengths: list[int] = []  # sorted ascending
    docs: list[list[int]] = []  # parallel to lengths
    batches = _document_batches(paths)
    pending = None  # the next (texts, epoch) from the shards, not yet in the buffer
    epoch = 1
    pin = device.type == "cuda"
    while True:
        flat: list[int] = []
        for _ in range(B):
            remaining = row_len
            while remaining > 0:
                while len(docs) < PACK_BUFFER_DOCS:
                    if pending is None:
                        pending = next(batches)
                    if pending[1] != epoch and docs:
                        break  # drain this epoch before the next one's documents come in
                    texts, epoch = pending
                    pending = None
                    for ids in tokenizer.encode(texts, prepend_bos=True):
                        i = bisect.bisect_right(lengths, len(ids))
                        lengths.insert(i, len(ids))
                        docs.insert(i, ids)
                i = bisect.bisect_right(lengths, remaining) - 1
                if i >= 0:  # the largest document that fits
                    remaining -= lengths.pop(i)
                    flat.extend(docs.pop(i))
                else:  # nothing fits: crop the shortest document to fill the row
                    lengths.pop(0)
                    flat.extend(docs.pop(0)[:remaining])
                    remaining = 0
        rows = torch.tensor(flat, dtype=torch.long).view(B, row_len)
        xy = torch.empty((2, B, T), dtype=torch.long, pin_memory=pin)
        xy[0].copy_(rows[:, :-1])
        xy[1].copy_(rows[:, 1:])
        xy = xy.to(device, non_blocking=pin)
        yield xy[0], xy[1], epoch


# ---- Metric ----------------------------------------------------------------------------------------------
def evaluate_bpb(model, tokenizer: Tokenizer, batch_size: int, profile: Profile | str | None = None,
                 source: str | None = None, device="cpu", autocast_ctx=None) -> float:
    """Validation bits per byte: the fixed metric.

    Scores eval_tokens // (batch_size * max_seq_len) batches (at least 1) from a fresh
    val loader. `model(x, y, reduction='none')` must return per-token losses in nats
    ([B, T] or [B*T]). Targets that stand for 0 bytes (special tokens) are excluded."""
    prof, src = _resolve(profile, source)
    T = prof.max_seq_len
    steps = max(1, prof.eval_tokens // (batch_size * T))
    token_bytes = get_token_bytes(prof, src, device)
    loader = make_dataloader(tokenizer, batch_size, T, "val", prof, src, device)
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    with torch.no_grad():
        for _ in range(steps):
            x, y, _ = next(loader)
            with autocast_ctx if autocast_ctx is not None else contextlib.nullcontext():
                loss = model(x, y, reduction="none")
            loss = loss.reshape(-1).to(torch.float64)
            nbytes = token_bytes[y.reshape(-1)]
            total_nats += torch.where(nbytes > 0, loss, torch.zeros_like(loss)).sum()
            total_bytes += nbytes.sum(dtype=torch.int64)
    n_bytes = int(total_bytes.item())
    if n_bytes == 0:
        raise PrepareError("evaluation saw no target bytes: the val split is empty")
    return float(total_nats.item()) / (math.log(2) * n_bytes)


# ---- CLI -------------------------------------------------------------------------------------------------
class _ArgParser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like PrepareError
        print(f"prepare: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    parser = _ArgParser(prog="prepare.py", description="Download/build the data and train the tokenizer (idempotent).")
    parser.add_argument("--profile", help="full | tiny | smoke (default: $AR_PROFILE or auto)")
    parser.add_argument("--data", help="offline | climbmix (default: $AR_DATA or the profile's)")
    parser.add_argument("--num-shards", type=int, help="ClimbMix train shards ($AR_NUM_SHARDS)")
    args = parser.parse_args(argv)
    try:
        prof, src = _resolve(args.profile, args.data)
        t0 = time.time()
        meta = prepare(prof, src, num_shards=args.num_shards)
    except PrepareError as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 2
    _log(f"done in {time.time() - t0:.1f}s")
    print(f"prepared: profile={prof.name} data={src} vocab={meta['vocab_size']} train_docs={meta['train_docs']}"
          f" val_docs={meta['val_docs']} corpus_sha256={meta['corpus_sha256']} dir={tokenizer_dir(prof, src).parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
