"""check_val_split: a validation split too small for the evaluation is reported, not silently measured."""

import os
import shutil

import pytest

import prepare
from conftest import make_documents, point_prepare_at, write_shard
from naive_dataloader import naive_pack, naive_token_batches

T = 32


@pytest.fixture
def val_cache(prepared_cache, tmp_path, monkeypatch):
    """A cache with the prepared tokenizer and training shards, and a validation shard the test writes."""
    cache = tmp_path / "cache"
    shutil.copytree(os.path.join(prepared_cache, "tokenizer"), cache / "tokenizer")
    (cache / "data").mkdir(parents=True)
    shutil.copy(os.path.join(prepared_cache, "data", prepare.shard_filename(0)), cache / "data")
    point_prepare_at(monkeypatch, cache)
    monkeypatch.setattr(prepare, "MAX_SEQ_LEN", T)

    def write_val(docs):
        write_shard(os.path.join(prepare.DATA_DIR, prepare.VAL_FILENAME), docs)
        return prepare.Tokenizer.from_directory()
    return write_val


def by_hand(tokenizer, docs, rows, buffer_size):
    """(tokens in the split with BOS, distinct rows among the evaluation's first `rows`), the naive way."""
    tokens = sum(len(tokenizer.encode(d)) + 1 for d in docs)
    path = os.path.join(prepare.DATA_DIR, prepare.VAL_FILENAME)
    packed = naive_pack(naive_token_batches([path], tokenizer), 1, T, buffer_size)
    distinct = {tuple(next(packed)[0][0].tolist()) for _ in range(rows)}
    return tokens, len(distinct)


def test_tiny_val_shard_warns_with_its_counts(val_cache, monkeypatch):
    docs = make_documents(30, seed=5)
    tokenizer = val_cache(docs)
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 64 * T)  # 64 rows
    tokens, distinct = by_hand(tokenizer, docs, 64, 1000)
    assert distinct < 64  # the loader cycled 30 documents: rows repeat

    message = prepare.check_val_split(tokenizer)
    assert message.startswith("WARNING: the validation split")
    assert "30 documents" in message and f"{tokens:,} tokens" in message
    assert "1,000 documents buffered" in message and f"EVAL_TOKENS {64 * T:,}" in message
    assert f"{distinct:,} distinct rows of 64" in message and "not comparable" in message
    assert len(message.splitlines()) == 2 and all(line.startswith("WARNING") for line in message.splitlines())


def test_enough_documents_but_too_few_tokens_warns(val_cache, monkeypatch):
    docs = make_documents(50, seed=6, mean_chars=80)
    tokenizer = val_cache(docs)
    tokens, _ = by_hand(tokenizer, docs, 1, 10)
    rows = tokens // T + 5  # a little more than the split holds
    monkeypatch.setattr(prepare, "EVAL_TOKENS", rows * T)
    message = prepare.check_val_split(tokenizer, buffer_size=10)
    assert message.startswith("WARNING") and "50 documents" in message and f"{tokens:,} tokens" in message


def test_large_enough_split_says_one_line(val_cache, monkeypatch):
    docs = make_documents(400, seed=7)
    tokenizer = val_cache(docs)
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 40 * T + 3)  # 40 rows
    _, distinct = by_hand(tokenizer, docs, 40, 50)
    assert distinct == 40
    message = prepare.check_val_split(tokenizer, buffer_size=50)
    assert message == "Validation split: 400 documents; the evaluation reads 40 distinct rows of 40"
    # the same split is too small for the default buffer of 1,000 documents
    assert prepare.check_val_split(tokenizer).startswith("WARNING")


def test_many_repeated_rows_warn_even_with_enough_documents(val_cache, monkeypatch):
    docs = ["the same short document, again and again"] * 200  # identical documents: identical rows
    tokenizer = val_cache(docs)
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 20 * T)
    message = prepare.check_val_split(tokenizer, buffer_size=50)
    assert message.startswith("WARNING") and "200 documents" in message and "distinct rows of 20" in message



def test_answer_is_kept_until_the_shard_changes(val_cache, monkeypatch):
    tokenizer = val_cache(make_documents(30, seed=9))
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 64 * T)
    first = prepare.check_val_split(tokenizer)

    def no_repack(*args):
        raise AssertionError("repacked the evaluation rows although nothing changed")
    with monkeypatch.context() as m:
        m.setattr(prepare, "_val_split_report", no_repack)
        assert prepare.check_val_split(tokenizer) == first  # train.py's start: read from val_check.json
        with pytest.raises(AssertionError, match="repacked"):
            prepare.check_val_split(tokenizer, buffer_size=10)  # another constant: computed again
    docs = make_documents(1200, seed=10)
    tokenizer = val_cache(docs)  # a new validation shard
    assert prepare.check_val_split(tokenizer) != first
