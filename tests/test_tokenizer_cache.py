"""The tokenizer cache: written atomically; a broken pair is retrained by prepare.py, refused by train.py's loaders."""

import os
import pickle
import shutil

import pytest
import torch

import prepare
from conftest import point_prepare_at


@pytest.fixture
def own_cache(prepared_cache, tmp_path, monkeypatch):
    """A private copy of the prepared cache (shards and a trained tokenizer) that a test may break."""
    shutil.copytree(prepared_cache, tmp_path / "cache")
    point_prepare_at(monkeypatch, tmp_path / "cache")
    return tmp_path / "cache" / "tokenizer"


def test_valid_pair_loads_and_is_not_retrained(own_cache, capsys):
    enc, token_bytes = prepare.load_tokenizer_files()
    assert enc.n_vocab == len(token_bytes) == prepare.VOCAB_SIZE
    before = (own_cache / "tokenizer.pkl").stat().st_mtime_ns
    prepare.train_tokenizer()
    assert "already trained" in capsys.readouterr().out
    assert (own_cache / "tokenizer.pkl").stat().st_mtime_ns == before
    assert prepare.get_token_bytes().dtype == torch.int32


def _break(own_cache, how):
    if how == "no token_bytes":
        os.remove(own_cache / "token_bytes.pt")
    elif how == "no tokenizer":
        os.remove(own_cache / "tokenizer.pkl")
    elif how == "vocab mismatch":
        torch.save(torch.ones(100, dtype=torch.int32), own_cache / "token_bytes.pt")
    elif how == "token_bytes too long":  # one entry more than the vocabulary: token ids still index it
        longer = torch.cat([torch.load(own_cache / "token_bytes.pt"), torch.ones(1, dtype=torch.int32)])
        torch.save(longer, own_cache / "token_bytes.pt")
    elif how == "truncated pickle":
        data = (own_cache / "tokenizer.pkl").read_bytes()
        (own_cache / "tokenizer.pkl").write_bytes(data[: len(data) // 2])
    elif how == "garbage token_bytes":
        (own_cache / "token_bytes.pt").write_bytes(b"\0" * 64)


BREAKAGES = {
    "no token_bytes": "token_bytes.pt is missing",
    "no tokenizer": "tokenizer.pkl is missing",
    "vocab mismatch": "has 8192 tokens but",
    "token_bytes too long": "token_bytes.pt has 8193 entries",
    "truncated pickle": "tokenizer.pkl cannot be read",
    "garbage token_bytes": "token_bytes.pt cannot be read",
}


@pytest.mark.parametrize("how", sorted(BREAKAGES))
def test_train_py_loaders_refuse_a_broken_pair(own_cache, how):
    _break(own_cache, how)
    for load in (prepare.Tokenizer.from_directory, prepare.get_token_bytes):
        with pytest.raises(SystemExit) as excinfo:
            load()
        message = str(excinfo.value.code)
        assert BREAKAGES[how] in message and "uv run prepare.py" in message


@pytest.mark.parametrize("how", ["no token_bytes", "vocab mismatch", "token_bytes too long"])
def test_prepare_says_so_and_trains_a_broken_pair_again(own_cache, how, capsys):
    _break(own_cache, how)
    prepare.train_tokenizer()
    out = capsys.readouterr().out
    assert BREAKAGES[how] in out and "training it again" in out
    enc, token_bytes = prepare.load_tokenizer_files()
    assert enc.n_vocab == len(token_bytes) == prepare.VOCAB_SIZE
    assert sorted(os.listdir(own_cache)) == ["token_bytes.pt", "tokenizer.pkl"]  # no .tmp left


def test_a_crash_while_writing_never_leaves_a_half_file_or_a_mixed_pair(own_cache, monkeypatch):
    _break(own_cache, "vocab mismatch")

    def dump_then_crash(obj, f):
        f.write(pickle.dumps(obj)[:1000])
        raise KeyboardInterrupt  # as a Ctrl-C or kill in the middle of the write

    monkeypatch.setattr(prepare.pickle, "dump", dump_then_crash)
    with pytest.raises(KeyboardInterrupt):
        prepare.train_tokenizer()
    # the half-written pickle is only ever a .tmp; the old mismatched file was dropped before training
    assert not (own_cache / "tokenizer.pkl").exists()
    with pytest.raises(ValueError, match="tokenizer.pkl is missing"):
        prepare.load_tokenizer_files()
    monkeypatch.undo()
    point_prepare_at(monkeypatch, own_cache.parent)
    prepare.train_tokenizer()  # the next run repairs it
    prepare.Tokenizer.from_directory()
