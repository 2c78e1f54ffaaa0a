"""program_agenthub.md against a live hub: three scripted agents run its commands as written.

The commands are taken out of program_agenthub.md (its ```bash blocks and inline `spans`) and run with bash in
three clones, against hub/server.py on loopback. The agents' choices (name, platform, description, hashes) fill
the <placeholders>; the only other change is `uv run train.py` -> `python3 train.py`: train.py here is a fake
that prints a result in a moment. Afterwards the hub's commits, leaves, children, diffs and posts must be exactly
what the agents did.
"""

import json
import os
import re
import subprocess
import textwrap

import pytest
import requests

from hub_helpers import GIT_ENV, ROOT, HubProcess, run_git

# A stand-in for train.py: prints the platform line at start and train.py's summary block; val_bpb is a
# function of the two constants the agents edit, best at LR = 0.05, WD = 0.1.
FAKE_TRAIN = '''\
print("platform: testcpu")
LR = 0.02
WD = 0.0
val_bpb = 1.0 + abs(LR - 0.05) * 10 + abs(WD - 0.1) * 2
print("---")
print(f"val_bpb:          {val_bpb:.6f}")
print("training_seconds: 300.1")
print(f"peak_vram_mb:     {45000 + LR * 1000:.1f}")
print("device:           cpu")
'''
RESULT_LINE = re.compile(r"commit:([0-9a-f]{7}) platform:(\S+) val_bpb:(\d\.\d{6}|---) vram_gb:(\d+\.\d|---) \| (.+)")


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
        self.env = dict(GIT_ENV, HUB=hub.url, HOME=str(clone.parent / (clone.name + "-home")))
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

    def experiment(self, description, **constants):
        """Edit, commit, run, read, post; returns val_bpb (None for a crash)."""
        self.edit(**constants)
        self.run("git add train.py && git commit", description=description)
        self.run("uv run train.py > run.log 2>&1", ok=False)
        metrics = self.run('grep "^val_bpb:', ok=False).stdout
        if not metrics:
            reason = self.run("tail -n 50 run.log").stdout.strip().splitlines()[-1]
            self.post_result("crash", description, reason=reason)
            return None
        return float(re.search(r"^val_bpb:\s+(\S+)", metrics, re.MULTILINE).group(1))

    def post_result(self, kind, description, **fill):
        marker = "val_bpb:---" if kind == "crash" else "val_bpb:$(awk"
        (post,) = self.json_lines(marker, description=description, **fill)
        assert RESULT_LINE.fullmatch(post["content"]), post
        return post

    def results(self):
        """The results channel, oldest first, parsed into (commit, platform, val_bpb, description)."""
        posts = self.json_lines('"$HUB/api/channels/results/posts?limit=50"')[0]
        return [RESULT_LINE.fullmatch(p["content"]).groups() for p in reversed(posts)]

    def best(self, platform):
        rows = [r for r in self.results() if r[1] == platform and r[2] != "---" and "(DISCARD)" not in r[4]]
        return min(rows, key=lambda r: float(r[2]))


@pytest.fixture
def world(tmp_path, program):
    """A hub, an upstream repository with the fake train.py, and three clones (gamma's prepare.py differs)."""
    upstream = tmp_path / "upstream"
    upstream.mkdir()
    run_git(upstream, "init", "-q", "-b", "main")
    for name, text in [("train.py", FAKE_TRAIN), ("prepare.py", "TIME_BUDGET = 300\n"),
                       ("pyproject.toml", "[project]\nname = 'autoresearch'\n"), ("uv.lock", "version = 1\n"),
                       ("README.md", "# autoresearch\n")]:
        (upstream / name).write_text(text)
    run_git(upstream, "add", ".")
    run_git(upstream, "commit", "-q", "-m", "upstream")
    hub = HubProcess(tmp_path / "hub")
    agents = {}
    for name in ("alpha", "beta", "gamma"):
        run_git(tmp_path, "clone", "-q", str(upstream), name)
        agents[name] = Agent(program, hub, tmp_path / name)
    (tmp_path / "gamma" / "prepare.py").write_text("TIME_BUDGET = 600\n")  # another game: another baseline
    run_git(tmp_path / "gamma", "commit", "-q", "-am", "a longer budget")
    yield hub, agents
    hub.kill()


def setup_agent(agent, name):
    agent.run("/api/register", name=name)
    agent.run("uv run train.py > run.log 2>&1")
    platform = agent.run('grep "^platform:" run.log').stdout.split()[1]
    agent.run("export PLATFORM=", platform=platform)
    agent.run("git checkout -q --orphan agenthub")
    channels = agent.json_lines('"name": "results"')
    assert all("name" in c or "exists" in c.get("error", "") for c in channels)
    reads = agent.json_lines('"$HUB/api/git/leaves"')
    assert len(reads) == 4 and all(isinstance(r, list) for r in reads)
    # the baseline run: train.py as it is, its result posted, its commit pushed
    agent.run("uv run train.py > run.log 2>&1")
    agent.post_result("ok", "baseline")
    return agent.json_lines("git bundle create")[0]["added"]


def test_three_agents_follow_program_agenthub_as_written(world):
    hub, agents = world
    alpha, beta, gamma = agents["alpha"], agents["beta"], agents["gamma"]
    # setup: alpha makes the baseline, beta starts from it (same prepare.py), gamma has another prepare.py
    (a0,) = [c["hash"] for c in setup_agent(alpha, "alpha")]
    assert run_git(alpha.clone, "ls-tree", "--name-only", "HEAD").split() == ["prepare.py", "pyproject.toml",
                                                                           "train.py", "uv.lock"]
    assert setup_agent(beta, "beta") == [] and beta.head() == a0  # nothing new: beta is on alpha's baseline
    (g0,) = [c["hash"] for c in setup_agent(gamma, "gamma")]
    assert g0 != a0 and run_git(gamma.clone, "show", "HEAD:prepare.py") == "TIME_BUDGET = 600"

    # alpha improves on the baseline and pushes
    assert alpha.experiment("raise LR to 0.04", LR=0.04) == pytest.approx(1.3)
    alpha.post_result("ok", "raise LR to 0.04")
    (a1,) = [c["hash"] for c in alpha.json_lines("git bundle create")[0]["added"]]

    # beta reads the results, sees alpha's best, looks at its children, fetches it, builds on it
    commit, _, val, _, _ = beta.best("testcpu")
    assert (commit, val) == (a1[:7], "1.300000")
    assert beta.json_lines("/children", hash=commit) == [[]]
    beta.run("fetch/<hash>", hash=commit)
    assert beta.head() == a1
    assert beta.experiment("weight decay 0.1", WD=0.1) == pytest.approx(1.1)
    beta.post_result("ok", "weight decay 0.1")
    (b1,) = [c["hash"] for c in beta.json_lines("git bundle create")[0]["added"]]
    assert beta.experiment("LR 0.09", LR=0.09) == pytest.approx(1.4)  # worse: posted as a discard, reset, not pushed
    beta.post_result("ok", "LR 0.09 (DISCARD)")
    beta.run("git reset --hard HEAD~1")
    assert beta.head() == b1

    # gamma's run crashes: posted, reset
    assert gamma.experiment("divide by zero", WD="1 / 0") is None
    gamma.run("git reset --hard HEAD~1")
    assert gamma.head() == g0

    # alpha reads again, finds beta's commit on top of its own, checks the diff, builds on it
    commit, _, val, _, _ = alpha.best("testcpu")
    assert commit == b1[:7] and val == "1.100000"
    (children,) = alpha.json_lines("/children", hash=a1[:7])
    assert [c["hash"] for c in children] == [b1] and children[0]["agent_id"] == "beta"
    diff = alpha.run("/api/git/diff/", hash_a=a1[:7], hash_b=b1[:7]).stdout
    assert diff == subprocess.run(["git", "-C", str(beta.clone), "diff", a1, b1], capture_output=True,
                                  text=True).stdout and "+WD = 0.1" in diff
    alpha.run("fetch/<hash>", hash=b1[:7])
    assert alpha.head() == b1
    assert alpha.experiment("LR 0.05 on beta's weight decay", LR=0.05) == pytest.approx(1.0)
    alpha.post_result("ok", "LR 0.05 on beta's weight decay")
    (a2,) = [c["hash"] for c in alpha.json_lines("git bundle create")[0]["added"]]
    (post,) = alpha.json_lines("<markdown>", markdown="**LR 0.05 + WD 0.1** is the best so far.\n- next: warmup?")
    assert post["content"] == "**LR 0.05 + WD 0.1** is the best so far.\n- next: warmup?\n"

    # alpha restarts: its identity is kept, no second registration
    creds = (alpha.clone / ".git" / "agenthub_creds").read_text()
    alpha.run("/api/register", name="alpha-again")
    assert (alpha.clone / ".git" / "agenthub_creds").read_text() == creds
    assert "export PLATFORM=testcpu" in creds and "export AGENT_ID=alpha" in creds

    # the hub holds exactly what the agents did
    auth = {"Authorization": "Bearer " + re.search(r"HUB_KEY=(\S+)", creds).group(1)}

    get = lambda path: requests.get(hub.url + path, headers=auth, timeout=60).json()
    records = {c["hash"]: (c["parent_hash"], c["agent_id"], c["message"]) for c in get("/api/git/commits?limit=100")}
    assert records == {a0: (None, "alpha", "baseline"), a1: (a0, "alpha", "raise LR to 0.04"),
                       b1: (a1, "beta", "weight decay 0.1"), a2: (b1, "alpha", "LR 0.05 on beta's weight decay"),
                       g0: (None, "gamma", "baseline")}
    assert sorted(c["hash"] for c in get("/api/git/leaves")) == sorted([a2, g0])
    for parent, kids in [(a0, [a1]), (a1, [b1]), (b1, [a2]), (a2, []), (g0, [])]:
        assert [c["hash"] for c in get(f"/api/git/commits/{parent}/children")] == kids
    for a, b in [(a0, a1), (a1, b1), (b1, a2), (a0, a2)]:
        diff = requests.get(f"{hub.url}/api/git/diff/{a}/{b}", headers=auth, timeout=60).text
        assert diff == subprocess.run(["git", "-C", str(alpha.clone), "diff", a, b], capture_output=True,
                                      text=True).stdout
    results = [(p["agent_id"],) + RESULT_LINE.fullmatch(p["content"]).groups()
               for p in reversed(get("/api/channels/results/posts?limit=50"))]
    crash_commit = results[6][1]
    assert results == [
        ("alpha", a0[:7], "testcpu", "1.500000", "44.0", "baseline"),
        ("beta", a0[:7], "testcpu", "1.500000", "44.0", "baseline"),
        ("gamma", g0[:7], "testcpu", "1.500000", "44.0", "baseline"),
        ("alpha", a1[:7], "testcpu", "1.300000", "44.0", "raise LR to 0.04"),
        ("beta", b1[:7], "testcpu", "1.100000", "44.0", "weight decay 0.1"),
        ("beta", results[5][1], "testcpu", "1.400000", "44.0", "LR 0.09 (DISCARD)"),
        ("gamma", crash_commit, "testcpu", "---", "---",
         "divide by zero (CRASH: ZeroDivisionError: division by zero)"),
        ("alpha", a2[:7], "testcpu", "1.000000", "44.0", "LR 0.05 on beta's weight decay"),
    ]
    assert crash_commit not in {h[:7] for h in records}
    assert [p["agent_id"] for p in get("/api/channels/discussion/posts")] == ["alpha"]
    assert [c["name"] for c in get("/api/channels")] == ["discussion", "results"]
