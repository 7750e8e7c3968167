"""Tests of the fixed data/eval harness prepare/prepare.py (smoke profile, offline data,
and a local HTTP server standing in for the ClimbMix host)."""

from __future__ import annotations

import dataclasses
import http.server
import io
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "prepare"))
import prepare as P  # noqa: E402

ENV_KEYS = ("AR_PROFILE", "AR_DATA", "AR_NUM_SHARDS", "AR_CLIMBMIX_URL", "AR_CACHE_DIR")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One AR_CACHE_DIR for the whole session, with no other AR_ knobs set."""
    root = tmp_path_factory.mktemp("ar_cache")
    with pytest.MonkeyPatch.context() as mp:
        for key in ENV_KEYS:
            mp.delenv(key, raising=False)
        mp.setenv("AR_CACHE_DIR", str(root))
        yield root


def run_cli(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS or k == "AR_CACHE_DIR"}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, str(REPO / "prepare" / "prepare.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.fixture(scope="session")
def prepared(cache_dir):
    """The smoke profile prepared end to end through the CLI (a separate process)."""
    t0 = time.time()
    proc = run_cli("--profile", "smoke", "--data", "offline")
    assert proc.returncode == 0, proc.stderr
    return {"stdout": proc.stdout, "stderr": proc.stderr, "seconds": time.time() - t0}


@pytest.fixture(scope="session")
def tok(prepared):
    return P.Tokenizer.load("smoke", "offline")


def read_texts(paths):
    return [t for p in paths for t in pq.read_table(p).column("text").to_pylist()]


# ---------------------------------------------------------------------------
# Profiles, env, errors
# ---------------------------------------------------------------------------


def test_profiles_and_sources(monkeypatch):
    full, tiny, smoke = P.PROFILES["full"], P.PROFILES["tiny"], P.PROFILES["smoke"]
    assert (full.max_seq_len, full.time_budget, full.eval_tokens, full.vocab_size) == (
        2048,
        300,
        40 * 524288,
        8192,
    )
    assert full.default_data == "climbmix"
    assert (tiny.max_seq_len, tiny.time_budget, tiny.eval_tokens, tiny.vocab_size) == (
        256,
        20,
        65536,
        2048,
    )
    assert (smoke.max_seq_len, smoke.time_budget, smoke.eval_tokens, smoke.vocab_size) == (
        128,
        5,
        8192,
        1024,
    )
    assert tiny.default_data == smoke.default_data == "offline"
    with pytest.raises(dataclasses.FrozenInstanceError):
        smoke.vocab_size = 1

    monkeypatch.delenv("AR_PROFILE", raising=False)
    monkeypatch.delenv("AR_DATA", raising=False)
    expected = "full" if torch.cuda.is_available() else "tiny"
    assert P.get_profile().name == expected
    monkeypatch.setenv("AR_PROFILE", "smoke")
    assert P.get_profile() is smoke
    assert P.get_profile("tiny") is tiny
    assert P.get_data_source(smoke) == "offline"
    assert P.get_data_source(full) == "climbmix"
    monkeypatch.setenv("AR_DATA", "offline")
    assert P.get_data_source(full) == "offline"
    assert P.get_data_source(full, "climbmix") == "climbmix"

    with pytest.raises(P.PrepareError, match="full, tiny, smoke") as e:
        P.get_profile("huge")
    assert "\n" not in str(e.value)
    monkeypatch.setenv("AR_PROFILE", "nope")
    with pytest.raises(P.PrepareError, match="'nope'"):
        P.get_profile()
    with pytest.raises(P.PrepareError, match="offline, climbmix"):
        P.get_data_source(smoke, "webtext")


def test_cache_layout(cache_dir, monkeypatch):
    assert P.cache_root() == cache_dir
    assert P.inductor_cache_dir() == cache_dir / "inductor"
    assert P.data_dir("climbmix") == cache_dir / "data" / "climbmix"
    dirs = {P.tokenizer_dir(p, "offline") for p in P.PROFILES}
    assert len(dirs) == len(P.PROFILES)  # profiles never share a tokenizer
    assert P.tokenizer_dir("tiny", "offline") == cache_dir / "tiny" / "offline" / "tokenizer"
    monkeypatch.delenv("AR_CACHE_DIR")
    assert P.cache_root() == Path("~/.cache/autoresearch").expanduser()


def test_cli_bad_input(cache_dir, capsys):
    proc = run_cli("--profile", "nope")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prepare: error: unknown profile 'nope'")
    assert proc.stdout == ""
    # The rest in-process (no interpreter start-up).
    assert P.main(["--data", "webtext", "--profile", "smoke"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith("prepare: error: unknown data source")
    with pytest.raises(SystemExit) as e:
        P.main(["--num-shards", "many"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prepare: error:")
    with pytest.raises(SystemExit):
        P.main(["--bogus"])
    assert capsys.readouterr().err.startswith("prepare: error:")


def test_not_prepared_message(cache_dir):
    with pytest.raises(P.PrepareError) as e:
        P.ensure_prepared("full", "climbmix")
    msg = str(e.value)
    assert "not prepared" in msg and "make prepare" in msg and "DATA=climbmix" in msg
    assert "AR_DATA=offline" in msg and "\n" not in msg
    with pytest.raises(P.PrepareError, match="not prepared"):
        P.Tokenizer.load("tiny", "climbmix")


# ---------------------------------------------------------------------------
# End-to-end CLI, offline corpus
# ---------------------------------------------------------------------------


def test_cli_end_to_end(prepared, cache_dir):
    line = prepared["stdout"].strip()
    assert "\n" not in line
    assert line.startswith("prepared: profile=smoke data=offline vocab=1024 train_docs=")
    fields = dict(kv.split("=", 1) for kv in line.split()[1:])
    meta = json.loads((cache_dir / "smoke/offline/tokenizer/meta.json").read_text())
    assert fields["corpus_sha256"] == meta["corpus_sha256"] and len(meta["corpus_sha256"]) == 64
    assert int(fields["train_docs"]) == meta["train_docs"] > 1000
    assert int(fields["val_docs"]) == meta["val_docs"] > 100
    assert Path(fields["dir"]) == cache_dir / "smoke" / "offline"
    assert meta["vocab_size"] == 1024 and meta["data"] == "offline"
    assert meta["profile"] == "smoke"
    for name in ("tokenizer.pkl", "token_bytes.pt", "meta.json"):
        assert (cache_dir / "smoke/offline/tokenizer" / name).is_file()
    assert not list(cache_dir.rglob("*.tmp"))
    assert "prepare:" in prepared["stderr"]  # progress goes to stderr
    assert P.ensure_prepared("smoke", "offline") == meta


def test_offline_corpus_deterministic_and_real(prepared, cache_dir):
    meta = P.ensure_prepared("smoke", "offline")
    docs = P.offline_documents()  # rebuilt here, in another process than the CLI's
    assert P._corpus_sha256(docs) == meta["corpus_sha256"]
    corpus = json.loads((cache_dir / "data/offline" / meta["corpus_sha256"][:16] / "corpus.json").read_text())
    assert corpus["sha256"] == meta["corpus_sha256"]
    assert 4e6 <= corpus["bytes"] <= 10e6  # several MB

    train = read_texts(P._shard_paths(meta, "train"))
    val = read_texts(P._shard_paths(meta, "val"))
    assert train == [t for s, _, t in docs if s == "train"]
    assert val == [t for s, _, t in docs if s == "val"]
    assert len(train) == meta["train_docs"] and len(val) == meta["val_docs"]
    assert 0.04 <= len(val) / (len(train) + len(val)) <= 0.12
    # Enough val text for the tiny profile's eval (~3 bytes per token there).
    assert sum(len(t.encode()) for t in val) > 4 * P.PROFILES["tiny"].eval_tokens
    # A module's pieces never straddle the split.
    group = {d[1].rsplit("#", 1)[0].split("/", 1)[1]: d[0] for d in docs}
    for split, doc_id, _ in docs:
        assert group[doc_id.rsplit("#", 1)[0].split("/", 1)[1]] == split

    text = "".join(train[:2000])
    printable = sum(c.isprintable() or c in "\n\t" for c in text) / len(text)
    assert printable > 0.98
    words = text.lower().split()
    for w in ("the", "and", "of", "is", "return", "if", "to"):
        assert words.count(w) > 50, w
    assert max(len(t) for t in train + val) <= P.OFFLINE_DOC_MAX_CHARS


def test_split_document():
    text = "para one\nline\n\npara two is longer\nand has lines\n\n" + "x" * 25 + "\nend\n"
    pieces = P._split_document(text, 20)
    assert "".join(pieces) == text
    assert all(len(p) <= 20 for p in pieces)
    assert pieces[0] == "para one\nline\n\n"  # cut after a blank line
    assert P._split_document("  \n\n", 10) == []


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------


def test_tokenizer_roundtrip(tok, prepared):
    meta = P.ensure_prepared("smoke", "offline")
    assert tok.get_vocab_size() == 1024
    bos = tok.get_bos_token_id()
    assert bos == 1024 - len(P.SPECIAL_TOKENS)
    samples = read_texts(P._shard_paths(meta, "val"))[:50]
    samples += [
        "héllo wörld — naïve café, 你好世界, Привет, 🙂🚀, tabs\tand\r\nCRLF",
        "",
        "<|reserved_0|> is plain text here",
        "\x00\x01 weird \uffff bytes 1234567890",
    ]
    for s in samples:
        ids = tok.encode(s)
        assert all(0 <= i < bos for i in ids)  # ordinary text never yields specials
        assert tok.decode(ids) == s
        assert tok.encode(s, prepend_bos=True) == [bos, *ids]
    assert tok.encode(samples, prepend_bos=True) == [[bos, *tok.encode(s)] for s in samples]
    assert tok.encode(samples) == [tok.encode(s) for s in samples]
    assert tok.decode(torch.tensor(tok.encode("abc def"))) == "abc def"
    # Real merges: English/code compresses to well under one token per byte.
    text = "".join(samples[:50])
    assert len(tok.encode(text)) < 0.5 * len(text.encode())


def test_token_bytes(tok, prepared):
    tb = P.get_token_bytes("smoke", "offline", "cpu")
    assert tb.dtype == torch.int32 and tb.shape == (1024,)
    specials = [tok.enc.encode_single_token(s) for s in P.SPECIAL_TOKENS]
    assert tok.get_bos_token_id() in specials
    assert all(tb[i] == 0 for i in specials)
    normal = [i for i in range(1024) if i not in specials]
    assert all(tb[i] > 0 for i in normal)
    assert all(tb[i] == 1 for i in range(256))  # the byte tokens
    for i in normal:
        assert tb[i] == len(tok.enc.decode_single_token_bytes(i))


# ---------------------------------------------------------------------------
# Dataloader
# ---------------------------------------------------------------------------


def test_packing_rows(tok, prepared):
    B, T = 8, 256
    bos = tok.get_bos_token_id()
    meta = P.ensure_prepared("smoke", "offline")
    docs = [tuple(d) for d in tok.encode(read_texts(P._shard_paths(meta, "val")), prepend_bos=True)]
    whole = set(docs)
    loader = P.make_dataloader(tok, B, T, "val", "smoke", "offline", "cpu")
    n_cropped = n_docs = 0
    for _ in range(10):
        x, y, epoch = next(loader)
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        assert x.device.type == "cpu" and epoch == 1
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert (x[:, 0] == bos).all()  # every row starts a document
        assert int(x.max()) < 1024 and int(x.min()) >= 0
        rows = torch.cat([x, y[:, -1:]], dim=1).tolist()  # the T+1 packed tokens
        for row in rows:
            starts = [i for i, t in enumerate(row) if t == bos]
            segments = [tuple(row[a:b]) for a, b in zip(starts, starts[1:] + [len(row)], strict=True)]
            for seg in segments[:-1]:  # whole documents, no padding in between
                assert seg in whole
            last = segments[-1]
            if last not in whole:  # only the last one may be cropped to fill the row
                n_cropped += 1
                assert any(d[: len(last)] == last for d in docs)
            n_docs += len(segments)
    print(f"{n_docs} documents ({n_cropped} cropped) in {B * 10} rows")
    assert n_docs > 1.5 * B * 10  # several documents per row: packing, not one doc per row
    assert n_cropped <= B * 10  # at most one cropped document per row


def test_loader_deterministic_and_epochs(tok, prepared):
    a = P.make_dataloader(tok, 4, 64, "train", "smoke", "offline", "cpu")
    b = P.make_dataloader(tok, 4, 64, "train", "smoke", "offline", torch.device("cpu"))
    v = P.make_dataloader(tok, 4, 64, "val", "smoke", "offline", "cpu")
    xv, _, _ = next(v)
    for _ in range(5):
        xa, ya, ea = next(a)
        xb, yb, eb = next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and ea == eb == 1
    assert not torch.equal(xa, xv)
    # The val split is small: the loader cycles into epoch 2 and keeps going.
    v = P.make_dataloader(tok, 32, 128, "val", "smoke", "offline", "cpu")
    epochs = [next(v)[2] for _ in range(120)]
    assert epochs[0] == 1 and epochs == sorted(epochs) and epochs[-1] >= 2
    with pytest.raises(P.PrepareError):
        P.make_dataloader(tok, 4, 64, "test", "smoke", "offline", "cpu")


# ---------------------------------------------------------------------------
# Metric
# ---------------------------------------------------------------------------


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=1024, dim=16, flat=False, bos_penalty=None):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, dim)
        self.head = torch.nn.Linear(dim, vocab)
        self.flat, self.bos_penalty, self.calls = flat, bos_penalty, 0

    def forward(self, x, y, reduction="mean"):
        self.calls += 1
        logits = self.head(self.emb(x))
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), reduction=reduction)
        if self.bos_penalty is not None:  # absurd loss on BOS targets only
            loss = loss + (y.reshape(-1) == self.bos_penalty[0]).float() * self.bos_penalty[1]
        return loss if self.flat else loss.view(y.shape)


class UniformLM(torch.nn.Module):
    def forward(self, x, y, reduction="none"):
        return torch.full(y.shape, math.log(1024.0), dtype=torch.float64)


def test_evaluate_bpb(tok, prepared):
    m = TinyLM()
    bpb = P.evaluate_bpb(m, tok, 8, "smoke", "offline", "cpu")
    assert math.isfinite(bpb) and 0 < bpb < 20
    assert m.calls == 8192 // (8 * 128)
    assert P.evaluate_bpb(m, tok, 8, "smoke", "offline", "cpu") == bpb  # deterministic
    assert P.evaluate_bpb(TinyLM(flat=True), tok, 8, "smoke", "offline", "cpu") == pytest.approx(bpb, rel=1e-12)
    huge_on_bos = TinyLM(bos_penalty=(tok.get_bos_token_id(), 1e9))
    assert P.evaluate_bpb(huge_on_bos, tok, 8, "smoke", "offline", "cpu") == pytest.approx(bpb, rel=1e-12)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16)
    low = P.evaluate_bpb(m, tok, 8, "smoke", "offline", "cpu", autocast_ctx=ctx)
    assert low == pytest.approx(bpb, rel=0.05)
    # At least one batch even when batch_size * T exceeds eval_tokens.
    m2 = TinyLM()
    P.evaluate_bpb(m2, tok, 128, "smoke", "offline", "cpu")
    assert m2.calls == 1


def test_evaluate_bpb_uniform_exact(tok, prepared):
    """A uniform model scores log2(V) bits per target token, counted by hand."""
    tb = P.get_token_bytes("smoke", "offline")
    loader = P.make_dataloader(tok, 8, 128, "val", "smoke", "offline", "cpu")
    n_tokens = n_bytes = 0
    for _ in range(8):
        _, y, _ = next(loader)
        nb = tb[y]
        n_tokens += int((nb > 0).sum())
        n_bytes += int(nb.sum())
    expected = math.log2(1024) * n_tokens / n_bytes
    got = P.evaluate_bpb(UniformLM(), tok, 8, "smoke", "offline", "cpu")
    assert got == pytest.approx(expected, rel=1e-9)


def test_evaluate_bpb_cycles_small_val(tok, prepared):
    """More eval tokens than the val split holds: the loader wraps, still deterministic."""
    prof = dataclasses.replace(P.PROFILES["smoke"], eval_tokens=400_000)
    m = TinyLM()
    a = P.evaluate_bpb(m, tok, 32, prof, "offline", "cpu")
    assert m.calls == 400_000 // (32 * 128)
    assert a == P.evaluate_bpb(m, tok, 32, prof, "offline", "cpu") and math.isfinite(a)


# ---------------------------------------------------------------------------
# Idempotence and partial outputs
# ---------------------------------------------------------------------------


def test_second_prepare_is_noop(prepared, cache_dir):
    tdir = cache_dir / "smoke/offline/tokenizer"
    before = {p.name: p.stat().st_mtime_ns for p in tdir.iterdir()}
    t0 = time.time()
    meta = P.prepare("smoke", "offline")
    assert time.time() - t0 < 5
    assert {p.name: p.stat().st_mtime_ns for p in tdir.iterdir()} == before
    assert meta == P.ensure_prepared("smoke", "offline")
    t0 = time.time()
    proc = run_cli("--profile", "smoke")
    assert proc.returncode == 0 and time.time() - t0 < 5
    assert proc.stdout.strip() == prepared["stdout"].strip()


def test_partial_outputs_not_taken_as_done(prepared, cache_dir):
    tdir = cache_dir / "smoke/offline/tokenizer"
    pkl = (tdir / "tokenizer.pkl").read_bytes()
    meta = json.loads((tdir / "meta.json").read_text())
    (tdir / "meta.json").unlink()
    (tdir / "meta.json.123.tmp").write_text('{"format": 1, "profile": "sm')
    (tdir / "token_bytes.pt.123.tmp").write_bytes(b"\x00" * 10)
    with pytest.raises(P.PrepareError, match="not prepared"):
        P.ensure_prepared("smoke", "offline")
    with pytest.raises(P.PrepareError, match="not prepared"):
        P.Tokenizer.load("smoke", "offline")

    assert P.prepare("smoke", "offline") == meta  # redone, the same result
    assert (tdir / "tokenizer.pkl").read_bytes() == pkl  # training is deterministic
    assert not list(tdir.glob("*.tmp"))

    (tdir / "tokenizer.pkl").unlink()  # meta.json present but a file missing
    with pytest.raises(P.PrepareError, match="not prepared"):
        P.ensure_prepared("smoke", "offline")
    P.prepare("smoke", "offline")
    assert (tdir / "tokenizer.pkl").read_bytes() == pkl

    # A corpus folder without its corpus.json is rebuilt, to the same hash.
    cdir = cache_dir / "data/offline" / meta["corpus_sha256"][:16]
    (cdir / "corpus.json").unlink()
    (cdir / "val_00000.parquet").write_bytes(b"PAR1 half-written")
    info = P.build_offline_corpus()
    assert info["sha256"] == meta["corpus_sha256"] and Path(info["dir"]) == cdir
    assert read_texts([cdir / "val_00000.parquet"])  # a real parquet file again
    assert P.ensure_prepared("smoke", "offline") == meta


# ---------------------------------------------------------------------------
# ClimbMix downloader against a local HTTP server
# ---------------------------------------------------------------------------


def parquet_bytes(texts):
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buf)
    return buf.getvalue()


class ShardServer:
    """Serves /<prefix>/shard_XXXXX.parquet from memory; can fail on purpose."""

    def __init__(self, prefix="/datasets/climbmix/resolve/main"):
        self.prefix = prefix
        self.files: dict[str, bytes] = {}
        self.fail_times: dict[str, int] = {}  # name -> answer 500 this many times
        self.requests: list[str] = []
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                with server.lock:
                    server.requests.append(self.path)
                    name = self.path.rsplit("/", 1)[-1]
                    failing = server.fail_times.get(name, 0)
                    if failing:
                        server.fail_times[name] = failing - 1
                body = server.files.get(name)
                if not self.path.startswith(server.prefix + "/") or body is None:
                    self.send_error(404)
                elif failing:
                    self.send_error(500)
                else:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}{prefix}"

    def count(self, name):
        return sum(r.endswith("/" + name) for r in self.requests)


@pytest.fixture
def server():
    s = ShardServer()
    for i in (0, 1, 2, 3, P.VAL_SHARD):
        s.files[P.shard_name(i)] = parquet_bytes([f"document {i} number {k}" for k in range(50)])
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def test_download_shards(server, tmp_path):
    assert P.shard_name(0) == "shard_00000.parquet"
    assert P.shard_name(P.VAL_SHARD) == "shard_06542.parquet" and P.MAX_SHARD == 6542
    paths = P.download_shards([0, 1, P.VAL_SHARD], tmp_path, base_url=server.url, backoff_s=0.001)
    assert [p.name for p in paths] == ["shard_00000.parquet", "shard_00001.parquet", "shard_06542.parquet"]
    for p in paths:
        assert p.read_bytes() == server.files[p.name]
    assert sorted(server.requests) == [
        f"{server.prefix}/shard_00000.parquet",
        f"{server.prefix}/shard_00001.parquet",
        f"{server.prefix}/shard_06542.parquet",
    ]
    # Present shards are skipped.
    P.download_shards([0, 1, P.VAL_SHARD], tmp_path, base_url=server.url)
    assert len(server.requests) == 3
    with pytest.raises(P.PrepareError, match="out of range"):
        P.download_shards([P.MAX_SHARD + 1], tmp_path, base_url=server.url)


def test_download_retries_then_succeeds(server, tmp_path):
    server.fail_times["shard_00002.parquet"] = 2
    (path,) = P.download_shards([2], tmp_path, base_url=server.url, backoff_s=0.001)
    assert server.count("shard_00002.parquet") == 3
    assert path.read_bytes() == server.files["shard_00002.parquet"]


def test_download_gives_up(server, tmp_path):
    server.fail_times["shard_00003.parquet"] = 10**6
    with pytest.raises(P.PrepareError) as e:
        P.download_shards([0, 3], tmp_path, base_url=server.url, max_attempts=3, backoff_s=0.001)
    msg = str(e.value)
    assert "shard_00003.parquet" in msg and f"{server.url}/shard_00003.parquet" in msg
    assert "3 attempt" in msg and "\n" not in msg
    assert server.count("shard_00003.parquet") == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard_00000.parquet"]  # no partials
    # 404 is not retried; a 200 that is not parquet is not kept.
    with pytest.raises(P.PrepareError, match="shard_00009.parquet"):
        P.download_shards([9], tmp_path, base_url=server.url, backoff_s=0.001)
    assert server.count("shard_00009.parquet") == 1
    server.files["shard_00004.parquet"] = b"<html>rate limited</html>"
    with pytest.raises(P.PrepareError, match="shard_00004.parquet"):
        P.download_shards([4], tmp_path, base_url=server.url, max_attempts=2, backoff_s=0.001)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard_00000.parquet"]


def test_climbmix_url_env_override(server, tmp_path, monkeypatch):
    monkeypatch.setenv("AR_CLIMBMIX_URL", server.url + "/")
    (path,) = P.download_shards([1], tmp_path, backoff_s=0.001)
    assert path.name == "shard_00001.parquet" and server.requests == [f"{server.prefix}/shard_00001.parquet"]
    monkeypatch.delenv("AR_CLIMBMIX_URL")
    assert P._climbmix_url() == P.CLIMBMIX_URL
    assert P.CLIMBMIX_URL.endswith("karpathy/climbmix-400b-shuffle/resolve/main")


def test_prepare_climbmix_end_to_end(server, prepared, cache_dir, monkeypatch):
    """prepare() for climbmix downloads train + val shards and trains on the train ones
    (real text: the offline corpus' shards stand in for ClimbMix shards)."""
    meta_off = P.ensure_prepared("smoke", "offline")
    train = P._shard_paths(meta_off, "train")
    server.files = {P.shard_name(i): p.read_bytes() for i, p in enumerate(train[:3])}
    val = P._shard_paths(meta_off, "val")[0]
    server.files[P.shard_name(P.VAL_SHARD)] = val.read_bytes()
    monkeypatch.setenv("AR_CLIMBMIX_URL", server.url)
    monkeypatch.setenv("AR_NUM_SHARDS", "2")

    meta = P.prepare("smoke", "climbmix")
    assert meta["train_shards"] == ["data/climbmix/shard_00000.parquet", "data/climbmix/shard_00001.parquet"]
    assert meta["val_shards"] == ["data/climbmix/shard_06542.parquet"]
    assert meta["tokenizer_shards"] == ["shard_00000.parquet", "shard_00001.parquet"]
    assert meta["vocab_size"] == 1024 and meta["data"] == "climbmix"
    assert sorted(p.name for p in (cache_dir / "data/climbmix").iterdir()) == [
        "shard_00000.parquet",
        "shard_00001.parquet",
        "shard_06542.parquet",
    ]
    n_requests = len(server.requests)
    assert P.prepare("smoke", "climbmix") == meta and len(server.requests) == n_requests
    monkeypatch.delenv("AR_NUM_SHARDS")
    assert P.prepare("smoke", "climbmix") == meta  # no explicit count: keep what is there

    ctok = P.Tokenizer.load("smoke", "climbmix")
    x, y, _ = next(P.make_dataloader(ctok, 4, 128, "val", "smoke", "climbmix", "cpu"))
    assert (x[:, 0] == ctok.get_bos_token_id()).all()
    assert math.isfinite(P.evaluate_bpb(TinyLM(), ctok, 8, "smoke", "climbmix", "cpu"))

    meta3 = P.prepare("smoke", "climbmix", num_shards=3)  # grow: one more download
    assert len(meta3["train_shards"]) == 3 and server.count("shard_00002.parquet") == 1
    assert server.count("shard_00000.parquet") == 1
