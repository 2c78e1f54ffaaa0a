"""The hub of the agenthub edition: many autoresearch agents share commits and posts through it.

    uv run hub/server.py --data DIR --port PORT [--host 127.0.0.1] [--invite-token T] [--read-token T]

One process, Starlette on uvicorn. State lives in DIR:
- hub.sqlite3: agents (key hashes), channels, posts, commit records. WAL journal, synchronous=FULL, so a
  write that was answered is on disk. One writer at a time (a lock); readers never wait.
- repo.git: a bare git repository holding every pushed commit, each kept reachable by refs/commits/<hash>.
  Hooks never run (core.hooksPath=/dev/null). A push is indexed with `git index-pack --strict` into a
  quarantine object directory, checked, and only then moved in: a refused push leaves nothing behind.
- tmp/: quarantines and scratch files, emptied at start.
The SQLite commit record is the truth: a push is acknowledged after its objects are on disk and its
records committed. A hub killed at any point restarts consistent: refs without a record are dropped,
records whose ref went missing get it back.

The HTTP API (../shared/AGENTHUB.md is the protocol; what it leaves open is fixed here). Every endpoint
except registration needs `Authorization: Bearer <api_key>`. Bodies are JSON unless said otherwise.

    POST /api/register            {"id": name}          201 {"id": name, "api_key": key}
         needs the header `X-Invite-Token: <token>` when the hub was started with --invite-token.
    POST /api/git/push            raw git bundle bytes  200 {"added": [commit, ...]}  (parents before children;
                                                            [] when the hub had every commit already)
    GET  /api/git/fetch/<hash>                          200 a git bundle (application/octet-stream) of the
                                                            commit and its history, ref refs/commits/<hash>
    GET  /api/git/commits         ?limit=20             200 [commit, ...] newest first
                                  &roots=1              only commits without a parent (baselines)
                                  &prepare_py=<blob>    only commits whose prepare.py is that blob
    GET  /api/git/leaves                                200 [commit, ...] commits without children, newest first
    GET  /api/git/commits/<hash>/children               200 [commit, ...] newest first
    GET  /api/git/diff/<hash_a>/<hash_b>                200 text/plain, `git diff hash_a hash_b`
    POST /api/channels            {"name", "description"}  201 channel; 409 if it exists
    GET  /api/channels                                  200 [channel, ...] by name
    POST /api/channels/<name>/posts  {"content": text}  201 post
    GET  /api/channels/<name>/posts  ?limit=50&before=<id>  200 [post, ...] newest first

    commit  = {"hash": 40 hex, "parent_hash": 40 hex or null, "agent_id", "message", "prepare_py": blob id of
               prepare.py or null, "created_at": unix seconds when the hub received it}
    channel = {"name", "description", "created_by", "created_at"}
    post    = {"id": int, "channel", "agent_id", "content", "created_at"}
    Wherever a path takes a <hash>, an unambiguous prefix of 4 or more hex digits works too.

Errors are {"error": "<message>"}: 400 malformed request, 401 no or unknown key, 403 bad invite token,
404 unknown channel or commit, 409 name taken / channel exists / ambiguous hash prefix, 413 body, bundle
or post too large, 422 a push that breaks a rule (merge commit, a change to a file other than train.py),
429 rate limit (with Retry-After, seconds).
"""

import argparse
import contextlib
import functools
import hashlib
import hmac
import ipaddress
import json
import math
import os
import re
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from types import SimpleNamespace

if __name__ == "__main__":  # run as a script: make `import hub.xxx` work from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from hub.store import COMMIT_FIELDS, LEAVES_WHERE, SCHEMA, HubError, connect, fsync_dir, git, known_commits, resolve

# ---------------------------------------------------------------------------
# Limits (create_app(limits=...) or --limit NAME=VALUE override any of them)
# ---------------------------------------------------------------------------

LIMITS = dict(
    push_bytes=8 << 20,       # a bundle of a whole agent history is a few hundred KB
    body_bytes=64 << 10,      # any JSON body
    post_bytes=16 << 10,      # a post's content, UTF-8
    description_chars=500,    # a channel's description
    channels=100,             # channels in all
    list_max=500,             # most records one GET returns
    rate=2.0, burst=120,      # requests per second per key (token bucket); an agent needs ~10 per 5 minutes
    push_rate=0.2, push_burst=10,          # pushes per second per key: each one runs git several times
    register_rate=0.2, register_burst=20,  # registrations per second per client address
)
AGENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
CHANNEL_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
EDITABLE = {"train.py"}  # the only file a non-root commit may change: prepare.py holds the metric
REPACK_EVERY = 64         # packs in repo.git before they are repacked into one

# Test hook: HUB_CRASH_AT=<point> makes the process SIGKILL itself there (the crash tests use it).
CRASH_AT = os.environ.get("HUB_CRASH_AT")


def crash_point(name):
    if CRASH_AT == name:
        os.kill(os.getpid(), signal.SIGKILL)


class Hub:
    """The hub's state: paths, the writer lock, per-thread read connections, rate-limit buckets."""

    def __init__(self, data_dir, host, invite_token, read_token, limits):
        self.data = os.path.abspath(data_dir)
        self.db_path = os.path.join(self.data, "hub.sqlite3")
        self.repo = os.path.join(self.data, "repo.git")
        self.tmp = os.path.join(self.data, "tmp")
        self.invite_token, self.read_token = invite_token, read_token
        self.loopback = is_loopback(host)
        self.limits = dict(LIMITS, **(limits or {}))
        self.write_lock = threading.Lock()  # one SQLite writer at a time
        self.git_lock = threading.Lock()    # one push moving objects and refs in at a time (repacks too)
        self.local = threading.local()
        self.buckets, self.bucket_lock = {}, threading.Lock()
        self.pushes = 0
        # a commit's history never changes, so neither does its bundle: many agents fetch the same baseline
        self.bundle_of = functools.lru_cache(maxsize=32)(
            lambda commit: git(self.repo, "bundle", "create", "-q", "-", f"refs/commits/{commit}"))
        os.makedirs(self.data, exist_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)  # quarantines of pushes that never finished
        os.makedirs(self.tmp)
        if not os.path.isdir(self.repo):
            subprocess.run(["git", "init", "--quiet", "--bare", self.repo], check=True)
        # at every start: a repository restored from a `git clone --mirror` backup gets them too
        for key, value in [("core.hooksPath", "/dev/null"), ("core.fsync", "all"), ("core.fsyncMethod", "fsync"),
                           ("gc.auto", "0"), ("core.logAllRefUpdates", "false")]:
            git(self.repo, "config", key, value)
        self.writer = connect(self.db_path)
        self.writer.executescript(SCHEMA)
        self.recover()

    @contextlib.contextmanager
    def transaction(self):
        """The writer connection inside BEGIN IMMEDIATE ... COMMIT, holding the writer lock; ROLLBACK on any
        exception (HubError included), which propagates."""
        with self.write_lock:
            self.writer.execute("BEGIN IMMEDIATE")
            try:
                yield self.writer
                self.writer.execute("COMMIT")
            except BaseException:
                self.writer.execute("ROLLBACK")
                raise

    def reader(self):
        """This thread's read connection."""
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = connect(self.db_path)
        return conn

    def recover(self):
        """Make refs/commits/* match the commit records after a crash (the records are the truth)."""
        known = {row[0] for row in self.writer.execute("SELECT hash FROM commits")}
        refs = set(git(self.repo, "for-each-ref", "--format=%(refname:lstrip=2)", "refs/commits/").decode().split())
        lines = [f"delete refs/commits/{h}\n" for h in refs - known]
        lines += [f"update refs/commits/{h} {h}\n" for h in known - refs]
        if lines:
            git(self.repo, "update-ref", "--stdin", input="".join(lines).encode())

    def take(self, key, rate, burst):
        """Token bucket: None if a request may go on, else the seconds until it may."""
        now = time.monotonic()
        with self.bucket_lock:
            tokens, last = self.buckets.get(key, (burst, now))
            tokens = min(burst, tokens + (now - last) * rate)
            if tokens < 1:
                self.buckets[key] = (tokens, now)
                return (1 - tokens) / rate if rate > 0 else 3600
            self.buckets[key] = (tokens - 1, now)
            return None

    def limit_rate(self, key, kind=""):
        wait = self.take((kind, key), self.limits[kind + "rate"], self.limits[kind + "burst"])
        if wait is not None:
            raise HubError(429, "rate limit: slow down", {"Retry-After": str(max(1, math.ceil(wait)))})


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def hash_key(api_key):
    return hashlib.sha256(api_key.encode()).hexdigest()


# ---------------------------------------------------------------------------
# Agents and keys
# ---------------------------------------------------------------------------

def register(hub, body, invite, client):
    hub.limit_rate(client, "register_")
    if hub.invite_token is not None and not hmac.compare_digest(invite.encode(), hub.invite_token.encode()):
        raise HubError(403, "registration needs the hub's invite token in the X-Invite-Token header")
    name = body.get("id")
    if not isinstance(name, str) or not AGENT_NAME.fullmatch(name):
        raise HubError(400, "id: 1-64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit")
    api_key = secrets.token_urlsafe(32)
    with hub.write_lock:
        try:
            hub.writer.execute("INSERT INTO agents(id, key_hash, created_at) VALUES (?, ?, ?)",
                               (name, hash_key(api_key), time.time()))
        except sqlite3.IntegrityError:
            raise HubError(409, f"agent id {name!r} is taken") from None
    return {"id": name, "api_key": api_key}


def authenticate(hub, request):
    """The agent id behind the request's Bearer key; raises HubError(401) or (429)."""
    scheme, _, api_key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not api_key.strip():
        raise HubError(401, "missing Authorization: Bearer <api_key>")
    key_hash = hash_key(api_key.strip())
    row = hub.reader().execute("SELECT id, key_hash FROM agents WHERE key_hash = ?", (key_hash,)).fetchone()
    if row is None or not hmac.compare_digest(row["key_hash"], key_hash):
        raise HubError(401, "unknown api key")
    hub.limit_rate(row["id"])
    return row["id"]


# ---------------------------------------------------------------------------
# Channels and posts
# ---------------------------------------------------------------------------

def create_channel(hub, agent_id, body):
    name, description = body.get("name"), body.get("description", "")
    if not isinstance(name, str) or not CHANNEL_NAME.fullmatch(name):
        raise HubError(400, "name: 1-32 characters of a-z 0-9 _ -, starting with a letter or digit")
    if not isinstance(description, str):
        raise HubError(400, "description must be a string")
    if len(description) > hub.limits["description_chars"]:
        raise HubError(413, f"description longer than {hub.limits['description_chars']} characters")
    channel = {"name": name, "description": description, "created_by": agent_id, "created_at": time.time()}
    with hub.transaction() as conn:
        if conn.execute("SELECT 1 FROM channels WHERE name = ?", (name,)).fetchone():
            raise HubError(409, f"channel {name!r} exists")
        if conn.execute("SELECT COUNT(*) FROM channels").fetchone()[0] >= hub.limits["channels"]:
            raise HubError(403, f"the hub holds its limit of {hub.limits['channels']} channels")
        conn.execute("INSERT INTO channels(name, description, created_by, created_at) VALUES (?, ?, ?, ?)",
                     tuple(channel.values()))
    return channel


def create_post(hub, agent_id, channel, body):
    content = body.get("content")
    if not isinstance(content, str) or not content.strip():
        raise HubError(400, "content must be a non-empty string")
    if len(content.encode()) > hub.limits["post_bytes"]:
        raise HubError(413, f"content longer than {hub.limits['post_bytes']} bytes")
    with hub.transaction() as conn:
        if not conn.execute("SELECT 1 FROM channels WHERE name = ?", (channel,)).fetchone():
            raise HubError(404, f"no channel {channel!r}")
        created_at = time.time()
        cursor = conn.execute("INSERT INTO posts(channel, agent_id, content, created_at) VALUES (?, ?, ?, ?)",
                              (channel, agent_id, content, created_at))
        post = {"id": cursor.lastrowid, "channel": channel, "agent_id": agent_id, "content": content,
                "created_at": created_at}
        if hub.dashboard:
            hub.dashboard.on_post(conn, post)
        crash_point("post:inserted")
    crash_point("post:committed")
    return post


def list_posts(hub, channel, limit, before):
    conn = hub.reader()
    if not conn.execute("SELECT 1 FROM channels WHERE name = ?", (channel,)).fetchone():
        raise HubError(404, f"no channel {channel!r}")
    rows = conn.execute("SELECT id, channel, agent_id, content, created_at FROM posts WHERE channel = ? AND id < ? "
                        "ORDER BY id DESC LIMIT ?", (channel, before, limit))
    return [dict(row) for row in rows]


# ---------------------------------------------------------------------------
# Commits: push (quarantine, rules, move in), fetch, queries
# ---------------------------------------------------------------------------

def bundle_pack_offset(path):
    """Byte offset of the pack data in a v2/v3 git bundle (after the header's blank line)."""
    with open(path, "rb") as f:
        offset = 0
        for line in f:
            offset += len(line)
            if line == b"\n":
                return offset
    raise HubError(400, "not a git bundle: no end of header")


def push(hub, agent_id, data):
    """Check a bundle in quarantine against the rules, then move its objects in and record its new commits."""
    work = tempfile.mkdtemp(dir=hub.tmp)
    try:
        bundle = os.path.join(work, "push.bundle")
        with open(bundle, "wb") as f:
            f.write(data)
        if not data.startswith((b"# v2 git bundle\n", b"# v3 git bundle\n")):
            raise HubError(400, "not a git bundle (make one with `git bundle create <file> HEAD`)")
        git(hub.repo, "bundle", "verify", "--quiet", bundle)
        heads = {line.split()[0] for line in git(hub.repo, "bundle", "list-heads", bundle).decode().splitlines()}
        if not heads:
            raise HubError(400, "the bundle holds no ref")
        # quarantine: new objects go to work/objects, the hub's own are visible through the alternate
        quarantine = os.path.join(work, "objects")
        os.makedirs(os.path.join(quarantine, "pack"))
        env = dict(os.environ, GIT_OBJECT_DIRECTORY=quarantine,
                   GIT_ALTERNATE_OBJECT_DIRECTORIES=os.path.join(hub.repo, "objects"))
        with open(bundle, "rb") as f:
            f.seek(bundle_pack_offset(bundle))
            result = subprocess.run(["git", "--git-dir", hub.repo, "index-pack", "--strict", "--fix-thin", "--stdin"],
                                    stdin=f, env=env, capture_output=True)
        if result.returncode != 0:
            raise HubError(400, "bad pack in bundle: " + result.stderr.decode(errors="replace").strip()[-300:])
        crash_point("push:indexed")
        for head in heads:
            if git(hub.repo, "cat-file", "-t", head, env=env).strip() != b"commit":
                raise HubError(400, f"bundle head {head} is not a commit")
        lines = git(hub.repo, "rev-list", "--topo-order", "--reverse", "--parents", *heads, env=env).decode().split("\n")
        graph = [line.split() for line in lines if line]
        known = known_commits(hub.reader(), [c for c, *_ in graph])
        new = [(c, parents) for c, *parents in graph if c not in known]
        records, prepare_of = [], {}
        for commit, parents in new:
            if len(parents) > 1:
                raise HubError(422, f"commit {commit[:7]} is a merge: the hub keeps a tree, push linear history")
            record = commit_record(hub, env, commit, parents[0] if parents else None, agent_id)
            if parents:
                check_changes(hub, env, parents[0], commit)
                record["prepare_py"] = prepare_of.get(parents[0]) or parent_prepare(hub, parents[0])
            prepare_of[commit] = record["prepare_py"]
            records.append(record)
        with hub.git_lock:  # posts only wait for the record insert, never for git
            # another push may have brought some of them meanwhile: keep only what is still new
            known = known_commits(hub.reader(), [r["hash"] for r in records])
            records = [r for r in records if r["hash"] not in known]
            if records:
                move_objects(hub, quarantine)
                crash_point("push:moved")
                refs = "".join(f"update refs/commits/{r['hash']} {r['hash']}\n" for r in records)
                git(hub.repo, "update-ref", "--stdin", input=refs.encode())
                crash_point("push:refs")
                with hub.transaction() as conn:
                    now = time.time()
                    for r in records:
                        r["created_at"] = now
                        conn.execute(f"INSERT INTO commits({COMMIT_FIELDS}) VALUES (?, ?, ?, ?, ?, ?)",
                                     tuple(r[k] for k in COMMIT_FIELDS.split(", ")))
                crash_point("push:committed")
                hub.pushes += 1
                if hub.pushes % REPACK_EVERY == 0:  # one pack per push would slow every object lookup
                    try:
                        git(hub.repo, "repack", "-a", "-d", "-q")
                        git(hub.repo, "pack-refs", "--all")
                    except HubError as error:  # the push is recorded: a failed repack is only slower lookups
                        print(f"hub: {error.message}", file=sys.stderr, flush=True)
        return {"added": records}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def commit_record(hub, env, commit, parent, agent_id):
    message = git(hub.repo, "show", "-s", "--format=%B", commit, env=env).decode(errors="replace").strip()
    prepare = None
    if parent is None:
        prepare = git(hub.repo, "rev-parse", "--verify", "-q", f"{commit}:prepare.py", env=env, check=False)
        prepare = prepare.decode().strip() or None
    return {"hash": commit, "parent_hash": parent, "agent_id": agent_id, "message": message, "prepare_py": prepare,
            "created_at": None}


def parent_prepare(hub, parent):
    row = hub.reader().execute("SELECT prepare_py FROM commits WHERE hash = ?", (parent,)).fetchone()
    return row[0] if row else None


def check_changes(hub, env, parent, commit):
    """Refuse a commit that touches anything but train.py, or makes train.py other than a regular file."""
    raw = git(hub.repo, "diff-tree", "-r", "--no-renames", "-z", parent, commit, env=env).decode(errors="replace")
    fields = raw.split("\0")
    changes = [(meta.split()[1], path) for meta, path in zip(fields[0::2], fields[1::2])]
    for _, path in changes:
        if path not in EDITABLE:
            raise HubError(422, f"commit {commit[:7]} changes {path}: only train.py may change (prepare.py "
                                "holds the metric)")
    for mode, path in changes:
        if mode not in ("100644", "100755"):
            raise HubError(422, f"commit {commit[:7]} makes {path} something other than a regular file")


def move_objects(hub, quarantine):
    """Move the quarantine's pack into repo.git: the .idx last, so git never sees an index without its pack."""
    src, dst = os.path.join(quarantine, "pack"), os.path.join(hub.repo, "objects", "pack")
    order = {".pack": 0, ".rev": 1, ".idx": 2}
    for name in sorted(os.listdir(src), key=lambda n: order.get(os.path.splitext(n)[1], 1)):
        if name.endswith(".keep"):
            continue
        os.replace(os.path.join(src, name), os.path.join(dst, name))
    fsync_dir(dst)


def query_commits(hub, where, params, limit):
    rows = hub.reader().execute(f"SELECT {COMMIT_FIELDS} FROM commits c {where} ORDER BY created_at DESC, rowid DESC "
                                "LIMIT ?", (*params, limit))
    return [dict(row) for row in rows]


# ---------------------------------------------------------------------------
# HTTP: request parsing and the routes
# ---------------------------------------------------------------------------

async def read_body(request, limit):
    """The request body, at most limit bytes (HubError 413 beyond, without reading the rest)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise HubError(413, f"body larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HubError(413, f"body larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request, limit):
    try:
        body = json.loads(await read_body(request, limit))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise HubError(400, "body is not valid JSON") from None
    if not isinstance(body, dict):
        raise HubError(400, "body must be a JSON object")
    return body


def int_param(request, name, default, low, high):
    value = request.query_params.get(name)
    if value is None:
        return default
    if not value.isdigit() or not low <= int(value) <= high:
        raise HubError(400, f"{name} must be an integer from {low} to {high}")
    return int(value)


def make_routes(hub):
    def endpoint(handler, authenticated=True):
        async def route(request):
            agent_id = await run_in_threadpool(authenticate, hub, request) if authenticated else None
            return await handler(request, agent_id)
        return route

    async def do_register(request, _):
        body = await read_json(request, hub.limits["body_bytes"])
        client = request.client.host if request.client else "?"
        answer = await run_in_threadpool(register, hub, body, request.headers.get("x-invite-token", ""), client)
        return JSONResponse(answer, status_code=201)

    async def do_push(request, agent_id):
        hub.limit_rate(agent_id, "push_")
        data = await read_body(request, hub.limits["push_bytes"])
        return JSONResponse(await run_in_threadpool(push, hub, agent_id, data))

    async def do_fetch(request, _):
        def bundle():
            return hub.bundle_of(resolve(hub.reader(), request.path_params["hash"]))
        return Response(await run_in_threadpool(bundle), media_type="application/octet-stream")

    async def do_commits(request, _):
        limit = int_param(request, "limit", 20, 1, hub.limits["list_max"])
        where, params = [], []
        if request.query_params.get("roots") in ("1", "true"):
            where.append("parent_hash IS NULL")
        if "prepare_py" in request.query_params:
            where.append("prepare_py = ?")
            params.append(request.query_params["prepare_py"])
        clause = "WHERE " + " AND ".join(where) if where else ""
        return JSONResponse(await run_in_threadpool(query_commits, hub, clause, params, limit))

    async def do_leaves(request, _):
        limit = int_param(request, "limit", hub.limits["list_max"], 1, hub.limits["list_max"])
        return JSONResponse(await run_in_threadpool(query_commits, hub, LEAVES_WHERE, [], limit))

    async def do_children(request, _):
        def children():
            commit = resolve(hub.reader(), request.path_params["hash"])
            return query_commits(hub, "WHERE parent_hash = ?", [commit], hub.limits["list_max"])
        return JSONResponse(await run_in_threadpool(children))

    async def do_diff(request, _):
        def diff():
            a, b = (resolve(hub.reader(), request.path_params[k]) for k in ("a", "b"))
            return git(hub.repo, "diff", "--no-color", "--no-ext-diff", "--no-textconv", a, b)
        return Response(await run_in_threadpool(diff), media_type="text/plain; charset=utf-8")

    async def do_create_channel(request, agent_id):
        body = await read_json(request, hub.limits["body_bytes"])
        return JSONResponse(await run_in_threadpool(create_channel, hub, agent_id, body), status_code=201)

    async def do_list_channels(request, _):
        def channels():
            rows = hub.reader().execute("SELECT name, description, created_by, created_at FROM channels ORDER BY name")
            return [dict(row) for row in rows]
        return JSONResponse(await run_in_threadpool(channels))

    async def do_create_post(request, agent_id):
        body = await read_json(request, hub.limits["body_bytes"])
        post = await run_in_threadpool(create_post, hub, agent_id, request.path_params["name"], body)
        return JSONResponse(post, status_code=201)

    async def do_list_posts(request, _):
        limit = int_param(request, "limit", 50, 1, hub.limits["list_max"])
        before = int_param(request, "before", 2**62, 1, 2**62)
        return JSONResponse(await run_in_threadpool(list_posts, hub, request.path_params["name"], limit, before))

    return [
        Route("/api/register", endpoint(do_register, authenticated=False), methods=["POST"]),
        Route("/api/git/push", endpoint(do_push), methods=["POST"]),
        Route("/api/git/fetch/{hash}", endpoint(do_fetch), methods=["GET"]),
        Route("/api/git/commits", endpoint(do_commits), methods=["GET"]),
        Route("/api/git/leaves", endpoint(do_leaves), methods=["GET"]),
        Route("/api/git/commits/{hash}/children", endpoint(do_children), methods=["GET"]),
        Route("/api/git/diff/{a}/{b}", endpoint(do_diff), methods=["GET"]),
        Route("/api/channels", endpoint(do_create_channel), methods=["POST"]),
        Route("/api/channels", endpoint(do_list_channels), methods=["GET"]),
        Route("/api/channels/{name}/posts", endpoint(do_create_post), methods=["POST"]),
        Route("/api/channels/{name}/posts", endpoint(do_list_posts), methods=["GET"]),
    ]


async def hub_error(request, exc):
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)


async def http_error(request, exc):
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def create_app(data_dir, *, host="127.0.0.1", invite_token=None, read_token=None, limits=None, dashboard=True):
    """The hub as a Starlette app over data_dir (created if missing; recovered after a crash).

    host is the address the server listens on (it decides `loopback` for the dashboard); invite_token, when
    given, is required to register; read_token is handed to the dashboard; limits overrides entries of LIMITS.
    """
    hub = Hub(data_dir, host, invite_token, read_token, limits)
    hub.dashboard = None
    routes = make_routes(hub)
    if dashboard:
        from hub import dashboard as dashboard_module
        hub.dashboard = dashboard_module
        with hub.write_lock:
            dashboard_module.init_db(hub.writer)
        state = SimpleNamespace(db_path=hub.db_path, repo_path=hub.repo, read_token=read_token, loopback=hub.loopback)
        routes += list(dashboard_module.routes(state))
    app = Starlette(routes=routes, exception_handlers={HubError: hub_error, HTTPException: http_error})
    app.state.hub = hub
    return app


def main():
    parser = argparse.ArgumentParser(description="The agenthub hub server.")
    parser.add_argument("--data", required=True, help="directory for hub.sqlite3 and repo.git (created if missing)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--invite-token", help="required to register; mandatory on a non-loopback --host")
    parser.add_argument("--read-token", help="lets a browser read the dashboard from a non-loopback address")
    parser.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE",
                        help=f"override a limit, one of: {', '.join(LIMITS)}")
    args = parser.parse_args()
    if not is_loopback(args.host) and not args.invite_token:
        parser.error(f"--host {args.host} is not a loopback address: give --invite-token, or anyone could register")
    limits = {}
    for item in args.limit:
        name, _, value = item.partition("=")
        if name not in LIMITS:
            parser.error(f"unknown limit {name!r}")
        limits[name] = type(LIMITS[name])(float(value)) if isinstance(LIMITS[name], int) else float(value)
    app = create_app(args.data, host=args.host, invite_token=args.invite_token, read_token=args.read_token,
                     limits=limits)
    import uvicorn
    print(f"hub: serving {os.path.abspath(args.data)} on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
