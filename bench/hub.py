"""Load test of the hub: N simulated agents against a live hub/server.py on this machine.

    python bench/hub.py [--agents 10 100 500] [--compress 10] [--cycles 2] [--improve 0.3]

Each agent lives as the loop of program_agenthub.md does, with time compressed: an experiment takes 5 minutes
(300 s) for a real agent and 300 / --compress seconds here. Agents start at random moments within the first
cycle. Setup: register, create the channels (a 409 when another agent made them first, as in the protocol), fetch the shared
baseline, read results, discussion, commits and leaves. Every cycle: read results, leaves and the children of a
commit, "train", post the result line, push the improvement (with probability --improve: a full-history
bundle, baseline included, ~300 KB as an agent makes it), read results and discussion again, sometimes post to
discussion, sometimes fetch a leaf and diff it against the baseline. Every request is a new connection, like curl.

Prints, per N: requests/s, p50/p99/max latency per endpoint, errors, and the count of lost or corrupted records
after the run (acknowledged posts and commits read back, parents checked, `git fsck --strict`): it must be 0.
The hub runs as a subprocess with its default limits except the registration rate (every agent here comes from
127.0.0.1 within one cycle).
"""

import argparse
import os
import random
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE_FILES = ("train.py", "prepare.py", "pyproject.toml", "uv.lock")
TIMEOUT = 120


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))] if values else float("nan")


def make_bundles(work, schedule):
    """A baseline of this repository's four files and, for agent i, one commit (a changed train.py) per scheduled
    push, each on top of the last; returns (baseline hash, {agent: [bundle bytes of its history at each push]})."""
    repo = os.path.join(work, "agents.git")
    subprocess.run(["git", "init", "-q", "--bare", repo], check=True)
    contents = {name: open(os.path.join(ROOT, name), "rb").read() for name in BASELINE_FILES}
    stream = []

    def data(blob):
        stream.append(b"data %d\n" % len(blob) + blob + b"\n")

    for mark, name in enumerate(BASELINE_FILES, 1):
        stream.append(b"blob\nmark :%d\n" % mark)
        data(contents[name])
    stream.append(b"commit refs/heads/baseline\nmark :10\ncommitter bench <bench@example.invalid> 0 +0000\n")
    data(b"baseline")
    stream += [b"M 100644 :%d %s\n" % (mark, name.encode()) for mark, name in enumerate(BASELINE_FILES, 1)]
    mark = 10
    for agent, pushes in schedule.items():
        parent = 10
        for k in range(pushes):
            mark += 1
            stream.append(b"commit refs/heads/a%d_%d\nmark :%d\ncommitter bench <bench@example.invalid> %d +0000\n"
                          % (agent, k, mark, 1 + k))
            data(b"agent %d improvement %d" % (agent, k))
            stream.append(b"from :%d\nM 100644 inline train.py\n" % parent)
            data(contents["train.py"] + b"# agent %d improvement %d\n" % (agent, k))
            parent = mark
    subprocess.run(["git", "--git-dir", repo, "fast-import", "--quiet"], input=b"".join(stream), check=True)
    root = subprocess.run(["git", "--git-dir", repo, "rev-parse", "baseline"], capture_output=True, text=True,
                          check=True).stdout.strip()
    bundles = {agent: [subprocess.run(["git", "--git-dir", repo, "bundle", "create", "-q", "-", f"a{agent}_{k}"],
                                      capture_output=True, check=True).stdout for k in range(pushes)]
               for agent, pushes in schedule.items()}
    baseline = subprocess.run(["git", "--git-dir", repo, "bundle", "create", "-q", "-", "baseline"],
                              capture_output=True, check=True).stdout
    return root, baseline, bundles


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.latency, self.errors = {}, {}

    def call(self, name, method, url, expect=(200, 201), **kwargs):
        start = time.perf_counter()
        try:
            answer = requests.request(method, url, timeout=TIMEOUT, **kwargs)
            status = answer.status_code
        except requests.RequestException as error:
            answer, status = None, type(error).__name__
        elapsed = time.perf_counter() - start
        with self.lock:
            self.latency.setdefault(name, []).append(elapsed)
            if status not in expect:
                self.errors[(name, status)] = self.errors.get((name, status), 0) + 1
        return answer if status in expect else None


def agent_life(i, url, stats, rng, cycle_s, cycles, pushes, root, acked):
    """One agent: setup, then `cycles` experiments of cycle_s seconds each."""
    time.sleep(rng.uniform(0, cycle_s))
    answer = stats.call("register", "POST", url + "/api/register", json={"id": f"agent{i}"}, expect=(201,))
    if answer is None:
        return
    auth = {"Authorization": "Bearer " + answer.json()["api_key"]}
    get = lambda name, path: stats.call(name, "GET", url + path, headers=auth)
    for channel in ("results", "discussion"):
        stats.call("POST channels", "POST", url + "/api/channels", json={"name": channel}, headers=auth,
                   expect=(201, 409))  # 409: another agent made it first
    get("GET fetch", f"/api/git/fetch/{root}")
    for name, path in [("GET posts", "/api/channels/results/posts?limit=50"),
                       ("GET posts", "/api/channels/discussion/posts?limit=50"),
                       ("GET git/commits", "/api/git/commits?limit=20"), ("GET git/leaves", "/api/git/leaves")]:
        get(name, path)
    tip, pushed = root, 0
    for cycle in range(cycles):
        start = time.monotonic()
        get("GET posts", "/api/channels/results/posts?limit=50")
        leaves = get("GET git/leaves", "/api/git/leaves")
        if leaves is not None and leaves.json():
            get("GET children", f"/api/git/commits/{rng.choice(leaves.json())['hash'][:7]}/children")
        time.sleep(max(0.0, 0.8 * cycle_s - (time.monotonic() - start)))  # training
        improved = pushed < len(pushes)
        content = (f"commit:{rng.getrandbits(28):07x} platform:H100 val_bpb:{rng.uniform(0.95, 1.0):.6f} "
                   f"vram_gb:44.{rng.randrange(10)} | agent {i} cycle {cycle}{'' if improved else ' (DISCARD)'}")
        if stats.call("POST posts", "POST", url + "/api/channels/results/posts", json={"content": content},
                      headers=auth, expect=(201,)) is not None:
            acked["posts"].append(content)
        if improved:
            answer = stats.call("POST push", "POST", url + "/api/git/push", data=pushes[pushed], headers=auth)
            if answer is not None:
                acked["pushes"].append((i, pushed, answer.json()["added"]))
            pushed += 1
        get("GET posts", "/api/channels/results/posts?limit=50")
        get("GET posts", "/api/channels/discussion/posts?limit=50")
        if rng.random() < 0.3:
            text = f"agent {i}: observation after cycle {cycle}.\n\n" + "Tried a variant; notes follow. " * 12
            if stats.call("POST posts", "POST", url + "/api/channels/discussion/posts", json={"content": text},
                          headers=auth, expect=(201,)) is not None:
                acked["posts"].append(text)
        if rng.random() < 0.1 and leaves is not None and leaves.json():
            leaf = rng.choice(leaves.json())["hash"]
            get("GET fetch", f"/api/git/fetch/{leaf}")
            stats.call("GET diff", "GET", f"{url}/api/git/diff/{root[:7]}/{leaf[:7]}", headers=auth)
        time.sleep(max(0.0, cycle_s - (time.monotonic() - start)))


def verify(url, auth, data, acked, expected_parents):
    """Count acknowledged records that are missing or differ after the run (must be 0)."""
    stored = []
    for channel in ("results", "discussion"):
        before = 2**62
        while True:
            page = requests.get(f"{url}/api/channels/{channel}/posts?limit=500&before={before}", headers=auth,
                                timeout=TIMEOUT).json()
            stored += [p["content"] for p in page]
            if len(page) < 500:
                break
            before = page[-1]["id"]
    lost = len(acked["posts"]) - sum(1 for c in set(acked["posts"]) if c in set(stored))
    corrupted = len(stored) - len(set(stored)) + len(set(stored) - set(acked["posts"]))  # duplicates or unknown
    conn = sqlite3.connect(f"file:{os.path.join(data, 'hub.sqlite3')}?mode=ro", uri=True)
    commits = {h: {"parent_hash": p} for h, p in conn.execute("SELECT hash, parent_hash FROM commits")}
    conn.close()
    for _, _, added in acked["pushes"]:
        for record in added:
            if record["hash"] not in commits:
                lost += 1
    for commit, parent in expected_parents.items():
        if commit in commits and commits[commit]["parent_hash"] != parent:
            corrupted += 1
    fsck = subprocess.run(["git", "--git-dir", os.path.join(data, "repo.git"), "fsck", "--strict", "--no-dangling"],
                          capture_output=True, text=True)
    corrupted += fsck.returncode != 0
    return lost, corrupted, len(stored), len(commits)


def run(n, compress, cycles, improve, seed):
    rng = random.Random(seed)
    cycle_s = 300 / compress
    schedule = {i: sum(rng.random() < improve for _ in range(cycles)) for i in range(n)}
    with tempfile.TemporaryDirectory(prefix="hubbench") as work:
        root, baseline, bundles = make_bundles(work, schedule)
        expected_parents = {}
        repo = os.path.join(work, "agents.git")
        for i, pushes in schedule.items():
            for k in range(pushes):
                line = subprocess.run(["git", "--git-dir", repo, "rev-list", "--parents", "-n", "1", f"a{i}_{k}"],
                                      capture_output=True, text=True, check=True).stdout.split()
                expected_parents[line[0]] = line[1]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        data, url = os.path.join(work, "hub"), f"http://127.0.0.1:{port}"
        server = subprocess.Popen([sys.executable, os.path.join(ROOT, "hub", "server.py"), "--data", data, "--port",
                                   str(port), "--limit", "register_burst=100000"], stdout=subprocess.DEVNULL)
        try:
            while True:
                try:
                    requests.get(url + "/api/channels", timeout=5)
                    break
                except requests.ConnectionError:
                    time.sleep(0.1)
            admin = requests.post(url + "/api/register", json={"id": "bench-admin"}, timeout=TIMEOUT).json()
            auth = {"Authorization": "Bearer " + admin["api_key"]}
            assert requests.post(url + "/api/git/push", data=baseline, headers=auth, timeout=TIMEOUT).ok
            stats, acked = Stats(), {"posts": [], "pushes": []}
            threads = [threading.Thread(target=agent_life, args=(i, url, stats, random.Random(seed * 1000 + i),
                                                                 cycle_s, cycles, bundles[i], root, acked))
                       for i in range(n)]
            load_before = os.getloadavg()[0]
            start = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.monotonic() - start
            lost, corrupted, posts, commits = verify(url, auth, data, acked, expected_parents)
        finally:
            server.terminate()
            server.wait()
    requests_made = sum(len(v) for v in stats.latency.values())
    print(f"\nN = {n} agents, {cycles} cycles of {cycle_s:.0f} s (5 min compressed {compress}x), "
          f"{elapsed:.0f} s, {requests_made} requests, {requests_made / elapsed:.1f} req/s, "
          f"load average {load_before:.1f} before")
    print(f"{'endpoint':<22} {'count':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for name in sorted(stats.latency):
        values = stats.latency[name]
        print(f"{name:<22} {len(values):>6} {percentile(values, 50) * 1000:>8.1f} {percentile(values, 99) * 1000:>8.1f}"
              f" {max(values) * 1000:>8.1f}")
    print(f"errors: {stats.errors or 'none'}")
    print(f"stored: {posts} posts, {commits} commits; lost {lost}, corrupted {corrupted}")
    return lost + corrupted


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[10, 100, 500])
    parser.add_argument("--compress", type=float, default=10, help="time compression: a 300 s experiment lasts 300/c s")
    parser.add_argument("--cycles", type=int, default=2, help="experiments per agent")
    parser.add_argument("--improve", type=float, default=0.3, help="probability that an experiment improves (a push)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"hub bench: {os.cpu_count()} CPUs, python {sys.version.split()[0]}, "
          f"{subprocess.run(['git', '--version'], capture_output=True, text=True).stdout.strip()}")
    bad = sum(run(n, args.compress, args.cycles, args.improve, args.seed) for n in args.agents)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
