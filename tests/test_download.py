"""prepare.py's download under faults, against a loopback HTTP server that misbehaves on request.

Cases and the outcome asserted (in every case the cache ends up holding only
shards that verify: no .tmp, no partial or corrupt file):
  drop mid-body, body shorter than Content-Length, 500/503, 429 with Retry-After,
  stall past the timeout (before headers or mid-body), corrupt parquet with 200,
  HF-style X-Linked-Size / X-Linked-Etag mismatch
      -> retried (429 waits as long as Retry-After says); once: fetched on the
         next attempt; always: the shard fails after 5 attempts
  404, 403                      -> the shard fails at once, one request
  corrupt file already cached   -> deleted and fetched again
  prepare.py with failed shards -> one summary naming the source and the
      override; exit 1 when the validation shard or every training shard is
      missing, else exit 0 and tokenizer training on the shards that are there
  not enough disk space         -> refused before any download
  Ctrl-C -> exit 130; SIGKILL -> orphaned workers stop; a rerun completes,
      fetching only what is missing
Sleeps are kept short through AUTORESEARCH_BACKOFF_BASE and
AUTORESEARCH_DOWNLOAD_TIMEOUT; the defaults are not changed.
"""
import hashlib
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import prepare
from conftest import ROOT, make_documents, write_shard

TIMEOUT = 0.5  # seconds, the client's network timeout in the in-process tests
PROGRAM_TIMEOUT = 2  # the same for prepare.py runs, which compete with this process for the CPU
STALL = 10     # seconds a stalling handler waits at most (until the test ends)

# A fault is one answer to one GET. Transient faults are retried; the rest fail at once.
TRANSIENT_FAULTS = ["drop", "short", "500", "503", "429", "stall_headers", "stall_body", "corrupt"]


class FaultServer:
    """Serves files by name on 127.0.0.1; `script(name, *answers)` decides successive GETs.

    Answers: "ok"; "drop" (half the body, then a TCP reset); "short" (fewer bytes
    than Content-Length, then a clean close); "500"/"503"; "429" or ("429", value)
    with a Retry-After header; "404"/"403"; "stall_headers"/"stall_body" (no
    data until the test ends); "corrupt" (garbage of the right length, status
    200); "trickle" (the body a little at a time until the test releases it);
    ("linked", size, sha256) (a Hugging Face style redirect carrying
    X-Linked-Size / X-Linked-Etag to the real bytes). The last answer repeats.
    """

    def __init__(self):
        self.files = {}
        self.scripts = {}
        self.log = []            # (method, path) of every request, in order
        self.trickled = 0        # body bytes sent by "trickle" answers
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def script(self, name, *answers):
        self.scripts[name] = list(answers)

    def gets(self, name):
        return sum(1 for method, path in self.log if method == "GET" and path == "/" + name)

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def _next_answer(self, name):
        with self.lock:
            answers = self.scripts.get(name) or ["ok"]
            return answers.pop(0) if len(answers) > 1 else answers[0]

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send_head(self, status, body_len=None, headers=()):
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                if body_len is not None:
                    self.send_header("Content-Length", str(body_len))
                self.end_headers()

            def do_HEAD(self):
                server.log.append(("HEAD", self.path))
                body = server.files.get(self.path.lstrip("/"))
                self._send_head(200 if body is not None else 404, len(body) if body is not None else 0)

            def do_GET(self):
                server.log.append(("GET", self.path))
                if self.path.startswith("/blobs/"):  # target of a "linked" redirect
                    body = server.files[self.path[len("/blobs/"):]]
                    self._send_head(200, len(body))
                    self.wfile.write(body)
                    return
                name = self.path.lstrip("/")
                body = server.files.get(name)
                answer = server._next_answer(name)
                kind = answer[0] if isinstance(answer, tuple) else answer
                if body is None or kind in ("404", "403"):
                    self._send_head(int(kind) if kind in ("404", "403") else 404, 0)
                elif kind == "ok":
                    self._send_head(200, len(body))
                    self.wfile.write(body)
                elif kind in ("500", "503"):
                    self._send_head(int(kind), 0)
                elif kind == "429":
                    retry_after = answer[1] if isinstance(answer, tuple) else "0"
                    self._send_head(429, 0, [("Retry-After", retry_after)])
                elif kind == "drop":
                    self._send_head(200, len(body))
                    self.wfile.write(body[: len(body) // 2])
                    # SO_LINGER 0: close() sends a reset instead of an orderly end
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.wfile.close()
                    self.rfile.close()
                    self.connection.close()
                elif kind == "short":
                    self._send_head(200, len(body))
                    self.wfile.write(body[: len(body) - 100])
                elif kind == "stall_headers":
                    server.release.wait(STALL)
                elif kind == "stall_body":
                    self._send_head(200, len(body))
                    self.wfile.write(body[:100])
                    server.release.wait(STALL)
                elif kind == "corrupt":
                    self._send_head(200, len(body))
                    self.wfile.write(bytes(len(body)))
                elif kind == "trickle":
                    # 16 bytes every 50 ms (well within the client's timeout), never the
                    # last byte; the connection ends, incomplete, when the test releases it
                    self._send_head(200, len(body))
                    for start in range(0, len(body) - 1, 16):
                        if server.release.wait(0.05):
                            break
                        self.wfile.write(body[start:min(start + 16, len(body) - 1)])
                        server.trickled += 16
                elif kind == "linked":
                    _, size, sha256 = answer
                    self._send_head(302, 0, [("Location", "/blobs/" + name), ("X-Linked-Size", str(size)),
                                             ("X-Linked-Etag", f'"{sha256}"')])
                else:
                    raise AssertionError(f"unknown answer {answer!r}")

        return Handler


def shard_bytes(tmp_path, seed, name="src.parquet"):
    """A valid small shard (a few tens of KB) as bytes."""
    path = os.path.join(str(tmp_path), f"{seed}-{name}")
    write_shard(path, make_documents(60, seed=seed))
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture
def server():
    s = FaultServer()
    yield s
    s.close()


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_BACKOFF_BASE", "0.01")
    monkeypatch.setenv("AUTORESEARCH_DOWNLOAD_TIMEOUT", str(TIMEOUT))


def cache_listing(data_dir):
    return sorted(os.listdir(data_dir)) if os.path.isdir(data_dir) else []


def assert_only_valid_shards(data_dir):
    """Every file in data_dir is a final shard name that verifies; no .tmp or other leftovers."""
    for name in cache_listing(data_dir):
        assert name.startswith("shard_") and name.endswith(".parquet"), f"leftover file {name}"
        assert prepare.verify_shard(os.path.join(data_dir, name)) is None, name


# ---------------------------------------------------------------------------
# verify_shard: what counts as a shard
# ---------------------------------------------------------------------------

def test_verify_shard_accepts_only_parquet_with_a_string_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = tmp_path / "good.parquet"
    write_shard(str(good), ["a", "b"])
    data = good.read_bytes()
    cases = {
        "truncated": data[: len(data) // 2],
        "garbage": os.urandom(2000),
        "empty": b"",
    }
    assert prepare.verify_shard(str(good)) is None
    for name, content in cases.items():
        path = tmp_path / f"{name}.parquet"
        path.write_bytes(content)
        assert "not a readable parquet" in prepare.verify_shard(str(path)), name
    pq.write_table(pa.table({"body": ["x"]}), str(tmp_path / "nocol.parquet"))
    assert "no column 'text'" in prepare.verify_shard(str(tmp_path / "nocol.parquet"))
    pq.write_table(pa.table({"text": [1, 2]}), str(tmp_path / "ints.parquet"))
    assert "not string" in prepare.verify_shard(str(tmp_path / "ints.parquet"))
    assert prepare.verify_shard(str(tmp_path / "missing.parquet")) is not None


# ---------------------------------------------------------------------------
# One shard, one fault (download_shard in this process: fast, exact)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("fault", TRANSIENT_FAULTS)
def test_transient_fault_is_retried_and_the_shard_fetched(fault, server, fast_retries, tmp_path):
    body = shard_bytes(tmp_path, 1)
    server.files["shard_00000.parquet"] = body
    server.script("shard_00000.parquet", fault, "ok")
    data_dir = str(tmp_path / "data")
    os.makedirs(data_dir)

    assert prepare.download_shard(0, server.url, data_dir) == ("shard_00000.parquet", None)
    assert server.gets("shard_00000.parquet") == 2
    assert cache_listing(data_dir) == ["shard_00000.parquet"]
    with open(os.path.join(data_dir, "shard_00000.parquet"), "rb") as f:
        assert f.read() == body


@pytest.mark.parametrize("fault", TRANSIENT_FAULTS)
def test_persistent_fault_fails_after_five_attempts_leaving_nothing(fault, server, fast_retries, tmp_path, monkeypatch):
    if fault.startswith("stall"):  # every attempt times out anyway: no need for a safety margin
        monkeypatch.setenv("AUTORESEARCH_DOWNLOAD_TIMEOUT", "0.1")
    server.files["shard_00000.parquet"] = shard_bytes(tmp_path, 1)
    server.script("shard_00000.parquet", fault)
    data_dir = str(tmp_path / "data")
    os.makedirs(data_dir)

    name, error = prepare.download_shard(0, server.url, data_dir)
    assert error is not None and "after 5 attempts" in error
    assert server.gets("shard_00000.parquet") == prepare.DOWNLOAD_ATTEMPTS == 5
    assert cache_listing(data_dir) == []


@pytest.mark.parametrize("status", ["404", "403"])
def test_client_error_fails_at_once(status, server, fast_retries, tmp_path):
    server.files["shard_00000.parquet"] = shard_bytes(tmp_path, 1)
    server.script("shard_00000.parquet", status)
    data_dir = str(tmp_path / "data")
    os.makedirs(data_dir)

    name, error = prepare.download_shard(0, server.url, data_dir)
    assert f"HTTP {status}" in error and "not retried" in error
    assert server.gets("shard_00000.parquet") == 1
    assert cache_listing(data_dir) == []


@pytest.mark.parametrize("retry_after, expected", [("7", 7.0), ("100000", prepare.RETRY_AFTER_MAX)])
def test_429_waits_as_long_as_retry_after_says(retry_after, expected, server, fast_retries, tmp_path, monkeypatch):
    slept = []
    monkeypatch.setattr(prepare.time, "sleep", slept.append)
    server.files["shard_00000.parquet"] = shard_bytes(tmp_path, 1)
    server.script("shard_00000.parquet", ("429", retry_after), "ok")
    data_dir = str(tmp_path / "data")
    os.makedirs(data_dir)

    assert prepare.download_shard(0, server.url, data_dir)[1] is None
    assert slept == [expected]  # not the 0.01 s backoff


def test_429_retry_after_as_http_date(server, fast_retries, tmp_path, monkeypatch):
    from email.utils import formatdate

    slept = []
    monkeypatch.setattr(prepare.time, "sleep", slept.append)
    server.files["shard_00000.parquet"] = shard_bytes(tmp_path, 1)
    server.script("shard_00000.parquet", ("429", formatdate(time.time() + 30, usegmt=True)), "ok")
    data_dir = str(tmp_path / "data")
    os.makedirs(data_dir)

    assert prepare.download_shard(0, server.url, data_dir)[1] is None
    assert len(slept) == 1 and 20 < slept[0] <= 30


def test_hugging_face_linked_size_and_sha256_are_checked(server, fast_retries, tmp_path):
    body = shard_bytes(tmp_path, 1)
    sha = hashlib.sha256(body).hexdigest()
    data_dir = str(tmp_path / "data")
    os.makedirs(data_dir)
    for i in range(3):
        server.files[prepare.shard_filename(i)] = body
    server.script("shard_00000.parquet", ("linked", len(body), sha))
    server.script("shard_00001.parquet", ("linked", len(body), "0" * 64))      # wrong sha256
    server.script("shard_00002.parquet", ("linked", len(body) + 1, sha))       # wrong size

    assert prepare.download_shard(0, server.url, data_dir)[1] is None
    assert ("GET", "/blobs/shard_00000.parquet") in server.log  # the redirect was followed
    _, error = prepare.download_shard(1, server.url, data_dir)
    assert "sha256" in error and "after 5 attempts" in error
    _, error = prepare.download_shard(2, server.url, data_dir)
    assert f"the server stated {len(body) + 1}" in error
    assert cache_listing(data_dir) == ["shard_00000.parquet"]


def test_cached_shard_is_verified_and_a_corrupt_one_fetched_again(server, fast_retries, tmp_path):
    body = shard_bytes(tmp_path, 1)
    server.files["shard_00000.parquet"] = body
    server.files["shard_00001.parquet"] = body
    data_dir = str(tmp_path / "data")
    os.makedirs(data_dir)
    write_shard(os.path.join(data_dir, "shard_00000.parquet"), ["cached"])
    with open(os.path.join(data_dir, "shard_00001.parquet"), "wb") as f:
        f.write(body[: len(body) // 3])  # what a crash without the .tmp dance would leave

    assert prepare.download_shard(0, server.url, data_dir)[1] is None
    assert prepare.download_shard(1, server.url, data_dir)[1] is None
    assert server.gets("shard_00000.parquet") == 0  # valid: kept
    assert server.gets("shard_00001.parquet") == 1  # corrupt: fetched again
    with open(os.path.join(data_dir, "shard_00001.parquet"), "rb") as f:
        assert f.read() == body


def test_local_directory_source(tmp_path, fast_retries):
    src, data_dir = tmp_path / "mirror", str(tmp_path / "data")
    src.mkdir()
    os.makedirs(data_dir)
    write_shard(str(src / "shard_00000.parquet"), ["one", "two"])
    (src / "shard_00001.parquet").write_bytes(b"not parquet")

    assert prepare.download_shard(0, "file://" + str(src), data_dir)[1] is None
    _, error = prepare.download_shard(1, str(src), data_dir)
    assert "not a readable parquet" in error
    _, error = prepare.download_shard(2, str(src), data_dir)
    assert "does not exist" in error
    assert cache_listing(data_dir) == ["shard_00000.parquet"]


# ---------------------------------------------------------------------------
# download_data: the run as a whole (disk space, summaries, exit conditions)
# ---------------------------------------------------------------------------

def test_refuses_when_the_disk_cannot_hold_the_shards(server, fast_retries, tmp_path, monkeypatch):
    from collections import namedtuple

    from conftest import point_prepare_at

    point_prepare_at(monkeypatch, tmp_path)
    body = shard_bytes(tmp_path, 1)
    for i in [0, 1, prepare.VAL_SHARD]:
        server.files[prepare.shard_filename(i)] = body
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(prepare.shutil, "disk_usage", lambda path: usage(10**12, 10**12 - len(body), len(body)))

    with pytest.raises(SystemExit) as excinfo:
        prepare.download_data(2, source=server.url, workers=2)
    message = str(excinfo.value.code)
    assert "not enough disk space" in message and "3 shard(s)" in message
    assert "sizes stated by the source for 3" in message and "AUTORESEARCH_CACHE_DIR" in message
    assert not any(method == "GET" for method, _ in server.log)  # refused before downloading anything

    # without sizes from the source (no HEAD answer), the per-shard guess is used
    monkeypatch.setattr(prepare, "_stated_size", lambda source, name: None)
    monkeypatch.setattr(prepare.shutil, "disk_usage", lambda path: usage(10**12, 0, 2 * prepare.SHARD_BYTES_GUESS))
    with pytest.raises(SystemExit) as excinfo:
        prepare.download_data(2, source=server.url, workers=2)
    assert "the source stated no sizes" in str(excinfo.value.code)


def test_unreachable_source_fails_with_one_clear_message(fast_retries, tmp_path, monkeypatch):
    from conftest import point_prepare_at

    point_prepare_at(monkeypatch, tmp_path)
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(SystemExit) as excinfo:
        prepare.download_data(2, source=url, workers=3)
    message = str(excinfo.value.code)
    assert url in message and "--data-url" in message and "AUTORESEARCH_DATA_URL" in message
    assert "validation shard" in message and "No training shard" in message
    assert cache_listing(prepare.DATA_DIR) == []


def test_every_training_shard_missing_is_an_error_even_with_the_validation_shard(tmp_path, fast_retries, monkeypatch):
    from conftest import point_prepare_at

    point_prepare_at(monkeypatch, tmp_path / "cache")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    write_shard(str(mirror / prepare.VAL_FILENAME), ["validation"])
    with pytest.raises(SystemExit) as excinfo:
        prepare.download_data(2, source=str(mirror), workers=2)
    message = str(excinfo.value.code)
    assert "No training shard is ready" in message and "The validation shard" not in message
    assert cache_listing(prepare.DATA_DIR) == [prepare.VAL_FILENAME]


# ---------------------------------------------------------------------------
# prepare.py as a program (subprocess: real exit codes, pool, progress bar)
# ---------------------------------------------------------------------------

def run_prepare(cache_dir, url, num_shards, timeout=PROGRAM_TIMEOUT, **popen):
    env = dict(os.environ, AUTORESEARCH_CACHE_DIR=str(cache_dir), AUTORESEARCH_DEVICE="cpu",
               AUTORESEARCH_BACKOFF_BASE="0.01", AUTORESEARCH_DOWNLOAD_TIMEOUT=str(timeout))
    env.pop("AUTORESEARCH_DATA_URL", None)
    cmd = [sys.executable, "prepare.py", "--num-shards", str(num_shards), "--data-url", url, "--download-workers", "4"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finish(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def test_program_recovers_from_each_fault_and_fails_on_what_is_missing(server, tmp_path):
    faults = ["drop", "short", "500", ("429", "1"), "stall_body", "corrupt", "ok", "404"]
    for i, fault in enumerate(faults):
        name = prepare.shard_filename(i)
        server.files[name] = shard_bytes(tmp_path, i)
        server.script(name, fault, "ok")
    server.files[prepare.VAL_FILENAME] = shard_bytes(tmp_path, 99)
    data_dir = str(tmp_path / "cache" / "data")
    os.makedirs(data_dir)
    with open(os.path.join(data_dir, "shard_00006.parquet"), "wb") as f:  # a corrupt shard in the cache
        f.write(server.files["shard_00006.parquet"][:500])
    with open(os.path.join(data_dir, "shard_00003.parquet.12345.tmp"), "wb") as f:  # a killed run's leftover
        f.write(b"partial")

    code, out, err = finish(run_prepare(tmp_path / "cache", server.url, len(faults)))
    assert code == 1, err
    assert "shard_00006.parquet: the cached file is not a readable parquet file" in out
    # every transient fault cost exactly one more request; the 404 was not retried
    assert [server.gets(prepare.shard_filename(i)) for i in range(len(faults))] == [2, 2, 2, 2, 2, 2, 1, 1]
    assert_only_valid_shards(data_dir)
    assert cache_listing(data_dir) == [prepare.shard_filename(i) for i in range(7)] + [prepare.VAL_FILENAME]
    # one summary naming the failure, the source and the override; no tokenizer from a subset of the shards
    assert err.count("could not fetch") == 1
    assert "shard_00007.parquet: HTTP 404" in err and server.url in err and "--data-url" in err
    assert "Traceback" not in err
    assert not os.path.exists(tmp_path / "cache" / "tokenizer" / "tokenizer.pkl")
    assert "%|" not in err  # no progress bars when stderr is not a terminal


def test_program_exits_nonzero_when_the_validation_shard_and_all_training_shards_fail(server, tmp_path):
    faults = ["drop", "short", "500", "429", "stall_body", "corrupt"]
    for i, fault in enumerate(faults):
        server.files[prepare.shard_filename(i)] = shard_bytes(tmp_path, i)
        server.script(prepare.shard_filename(i), fault)
    server.files[prepare.VAL_FILENAME] = shard_bytes(tmp_path, 99)
    server.script(prepare.VAL_FILENAME, "404")

    # every answer is a failure, so a short timeout cannot turn a good answer into a false one
    code, out, err = finish(run_prepare(tmp_path / "cache", server.url, len(faults), timeout=0.2))
    assert code == 1
    assert err.count("could not fetch 7 of 7") == 1 and server.url in err and "AUTORESEARCH_DATA_URL" in err
    assert "validation shard shard_06542.parquet is missing" in err and "No training shard" in err
    assert err.count("(after 5 attempts)") == len(faults) and "shard_06542.parquet: HTTP 404" in err
    assert [server.gets(prepare.shard_filename(i)) for i in range(len(faults))] == [5] * len(faults)
    assert cache_listing(tmp_path / "cache" / "data") == []
    assert not os.path.exists(tmp_path / "cache" / "tokenizer")


def test_interrupted_runs_leave_only_valid_shards_and_a_rerun_completes(server, tmp_path):
    """Ctrl-C, then SIGKILL, in the middle of a download; the third run completes."""
    for i in [0, 1, 2, prepare.VAL_SHARD]:
        server.files[prepare.shard_filename(i)] = shard_bytes(tmp_path, i)
    server.script("shard_00002.parquet", "trickle", "trickle", "ok")
    data_dir = tmp_path / "cache" / "data"
    done = [prepare.shard_filename(i) for i in [0, 1, prepare.VAL_SHARD]]

    def start_and_wait_for_the_slow_download(**popen):
        proc = run_prepare(tmp_path / "cache", server.url, 3, **popen)
        trickled, deadline = server.trickled, time.time() + 90
        while not (server.trickled >= trickled + 256 and all((data_dir / n).exists() for n in done)):
            assert proc.poll() is None and time.time() < deadline, "prepare.py did not reach the slow download"
            time.sleep(0.05)
        leftovers = [n for n in cache_listing(data_dir) if n.startswith("shard_00002")]
        assert len(leftovers) == 1 and leftovers[0].endswith(".tmp")  # the download in progress
        return proc

    # 1. Ctrl-C, as a terminal sends it: to the whole process group
    proc = start_and_wait_for_the_slow_download(start_new_session=True)
    os.killpg(proc.pid, signal.SIGINT)
    code, out, err = finish(proc)
    assert code == 130 and "rerun prepare.py to continue" in err and "Traceback" not in err
    assert_only_valid_shards(data_dir)
    assert cache_listing(data_dir) == done

    # 2. SIGKILL to prepare.py alone: its pool workers are orphaned and must stop by themselves
    proc = start_and_wait_for_the_slow_download()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    server.release.set()  # ends the trickle, incomplete: the orphaned worker sees its parent gone
    assert not (data_dir / "shard_00002.parquet").exists()

    # 3. a plain rerun continues where the others stopped
    code, out, err = finish(run_prepare(tmp_path / "cache", server.url, 3))
    assert code == 0, err
    assert "3/4 shards already" in out
    assert_only_valid_shards(data_dir)
    assert cache_listing(data_dir) == sorted(done + ["shard_00002.parquet"])
    # shards fetched once each, shard 2 once per run; no request from an orphan after the kill
    assert [server.gets(prepare.shard_filename(i)) for i in [0, 1, 2, prepare.VAL_SHARD]] == [1, 1, 3, 1]
