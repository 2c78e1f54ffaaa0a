"""Tokenizer training and the Tokenizer wrapper, as the reference builds them."""

import os

import pytest
import regex
import torch

import prepare
from conftest import make_documents, point_prepare_at, write_shard

SPECIALS = [f"<|reserved_{i}|>" for i in range(4)]


# ---------------------------------------------------------------------------
# The trained tokenizer (session fixture: trained on the synthetic corpus)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "Hello world, plain ASCII text.",
    "0 7 42 123 4567 89012 3.14159 2026-03-05",
    "你好世界，这是一个测试。日本語もどうぞ",
    "Mixed: ünïcödé café 12 你好 ' tis\n\n\ttabs  and   spaces 🙂 end",
    "",
])
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tokenizer.decode(ids) == text


def test_vocab_and_special_tokens(tokenizer):
    enc = tokenizer.enc
    assert tokenizer.get_vocab_size() == prepare.VOCAB_SIZE == 8192
    # the 4 specials are the last 4 ids, in order, after 8188 mergeable tokens
    assert len(enc._mergeable_ranks) == 8188
    for i, name in enumerate(SPECIALS):
        assert enc.encode_single_token(name) == 8188 + i
        assert enc.encode(name, allowed_special="all") == [8188 + i]
    assert sorted(enc._mergeable_ranks.values()) == list(range(8188))
    assert tokenizer.get_bos_token_id() == enc.encode_single_token("<|reserved_0|>") == 8188


def test_special_token_text_is_not_a_special_token(tokenizer):
    # documents are encoded as ordinary text: a literal "<|reserved_0|>" in a document is not BOS
    ids = tokenizer.encode("a <|reserved_0|> b")
    assert 8188 not in ids
    assert tokenizer.decode(ids) == "a <|reserved_0|> b"


def test_token_bytes(tokenizer):
    token_bytes = prepare.get_token_bytes()
    assert token_bytes.dtype == torch.int32
    assert token_bytes.shape == (8192,)
    enc = tokenizer.enc
    expected = []
    for i in range(8192):
        if i >= 8188:
            expected.append(0)
        else:
            raw = enc.decode_single_token_bytes(i)
            expected.append(len(raw.decode("utf-8", errors="replace").encode("utf-8")))
    assert token_bytes.tolist() == expected
    assert (token_bytes[:8188] > 0).all()
    # a lone continuation byte decodes to U+FFFD, counted as its 3 UTF-8 bytes
    lone = enc.encode_single_token(b"\x80")
    assert token_bytes[lone].item() == 3
    assert token_bytes[enc.encode_single_token(b"a")].item() == 1


def test_encode_list_equals_per_string(tokenizer):
    texts = make_documents(20, seed=99) + ["", "你好 12345", "x"]
    batch = tokenizer.encode(texts)
    assert batch == [tokenizer.encode(t) for t in texts]
    assert tokenizer.encode(texts, num_threads=1) == batch


def test_prepend_id_or_special_string(tokenizer):
    bos = tokenizer.get_bos_token_id()
    text = "some text 12"
    plain = tokenizer.encode(text)
    assert tokenizer.encode(text, prepend=bos) == [bos] + plain
    assert tokenizer.encode(text, prepend="<|reserved_0|>") == [bos] + plain
    assert tokenizer.encode(text, prepend="<|reserved_2|>") == [8190] + plain
    texts = ["one", "two three", ""]
    assert tokenizer.encode(texts, prepend="<|reserved_0|>") == [[bos] + tokenizer.encode(t) for t in texts]
    assert tokenizer.encode(texts, prepend=8191) == [[8191] + tokenizer.encode(t) for t in texts]
    with pytest.raises(TypeError):
        tokenizer.encode(b"bytes are not text")


def test_split_regex_digit_groups(tokenizer):
    assert tokenizer.enc._pat_str == prepare.SPLIT_PATTERN
    assert regex.findall(prepare.SPLIT_PATTERN, "abc 12345") == ["abc", " ", "12", "34", "5"]
    assert regex.findall(prepare.SPLIT_PATTERN, "x1y22z333") == ["x", "1", "y", "22", "z", "33", "3"]
    assert regex.findall(prepare.SPLIT_PATTERN, "I'll go") == ["I", "'ll", " go"]
    # no token of an encoded number spans more than 2 digits
    for ids in tokenizer.encode(["1234567890", "20260305", "7 77 777 7777"]):
        for i in ids:
            piece = tokenizer.decode([i]).strip()
            assert not (piece.isdigit() and len(piece) > 2), piece


# ---------------------------------------------------------------------------
# text_iterator and train_tokenizer on hand-made corpora
# ---------------------------------------------------------------------------

def test_text_iterator_crops_and_stops(tmp_path, monkeypatch):
    point_prepare_at(monkeypatch, tmp_path)
    os.makedirs(prepare.DATA_DIR)
    shard0 = ["a" * 25_000, "b" * 50, "c" * 10_000, "d" * 10_001, "e" * 7]
    shard1 = ["f" * 300, "g" * 12_345, "h" * 5]
    write_shard(os.path.join(prepare.DATA_DIR, prepare.shard_filename(0)), shard0, row_group_size=2)
    write_shard(os.path.join(prepare.DATA_DIR, prepare.shard_filename(1)), shard1, row_group_size=2)
    write_shard(os.path.join(prepare.DATA_DIR, prepare.VAL_FILENAME), ["VAL" * 100] * 3)

    cropped = [d[:10_000] for d in shard0 + shard1]
    # everything: the training docs in order, each cropped to 10,000 characters, no val doc
    assert list(prepare.text_iterator()) == cropped
    # stop as soon as the characters read reach max_chars (the document that crosses it is included)
    for max_chars in (1, 10_000, 10_001, 10_050, 20_050, 30_050, 30_051, 40_057):
        expected, n = [], 0
        for d in cropped:
            expected.append(d)
            n += len(d)
            if n >= max_chars:
                break
        assert list(prepare.text_iterator(max_chars=max_chars)) == expected, max_chars
    assert len(list(prepare.text_iterator(max_chars=10_050))) == 2
    assert len(list(prepare.text_iterator(max_chars=10_051))) == 3


def test_tokenizer_never_sees_the_validation_shard(tmp_path, monkeypatch):
    # Two words over alphabets that the filler text never uses: one only in a training
    # shard, one only in the validation shard, equally frequent. BPE merges the first
    # into (nearly) one token and leaves the second as one token per byte.
    point_prepare_at(monkeypatch, tmp_path)
    os.makedirs(prepare.DATA_DIR)
    train_word, val_word = "jxxjjxjxjjjxxj", "JXHUYJXHUYHJUX"
    filler = make_documents(150, seed=5, mean_chars=300)
    write_shard(os.path.join(prepare.DATA_DIR, prepare.shard_filename(0)), filler)
    write_shard(os.path.join(prepare.DATA_DIR, prepare.shard_filename(1)),
                [" ".join([train_word] * 20) for _ in range(100)])
    write_shard(os.path.join(prepare.DATA_DIR, prepare.VAL_FILENAME),
                [" ".join([val_word] * 20) for _ in range(100)] + filler[:10])
    assert not any(val_word in d for d in prepare.text_iterator())
    prepare.train_tokenizer()
    tok = prepare.Tokenizer.from_directory()
    assert len(tok.encode(" " + train_word)) <= 2
    assert len(tok.encode(" " + val_word)) == len(val_word) + 1


def test_train_tokenizer_needs_two_shards(tmp_path, monkeypatch):
    point_prepare_at(monkeypatch, tmp_path)
    os.makedirs(prepare.DATA_DIR)
    write_shard(os.path.join(prepare.DATA_DIR, prepare.shard_filename(0)), make_documents(20))
    with pytest.raises(SystemExit):
        prepare.train_tokenizer()
    assert not os.path.exists(os.path.join(prepare.TOKENIZER_DIR, "tokenizer.pkl"))


def test_train_tokenizer_skips_when_trained(cache, capsys):
    pkl = os.path.join(prepare.TOKENIZER_DIR, "tokenizer.pkl")
    before = os.path.getmtime(pkl)
    prepare.train_tokenizer()
    assert os.path.getmtime(pkl) == before
    assert "already trained" in capsys.readouterr().out
