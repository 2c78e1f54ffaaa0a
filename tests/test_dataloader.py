"""make_dataloader against a naive implementation of the reference's algorithm (tests/naive_dataloader.py)."""

import itertools
import os
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import prepare
from conftest import make_documents, write_corpus, write_shard
from naive_dataloader import naive_dataloader, naive_pack


def data_paths(split):
    names = sorted(f for f in os.listdir(prepare.DATA_DIR) if f.endswith(".parquet"))
    paths = [os.path.join(prepare.DATA_DIR, n) for n in names]
    val = os.path.join(prepare.DATA_DIR, prepare.VAL_FILENAME)
    return [val] if split == "val" else [p for p in paths if p != val]


def take(loader, n):
    """n batches as (inputs, targets, epoch) with the tensors cloned (the loader reuses its buffers)."""
    return [(x.clone(), y.clone(), e) for x, y, e in itertools.islice(loader, n)]


def assert_same_batches(ours, ref):
    assert len(ours) == len(ref)
    for k, ((x, y, e), (rx, ry, re)) in enumerate(zip(ours, ref)):
        assert torch.equal(x, rx), f"inputs differ at batch {k}"
        assert torch.equal(y, ry), f"targets differ at batch {k}"
        assert e == re, f"epoch differs at batch {k}: {e} != {re}"


# ---------------------------------------------------------------------------
# The real loader on the synthetic corpus, with the trained tokenizer
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("B,T,buffer_size,n", [(4, 64, 1000, 30), (3, 200, 37, 30), (2, 512, 5, 30), (8, 16, 1000, 10)])
def test_train_batches_equal_naive(tokenizer, B, T, buffer_size, n):
    ours = take(prepare.make_dataloader(tokenizer, B, T, "train", buffer_size=buffer_size), n)
    ref = take(naive_dataloader(data_paths("train"), tokenizer, B, T, buffer_size), n)
    assert_same_batches(ours, ref)


def test_val_batches_equal_naive(tokenizer):
    ours = take(prepare.make_dataloader(tokenizer, 4, 128, "val", buffer_size=100), 20)
    ref = take(naive_dataloader(data_paths("val"), tokenizer, 4, 128, 100), 20)
    assert_same_batches(ours, ref)


def test_batch_contract(tokenizer):
    B, T = 5, 96
    bos = tokenizer.get_bos_token_id()
    for x, y, epoch in take(prepare.make_dataloader(tokenizer, B, T, "train"), 10):
        assert x.shape == y.shape == (B, T)
        assert x.dtype == y.dtype == torch.int64
        assert x.device.type == y.device.type == prepare.DEVICE_TYPE
        assert x.is_contiguous() and y.is_contiguous()
        assert (x[:, 0] == bos).all(), "every row starts with BOS"
        assert torch.equal(x[:, 1:], y[:, :-1]), "targets are the inputs shifted by one"
        assert epoch == 1
        assert 0 <= int(x.min()) and int(x.max()) < tokenizer.get_vocab_size()


def test_buffers_are_reused(tokenizer):
    # documented contract: the next batch overwrites the tensors of the previous one
    loader = prepare.make_dataloader(tokenizer, 2, 32, "train")
    x1, y1, _ = next(loader)
    x2, y2, _ = next(loader)
    assert x1.data_ptr() == x2.data_ptr() and y1.data_ptr() == y2.data_ptr()


def test_bad_arguments(tokenizer):
    with pytest.raises(ValueError):
        next(prepare.make_dataloader(tokenizer, 2, 32, "train", buffer_size=0))
    with pytest.raises(AssertionError):
        next(prepare.make_dataloader(tokenizer, 2, 32, "test"))


def test_missing_val_shard_raises_in_caller(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "DATA_DIR", str(tmp_path / "data"))
    os.makedirs(prepare.DATA_DIR)
    write_shard(os.path.join(prepare.DATA_DIR, prepare.shard_filename(0)), ["only training text"] * 3)
    with pytest.raises(SystemExit, match="validation shard"):
        next(prepare.make_dataloader(tokenizer, 2, 32, "val"))
    next(prepare.make_dataloader(tokenizer, 2, 32, "train"))


def test_token_batches_equal_reference_encode(tokenizer, tmp_path, monkeypatch):
    # the loader tokenizes with encode_to_numpy in its own thread pool; the reference with
    # encode(texts, prepend=BOS): same ids, special-token text included (encoded as ordinary text)
    monkeypatch.setattr(prepare, "DATA_DIR", str(tmp_path / "data"))
    os.makedirs(prepare.DATA_DIR)
    docs = make_documents(150, seed=3) + ["a <|reserved_0|> b", "<|reserved_3|>", "", " ", "é\n\n\tx"]
    write_shard(os.path.join(prepare.DATA_DIR, prepare.shard_filename(0)), docs)
    batches = prepare._token_batches(tokenizer, "train")
    got = [ids for _, (ids_batch, _) in zip(range(3), batches) for ids in ids_batch]  # row groups of 64
    batches.close()
    assert len(got) == len(docs)
    for text, ids in zip(docs, got):
        assert ids.dtype == np.uint32
        assert ids.tolist() == tokenizer.encode(text)


# ---------------------------------------------------------------------------
# The reader thread and the tokenizer pool that run ahead of the packer
# ---------------------------------------------------------------------------

def loader_threads():
    return [t for t in threading.enumerate() if t.name.startswith(("dataloader-prefetch", "dataloader-tokenizer"))]


def test_prefetch_keeps_order_and_ends():
    assert list(prepare._prefetch(iter(range(100)), depth=3)) == list(range(100))
    assert list(prepare._prefetch(iter([]))) == []
    assert not loader_threads()


def test_prefetch_reraises_in_consumer():
    def items():
        yield from range(3)
        raise SystemExit("no shards")

    got = []
    with pytest.raises(SystemExit, match="no shards"):
        for item in prepare._prefetch(items()):
            got.append(item)
    assert got == [0, 1, 2]
    assert not loader_threads()


def test_prefetch_runs_ahead_bounded_and_stops_on_close():
    produced = []

    def items():
        for i in itertools.count():
            produced.append(i)
            yield i

    depth = 2
    stream = prepare._prefetch(items(), depth=depth)
    assert next(stream) == 0
    deadline = time.monotonic() + 10
    # ahead of the consumer: depth items queued plus one in the worker's hand
    while len(produced) < depth + 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    assert len(produced) == depth + 2
    assert [next(stream) for _ in range(5)] == [1, 2, 3, 4, 5]
    stream.close()
    assert not loader_threads()
    n = len(produced)
    time.sleep(0.3)
    assert len(produced) == n


def test_token_batches_read_ahead_bounded_and_close_stops_threads(tokenizer, monkeypatch):
    read = []

    def document_batches(split):
        for i in itertools.count():
            read.append(i)
            yield [f"document {i} part {j}" for j in range(5)], 1

    monkeypatch.setattr(prepare, "_document_batches", document_batches)
    ahead = 3
    batches = prepare._token_batches(tokenizer, "train", ahead=ahead)
    ids, _ = next(batches)
    assert [a.tolist() for a in ids] == [tokenizer.encode(f"document 0 part {j}") for j in range(5)]
    deadline = time.monotonic() + 10
    # queued on the pool: `ahead` batches waiting in the queue plus one in the reader's hand
    while len(read) < ahead + 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    assert len(read) == ahead + 2
    for i in range(1, 8):
        ids, _ = next(batches)
        assert tokenizer.decode(ids[4].tolist()) == f"document {i} part 4"
    batches.close()
    assert not loader_threads()
    n = len(read)
    time.sleep(0.3)
    assert len(read) == n


def test_token_batches_tokenizer_error_raises_in_consumer(tokenizer, monkeypatch):
    def document_batches(split):
        yield ["fine"], 1
        yield ["fine", None], 1  # tiktoken rejects a non-str: the error reaches the packer's thread
        yield ["never"], 1

    monkeypatch.setattr(prepare, "_document_batches", document_batches)
    batches = prepare._token_batches(tokenizer, "train")
    assert next(batches)[0][0].tolist() == tokenizer.encode("fine")
    with pytest.raises(TypeError):
        next(batches)
    assert not loader_threads()


# ---------------------------------------------------------------------------
# Epochs and the split boundary, on tiny corpora
# ---------------------------------------------------------------------------

def test_document_batches_epochs(tmp_path, monkeypatch):
    prepare_dir = tmp_path / "cache"
    monkeypatch.setattr(prepare, "DATA_DIR", str(prepare_dir / "data"))
    write_corpus(prepare.DATA_DIR, num_train=2, docs_per_shard=150)  # 150 docs = 3 row groups of 64, 64, 22
    one_pass = [make_documents(150, seed=0), make_documents(150, seed=1)]
    batches = list(itertools.islice(prepare._document_batches("train"), 3 * 6))
    assert [len(t) for t, _ in batches[:6]] == [64, 64, 22] * 2, "batches stay within a row group"
    assert [e for _, e in batches] == [1] * 6 + [2] * 6 + [3] * 6
    for epoch in range(3):
        texts = [t for ts, _ in batches[6 * epoch:6 * epoch + 6] for t in ts]
        assert texts == one_pass[0] + one_pass[1], "each pass reads every training document once, in order"


def test_loader_epoch_counts_full_passes(tokenizer, tmp_path, monkeypatch):
    # 2 shards x 20 long documents; B=1, T=8, buffer_size=1: each batch crops exactly one
    # document, and a fetch (one row group = 20 docs) happens only when the buffer is empty.
    # So batch k comes from pass 1 + k // 40 and every pass uses each document exactly once.
    monkeypatch.setattr(prepare, "DATA_DIR", str(tmp_path / "data"))
    os.makedirs(prepare.DATA_DIR)
    docs = [make_documents(20, seed=s, mean_chars=400) for s in (5, 6)]
    for i, shard in enumerate(docs):
        write_shard(os.path.join(prepare.DATA_DIR, prepare.shard_filename(i)), [d + " tail" for d in shard])
    write_shard(os.path.join(prepare.DATA_DIR, prepare.VAL_FILENAME), ["zebra " * 50] * 10)
    all_docs = [d + " tail" for shard in docs for d in shard]
    bos = tokenizer.get_bos_token_id()
    prefixes = sorted(tuple(ids[:9]) for ids in tokenizer.encode(all_docs, prepend=bos))
    assert all(len(p) == 9 for p in prefixes)

    batches = take(prepare.make_dataloader(tokenizer, 1, 8, "train", buffer_size=1), 120)
    assert [e for _, _, e in batches] == [1 + k // 40 for k in range(120)]
    for p in range(3):
        rows = [tuple(x[0].tolist()) + (int(y[0, -1]),) for x, y, _ in batches[40 * p:40 * (p + 1)]]
        assert sorted(rows) == prefixes
    assert_same_batches(batches, take(naive_dataloader(data_paths("train"), tokenizer, 1, 8, 1), 120))


@pytest.fixture
def opened_files(monkeypatch):
    """Paths of every parquet file opened through pq.ParquetFile during the test."""
    opened = []
    real = pq.ParquetFile

    def spy(source, *args, **kwargs):
        opened.append(os.path.abspath(source))
        return real(source, *args, **kwargs)

    monkeypatch.setattr(pq, "ParquetFile", spy)
    return opened


def test_val_split_isolation(tokenizer, tmp_path, monkeypatch, opened_files):
    monkeypatch.setattr(prepare, "DATA_DIR", str(tmp_path / "data"))
    write_corpus(prepare.DATA_DIR, num_train=2, docs_per_shard=30)
    # the validation shard gets content that no training document has
    val_docs = [("zebra " * (3 + i % 40)).strip() for i in range(30)]
    write_shard(os.path.join(prepare.DATA_DIR, prepare.VAL_FILENAME), val_docs)
    val_path = os.path.abspath(os.path.join(prepare.DATA_DIR, prepare.VAL_FILENAME))

    train = take(prepare.make_dataloader(tokenizer, 4, 64, "train", buffer_size=20), 40)
    assert max(e for _, _, e in train) >= 3, "several passes over the training shards"
    assert opened_files and val_path not in opened_files
    assert all("zebra" not in tokenizer.decode(x[r].tolist()) for x, _, _ in train for r in range(4))

    opened_files.clear()
    val = take(prepare.make_dataloader(tokenizer, 4, 64, "val", buffer_size=20), 20)
    assert set(opened_files) == {val_path}
    assert max(e for _, _, e in val) >= 2, "the val split cycles over its one shard"
    for x, _, _ in val:
        for r in range(4):
            assert tokenizer.decode(x[r, 1:].tolist()).startswith("zebra")


# ---------------------------------------------------------------------------
# The packer alone, against the naive one, on synthetic token lists
# ---------------------------------------------------------------------------

BOS = 8191


def synthetic_batches(lengths, batch_size):
    """Cycle forever over documents of the given lengths, batch_size per fetch (the last batch of
    a pass may be shorter), epoch from 1. Document i is BOS followed by tokens unique to (i, pos)."""
    docs = [[BOS] + [i * 10_000 + j for j in range(1, n)] for i, n in enumerate(lengths)]
    epoch = 1
    while True:
        for start in range(0, len(docs), batch_size):
            yield docs[start:start + batch_size], epoch
        epoch += 1


def without_bos(batches):
    # our packer takes documents as the loader's tokenizer gives them: uint32 arrays without BOS
    for docs, epoch in batches:
        yield [np.array(doc[1:], dtype=np.uint32) for doc in docs], epoch


def assert_pack_equal(lengths, B, T, buffer_size, batch_size, n_batches):
    ours = prepare._pack_rows(without_bos(synthetic_batches(lengths, batch_size)), BOS, B, T, buffer_size)
    ref = naive_pack(synthetic_batches(lengths, batch_size), B, T, buffer_size)
    for k in range(n_batches):
        rows, epoch = next(ours)
        ref_rows, ref_epoch = next(ref)
        assert rows.shape == (B, T + 1) and rows.dtype.name == "int64"
        assert torch.equal(torch.from_numpy(rows.copy()), ref_rows), f"rows differ at batch {k}"
        assert epoch == ref_epoch, f"epoch differs at batch {k}"
        assert (rows[:, 0] == BOS).all()


@st.composite
def packing_cases(draw):
    T = draw(st.integers(1, 80))
    cap = T + 1
    # a few length distributions: one-token documents, short ones, around the row size,
    # longer than a row, and mixtures of them
    length = st.one_of(
        st.just(1),
        st.integers(1, max(1, cap // 4)),
        st.integers(1, cap),
        st.integers(cap, 3 * cap + 5),
        st.sampled_from([1, 2, cap - 1 or 1, cap, cap + 1]),
    )
    lengths = draw(st.lists(length, min_size=1, max_size=60))
    return dict(lengths=lengths, T=T,
                B=draw(st.integers(1, 4)),
                buffer_size=draw(st.integers(1, 40)),
                batch_size=draw(st.integers(1, 20)))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(packing_cases())
@example(dict(lengths=[1] * 7, T=3, B=2, buffer_size=3, batch_size=2))               # only one-token docs
@example(dict(lengths=[50, 40, 45, 50], T=8, B=3, buffer_size=2, batch_size=1))     # all longer than T+1
@example(dict(lengths=[3, 3, 5, 5, 3, 9, 1], T=9, B=2, buffer_size=4, batch_size=3))  # many ties
@example(dict(lengths=[2049, 1, 700, 1300, 2048, 2050], T=2048, B=2, buffer_size=3, batch_size=2))
def test_pack_equals_naive(case):
    assert_pack_equal(n_batches=15, **case)


@pytest.mark.parametrize("T", [256, 2048])
def test_pack_equals_naive_web_like(T):
    # a realistic buffer: 1000 documents with lognormal (web-like) lengths, several epochs
    import random
    rng = random.Random(T)
    lengths = [max(1, min(20_000, int(rng.lognormvariate(5.5, 1.0)))) for _ in range(1300)]
    B = 16 if T == 256 else 4
    assert_pack_equal(lengths, B, T, 1000, 128, n_batches=40 if T == 256 else 20)
