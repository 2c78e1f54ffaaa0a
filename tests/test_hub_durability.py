"""The hub under SIGKILL and under load: a real server process (hub/server.py) on loopback.

Crash points: HUB_CRASH_AT=<point> makes the server SIGKILL itself at that point of a push or a post.
After a restart every acknowledged commit and post is there, nothing half-written is, refs match the
commit records and `git fsck --strict` is clean. (SIGKILL kills the process, not the machine: the page
cache survives it. A power cut is covered by SQLite's synchronous=FULL and git's core.fsync=all, which
these tests cannot show.)
"""

import os
import random
import subprocess
import threading
import time

import pytest
import requests

from hub import server
from hub_helpers import HubProcess, baseline_repo, bundle, commit_file, run_git

TIMEOUT = 60
NO_LIMITS = ["--limit", "burst=100000", "--limit", "push_burst=100000"]


def get(hub, auth, path):
    answer = requests.get(hub.url + path, headers=auth, timeout=TIMEOUT)
    assert answer.status_code == 200, answer.text
    return answer.json()


def push(hub, auth, data):
    return requests.post(hub.url + "/api/git/push", data=data, headers=auth, timeout=TIMEOUT)


def post(hub, auth, content, channel="results"):
    return requests.post(f"{hub.url}/api/channels/{channel}/posts", json={"content": content}, headers=auth,
                         timeout=TIMEOUT)


def all_posts(hub, auth, channel="results"):
    posts, before = [], 2**62
    while True:
        page = get(hub, auth, f"/api/channels/{channel}/posts?limit=500&before={before}")
        posts += page
        if len(page) < 500:
            return posts
        before = page[-1]["id"]


def check_consistent(data, hub, auth):
    """refs/commits/* are exactly the records, git fsck --strict is clean, no quarantine is left."""
    records = get(hub, auth, "/api/git/commits?limit=500")
    refs = run_git(os.path.join(data, "repo.git"), "for-each-ref", "--format=%(refname:lstrip=2)", "refs/commits/")
    assert sorted(refs.split()) == sorted(r["hash"] for r in records)
    fsck = subprocess.run(["git", "--git-dir", os.path.join(data, "repo.git"), "fsck", "--strict", "--no-dangling"],
                          capture_output=True, text=True)
    assert fsck.returncode == 0 and "error" not in fsck.stderr + fsck.stdout, fsck.stderr
    for r in records:  # every record's commit is in git with the recorded parent
        parents = run_git(os.path.join(data, "repo.git"), "rev-list", "--parents", "-n", "1", r["hash"]).split()[1:]
        assert parents == ([r["parent_hash"]] if r["parent_hash"] else [])
    assert os.listdir(os.path.join(data, "tmp")) == []
    return records


@pytest.fixture
def started(tmp_path):
    """A hub with alpha registered, the results channel, a pushed baseline and one post; then killed."""
    data = str(tmp_path / "data")
    hub = HubProcess(data)
    auth = hub.register("alpha")
    repo = tmp_path / "a"
    root = baseline_repo(repo)
    assert push(hub, auth, bundle(repo)).status_code == 200
    assert requests.post(hub.url + "/api/channels", json={"name": "results"}, headers=auth).status_code == 201
    assert post(hub, auth, "baseline 1.000").status_code == 201
    hub.kill()
    return data, auth, repo, root


@pytest.mark.parametrize("point", ["push:indexed", "push:moved", "push:refs", "push:committed"])
def test_sigkill_mid_push(started, point):
    data, auth, repo, root = started
    child = commit_file(repo, "train.py", "LR = 0.05\n", "child")
    hub = HubProcess(data, env={"HUB_CRASH_AT": point})
    with pytest.raises(requests.ConnectionError):
        push(hub, auth, bundle(repo))
    assert hub.proc.wait(timeout=TIMEOUT) == -9  # it died at the crash point
    hub.kill()
    hub = HubProcess(data)
    try:
        records = check_consistent(data, hub, auth)
        # the record commit is the acknowledgement point; before it the push never happened
        expected = [child, root] if point == "push:committed" else [root]
        assert [r["hash"] for r in records] == expected
        assert [p["content"] for p in all_posts(hub, auth)] == ["baseline 1.000"]
        again = push(hub, auth, bundle(repo))  # the agent retries: it gets in, once
        assert again.status_code == 200
        assert [r["hash"] for r in again.json()["added"]] == ([] if point == "push:committed" else [child])
        assert [r["hash"] for r in check_consistent(data, hub, auth)] == [child, root]
    finally:
        hub.kill()


@pytest.mark.parametrize("point", ["post:inserted", "post:committed"])
def test_sigkill_mid_post(started, point):
    data, auth, _, root = started
    hub = HubProcess(data, env={"HUB_CRASH_AT": point})
    with pytest.raises(requests.ConnectionError):
        post(hub, auth, "second run 0.990")
    assert hub.proc.wait(timeout=TIMEOUT) == -9
    hub.kill()
    hub = HubProcess(data)
    try:
        contents = [p["content"] for p in all_posts(hub, auth)]
        assert contents == (["second run 0.990", "baseline 1.000"] if point == "post:committed" else
                            ["baseline 1.000"])
        assert post(hub, auth, "third").status_code == 201
        assert [p["content"] for p in all_posts(hub, auth)][0] == "third"
        assert [r["hash"] for r in check_consistent(data, hub, auth)] == [root]
    finally:
        hub.kill()


def test_lock_files_left_by_a_killed_git_do_not_block_the_retried_push(started):
    """A SIGKILL while git held a ref's lock left refs/commits/<hash>.lock behind: the retried push of that commit
    failed for good ("remove the file manually to continue"), and a stale config.lock stopped the next start."""
    data, auth, repo, root = started
    child = commit_file(repo, "train.py", "LR = 0.05\n", "child")
    git_dir = os.path.join(data, "repo.git")
    for name in (f"refs/commits/{child}.lock", "packed-refs.lock", "config.lock", "HEAD.lock"):
        with open(os.path.join(git_dir, name), "w") as f:
            f.write("")
    hub = HubProcess(data)
    try:
        answer = push(hub, auth, bundle(repo))
        assert answer.status_code == 200, answer.text
        assert [r["hash"] for r in check_consistent(data, hub, auth)] == [child, root]
    finally:
        hub.kill()


def test_a_second_hub_on_the_same_data_directory_is_refused(started):
    """A second hub process on a served directory would delete the first one's quarantines and git locks at
    its start: it is refused with one line. Once the first is killed, the lock goes with it."""
    data, auth, _, root = started
    first = HubProcess(data)
    try:
        with pytest.raises(RuntimeError, match="another hub process is serving"):
            HubProcess(data)
        assert [r["hash"] for r in get(first, auth, "/api/git/commits")] == [root]
    finally:
        first.kill()
    second = HubProcess(data)  # SIGKILL released the lock
    second.kill()
    built = server.create_app(data, dashboard=False).state.hub  # in this process: it holds the directory...
    with pytest.raises(RuntimeError, match="another hub process is serving"):
        HubProcess(data)
    built.close()  # ...until it closes it
    HubProcess(data).kill()


def test_sigkill_at_random_moments_loses_nothing_acknowledged(tmp_path):
    """An agent pushes and posts as fast as it can; the hub is killed at random moments, five times."""
    rng = random.Random(14)
    repo = tmp_path / "a"
    chain = [baseline_repo(repo)]
    bundles = [bundle(repo)]
    for i in range(30):
        chain.append(commit_file(repo, "train.py", f"LR = {i}\n", f"step {i}"))
        bundles.append(bundle(repo))
    data = str(tmp_path / "data")
    acked_commits, acked_posts, attempted, step = set(), [], [], [0]
    auth = None
    for round_ in range(5):
        hub = HubProcess(data, args=NO_LIMITS)
        if auth is None:
            auth = hub.register("alpha")
            requests.post(hub.url + "/api/channels", json={"name": "results"}, headers=auth)

        def agent():
            try:
                while step[0] < len(bundles):
                    answer = push(hub, auth, bundles[step[0]])
                    assert answer.status_code == 200, answer.text
                    acked_commits.add(chain[step[0]])
                    content = f"round {round_} step {step[0]}"
                    attempted.append(content)
                    assert post(hub, auth, content).status_code == 201
                    acked_posts.append(content)
                    step[0] += 1
            except requests.RequestException:
                pass  # killed mid-request (refused, reset, or the answer cut off): not acknowledged

        thread = threading.Thread(target=agent)
        start, deadline = step[0], time.monotonic() + TIMEOUT
        thread.start()
        while step[0] == start < len(bundles) and time.monotonic() < deadline:  # progress first, however slow
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.5))
        hub.kill()
        thread.join(timeout=TIMEOUT)
    hub = HubProcess(data)
    try:
        records = check_consistent(data, hub, auth)
        assert acked_commits <= {r["hash"] for r in records}
        stored = [p["content"] for p in all_posts(hub, auth)][::-1]
        # every acknowledged post, in order; besides them at most the one unacknowledged post of each round
        # (written before the kill cut its answer off), and nothing the agent never sent; each once
        later = iter(stored)
        assert all(content in later for content in acked_posts)
        extra = [content for content in stored if content not in acked_posts]
        assert len(extra) <= 5 and set(extra) <= set(attempted)
        assert len(acked_commits) >= 5 and len(set(stored)) == len(stored)
    finally:
        hub.kill()


def test_many_agents_pushing_and_posting_at_once_lose_nothing(tmp_path):
    """16 agents at once: 8 with their own roots, 8 that build on agent 0's history (racing to bring it in)."""
    n, commits_each, posts_each = 16, 3, 8
    repos, histories, own = [], [], []
    for i in range(n):
        repo = tmp_path / f"agent{i}"
        if i < n // 2:
            history = [baseline_repo(repo, train=f"agent {i}\n")]
        else:  # a clone of agent 0, whose history is complete by now
            run_git(tmp_path, "clone", "-q", str(tmp_path / "agent0"), str(repo))
            history = list(histories[0])
        mine = [commit_file(repo, "train.py", f"agent {i} step {k}\n", f"agent {i} step {k}")
                for k in range(commits_each)]
        repos.append(repo)
        histories.append(history + mine)
        own.append(mine)
    posts_of = lambda i, k: [f"agent {i} post {k}.{p}" for p in range(posts_each * (k + 1) // commits_each
                                                                       - posts_each * k // commits_each)]
    hub = HubProcess(str(tmp_path / "data"))
    try:
        auths = [hub.register(f"agent{i}") for i in range(n)]
        requests.post(hub.url + "/api/channels", json={"name": "results"}, headers=auths[0])
        bundles = [[] for _ in range(n)]
        for i in range(n):
            for commit in own[i]:
                run_git(repos[i], "branch", "-f", "tip", commit)
                bundles[i].append(bundle(repos[i], "tip"))
        failures, barrier = [], threading.Barrier(n)

        def agent(i):
            try:
                barrier.wait()
                for k in range(commits_each):
                    answer = push(hub, auths[i], bundles[i][k])
                    assert answer.status_code == 200, answer.text
                    for content in posts_of(i, k):
                        assert post(hub, auths[i], content).status_code == 201
                    get(hub, auths[i], "/api/git/leaves")
                    get(hub, auths[i], "/api/channels/results/posts?limit=50")
            except Exception as error:  # noqa: BLE001 - reported below
                failures.append((i, repr(error)))

        threads = [threading.Thread(target=agent, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert failures == []
        records = {r["hash"]: r for r in check_consistent(hub.data, hub, auths[0])}
        expected = {}
        for history in histories:
            expected.update(zip(history, [None] + history[:-1]))
        assert {h: r["parent_hash"] for h, r in records.items()} == expected
        for i in range(1, n):  # each agent's own commits are recorded under its name
            assert all(records[c]["agent_id"] == f"agent{i}" for c in own[i])
            if i < n // 2:
                assert records[histories[i][0]]["agent_id"] == f"agent{i}"
        racers = {"agent0"} | {f"agent{i}" for i in range(n // 2, n)}
        assert all(records[c]["agent_id"] in racers for c in histories[0])  # whoever brought it first
        leaves = get(hub, auths[0], "/api/git/leaves")
        assert sorted(r["hash"] for r in leaves) == sorted(h[-1] for h in histories[1:])  # the clones built on 0
        contents = [p["content"] for p in all_posts(hub, auths[0])]
        assert sorted(contents) == sorted(c for i in range(n) for k in range(commits_each) for c in posts_of(i, k))
        assert len(contents) == n * posts_each
    finally:
        hub.kill()
