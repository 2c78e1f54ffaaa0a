"""The result lines agents post to the hub's `results` channel, parsed once into structured rows.

An agent posts one line per run (AGENTHUB.md, "What the agent does"):

    commit:<7-char hash> platform:<platform> val_bpb:<value> vram_gb:<value> | <description>

A discarded run carries `(DISCARD)` in its description; a crash has `val_bpb:---` `vram_gb:---` and
`(CRASH: <reason>)`. Everything else that parses is a kept run. A line that does not have this shape is
kept as an `unparsed` row holding the raw text: agents are programs that make mistakes, and a mistake must
show on the page, never vanish and never break it.
"""

import math
import re

# ---------------------------------------------------------------------------------------------------------
# The line format

# A hash is what `git rev-parse --short` prints (7 by default, longer when ambiguous, up to the full 40).
# Platforms are the slug train.py prints (h100-80gb-hbm3, cpu-amd-epyc-2c, apple-m2-max; older hubs hold short
# words like H100 or M4-Max), at most 40 characters of a safe alphabet, because the name goes into URLs.
# The four fields are separated by whitespace; the description follows the first '|'.
LINE = re.compile(
    r"""^\s*commit:(?P<commit>[0-9a-fA-F]{4,40})
        \s+platform:(?P<platform>[A-Za-z0-9][A-Za-z0-9._+-]{0,39})
        \s+val_bpb:(?P<val_bpb>\S+)
        \s+vram_gb:(?P<vram_gb>\S+)
        \s*\|(?P<description>.*)$""",
    re.VERBOSE,
)
MISSING = "---"                # the value of val_bpb and vram_gb in a crash line
DISCARD = re.compile(r"\(\s*DISCARD\b", re.IGNORECASE)   # "(DISCARD)", also "(discard: worse than parent)"
CRASH = re.compile(r"\(\s*CRASH\b", re.IGNORECASE)       # "(CRASH: OOM)"
MAX_LINE = 2000                # characters of a raw line kept in a row; posts are bounded by the hub anyway
STATUSES = ("keep", "discard", "crash", "unparsed")


def _number(text):
    """A finite float >= 0 from `text`, or None (for '---', 'nan', 'inf', '-1', '1e999', garbage)."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def parse_line(line):
    """Parse one result line. Never raises.

    Returns a dict with keys commit (str, lower-case, or None), platform (str or None), val_bpb and vram_gb
    (float or None), description (str: the text after '|', stripped), status (one of STATUSES) and raw
    (the line, stripped, cut at MAX_LINE characters).

    - keep: both numbers parse (val_bpb > 0) and the description has neither marker;
    - discard: both numbers parse (val_bpb > 0) and the description holds "(DISCARD";
    - crash: the description holds "(CRASH", or val_bpb is '---'; the numbers are then None
      (a crash has no result, whatever the line says);
    - unparsed: anything else (wrong shape, a value that is neither a number nor '---', val_bpb of 0).
    """
    raw = str(line).strip()[:MAX_LINE]
    row = dict(commit=None, platform=None, val_bpb=None, vram_gb=None, description="", status="unparsed", raw=raw)
    m = LINE.match(raw)
    if m is None:
        return row
    description = m["description"].strip()
    val_bpb, vram_gb = _number(m["val_bpb"]), _number(m["vram_gb"])
    if CRASH.search(description) or m["val_bpb"] == MISSING:
        if m["val_bpb"] != MISSING and val_bpb is None:
            return row   # neither a number nor the crash marker: not a line we understand
        status, val_bpb, vram_gb = "crash", None, None
    elif val_bpb is None or val_bpb == 0 or (vram_gb is None and m["vram_gb"] != MISSING):
        return row
    else:
        status = "discard" if DISCARD.search(description) else "keep"
    row.update(commit=m["commit"].lower(), platform=m["platform"], val_bpb=val_bpb, vram_gb=vram_gb,
               description=description, status=status)
    return row


def parse_post(content):
    """Parse a `results` post into rows, one per non-blank line (an agent may batch several runs).

    A post with no non-blank line gives one unparsed row with empty raw text, so every post of the channel
    has at least one row and the page can say that it was not understood.
    """
    lines = [line for line in str(content).splitlines() if line.strip()]
    return [parse_line(line) for line in lines] or [parse_line("")]
