"""The hub server (hub/server.py): every endpoint, its errors and limits, each rule refusing, recovery.

In process through Starlette's TestClient; the crash and load tests with a real server are in
tests/test_hub_durability.py.
"""

import contextlib
import hashlib
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import requests
from starlette.testclient import TestClient

from hub import server, store
from hub_helpers import (BASELINE_FILES, ROOT, HubProcess, alive, baseline_repo, bundle, commit_file, fake_git,
                         pack_bundle, run_git)


@pytest.fixture
def make_hub(tmp_path):
    """make_hub(**create_app options) -> TestClient over a fresh data directory (tmp_path/data)."""
    clients = []

    def make(**options):
        client = TestClient(server.create_app(str(tmp_path / "data"), **options))
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def hub(make_hub):
    return make_hub()


def register(client, name="alpha"):
    answer = client.post("/api/register", json={"id": name})
    assert answer.status_code == 201, answer.text
    return {"Authorization": "Bearer " + answer.json()["api_key"]}


def push(client, auth, data):
    return client.post("/api/git/push", content=data, headers=auth)


def db(tmp_path):
    conn = sqlite3.connect(tmp_path / "data" / "hub.sqlite3")
    conn.row_factory = sqlite3.Row
    return conn


def hub_refs(tmp_path):
    out = run_git(tmp_path / "data" / "repo.git", "for-each-ref", "--format=%(refname)")
    return sorted(out.split())


def object_count(tmp_path):
    out = run_git(tmp_path / "data" / "repo.git", "count-objects", "-v")
    counts = dict(line.split(": ") for line in out.splitlines())
    return int(counts["count"]) + int(counts["in-pack"])


# ---------------------------------------------------------------------------
# Registration and keys
# ---------------------------------------------------------------------------

def test_register_returns_a_key_stored_only_as_its_hash(hub, tmp_path):
    answer = hub.post("/api/register", json={"id": "alpha-1.B_2"})
    assert answer.status_code == 201
    body = answer.json()
    assert set(body) == {"id", "api_key"} and body["id"] == "alpha-1.B_2" and len(body["api_key"]) >= 40
    (row,) = db(tmp_path).execute("SELECT * FROM agents").fetchall()
    assert row["id"] == "alpha-1.B_2"
    assert row["key_hash"] == hashlib.sha256(body["api_key"].encode()).hexdigest()
    for name in os.listdir(tmp_path / "data"):  # the key itself is nowhere on disk
        if os.path.isfile(tmp_path / "data" / name):
            assert body["api_key"].encode() not in (tmp_path / "data" / name).read_bytes()
    other = hub.post("/api/register", json={"id": "beta"}).json()["api_key"]
    assert other != body["api_key"]


@pytest.mark.parametrize("body", [{"id": ""}, {"id": "a/b"}, {"id": "-x"}, {"id": "x" * 65}, {"id": 7}, {},
                                  {"id": "naïve"}, {"id": "a b"}])
def test_register_refuses_bad_names(hub, body):
    answer = hub.post("/api/register", json=body)
    assert answer.status_code == 400 and "id:" in answer.json()["error"]


def test_register_refuses_a_taken_name(hub):
    register(hub, "alpha")
    answer = hub.post("/api/register", json={"id": "alpha"})
    assert answer.status_code == 409 and "taken" in answer.json()["error"]


JSON = {"Content-Type": "application/json"}


def test_register_refuses_bodies_that_are_not_json_objects_or_too_large(hub):
    assert hub.post("/api/register", content=b"{nope", headers=JSON).status_code == 400
    assert hub.post("/api/register", json=["alpha"]).status_code == 400
    assert hub.post("/api/register", content=b"[" * 50000, headers=JSON).status_code == 400  # deeper than json allows
    answer = hub.post("/api/register", content=b'{"id": "' + b"a" * (70 << 10) + b'"}', headers=JSON)
    assert answer.status_code == 413 and "larger" in answer.json()["error"]


def test_invite_token_is_required_when_given(make_hub):
    hub = make_hub(invite_token="s3cret")
    assert hub.post("/api/register", json={"id": "alpha"}).status_code == 403
    wrong = hub.post("/api/register", json={"id": "alpha"}, headers={"X-Invite-Token": "s3cres"})
    assert wrong.status_code == 403 and "invite" in wrong.json()["error"]
    assert hub.post("/api/register", json={"id": "alpha"}, headers={"X-Invite-Token": "s3cret"}).status_code == 201


def test_server_refuses_a_public_address_without_an_invite_token(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "hub", "server.py"), "--data", str(tmp_path / "d"),
                             "--port", "1", "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--invite-token" in result.stderr
    assert not (tmp_path / "d").exists()


def test_is_loopback():
    assert all(server.is_loopback(h) for h in ("127.0.0.1", "127.5.0.1", "::1", "localhost"))
    assert not any(server.is_loopback(h) for h in ("0.0.0.0", "192.168.1.4", "::", "example.com"))


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer ", "Basic abc", "Bearer wrong-key", "wrong-key"])
def test_every_endpoint_but_register_needs_a_valid_key(hub, header):
    register(hub)
    headers = {"Authorization": header} if header else {}
    for method, path in [("POST", "/api/git/push"), ("GET", "/api/git/fetch/abcd"), ("GET", "/api/git/commits"),
                         ("GET", "/api/git/leaves"), ("GET", "/api/git/commits/abcd/children"),
                         ("GET", "/api/git/diff/abcd/abcd"), ("POST", "/api/channels"), ("GET", "/api/channels"),
                         ("POST", "/api/channels/results/posts"), ("GET", "/api/channels/results/posts")]:
        answer = hub.request(method, path, headers=headers)
        assert answer.status_code == 401, (method, path)
        assert "error" in answer.json()


def test_unknown_paths_answer_json_404(hub):
    answer = hub.get("/api/nothing")
    assert answer.status_code == 404 and answer.json() == {"error": "Not Found"}


# ---------------------------------------------------------------------------
# Rate limits
# ---------------------------------------------------------------------------

def test_requests_per_key_are_rate_limited_with_retry_after(make_hub):
    hub = make_hub(limits={"rate": 0.01, "burst": 3})
    alpha, beta = register(hub, "alpha"), register(hub, "beta")
    for _ in range(3):
        assert hub.get("/api/channels", headers=alpha).status_code == 200
    answer = hub.get("/api/channels", headers=alpha)
    assert answer.status_code == 429 and "rate" in answer.json()["error"]
    assert 1 <= int(answer.headers["Retry-After"]) <= 100
    assert hub.get("/api/channels", headers=beta).status_code == 200  # per key


def test_pushes_and_registrations_have_their_own_limits(make_hub, tmp_path):
    hub = make_hub(limits={"push_rate": 0.01, "push_burst": 1, "register_rate": 0.01, "register_burst": 2})
    alpha = register(hub, "alpha")
    register(hub, "beta")
    answer = hub.post("/api/register", json={"id": "gamma"})
    assert answer.status_code == 429 and int(answer.headers["Retry-After"]) >= 1
    repo = tmp_path / "a"
    baseline_repo(repo)
    assert push(hub, alpha, bundle(repo)).status_code == 200
    answer = push(hub, alpha, bundle(repo))
    assert answer.status_code == 429 and int(answer.headers["Retry-After"]) >= 1
    assert hub.get("/api/git/leaves", headers=alpha).status_code == 200  # other requests still go


def test_token_bucket_refills_at_its_rate(hub):
    state = hub.app.state.hub
    assert [state.take("k", 1000.0, 2) for _ in range(2)] == [None, None]
    wait = state.take("k", 1000.0, 2)
    assert wait is not None and 0 < wait <= 0.001
    state.buckets["k"] = (0.0, state.buckets["k"][1] - 0.002)  # 2 ms later: two tokens back
    assert state.take("k", 1000.0, 2) is None


def test_rate_limit_state_stays_bounded_and_keeps_the_buckets_that_matter(make_hub):
    """Many client addresses guessing read tokens grew the buckets and the blocked addresses without bound.
    At the bound, refilled buckets and ended blocks are forgotten (nothing changes for them), then the least
    recently used half; a guesser's empty bucket survives."""
    hub = make_hub(limits={"buckets": 10, "guess_burst": 2})
    state = hub.app.state.hub
    now = time.monotonic()
    for i in range(6):  # refilled long ago
        state.buckets[("guess_", f"10.0.0.{i}")] = (0.0, now - 1000)
        state.blocked[f"10.0.0.{i}"] = now - 1
    for _ in range(3):
        state.take(("guess_", "10.9.9.9"), 0.2, 2)  # empties its bucket
    for i in range(3):
        state.take(("", f"agent{i}"), 2.0, 120)
    state.blocked["10.9.9.9"] = now + 60
    assert len(state.buckets) == 10
    state.take(("guess_", "10.1.1.1"), 0.2, 2)  # the eleventh key: forget first
    assert len(state.buckets) == 5 and ("guess_", "10.0.0.0") not in state.buckets
    assert state.take(("guess_", "10.9.9.9"), 0.2, 2) is not None  # still empty: still limited
    assert state.blocked == {"10.9.9.9": now + 60}
    for i in range(100):  # all recent: the least recently used half goes
        state.take(("register_", f"10.2.{i}.1"), 0.2, 20)
        assert len(state.buckets) <= 10
    assert ("register_", "10.2.99.1") in state.buckets


# ---------------------------------------------------------------------------
# Channels and posts
# ---------------------------------------------------------------------------

def test_channels_create_list_and_409(hub):
    auth = register(hub)
    answer = hub.post("/api/channels", json={"name": "results", "description": "one line per run"}, headers=auth)
    assert answer.status_code == 201
    channel = answer.json()
    assert {k: channel[k] for k in ("name", "description", "created_by")} == {
        "name": "results", "description": "one line per run", "created_by": "alpha"}
    assert isinstance(channel["created_at"], float)
    assert hub.post("/api/channels", json={"name": "discussion"}, headers=auth).status_code == 201
    again = hub.post("/api/channels", json={"name": "results", "description": "x"}, headers=auth)
    assert again.status_code == 409 and "exists" in again.json()["error"]
    listed = hub.get("/api/channels", headers=auth).json()
    assert [c["name"] for c in listed] == ["discussion", "results"]
    assert listed[1]["description"] == "one line per run"


@pytest.mark.parametrize("body,status", [({"name": "Results"}, 400), ({"name": "a" * 33}, 400), ({"name": "a/b"}, 400),
                                         ({"name": "_x"}, 400), ({}, 400), ({"name": "ok", "description": 3}, 400),
                                         ({"name": "ok", "description": "d" * 501}, 413)])
def test_channel_names_and_descriptions_are_limited(hub, body, status):
    answer = hub.post("/api/channels", json=body, headers=register(hub))
    assert answer.status_code == status and "error" in answer.json()


def test_number_of_channels_is_limited(make_hub):
    hub = make_hub(limits={"channels": 2})
    auth = register(hub)
    for name in ("a", "b"):
        assert hub.post("/api/channels", json={"name": name}, headers=auth).status_code == 201
    answer = hub.post("/api/channels", json={"name": "c"}, headers=auth)
    assert answer.status_code == 403 and "limit" in answer.json()["error"]


def test_posts_create_and_read_newest_first(hub):
    alpha, beta = register(hub, "alpha"), register(hub, "beta")
    hub.post("/api/channels", json={"name": "results"}, headers=alpha)
    sent = []
    for i in range(7):
        auth = alpha if i % 2 == 0 else beta
        answer = hub.post("/api/channels/results/posts", json={"content": f"run {i} | **ünïcode** ✓"}, headers=auth)
        assert answer.status_code == 201
        post = answer.json()
        assert set(post) == {"id", "channel", "agent_id", "content", "created_at"}
        assert post["channel"] == "results" and post["agent_id"] == ("alpha" if i % 2 == 0 else "beta")
        sent.append(post)
    assert hub.get("/api/channels/results/posts", headers=beta).json() == sent[::-1]
    assert hub.get("/api/channels/results/posts?limit=3", headers=beta).json() == sent[:3:-1]
    before = sent[3]["id"]
    assert hub.get(f"/api/channels/results/posts?limit=2&before={before}", headers=beta).json() == [sent[2], sent[1]]


def test_post_errors(make_hub):
    hub = make_hub(limits={"post_bytes": 100})
    auth = register(hub)
    hub.post("/api/channels", json={"name": "results"}, headers=auth)
    assert hub.post("/api/channels/nowhere/posts", json={"content": "x"}, headers=auth).status_code == 404
    assert hub.get("/api/channels/nowhere/posts", headers=auth).status_code == 404
    for body in ({"content": ""}, {"content": "  \n"}, {"content": 5}, {}):
        assert hub.post("/api/channels/results/posts", json=body, headers=auth).status_code == 400
    assert hub.post("/api/channels/results/posts", json={"content": "é" * 50}, headers=auth).status_code == 201
    big = hub.post("/api/channels/results/posts", json={"content": "é" * 51}, headers=auth)  # 102 bytes
    assert big.status_code == 413 and "100 bytes" in big.json()["error"]
    for query in ("limit=0", "limit=501", "limit=x", "before=-1"):
        assert hub.get(f"/api/channels/results/posts?{query}", headers=auth).status_code == 400


def test_dashboard_hook_runs_inside_the_post_transaction(hub):
    auth = register(hub)
    hub.post("/api/channels", json={"name": "results"}, headers=auth)
    seen = []

    class Dashboard:
        def on_post(self, conn, post):
            row = conn.execute("SELECT content FROM posts WHERE id = ?", (post["id"],)).fetchone()
            seen.append((row[0], post["content"]))
            if post["content"] == "boom":
                raise RuntimeError("dashboard failed")

    hub.app.state.hub.dashboard = Dashboard()
    assert hub.post("/api/channels/results/posts", json={"content": "fine"}, headers=auth).status_code == 201
    with pytest.raises(RuntimeError):
        hub.post("/api/channels/results/posts", json={"content": "boom"}, headers=auth)
    assert seen == [("fine", "fine"), ("boom", "boom")]
    assert [p["content"] for p in hub.get("/api/channels/results/posts", headers=auth).json()] == ["fine"]


# ---------------------------------------------------------------------------
# Pushes and the rules
# ---------------------------------------------------------------------------

def test_push_records_the_new_commits_and_keeps_them_in_git(hub, tmp_path):
    auth = register(hub)
    repo = tmp_path / "a"
    root = baseline_repo(repo)
    answer = push(hub, auth, bundle(repo))
    assert answer.status_code == 200
    (record,) = answer.json()["added"]
    prepare_blob = run_git(repo, "rev-parse", "HEAD:prepare.py")
    assert {k: v for k, v in record.items() if k != "created_at"} == {
        "hash": root, "parent_hash": None, "agent_id": "alpha", "message": "baseline", "prepare_py": prepare_blob}
    child = commit_file(repo, "train.py", "LR = 0.05\n", "raise LR to 0.05\n\nbody line")
    grandchild = commit_file(repo, "train.py", "LR = 0.06\n", "raise LR to 0.06")
    added = push(hub, auth, bundle(repo)).json()["added"]
    assert [(r["hash"], r["parent_hash"], r["message"]) for r in added] == [
        (child, root, "raise LR to 0.05\n\nbody line"), (grandchild, child, "raise LR to 0.06")]
    assert all(r["prepare_py"] == prepare_blob for r in added)
    assert push(hub, auth, bundle(repo)).json() == {"added": []}  # nothing new: nothing added
    assert hub_refs(tmp_path) == sorted(f"refs/commits/{h}" for h in (root, child, grandchild))
    git_dir = tmp_path / "data" / "repo.git"
    assert run_git(git_dir, "show", f"{grandchild}:train.py") == "LR = 0.06"
    subprocess.run(["git", "--git-dir", str(git_dir), "fsck", "--strict"], check=True, capture_output=True)
    assert os.listdir(tmp_path / "data" / "tmp") == []


def test_pushes_are_repacked_now_and_then(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(server, "REPACK_EVERY", 2)
    auth = register(hub)
    repo = tmp_path / "a"
    hashes = [baseline_repo(repo)]
    push(hub, auth, bundle(repo))
    pack_dir = tmp_path / "data" / "repo.git" / "objects" / "pack"
    for i in range(3):
        hashes.append(commit_file(repo, "train.py", f"LR = {i}\n", f"step {i}"))
        assert push(hub, auth, bundle(repo)).status_code == 200
        packs = [n for n in os.listdir(pack_dir) if n.endswith(".pack")]
        assert len(packs) == (1 if i % 2 == 0 else 2)  # after pushes 2 and 4: one pack
    assert hub_refs(tmp_path) == sorted(f"refs/commits/{h}" for h in hashes)
    fresh = tmp_path / "fresh"
    run_git(tmp_path, "init", "-q", str(fresh))
    (fresh / "x.bundle").write_bytes(hub.get(f"/api/git/fetch/{hashes[-1]}", headers=auth).content)
    run_git(fresh, "bundle", "unbundle", "x.bundle")
    assert run_git(fresh, "rev-list", hashes[-1]).split() == hashes[::-1]


def test_push_may_leave_out_commits_the_hub_has(hub, tmp_path):
    auth = register(hub)
    repo = tmp_path / "a"
    root = baseline_repo(repo)
    push(hub, auth, bundle(repo))
    child = commit_file(repo, "train.py", "LR = 0.05\n", "lr")
    (record,) = push(hub, auth, bundle(repo, f"{root}..HEAD")).json()["added"]  # prerequisite: root
    assert record["hash"] == child and record["parent_hash"] == root


def refused(hub, auth, data, tmp_path, status, words):
    """A push that must be refused: status, message, and nothing left behind in git or the database."""
    refs, objects = hub_refs(tmp_path), object_count(tmp_path)
    records = db(tmp_path).execute("SELECT COUNT(*) FROM commits").fetchone()[0]
    answer = push(hub, auth, data)
    assert answer.status_code == status, answer.text
    assert words in answer.json()["error"]
    assert hub_refs(tmp_path) == refs and object_count(tmp_path) == objects
    assert db(tmp_path).execute("SELECT COUNT(*) FROM commits").fetchone()[0] == records
    assert os.listdir(tmp_path / "data" / "tmp") == []
    return answer


@pytest.mark.parametrize("change", ["prepare.py", "new_file", "delete uv.lock", "symlink", "train.py and pyproject",
                                    "rename train.py"])
def test_push_refuses_commits_that_change_more_than_train_py(hub, tmp_path, change):
    auth = register(hub)
    repo = tmp_path / "a"
    baseline_repo(repo)
    assert push(hub, auth, bundle(repo)).status_code == 200
    commit_file(repo, "train.py", "LR = 0.05\n", "fine")  # a good commit first: it must not get in either
    if change == "prepare.py":
        commit_file(repo, "prepare.py", "METRIC = 'easier'\n", "cheat")
    elif change == "new_file":
        commit_file(repo, "helper.py", "x = 1\n", "add a file")
    elif change == "delete uv.lock":
        commit_file(repo, "uv.lock", None, "drop the lock")
    elif change == "symlink":
        os.remove(repo / "train.py")
        os.symlink("prepare.py", repo / "train.py")
        run_git(repo, "add", "train.py")
        run_git(repo, "commit", "-q", "-m", "link")
    elif change == "train.py and pyproject":
        (repo / "train.py").write_text("LR = 0.07\n")
        commit_file(repo, "pyproject.toml", "[project]\nname = 'y'\n", "two files")
    else:
        run_git(repo, "mv", "train.py", "train2.py")
        run_git(repo, "commit", "-q", "-m", "rename")
    answer = refused(hub, auth, bundle(repo), tmp_path, 422, "only train.py may change" if change != "symlink"
                     else "regular file")
    assert run_git(repo, "rev-parse", "--short=7", "HEAD") in answer.json()["error"]


def test_push_refuses_merge_commits(hub, tmp_path):
    auth = register(hub)
    repo = tmp_path / "a"
    root = baseline_repo(repo)
    push(hub, auth, bundle(repo))
    commit_file(repo, "train.py", "LR = 0.05\n", "one")
    run_git(repo, "checkout", "-q", "-b", "side", root)
    commit_file(repo, "train.py", "LR = 0.03\n", "two")
    run_git(repo, "merge", "-q", "-s", "ours", "-m", "merge", "agenthub")
    refused(hub, auth, bundle(repo), tmp_path, 422, "is a merge")


def test_push_refuses_a_commit_whose_parent_the_hub_lacks(hub, tmp_path):
    auth = register(hub)
    repo = tmp_path / "a"
    root = baseline_repo(repo)  # never pushed
    commit_file(repo, "train.py", "LR = 0.05\n", "child")
    refused(hub, auth, bundle(repo, f"{root}..HEAD"), tmp_path, 400, "git bundle")


def test_push_refuses_what_is_not_a_whole_bundle(make_hub, tmp_path):
    hub = make_hub(limits={"push_bytes": 4096})
    auth = register(hub)
    repo = tmp_path / "a"
    baseline_repo(repo)
    good = bundle(repo)
    refused(hub, auth, b"", tmp_path, 400, "not a git bundle")
    refused(hub, auth, b"PK\x03\x04 a zip file", tmp_path, 400, "not a git bundle")
    refused(hub, auth, good[: len(good) - 30], tmp_path, 400, "")  # cut short
    corrupt = bytearray(good)
    corrupt[-40] ^= 0xFF  # flip a byte in the pack: its checksum fails
    refused(hub, auth, bytes(corrupt), tmp_path, 400, "")
    header_end = good.index(b"\n\n") + 2
    refused(hub, auth, good[:header_end], tmp_path, 400, "")  # header without pack
    big = hub.post("/api/git/push", content=good + b"\0" * 5000, headers=auth)
    assert big.status_code == 413 and "4096" in big.json()["error"]
    assert push(hub, auth, good).status_code == 200  # the hub still takes a good one


def test_push_refuses_a_head_that_is_not_a_commit(hub, tmp_path):
    auth = register(hub)
    repo = tmp_path / "a"
    baseline_repo(repo)
    run_git(repo, "tag", "blobtag", run_git(repo, "rev-parse", "HEAD:train.py"))
    refused(hub, auth, bundle(repo, "blobtag"), tmp_path, 400, "not a commit")


# ---------------------------------------------------------------------------
# Reading the graph: commits, leaves, children, diff, fetch
# ---------------------------------------------------------------------------

@pytest.fixture
def graph(hub, tmp_path):
    """Two agents: alpha's root a0 -> a1 -> a2 and a1 -> b1 (beta built on a1); gamma's own root g0."""
    alpha, beta, gamma = (register(hub, n) for n in ("alpha", "beta", "gamma"))
    a = tmp_path / "a"
    h = {"a0": baseline_repo(a)}
    h["a1"] = commit_file(a, "train.py", "LR = 0.05\n", "a1")
    push(hub, alpha, bundle(a))
    b = tmp_path / "b"
    run_git(tmp_path, "clone", "-q", str(a), str(b))
    h["b1"] = commit_file(b, "train.py", "LR = 0.05\nWD = 0.1\n", "b1")
    h["a2"] = commit_file(a, "train.py", "LR = 0.06\n", "a2")
    push(hub, alpha, bundle(a))
    push(hub, beta, bundle(b))
    g = tmp_path / "g"
    h["g0"] = baseline_repo(g, train="LR = 1\n", prepare="METRIC = 'other'\n")
    push(hub, gamma, bundle(g))
    return h, alpha, {"a": a, "b": b, "g": g}


def test_commits_newest_first_with_limit_and_filters(hub, graph):
    h, auth, repos = graph
    records = hub.get("/api/git/commits", headers=auth).json()
    assert [r["hash"] for r in records] == [h["g0"], h["b1"], h["a2"], h["a1"], h["a0"]]
    assert [(r["agent_id"], r["message"]) for r in records] == [
        ("gamma", "baseline"), ("beta", "b1"), ("alpha", "a2"), ("alpha", "a1"), ("alpha", "baseline")]
    assert [r["hash"] for r in hub.get("/api/git/commits?limit=2", headers=auth).json()] == [h["g0"], h["b1"]]
    roots = hub.get("/api/git/commits?roots=1", headers=auth).json()
    assert [r["hash"] for r in roots] == [h["g0"], h["a0"]]
    blob = run_git(repos["a"], "hash-object", "prepare.py")
    same = hub.get(f"/api/git/commits?roots=1&prepare_py={blob}", headers=auth).json()
    assert [r["hash"] for r in same] == [h["a0"]]
    assert len(hub.get(f"/api/git/commits?prepare_py={blob}", headers=auth).json()) == 4
    assert hub.get("/api/git/commits?limit=0", headers=auth).status_code == 400


def test_leaves_and_children(hub, graph):
    h, auth, _ = graph
    leaves = hub.get("/api/git/leaves", headers=auth).json()
    assert sorted(r["hash"] for r in leaves) == sorted([h["a2"], h["b1"], h["g0"]])
    children = lambda c: sorted(r["hash"] for r in hub.get(f"/api/git/commits/{c}/children", headers=auth).json())
    assert children(h["a1"]) == sorted([h["a2"], h["b1"]])
    assert children(h["a0"]) == [h["a1"]]
    assert children(h["a1"][:7]) == sorted([h["a2"], h["b1"]])  # a short hash, as posted in results
    assert children(h["b1"]) == [] and children(h["g0"]) == []
    assert hub.get("/api/git/commits/0000000/children", headers=auth).status_code == 404
    assert hub.get("/api/git/commits/xyz/children", headers=auth).status_code == 400


def test_diff_is_git_diff_between_the_two(hub, graph):
    h, auth, repos = graph
    answer = hub.get(f"/api/git/diff/{h['a0'][:7]}/{h['b1']}", headers=auth)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    assert answer.text == subprocess.run(["git", "-C", str(repos["b"]), "diff", h["a0"], h["b1"]],
                                         capture_output=True, text=True).stdout
    assert "+WD = 0.1" in answer.text
    assert hub.get(f"/api/git/diff/{h['a0']}/{h['a0']}", headers=auth).text == ""
    assert hub.get(f"/api/git/diff/{h['a0']}/ffff", headers=auth).status_code == 404


def test_fetch_gives_a_bundle_the_agent_can_unbundle_and_check_out(hub, graph, tmp_path):
    h, auth, _ = graph
    answer = hub.get(f"/api/git/fetch/{h['b1'][:7]}", headers=auth)
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/octet-stream"
    fresh = tmp_path / "fresh"
    baseline_repo(fresh, train="other\n")  # an agent with its own, unrelated history
    (fresh / "b1.bundle").write_bytes(answer.content)
    run_git(fresh, "bundle", "unbundle", "b1.bundle")
    run_git(fresh, "checkout", "-q", h["b1"])
    assert (fresh / "train.py").read_text() == "LR = 0.05\nWD = 0.1\n"
    assert run_git(fresh, "rev-list", "HEAD").split() == [h["b1"], h["a1"], h["a0"]]
    assert hub.get("/api/git/fetch/abcdef1", headers=auth).status_code == 404
    assert hub.get("/api/git/fetch/not-a-hash", headers=auth).status_code == 400


def test_resolve_refuses_an_ambiguous_prefix():
    conn = sqlite3.connect(":memory:")
    conn.executescript(server.SCHEMA)
    for h in ("abcd" + "1" * 36, "abcd" + "2" * 36, "abce" + "0" * 36):
        conn.execute("INSERT INTO commits(hash, agent_id, message, created_at) VALUES (?, 'a', 'm', 0)", (h,))
    with pytest.raises(server.HubError) as error:
        server.resolve(conn, "abcd")
    assert error.value.status == 409
    assert server.resolve(conn, "ABCD1") == "abcd" + "1" * 36
    assert server.resolve(conn, "abce") == "abce" + "0" * 36
    assert server.resolve(conn, "abcd2") == "abcd" + "2" * 36


# ---------------------------------------------------------------------------
# Start-up recovery
# ---------------------------------------------------------------------------

def test_restart_drops_refs_without_a_record_and_restores_missing_refs(make_hub, tmp_path):
    hub = make_hub()
    auth = register(hub)
    repo = tmp_path / "a"
    root = baseline_repo(repo)
    push(hub, auth, bundle(repo))
    child = commit_file(repo, "train.py", "LR = 0.05\n", "child")
    push(hub, auth, bundle(repo))
    git_dir = tmp_path / "data" / "repo.git"
    run_git(git_dir, "update-ref", "-d", f"refs/commits/{child}")        # as if the ref were lost
    run_git(git_dir, "update-ref", "refs/commits/" + "0" * 40, root)     # as if a push died before its record
    (tmp_path / "data" / "tmp" / "leftover").mkdir()
    hub2 = make_hub()
    assert hub_refs(tmp_path) == sorted(f"refs/commits/{h}" for h in (root, child))
    assert os.listdir(tmp_path / "data" / "tmp") == []
    assert len(hub2.get("/api/git/commits", headers=auth).json()) == 2
    assert json.loads(hub2.get(f"/api/git/commits/{root}/children", headers=auth).text)[0]["hash"] == child


def test_backup_commands_of_the_docs_restore_a_working_hub(tmp_path):
    """docs/hub.md's backup block, run as written against a hub in $HOME/agenthub; the copy restarts whole."""
    with open(os.path.join(ROOT, "docs", "hub.md"), encoding="utf-8") as f:
        doc = f.read()
    (block,) = [b for b in re.findall(r"^```bash\n(.*?)^```", doc, re.MULTILINE | re.DOTALL) if "--mirror" in b]
    home = tmp_path / "home"
    hub = TestClient(server.create_app(str(home / "agenthub")))
    auth = register(hub)
    hub.post("/api/channels", json={"name": "results"}, headers=auth)
    hub.post("/api/channels/results/posts", json={"content": "before the backup"}, headers=auth)
    repo = tmp_path / "a"
    root = baseline_repo(repo)
    push(hub, auth, bundle(repo))
    result = subprocess.run(["bash", "-c", block], env=dict(os.environ, HOME=str(home)), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    hub.post("/api/channels/results/posts", json={"content": "after the backup"}, headers=auth)
    hub.close()
    restored = tmp_path / "restored"
    restored.mkdir()
    os.replace(home / "agenthub-backup.sqlite3", restored / "hub.sqlite3")
    os.replace(home / "agenthub-backup.git", restored / "repo.git")
    copy = TestClient(server.create_app(str(restored)))
    assert [p["content"] for p in copy.get("/api/channels/results/posts", headers=auth).json()] == ["before the backup"]
    assert [c["hash"] for c in copy.get("/api/git/commits", headers=auth).json()] == [root]
    fetched = copy.get(f"/api/git/fetch/{root}", headers=auth)
    assert fetched.status_code == 200
    assert run_git(restored / "repo.git", "config", "core.hooksPath") == "/dev/null"
    child = commit_file(repo, "train.py", "LR = 0.05\n", "child")
    assert [r["hash"] for r in push(copy, auth, bundle(repo)).json()["added"]] == [child]
    copy.close()


# ---------------------------------------------------------------------------
# Against a hostile agent: each finding of the red-team pass (P1-P13), reproduced
# ---------------------------------------------------------------------------

def root_repo(path, extra=None, drop=None, link=None):
    """A baseline repository whose root commit adds the file extra=(name, text), drops a file, or makes train.py
    a symlink to `link`; returns its hash."""
    baseline_repo(path)
    if extra:
        (path / extra[0]).parent.mkdir(parents=True, exist_ok=True)
        (path / extra[0]).write_text(extra[1])
        run_git(path, "add", extra[0])
    if drop:
        run_git(path, "rm", "-q", "--cached", drop)
    if link:
        os.remove(path / "train.py")
        os.symlink(link, path / "train.py")
        run_git(path, "add", "train.py")
    run_git(path, "commit", "-q", "--amend", "-m", "baseline")
    return run_git(path, "rev-parse", "HEAD")


@pytest.mark.parametrize("case,words", [
    ("symlink", "regular file"), ("numpy.py", "numpy.py"), ("no uv.lock", "holds prepare.py, pyproject.toml, "
                                                                          "train.py: a baseline holds exactly"),
    ("subdirectory", "pkg/__init__.py")])
def test_root_commits_obey_the_content_rules(hub, tmp_path, case, words):
    """P1: a root with train.py linked to /etc/passwd and a numpy.py beside it was accepted."""
    auth = register(hub)
    repo = tmp_path / "a"
    options = {"symlink": dict(link="/etc/passwd"), "numpy.py": dict(extra=("numpy.py", "import os\n")),
               "no uv.lock": dict(drop="uv.lock"), "subdirectory": dict(extra=("pkg/__init__.py", ""))}[case]
    root = root_repo(repo, **options)
    answer = refused(hub, auth, bundle(repo), tmp_path, 422, words)
    assert root[:7] in answer.json()["error"]


def baseline_of(hub, auth, blob):
    return hub.get(f"/api/baseline?prepare_py={blob}", headers=auth)


def test_the_oldest_root_is_the_baseline_and_a_flood_cannot_displace_it(make_hub, tmp_path):
    """P1: 500 roots with the same prepare.py pushed the genuine baseline out of the setup query's window."""
    hub = make_hub(limits={"roots_per_agent": 3})
    alpha, mallory = register(hub, "alpha"), register(hub, "mallory")
    genuine = baseline_repo(tmp_path / "a")
    blob = run_git(tmp_path / "a", "rev-parse", "HEAD:prepare.py")
    assert baseline_of(hub, alpha, blob).status_code == 404
    assert push(hub, alpha, bundle(tmp_path / "a")).status_code == 200
    for i in range(3):  # mallory's own roots with the same prepare.py and another train.py
        baseline_repo(tmp_path / f"m{i}", train=f"LR = {i}  # rigged\n")
        assert push(hub, mallory, bundle(tmp_path / f"m{i}")).status_code == 200
    baseline_repo(tmp_path / "m3", train="LR = 3  # rigged\n")
    refused(hub, mallory, bundle(tmp_path / "m3"), tmp_path, 422, "at most 3 root commits")
    answer = baseline_of(hub, mallory, blob)
    assert answer.status_code == 200
    record = db(tmp_path).execute("SELECT created_at FROM commits WHERE hash = ?", (genuine,)).fetchone()
    assert answer.json() == {"hash": genuine, "agent_id": "alpha", "created_at": record["created_at"]}
    other = baseline_repo(tmp_path / "b", prepare="METRIC = 'other'\n")  # another prepare.py: its own baseline
    push(hub, alpha, bundle(tmp_path / "b"))
    assert baseline_of(hub, alpha, run_git(tmp_path / "b", "rev-parse", "HEAD:prepare.py")).json()["hash"] == other
    for bad in ("", "abc", "G" * 40, blob + "0"):
        assert baseline_of(hub, alpha, bad).status_code == 400
    assert hub.get(f"/api/baseline?prepare_py={blob}").status_code == 401


def test_objects_are_bounded_uncompressed(make_hub, tmp_path):
    """P2: a 1 GiB train.py of zeros arrived in a 1 MB bundle and was stored."""
    hub = make_hub(limits={"object_bytes": 4096})
    auth = register(hub)
    repo = tmp_path / "a"
    baseline_repo(repo, train="0" * 4097)
    answer = refused(hub, auth, bundle(repo), tmp_path, 413, "4097 bytes uncompressed, more than 4096")
    assert len(bundle(repo)) < 1000  # what was small is the bundle, not the object
    baseline_repo(tmp_path / "b", train="0" * 4096)
    assert push(hub, auth, bundle(tmp_path / "b")).status_code == 200
    commit_file(tmp_path / "b", "train.py", "1" * 5000, "too big")
    refused(hub, auth, bundle(tmp_path / "b"), tmp_path, 413, "5000 bytes")
    assert answer.json()["error"].startswith("blob ")


def test_commit_messages_are_bounded(make_hub, tmp_path):
    """P3: a 30 MB commit message came back to every agent reading `commits?limit=20`."""
    hub = make_hub(limits={"message_bytes": 100})
    auth = register(hub)
    repo = tmp_path / "a"
    baseline_repo(repo)
    assert push(hub, auth, bundle(repo)).status_code == 200
    commit_file(repo, "train.py", "LR = 1\n", "é" * 50)  # 100 bytes
    assert push(hub, auth, bundle(repo)).status_code == 200
    commit_file(repo, "train.py", "LR = 2\n", "x" * 101)
    refused(hub, auth, bundle(repo), tmp_path, 413, "message longer than 100 bytes")


def test_commits_and_refs_per_push_are_bounded(make_hub, tmp_path):
    """P9: a 3,000-commit chain in one push took 26 s of server work."""
    hub = make_hub(limits={"push_commits": 3, "push_refs": 2})
    auth = register(hub)
    repo = tmp_path / "a"
    root = baseline_repo(repo)
    for i in range(3):
        commit_file(repo, "train.py", f"LR = {i}\n", f"step {i}")
    refused(hub, auth, bundle(repo), tmp_path, 413, "4 new commits, more than 3")
    run_git(repo, "branch", "previous", "HEAD~1")
    assert len(push(hub, auth, bundle(repo, "previous")).json()["added"]) == 3
    assert len(push(hub, auth, bundle(repo)).json()["added"]) == 1  # only new commits count
    run_git(repo, "branch", "x", root)
    refused(hub, auth, bundle(repo, "--branches"), tmp_path, 413, "3 refs, more than 2")


def test_only_objects_reachable_from_accepted_commits_are_kept(hub, tmp_path):
    """P12: objects bundled beside an accepted commit but not reachable from it were stored."""
    auth = register(hub)
    repo = tmp_path / "a"
    root = baseline_repo(repo)
    junk = run_git(repo, "hash-object", "-w", "--stdin", input="not part of any commit\n")
    assert push(hub, auth, pack_bundle(repo, root, extra=[junk])).status_code == 200
    git_dir = tmp_path / "data" / "repo.git"
    assert subprocess.run(["git", "--git-dir", str(git_dir), "cat-file", "-e", junk]).returncode != 0
    for name in BASELINE_FILES:
        assert run_git(git_dir, "cat-file", "-t", f"{root}:{name}") == "blob"
    child = commit_file(repo, "train.py", "LR = 0.05\n", "child")
    assert push(hub, auth, pack_bundle(repo, child, extra=[junk])).json()["added"][0]["hash"] == child
    assert subprocess.run(["git", "--git-dir", str(git_dir), "cat-file", "-e", junk]).returncode != 0
    subprocess.run(["git", "--git-dir", str(git_dir), "fsck", "--strict"], check=True, capture_output=True)


def test_diff_output_is_bounded(make_hub, tmp_path):
    """P2: a diff against a 300 MB train.py answered 307 MB."""
    hub = make_hub(limits={"diff_bytes": 300})
    auth = register(hub)
    repo = tmp_path / "a"
    root = baseline_repo(repo)
    small = commit_file(repo, "train.py", "LR = 1\n", "small")
    big = commit_file(repo, "train.py", "".join(f"LR = {i}\n" for i in range(100)), "big")
    push(hub, auth, bundle(repo))
    assert hub.get(f"/api/git/diff/{root}/{small}", headers=auth).status_code == 200
    answer = hub.get(f"/api/git/diff/{root}/{big}", headers=auth)
    assert answer.status_code == 413 and "larger than 300 bytes" in answer.json()["error"]


def test_git_is_killed_after_its_time_limit(make_hub, tmp_path, monkeypatch):
    """P2: each diff against a 1 GiB object ran git for ~50 s, with no time limit."""
    hub = make_hub(limits={"git_timeout_s": 1})
    auth = register(hub)
    repo = tmp_path / "a"
    root = baseline_repo(repo)
    push(hub, auth, bundle(repo))
    (tmp_path / "bin").mkdir()
    pid_file = fake_git(tmp_path / "bin", "diff", child=True)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    answer = hub.get(f"/api/git/diff/{root}/{root}", headers=auth)
    assert answer.status_code == 503 and "longer than 1 s" in answer.json()["error"]
    assert not alive(int(open(pid_file).read()))
    assert not (tmp_path / "bin" / "child.done").exists()  # git's own child was killed too (it held the pipe)


def test_bundle_cache_is_bounded_in_bytes(make_hub, tmp_path):
    """P5: the fetch cache was bounded in count only (RSS 91 -> 346 MB after 8 large fetches)."""
    auth_hub = make_hub()
    auth = register(auth_hub)
    repo = tmp_path / "a"
    hashes = [baseline_repo(repo)] + [commit_file(repo, "train.py", f"LR = {i}\n", f"c{i}") for i in range(3)]
    push(auth_hub, auth, bundle(repo))
    sizes = [len(auth_hub.get(f"/api/git/fetch/{h}", headers=auth).content) for h in hashes]
    auth_hub.close()
    limit = sizes[2] + sizes[3]  # room for the last two only
    hub = make_hub(limits={"bundle_cache_bytes": limit})
    state = hub.app.state.hub
    for h, size in zip(hashes, sizes):
        assert len(hub.get(f"/api/git/fetch/{h}", headers=auth).content) == size
        assert state.bundle_bytes == sum(len(b) for b in state.bundles.values()) <= limit
    assert list(state.bundles) == hashes[2:]
    hub.get(f"/api/git/fetch/{hashes[2]}", headers=auth)  # a hit makes it the newest
    assert list(state.bundles) == [hashes[3], hashes[2]]


@pytest.mark.parametrize("query", ["limit=\u00b2", "limit=" + "9" * 5000, "before=\u00b2", "before=" + "1" * 5000,
                                   "limit=%EF%BC%95"])  # a fullwidth digit five
def test_query_numbers_other_than_ascii_digits_are_400(hub, query):
    """P11: `limit=²` and a 5,000-digit number answered 500 in plain text."""
    auth = register(hub)
    hub.post("/api/channels", json={"name": "results"}, headers=auth)
    answer = hub.get(f"/api/channels/results/posts?{query}", headers=auth)
    assert answer.status_code == 400 and "integer" in answer.json()["error"]


@pytest.mark.parametrize("path,body", [("/api/channels/results/posts", '{"content": "x\\ud800y"}'),
                                       ("/api/channels", '{"name": "c", "description": "\\udfff"}'),
                                       ("/api/register", '{"id": "a", "x": "\\ud800"}')])
def test_a_lone_surrogate_is_400(hub, tmp_path, path, body):
    """P11: a lone surrogate in a post or a channel description answered 500."""
    auth = register(hub, "alpha")
    hub.post("/api/channels", json={"name": "results"}, headers=auth)
    answer = hub.post(path, content=body.encode(), headers={**auth, **JSON})
    assert answer.status_code == 400 and "Unicode" in answer.json()["error"]
    assert db(tmp_path).execute("SELECT COUNT(*) FROM posts").fetchone()[0] == 0


def test_json_bodies_need_the_json_content_type(hub, tmp_path):
    """P6: a text/plain cross-site POST (a browser sends one without asking) registered an agent."""
    for headers in ({"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"}, {}):
        answer = hub.post("/api/register", content=b'{"id": "alpha"}', headers=headers)
        assert answer.status_code == 415 and "application/json" in answer.json()["error"]
    assert db(tmp_path).execute("SELECT COUNT(*) FROM agents").fetchone()[0] == 0
    answer = hub.post("/api/register", content=b'{"id": "alpha"}',
                      headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert answer.status_code == 201


def test_a_loopback_hub_serves_loopback_host_names_only(tmp_path):
    """P6: a foreign Host header was served (with the others: DNS rebinding against a hub on a laptop)."""
    app = server.loopback_hosts_only(server.create_app(str(tmp_path / "d")), "127.0.0.1")
    for i, host in enumerate(("localhost:8000", "127.0.0.1", "127.0.0.1:80", "[::1]:8000", "LOCALHOST")):
        answer = TestClient(app).post("/api/register", json={"id": f"a{i}"}, headers={"Host": host})
        assert answer.status_code == 201, host
    for host in ("evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io", "", "[::2]"):
        answer = TestClient(app).get("/", headers={"Host": host})
        assert answer.status_code == 400 and "Host" in answer.json()["error"], host


def test_retry_after_is_never_zero(make_hub):
    """Mutation: `Retry-After: 0` was possible and no test noticed (every test waited ~100 s)."""
    hub = make_hub(limits={"rate": 1.0, "burst": 1})
    auth = register(hub)
    hub.app.state.hub.buckets[("", "alpha")] = (0.9, time.monotonic())  # a tenth of a second to the next token
    answer = hub.get("/api/channels", headers=auth)
    assert answer.status_code == 429 and answer.headers["Retry-After"] == "1"
    assert [server.retry_after(w) for w in (0.0, 0.001, 1.0, 1.001, 99.2)] == ["1", "1", "1", "2", "100"]


def test_a_streamed_body_one_byte_over_the_limit_is_refused(make_hub, tmp_path):
    """Mutation: a body without Content-Length (chunked) could be one byte over the limit."""
    hub = make_hub(limits={"body_bytes": 40})
    auth = register(hub)
    hub.post("/api/channels", json={"name": "results"}, headers=auth)

    def streamed(size):
        body = b'{"content": "' + b"x" * (size - 15) + b'"}'
        assert len(body) == size
        return hub.post("/api/channels/results/posts", content=iter([body[:10], body[10:]]), headers={**auth, **JSON})
    assert streamed(40).status_code == 201
    answer = streamed(41)
    assert answer.status_code == 413 and "larger than 40 bytes" in answer.json()["error"]


def test_wrong_read_tokens_are_rate_limited(make_hub):
    """P10: wrong read-token guesses on the page were not rate-limited (invite tokens are)."""
    hub = make_hub(host="0.0.0.0", invite_token="inv", read_token="right", limits={"guess_burst": 3})
    for _ in range(4):  # the burst, and one more that empties the bucket
        assert hub.get("/?token=wrong").status_code == 401
    answer = hub.get("/?token=right")  # too late: the address is blocked for a while
    assert answer.status_code == 429 and int(answer.headers["Retry-After"]) >= 1
    answer = hub.post("/api/register", json={"id": "alpha"}, headers={"X-Invite-Token": "inv"})
    assert answer.status_code == 201  # the API has its own limits


# ---------------------------------------------------------------------------
# Against a hostile agent: a real server process (connections, proxies, tokens, git children)
# ---------------------------------------------------------------------------

def test_slow_connections_do_not_block_a_request_and_do_not_flood_the_log(tmp_path):
    """P4: 20,000 connections trickling headers used up the file descriptors; normal requests timed out and
    the log grew 60 MB of tracebacks in 30 s. Here: 400 slow connections to a hub with 356 descriptors."""
    hub = HubProcess(tmp_path / "d", files=356, args=["--limit", "connections=100", "--limit", "header_timeout_s=2"])
    try:
        auth = hub.register("alpha")
        slow = []
        for _ in range(400):
            s = socket.create_connection(("127.0.0.1", hub.port), timeout=10)
            s.sendall(b"GET /api/channels HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the end of the headers
            slow.append(s)
        answer = requests.get(hub.url + "/api/channels", headers=auth, timeout=10)
        assert answer.status_code == 200
        for s in slow:  # every slow one is closed: evicted, or at the header time limit
            try:
                assert s.recv(100) == b""
            except ConnectionResetError:
                pass
            s.close()
        for _ in range(50):  # and a flood of bad requests
            with socket.create_connection(("127.0.0.1", hub.port), timeout=10) as s:
                s.sendall(b"NOT HTTP\r\n\r\n")
                s.recv(1000)
        assert requests.get(hub.url + "/api/channels", headers=auth, timeout=10).status_code == 200
    finally:
        hub.kill()
    log = hub.log
    assert "Traceback" not in log
    assert log.count("Invalid HTTP request") == 1
    assert len(log.splitlines()) <= 6, log


def test_slow_bodies_at_the_connection_cap_do_not_lock_out_a_request(tmp_path):
    """P4 with bodies: connections that sent their headers and trickle a body were never evicted at the cap, so
    a client holding `connections` of them locked every new connection out for body_timeout_s."""
    hub = HubProcess(tmp_path / "d", args=["--limit", "connections=20", "--limit", "body_timeout_s=600"])
    try:
        auth = hub.register("alpha")
        slow = []
        for _ in range(40):
            s = socket.create_connection(("127.0.0.1", hub.port), timeout=10)
            s.sendall(b"POST /api/register HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{")  # and never the rest of the body
            slow.append(s)
        time.sleep(1)  # let the hub read every header, so that all of them are in their body
        answer = requests.get(hub.url + "/api/channels", headers=auth, timeout=10)
        assert answer.status_code == 200
    finally:
        for s in slow:
            s.close()
        hub.kill()


def test_a_body_must_arrive_within_its_time_limit(tmp_path):
    """A client trickling its body holds its connection only until body_timeout_s (then 408)."""
    hub = HubProcess(tmp_path / "d", args=["--limit", "body_timeout_s=1"])
    try:
        with socket.create_connection(("127.0.0.1", hub.port), timeout=30) as s:
            s.sendall(b"POST /api/register HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 20\r\n\r\n{\"id\": ")  # and never the rest
            answer = b""
            while not answer.endswith(b"}"):
                answer += s.recv(1000)
            answer = answer.decode()
    finally:
        hub.kill()
    assert answer.startswith("HTTP/1.1 408") and "within 1 s" in answer


def test_proxy_headers_are_ignored_unless_trusted(tmp_path):
    """P6: on loopback the hub took the client address from X-Forwarded-For: 200 registrations with 200
    forged addresses all passed the per-address limit."""
    hub = HubProcess(tmp_path / "d", args=["--limit", "register_burst=2"])
    try:
        codes = [requests.post(hub.url + "/api/register", json={"id": f"a{i}"}, timeout=10,
                               headers={"X-Forwarded-For": f"10.0.0.{i}"}).status_code for i in range(3)]
    finally:
        hub.kill()
    assert codes == [201, 201, 429]


def test_tokens_come_from_the_environment_or_a_file_not_only_argv(tmp_path):
    """P10: --invite-token and --read-token existed only as arguments, visible to every user in `ps`."""
    (tmp_path / "invite").write_text("from-a-file\n")
    for i, (env, args, token) in enumerate([({"AGENTHUB_INVITE_TOKEN": "from-env"}, [], "from-env"),
                                            ({}, ["--invite-token-file", str(tmp_path / "invite")], "from-a-file")]):
        hub = HubProcess(tmp_path / f"hub{i}", env=env, args=args)
        try:
            with open(f"/proc/{hub.proc.pid}/cmdline", "rb") as f:
                assert token.encode() not in f.read()
            url = hub.url + "/api/register"
            assert requests.post(url, json={"id": "a"}, timeout=10).status_code == 403
            answer = requests.post(url, json={"id": "a"}, headers={"X-Invite-Token": token}, timeout=10)
            assert answer.status_code == 201
        finally:
            hub.kill()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "hub", "server.py"), "--data", str(tmp_path / "e"),
                             "--port", "1", "--host", "0.0.0.0", "--invite-token-file", str(tmp_path / "missing")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "No such file" in result.stderr and "Traceback" not in result.stderr


def test_git_children_die_with_the_hub(tmp_path):
    """P13: git children outlived a SIGKILL of the hub (index-pack ran on ~15 s after the restart)."""
    (tmp_path / "bin").mkdir()
    pid_file = fake_git(tmp_path / "bin", "diff")
    hub = HubProcess(tmp_path / "d", env={"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"})
    try:
        auth = hub.register("alpha")
        root = baseline_repo(tmp_path / "a")
        assert requests.post(hub.url + "/api/git/push", data=bundle(tmp_path / "a"), headers=auth,
                             timeout=30).status_code == 200
        def diff():  # answered by nobody: the hub is killed meanwhile
            with contextlib.suppress(requests.RequestException):
                requests.get(f"{hub.url}/api/git/diff/{root}/{root}", headers=auth, timeout=30)
        threading.Thread(target=diff, daemon=True).start()
        for _ in range(200):
            if os.path.exists(pid_file) and open(pid_file).read().strip():
                break
            time.sleep(0.05)
        pid = int(open(pid_file).read())
        assert alive(pid)
        limits = open(f"/proc/{pid}/limits").read()  # and it runs with its heap capped
        assert re.search(rf"Max data size\s+{store.GIT_HEAP_BYTES}\s+{store.GIT_HEAP_BYTES}", limits)
    finally:
        hub.kill()
    for _ in range(100):
        if not alive(pid):
            break
        time.sleep(0.05)
    assert not alive(pid)


# ---------------------------------------------------------------------------
# The best commit of a platform (GET /api/best)
# ---------------------------------------------------------------------------

def test_best_is_the_lowest_mean_over_finished_results_on_the_platform(hub, tmp_path):
    auth, beta = register(hub, "alpha"), register(hub, "beta")
    hub.post("/api/channels", json={"name": "results"}, headers=auth)
    repo = tmp_path / "a"
    h = [baseline_repo(repo)] + [commit_file(repo, "train.py", f"LR = {i}\n", f"idea {i}") for i in range(4)]
    push(hub, auth, bundle(repo))
    slug = "h100-80gb-hbm3"

    def result(commit, value, note="", platform=slug, who=auth, digits=7):
        line = f"commit:{commit[:digits]} platform:{platform} val_bpb:{value} vram_gb:40.1 | {note}"
        assert hub.post("/api/channels/results/posts", json={"content": line}, headers=who).status_code == 201

    def best(platform=slug):
        return hub.get(f"/api/best?platform={platform}", headers=auth)

    assert best().status_code == 404
    result(h[0], "1.000000", "baseline")
    result(h[0], "1.020000", "baseline again", digits=12)  # a longer prefix of the same commit
    result(h[1], "0.990000", "lower lr", who=beta)
    result(h[1], "1.030000", "lower lr (DISCARD) on a repeat")  # a discarded repeat still counts: mean 1.01
    result(h[2], "---", "bigger (CRASH: OOM)")                   # a crash does not count
    result(h[3], "0.995000", "kept (DISCARD)")
    result(h[4], "0.500000", "another platform", platform="cpu-amd-epyc-2c")
    result("f" * 40, "0.100000", "a commit the hub does not have")
    hub.post("/api/channels/results/posts", json={"content": f"commit:{h[2][:7]} val_bpb:0.1 garbage"}, headers=auth)
    answer = best()
    assert answer.status_code == 200
    assert answer.json() == {"hash": h[3], "val_bpb": 0.995, "n": 1, "agent_id": "alpha", "message": "idea 2"}
    result(h[0], "0.970000", "baseline, third run")  # mean of 1.00, 1.02, 0.97: 0.99633...
    assert best().json()["hash"] == h[3]
    result(h[0], "0.960000", "baseline, fourth run")  # mean 0.9875: now the lowest
    body = best().json()
    assert body["hash"] == h[0] and body["n"] == 4 and body["val_bpb"] == pytest.approx((1.0 + 1.02 + .97 + .96) / 4)
    assert body["message"] == "baseline"
    assert best("cpu-amd-epyc-2c").json()["hash"] == h[4]
    assert best("apple-m2-max").status_code == 404
    for bad in ("", "a b", "x" * 41, "-x"):
        assert best(bad).status_code == 400
    assert hub.get(f"/api/best?platform={slug}").status_code == 401


def test_best_breaks_a_tie_by_the_first_result(hub, tmp_path):
    auth = register(hub)
    hub.post("/api/channels", json={"name": "results"}, headers=auth)
    repo = tmp_path / "a"
    h = [baseline_repo(repo)] + [commit_file(repo, "train.py", f"LR = {i}\n", f"idea {i}") for i in range(2)]
    push(hub, auth, bundle(repo))
    platform = "cpu-" + "x" * 36  # the longest tag: 40 characters
    for commit, value in [(h[2], "0.9"), (h[1], "0.8"), (h[1], "1.0"), (h[0], "1.0")]:  # h2 and h1 tie at 0.9
        line = f"commit:{commit[:7]} platform:{platform} val_bpb:{value} vram_gb:1.0 | run"
        hub.post("/api/channels/results/posts", json={"content": line}, headers=auth)
    answer = hub.get(f"/api/best?platform={platform}", headers=auth).json()
    assert answer["hash"] == h[2] and answer["n"] == 1 and answer["val_bpb"] == 0.9
