"""program_agenthub.md against a live hub: scripted agents run its commands as written.

The commands are taken out of program_agenthub.md (its ```bash blocks and inline `spans`) and run with bash in
clones, against hub/server.py on loopback. The agents' choices (name, description, seed, hashes) fill the
<placeholders>; the only other change is `uv run train.py` -> `python3 train.py`: train.py here is a fake that
prints a result in a moment. Afterwards the hub's commits, leaves, children, diffs and posts must be exactly what
the agents did.
"""

import json
import os
import re
import subprocess
import textwrap
import threading

import pytest
import requests

from hub_helpers import GIT_ENV, ROOT, HubProcess, run_git

# A stand-in for train.py: prints the platform line at start and train.py's summary block; val_bpb is a
# function of the two constants the agents edit, best at LR = 0.05, WD = 0.1, and of the seed (+0.01 a seed).
# SLEEP makes it overstay any timeout.
FAKE_TRAIN = '''\
import os, time
print("platform: test-cpu-2c")
LR = 0.02
WD = 0.0
SLEEP = 0
time.sleep(SLEEP)
val_bpb = 1.0 + abs(LR - 0.05) * 10 + abs(WD - 0.1) * 2 + (int(os.environ.get("AUTORESEARCH_SEED", "42")) - 42) / 100
print("---")
print(f"val_bpb:          {val_bpb:.6f}")
print("training_seconds: 1.5")
print("total_seconds:    2.0")
print(f"peak_vram_mb:     {45000 + LR * 1000:.1f}")
print("device:           cpu")
'''
RESULT_LINE = re.compile(r"commit:([0-9a-f]{7}) platform:(\S+) val_bpb:(\d\.\d{6}|---) vram_gb:(\d+\.\d|---) \| (.+)")

with open(os.path.join(ROOT, "hub", "server.py"), encoding="utf-8") as _f:
    _SERVER = _f.read()
MISSING = [e for e in ("/api/baseline", "/api/best") if e not in _SERVER]
needs_hub_endpoints = pytest.mark.skipif(bool(MISSING), reason=f"hub/server.py has no {' or '.join(MISSING)} endpoint "
                                         "yet (the hub helper adds them; program_agenthub.md uses both)")


@pytest.fixture(scope="module")
def program():
    with open(os.path.join(ROOT, "program_agenthub.md"), encoding="utf-8") as f:
        return f.read()


def blocks(text):
    """The ```bash blocks, dedented (they sit inside list items)."""
    found = re.findall(r"^( *)```bash\n(.*?)^\1```", text, re.MULTILINE | re.DOTALL)
    return [textwrap.dedent(body) for _, body in found]


def inline(text):
    return [s.strip() for s in re.findall(r"`([^`\n]+)`", re.sub(r"^ *```.*?^ *```", "", text,
                                                                 flags=re.MULTILINE | re.DOTALL))]


class Agent:
    """One scripted agent: a clone, an environment, and the program's commands."""

    def __init__(self, program, hub, clone):
        self.program, self.hub, self.clone = program, hub, clone
        # each its own author: agents committing the same tree in the same second make distinct commits
        self.env = dict(GIT_ENV, HUB=hub.url, HOME=str(clone.parent / (clone.name + "-home")), GIT_AUTHOR_NAME=clone.name)
        os.makedirs(self.env["HOME"], exist_ok=True)

    def command(self, marker, **fill):
        """The one block or inline command of the program containing marker, placeholders filled."""
        found = [b for b in blocks(self.program) if marker in b] or sorted({s for s in inline(self.program) if marker in s})
        assert len(found) == 1, (marker, found)
        command = found[0].replace("uv run train.py", "python3 train.py")
        for name, value in fill.items():
            command = command.replace(f"<{name}>", value)
        assert not re.search(r"<[a-z_]+>", command), f"unfilled placeholder in {command!r}"
        return command

    def run(self, marker, ok=True, **fill):
        result = subprocess.run(["bash", "-c", self.command(marker, **fill)], cwd=self.clone, env=self.env,
                                capture_output=True, text=True, timeout=120)
        if ok:
            assert result.returncode == 0, (marker, result.stdout, result.stderr)
        return result

    def push(self):
        """The push block of loop step 5 (setup step 4 pushes too, inside its if): the hashes the hub added."""
        (block,) = [b for b in blocks(self.program) if b.splitlines()[1:2] and b.splitlines()[1].startswith("git bundle create")]
        result = subprocess.run(["bash", "-c", block], cwd=self.clone, env=self.env, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr
        return [c["hash"] for c in json.loads(result.stdout)["added"]]

    def json_lines(self, marker, **fill):
        return [json.loads(line) for line in self.run(marker, **fill).stdout.splitlines() if line.strip()]

    # the agent's own moves ---------------------------------------------------------------------------------
    def edit(self, **constants):
        path = self.clone / "train.py"
        text = path.read_text()
        for name, value in constants.items():
            text = re.sub(rf"^{name} = .*$", f"{name} = {value}", text, flags=re.MULTILINE)
        path.write_text(text)

    def head(self):
        return run_git(self.clone, "rev-parse", "HEAD")

    def train(self, seed=42):
        """The run command as written; returns val_bpb, or None for a crash (then the reason, from the log's end)."""
        self.run("timeout ${T:-3600}", seed=str(seed))
        assert (self.clone / "logs" / f"{self.head()[:7]}-{seed}.log").read_text() == (self.clone / "run.log").read_text()
        metrics = self.run('grep "^val_bpb:', ok=False).stdout
        if not metrics:
            return None
        return float(re.search(r"^val_bpb:\s+(\S+)", metrics, re.MULTILINE).group(1))

    def experiment(self, description, **constants):
        """Edit, commit, run, read; a crash is posted; returns val_bpb (None for a crash)."""
        self.edit(**constants)
        self.run("git add train.py && git commit", description=description)
        value = self.train()
        if value is None:
            tail = self.run("tail -c 3000 run.log").stdout.strip().splitlines()
            reason = "killed by the timeout" if tail[-1] == "exit status: 124" else tail[-2]
            self.post_result("crash", description, reason=reason)
        return value

    def post_result(self, kind, description, **fill):
        marker = "val_bpb:---" if kind == "crash" else "val_bpb:$(awk"
        (post,) = self.json_lines(marker, description=description, **fill)
        assert RESULT_LINE.fullmatch(post["content"]), post
        return post

    def results(self):
        """The results channel, oldest first, parsed into (commit, platform, val_bpb, description)."""
        posts = self.json_lines('"$HUB/api/channels/results/posts?limit=50"')[0]
        return [RESULT_LINE.fullmatch(p["content"]).groups() for p in reversed(posts)]

    def best(self):
        """The hub's answer to "best on my platform" (the last line of the read block): (hash, val_bpb, n)."""
        answer = self.json_lines('"$HUB/api/best?platform=$PLATFORM"')[-1]
        return answer["hash"], answer["val_bpb"], answer["n"]


def make_upstream(path, train=FAKE_TRAIN, prepare="TIME_BUDGET = 300\n"):
    path.mkdir()
    run_git(path, "init", "-q", "-b", "main")
    for name, text in [("train.py", train), ("prepare.py", prepare), ("README.md", "# autoresearch\n"),
                       ("pyproject.toml", "[project]\nname = 'autoresearch'\n"), ("uv.lock", "version = 1\n"),
                       (".gitignore", "results.tsv\nrun.log\n/logs/\n")]:
        (path / name).write_text(text)
    run_git(path, "add", ".")
    run_git(path, "commit", "-q", "-m", "upstream")
    return path


@pytest.fixture
def hub(tmp_path):
    process = HubProcess(tmp_path / "hub")
    yield process
    process.kill()


def clone(program, hub, upstream, name):
    run_git(upstream.parent, "clone", "-q", str(upstream), name)
    return Agent(program, hub, upstream.parent / name)


def setup_agent(agent, name):
    """Setup steps 1 to 6 as written, then the baseline's result posted; returns the commit the agent is on."""
    agent.run("/api/register", name=name)
    agent.run("api/baseline")
    channels = agent.json_lines('"name": "results"')
    assert all("name" in c or "exists" in c.get("error", "") for c in channels)
    assert agent.train() == pytest.approx(1.5)
    env = agent.run("agenthub_env").stdout
    assert env == "export PLATFORM=%s\nexport T=5\n" % re.search(r'platform: (\S+)"', (agent.clone / "train.py").read_text()).group(1)
    agent.post_result("ok", "baseline")
    return agent.head()


@needs_hub_endpoints
def test_three_agents_starting_together_end_on_one_baseline(tmp_path, hub, program):
    """Setup step 4 run by three agents at the same moment: each pushes a root, all three end on the same one."""
    upstream = make_upstream(tmp_path / "upstream")
    agents = [clone(program, hub, upstream, name) for name in ("alpha", "beta", "gamma")]
    for agent, name in zip(agents, ("alpha", "beta", "gamma")):
        agent.run("/api/register", name=name)
    start = threading.Barrier(len(agents))
    results = {}

    def join(agent):
        start.wait()
        results[agent] = agent.run("api/baseline", ok=False)

    threads = [threading.Thread(target=join, args=(agent,)) for agent in agents]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(results[a].returncode == 0 for a in agents), [results[a].stderr for a in agents]
    heads = {agent.head() for agent in agents}
    assert len(heads) == 1
    (head,) = heads
    prepare_py = run_git(agents[0].clone, "hash-object", "prepare.py")
    creds = (agents[0].clone / ".git" / "agenthub_creds").read_text()
    auth = {"Authorization": "Bearer " + re.search(r"HUB_KEY=(\S+)", creds).group(1)}
    answer = requests.get(f"{hub.url}/api/baseline", params={"prepare_py": prepare_py}, headers=auth, timeout=60)
    assert answer.status_code == 200 and answer.json()["hash"] == head
    roots = requests.get(f"{hub.url}/api/git/commits", params={"roots": 1, "limit": 10}, headers=auth, timeout=60).json()
    assert head in {r["hash"] for r in roots} and len(roots) <= 3
    for agent in agents:
        assert run_git(agent.clone, "ls-tree", "--name-only", "HEAD").split() == ["prepare.py", "pyproject.toml",
                                                                               "train.py", "uv.lock"]
        assert run_git(agent.clone, "rev-parse", "--abbrev-ref", "HEAD") == "agenthub"


@needs_hub_endpoints
def test_three_agents_follow_program_agenthub_as_written(tmp_path, hub, program):
    upstream = make_upstream(tmp_path / "upstream")
    alpha, beta = clone(program, hub, upstream, "alpha"), clone(program, hub, upstream, "beta")
    # gamma plays another game (another prepare.py) on another platform
    other = make_upstream(tmp_path / "other", train=FAKE_TRAIN.replace("test-cpu-2c", "test-gpu"),
                          prepare="TIME_BUDGET = 600\n")
    gamma = clone(program, hub, other, "gamma")

    # setup: alpha's baseline is the hub's; beta pushes its own root, then moves to alpha's (same prepare.py)
    a0 = setup_agent(alpha, "alpha")
    assert run_git(alpha.clone, "ls-tree", "--name-only", "HEAD").split() == ["prepare.py", "pyproject.toml",
                                                                           "train.py", "uv.lock"]
    assert setup_agent(beta, "beta") == a0
    g0 = setup_agent(gamma, "gamma")
    assert g0 != a0 and run_git(gamma.clone, "show", "HEAD:prepare.py") == "TIME_BUDGET = 600"

    # a repeated commit: alpha runs the baseline again with the next seed; its value is the mean of its results
    assert alpha.train(seed=43) == pytest.approx(1.51)
    alpha.post_result("ok", "baseline, second seed")
    (best, value, n) = alpha.best()
    assert best.startswith(a0[:7]) and n == 3 and value == pytest.approx((1.5 + 1.5 + 1.51) / 3)

    # alpha improves on the baseline and pushes
    assert alpha.experiment("raise LR to 0.04", LR=0.04) == pytest.approx(1.3)
    alpha.post_result("ok", "raise LR to 0.04")
    (a1,) = alpha.push()

    # beta asks the hub for the best on its platform, looks at its children, fetches it, builds on it
    best, value, n = beta.best()
    assert best.startswith(a1[:7]) and value == pytest.approx(1.3) and n == 1
    assert beta.json_lines("/children", hash=a1[:7]) == [[]]
    beta.run("fetch/<hash>", hash=a1[:7])
    assert beta.head() == a1
    assert beta.experiment("weight decay 0.1", WD=0.1) == pytest.approx(1.1)
    beta.post_result("ok", "weight decay 0.1")
    (b1,) = beta.push()
    assert beta.experiment("LR 0.09", LR=0.09) == pytest.approx(1.4)  # worse: posted as a discard, reset, not pushed
    beta.post_result("ok", "LR 0.09 (DISCARD)")
    beta.run("git reset --hard HEAD~1")
    assert beta.head() == b1

    # gamma: a run that overstays the timeout taken from its baseline is killed; a crash; both posted and reset
    assert gamma.experiment("sleep in the loop", SLEEP=30) is None
    gamma.run("git reset --hard HEAD~1")
    assert gamma.experiment("divide by zero", WD="1 / 0") is None
    gamma.run("git reset --hard HEAD~1")
    assert gamma.head() == g0
    best, value, n = gamma.best()
    assert best.startswith(g0[:7]) and value == pytest.approx(1.5) and n == 1  # its platform, its game

    # alpha reads again, finds beta's commit on top of its own, checks the diff, builds on it
    best, value, _ = alpha.best()
    assert best.startswith(b1[:7]) and value == pytest.approx(1.1)
    (children,) = alpha.json_lines("/children", hash=a1[:7])
    assert [c["hash"] for c in children] == [b1] and children[0]["agent_id"] == "beta"
    diff = alpha.run("/api/git/diff/", hash_a=a1[:7], hash_b=b1[:7]).stdout
    assert diff == subprocess.run(["git", "-C", str(beta.clone), "diff", a1, b1], capture_output=True,
                                  text=True).stdout and "+WD = 0.1" in diff
    alpha.run("fetch/<hash>", hash=b1[:7])
    assert alpha.head() == b1
    assert alpha.experiment("LR 0.05 on beta's weight decay", LR=0.05) == pytest.approx(1.0)
    alpha.post_result("ok", "LR 0.05 on beta's weight decay")
    (a2,) = alpha.push()
    (post,) = alpha.json_lines("<markdown>", markdown="**LR 0.05 + WD 0.1** is the best so far.\n- next: warmup?")
    assert post["content"] == "**LR 0.05 + WD 0.1** is the best so far.\n- next: warmup?\n"

    # alpha restarts: its identity is kept, no second registration, no second baseline
    creds = (alpha.clone / ".git" / "agenthub_creds").read_text()
    alpha.run("/api/register", name="alpha-again")
    alpha.run("api/baseline")
    assert (alpha.clone / ".git" / "agenthub_creds").read_text() == creds and alpha.head() == a2
    assert "export PLATFORM=test-cpu-2c" in creds and "export AGENT_ID=alpha" in creds and "export T=5" in creds

    # every run's log is kept by commit and seed
    assert sorted(os.listdir(alpha.clone / "logs")) == sorted(
        [f"{a0[:7]}-42.log", f"{a0[:7]}-43.log", f"{a1[:7]}-42.log", f"{a2[:7]}-42.log"])

    # the hub holds exactly what the agents did
    auth = {"Authorization": "Bearer " + re.search(r"HUB_KEY=(\S+)", creds).group(1)}

    get = lambda path: requests.get(hub.url + path, headers=auth, timeout=60).json()
    records = {c["hash"]: (c["parent_hash"], c["agent_id"], c["message"]) for c in get("/api/git/commits?limit=100")}
    b0 = [h for h, (parent, agent, _) in records.items() if agent == "beta" and parent is None]
    assert records == {a0: (None, "alpha", "baseline"), a1: (a0, "alpha", "raise LR to 0.04"),
                       b1: (a1, "beta", "weight decay 0.1"), a2: (b1, "alpha", "LR 0.05 on beta's weight decay"),
                       g0: (None, "gamma", "baseline"), **{h: (None, "beta", "baseline") for h in b0}}
    assert len(b0) == 1  # beta's own root, pushed before it moved to alpha's
    assert sorted(c["hash"] for c in get("/api/git/leaves")) == sorted([a2, g0] + b0)
    for parent, kids in [(a0, [a1]), (a1, [b1]), (b1, [a2]), (a2, []), (g0, [])]:
        assert [c["hash"] for c in get(f"/api/git/commits/{parent}/children")] == kids
    for a, b in [(a0, a1), (a1, b1), (b1, a2), (a0, a2)]:
        diff = requests.get(f"{hub.url}/api/git/diff/{a}/{b}", headers=auth, timeout=60).text
        assert diff == subprocess.run(["git", "-C", str(alpha.clone), "diff", a, b], capture_output=True,
                                      text=True).stdout
    results = [(p["agent_id"],) + RESULT_LINE.fullmatch(p["content"]).groups()
               for p in reversed(get("/api/channels/results/posts?limit=50"))]
    killed, crashed = results[7][1], results[8][1]
    assert results == [
        ("alpha", a0[:7], "test-cpu-2c", "1.500000", "44.0", "baseline"),
        ("beta", a0[:7], "test-cpu-2c", "1.500000", "44.0", "baseline"),
        ("gamma", g0[:7], "test-gpu", "1.500000", "44.0", "baseline"),
        ("alpha", a0[:7], "test-cpu-2c", "1.510000", "44.0", "baseline, second seed"),
        ("alpha", a1[:7], "test-cpu-2c", "1.300000", "44.0", "raise LR to 0.04"),
        ("beta", b1[:7], "test-cpu-2c", "1.100000", "44.0", "weight decay 0.1"),
        ("beta", results[6][1], "test-cpu-2c", "1.400000", "44.0", "LR 0.09 (DISCARD)"),
        ("gamma", killed, "test-gpu", "---", "---", "sleep in the loop (CRASH: killed by the timeout)"),
        ("gamma", crashed, "test-gpu", "---", "---",
         "divide by zero (CRASH: ZeroDivisionError: division by zero)"),
        ("alpha", a2[:7], "test-cpu-2c", "1.000000", "44.0", "LR 0.05 on beta's weight decay"),
    ]
    assert killed not in {h[:7] for h in records} and crashed not in {h[:7] for h in records}
    assert [p["agent_id"] for p in get("/api/channels/discussion/posts")] == ["alpha"]
    assert [c["name"] for c in get("/api/channels")] == ["discussion", "results"]


def test_program_agenthub_cites_nothing_outside_the_repository(program):
    assert "../" not in program and "shared/" not in program and "AGENTHUB.md" not in program
