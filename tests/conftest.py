"""Shared test fixtures: a synthetic corpus in the ClimbMix shard layout and a trained tokenizer.

Tests never touch the network or data outside their temporary folders: they write their own small shards.
Every test runs on the CPU profile (AUTORESEARCH_DEVICE=cpu) in float32
(AUTORESEARCH_PRECISION=fp32: no bf16 autocast on CPUs with bf16 units) so results
do not depend on the machine.
"""

import os
import random
import sys
import tempfile

os.environ["AUTORESEARCH_DEVICE"] = "cpu"
os.environ["AUTORESEARCH_PRECISION"] = "fp32"
# The hub client never reaches the internet from a test: offline, an endpoint on a closed loopback port, no token,
# no telemetry (it would ask the endpoint for its agent registry), and its cache in a temporary directory instead
# of ~/.cache. Tests that use a loopback fake hub (tests/test_download.py) turn it back online for themselves.
os.environ.update(HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_DISABLE_TELEMETRY="1",
                  HF_HOME=tempfile.mkdtemp(prefix="hf_home_"))
for _name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE", "HF_TOKEN_PATH", "AUTORESEARCH_DATA_URL"):
    os.environ.pop(_name, None)
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


# ---------------------------------------------------------------------------
# End to end: prepare.py from a loopback HTTP server, then a short train.py run
# ---------------------------------------------------------------------------

import functools  # noqa: E402
import http.server  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
from types import SimpleNamespace  # noqa: E402

# Runs train.py unmodified with a short time budget and a single eval batch:
# the constants are patched on the imported prepare module before train.py runs.
TRAIN_DRIVER = """
import os, runpy, sys
sys.path.insert(0, os.getcwd())
import prepare
prepare.TIME_BUDGET = {time_budget}
prepare.EVAL_TOKENS = {eval_tokens}
{extra}
runpy.run_path("train.py", run_name="__main__")
"""


def run_train(cache_dir, time_budget=2, eval_tokens=None, extra="", timeout=600):
    """Run train.py in a subprocess against cache_dir; returns the CompletedProcess (text output)."""
    eval_tokens = eval_tokens or "prepare.MAX_SEQ_LEN * 32"
    code = TRAIN_DRIVER.format(time_budget=time_budget, eval_tokens=eval_tokens, extra=extra)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(cache_dir),
                          capture_output=True, text=True, timeout=timeout)


def subprocess_env(cache_dir, **extra):
    env = dict(os.environ, AUTORESEARCH_CACHE_DIR=str(cache_dir), AUTORESEARCH_DEVICE="cpu", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def closed_port_url():
    """http://127.0.0.1:<a port nobody listens on>"""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def shard_server(tmp_path_factory):
    """A loopback HTTP server serving a synthetic corpus; yields its base URL."""
    root = tmp_path_factory.mktemp("served")
    write_corpus(str(root), num_train=3, docs_per_shard=300, seed=7)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{server.server_address[1]}", root=str(root))
    server.shutdown()


@pytest.fixture(scope="session")
def e2e(shard_server, tmp_path_factory):
    """prepare.py (download from loopback + tokenizer) then a short train.py run, once per session."""
    cache = tmp_path_factory.mktemp("e2e_cache")
    prep = subprocess.run([sys.executable, "prepare.py", "--num-shards", "3", "--data-url", shard_server.url],
                          cwd=ROOT, env=subprocess_env(cache), capture_output=True, text=True, timeout=300)
    train = run_train(cache) if prep.returncode == 0 else None
    return SimpleNamespace(cache=str(cache), prepare=prep, train=train)


@pytest.fixture(scope="session")
def train_stdout(e2e):
    """The full stdout of a real (short) train.py run."""
    assert e2e.prepare.returncode == 0, e2e.prepare.stdout + e2e.prepare.stderr
    assert e2e.train.returncode == 0, e2e.train.stdout[-3000:] + e2e.train.stderr[-3000:]
    return e2e.train.stdout
