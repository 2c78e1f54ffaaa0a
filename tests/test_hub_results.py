"""The result-line parser (hub/results.py) and what the dashboard computes from its rows (hub/dashboard.py).

Lines are written the way agents write them (program_agenthub.md; the protocol is in hub/server.py); the expected values are read off by hand.
"""

import os
import re
import sqlite3

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hub import dashboard
from hub.results import VAL_BPB_MAX, Value, commit_values, parse_line, parse_post

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


@pytest.mark.parametrize("value, status", [
    ("1.7e308", "unparsed"), ("100.000001", "unparsed"), ("1e3", "unparsed"),   # out of range: a typo or an attack
    ("100", "keep"), ("99.9", "keep"), ("5e-324", "keep"), ("0.000001", "keep"),
])
def test_val_bpb_outside_a_sane_range_is_unparsed(value, status):
    row = parse_line(f"commit:a1b2c3d platform:H100 val_bpb:{value} vram_gb:40 | x")
    assert row["status"] == status
    assert (row["val_bpb"] is None) == (status == "unparsed")
    assert parse_line("commit:a1b2c3d platform:H100 val_bpb:0.99 vram_gb:1e308 | vram")["status"] == "unparsed"


@pytest.mark.parametrize("platform, ok", [
    ("h100-80gb-hbm3", True), ("cpu-amd-epyc-2c", True), ("apple-m2-max", True), ("nvidia-a100-sxm4-40gb", True),
    ("cpu-amd-epyc-7b13-64c", True), ("rtx-4090.24gb", True), ("H100", True), ("M4-Max", True), ("4090", True),
    ("a" * 40, True), ("a" * 41, False), ("-h100", False), ("h100/80gb", False), ("h100%2f", False),
])
def test_platform_slugs_from_train_py(platform, ok):
    row = parse_line(f"commit:a1b2c3d platform:{platform} val_bpb:0.99 vram_gb:40 | x")
    assert (row["platform"] == platform and row["status"] == "keep") if ok else row["status"] == "unparsed"


@pytest.mark.parametrize("description, status", [
    ("lr 0.04 (DISCARD)", "discard"), ("( discard: worse than parent)", "discard"), ("x (discarded)", "discard"),
    # the markers need their parenthesis: words in a kept run's description are not markers
    ("discarded the old warmup, kept the new one", "keep"), ("DISCARD: no, this one stays", "keep"),
    ("undo the discard of wd", "keep"), ("crashed once at 8k, fine at 4k", "keep"), ("CRASH-proof loader", "keep"),
    ("(DISCARDING nothing)", "keep"), ("bigger (CRASH: OOM)", "crash"), ("(crashed: NaN)", "crash"),
])
def test_markers_need_their_parenthesis(description, status):
    assert parse_line(f"commit:a1b2c3d platform:H100 val_bpb:0.99 vram_gb:40 | {description}")["status"] == status


def test_a_lone_surrogate_is_replaced_not_stored():
    row = parse_line("commit:a1b2c3d platform:H100 val_bpb:0.99 vram_gb:40 | bad \ud800 text")
    assert row["status"] == "keep" and row["description"] == "bad \ufffd text"
    assert parse_line("\udfff")["raw"] == "\ufffd"
    row["raw"].encode()   # storable as UTF-8


def test_commit_values_by_hand():
    values = commit_values([("ABCDEF1", 1.0), ("1234567", None), ("abcdef12", 1.02), ("1234567", 0.9),
                            ("7654321", None)])
    assert list(values) == ["abcdef1", "1234567"]     # in order of first finished run; crashes have no value
    assert values["abcdef1"] == (pytest.approx(1.01), 2, pytest.approx(0.0141421356, rel=1e-6))
    assert values["1234567"] == Value(0.9, 1, 0.0)
    assert commit_values([]) == {}


# result lines as a careless or hostile agent writes them: any value text, any description
VALUES = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.just("---"),
                   st.sampled_from(["1.7e308", "1e999", "-0", "0", "100", "100.0000001", "5e-324", "nan", "0x1p3"]),
                   st.text(max_size=8))
LINES = st.one_of(
    st.builds(lambda c, p, v, g, d: f"commit:{c} platform:{p} val_bpb:{v} vram_gb:{g} | {d}",
              st.sampled_from(["a1b2c3d", "1111111", "a1b2c3d4", "ABCDEF0"]),
              st.sampled_from(["h100-80gb-hbm3", "H100", "cpu-amd-epyc-2c", "x" * 40]), VALUES, VALUES,
              st.text(max_size=60)),
    st.text(max_size=200))


@settings(max_examples=500, deadline=None)
@given(LINES)
def test_no_result_line_makes_a_row_the_page_cannot_hold(line):
    row = parse_line(line)
    assert row["status"] in ("keep", "discard", "crash", "unparsed")
    if row["val_bpb"] is not None:
        assert 0 < row["val_bpb"] <= VAL_BPB_MAX
    row["raw"].encode(), row["description"].encode()   # storable as UTF-8


@settings(max_examples=40, deadline=None)
@given(st.lists(LINES, min_size=1, max_size=8), st.text(max_size=300))
@example(["commit:a1b2c3d platform:H100 val_bpb:1.7e308 vram_gb:1 | kept, huge"], "")   # P7 of issue 20
@example(["commit:a1b2c3d platform:H100 val_bpb:5e-324 vram_gb:1 | kept, tiny"], "[" * 300)
def test_no_result_line_or_post_breaks_the_page_or_a_chart(lines, discussion):
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.executescript(SCHEMA)
    dashboard.init_db(conn)
    post(conn, "results", "a", "commit:2222222 platform:H100 val_bpb:1.0 vram_gb:1 | baseline")
    for line in lines:
        post(conn, "results", "b", line)
    post(conn, "discussion", "c", discussion.encode("utf-8", "replace").decode())   # what the hub can store
    runs = dashboard.platform_runs(conn)
    dashboard.render_index(conn, runs, dashboard.records_version(conn)).encode()
    for platform, s in runs.items():
        assert dashboard.draw_chart(platform, s).startswith(b"<?xml")
    conn.close()


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


def test_platform_runs_by_hand(db):
    lines = [  # (agent, line)
        ("ann", "commit:1111111 platform:H100 val_bpb:--- vram_gb:--- | first try (CRASH: import error)"),
        ("ann", "commit:2222222 platform:H100 val_bpb:1.000000 vram_gb:40 | baseline"),
        ("bob", "commit:3333333 platform:A100 val_bpb:1.100000 vram_gb:40 | baseline"),
        ("bob", "commit:4444444 platform:H100 val_bpb:0.990000 vram_gb:40 | lr up"),
        ("ann", "commit:5555555 platform:H100 val_bpb:1.020000 vram_gb:40 | gelu (DISCARD)"),
        ("ann", "commit:6666666 platform:H100 val_bpb:1.015000 vram_gb:40 | kept by ann, not a record"),
        ("bob", "commit:7777777 platform:H100 val_bpb:0.980000 vram_gb:40 | depth 10"),
        ("bob", "garbage"),
        # repeats: the baseline, the best (its longer hash is the same commit), and a confirmation that undoes a keep
        ("cat", "commit:2222222 platform:H100 val_bpb:1.020000 vram_gb:40 | baseline (rerun)"),
        ("cat", "commit:7777777aa platform:H100 val_bpb:0.990000 vram_gb:40 | depth 10 (rerun)"),
        ("cat", "commit:4444444 platform:H100 val_bpb:1.000000 vram_gb:40 | lr up, rerun: worse (DISCARD)"),
    ]
    for agent, line in lines:
        post(db, "results", agent, line)
    post(db, "discussion", "ann", "commit:8888888 platform:H100 val_bpb:0.1 vram_gb:1 | not in results: ignored")
    s = dashboard.platform_runs(db)
    assert sorted(s) == ["A100", "H100"]
    h = s["H100"]
    # one point per commit, at the mean of its runs, where its first run was (the crash counts as experiment 0);
    # its status is the latest decision
    assert [(p["key"], p["x"], p["n"], p["status"]) for p in h["points"]] == [
        ("2222222", 1, 2, "keep"), ("4444444", 2, 2, "discard"), ("5555555", 3, 1, "discard"),
        ("6666666", 4, 1, "keep"), ("7777777", 5, 2, "keep")]
    assert [p["val_bpb"] for p in h["points"]] == pytest.approx([1.01, 0.995, 1.02, 1.015, 0.985])
    assert h["points"][0]["sd"] == pytest.approx(0.02 / 2 ** 0.5) and h["points"][2]["sd"] == 0
    assert h["baseline"]["commit"] == "2222222"                        # first finished run, not the crash
    assert [p["commit"] for p in h["kept"]] == ["2222222", "6666666", "7777777"]
    assert [p["running_best"] for p in h["kept"]] == pytest.approx([1.01, 1.01, 0.985])
    assert [p["record"] for p in h["kept"]] == [True, False, True]
    assert h["best"]["commit"] == "7777777" and h["best"]["agent"] == "bob"
    assert h["n_crash"] == 1 and h["n_runs"] == 9 and h["n_kept"] == 3
    assert s["A100"]["best"]["val_bpb"] == 1.1 and s["A100"]["baseline"] is s["A100"]["best"]
    assert dashboard.platform_runs(db, "A100") == {"A100": s["A100"]}
    html = dashboard.render_index(db, s, dashboard.records_version(db))
    best_table = html[html.index('id="best"'):html.index('id="charts"')]
    row = best_table[best_table.index("<b>H100</b>"):]
    row = row[:row.index("</tr>")]
    assert '<b>0.985000</b></td><td class="num">2</td>' in row             # the mean, and how many runs
    assert "0.025000 (2.48%)" in row                                        # 1.01 -> 0.985: 2.48% lower
    assert "depth 10" in row and "bob" in row and "1.010000 <span" in row and "n=2, sd 0.014142" in row
    assert "1.100000" in best_table
    assert "0.1000" not in html                                          # a discussion post is not a result
    unparsed = html[html.index('id="unparsed"'):]
    assert "garbage" in unparsed
    agents = html[html.index('id="agents"'):html.index('id="latest"')]
    # ann: 1 crash, 2 keeps, 1 discard; bob: 3 keeps, 1 unparsed; cat: 2 keeps, 1 discard. Best kept commit:
    # ann's is the baseline (1.01; her 1.015 is worse), bob's depth 10 (0.985) and the A100 baseline
    assert ('<td>ann</td><td class="num">4</td><td class="num keep">2</td><td class="num discard">1</td>'
            '<td class="num crash">1</td><td class="num unparsed">0</td><td>1.010000 (H100)</td>') in agents
    assert ('<td>bob</td><td class="num">4</td><td class="num keep">3</td><td class="num discard">0</td>'
            '<td class="num crash">0</td><td class="num unparsed">1</td><td>1.100000 (A100), 0.985000 (H100)</td>'
            ) in agents
    assert '<td>cat</td><td class="num">3</td><td class="num keep">2</td><td class="num discard">1</td>' in agents
    svg = dashboard.draw_chart("H100", h).decode()                     # the chart: one dot per commit
    assert "1.010000 -&gt; 0.985000 (2.48% lower)" in svg and "Kept (3)" in svg and "Discarded (2" in svg


def test_platform_runs_on_a_swarm_match_the_simulation(tmp_path):
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    import hub_fill
    summary = hub_fill.fill(tmp_path, 600, n_agents=7, platforms=("H100", "A100", "CPU", "M4-Max"), seed=3,
                            extra_posts=[("results", "x", "commit:1234567 platform:TPU val_bpb:--- vram_gb:--- | (CRASH: x)")])
    conn = sqlite3.connect(tmp_path / "hub.sqlite3")
    dashboard.init_db(conn)
    runs = dashboard.platform_runs(conn)
    assert sorted(runs) == ["A100", "CPU", "H100", "M4-Max", "TPU"] and runs["TPU"]["best"] is None
    for platform, (val, short, agent, desc) in summary["best"].items():
        best = runs[platform]["best"]
        assert (best["commit"], best["agent"], best["description"]) == (short, agent, desc)
        assert best["val_bpb"] == pytest.approx(val, abs=1e-12)
        assert runs[platform]["baseline"]["val_bpb"] == pytest.approx(summary["baseline"][platform], abs=1e-12)
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
