"""The result lines agents post to the hub's `results` channel, parsed once into structured rows, and the value
of a commit on a platform (the mean of its results there).

An agent posts one line per run (program_agenthub.md):

    commit:<7-char hash> platform:<platform> val_bpb:<value> vram_gb:<value> | <description>

A discarded run carries `(DISCARD)` in its description; a crash has `val_bpb:---` `vram_gb:---` and
`(CRASH: <reason>)`. Everything else that parses is a kept run. A line that does not have this shape, or
whose numbers are out of range, is kept as an `unparsed` row holding the raw text: agents are programs that
make mistakes, and a mistake must show on the page, never vanish and never break it.
"""

import math
import re
import statistics
from collections import namedtuple

# ---------------------------------------------------------------------------------------------------------
# The line format

# A hash is what `git rev-parse --short` prints (7 by default, longer when ambiguous, up to the full 40).
# Platforms are the slug train.py prints (`h100-80gb-hbm3`, `cpu-amd-epyc-2c`, `apple-m2-max`: at most 40
# characters) or one short word from before the slugs (H100, 4090, M4-Max): a safe alphabet, because the
# name goes into URLs. The four fields are separated by whitespace; the description follows the first '|'.
PLATFORM_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._+-]{0,39}"   # also what /api/best accepts (hub/server.py)
LINE = re.compile(
    r"""^\s*commit:(?P<commit>[0-9a-fA-F]{4,40})
        \s+platform:(?P<platform>""" + PLATFORM_PATTERN + r""")
        \s+val_bpb:(?P<val_bpb>\S+)
        \s+vram_gb:(?P<vram_gb>\S+)
        \s*\|(?P<description>.*)$""",
    re.VERBOSE,
)
MISSING = "---"                # the value of val_bpb and vram_gb in a crash line
# the markers need their parenthesis: "discarded the old schedule" in a kept run's description is not one
DISCARD = re.compile(r"\(\s*DISCARD(?:ED)?\b", re.IGNORECASE)   # "(DISCARD)", "(discard: worse than parent)"
CRASH = re.compile(r"\(\s*CRASH(?:ED)?\b", re.IGNORECASE)       # "(CRASH: OOM)"
VAL_BPB_MAX = 100.0            # bits per byte; an untrained byte model scores 8. Above this (1.7e308, say) a
                               # value is a typo or an attack, and it would wreck every chart's axis
VRAM_GB_MAX = 100_000.0        # GB; no accelerator holds 100 TB
MAX_LINE = 2000                # characters of a raw line kept in a row; posts are bounded by the hub anyway
SURROGATE = re.compile("[\ud800-\udfff]")   # a lone surrogate (JSON allows "\ud800") cannot be stored as UTF-8
STATUSES = ("keep", "discard", "crash", "unparsed")
KEY_CHARS = 7                  # two results name one commit when their hashes agree on git's short length


def _number(text, high):
    """A finite float in [0, high] from `text`, or None (for '---', 'nan', 'inf', '-1', '1e999', garbage)."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and 0 <= value <= high else None


def parse_line(line):
    """Parse one result line. Never raises.

    Returns a dict with keys commit (str, lower-case, or None), platform (str or None), val_bpb and vram_gb
    (float or None), description (str: the text after '|', stripped), status (one of STATUSES) and raw
    (the line, stripped, cut at MAX_LINE characters, a lone surrogate replaced by U+FFFD).

    - keep: both numbers parse, 0 < val_bpb <= VAL_BPB_MAX, 0 <= vram_gb <= VRAM_GB_MAX (or '---'), and the
      description has neither marker;
    - discard: the same, and the description holds "(DISCARD";
    - crash: the description holds "(CRASH", or val_bpb is '---'; the numbers are then None
      (a crash has no result, whatever the line says);
    - unparsed: anything else (wrong shape, a value that is neither a number nor '---', val_bpb of 0 or
      out of range).
    """
    raw = SURROGATE.sub("\ufffd", str(line).strip()[:MAX_LINE])
    row = dict(commit=None, platform=None, val_bpb=None, vram_gb=None, description="", status="unparsed", raw=raw)
    m = LINE.match(raw)
    if m is None:
        return row
    description = m["description"].strip()
    val_bpb, vram_gb = _number(m["val_bpb"], VAL_BPB_MAX), _number(m["vram_gb"], VRAM_GB_MAX)
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


# ---------------------------------------------------------------------------------------------------------
# A commit's value on a platform

Value = namedtuple("Value", "mean n sd")   # val_bpb: mean of n results, their sample standard deviation


def commit_values(results):
    """The value of each commit: the mean of its finished results (keep or discard; crashes have none).

    results: iterable of (commit, val_bpb) pairs of ONE platform, val_bpb a float or None (a crash: skipped);
    commit as posted (any case, 4 to 40 hex digits). Two hashes name the same commit when they agree on their
    first KEY_CHARS digits (a longer hash is the same short hash written out further). Returns {key: Value}
    in the order of each commit's first finished result, key = the hash's first KEY_CHARS digits, lower-case;
    Value(mean, n, sd) with sd the sample standard deviation (0.0 when n == 1), all val_bpb units.

    The hub's page uses it (hub/dashboard.py) for every value it shows of a commit.
    """
    runs = {}
    for commit, val_bpb in results:
        if commit and val_bpb is not None:
            runs.setdefault(commit[:KEY_CHARS].lower(), []).append(val_bpb)
    return {key: Value(statistics.fmean(v), len(v), statistics.stdev(v)) if len(v) > 1 else Value(v[0], 1, 0.0)
            for key, v in runs.items()}
