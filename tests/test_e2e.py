"""End to end: prepare.py downloads from a loopback server and trains the tokenizer, train.py runs and reports."""

import os
import pty
import re
import subprocess
import sys

import pytest

import prepare
from conftest import ROOT, TRAIN_DRIVER, closed_port_url, run_train, subprocess_env

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
    r"device:           cpu\n"
    r"cpu_share:        [01]\.\d\d \(share of the wall time the main thread ran; load average \d+\.\d on \d+ cores\)\n\Z",
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
    assert int(values["num_steps"]) >= 1  # on CPU every step counts (no warm-up steps: nothing compiles)
    assert float(values["training_seconds"]) >= 2.0
    assert 0 < float(values["cpu_share"].split()[0]) <= 1
    assert float(values["mfu_percent"]) == 0.0  # no MFU on CPU
    assert 0.0 < float(values["val_bpb"]) < 10.0
    assert "Device: cpu" in train_stdout
    assert "; precision: float32 (forced by AUTORESEARCH_PRECISION); compile: False" in train_stdout  # conftest


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


# prepare.py with urllib3's backoff between retries at 0 s (Retry-After is still honoured): a refused connection
# is retried DOWNLOAD_ATTEMPTS times either way, without the 2 + 4 + 8 s of waiting in between
PREPARE_WITHOUT_BACKOFF = (
    "import runpy, sys; from urllib3.util.retry import Retry; Retry.get_backoff_time = lambda self: 0.0; "
    "sys.argv[0] = 'prepare.py'; runpy.run_path('prepare.py', run_name='__main__')"
)


def test_prepare_unreachable_source_fails_clearly(tmp_path):
    url = closed_port_url()
    result = subprocess.run([sys.executable, "-c", PREPARE_WITHOUT_BACKOFF, "--num-shards", "1", "--data-url", url],
                            cwd=ROOT, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert url in result.stderr and "--data-url" in result.stderr and "AUTORESEARCH_DATA_URL" in result.stderr
    assert "Traceback" not in result.stderr
    assert not any(f.endswith(".parquet") for f in os.listdir(tmp_path / "data"))


def test_train_progress_in_a_log_is_whole_lines_every_few_seconds(train_stdout):
    """stdout is a pipe here (like `> run.log`): no carriage returns, and not one line per step."""
    assert "\r" not in train_stdout
    lines = train_stdout.splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert steps and steps[0].startswith("step 00000 (0.0%) | loss: ")
    # at most one line per PROGRESS_SECONDS (5 s) of the run; on a quiet machine that is fewer lines than steps
    assert len(steps) <= 1 + float(summary_values(train_stdout)["total_seconds"]) / 5
    assert lines.index("---") > lines.index(steps[-1])  # the summary block comes after the progress


def test_train_warns_at_start_when_the_val_split_is_small(e2e, train_stdout):
    """The test corpus has 300 validation documents, fewer than the loader's buffer of 1,000."""
    assert "WARNING: the validation split" in e2e.prepare.stdout
    lines = train_stdout.splitlines()
    warning = next(i for i, line in enumerate(lines) if line.startswith("WARNING: the validation split"))
    assert "300 documents" in lines[warning]
    assert warning < next(i for i, line in enumerate(lines) if line.startswith("step "))


def test_train_progress_on_a_terminal_rewrites_one_line(e2e):
    code = TRAIN_DRIVER.format(time_budget=2, eval_tokens="prepare.MAX_SEQ_LEN * 32", extra="")
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(e2e.cache),
                            stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.wait(timeout=600) == 0
    out = b"".join(chunks).decode()
    num_steps = int(re.search(r"num_steps:\s+(\d+)", out).group(1))
    assert out.count("\rstep ") == num_steps  # every step rewrites the line
    assert "\r\nstep " not in out and "\nstep " not in out  # no step starts a new line


SEED_PROBE = (
    "import torch\n"
    "_manual_seed = torch.manual_seed\n"
    "torch.manual_seed = lambda s: (print(f'manual_seed({s})', flush=True), _manual_seed(s))[1]\n"
)


@pytest.mark.parametrize("env, seed", [({}, 42), ({"AUTORESEARCH_SEED": "7"}, 7)])
def test_train_seed_comes_from_autoresearch_seed(tmp_path, env, seed):
    """The seed is set before the cache is read, so an empty cache is enough to see it."""
    code = TRAIN_DRIVER.format(time_budget=2, eval_tokens="None", extra=SEED_PROBE)
    base = {k: v for k, v in subprocess_env(tmp_path / "empty").items() if k != "AUTORESEARCH_SEED"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(base, **env), capture_output=True,
                            text=True, timeout=300)
    assert re.findall(r"manual_seed\((\d+)\)", result.stdout) == [str(seed)]
