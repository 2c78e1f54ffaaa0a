"""End to end: prepare.py downloads from a loopback server and trains the tokenizer, train.py runs and reports."""

import os
import re
import socket
import subprocess
import sys

import prepare
from conftest import ROOT, run_train, subprocess_env

VAL_FILENAME_FOR_TESTS = prepare.VAL_FILENAME

SUMMARY = re.compile(
    r"^---\n"
    r"val_bpb:          \d+\.\d{6}\n"
    r"training_seconds: \d+\.\d\n"
    r"total_seconds:    \d+\.\d\n"
    r"peak_vram_mb:     \d+\.\d\n"
    r"mfu_percent:      \d+\.\d{2}\n"
    r"total_tokens_M:   \d+\.\d\n"
    r"num_steps:        \d+\n"
    r"num_params_M:     \d+\.\d\n"
    r"depth:            \d+\n"
    r"device:           cpu\n\Z",
    re.MULTILINE,
)


def summary_values(stdout):
    block = stdout[stdout.rindex("---\n"):]
    return {k: v.strip() for k, v in (line.split(":", 1) for line in block.splitlines()[1:])}


def test_prepare_downloads_and_trains_tokenizer(e2e):
    assert e2e.prepare.returncode == 0, e2e.prepare.stdout + e2e.prepare.stderr
    data = sorted(os.listdir(os.path.join(e2e.cache, "data")))
    assert data == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet", VAL_FILENAME_FOR_TESTS]
    assert sorted(os.listdir(os.path.join(e2e.cache, "tokenizer"))) == ["token_bytes.pt", "tokenizer.pkl"]


def test_prepare_is_idempotent(e2e, shard_server):
    again = subprocess.run([sys.executable, "prepare.py", "--num-shards", "3", "--data-url", shard_server.url],
                           cwd=ROOT, env=subprocess_env(e2e.cache), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "already" in again.stdout.lower()


def test_train_prints_summary_block(train_stdout):
    assert SUMMARY.search(train_stdout), train_stdout[-2000:]
    values = summary_values(train_stdout)
    assert values["device"] == "cpu"
    assert int(values["num_steps"]) > 10  # the first 10 steps are never counted
    assert float(values["training_seconds"]) >= 2.0
    assert float(values["mfu_percent"]) == 0.0  # no MFU on CPU
    assert 0.0 < float(values["val_bpb"]) < 10.0
    assert "Device: cpu" in train_stdout


def test_train_nan_loss_prints_fail_and_exits_1(e2e):
    # Make every loss NaN without touching train.py: patch the cross-entropy it calls.
    nan_loss = (
        "import torch, torch.nn.functional as F\n"
        "F.cross_entropy = lambda logits, *a, **k: logits.sum() * float('nan')\n"
    )
    result = run_train(e2e.cache, extra=nan_loss)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "FAIL" in result.stdout
    assert "val_bpb:" not in result.stdout


def test_train_without_cache_says_run_prepare(tmp_path):
    result = run_train(tmp_path / "empty")
    assert result.returncode != 0
    assert "uv run prepare.py" in result.stderr
    assert "Traceback" not in result.stderr


def test_prepare_unreachable_source_fails_clearly(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    result = subprocess.run([sys.executable, "prepare.py", "--num-shards", "1", "--data-url", url], cwd=ROOT,
                            env=subprocess_env(tmp_path, AUTORESEARCH_BACKOFF_BASE=0), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert url in result.stderr and "--data-url" in result.stderr and "AUTORESEARCH_DATA_URL" in result.stderr
    assert "Traceback" not in result.stderr
    assert not any(f.endswith(".parquet") for f in os.listdir(tmp_path / "data"))
