"""The hub's web page: what the agents found, at a glance, in a browser.

The hub server (hub/server.py) calls three functions of this module:

- `init_db(conn)` once at start: creates the `results` table (idempotent) and parses every post of the
  `results` channel that has no row yet (a hub from before this module, or one killed between the two);
- `on_post(conn, post)` in the transaction that stores each post: a `results` post is parsed once, here,
  into structured rows (hub/results.py); a line that does not parse is stored as `unparsed`, never dropped;
- `routes(state)`: the read-only pages, rendered on the server from the hub's own records. No JavaScript,
  no build step, no CDN (hubs run on air-gapped clusters), a strict Content-Security-Policy.

    GET /                       best result per platform, progress charts, agents, latest results,
                                the commit tree (lineage of each platform's best, the leaves), discussion
    GET /chart/<platform>.svg   the progress chart of one platform (matplotlib, like analysis.ipynb)
    GET /commit/<hash>          one commit: its record, parent, children, results, and `git show` (the diff
                                against its parent) from the hub's bare repository

Access: on a loopback address the pages are open, like the rest of the hub there. On any other address they
need the read token given at start: open `/?token=<read token>` once (the answer sets a cookie and
redirects to the same page without the token in the address), or send `Authorization: Bearer <read
token>`. A hub on another address without a read token does not mount the pages at all. No page ever shows
an API key or its hash.

A commit's value on a platform is the mean of its finished results there (hub.results.commit_values): the
page shows that mean and the number of results behind it, and a chart draws one point per commit.

Speed and isolation: the page and the charts are built on one worker thread of their own, commit pages (`git
show`) on GIT_WORKERS others, never on the thread pool the server's API shares: a request holds a thread of that
pool only for an indexed query or two, and waits for the build without a thread, at most WAIT_S, then gets the
page built before. So a slow build (thousands of runs, pathological markdown) cannot hold up the API. The page is rebuilt only when the records change (a new post or commit); a chart only when its
platform has new results, and at most every CHART_REDRAW_S seconds. Markdown is rendered for the first
MARKDOWN_MAX_CHARS characters of a post (the rest is shown as plain text), once per post. bench/hub_page.py
measures the page.
"""

import asyncio
import functools
import hashlib
import hmac
import html
import io
import logging
import math
import re
import sqlite3
import threading
import time
from base64 import b64encode
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

from markdown_it import MarkdownIt
from matplotlib import rc_context
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.textpath import TextToPath
from starlette.concurrency import run_in_threadpool
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from hub.results import KEY_CHARS, commit_values, parse_post
from hub.store import LEAVES_WHERE, HubError, commits_with_prefix, git

log = logging.getLogger("hub.dashboard")

# ---------------------------------------------------------------------------------------------------------
# Page constants

RESULTS_CHANNEL = "results"
DISCUSSION_CHANNEL = "discussion"
LATEST_RESULTS = 30        # rows in "latest results": what is being tried now
LATEST_POSTS = 20          # discussion posts shown
MARKDOWN_MAX_CHARS = 4000  # of a post, rendered as markdown; the rest is shown as plain text (markdown-it takes
                           # ~0.4 s for 16 KB of '[': a bound keeps a post's render to tens of ms)
POSTS_CACHED = 4 * LATEST_POSTS   # rendered posts kept (a post never changes)
LATEST_UNPARSED = 20       # unparsed result lines shown
LEAVES_SHOWN = 30          # newest leaves of the commit tree
LINEAGE_MAX = 5000         # commits walked back from a best commit (the graph is a tree, this bounds a cycle)
LINEAGE_SHOWN = 12         # of a long lineage the page lists the newest ones and the root; each commit page links on
DIFF_MAX_BYTES = 1 << 20   # a longer `git show` is not shown (train.py diffs are a few KB)
GIT_TIMEOUT_S = 10
GIT_WORKERS = 2            # `git show`s at once, for the commit pages (never on the server's thread pool)
WAIT_S = 20                # a request waits at most this long for a page or chart built from the newest records,
                           # then gets the one built before (the build goes on), or a note to reload
CHARTS_SHOWN = 12          # the page shows the charts of the platforms with most runs
CHARTS_CACHED = 32         # drawn charts kept in memory (each ~100 KB; any platform name can be posted)
PARSER_VERSION = 2         # raise when hub/results.py parses differently: init_db then parses every post again
CHART_REDRAW_S = 10        # a chart whose platform has new results is redrawn at most this often (a draw of
                           # 2,500 runs takes about a second of CPU; a busy hub gets several results a second)
LABELS_MAX = 16            # chart: the baseline and the records that gained most get a label (a swarm sets
                           # hundreds of records; more labels than this cannot be read)
LABEL_ANGLE = 30           # degrees, labels run up and to the right (as in analysis.ipynb)
LABEL_SIZE = 7             # points
LABEL_CHARS = 40           # longer labels end in an ellipsis
COOKIE = "hub_read"
COOKIE_MAX_AGE = 30 * 24 * 3600
TEXT_TO_PATH = TextToPath()
HASH = re.compile(r"^[0-9a-f]{4,40}$")
SAFE_URL = re.compile(r"^(?:https?://|mailto:|[^:/?#]*(?:[/?#]|$))", re.IGNORECASE)  # no javascript:, data:...

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 16px 32px;color:#1b1b1b;background:#fff}
header{display:flex;gap:16px;align-items:baseline;flex-wrap:wrap;border-bottom:1px solid #ddd;margin-bottom:8px}
h1{font-size:20px;margin:8px 0}h2{font-size:16px;margin:18px 0 6px}h3{font-size:14px;margin:10px 0 4px}
.muted{color:#666}.num{text-align:right;font-variant-numeric:tabular-nums}
table{border-collapse:collapse;margin:4px 0}th,td{padding:2px 8px;border-bottom:1px solid #eee;text-align:left;
vertical-align:top}th{background:#f6f6f6}td.desc{max-width:42em;overflow-wrap:anywhere}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:8px}
figure{margin:0}figure img{width:100%;height:auto;border:1px solid #eee}figcaption{font-size:12px;color:#666}
.keep{color:#145a24}.discard{color:#777}.crash{color:#a11}.unparsed{color:#a60}
.post{border-left:3px solid #ddd;padding:0 10px;margin:8px 0}.post pre{overflow-x:auto;background:#f6f6f6}
pre.diff{background:#fafafa;border:1px solid #eee;padding:8px;overflow-x:auto;font-size:12px}
.add{color:#145a24}.del{color:#a11}.hunk{color:#55a}code{font-size:12px}a{color:#1a4f9c}
ol.lineage{margin:4px 0;padding-left:24px}
"""
# The one inline <style> block is allowed by its hash; nothing else inline (no script at all).
CSP = ("default-src 'none'; img-src 'self'; "
       f"style-src 'sha256-{b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()}'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SVG_CSP = "default-src 'none'; style-src 'unsafe-inline'"  # matplotlib's SVG carries a <style> element
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}

# ---------------------------------------------------------------------------------------------------------
# Storage: parsed result rows, next to the server's tables


def init_db(conn):
    """Create the `results` table and its indexes (idempotent), then parse every `results` post with no row.

    conn: the server's sqlite3 connection, at start, before it serves requests. Rows parsed by an older
    hub/results.py (PARSER_VERSION) are parsed again: they are derived from the posts, which are never changed.
    The backfill runs in one savepoint, so a hub killed during it starts over cleanly. Returns the number of
    posts parsed.
    """
    conn.execute("""CREATE TABLE IF NOT EXISTS results(
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        post_id INTEGER NOT NULL, line_no INTEGER NOT NULL,
        agent_id TEXT NOT NULL, created_at REAL NOT NULL,
        status TEXT NOT NULL,            -- keep, discard, crash, unparsed (hub/results.py)
        commit_hash TEXT, platform TEXT, val_bpb REAL, vram_gb REAL,
        description TEXT NOT NULL, raw TEXT NOT NULL,
        UNIQUE(post_id, line_no))""")
    conn.execute("CREATE TABLE IF NOT EXISTS results_parser(version INTEGER NOT NULL)")
    # covering indexes for the page's queries: each reads an index, never the table (10,000 rows: a few ms)
    for name, columns in [("platform", "platform, id"), ("status", "status, id"),
                          ("agent", "agent_id, status, platform, val_bpb"),
                          ("commit", "commit_hash, status, platform, val_bpb")]:
        conn.execute(f"CREATE INDEX IF NOT EXISTS results_by_{name} ON results({columns})")
    conn.execute("DROP INDEX IF EXISTS results_by_kept")   # used by the page before means per commit
    conn.execute("SAVEPOINT dashboard_backfill")
    try:
        if conn.execute("SELECT version FROM results_parser").fetchone() != (PARSER_VERSION,):
            conn.execute("DELETE FROM results")
            conn.execute("DELETE FROM results_parser")
            conn.execute("INSERT INTO results_parser(version) VALUES (?)", (PARSER_VERSION,))
        # the content as bytes: a post that is not valid UTF-8 (written by another program) is still parsed
        todo = conn.execute("""SELECT id, channel, agent_id, CAST(content AS BLOB), created_at FROM posts p
                               WHERE channel = ? AND NOT EXISTS (SELECT 1 FROM results r WHERE r.post_id = p.id)
                               ORDER BY id""", (RESULTS_CHANNEL,)).fetchall()
        for pid, channel, agent, content, created in todo:
            on_post(conn, dict(id=pid, channel=channel, agent_id=agent, content=_text(content), created_at=created))
        conn.execute("RELEASE dashboard_backfill")
    except BaseException:
        conn.execute("ROLLBACK TO dashboard_backfill")
        conn.execute("RELEASE dashboard_backfill")
        raise
    conn.commit()
    if todo:
        log.info("dashboard: parsed %d earlier posts of #%s", len(todo), RESULTS_CHANNEL)
    return len(todo)


def on_post(conn, post):
    """Store the parsed rows of a post of the `results` channel; other channels are ignored.

    post: dict with id, channel, agent_id, content, created_at (as stored). Called by the server inside the
    transaction that inserts the post, so the post and its rows are committed together. Parsing never
    raises; a line that does not parse is stored with status 'unparsed' and its raw text.
    """
    if post["channel"] != RESULTS_CHANNEL:
        return
    rows = parse_post(post["content"])
    conn.executemany(
        """INSERT OR IGNORE INTO results(post_id, line_no, agent_id, created_at, status, commit_hash, platform,
                                          val_bpb, vram_gb, description, raw)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
        [(post["id"], i, post["agent_id"], post["created_at"], r["status"], r["commit"], r["platform"],
          r["val_bpb"], r["vram_gb"], r["description"], r["raw"]) for i, r in enumerate(rows)])


# ---------------------------------------------------------------------------------------------------------
# Reading the records


def _text(data):
    """Text from SQLite bytes: invalid UTF-8 (a lone surrogate written by another program) becomes U+FFFD."""
    return data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data


def _connect(db_path):
    conn = sqlite3.connect(db_path, timeout=10, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA query_only = 1")
    return conn


def records_version(conn):
    """What the page depends on: (last post id, commit count). Any new post or pushed commit changes it."""
    (last_post,) = conn.execute("SELECT COALESCE(MAX(id), 0) FROM posts").fetchone()
    (n_commits,) = conn.execute("SELECT COUNT(*) FROM commits").fetchone()
    return last_post, n_commits


def platform_version(conn, platform):
    """What a platform's chart depends on: the id of its last result row, or None when it has none."""
    return conn.execute("SELECT MAX(id) FROM results WHERE platform = ?", (platform,)).fetchone()[0]


def platform_runs(conn, platform=None):
    """{platform: summary} of every parsed result row (not unparsed) of `platform` (or of all platforms).

    A commit is one point per platform: its value is the mean of its finished results there (keep or
    discard, hub.results.commit_values), its status that of its latest finished result (a confirmation run
    can turn a keep into a discard), its x the experiment number of its first result (crashes count as
    experiments: they are counted, not drawn), its agent and description those of its first result. Then
    analysis.ipynb's semantics per platform, on the points: the baseline is the first point, the kept line is
    the baseline then every kept point after it, with its running best; a kept point that lowers the running
    best is a record ("a kept improvement"); the best is the last record.

    Each summary: points (dicts: id of the first row, x, key, commit, agent, description, status, val_bpb = the
    mean, n, sd; kept ones also record, gain, running_best), kept, baseline, best (points or None), n_runs
    (rows), n_kept (points), n_crash, version (last row id).
    """
    runs = {}
    where, args = ("platform = ?", (platform,)) if platform is not None else ("platform IS NOT NULL", ())
    for rid, agent, commit, plat, val, status, desc in conn.execute(
            f"""SELECT id, agent_id, commit_hash, platform, val_bpb, status, description FROM results
                WHERE {where} AND status != 'unparsed' ORDER BY platform, id""", args):
        s = runs.get(plat) or runs.setdefault(plat, dict(points={}, finished=[], n_runs=0, n_crash=0))
        x, s["n_runs"], s["version"] = s["n_runs"], s["n_runs"] + 1, rid
        if status == "crash":
            s["n_crash"] += 1
            continue
        key = commit[:KEY_CHARS]
        point = s["points"].get(key)
        if point is None:
            point = s["points"][key] = dict(id=rid, x=x, key=key, commit=commit, agent=agent, description=desc)
        point["status"] = status   # the latest decision about the commit
        s["finished"].append((commit, val))
    for s in runs.values():
        points = list(s["points"].values())   # in order of each commit's first finished result
        values = commit_values(s.pop("finished"))
        for point in points:
            v = values[point["key"]]
            point.update(val_bpb=v.mean, n=v.n, sd=v.sd)
        base = points[0] if points else None
        kept = [base] + [p for p in points[1:] if p["status"] == "keep"] if base else []
        best, running = None, math.inf
        for p in kept:
            p["record"] = p["val_bpb"] < running
            p["gain"] = running - p["val_bpb"] if p["record"] and running < math.inf else 0.0
            running = min(running, p["val_bpb"])
            p["running_best"] = running
            if p["record"]:
                best = p
        s.update(points=points, kept=kept, baseline=base, best=best, n_kept=len(kept))
    return runs


def commit_record(conn, full):
    row = conn.execute("SELECT hash, parent_hash, agent_id, message, created_at FROM commits WHERE hash = ?",
                       (full,)).fetchone()
    return dict(zip(("hash", "parent", "agent", "message", "created_at"), row)) if row else None


def lineage(conn, full):
    """The commits from `full` back to its root, newest first (at most LINEAGE_MAX), in one recursive query."""
    rows = conn.execute("""WITH RECURSIVE chain(hash, depth) AS (
                               SELECT ?, 0 UNION ALL
                               SELECT c.parent_hash, chain.depth + 1 FROM chain JOIN commits c ON c.hash = chain.hash
                               WHERE c.parent_hash IS NOT NULL AND chain.depth < ?)
                           SELECT c.hash, c.parent_hash, c.agent_id, c.message, c.created_at
                           FROM chain JOIN commits c ON c.hash = chain.hash ORDER BY chain.depth""",
                        (full, LINEAGE_MAX - 1)).fetchall()
    return [dict(zip(("hash", "parent", "agent", "message", "created_at"), r)) for r in rows]


def leaves(conn, limit=LEAVES_SHOWN):
    """The newest `limit` commits with no children (the tips of exploration) and the count of all."""
    query = "FROM commits c " + LEAVES_WHERE
    (total,) = conn.execute("SELECT COUNT(*) " + query).fetchone()
    rows = conn.execute(f"SELECT hash, parent_hash, agent_id, message, created_at {query} "
                        "ORDER BY created_at DESC, hash LIMIT ?", (limit,)).fetchall()
    return [dict(zip(("hash", "parent", "agent", "message", "created_at"), r)) for r in rows], total


# ---------------------------------------------------------------------------------------------------------
# The progress chart (the semantics of analysis.ipynb, per platform)


def _shorten(text, limit=LABEL_CHARS):
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _spread(anchors, widths, height):
    """Shifts (dx, dy), in points, that move slanted labels down-right until none overlaps a placed one.

    In a frame turned by LABEL_ANGLE (u along the text, v across it) a label covers [u, u + width] x
    [v, v + height]; each label moves to lower v just far enough to clear the labels already placed.
    """
    a = math.radians(LABEL_ANGLE)
    along, across = (math.cos(a), math.sin(a)), (-math.sin(a), math.cos(a))
    placed, shifts = [], []
    for (x, y), w in zip(anchors, widths):
        u, v0 = x * along[0] + y * along[1], x * across[0] + y * across[1]
        v = v0
        for _ in range(len(placed) + 1):  # each move goes below one placed label, so this ends
            clash = [pv for pu, pw, pv in placed if u < pu + pw and pu < u + w and v < pv + height and pv < v + height]
            if not clash:
                break
            v = min(clash) - height
        placed.append((u, w, v))
        shifts.append(((v - v0) * across[0], (v - v0) * across[1]))
    return shifts


def draw_chart(platform, s):
    """The progress chart of one platform as SVG bytes.

    s: platform_runs(...)[platform]. Like analysis.ipynb: one dot per commit at the mean of its results
    (discarded faint grey, kept green), the running best as a step line, kept improvements (commits that lowered
    the running best) labelled with description and agent: the baseline and the LABELS_MAX - 1 that gained
    most. Crashes are counted in the legend, not drawn. The y-axis spans the kept line, so a discarded commit far
    worse than the baseline falls off the top (the legend says how many).
    """
    kept, n_runs = s["kept"], s["n_runs"]
    fig = Figure(figsize=(10, 4.6), dpi=72)
    ax = fig.add_subplot()
    fig.subplots_adjust(left=0.08, right=0.985, bottom=0.11, top=0.92)
    ax.set_xlabel("Experiment # on this platform")
    ax.set_ylabel("val_bpb (lower is better)")
    ax.grid(True, alpha=0.25)
    if not kept:
        ax.set_title(f"{platform}: {n_runs} runs, none finished yet")
        ax.text(0.5, 0.5, "no finished run yet", transform=ax.transAxes, ha="center", parse_math=False)
    else:
        kept_ids = {id(r) for r in kept}
        others = [p for p in s["points"] if id(p) not in kept_ids]
        base, best = kept[0]["val_bpb"], s["best"]["val_bpb"]
        top = max(r["val_bpb"] for r in kept)
        span = top - best if top > best else max(0.002, 0.002 * top)
        x_end = n_runs - 1
        dots = ax.scatter([r["x"] for r in others], [r["val_bpb"] for r in others], s=10, color="0.55",
                          alpha=0.45, linewidths=0, zorder=2)
        ax.scatter([r["x"] for r in kept], [r["val_bpb"] for r in kept], s=26, color="#2e9e44",
                   edgecolors="#145a24", linewidths=0.6, label=f"Kept ({len(kept)})", zorder=4)
        ax.step([r["x"] for r in kept] + [x_end], [r["running_best"] for r in kept] + [kept[-1]["running_best"]],
                where="post", color="#145a24", linewidth=1.4, alpha=0.8, label="Running best", zorder=3)
        if s["n_crash"]:
            ax.plot([], [], " ", label=f"Crashed ({s['n_crash']}, not shown)")
        margin = 0.02 * max(n_runs, 10) + 0.5
        ax.set_xlim(-margin, x_end + margin + 0.15 * x_end)  # room at the right for the newest labels
        ax.set_ylim(best - 0.06 * span, top + 0.25 * span)
        ax.set_title(f"{platform}: {n_runs} runs, {len(kept)} kept; val_bpb {base:.6f} -> {best:.6f} "
                     f"({(base - best) / base:.2%} lower)", fontsize=11)
        top = sorted((r for r in kept[1:] if r["record"]), key=lambda r: -r["gain"])[:LABELS_MAX - 1]
        records = [kept[0]] + sorted(top, key=lambda r: r["x"])
        texts = ["baseline" if r is kept[0] else _shorten(f"{r['description']} ({r['agent']})") for r in records]
        # widths from the font's metrics (dpi-independent points; ismath=False: '$' is text, not mathtext)
        font = FontProperties(family="DejaVu Sans", size=LABEL_SIZE)
        widths = [1.05 * TEXT_TO_PATH.get_text_width_height_descent(t, font, ismath=False)[0] for t in texts]
        gap, a = 4, math.radians(LABEL_ANGLE)
        to_points = 72 / fig.dpi
        anchors = [(px * to_points + gap * math.cos(a), py * to_points + gap * math.sin(a)) for px, py in
                   ax.transData.transform([(r["x"], r["val_bpb"]) for r in records])] if records else []
        for r, text, (dx, dy) in zip(records, texts, _spread(anchors, widths, 1.25 * LABEL_SIZE)):
            leader = dict(arrowstyle="-", color="0.6", lw=0.5, shrinkA=0, shrinkB=3) if math.hypot(dx, dy) > 0.5 else None
            label = ax.annotate(text, (r["x"], r["val_bpb"]), xytext=(gap * math.cos(a) + dx, gap * math.sin(a) + dy),
                                textcoords="offset points", rotation=LABEL_ANGLE, rotation_mode="anchor",
                                ha="left", va="bottom", fontsize=LABEL_SIZE, color="#145a24", arrowprops=leader,
                                parse_math=False)  # a description is text, never mathtext ('$' is common)
            label.set_clip_on(True)
            label.set_clip_box(ax.bbox)
        n_off = sum(r["val_bpb"] > ax.get_ylim()[1] for r in others)
        dots.set_label(f"Discarded ({len(others)}" + (f", {n_off} above the axis)" if n_off else ")"))
        ax.legend(loc="lower left", fontsize=9, framealpha=0.9)
    buf = io.BytesIO()
    # text as <text> (small files, the browser's font), fixed ids so that equal charts give equal bytes
    with rc_context({"svg.fonttype": "none", "svg.hashsalt": "autoresearch-hub", "font.family": "DejaVu Sans"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------
# HTML


def esc(value):
    return html.escape("" if value is None else str(value), quote=True)


def _when(t):
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(t)) if t else ""


def _bpb(v):
    return f"{v:.6f}" if v is not None else "---"


def _markdown():
    """Markdown for agents' posts: CommonMark plus tables and strikethrough, raw HTML off (shown as text),
    images off (no requests to other hosts), links only to http(s), mailto or relative addresses (no
    javascript:, data:, ...)."""
    md = MarkdownIt("commonmark", {"html": False, "linkify": False}).enable(["table", "strikethrough"]).disable("image")
    md.validateLink = lambda url: bool(SAFE_URL.match(url))
    def link_open(renderer, tokens, idx, options, env):
        tokens[idx].attrSet("rel", "nofollow noopener noreferrer")
        return renderer.renderToken(tokens, idx, options, env)

    md.add_render_rule("link_open", link_open)
    return md


MARKDOWN = _markdown()


@functools.lru_cache(maxsize=POSTS_CACHED)
def render_post(content):
    """A post's HTML: its first MARKDOWN_MAX_CHARS characters as markdown (MARKDOWN), the rest, if any, as
    escaped plain text after a note. Bounded, so that no post can make a build of the page slow; cached, so
    that a post is rendered once, not at every change of the records."""
    head, rest = content[:MARKDOWN_MAX_CHARS], content[MARKDOWN_MAX_CHARS:]
    html_ = MARKDOWN.render(head)
    if rest:
        html_ += (f'<p class="muted">(markdown stops after {MARKDOWN_MAX_CHARS} characters; the other '
                  f'{len(rest)} as plain text:)</p><pre class="rest">{esc(rest)}</pre>')
    return html_


def commit_link(name, full, note=True):
    """A link to the commit page of `full`; `name` is the hash as written (a result's short hash). A commit
    the hub does not hold (full is None) is shown without a link, and with `note`, says so."""
    if not name:
        return ""
    text = f"<code>{esc(name[:7])}</code>"
    if full:
        return f'<a href="/commit/{esc(full)}">{text}</a>'
    return text + (' <span class="muted">(not on the hub)</span>' if note else "")


def page(title, body):
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style>'
            f"</head><body>{body}</body></html>")


def _value(p):
    """A point's value as HTML: the mean, and when it is the mean of several results, how many and their sd."""
    if p["n"] == 1:
        return _bpb(p["val_bpb"])
    return f'{_bpb(p["val_bpb"])} <span class="muted">(n={p["n"]}, sd {p["sd"]:.6f})</span>'


def render_index(conn, runs, version):
    """The dashboard's HTML (str). runs: platform_runs(conn); version: records_version(conn)."""
    (n_agents,) = conn.execute("SELECT COUNT(*) FROM agents").fetchone()
    (n_results,) = conn.execute("SELECT COUNT(*) FROM results").fetchone()
    n_commits = version[1]
    # short hashes named in results -> full hashes the hub holds (one indexed range query each, memoized)
    known = {}

    def resolve(short):
        if short and short not in known:
            hits = commits_with_prefix(conn, short)
            known[short] = hits[0] if len(hits) == 1 else None
        return known.get(short)

    order = sorted(runs, key=lambda p: (-runs[p]["n_runs"], p))
    out = [f'<header><h1>autoresearch hub</h1><span class="muted">{n_agents} agents · {n_results} results · '
           f'{len(runs)} platforms · {n_commits} commits · as of {_when(time.time())} UTC</span></header>']

    # best per platform, then the charts: above the fold
    out.append('<section id="best"><h2>Best per platform</h2>')
    if not order:
        out.append('<p class="muted">No results yet. Agents post one line per run to the '
                   f'<code>{RESULTS_CHANNEL}</code> channel.</p>')
    else:
        out.append('<p class="muted">A commit\'s value is the mean of its results on the platform (n: how many).</p>'
                   '<table class="leaderboard"><tr><th>platform</th><th class="num">best val_bpb</th>'
                   '<th class="num">n</th><th class="num">improvement</th><th>commit</th><th>agent</th>'
                   '<th>description</th><th class="num">baseline</th><th class="num">runs</th>'
                   '<th class="num">kept</th></tr>')
        for p in order:
            s = runs[p]
            b = s["best"]
            if b is None:
                out.append(f'<tr><td>{esc(p)}</td><td class="num">---</td><td></td><td></td><td></td><td></td>'
                           f'<td class="muted">no finished run yet</td><td></td><td class="num">{s["n_runs"]}</td>'
                           '<td class="num">0</td></tr>')
                continue
            base = s["baseline"]["val_bpb"]
            gain = base - b["val_bpb"]
            out.append(f'<tr class="platform"><td><b>{esc(p)}</b></td><td class="num best"><b>{_bpb(b["val_bpb"])}</b></td>'
                       f'<td class="num">{b["n"]}</td><td class="num">{gain:.6f} ({gain / base:.2%})</td>'
                       f'<td>{commit_link(b["commit"], resolve(b["commit"]))}</td>'
                       f'<td>{esc(b["agent"])}</td><td class="desc">{esc(b["description"])}</td>'
                       f'<td class="num">{_value(s["baseline"])}</td><td class="num">{s["n_runs"]}</td>'
                       f'<td class="num">{s["n_kept"]}</td></tr>')
        out.append("</table>")
    out.append("</section>")
    if order:
        out.append('<section id="charts"><div class="charts">')
        for p in order[:CHARTS_SHOWN]:
            out.append(f'<figure><img class="chart" src="/chart/{quote(p, safe="")}.svg?v={runs[p]["version"]}" '
                       f'width="720" height="331" alt="progress of val_bpb on {esc(p)}">'
                       f'<figcaption>{esc(p)}: one dot per commit at the mean of its runs (kept green, discarded '
                       'grey), the running best as a step line, each kept improvement labelled.</figcaption></figure>')
        out.append("</div>")
        if len(order) > CHARTS_SHOWN:
            out.append(f'<p class="muted">The charts of {len(order) - CHARTS_SHOWN} platforms with fewer runs: '
                       + ", ".join(f'<a href="/chart/{quote(p, safe="")}.svg">{esc(p)}</a>'
                                   for p in order[CHARTS_SHOWN:]) + "</p>")
        out.append("</section>")

    # agents: runs per status (one scan of the covering index results_by_agent); best kept commit per platform
    counts, best_of = {}, {}
    for agent, status, n in conn.execute(
            "SELECT agent_id, status, COUNT(*) FROM results GROUP BY agent_id, status ORDER BY agent_id, status"):
        counts.setdefault(agent, {})[status] = n
    for p in sorted(runs):
        mine = {}
        for k in runs[p]["kept"]:
            if k["val_bpb"] < mine.get(k["agent"], math.inf):
                mine[k["agent"]] = k["val_bpb"]
        for agent, val in mine.items():
            best_of.setdefault(agent, []).append(f"{_bpb(val)} ({p})")
    out.append('<section id="agents"><h2>Agents</h2><table><tr><th>agent</th><th class="num">runs</th>'
               '<th class="num">keeps</th><th class="num">discards</th><th class="num">crashes</th>'
               '<th class="num">unparsed</th><th>best kept commit</th></tr>')
    for agent in sorted(counts, key=lambda a: (-sum(counts[a].values()), a)):
        c = counts[agent]
        out.append(f'<tr><td>{esc(agent)}</td><td class="num">{sum(c.values())}</td>'
                   + "".join(f'<td class="num {k}">{c.get(k, 0)}</td>' for k in ("keep", "discard", "crash", "unparsed"))
                   + f'<td>{esc(", ".join(best_of.get(agent, [])))}</td></tr>')
    out.append("</table></section>")

    # latest results: what is being tried now (each run as posted)
    out.append(f'<section id="latest"><h2>Latest results</h2><table><tr><th>posted (UTC)</th><th>agent</th>'
               '<th>platform</th><th>commit</th><th class="num">val_bpb</th><th class="num">vram_gb</th>'
               '<th>status</th><th>description</th></tr>')
    for agent, created, status, commit, platform, val, vram, desc, raw in conn.execute(
            """SELECT agent_id, created_at, status, commit_hash, platform, val_bpb, vram_gb, description, raw
               FROM results ORDER BY id DESC LIMIT ?""", (LATEST_RESULTS,)):
        text = desc if status != "unparsed" else raw
        out.append(f'<tr><td>{_when(created)}</td><td>{esc(agent)}</td><td>{esc(platform)}</td>'
                   f'<td>{commit_link(commit, resolve(commit), note=status == "keep")}</td>'
                   f'<td class="num">{_bpb(val)}</td><td class="num">{"" if vram is None else f"{vram:.1f}"}</td>'
                   f'<td class="{status}">{status}</td><td class="desc">{esc(text)}</td></tr>')
    out.append("</table></section>")

    # the commit tree
    out.append('<section id="tree"><h2>Commit tree</h2>')
    values = {}   # a commit's short key -> its value on each platform
    for p in sorted(runs):
        for point in runs[p]["points"]:
            values.setdefault(point["key"], []).append((p, point))

    def results_of(full):
        return ", ".join(f"{_value(point)} ({esc(p)})" for p, point in values.get(full[:KEY_CHARS], []))

    for p in order:
        b = runs[p]["best"]
        if b is None:
            continue
        full = resolve(b["commit"])
        out.append(f"<h3>Lineage of the best on {esc(p)} ({_bpb(b['val_bpb'])}), newest first</h3>")
        if not full:
            out.append(f'<p class="muted">Commit <code>{esc(b["commit"])}</code> is not on the hub (never pushed).</p>')
            continue
        chain = lineage(conn, full)
        out.append('<ol class="lineage">')
        for i, c in enumerate(chain):
            if LINEAGE_SHOWN <= i < len(chain) - 1:
                if i == LINEAGE_SHOWN:
                    out.append(f'<li class="muted">… {len(chain) - 1 - LINEAGE_SHOWN} commits between (follow the '
                               'parent links on the commit pages) …</li>')
                continue
            out.append(f'<li>{commit_link(c["hash"], c["hash"])} {esc(c["message"])} <span class="muted">by {esc(c["agent"])}, '
                       f'{_when(c["created_at"])}</span> {results_of(c["hash"])}{"" if c["parent"] else " <i>(root)</i>"}</li>')
        out.append("</ol>")
    tips, n_tips = leaves(conn)
    out.append(f'<h3>Leaves: {n_tips} commits with no children{f", the newest {len(tips)}" if n_tips > len(tips) else ""}</h3>')
    if tips:
        out.append('<table><tr><th>commit</th><th>agent</th><th>message</th><th>pushed (UTC)</th><th>val_bpb</th>'
                   '<th>parent</th></tr>')
        for c in tips:
            out.append(f'<tr><td>{commit_link(c["hash"], c["hash"])}</td><td>{esc(c["agent"])}</td><td class="desc">{esc(c["message"])}</td>'
                       f'<td>{_when(c["created_at"])}</td><td>{results_of(c["hash"])}</td>'
                       f'<td>{commit_link(c["parent"], c["parent"]) if c["parent"] else "<i>root</i>"}</td></tr>')
        out.append("</table>")
    else:
        out.append('<p class="muted">No commits pushed yet.</p>')
    out.append("</section>")

    # discussion
    out.append(f'<section id="discussion"><h2>Discussion (latest {LATEST_POSTS})</h2>')
    # the content as bytes: SQLite gives back what was stored, and text that is not UTF-8 would be a 500
    posts = conn.execute("""SELECT id, agent_id, CAST(content AS BLOB), created_at FROM posts WHERE channel = ?
                            ORDER BY id DESC LIMIT ?""", (DISCUSSION_CHANNEL, LATEST_POSTS)).fetchall()
    for pid, agent, content, created in posts:
        out.append(f'<article class="post" id="post-{pid}"><div class="muted">{esc(agent)} · {_when(created)} UTC</div>'
                   f"{render_post(_text(content))}</article>")
    if not posts:
        out.append(f'<p class="muted">No posts in <code>{DISCUSSION_CHANNEL}</code> yet.</p>')
    out.append("</section>")

    # lines that did not parse: shown, so that the agent's mistake is visible
    unparsed = conn.execute("""SELECT agent_id, created_at, raw FROM results WHERE status = 'unparsed'
                               ORDER BY id DESC LIMIT ?""", (LATEST_UNPARSED,)).fetchall()
    if unparsed:
        out.append('<section id="unparsed"><h2>Result lines that did not parse (latest)</h2><table>'
                   '<tr><th>posted (UTC)</th><th>agent</th><th>line</th></tr>')
        for agent, created, raw in unparsed:
            out.append(f'<tr><td>{_when(created)}</td><td>{esc(agent)}</td><td class="desc"><code>{esc(raw)}</code></td></tr>')
        out.append("</table></section>")
    return page("autoresearch hub", "".join(out))


@functools.lru_cache(maxsize=64)
def git_show(repo_path, full):
    """`git show` of a commit as text, through hub.store.git: killed after GIT_TIMEOUT_S or once its output
    passes DIFF_MAX_BYTES, its heap capped, and dying with the hub. A commit never changes, so neither does its
    diff: cached. Raises RuntimeError with the reason when git fails or passes a bound (not cached)."""
    try:
        out = git(str(repo_path), "show", "--no-color", "--no-ext-diff", "--no-textconv",
                  "--stat", "--patch", "--format=fuller", full, "--", timeout=GIT_TIMEOUT_S, max_output=DIFF_MAX_BYTES)
    except HubError as e:
        raise RuntimeError(e.message) from None
    return out.decode("utf-8", errors="replace")


def render_commit(conn, diff, full):
    """The HTML of one commit's page: its record, parent, children, results (each, and their mean per
    platform), and `diff` (the text of git_show, or why it failed), escaped."""
    c = commit_record(conn, full)
    children = conn.execute("SELECT hash, agent_id, message FROM commits WHERE parent_hash = ? ORDER BY created_at",
                            (full,)).fetchall()
    results = conn.execute("""SELECT agent_id, platform, val_bpb, status, description FROM results
                              WHERE commit_hash IN (?, ?, ?) ORDER BY id""", (full[:7], full[:8], full)).fetchall()
    lines = []
    for line in diff.splitlines():
        cls = ("add" if line.startswith("+") and not line.startswith("+++") else
               "del" if line.startswith("-") and not line.startswith("---") else
               "hunk" if line.startswith("@@") else "")
        lines.append(f'<span class="{cls}">{esc(line)}</span>' if cls else esc(line))
    out = [f'<p><a href="/">&larr; hub</a></p><h1>commit <code>{esc(full)}</code></h1>',
           f'<p>{esc(c["message"])}<br><span class="muted">by {esc(c["agent"])}, pushed {_when(c["created_at"])} UTC</span></p>',
           f'<p>parent: {commit_link(c["parent"], c["parent"]) if c["parent"] else "<i>none (a root)</i>"}</p>']
    if children:
        out.append("<p>children: " + ", ".join(f'{commit_link(h, h)} {esc(m)} <span class="muted">({esc(a)})</span>'
                                               for h, a, m in children) + "</p>")
    if results:
        means = []
        for p in sorted({p for _, p, _, _, _ in results if p}):
            v = commit_values((full, val) for _, q, val, _, _ in results if q == p).get(full[:KEY_CHARS])
            if v is not None:   # None: only crashes on p
                means.append(f'{esc(p)}: <b>{_bpb(v.mean)}</b> <span class="muted">(mean of {v.n}, sd {v.sd:.6f})</span>')
        if means:
            out.append(f'<p class="values">value: {"; ".join(means)}</p>')
        out.append("<table><tr><th>agent</th><th>platform</th><th>val_bpb</th><th>status</th><th>description</th></tr>")
        out.extend(f'<tr><td>{esc(a)}</td><td>{esc(p)}</td><td class="num">{_bpb(v)}</td><td class="{s}">{s}</td>'
                   f'<td class="desc">{esc(d)}</td></tr>' for a, p, v, s, d in results)
        out.append("</table>")
    out.append(f'<h2>Diff against its parent</h2><pre class="diff">{chr(10).join(lines)}</pre>')
    return page(f"commit {full[:7]}", "".join(out))


# ---------------------------------------------------------------------------------------------------------
# Routes, access control, caches


def _field(state, name, default=None):
    return state.get(name, default) if isinstance(state, dict) else getattr(state, name, default)


def _cookie_value(token):
    # the cookie holds a MAC of the token, not the token: a leaked cookie does not reveal it
    return hmac.new(token.encode(), b"autoresearch hub dashboard", hashlib.sha256).hexdigest()


def _placeholder_svg(text):
    """A small SVG saying `text` (escaped): what a chart request gets while there is no drawing to give."""
    return ('<?xml version="1.0" encoding="utf-8"?><svg xmlns="http://www.w3.org/2000/svg" width="720" height="331">'
            f'<text x="360" y="165" text-anchor="middle" font-family="sans-serif" font-size="14">{esc(text)}</text>'
            "</svg>").encode()


def routes(state):
    """The dashboard's routes for the hub's Starlette app, or [] when they must not be mounted.

    state: an object (or dict) with db_path, repo_path, read_token (str or None) and loopback (bool: the hub
    listens on a loopback address only). Not on loopback and no read token: nothing is mounted, and a
    warning says so. Not on loopback with a read token: every page needs it (see the module docstring).

    The endpoints are coroutines: a request holds a thread of the server's pool only for one or two indexed
    queries; the page and the charts are built on `builder`, `git show` runs on `gitter`, and the request
    waits for them without a thread (module docstring).
    """
    db_path, repo_path = _field(state, "db_path"), _field(state, "repo_path")
    read_token, loopback = _field(state, "read_token"), bool(_field(state, "loopback", False))
    if not loopback and not read_token:
        log.warning("dashboard: not mounted: the hub listens on a non-loopback address and has no read token "
                    "(give it a read token: AGENTHUB_READ_TOKEN or --read-token-file, then open /?token=T)")
        return []
    need_token = not loopback
    cookie = _cookie_value(read_token) if need_token else None
    builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-page")
    gitter = ThreadPoolExecutor(max_workers=GIT_WORKERS, thread_name_prefix="hub-git")
    built = OrderedDict()   # "index" or ("chart", platform) -> (version, body, time.monotonic() when built)
    jobs = {}               # the same keys -> the Future of the build queued or running for it
    summaries = {}          # platform -> its platform_runs summary (builder thread only; kept while its rows last)
    local = threading.local()

    def reader():
        """This thread's read connection (opened once: every request checks the records version)."""
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = _connect(db_path)
        return conn

    def allowed(request):
        header = request.headers.get("authorization", "")
        if header[:7].lower() == "bearer " and hmac.compare_digest(header[7:].strip().encode(), read_token.encode()):
            return True
        return hmac.compare_digest(request.cookies.get(COOKIE, "").encode(), cookie.encode())

    def guarded(handler):
        async def endpoint(request):
            if need_token:
                given = request.query_params.get("token")
                if given is not None:
                    if not hmac.compare_digest(given.encode(errors="replace"), read_token.encode()):
                        return PlainTextResponse("wrong read token\n", status_code=401, headers=HEADERS)
                    # set the cookie, then drop the token from the address (history, logs, Referer)
                    response = RedirectResponse(request.url.path, status_code=303, headers=HEADERS)
                    response.set_cookie(COOKIE, cookie, max_age=COOKIE_MAX_AGE, httponly=True, samesite="lax")
                    return response
                if not allowed(request):
                    return PlainTextResponse("this page needs the hub's read token: open /?token=<read token> once, "
                                             "or send Authorization: Bearer <read token>\n", status_code=401,
                                             headers=HEADERS)
            return await handler(request)
        return endpoint

    # --- builds, on the builder thread only

    def store(key, version, body):
        built[key] = (version, body, time.monotonic())
        built.move_to_end(key)
        charts = [k for k in built if k != "index"]
        for k in charts[:max(0, len(charts) - CHARTS_CACHED)]:   # the least recently drawn go first
            del built[k]

    def current_runs(conn, platforms=None):
        """platform_runs(conn) (or of `platforms`), computed again only for the platforms with new rows since: a
        new result changes one platform, a post in another channel or a push none."""
        latest = dict(conn.execute("SELECT platform, MAX(id) FROM results WHERE platform IS NOT NULL GROUP BY platform"))
        for p in set(summaries) - set(latest):   # only after a re-parse
            del summaries[p]
        for p in latest if platforms is None else set(platforms) & set(latest):
            if p not in summaries or summaries[p]["version"] != latest[p]:
                summaries[p] = platform_runs(conn, p)[p]
        return {p: summaries[p] for p in (latest if platforms is None else platforms) if p in summaries}

    def build_index():
        conn = reader()
        version = records_version(conn)
        try:
            body = render_index(conn, current_runs(conn), version).encode(errors="replace")
        except Exception:   # a bug: said once per version in the log; the page built before stays
            log.exception("dashboard: the page could not be built")
            old = built.get("index")
            body = old[1] if old else page("autoresearch hub", "<p>The page could not be built; the hub's log "
                                                               "says why.</p>").encode()
        store("index", version, body)

    def build_chart(platform):
        conn = reader()
        s = current_runs(conn, [platform]).get(platform)
        if s is None:
            return
        try:
            svg = draw_chart(platform, s)
        except Exception:
            log.exception("dashboard: the chart of %r could not be drawn", platform)
            svg = _placeholder_svg("This chart could not be drawn; the hub's log says why.")
        store(("chart", platform), s["version"], svg)

    def commit_page(full):   # on a `gitter` thread
        try:
            diff = git_show(str(repo_path), full)
        except RuntimeError as e:
            diff = f"git show failed: {e}"
        return render_commit(reader(), diff, full).encode(errors="replace")

    # --- requests

    def said(job):   # a build that failed outside its own handling (the database, say): in the log, once
        if not job.cancelled() and job.exception() is not None:
            log.error("dashboard: a build failed: %r", job.exception())

    async def newest(key, fresh, build):
        """The entry of `key` in `built` once fresh(entry) holds, building it on `builder` unless a build for it is
        queued or running; after WAIT_S, whatever was built before (None if nothing was)."""
        deadline = time.monotonic() + WAIT_S
        for _ in range(2):   # a build already running may predate this request's records: then one more
            entry = built.get(key)
            if entry is not None and fresh(entry):
                return entry
            job = jobs.get(key)
            if job is None or job.done():
                job = jobs[key] = builder.submit(build)
                job.add_done_callback(said)
            await asyncio.wait([asyncio.wrap_future(job)], timeout=max(0, deadline - time.monotonic()))
            if not job.done():
                break
        return built.get(key)

    async def index(request):
        version = await run_in_threadpool(lambda: records_version(reader()))
        entry = await newest("index", lambda e: e[0] >= version, build_index)
        if entry is None:
            return Response(page("autoresearch hub", "<p>The page is being built; reload in a moment.</p>"),
                            media_type="text/html; charset=utf-8", headers=dict(HEADERS, Refresh="5"))
        return Response(entry[1], media_type="text/html; charset=utf-8", headers=HEADERS)

    async def chart(request):
        platform = request.path_params["platform"]
        latest = await run_in_threadpool(lambda: platform_version(reader(), platform))
        if latest is None:
            return PlainTextResponse("no such platform\n", status_code=404, headers=HEADERS)
        # redrawn when its platform has new results, at most every CHART_REDRAW_S (a request in between gets
        # the previous drawing)
        entry = await newest(("chart", platform),
                             lambda e: e[0] >= latest or time.monotonic() - e[2] < CHART_REDRAW_S,
                             lambda: build_chart(platform))
        version, svg, _ = entry or (0, _placeholder_svg("This chart is being drawn; reload in a moment."), 0)
        etag = f'"{hashlib.sha256(platform.encode()).hexdigest()[:16]}-{version}"'
        headers = dict(HEADERS, **{"Content-Security-Policy": SVG_CSP, "ETag": etag})
        if entry and request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(svg, media_type="image/svg+xml", headers=headers)

    async def commit(request):
        prefix = request.path_params["hash"].lower()
        if not HASH.match(prefix):
            return PlainTextResponse("a commit hash is 4 to 40 hex digits\n", status_code=400, headers=HEADERS)
        hits = await run_in_threadpool(lambda: commits_with_prefix(reader(), prefix))
        if len(hits) != 1:
            return PlainTextResponse("no such commit on the hub\n" if not hits else "ambiguous hash prefix\n",
                                     status_code=404, headers=HEADERS)
        if hits[0] != prefix:
            return RedirectResponse(f"/commit/{hits[0]}", status_code=303, headers=HEADERS)
        job = gitter.submit(commit_page, hits[0])
        await asyncio.wait([asyncio.wrap_future(job)], timeout=GIT_TIMEOUT_S + WAIT_S)
        if not job.done():
            job.cancel()   # still queued behind other commit pages: dropped
            return PlainTextResponse("the hub is busy; reload in a moment\n", status_code=429, headers=HEADERS)
        return Response(job.result(), media_type="text/html; charset=utf-8", headers=HEADERS)

    return [Route("/", guarded(index), methods=["GET", "HEAD"]),
            Route("/chart/{platform}.svg", guarded(chart), methods=["GET", "HEAD"]),
            Route("/commit/{hash}", guarded(commit), methods=["GET", "HEAD"])]
