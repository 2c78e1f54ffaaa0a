"""Shared test fixtures: a synthetic corpus in the ClimbMix shard layout and a trained tokenizer.

Tests never touch the network or ../shared: they write their own small shards.
Every test runs on the CPU profile (AUTORESEARCH_DEVICE=cpu) so results do not
depend on the machine.
"""

import os
import random
import sys

os.environ["AUTORESEARCH_DEVICE"] = "cpu"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402

import prepare  # noqa: E402

SYLLABLES = ["ka", "to", "ri", "men", "sa", "lu", "pe", "dor", "qui", "na", "ve", "sho", "tra", "el", "ny", "ae",
             "bro", "zi", "gu", "ph", "ist", "ou", "wey", "cal", "moor", "fen", "th", "ing", "ed", "ly"]
EXTRAS = [",", ".", "!", "?", ";", " -", " 12", " 7", " 2026", " ünïcödé", " 你好", " 世界", "\n", "\n\n", " (x)", " 'tis"]


def make_documents(n, seed=0, mean_chars=600):
    """n pseudo-text documents of varied length (about 20 to 4000 characters)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        target = max(20, min(4000, int(rng.lognormvariate(0, 1) * mean_chars)))
        parts, size = [], 0
        while size < target:
            word = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4)))
            if rng.random() < 0.1:
                word = word.capitalize()
            piece = " " + word + (rng.choice(EXTRAS) if rng.random() < 0.15 else "")
            parts.append(piece)
            size += len(piece)
        docs.append("".join(parts).strip())
    return docs


def write_shard(path, docs, row_group_size=64):
    """Write docs as a parquet shard with one string column `text`."""
    pq.write_table(pa.table({"text": pa.array(docs, type=pa.string())}), path, row_group_size=row_group_size)


def write_corpus(data_dir, num_train=3, docs_per_shard=400, seed=0):
    """Training shards 0..num_train-1 plus the validation shard, as prepare.py lays them out."""
    os.makedirs(data_dir, exist_ok=True)
    for i in range(num_train):
        write_shard(os.path.join(data_dir, prepare.shard_filename(i)), make_documents(docs_per_shard, seed=seed + i))
    write_shard(os.path.join(data_dir, prepare.VAL_FILENAME), make_documents(docs_per_shard, seed=seed + 1000))


def point_prepare_at(monkeypatch, cache_dir):
    """Redirect prepare's cache to cache_dir for this test."""
    monkeypatch.setattr(prepare, "CACHE_DIR", str(cache_dir))
    monkeypatch.setattr(prepare, "DATA_DIR", os.path.join(str(cache_dir), "data"))
    monkeypatch.setattr(prepare, "TOKENIZER_DIR", os.path.join(str(cache_dir), "tokenizer"))


@pytest.fixture(scope="session")
def prepared_cache(tmp_path_factory):
    """A cache dir with a synthetic corpus and a tokenizer trained on it (built once per session)."""
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    point_prepare_at(mp, cache)
    write_corpus(prepare.DATA_DIR)
    prepare.train_tokenizer()
    mp.undo()
    return str(cache)


@pytest.fixture
def cache(prepared_cache, monkeypatch):
    """prepare pointed at the shared prepared cache for one test."""
    point_prepare_at(monkeypatch, prepared_cache)
    return prepared_cache


@pytest.fixture
def tokenizer(cache):
    return prepare.Tokenizer.from_directory()
