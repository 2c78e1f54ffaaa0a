"""The result-line parser (hub/results.py) and what the dashboard computes from its rows (hub/dashboard.py).

Lines are written the way agents write them (AGENTHUB.md); the expected values are read off by hand.
"""

import os
import re
import sqlite3

import pytest

from hub import dashboard
from hub.results import parse_line, parse_post

# ---------------------------------------------------------------------------------------------------------
# Real lines in every form


@pytest.mark.parametrize("line, expect", [
    ("commit:a1b2c3d platform:H100 val_bpb:0.997900 vram_gb:44.0 | baseline",
     dict(commit="a1b2c3d", platform="H100", val_bpb=0.9979, vram_gb=44.0, description="baseline", status="keep")),
    ("commit:b2c3d4e platform:H100 val_bpb:0.993200 vram_gb:44.2 | increase LR to 0.04",
     dict(commit="b2c3d4e", platform="H100", val_bpb=0.9932, vram_gb=44.2, description="increase LR to 0.04",
          status="keep")),
    ("commit:c3d4e5f platform:A100 val_bpb:1.005000 vram_gb:44.0 | switch to GeLU activation (DISCARD)",
     dict(commit="c3d4e5f", platform="A100", val_bpb=1.005, vram_gb=44.0,
          description="switch to GeLU activation (DISCARD)", status="discard")),
    ("commit:d4e5f6g platform:H100 val_bpb:--- vram_gb:--- | double model width (CRASH: OOM)", None),  # 'g': not hex
    ("commit:d4e5f6a platform:M4-Max val_bpb:--- vram_gb:--- | double model width (CRASH: OOM)",
     dict(commit="d4e5f6a", platform="M4-Max", val_bpb=None, vram_gb=None,
          description="double model width (CRASH: OOM)", status="crash")),
    # a crash marker wins over numbers the agent left in (a crash has no result)
    ("commit:e5f6a7b platform:4090 val_bpb:1.2 vram_gb:20.1 | (CRASH: timeout after 10 min) bigger batch",
     dict(commit="e5f6a7b", platform="4090", val_bpb=None, vram_gb=None,
          description="(CRASH: timeout after 10 min) bigger batch", status="crash")),
    # '---' without the marker is still a crash; a marker with a reason after a colon is still a discard
    ("commit:f6a7b8c platform:H100 val_bpb:--- vram_gb:--- | fp8 matmuls",
     dict(status="crash", val_bpb=None, description="fp8 matmuls")),
    ("commit:f6a7b8c platform:H100 val_bpb:0.9990 vram_gb:44 | fp8 (discard: no gain)", dict(status="discard")),
    # spacing, upper-case hashes, a long hash, '|' in the description, a CPU box without vram
    ("  commit:ABCDEF1   platform:CPU  val_bpb:2.114000\tvram_gb:0.0|depth 4 | width 256  ",
     dict(commit="abcdef1", platform="CPU", val_bpb=2.114, vram_gb=0.0, description="depth 4 | width 256",
          status="keep")),
    ("commit:0123456789abcdef0123456789abcdef01234567 platform:H100 val_bpb:0.99 vram_gb:--- | x",
     dict(commit="0123456789abcdef0123456789abcdef01234567", vram_gb=None, status="keep")),
    ("commit:a1b2c3d platform:H100 val_bpb:1e-1 vram_gb:44 | ", dict(val_bpb=0.1, description="", status="keep")),
])
def test_parse_line_real_forms(line, expect):
    row = parse_line(line)
    if expect is None:
        assert row["status"] == "unparsed" and row["raw"] == line.strip()
        return
    for key, value in expect.items():
        assert row[key] == (pytest.approx(value) if isinstance(value, float) else value), key
    assert row["raw"] == line.strip()


@pytest.mark.parametrize("line", [
    "",
    "just some text",
    "val_bpb: 0.99",                                                       # the train.py summary line, not a result
    "commit:a1b2c3d platform:H100 val_bpb:0.99 vram_gb:44",                # no '|'
    "commit:a1b2c3d val_bpb:0.99 vram_gb:44 | no platform",
    "platform:H100 commit:a1b2c3d val_bpb:0.99 vram_gb:44 | fields swapped",
    "commit:a1b platform:H100 val_bpb:0.99 vram_gb:44 | hash too short",
    "commit:a1b2c3d platform:H100 val_bpb:abc vram_gb:44 | not a number",
    "commit:a1b2c3d platform:H100 val_bpb:nan vram_gb:44 | nan",
    "commit:a1b2c3d platform:H100 val_bpb:inf vram_gb:44 | inf",
    "commit:a1b2c3d platform:H100 val_bpb:1e999 vram_gb:44 | overflows to inf",
    "commit:a1b2c3d platform:H100 val_bpb:-0.5 vram_gb:44 | negative",
    "commit:a1b2c3d platform:H100 val_bpb:0 vram_gb:44 | zero",
    "commit:a1b2c3d platform:H100 val_bpb:0.99 vram_gb:lots | vram garbage",
    "commit:a1b2c3d platform:H100 val_bpb:0.99x vram_gb:44 (CRASH: odd) | x",  # '|' missing after vram
    "commit:a1b2c3d platform:H100 val_bpb:oops vram_gb:--- | y (CRASH: z)",    # neither number nor '---'
    "commit:a1b2c3d platform:<script> val_bpb:0.99 vram_gb:44 | unsafe platform name",
    "commit:a1b2c3d platform:RTX 4090 val_bpb:0.99 vram_gb:44 | platform with a space",
    "- commit:a1b2c3d platform:H100 val_bpb:0.99 vram_gb:44 | markdown bullet",
])
def test_parse_line_malformed_is_kept_as_unparsed(line):
    row = parse_line(line)
    assert row["status"] == "unparsed"
    assert row["raw"] == line.strip()
    assert row["val_bpb"] is None and row["platform"] is None and row["commit"] is None


def test_parse_line_never_raises_and_bounds_raw():
    for thing in ["x" * 100_000, "\x00\x01|", "commit:" + "a" * 41, 12345, "commit:a1b2c3d platform:H100 val_bpb:"]:
        row = parse_line(thing)
        assert row["status"] == "unparsed" and len(row["raw"]) <= 2000


def test_parse_post_one_row_per_nonblank_line():
    rows = parse_post("commit:a1b2c3d platform:H100 val_bpb:0.99 vram_gb:44 | a\n\n  \n"
                      "commit:b1b2c3d platform:H100 val_bpb:1.01 vram_gb:44 | b (DISCARD)\nnote: trying c next\n")
    assert [r["status"] for r in rows] == ["keep", "discard", "unparsed"]
    assert rows[2]["raw"] == "note: trying c next"
    assert [r["status"] for r in parse_post("   \n")] == ["unparsed"]   # an empty post still shows


# ---------------------------------------------------------------------------------------------------------
# What the page computes: baseline, kept line, running best, best (analysis.ipynb's semantics per platform)


SCHEMA = """
CREATE TABLE agents(id TEXT PRIMARY KEY, key_hash TEXT NOT NULL UNIQUE, created_at REAL NOT NULL);
CREATE TABLE channels(name TEXT PRIMARY KEY, description TEXT NOT NULL DEFAULT '', created_by TEXT, created_at REAL NOT NULL);
CREATE TABLE posts(id INTEGER PRIMARY KEY AUTOINCREMENT, channel TEXT NOT NULL, agent_id TEXT NOT NULL,
                   content TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE commits(hash TEXT PRIMARY KEY, parent_hash TEXT, agent_id TEXT NOT NULL, message TEXT NOT NULL,
                     created_at REAL NOT NULL);
CREATE INDEX commits_by_parent ON commits(parent_hash);
"""


@pytest.fixture
def db(tmp_path):
    # as the server opens it: autocommit (it runs BEGIN IMMEDIATE itself), rows as sqlite3.Row
    conn = sqlite3.connect(tmp_path / "hub.sqlite3", isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.executescript(SCHEMA)
    dashboard.init_db(conn)
    yield conn
    conn.close()


def post(conn, channel, agent, content, t=0.0):
    conn.execute("BEGIN IMMEDIATE")
    cur = conn.execute("INSERT INTO posts(channel, agent_id, content, created_at) VALUES (?, ?, ?, ?)",
                       (channel, agent, content, t))
    dashboard.on_post(conn, dict(id=cur.lastrowid, channel=channel, agent_id=agent, content=content, created_at=t))
    conn.execute("COMMIT")


def test_platform_summary_by_hand(db):
    lines = [  # (agent, line)
        ("ann", "commit:1111111 platform:H100 val_bpb:--- vram_gb:--- | first try (CRASH: import error)"),
        ("ann", "commit:2222222 platform:H100 val_bpb:1.000000 vram_gb:40 | baseline"),
        ("bob", "commit:3333333 platform:A100 val_bpb:1.100000 vram_gb:40 | baseline"),
        ("bob", "commit:4444444 platform:H100 val_bpb:0.990000 vram_gb:40 | lr up"),
        ("ann", "commit:5555555 platform:H100 val_bpb:1.020000 vram_gb:40 | gelu (DISCARD)"),
        ("ann", "commit:6666666 platform:H100 val_bpb:0.995000 vram_gb:40 | kept by ann, not a record"),
        ("bob", "commit:7777777 platform:H100 val_bpb:0.980000 vram_gb:40 | depth 10"),
        ("bob", "garbage"),
    ]
    for agent, line in lines:
        post(db, "results", agent, line)
    post(db, "discussion", "ann", "commit:8888888 platform:H100 val_bpb:0.1 vram_gb:1 | not in results: ignored")
    s = dashboard.platform_runs(db)
    assert sorted(s) == ["A100", "H100"]
    h = s["H100"]
    assert [r["x"] for r in h["rows"]] == [0, 1, 2, 3, 4, 5]           # crashes count as experiments
    assert h["baseline"]["commit"] == "2222222"                        # first finished run, not the crash
    assert [r["commit"] for r in h["kept"]] == ["2222222", "4444444", "6666666", "7777777"]
    assert [r["running_best"] for r in h["kept"]] == [1.0, 0.99, 0.99, 0.98]
    assert [r["record"] for r in h["kept"]] == [True, True, False, True]
    assert h["best"]["commit"] == "7777777" and h["best"]["agent"] == "bob"
    assert h["n_crash"] == 1 and len(h["finished"]) == 5
    assert s["A100"]["best"]["val_bpb"] == 1.1 and s["A100"]["baseline"] is s["A100"]["best"]
    assert dashboard.platform_summary(db) == summary_of(s)
    html = dashboard.render_index(db, dashboard.platform_summary(db), dashboard.records_version(db))
    best_table = html[html.index('id="best"'):html.index('id="charts"')]
    assert "0.980000" in best_table and "0.020000 (2.00%)" in best_table   # 1.0 -> 0.98: 2% lower
    assert "depth 10" in best_table and "bob" in best_table and "1.100000" in best_table
    assert "0.1000" not in html                                          # a discussion post is not a result
    unparsed = html[html.index('id="unparsed"'):]
    assert "garbage" in unparsed
    agents = html[html.index('id="agents"'):html.index('id="latest"')]
    # ann: 1 crash, 1 keep (baseline), 1 discard, 1 keep; bob: 1 keep (A100 baseline), 2 keeps, 1 unparsed
    assert ('<td>ann</td><td class="num">4</td><td class="num keep">2</td><td class="num discard">1</td>'
            '<td class="num crash">1</td><td class="num unparsed">0</td>') in agents
    assert ('<td>bob</td><td class="num">4</td><td class="num keep">3</td><td class="num discard">0</td>'
            '<td class="num crash">0</td><td class="num unparsed">1</td>') in agents


def summary_of(runs):
    """platform_runs reduced to what platform_summary returns (its rows without the chart's fields)."""
    keys = ("id", "agent", "commit", "val_bpb", "status", "description")
    pick = lambda r: {k: r[k] for k in keys} if r else None  # noqa: E731
    return {p: dict(baseline=pick(s["baseline"]), best=pick(s["best"]), n_runs=s["n_runs"], n_kept=s["n_kept"],
                    n_crash=s["n_crash"], version=s["version"]) for p, s in runs.items()}


def test_platform_summary_equals_the_full_computation_on_a_swarm(tmp_path):
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    import hub_fill
    hub_fill.fill(tmp_path, 600, n_agents=7, platforms=("H100", "A100", "CPU", "M4-Max"), seed=3,
                  extra_posts=[("results", "x", "commit:1234567 platform:TPU val_bpb:--- vram_gb:--- | (CRASH: x)")])
    conn = sqlite3.connect(tmp_path / "hub.sqlite3")
    dashboard.init_db(conn)
    runs = dashboard.platform_runs(conn)
    assert sorted(runs) == ["A100", "CPU", "H100", "M4-Max", "TPU"] and runs["TPU"]["best"] is None
    assert dashboard.platform_summary(conn) == summary_of(runs)
    assert dashboard.platform_runs(conn, "CPU") == {"CPU": runs["CPU"]}
    conn.close()


def test_init_db_backfills_once_and_on_post_ignores_other_channels(tmp_path):
    conn = sqlite3.connect(tmp_path / "hub.sqlite3")
    conn.executescript(SCHEMA)
    conn.executemany("INSERT INTO posts(channel, agent_id, content, created_at) VALUES (?, ?, ?, 0)", [
        ("results", "a", "commit:1111111 platform:H100 val_bpb:1.0 vram_gb:1 | x\nnot a line"),
        ("discussion", "a", "hello"),
        ("results", "b", "nonsense")])
    conn.commit()
    assert dashboard.init_db(conn) == 2
    assert dashboard.init_db(conn) == 0          # idempotent: a restart parses nothing twice
    rows = conn.execute("SELECT post_id, line_no, agent_id, status FROM results ORDER BY id").fetchall()
    assert rows == [(1, 0, "a", "keep"), (1, 1, "a", "unparsed"), (3, 0, "b", "unparsed")]
    dashboard.on_post(conn, dict(id=9, channel="discussion", agent_id="a", content="x", created_at=0))
    assert conn.execute("SELECT COUNT(*) FROM results").fetchone() == (3,)
    conn.close()


def test_chart_draws_every_case_and_treats_text_as_text(db):
    post(db, "results", "a", "commit:1111111 platform:CPU val_bpb:--- vram_gb:--- | only a crash (CRASH: x)")
    post(db, "results", "a", "commit:2222222 platform:H100 val_bpb:1.0 vram_gb:1 | baseline")
    post(db, "results", "a", "commit:3333333 platform:H100 val_bpb:0.9 vram_gb:1 | cost $\\frac{1}{2$ <b>&amp;")
    post(db, "results", "a", "commit:4444444 platform:H100 val_bpb:3.0 vram_gb:1 | way off (DISCARD)")
    s = dashboard.platform_runs(db)
    svg = dashboard.draw_chart("H100", s["H100"]).decode()
    assert svg.startswith("<?xml") and "<script" not in svg
    assert "cost $\\frac{1}{2$ &lt;b&gt;&amp;amp; (a)" in svg       # escaped, not mathtext, not markup
    assert "Discarded (1, 1 above the axis)" in svg and "Kept (2)" in svg
    assert "1.000000 -&gt; 0.900000 (10.00% lower)" in svg
    assert "none finished yet" in dashboard.draw_chart("CPU", s["CPU"]).decode()


def test_markdown_of_posts_is_safe():
    html = dashboard.MARKDOWN.render(
        "| a | b |\n|---|---|\n| 1 | <i>2</i> |\n\n<script>alert(1)</script>\n\n"
        "~~old~~ ![img](http://x/y.png) [j](JaVaScRiPt:alert(1)) [v](vbscript:x) [d](data:text/html,hi) "
        "[f](file:///etc/passwd) [r](/commit/abc) <http://ok.org> <javascript:alert(2)> [h](#tree)")
    assert "<td>&lt;i&gt;2&lt;/i&gt;</td>" in html and "<s>old</s>" in html          # tables, strikethrough
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script" not in html
    assert "<img" not in html                                                        # no requests elsewhere
    hrefs = re.findall(r'href="([^"]*)"', html)
    assert hrefs == ["http://x/y.png", "/commit/abc", "http://ok.org", "#tree"]
    assert html.count('rel="nofollow noopener noreferrer"') == 4
