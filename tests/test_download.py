"""prepare.py's download under faults, against a loopback server that plays the Hugging Face hub or a plain mirror.

The server answers the hub's resolve endpoint (/datasets/<repo>/resolve/main/<file>: HEAD with the headers
huggingface_hub reads, X-Repo-Commit, ETag and Content-Length; GET with Range support, so the client can
resume) and a plain mirror (/<file>). Each request can be scripted to misbehave. Outcomes asserted, and in
every case the data directory ends up holding only shards that verify (nothing partial or corrupt):
  hub: a short body or a stall -> huggingface_hub resumes (Range) and the shard arrives; 5xx or 429 on the
       metadata request, 429 on the download -> retried, Retry-After honoured; a connection reset mid-body
       or 5xx on the download (the library retries neither), a size that differs from the stated one,
       garbage of the right size, 404, offline, unreachable -> the shard fails with one line;
       HF_TOKEN is sent as `Authorization: Bearer`
  mirror (--data-url http://...): connection errors, 5xx and 429 -> urllib3 retries (Retry-After honoured,
       up to RETRY_AFTER_MAX); a body cut off mid-way, garbage, 404/403 -> the shard fails with one line
  prepare.py as a program -> one summary line per distinct failure naming the source and the overrides;
       exit 1 when a shard is missing; a disk too small refused before any download; Ctrl-C -> exit 130,
       SIGKILL -> no download goes on; a rerun fetches only what is missing; HF_ENDPOINT end to end.
Sleeps are recorded instead of slept in this process (time.sleep is replaced); prepare.py runs in a
subprocess only where the library's waits are short.
"""
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import huggingface_hub
import pytest
from huggingface_hub import constants as hf_constants

import prepare
from conftest import ROOT, closed_port_url, make_documents, point_prepare_at, write_shard

HUB_PREFIX = f"/datasets/{prepare.HF_REPO}/resolve/main/"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
STALL = 10     # seconds a stalling handler waits at most (until the test ends)


class FaultServer:
    """Serves files by name on 127.0.0.1, as the hub (`hub_url`) and as a plain mirror (`url`).

    `script(name, *answers, method="GET")` decides successive requests of that method for that file; the
    last answer repeats. GET answers: "ok"; "drop" (half of what was asked, then a TCP reset); "short"
    (100 bytes fewer than Content-Length, then a clean close); "500"/"503"; "429" or ("429", value) with
    a Retry-After header; "404"/"403"; "stall_headers"/"stall_body" (no data, or half the body, then nothing
    until the test ends);
    "corrupt" (zeros of the right length); "trickle" (16 bytes every 50 ms, never the last byte, until the
    test releases it). HEAD answers (hub metadata): "ok", "500"/"503", "429"/("429", value), "404",
    ("size", n) (states n bytes). "ok" answers a Range request with 206 and the rest of the file.
    """

    def __init__(self):
        self.files = {}
        self.scripts = {}
        self.log = []            # (method, path, Range header, Authorization header) of every request
        self.trickled = 0        # body bytes sent by "trickle" answers
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def script(self, name, *answers, method="GET"):
        self.scripts[method, name] = list(answers)

    def requests(self, method, name):
        """Requests of `method` for file `name`, by either route."""
        return [entry for entry in self.log if entry[0] == method and entry[1].rsplit("/", 1)[-1] == name]

    def gets(self, name):
        return len(self.requests("GET", name))

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def _next_answer(self, method, name):
        with self.lock:
            answers = self.scripts.get((method, name)) or ["ok"]
            return answers.pop(0) if len(answers) > 1 else answers[0]

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the hub; every answer states its length or closes

            def log_message(self, *args):
                pass

            def _send_head(self, status, length=0, headers=()):
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(length))
                self.end_headers()

            def _route(self):
                server.log.append((self.command, self.path, self.headers.get("Range"),
                                   self.headers.get("Authorization")))
                hub = self.path.startswith(HUB_PREFIX)
                name = self.path[len(HUB_PREFIX):] if hub else self.path.lstrip("/")
                answer = server._next_answer(self.command, name)
                return hub, name, server.files.get(name), answer, answer[0] if isinstance(answer, tuple) else answer

            def _status(self, kind, answer, hub):
                if kind in ("500", "503", "403"):
                    self._send_head(int(kind))
                elif kind == "404":  # the hub says which kind of 404
                    self._send_head(404, headers=[("X-Error-Code", "EntryNotFound")] if hub else [])
                elif kind == "429":
                    self._send_head(429, headers=[("Retry-After", answer[1] if isinstance(answer, tuple) else "0")])
                else:
                    return False
                return True

            def do_HEAD(self):
                hub, name, body, answer, kind = self._route()
                if body is None:
                    kind = "404"
                if self._status(kind, answer, hub):
                    return
                size = answer[1] if kind == "size" else len(body)
                self._send_head(200, size, [("ETag", f'"{name}-etag"'), ("X-Repo-Commit", COMMIT),
                                            ("Accept-Ranges", "bytes")])

            def do_GET(self):
                hub, name, body, answer, kind = self._route()
                if body is None:
                    kind = "404"
                if self._status(kind, answer, hub):
                    return
                start = 0
                if self.headers.get("Range", "").startswith("bytes="):
                    start = int(self.headers["Range"][len("bytes="):].split("-")[0])
                rest = body[start:]
                range_headers = [("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")] if start else []
                status = 206 if start else 200
                if kind == "ok":
                    self._send_head(status, len(rest), range_headers)
                    self.wfile.write(rest)
                elif kind == "drop":
                    self._send_head(status, len(rest), range_headers)
                    self.wfile.write(rest[: len(rest) // 2])
                    self.wfile.flush()
                    # SO_LINGER 0: close() sends a reset instead of an orderly end
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                elif kind == "short":
                    self._send_head(200, len(body))
                    self.wfile.write(body[: len(body) - 100])
                    self.close_connection = True
                elif kind == "stall_headers":
                    server.release.wait(STALL)
                    self.close_connection = True
                elif kind == "stall_body":
                    self._send_head(200, len(body))
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    server.release.wait(STALL)
                    self.close_connection = True
                elif kind == "corrupt":
                    self._send_head(200, len(body))
                    self.wfile.write(bytes(len(body)))
                elif kind == "trickle":
                    self._send_head(200, len(body))
                    for i in range(0, len(body) - 1, 16):
                        if server.release.wait(0.05):
                            break
                        self.wfile.write(body[i:min(i + 16, len(body) - 1)])
                        self.wfile.flush()
                        server.trickled += 16
                    self.close_connection = True
                else:
                    raise AssertionError(f"unknown answer {answer!r}")

        return Handler


def shard_bytes(tmp_path, seed):
    """A valid small shard (a few tens of KB) as bytes."""
    path = os.path.join(str(tmp_path), f"{seed}-src.parquet")
    write_shard(path, make_documents(60, seed=seed))
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture
def server():
    s = FaultServer()
    yield s
    s.close()


def point_hub_at(monkeypatch, url):
    """huggingface_hub in this process pointed at `url` and online (HF_ENDPOINT is read when it is imported)."""
    monkeypatch.setattr(hf_constants, "ENDPOINT", url)
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub(server, monkeypatch):
    """huggingface_hub in this process pointed at the loopback server, with 1 s timeouts."""
    point_hub_at(monkeypatch, server.url)
    monkeypatch.setattr(hf_constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
    monkeypatch.setattr(hf_constants, "HF_HUB_ETAG_TIMEOUT", 1)
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 1024)  # 10 MB by default: more than a test shard
    return server


@pytest.fixture
def slept(monkeypatch):
    """The waits the clients asked for, in seconds; nothing is slept."""
    waits = []
    monkeypatch.setattr(time, "sleep", waits.append)
    return waits


def cache_listing(data_dir):
    """The data directory's files; `.partial` (a run's staging area) is looked at separately."""
    return sorted(n for n in os.listdir(data_dir) if n != ".partial") if os.path.isdir(data_dir) else []


def assert_only_valid_shards(data_dir):
    for name in cache_listing(data_dir):
        assert name.startswith("shard_") and name.endswith(".parquet"), f"leftover file {name}"
        assert prepare.verify_shard(os.path.join(data_dir, name)) is None, name
    partial = os.path.join(data_dir, ".partial")
    assert not os.path.isdir(partial) or not any(f for _, _, files in os.walk(partial) for f in files
                                                   if f.endswith(".parquet")), "a partial shard was left"


@pytest.fixture
def data_dir(tmp_path):
    os.makedirs(tmp_path / "data")
    return str(tmp_path / "data")


# ---------------------------------------------------------------------------
# verify_shard: what counts as a shard
# ---------------------------------------------------------------------------

def test_verify_shard_accepts_only_parquet_with_a_string_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = tmp_path / "good.parquet"
    write_shard(str(good), ["a", "b"])
    data = good.read_bytes()
    assert prepare.verify_shard(str(good)) is None
    for name, content in {"truncated": data[: len(data) // 2], "garbage": os.urandom(2000), "empty": b""}.items():
        path = tmp_path / f"{name}.parquet"
        path.write_bytes(content)
        assert "not a readable parquet" in prepare.verify_shard(str(path)), name
    pq.write_table(pa.table({"body": ["x"]}), str(tmp_path / "nocol.parquet"))
    assert "no column 'text'" in prepare.verify_shard(str(tmp_path / "nocol.parquet"))
    pq.write_table(pa.table({"text": [1, 2]}), str(tmp_path / "ints.parquet"))
    assert "not string" in prepare.verify_shard(str(tmp_path / "ints.parquet"))
    assert prepare.verify_shard(str(tmp_path / "missing.parquet")) is not None


# ---------------------------------------------------------------------------
# The hub (huggingface_hub): one shard, one fault
# ---------------------------------------------------------------------------

NAME = "shard_00000.parquet"


def test_hub_download_is_one_head_and_one_get_and_sends_the_token(hub, slept, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "x")
    hub.files[NAME] = body = shard_bytes(tmp_path, 1)
    assert prepare.download_shard(0, None, data_dir) == (NAME, None)
    assert [(m, p) for m, p, _, _ in hub.log] == [("HEAD", HUB_PREFIX + NAME), ("GET", HUB_PREFIX + NAME)]
    assert {auth for _, _, _, auth in hub.log} == {"Bearer x"}
    assert cache_listing(data_dir) == [NAME] and open(os.path.join(data_dir, NAME), "rb").read() == body
    assert slept == []
    # present and valid: not asked for again
    assert prepare.download_shard(0, None, data_dir) == (NAME, None) and len(hub.log) == 2


@pytest.mark.parametrize("fault", ["short", "stall_body", "stall_headers"])
def test_hub_resumes_a_broken_download(fault, hub, slept, data_dir, tmp_path):
    hub.files[NAME] = body = shard_bytes(tmp_path, 1)
    hub.script(NAME, fault, "ok")
    assert prepare.download_shard(0, None, data_dir) == (NAME, None)
    gets = hub.requests("GET", NAME)
    assert len(gets) == 2
    if fault != "stall_headers":  # the second request asks only for what is missing
        assert gets[1][2] is not None and gets[1][2].startswith("bytes=") and gets[1][2] != "bytes=0-", hub.log
    assert open(os.path.join(data_dir, NAME), "rb").read() == body
    assert_only_valid_shards(data_dir)


@pytest.mark.parametrize("fault", ["500", "503", "429"])
def test_hub_retries_the_metadata_request(fault, hub, slept, data_dir, tmp_path):
    hub.files[NAME] = shard_bytes(tmp_path, 1)
    hub.script(NAME, fault, "ok", method="HEAD")
    assert prepare.download_shard(0, None, data_dir) == (NAME, None)
    assert len(hub.requests("HEAD", NAME)) == 2 and hub.gets(NAME) == 1


def test_hub_429_waits_as_long_as_retry_after_says(hub, slept, data_dir, tmp_path):
    hub.files[NAME] = shard_bytes(tmp_path, 1)
    hub.script(NAME, ("429", "7"), "ok")
    assert prepare.download_shard(0, None, data_dir) == (NAME, None)
    assert hub.gets(NAME) == 2 and len(slept) == 1 and slept[0] >= 7


@pytest.mark.parametrize("fault, method, says", [
    ("500", "GET", "500"),                        # the library does not retry a failed download's status,
    ("drop", "GET", "Connection reset by peer"),  # nor resume after a reset connection
    ("429", "GET", "429"),                        # ... a 429 it retries, but not for ever
    ("500", "HEAD", "locate the file on the Hub"),
    ("404", "HEAD", "RemoteEntryNotFoundError"),
    ("corrupt", "GET", "the fetched file is not a readable parquet file"),
    (("size", 12345), "HEAD", "Consistency check failed: file should be of size 12345"),
])
def test_hub_failure_is_one_line_and_leaves_nothing(fault, method, says, hub, slept, data_dir, tmp_path):
    hub.files[NAME] = shard_bytes(tmp_path, 1)
    hub.script(NAME, fault, method=method)
    name, error = prepare.download_shard(0, None, data_dir)
    assert error is not None and says in error and "\n" not in error, error
    assert cache_listing(data_dir) == []
    assert_only_valid_shards(data_dir)


def test_hub_offline_or_unreachable_is_one_line(server, slept, data_dir, monkeypatch):
    # conftest's environment: HF_HUB_OFFLINE=1
    _, error = prepare.download_shard(0, None, data_dir)
    assert "offline mode is enabled" in error and "\n" not in error and server.log == []
    point_hub_at(monkeypatch, closed_port_url())  # online, but nobody listens at the endpoint
    _, error = prepare.download_shard(0, None, data_dir)
    assert "ConnectError" in error and "\n" not in error
    assert cache_listing(data_dir) == []


def test_the_hub_clients_closed_session_is_one_line(data_dir, monkeypatch):
    """A thread's refused connection makes huggingface_hub close the client that the other threads use."""
    def closed(*args, **kwargs):
        raise RuntimeError("Cannot send a request, as the client has been closed.")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", closed)  # imported on use
    assert prepare.download_shard(0, None, data_dir) == (NAME, "RuntimeError: Cannot send a request, as the client "
                                                               "has been closed.")
    assert cache_listing(data_dir) == []


def test_cached_shard_is_verified_and_a_corrupt_one_fetched_again(hub, slept, data_dir, tmp_path):
    hub.files["shard_00000.parquet"] = hub.files["shard_00001.parquet"] = body = shard_bytes(tmp_path, 1)
    write_shard(os.path.join(data_dir, "shard_00000.parquet"), ["cached"])
    with open(os.path.join(data_dir, "shard_00001.parquet"), "wb") as f:
        f.write(body[: len(body) // 3])  # what a crash without the staging directory would leave
    assert prepare.download_shard(0, None, data_dir)[1] is None
    assert prepare.download_shard(1, None, data_dir)[1] is None
    assert hub.gets("shard_00000.parquet") == 0  # valid: kept
    assert hub.gets("shard_00001.parquet") == 1  # corrupt: fetched again
    assert open(os.path.join(data_dir, "shard_00001.parquet"), "rb").read() == body


# ---------------------------------------------------------------------------
# A plain http(s) mirror (requests + urllib3's Retry): one shard, one fault
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("fault", ["500", "503", "429", "stall_headers"])
def test_mirror_retries_until_the_shard_arrives(fault, server, slept, data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_DOWNLOAD_TIMEOUT", 0.5)
    server.files[NAME] = body = shard_bytes(tmp_path, 1)
    server.script(NAME, fault, fault, "ok")
    assert prepare.download_shard(0, server.url, data_dir) == (NAME, None)
    assert server.gets(NAME) == 3
    assert open(os.path.join(data_dir, NAME), "rb").read() == body


@pytest.mark.parametrize("retry_after, expected", [("7", 7), ("100000", prepare.RETRY_AFTER_MAX)])
def test_mirror_429_waits_as_long_as_retry_after_says(retry_after, expected, server, slept, data_dir, tmp_path):
    server.files[NAME] = shard_bytes(tmp_path, 1)
    server.script(NAME, ("429", retry_after), "ok")
    assert prepare.download_shard(0, server.url, data_dir)[1] is None
    assert slept == [expected]


def test_mirror_retry_after_as_an_http_date(server, slept, data_dir, tmp_path):
    from email.utils import formatdate

    server.files[NAME] = shard_bytes(tmp_path, 1)
    server.script(NAME, ("429", formatdate(time.time() + 30, usegmt=True)), "ok")
    assert prepare.download_shard(0, server.url, data_dir)[1] is None
    assert len(slept) == 1 and 20 < slept[0] <= 30


def test_mirror_persistent_5xx_fails_after_the_attempts(server, slept, data_dir, tmp_path):
    server.files[NAME] = shard_bytes(tmp_path, 1)
    server.script(NAME, "503")
    _, error = prepare.download_shard(0, server.url, data_dir)
    assert "503" in error and "\n" not in error
    assert server.gets(NAME) == prepare.DOWNLOAD_ATTEMPTS
    assert cache_listing(data_dir) == []


@pytest.mark.parametrize("fault, says", [("404", "404"), ("403", "403"), ("drop", "Error"), ("short", "Error"),
                                         ("stall_body", "timed out"), ("corrupt", "not a readable parquet")])
def test_mirror_failure_is_one_request_and_one_line(fault, says, server, slept, data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_DOWNLOAD_TIMEOUT", 0.5)
    server.files[NAME] = shard_bytes(tmp_path, 1)
    server.script(NAME, fault)
    _, error = prepare.download_shard(0, server.url, data_dir)
    assert says in error and "\n" not in error, error
    assert server.gets(NAME) == 1
    assert cache_listing(data_dir) == []
    assert_only_valid_shards(data_dir)


def test_local_directory_source(data_dir, tmp_path):
    src = tmp_path / "mirror"
    src.mkdir()
    write_shard(str(src / "shard_00000.parquet"), ["one", "two"])
    (src / "shard_00001.parquet").write_bytes(b"not parquet")
    assert prepare.download_shard(0, "file://" + str(src), data_dir)[1] is None
    assert "not a readable parquet" in prepare.download_shard(1, str(src), data_dir)[1]
    assert "No such file" in prepare.download_shard(2, str(src), data_dir)[1]
    assert cache_listing(data_dir) == ["shard_00000.parquet"]


# ---------------------------------------------------------------------------
# download_data: the run as a whole (disk space, summaries, exit conditions)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["hub", "mirror"])
def test_refuses_when_the_disk_cannot_hold_the_shards(source, hub, slept, tmp_path, monkeypatch):
    from collections import namedtuple

    point_prepare_at(monkeypatch, tmp_path)
    body = shard_bytes(tmp_path, 1)
    for i in [0, 1, prepare.VAL_SHARD]:
        hub.files[prepare.shard_filename(i)] = body
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(prepare.shutil, "disk_usage", lambda path: usage(10**12, 10**12 - len(body), len(body)))
    url = None if source == "hub" else hub.url

    with pytest.raises(SystemExit) as excinfo:
        prepare.download_data(2, source=url, workers=2)
    message = str(excinfo.value.code)
    assert "not enough disk space" in message and "3 shard(s)" in message
    assert "sizes stated by the source for 3" in message and "AUTORESEARCH_CACHE_DIR" in message
    assert hub.gets(prepare.VAL_FILENAME) == hub.gets(NAME) == 0  # refused before downloading anything

    # without sizes from the source, the per-shard guess is used
    monkeypatch.setattr(prepare, "_stated_size", lambda source, index: None)
    monkeypatch.setattr(prepare.shutil, "disk_usage", lambda path: usage(10**12, 0, 2 * prepare.SHARD_BYTES_GUESS))
    with pytest.raises(SystemExit) as excinfo:
        prepare.download_data(2, source=url, workers=2)
    assert "the source stated no sizes" in str(excinfo.value.code)


@pytest.mark.parametrize("source", ["hub", "mirror"])
def test_unreachable_source_fails_with_one_line_naming_the_validation_shard(source, slept, tmp_path, monkeypatch):
    point_prepare_at(monkeypatch, tmp_path)
    dead = closed_port_url()
    if source == "hub":
        point_hub_at(monkeypatch, dead)
    # one worker: on a refused connection huggingface_hub closes the client its other threads are using
    with pytest.raises(SystemExit) as excinfo:
        prepare.download_data(2, source=None if source == "hub" else dead, workers=1 if source == "hub" else 3)
    lines = str(excinfo.value.code).splitlines()
    assert dead in lines[0] and "could not fetch 3 of 3" in lines[0]
    # every shard failed the same way (the URLs differ only in the file name, shown as *): one line for all three
    error = "LocalEntryNotFoundError: " if source == "hub" else "ConnectionError: "
    assert lines[1].startswith("  shard_00000.parquet and 2 more: " + error) and "Connection refused" in lines[1]
    assert "--data-url" in lines[2] and "AUTORESEARCH_DATA_URL" in lines[2] and "HF_ENDPOINT" in lines[2]
    assert lines[3:] == [f"The validation shard {prepare.VAL_FILENAME} is missing: nothing can be evaluated "
                         f"without it.", "No training shard is ready."]
    assert cache_listing(prepare.DATA_DIR) == [] and not os.path.exists(os.path.join(prepare.DATA_DIR, ".partial"))


def test_every_training_shard_missing_is_an_error_even_with_the_validation_shard(tmp_path, monkeypatch):
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
# prepare.py as a program (subprocess: real exit codes, threads, progress bar)
# ---------------------------------------------------------------------------

def run_prepare(cache_dir, num_shards, url=None, hub=None, **popen):
    """prepare.py from a mirror (`url`) or, with hub=<FaultServer>, from the hub at HF_ENDPOINT=<its url>."""
    env = dict(os.environ, AUTORESEARCH_CACHE_DIR=str(cache_dir), AUTORESEARCH_DEVICE="cpu",
               HF_HUB_DOWNLOAD_TIMEOUT="1")
    if hub is not None:
        env.update(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_TOKEN="x")
    cmd = [sys.executable, "prepare.py", "--num-shards", str(num_shards), "--download-workers", "4"]
    cmd += ["--data-url", url] if url else []
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finish(proc, timeout=180):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def test_program_from_hf_endpoint_end_to_end(server, tmp_path):
    """HF_ENDPOINT=<loopback fake hub> HF_TOKEN=x prepare.py: shards, tokenizer, the validation check, exit 0."""
    for i in [0, 1, 2, prepare.VAL_SHARD]:
        server.files[prepare.shard_filename(i)] = shard_bytes(tmp_path, i)
    code, out, err = finish(run_prepare(tmp_path / "cache", 3, hub=server))
    assert code == 0, err
    assert f"Downloading 4 shards from {server.url}/datasets/{prepare.HF_REPO}" in out and "Done" in out
    data_dir = tmp_path / "cache" / "data"
    assert sorted(os.listdir(data_dir)) == sorted(prepare.shard_filename(i) for i in [0, 1, 2, prepare.VAL_SHARD])
    assert_only_valid_shards(data_dir)
    assert os.path.exists(tmp_path / "cache" / "tokenizer" / "tokenizer.pkl")
    assert all(path.startswith(HUB_PREFIX) and auth == "Bearer x" for _, path, _, auth in server.log)
    # the disk check's HEAD and the download's HEAD + GET, for each shard
    assert sorted(m for m, _, _, _ in server.log) == ["GET"] * 4 + ["HEAD"] * 8
    assert "%|" not in err and "Traceback" not in err


def test_program_sums_up_hub_failures_one_line_each(server, tmp_path):
    # the disk check's HEAD request comes first: the metadata faults are scripted for the download's HEAD after it
    faults = [("GET", "short", "ok"), ("HEAD", "ok", "500", "ok"), ("GET", "ok"), ("HEAD", "404"),
              ("GET", "corrupt", "ok"), ("GET", "drop", "ok")]
    for i, (method, *answers) in enumerate(faults):
        server.files[prepare.shard_filename(i)] = shard_bytes(tmp_path, i)
        server.script(prepare.shard_filename(i), *answers, method=method)
    server.files[prepare.VAL_FILENAME] = shard_bytes(tmp_path, 99)
    data_dir = tmp_path / "cache" / "data"
    os.makedirs(data_dir / ".partial")
    (data_dir / ".partial" / "shard_00003.parquet").write_bytes(b"partial")  # a killed run's leftover

    code, out, err = finish(run_prepare(tmp_path / "cache", len(faults), hub=server))
    assert code == 1, err
    assert_only_valid_shards(data_dir)
    assert cache_listing(data_dir) == [prepare.shard_filename(i) for i in range(3)] + [prepare.VAL_FILENAME]
    assert not os.path.exists(data_dir / ".partial")
    summary = err[err.index("prepare.py: could not fetch"):].splitlines()
    assert summary[0] == f"prepare.py: could not fetch 3 of 7 shard(s) from {server.url}/datasets/{prepare.HF_REPO}:"
    assert summary[1].startswith("  shard_00003.parquet: RemoteEntryNotFoundError")
    assert summary[2].startswith("  shard_00004.parquet: the fetched file is not a readable parquet file")
    assert summary[3].startswith("  shard_00005.parquet: ReadError: [Errno 104] Connection reset by peer")
    assert "--data-url" in summary[4] and len(summary) == 5  # the validation shard and shards 0-2 are there
    # each failure cost one download; the short body was resumed, the 500 on the metadata request retried
    assert [server.gets(prepare.shard_filename(i)) for i in range(len(faults))] == [2, 1, 1, 0, 1, 1]
    assert "Traceback" not in err and "%|" not in err
    assert not os.path.exists(tmp_path / "cache" / "tokenizer" / "tokenizer.pkl")  # not from a subset


def test_program_offline_says_so_in_one_line_per_failure(tmp_path):
    code, out, err = finish(run_prepare(tmp_path / "cache", 2))  # conftest's environment: HF_HUB_OFFLINE=1
    assert code == 1 and "Traceback" not in err
    summary = err[err.index("prepare.py: could not fetch"):].splitlines()
    assert "could not fetch 3 of 3" in summary[0]
    assert summary[1].startswith("  shard_00000.parquet and 2 more: ") and "offline mode is enabled" in summary[1]
    assert f"The validation shard {prepare.VAL_FILENAME} is missing" in err and "--data-url" in err


def test_program_from_a_mirror_recovers_what_urllib3_retries(server, tmp_path):
    faults = ["500", ("429", "1"), "ok", "404", "drop"]
    for i, fault in enumerate(faults):
        server.files[prepare.shard_filename(i)] = shard_bytes(tmp_path, i)
        server.script(prepare.shard_filename(i), fault, "ok")
    server.files[prepare.VAL_FILENAME] = shard_bytes(tmp_path, 99)
    data_dir = str(tmp_path / "cache" / "data")
    os.makedirs(data_dir)
    with open(os.path.join(data_dir, "shard_00002.parquet"), "wb") as f:  # a corrupt shard in the cache
        f.write(server.files["shard_00002.parquet"][:500])

    code, out, err = finish(run_prepare(tmp_path / "cache", len(faults), url=server.url))
    assert code == 1, err
    assert "shard_00002.parquet: the cached file is not a readable parquet file" in out
    assert [server.gets(prepare.shard_filename(i)) for i in range(len(faults))] == [2, 2, 1, 1, 1]
    assert cache_listing(data_dir) == [prepare.shard_filename(i) for i in range(3)] + [prepare.VAL_FILENAME]
    assert err.count("could not fetch 2 of 6") == 1 and server.url in err
    assert "shard_00003.parquet: HTTPError: 404" in err and "shard_00004.parquet: ChunkedEncodingError" in err
    assert "Traceback" not in err and "%|" not in err


def test_interrupted_runs_leave_only_valid_shards_and_a_rerun_completes(server, tmp_path):
    """Ctrl-C, then SIGKILL, in the middle of a download from the hub; the third run completes."""
    for i in [0, 1, 2, prepare.VAL_SHARD]:
        server.files[prepare.shard_filename(i)] = shard_bytes(tmp_path, i)
    server.script("shard_00002.parquet", "trickle", "trickle", "ok")
    data_dir = tmp_path / "cache" / "data"
    done = [prepare.shard_filename(i) for i in [0, 1, prepare.VAL_SHARD]]

    def start_and_wait_for_the_slow_download(**popen):
        proc = run_prepare(tmp_path / "cache", 3, hub=server, **popen)
        trickled, deadline = server.trickled, time.time() + 90
        while not (server.trickled >= trickled + 256 and all((data_dir / n).exists() for n in done)):
            assert proc.poll() is None and time.time() < deadline, "prepare.py did not reach the slow download"
            time.sleep(0.05)
        return proc

    # 1. Ctrl-C, as a terminal sends it: to the whole process group
    proc = start_and_wait_for_the_slow_download(start_new_session=True)
    os.killpg(proc.pid, signal.SIGINT)
    code, out, err = finish(proc)
    assert code == 130 and "rerun prepare.py to continue" in err and "Traceback" not in err
    assert_only_valid_shards(data_dir)
    assert cache_listing(data_dir) == done

    # 2. SIGKILL: the download threads die with the process
    proc = start_and_wait_for_the_slow_download()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    requests_after_kill = len(server.log)
    server.release.set()  # ends the trickle, incomplete
    assert not (data_dir / "shard_00002.parquet").exists()

    # 3. a plain rerun continues where the others stopped
    time.sleep(0.5)
    assert len(server.log) == requests_after_kill  # nobody is left downloading
    code, out, err = finish(run_prepare(tmp_path / "cache", 3, hub=server))
    assert code == 0, err
    assert "3/4 shards already" in out
    assert_only_valid_shards(data_dir)
    assert cache_listing(data_dir) == sorted(done + ["shard_00002.parquet"])
    assert [server.gets(prepare.shard_filename(i)) for i in [0, 1, 2, prepare.VAL_SHARD]] == [1, 1, 3, 1]
