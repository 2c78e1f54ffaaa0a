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

Speed: the page is cached and rebuilt only when the records change (a new post or commit), from a few
indexed queries; a chart is redrawn only when its platform has new results, and at most every CHART_REDRAW_S
seconds (a draw costs about a second with thousands of runs). bench/hub_page.py measures both.
"""

import functools
import hashlib
import hmac
import html
import io
import logging
import math
import re
import sqlite3
import subprocess
import threading
import time
from base64 import b64encode
from urllib.parse import quote

from markdown_it import MarkdownIt
from matplotlib import rc_context
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.textpath import TextToPath
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from hub.results import parse_post
from hub.store import LEAVES_WHERE, commits_with_prefix

log = logging.getLogger("hub.dashboard")

# ---------------------------------------------------------------------------------------------------------
# Page constants

RESULTS_CHANNEL = "results"
DISCUSSION_CHANNEL = "discussion"
LATEST_RESULTS = 30        # rows in "latest results": what is being tried now
LATEST_POSTS = 20          # discussion posts shown
LATEST_UNPARSED = 20       # unparsed result lines shown
LEAVES_SHOWN = 30          # newest leaves of the commit tree
LINEAGE_MAX = 5000         # commits walked back from a best commit (the graph is a tree, this bounds a cycle)
LINEAGE_SHOWN = 12         # of a long lineage the page lists the newest ones and the root; each commit page links on
DIFF_MAX_BYTES = 1 << 20   # a `git show` longer than this is cut (train.py diffs are a few KB)
GIT_TIMEOUT_S = 10
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

    conn: the server's sqlite3 connection, at start, before it serves requests. The backfill runs in one
    savepoint, so a hub killed during it starts over cleanly. Returns the number of posts parsed.
    """
    conn.execute("""CREATE TABLE IF NOT EXISTS results(
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        post_id INTEGER NOT NULL, line_no INTEGER NOT NULL,
        agent_id TEXT NOT NULL, created_at REAL NOT NULL,
        status TEXT NOT NULL,            -- keep, discard, crash, unparsed (hub/results.py)
        commit_hash TEXT, platform TEXT, val_bpb REAL, vram_gb REAL,
        description TEXT NOT NULL, raw TEXT NOT NULL,
        UNIQUE(post_id, line_no))""")
    # covering indexes for the page's queries: each reads an index, never the table (10,000 rows: a few ms)
    for name, columns in [("platform", "platform, id"), ("status", "status, id"),
                          ("kept", "platform, status, val_bpb"), ("agent", "agent_id, status, platform, val_bpb"),
                          ("commit", "commit_hash, status, platform, val_bpb")]:
        conn.execute(f"CREATE INDEX IF NOT EXISTS results_by_{name} ON results({columns})")
    conn.execute("SAVEPOINT dashboard_backfill")
    try:
        todo = conn.execute("""SELECT id, channel, agent_id, content, created_at FROM posts p
                               WHERE channel = ? AND NOT EXISTS (SELECT 1 FROM results r WHERE r.post_id = p.id)
                               ORDER BY id""", (RESULTS_CHANNEL,)).fetchall()
        for row in todo:
            on_post(conn, dict(zip(("id", "channel", "agent_id", "content", "created_at"), row)))
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


def _connect(db_path):
    conn = sqlite3.connect(db_path, timeout=10, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA query_only = 1")
    return conn


def records_version(conn):
    """What the page depends on: (last post id, commit count). Any new post or pushed commit changes it."""
    (last_post,) = conn.execute("SELECT COALESCE(MAX(id), 0) FROM posts").fetchone()
    (n_commits,) = conn.execute("SELECT COUNT(*) FROM commits").fetchone()
    return last_post, n_commits


def platform_runs(conn, platform=None):
    """{platform: summary} with every parsed result row (not unparsed) of `platform` (or of all), in posting
    order: the data of a chart. analysis.ipynb's semantics per platform: the baseline is the first finished
    run, the kept line is the baseline then every kept run after it, with its running best; a kept run that
    lowers the running best is a record ("a kept improvement"); the best is the first run at the minimum.
    Each summary: rows, finished, kept, baseline, best, n_runs, n_kept, n_crash, version (last row id)."""
    runs = {}
    where, args = ("platform = ?", (platform,)) if platform is not None else ("1", ())
    for rid, agent, commit, plat, val, status, desc in conn.execute(
            f"""SELECT id, agent_id, commit_hash, platform, val_bpb, status, description FROM results
                WHERE {where} AND status != 'unparsed' ORDER BY platform, id""", args):
        runs.setdefault(plat, []).append(
            dict(id=rid, agent=agent, commit=commit, val_bpb=val, status=status, description=desc))
    summary = {}
    for plat, rows in runs.items():
        for x, r in enumerate(rows):
            r["x"] = x  # experiment number on this platform, crashes included (they are counted, not drawn)
        finished = [r for r in rows if r["status"] != "crash" and r["val_bpb"] and r["val_bpb"] > 0]
        base = finished[0] if finished else None
        kept = [base] + [r for r in finished if r["status"] == "keep" and r["id"] > base["id"]] if base else []
        best, running = None, math.inf
        for r in kept:
            r["record"] = r["val_bpb"] < running
            r["gain"] = running - r["val_bpb"] if r["record"] and running < math.inf else 0.0
            running = min(running, r["val_bpb"])
            r["running_best"] = running
            if r["record"]:
                best = r
        summary[plat] = dict(rows=rows, finished=finished, baseline=base, kept=kept, best=best, n_runs=len(rows),
                             n_kept=len(kept), n_crash=sum(r["status"] == "crash" for r in rows),
                             version=rows[-1]["id"])
    return summary


def platform_summary(conn):
    """What the page's table needs of platform_runs(conn), from a few indexed queries instead of every row:
    {platform: dict(baseline, best, n_runs, n_kept, n_crash, version)}, baseline and best as row dicts
    (id, agent, commit, val_bpb, status, description) or None. Equal to platform_runs (a test checks)."""
    cols = "id, agent_id, commit_hash, val_bpb, status, description"

    def row(r):
        return dict(zip(("id", "agent", "commit", "val_bpb", "status", "description"), r)) if r else None

    summary = {}
    for plat, n_runs, n_crash, version in conn.execute(
            """SELECT platform, COUNT(*), SUM(status = 'crash'), MAX(id) FROM results
               WHERE status != 'unparsed' GROUP BY platform"""):
        base = row(conn.execute(f"""SELECT {cols} FROM results WHERE platform = ? AND status IN ('keep', 'discard')
                                    AND val_bpb > 0 ORDER BY id LIMIT 1""", (plat,)).fetchone())
        best, n_kept = base, 1 if base else 0
        if base:
            top = row(conn.execute(f"""SELECT {cols} FROM results WHERE platform = ? AND status = 'keep' AND id > ?
                                       AND val_bpb > 0 ORDER BY val_bpb, id LIMIT 1""", (plat, base["id"])).fetchone())
            if top and top["val_bpb"] < base["val_bpb"]:
                best = top
            n_kept += conn.execute("""SELECT COUNT(*) FROM results WHERE platform = ? AND status = 'keep' AND id > ?
                                      AND val_bpb > 0""", (plat, base["id"])).fetchone()[0]
        summary[plat] = dict(baseline=base, best=best, n_runs=n_runs, n_kept=n_kept, n_crash=n_crash, version=version)
    return summary


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

    s: platform_runs(...)[platform]. Like analysis.ipynb: finished runs as dots (discarded faint grey, kept
    green), the running best as a step line, kept improvements (runs that lowered the running best) labelled
    with description and agent: the baseline and the LABELS_MAX - 1 that gained most. Crashes are counted in
    the legend, not drawn. The y-axis spans the kept line, so a discarded run far worse than the baseline falls
    off the top (the legend says how many).
    """
    kept, rows = s["kept"], s["rows"]
    fig = Figure(figsize=(10, 4.6), dpi=72)
    ax = fig.add_subplot()
    fig.subplots_adjust(left=0.08, right=0.985, bottom=0.11, top=0.92)
    ax.set_xlabel("Experiment # on this platform")
    ax.set_ylabel("val_bpb (lower is better)")
    ax.grid(True, alpha=0.25)
    if not kept:
        ax.set_title(f"{platform}: {len(rows)} runs, none finished yet")
        ax.text(0.5, 0.5, "no finished run yet", transform=ax.transAxes, ha="center", parse_math=False)
    else:
        kept_ids = {id(r) for r in kept}
        others = [r for r in s["finished"] if id(r) not in kept_ids]
        base, best = kept[0]["val_bpb"], s["best"]["val_bpb"]
        top = max(r["val_bpb"] for r in kept)
        span = top - best if top > best else max(0.002, 0.002 * top)
        x_end = rows[-1]["x"]
        dots = ax.scatter([r["x"] for r in others], [r["val_bpb"] for r in others], s=10, color="0.55",
                          alpha=0.45, linewidths=0, zorder=2)
        ax.scatter([r["x"] for r in kept], [r["val_bpb"] for r in kept], s=26, color="#2e9e44",
                   edgecolors="#145a24", linewidths=0.6, label=f"Kept ({len(kept)})", zorder=4)
        ax.step([r["x"] for r in kept] + [x_end], [r["running_best"] for r in kept] + [kept[-1]["running_best"]],
                where="post", color="#145a24", linewidth=1.4, alpha=0.8, label="Running best", zorder=3)
        if s["n_crash"]:
            ax.plot([], [], " ", label=f"Crashed ({s['n_crash']}, not shown)")
        margin = 0.02 * max(len(rows), 10) + 0.5
        ax.set_xlim(-margin, x_end + margin + 0.15 * x_end)  # room at the right for the newest labels
        ax.set_ylim(best - 0.06 * span, top + 0.25 * span)
        ax.set_title(f"{platform}: {len(rows)} runs, {len(kept)} kept; val_bpb {base:.6f} -> {best:.6f} "
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


def render_index(conn, platforms, version):
    """The dashboard's HTML (str). platforms: platform_summary(conn); version: records_version(conn)."""
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

    order = sorted(platforms, key=lambda p: (-platforms[p]["n_runs"], p))
    out = [f'<header><h1>autoresearch hub</h1><span class="muted">{n_agents} agents · {n_results} results · '
           f'{len(platforms)} platforms · {n_commits} commits · as of {_when(time.time())} UTC</span></header>']

    # best per platform, then the charts: above the fold
    out.append('<section id="best"><h2>Best per platform</h2>')
    if not order:
        out.append('<p class="muted">No results yet. Agents post one line per run to the '
                   f'<code>{RESULTS_CHANNEL}</code> channel.</p>')
    else:
        out.append('<table class="leaderboard"><tr><th>platform</th><th class="num">best val_bpb</th>'
                   '<th class="num">improvement</th><th>commit</th><th>agent</th><th>description</th>'
                   '<th class="num">baseline</th><th class="num">runs</th><th class="num">kept</th></tr>')
        for p in order:
            s = platforms[p]
            b = s["best"]
            if b is None:
                out.append(f'<tr><td>{esc(p)}</td><td class="num">---</td><td></td><td></td><td></td>'
                           f'<td class="muted">no finished run yet</td><td></td><td class="num">{s["n_runs"]}</td>'
                           '<td class="num">0</td></tr>')
                continue
            base = s["baseline"]["val_bpb"]
            gain = base - b["val_bpb"]
            out.append(f'<tr class="platform"><td><b>{esc(p)}</b></td><td class="num best"><b>{_bpb(b["val_bpb"])}</b></td>'
                       f'<td class="num">{gain:.6f} ({gain / base:.2%})</td><td>{commit_link(b["commit"], resolve(b["commit"]))}</td>'
                       f'<td>{esc(b["agent"])}</td><td class="desc">{esc(b["description"])}</td>'
                       f'<td class="num">{_bpb(base)}</td><td class="num">{s["n_runs"]}</td>'
                       f'<td class="num">{s["n_kept"]}</td></tr>')
        out.append("</table>")
    out.append("</section>")
    if order:
        out.append('<section id="charts"><div class="charts">')
        for p in order:
            s = platforms[p]
            out.append(f'<figure><img class="chart" src="/chart/{quote(p, safe="")}.svg?v={s["version"]}" '
                       f'width="720" height="331" alt="progress of val_bpb on {esc(p)}">'
                       f'<figcaption>{esc(p)}: runs as dots (kept green, discarded grey), the running best as a step '
                       'line, each kept improvement labelled.</figcaption></figure>')
        out.append("</div></section>")

    # agents
    counts, best_of = {}, {}   # one scan of the covering index results_by_agent
    for agent, status, platform, n, val in conn.execute(
            """SELECT agent_id, status, platform, COUNT(*), MIN(val_bpb) FROM results
               GROUP BY agent_id, status, platform ORDER BY agent_id, status, platform"""):
        c = counts.setdefault(agent, {})
        c[status] = c.get(status, 0) + n
        if status == "keep" and val is not None:
            best_of.setdefault(agent, []).append(f"{_bpb(val)} ({platform})")
    out.append('<section id="agents"><h2>Agents</h2><table><tr><th>agent</th><th class="num">runs</th>'
               '<th class="num">keeps</th><th class="num">discards</th><th class="num">crashes</th>'
               '<th class="num">unparsed</th><th>best kept</th></tr>')
    for agent in sorted(counts, key=lambda a: (-sum(counts[a].values()), a)):
        c = counts[agent]
        out.append(f'<tr><td>{esc(agent)}</td><td class="num">{sum(c.values())}</td>'
                   + "".join(f'<td class="num {k}">{c.get(k, 0)}</td>' for k in ("keep", "discard", "crash", "unparsed"))
                   + f'<td>{esc(", ".join(best_of.get(agent, [])))}</td></tr>')
    out.append("</table></section>")

    # latest results: what is being tried now
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
    vals = {}  # full hash -> result rows naming it (for the lineage and the leaves)

    def results_of(full):
        if full not in vals:
            vals[full] = conn.execute(
                """SELECT platform, MIN(val_bpb) FROM results WHERE commit_hash IN (?, ?, ?) AND val_bpb IS NOT NULL
                   AND status != 'crash' GROUP BY platform""", (full[:7], full[:8], full)).fetchall()
        return ", ".join(f"{_bpb(v)} ({esc(p)})" for p, v in vals[full])

    for p in order:
        b = platforms[p]["best"]
        if b is None:
            continue
        full = resolve(b["commit"])
        out.append(f"<h3>Lineage of the best on {esc(p)} ({_bpb(b['val_bpb'])}), newest first</h3>")
        if not full:
            out.append(f'<p class="muted">Commit <code>{esc(b["commit"])}</code> is not on the hub (never pushed).</p>')
            continue
        chain = lineage(conn, full)
        out.append(f'<ol class="lineage">')
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
    posts = conn.execute("SELECT id, agent_id, content, created_at FROM posts WHERE channel = ? ORDER BY id DESC LIMIT ?",
                         (DISCUSSION_CHANNEL, LATEST_POSTS)).fetchall()
    for pid, agent, content, created in posts:
        out.append(f'<article class="post" id="post-{pid}"><div class="muted">{esc(agent)} · {_when(created)} UTC</div>'
                   f"{MARKDOWN.render(content)}</article>")
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
    """`git show` of a commit as text, cut at DIFF_MAX_BYTES. A commit never changes, so neither does its
    diff: cached. Raises RuntimeError when git fails (not cached: it may be passing)."""
    try:
        proc = subprocess.run(["git", "--git-dir", str(repo_path), "-c", "core.quotepath=off", "show", "--no-color",
                               "--no-ext-diff", "--no-textconv", "--stat", "--patch", "--format=fuller", full, "--"],
                              capture_output=True, timeout=GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(str(e)) from None
    if proc.returncode:
        raise RuntimeError(proc.stderr.decode("utf-8", errors="replace")[:2000])
    diff = proc.stdout[:DIFF_MAX_BYTES].decode("utf-8", errors="replace")
    return diff + (f"\n[cut at {DIFF_MAX_BYTES} bytes]" if len(proc.stdout) > DIFF_MAX_BYTES else "")


def render_commit(conn, repo_path, full):
    """The HTML of one commit's page: its record, parent, children, results, and `git show` (escaped)."""
    c = commit_record(conn, full)
    children = conn.execute("SELECT hash, agent_id, message FROM commits WHERE parent_hash = ? ORDER BY created_at",
                            (full,)).fetchall()
    results = conn.execute("""SELECT agent_id, platform, val_bpb, status, description FROM results
                              WHERE commit_hash IN (?, ?, ?) ORDER BY id""", (full[:7], full[:8], full)).fetchall()
    try:
        diff = git_show(str(repo_path), full)
    except RuntimeError as e:
        diff = f"git show failed: {e}"
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


def routes(state):
    """The dashboard's routes for the hub's Starlette app, or [] when they must not be mounted.

    state: an object (or dict) with db_path, repo_path, read_token (str or None) and loopback (bool: the hub
    listens on a loopback address only). Not on loopback and no read token: nothing is mounted, and a
    warning says so. Not on loopback with a read token: every page needs it (see the module docstring).
    """
    db_path, repo_path = _field(state, "db_path"), _field(state, "repo_path")
    read_token, loopback = _field(state, "read_token"), bool(_field(state, "loopback", False))
    if not loopback and not read_token:
        log.warning("dashboard: not mounted: the hub listens on a non-loopback address and has no read token "
                    "(start it with --read-token T, then open /?token=T)")
        return []
    need_token = not loopback
    cookie = _cookie_value(read_token) if need_token else None
    lock, chart_lock = threading.Lock(), threading.Lock()
    cache = {"index": (None, b""), "platforms": (None, {}), "charts": {}}
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
        def endpoint(request):
            if need_token:
                given = request.query_params.get("token")
                if given is not None:
                    if not hmac.compare_digest(given.encode(), read_token.encode()):
                        return PlainTextResponse("wrong read token\n", status_code=401, headers=HEADERS)
                    # set the cookie, then drop the token from the address (history, logs, Referer)
                    response = RedirectResponse(request.url.path, status_code=303, headers=HEADERS)
                    response.set_cookie(COOKIE, cookie, max_age=COOKIE_MAX_AGE, httponly=True, samesite="lax")
                    return response
                if not allowed(request):
                    return PlainTextResponse("this page needs the hub's read token: open /?token=<read token> once, "
                                             "or send Authorization: Bearer <read token>\n", status_code=401,
                                             headers=HEADERS)
            return handler(request)
        return endpoint

    def current(conn):
        """(records version, platform_summary), recomputed only when the version changes."""
        version = records_version(conn)
        with lock:
            if cache["platforms"][0] != version:
                cache["platforms"] = (version, platform_summary(conn))
            return cache["platforms"]

    def index(request):
        conn = reader()
        version, platforms = current(conn)
        with lock:
            if cache["index"][0] != version:
                cache["index"] = (version, render_index(conn, platforms, version).encode())
            body = cache["index"][1]
        return Response(body, media_type="text/html; charset=utf-8", headers=HEADERS)

    def chart(request):
        platform = request.path_params["platform"]
        conn = reader()
        _, platforms = current(conn)
        if platform not in platforms:
            return PlainTextResponse("no such platform\n", status_code=404, headers=HEADERS)
        with chart_lock:  # one drawing at a time; the page itself never waits for a chart
            version, svg, drawn = cache["charts"].get(platform, (None, b"", -math.inf))
            latest = platforms[platform]["version"]
            if version != latest and time.monotonic() - drawn >= CHART_REDRAW_S:
                s = platform_runs(conn, platform)[platform]
                version, svg = s["version"], draw_chart(platform, s)
                cache["charts"][platform] = (version, svg, time.monotonic())
        etag = f'"{hashlib.sha256(platform.encode()).hexdigest()[:16]}-{version}"'
        headers = dict(HEADERS, **{"Content-Security-Policy": SVG_CSP, "ETag": etag})
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(svg, media_type="image/svg+xml", headers=headers)

    def commit(request):
        prefix = request.path_params["hash"].lower()
        if not HASH.match(prefix):
            return PlainTextResponse("a commit hash is 4 to 40 hex digits\n", status_code=400, headers=HEADERS)
        conn = reader()
        hits = commits_with_prefix(conn, prefix)
        if len(hits) != 1:
            return PlainTextResponse("no such commit on the hub\n" if not hits else "ambiguous hash prefix\n",
                                     status_code=404, headers=HEADERS)
        if hits[0] != prefix:
            return RedirectResponse(f"/commit/{hits[0]}", status_code=303, headers=HEADERS)
        body = render_commit(conn, repo_path, hits[0])
        return Response(body, media_type="text/html; charset=utf-8", headers=HEADERS)

    return [Route("/", guarded(index), methods=["GET", "HEAD"]),
            Route("/chart/{platform}.svg", guarded(chart), methods=["GET", "HEAD"]),
            Route("/commit/{hash}", guarded(commit), methods=["GET", "HEAD"])]
