"""The hub's storage: the SQLite database and the bare git repository, shared by the API (hub/server.py)
and the page (hub/dashboard.py). Neither of those imports the other; both import this module.

- hub.sqlite3: agents (key hashes), channels, posts, commit records (SCHEMA). WAL journal, synchronous=FULL.
- repo.git: every pushed commit, reachable by refs/commits/<hash>; `git()` runs git on it.
"""

import contextlib
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time

# Every git child: killed after GIT_TIMEOUT_S, its stdout cut at GIT_OUTPUT_BYTES, its heap at GIT_HEAP_BYTES
# (a push's pack may hold a delta that expands to gigabytes; git then fails with "out of memory").
GIT_TIMEOUT_S = 60
GIT_OUTPUT_BYTES = 64 << 20
GIT_HEAP_BYTES = 1 << 30
# Each git child runs as `setpriv --pdeathsig KILL -- prlimit --data=<heap> -- nice -n 5 git ...` (util-linux):
# it dies with the hub, its heap is capped, the hub's own thread goes first. Not with preexec_fn: for that,
# Python forks a copy of the whole hub while holding the GIL (50 ms for a 200 MB hub, and every other request
# waits), where it otherwise spawns directly (4 ms; the three wrappers add 5 ms). Without util-linux (macOS),
# git runs unwrapped.
WRAP = (["setpriv", "--pdeathsig", "KILL", "--", "prlimit", f"--data={GIT_HEAP_BYTES}", "--", "nice", "-n", "5"]
        if shutil.which("setpriv") and shutil.which("prlimit") else [])

HASH_PREFIX = re.compile(r"[0-9a-f]{4,40}")
SCHEMA = """
CREATE TABLE IF NOT EXISTS agents(id TEXT PRIMARY KEY, key_hash TEXT NOT NULL UNIQUE, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS channels(name TEXT PRIMARY KEY, description TEXT NOT NULL DEFAULT '', created_by TEXT,
                                    created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS posts(id INTEGER PRIMARY KEY AUTOINCREMENT, channel TEXT NOT NULL REFERENCES channels(name),
                                 agent_id TEXT NOT NULL, content TEXT NOT NULL, created_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS posts_by_channel ON posts(channel, id);
CREATE TABLE IF NOT EXISTS commits(hash TEXT PRIMARY KEY, parent_hash TEXT, agent_id TEXT NOT NULL, message TEXT NOT NULL,
                                   created_at REAL NOT NULL, prepare_py TEXT);
CREATE INDEX IF NOT EXISTS commits_by_parent ON commits(parent_hash);
CREATE INDEX IF NOT EXISTS commits_by_time ON commits(created_at);
CREATE INDEX IF NOT EXISTS roots_by_prepare ON commits(prepare_py, created_at) WHERE parent_hash IS NULL;
CREATE INDEX IF NOT EXISTS roots_by_agent ON commits(agent_id) WHERE parent_hash IS NULL;
"""
COMMIT_FIELDS = "hash, parent_hash, agent_id, message, prepare_py, created_at"


class HubError(Exception):
    """An answer other than success: status code, message, extra headers."""

    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


# ---------------------------------------------------------------------------
# SQLite connections and git
# ---------------------------------------------------------------------------

def connect(db_path):
    conn = sqlite3.connect(db_path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # fsync the WAL at every commit: answered means durable
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def _feed(pipe, data):
    try:
        pipe.write(data)
        pipe.close()
    except OSError:  # the child died or stopped reading: its exit status says why
        pass


def git(repo, *args, env=None, input=None, check=True, timeout=GIT_TIMEOUT_S, max_output=GIT_OUTPUT_BYTES):
    """Run git on the bare repository; returns its stdout (bytes).

    input: bytes for stdin, or an open file to use as stdin. Bounds, each a HubError with a JSON answer:
    the child and its own children (its process group) are killed after `timeout` seconds (503) or once stdout
    passes `max_output` bytes (413); its heap is capped at GIT_HEAP_BYTES (beyond, git fails: 400); it dies
    with the hub (WRAP; its children then lose their pipes).
    A failure raises HubError(400) with git's last line of stderr, unless check=False.
    """
    piped = isinstance(input, bytes)
    start = time.monotonic()
    with tempfile.TemporaryFile() as err, subprocess.Popen(
            [*WRAP, "git", "--git-dir", repo, *args], env=env, stdout=subprocess.PIPE, stderr=err,
            stdin=subprocess.PIPE if piped else input or subprocess.DEVNULL, process_group=0) as proc:
        def kill():  # git's own children too: `bundle create` runs `pack-objects`, which holds the pipe
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        killer = threading.Timer(timeout, kill)
        killer.start()
        if piped:  # from another thread: git may fill stdout before it has read all of stdin
            threading.Thread(target=_feed, args=(proc.stdin, input), daemon=True).start()
        chunks, size = [], 0
        while size <= max_output and (chunk := proc.stdout.read1(1 << 16)):
            chunks.append(chunk)
            size += len(chunk)
        if size > max_output:
            kill()
        proc.wait()
        killer.cancel()
        err.seek(max(0, err.seek(0, os.SEEK_END) - 2000))
        message = err.read().decode(errors="replace").strip().splitlines()
    if size > max_output:
        raise HubError(413, f"git {args[0]}: output larger than {max_output} bytes")
    if proc.returncode != 0 and time.monotonic() - start >= timeout:
        raise HubError(503, f"git {args[0]}: took longer than {timeout:g} s")
    if check and proc.returncode != 0:
        raise HubError(400, f"git {args[0]}: {message[-1] if message else 'failed'}")
    return b"".join(chunks)


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# Commit records
# ---------------------------------------------------------------------------

# commits without children (the tips of exploration): a WHERE clause on `commits c`
LEAVES_WHERE = "WHERE NOT EXISTS (SELECT 1 FROM commits d WHERE d.parent_hash = c.hash)"


def commits_with_prefix(conn, prefix):
    """The full hashes of at most 2 commit records starting with `prefix` (lower-case hex): a range scan."""
    return [h for (h,) in conn.execute("SELECT hash FROM commits WHERE hash >= ? AND hash < ? LIMIT 2",
                                       (prefix, prefix + "g"))]


def resolve(conn, prefix):
    """The full hash of the one commit record starting with prefix; HubError 400/404/409 otherwise."""
    prefix = prefix.lower()
    if not HASH_PREFIX.fullmatch(prefix):
        raise HubError(400, f"{prefix!r} is not a commit hash (4 to 40 hex digits)")
    rows = commits_with_prefix(conn, prefix)
    if not rows:
        raise HubError(404, f"no commit {prefix}")
    if len(rows) > 1:
        raise HubError(409, f"{prefix} is ambiguous: give more digits")
    return rows[0]


def known_commits(conn, hashes):
    known = set()
    for i in range(0, len(hashes), 500):
        chunk = hashes[i:i + 500]
        query = f"SELECT hash FROM commits WHERE hash IN ({','.join('?' * len(chunk))})"
        known.update(row[0] for row in conn.execute(query, chunk))
    return known
