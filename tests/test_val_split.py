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


def by_hand(tokenizer, docs, rows, buffer_size, cycled=False):
    """(tokens in the split with BOS, distinct rows among the evaluation's first `rows`), the naive way;
    with cycled=True also whether those rows needed a second pass over the split."""
    tokens = sum(len(tokenizer.encode(d)) + 1 for d in docs)
    path = os.path.join(prepare.DATA_DIR, prepare.VAL_FILENAME)
    packed = naive_pack(naive_token_batches([path], tokenizer), 1, T, buffer_size)
    distinct, epochs = set(), set()
    for _ in range(rows):
        row, epoch = next(packed)
        distinct.add(tuple(row[0].tolist()))
        epochs.add(epoch)
    return (tokens, len(distinct), max(epochs) > 1) if cycled else (tokens, len(distinct))


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


def test_token_clause_alone_decides_at_exactly_eval_tokens(val_cache, monkeypatch):
    """A split that passes the documents and distinct-rows clauses: it warns iff it holds fewer than EVAL_TOKENS."""
    docs = make_documents(300, seed=11, mean_chars=40)
    tokenizer = val_cache(docs)
    tokens, _ = by_hand(tokenizer, docs, 1, 100)
    for eval_tokens in (tokens, tokens + 1):
        rows = eval_tokens // T
        _, distinct, cycled = by_hand(tokenizer, docs, rows, 100, cycled=True)
        assert cycled and distinct >= prepare.MIN_DISTINCT_ROWS * rows  # only the token clause can object
        monkeypatch.setattr(prepare, "EVAL_TOKENS", eval_tokens)
        message = prepare.check_val_split(tokenizer, buffer_size=100)
        counts = f"300 documents, {tokens:,} tokens"
        if eval_tokens == tokens:
            assert message == f"Validation split: {counts}; the evaluation reads {distinct:,} distinct rows of {rows:,}"
        else:
            assert message.startswith("WARNING: the validation split") and counts in message, message


def long_documents(tokenizer, n, seed):
    """n distinct documents of more than T tokens each, sorted by token count (the packer's order of choice)."""
    docs = [d for d in make_documents(4 * n, seed=seed, mean_chars=800) if len(tokenizer.encode(d)) > T + 8]
    docs = sorted(set(docs), key=lambda d: len(tokenizer.encode(d)))[:n]
    assert len(docs) == n
    return docs


@pytest.mark.parametrize("repeats, warns", [(2, False), (3, True)])
def test_distinct_rows_threshold_is_ninety_percent(val_cache, monkeypatch, repeats, warns):
    """Documents longer than a row: each row is the start of one document, the shortest buffered first, so
    repeating the shortest documents repeats rows. 18 distinct rows of 20 is enough, 17 is not."""
    tokenizer = prepare.Tokenizer.from_directory()
    distinct_docs = long_documents(tokenizer, 60, seed=12)
    docs = distinct_docs[:repeats] + distinct_docs  # the copies come first: they are picked first among equals
    val_cache(docs)
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 20 * T)
    tokens, distinct, cycled = by_hand(tokenizer, docs, 20, 10, cycled=True)
    assert distinct == 20 - repeats and not cycled
    message = prepare.check_val_split(tokenizer, buffer_size=10)
    assert f"{distinct} distinct rows of 20" in message
    assert message.startswith("WARNING") == warns, message



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
        for constant, value in [("EVAL_TOKENS", 32 * T), ("MAX_SEQ_LEN", T // 2)]:
            with monkeypatch.context() as changed:
                changed.setattr(prepare, constant, value)
                with pytest.raises(AssertionError, match="repacked"):
                    prepare.check_val_split(tokenizer)
    docs = make_documents(1200, seed=10)
    tokenizer = val_cache(docs)  # a new validation shard
    assert prepare.check_val_split(tokenizer) != first
