"""Fill a hub's data folder with a simulated swarm: agents, result posts, discussion posts, pushed commits.

Used by the dashboard tests, the browser test and bench/hub_page.py. It writes what the hub server keeps (the
protocol: hub/server.py's docstring; the schema: hub/store.py): <data>/hub.sqlite3 and the bare repository
<data>/repo.git, whose commits are real (made in one `git fast-import`, so thousands take a second). Each
simulated agent works on one platform: it starts from the platform's best commit (or a new root), proposes a
change, posts its result line, and pushes only improvements, like the agents of program_agenthub.md.
"""

import os
import random
import sqlite3
import subprocess
import time

SCHEMA = [  # the server's tables (issue 14's contract); the server creates them the same way
    """CREATE TABLE IF NOT EXISTS agents(id TEXT PRIMARY KEY, key_hash TEXT NOT NULL UNIQUE, created_at REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS channels(name TEXT PRIMARY KEY, description TEXT NOT NULL DEFAULT '',
       created_by TEXT, created_at REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS posts(id INTEGER PRIMARY KEY AUTOINCREMENT, channel TEXT NOT NULL,
       agent_id TEXT NOT NULL, content TEXT NOT NULL, created_at REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS commits(hash TEXT PRIMARY KEY, parent_hash TEXT, agent_id TEXT NOT NULL,
       message TEXT NOT NULL, created_at REAL NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS commits_by_parent ON commits(parent_hash)",
]
PLATFORMS = {"H100": 0.998, "A100": 1.031, "M4-Max": 1.452, "CPU": 2.114}  # a baseline val_bpb each
IDEAS = ["raise matrix LR to 0.05", "lower warmdown ratio to 0.3", "depth 10, aspect 56", "SwiGLU MLP",
         "RoPE base 50000", "QK norm off", "window pattern SSSL -> SL", "batch 2^18 tokens", "Muon momentum 0.9",
         "weight decay 0.1 on embeddings", "softcap 20", "value embeddings every layer", "head dim 64",
         "init std 0.5x", "x0 lambda 0.2", "unembedding LR 0.008", "ReLU^2 -> GELU", "no logit softcap"]


def connect(data_dir):
    """A connection to <data_dir>/hub.sqlite3 with the server's tables: made by the server itself where
    hub/server.py exists (its schema is the reference), else from SCHEMA."""
    os.makedirs(data_dir, exist_ok=True)
    try:
        from hub import server
    except ImportError:
        server = None
    if server is not None and hasattr(server, "create_app"):
        server.create_app(str(data_dir), dashboard=False).state.hub.close()  # a hub process may serve it next
    conn = sqlite3.connect(os.path.join(data_dir, "hub.sqlite3"))
    conn.execute("PRAGMA journal_mode=WAL")
    for statement in SCHEMA:
        conn.execute(statement)
    return conn


def result_line(commit, platform, val_bpb, vram_gb, description):
    """One line in the format agents post (hub/server.py's docstring, hub/results.py)."""
    if val_bpb is None:
        return f"commit:{commit[:7]} platform:{platform} val_bpb:--- vram_gb:--- | {description}"
    return f"commit:{commit[:7]} platform:{platform} val_bpb:{val_bpb:.6f} vram_gb:{vram_gb:.1f} | {description}"


def fill(data_dir, n_results, n_agents=6, platforms=("H100", "A100", "M4-Max"), seed=0, on_post=None,
         extra_posts=()):
    """Simulate n_results runs by n_agents agents spread over `platforms`; returns a summary dict.

    on_post: called as on_post(conn, post) for every inserted post, in its transaction (the server's
    hook: hub.dashboard.on_post); None leaves parsing to hub.dashboard.init_db's backfill.
    extra_posts: (channel, agent, content) posted at the end (discussion posts, malformed lines).
    The summary: best[platform] = (val_bpb, short hash, agent, description), baseline[platform],
    counts[agent] = {keep, discard, crash}, commits (list of full hashes), lines (every result line).
    Values follow the hub's rule: a commit's value is the mean of its runs (every agent of a platform runs
    its baseline once, so the baseline's value is their mean; a kept commit is run once).
    """
    rng = random.Random(seed)
    os.makedirs(data_dir, exist_ok=True)
    conn = connect(data_dir)
    repo = os.path.join(data_dir, "repo.git")
    if not os.path.exists(repo):
        subprocess.run(["git", "init", "-q", "--bare", repo], check=True)
    agents = [f"agent-{i}" for i in range(n_agents)]
    platform_of = {a: platforms[i % len(platforms)] for i, a in enumerate(agents)}
    t0 = time.time() - 3600 * 24
    # first pass: decide every run, commits as fast-import marks; second pass: hashes from git
    commits, posts = [], []   # commits: (mark, parent mark or None, agent, message, t, content)
    best = {}                 # platform -> (val, mark, agent, description), as the agents saw it
    kept = {}                 # platform -> [(val, mark, agent, description)] of its kept commits, in order
    base_runs = {}            # platform -> the values of its baseline's runs
    start = {}                # agent -> (val, mark) it builds on
    baseline, counts = {}, {a: {"keep": 0, "discard": 0, "crash": 0} for a in agents}
    for k in range(n_results):
        agent = agents[k % n_agents] if k < n_agents else rng.choice(agents)
        platform, t = platform_of[agent], t0 + 10 * k
        if agent not in start:
            if platform in best:   # build on the hub's baseline of this platform
                start[agent] = best[platform][:2]
                val, mark, desc = round(start[agent][0] + rng.gauss(0, 0.001), 6), start[agent][1], "baseline (rerun)"
                base_runs[platform].append(val)
            else:
                mark = len(commits) + 1
                commits.append((mark, None, agent, "baseline", t, "# baseline\n"))
                val, desc = round(PLATFORMS[platform] + rng.gauss(0, 0.001), 6), "baseline"   # as posted
                baseline[platform] = val
                best[platform] = (val, mark, agent, desc)
                kept[platform], base_runs[platform] = [best[platform]], [val]
                start[agent] = (val, mark)
            posts.append(("results", agent, (mark, platform, val, 40.0, desc), t))
            counts[agent]["keep"] += 1
            continue
        if rng.random() < 0.1 and best[platform][1] != start[agent][1]:  # adopt the platform's best
            start[agent] = best[platform][:2]
        idea = rng.choice(IDEAS)
        mark = len(commits) + 1  # provisional: a commit exists only for a kept run
        if rng.random() < 0.06:
            counts[agent]["crash"] += 1
            posts.append(("results", agent, (f"{rng.getrandbits(28):07x}", platform, None, None, f"{idea} (CRASH: OOM)"), t))
            continue
        val = round(start[agent][0] + rng.gauss(0.002, 0.004) * PLATFORMS[platform], 6)
        if val < start[agent][0]:
            commits.append((mark, start[agent][1], agent, idea, t, f"# {idea}\nSEED = {k}\n"))
            counts[agent]["keep"] += 1
            posts.append(("results", agent, (mark, platform, val, 40.0 + rng.random(), idea), t))
            start[agent] = (val, mark)
            kept[platform].append((val, mark, agent, idea))
            if val < best[platform][0]:
                best[platform] = (val, mark, agent, idea)
        else:
            counts[agent]["discard"] += 1
            posts.append(("results", agent, (f"{rng.getrandbits(28):07x}", platform, val, 40.0, f"{idea} (DISCARD)"), t))
    hashes = _fast_import(repo, commits)
    short = lambda m: hashes[m][:7] if isinstance(m, int) else m  # noqa: E731
    with conn:
        conn.executemany("INSERT OR IGNORE INTO agents(id, key_hash, created_at) VALUES (?, ?, ?)", [(a, f"hash-of-{a}", t0) for a in agents])
        for name in ("results", "discussion"):
            conn.execute("INSERT OR IGNORE INTO channels(name, description, created_by, created_at) VALUES (?, '', ?, ?)",
                         (name, agents[0], t0))
        conn.executemany("INSERT OR IGNORE INTO commits(hash, parent_hash, agent_id, message, created_at) "
                         "VALUES (?, ?, ?, ?, ?)",
                         [(hashes[m], hashes[p] if p else None, a, msg, t) for m, p, a, msg, t, _ in commits])
    lines = []
    with conn:
        rows = [(ch, a, result_line(short(m), p, v, g, d), t) for ch, a, (m, p, v, g, d), t in posts]
        lines = [r[2] for r in rows]
        t_end = t0 + 10 * n_results
        rows += [(ch, a, content, t_end + i) for i, (ch, a, content) in enumerate(extra_posts)]
        for ch, a, content, t in rows:
            cur = conn.execute("INSERT INTO posts(channel, agent_id, content, created_at) VALUES (?, ?, ?, ?)",
                               (ch, a, content, t))
            if on_post is not None:
                on_post(conn, dict(id=cur.lastrowid, channel=ch, agent_id=a, content=content, created_at=t))
    conn.close()
    for p, runs in base_runs.items():   # the hub's values: the baseline's is the mean of its runs
        baseline[p] = sum(runs) / len(runs)
        kept[p][0] = (baseline[p],) + kept[p][0][1:]
        best[p] = min(kept[p], key=lambda b: b[0])   # the first at the lowest value
    return dict(best={p: (v, short(m), a, d) for p, (v, m, a, d) in best.items()}, baseline=baseline,
                counts=counts, commits=[hashes[c[0]] for c in commits], lines=lines, agents=agents,
                head={a: hashes[m] for a, (v, m) in start.items()})


def _fast_import(repo, commits):
    """Write `commits` into the bare repository in one `git fast-import`; returns {mark: full hash}."""
    if not commits:
        return {}
    out = []
    for mark, parent, agent, message, t, content in commits:
        msg, body = message.encode(), content.encode()
        out.append(f"commit refs/heads/{agent}\nmark :{mark}\n"
                   f"committer {agent} <{agent}@hub> {int(t)} +0000\ndata {len(msg)}\n".encode() + msg + b"\n")
        if parent:
            out.append(f"from :{parent}\n".encode())
        else:
            out.append(b"deleteall\n")
            prep = b"# prepare.py: read-only\n"
            out.append(f"M 100644 inline prepare.py\ndata {len(prep)}\n".encode() + prep + b"\n")
        out.append(f"M 100644 inline train.py\ndata {len(body)}\n".encode() + body + b"\n")
    marks = os.path.join(repo, "marks")
    # each commit names its parent by mark; a branch that jumps to another agent's commit is reset first
    subprocess.run(["git", "--git-dir", repo, "fast-import", "--quiet", "--force", f"--export-marks={marks}"],
                   input=b"".join(out), check=True)
    hashes = {}
    with open(marks) as f:
        for line in f:
            m, h = line.split()
            hashes[int(m[1:])] = h
    os.remove(marks)
    # the server keeps every commit by refs/commits/<hash> (what it would do at start, done here)
    subprocess.run(["git", "--git-dir", repo, "update-ref", "--stdin"], check=True,
                   input="".join(f"update refs/commits/{h} {h}\n" for h in hashes.values()).encode())
    return hashes
