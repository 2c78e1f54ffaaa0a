"""The hub's storage: the SQLite database and the bare git repository, shared by the API (hub/server.py)
and the page (hub/dashboard.py). Neither of those imports the other; both import this module.

- hub.sqlite3: agents (key hashes), channels, posts, commit records (SCHEMA). WAL journal, synchronous=FULL.
- repo.git: every pushed commit, reachable by refs/commits/<hash>; `git()` runs git on it.
"""

import os
import re
import sqlite3
import subprocess

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


def git(repo, *args, env=None, input=None, check=True):
    """Run git on the bare repository; returns stdout bytes, raises HubError(400) with git's message on failure."""
    result = subprocess.run(["git", "--git-dir", repo, *args], env=env, input=input, capture_output=True)
    if check and result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip().splitlines()
        raise HubError(400, f"git {args[0]}: {message[-1] if message else 'failed'}")
    return result.stdout


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
