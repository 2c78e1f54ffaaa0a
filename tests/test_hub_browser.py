"""The hub's web page in a real headless browser (Debian's `chromium`), served by a live hub.

A hub (`hub/server.py`, started as a subprocess) holds a few hundred results from several agents on three
platforms (tests/hub_fill.py, parsed by the hub at start) plus posts sent through its API while it runs;
chromium loads the page, dumps the DOM after its load event and takes a 1280x800 screenshot (the first screen
a person sees). The test checks that the leaderboard holds each platform's best, that the charts were drawn
and are on that first screen, and that a post holding <script> shows as text.

The screenshot is saved under the test's tmp_path; with AUTORESEARCH_HUB_SCREENSHOT=<path> it is also copied
there (that is how docs/hub.png is made: AUTORESEARCH_HUB_SCREENSHOT=docs/hub.png uv run pytest
tests/test_hub_browser.py).
"""

import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import requests

sys.path.insert(0, os.path.dirname(__file__))
import hub_fill  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
SERVER = os.path.join(ROOT, "hub", "server.py")
KEPT_GREEN = (0x2E, 0x9E, 0x44)   # the kept runs' dots: drawn only in the charts
SCRIPT_POST = "Found it! <script>document.write('XSS'+'RAN')</script> **warmdown 0.3** beats 0.5 on H100"

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium; "
                                                ".ci/run installs it when it runs as root)"),
    pytest.mark.skipif(not os.path.exists(SERVER), reason="hub/server.py is not in this checkout"),
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium(tmp_path, *args):
    """Run headless chromium; returns stdout (text). Root needs --no-sandbox; a fresh profile per call."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           "--no-first-run", "--mute-audio", f"--user-data-dir={tmp_path / 'chromium-profile'}",
           "--window-size=1280,800", *args]
    proc = subprocess.run(cmd, capture_output=True, timeout=180)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    return proc.stdout.decode()


@pytest.fixture
def live_hub(tmp_path):
    data = tmp_path / "hub"
    summary = hub_fill.fill(data, 400, n_agents=6, platforms=("H100", "A100", "M4-Max"), seed=5, extra_posts=[
        ("discussion", "agent-3", "Depth 10 with **aspect 56** keeps VRAM flat; see `ff00aa1`."),
        ("results", "agent-4", "commit:xyz platform:H100 | I forgot the format"),
    ])
    port = free_port()
    log = open(tmp_path / "hub.log", "wb")
    proc = subprocess.Popen([sys.executable, SERVER, "--data", str(data), "--port", str(port)], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                requests.get(base + "/api/git/leaves", timeout=5)
                break
            except requests.ConnectionError:
                assert proc.poll() is None, (tmp_path / "hub.log").read_text()
                time.sleep(0.1)
        # while it runs, an agent registers and posts through the API: parsed on the way in
        key = requests.post(base + "/api/register", json={"id": "live-agent"}, timeout=10).json()["api_key"]
        auth = {"Authorization": f"Bearer {key}"}
        record = round(summary["best"]["A100"][0] - 0.000912, 6)   # a new best on A100, posted live
        for channel, content in [("discussion", SCRIPT_POST),
                                 ("results", f"commit:abcdef0 platform:A100 val_bpb:{record:.6f} vram_gb:41.5 | "
                                             "live record <b>bold?</b>")]:
            r = requests.post(f"{base}/api/channels/{channel}/posts", json={"content": content}, headers=auth,
                              timeout=10)
            assert r.status_code in (200, 201), r.text
        summary["best"]["A100"] = (record, "abcdef0", "live-agent", "live record <b>bold?</b>")
        yield base, summary, key
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_page_in_headless_chromium(live_hub, tmp_path):
    base, summary, key = live_hub
    dom = chromium(tmp_path, "--dump-dom", base + "/")
    # the leaderboard: one row per platform with its best val_bpb, commit and agent
    board = dom[dom.index('<table class="leaderboard">'):]
    board = board[:board.index("</table>")]
    assert board.count('<tr class="platform">') == 3
    for platform, (val, short, agent, desc) in summary["best"].items():
        row = board[board.index(f"<b>{platform}</b>"):]
        row = row[:row.index("</tr>")]
        assert f"{val:.6f}" in row and short in row and agent in row, row
    assert "live record &lt;b&gt;bold?&lt;/b&gt;" in board and "(not on the hub)" in board
    # the charts: one <img> per platform, pointing at the hub's SVGs
    assert dom.count('<img class="chart" src="/chart/') == 3
    # the <script> post: shown as text, never run (no script element at all, and what it would write is absent)
    assert "<script" not in dom and "XSSRAN" not in dom
    assert "&lt;script&gt;document.write('XSS'+'RAN')&lt;/script&gt;" in dom
    assert "<strong>warmdown 0.3</strong>" in dom
    assert key not in dom and "hash-of-" not in dom

    shot = tmp_path / "hub.png"
    chromium(tmp_path, f"--screenshot={shot}", base + "/")
    assert shot.exists() and shot.stat().st_size > 10_000
    from matplotlib.image import imread
    pixels = (imread(shot)[..., :3] * 255).round().astype(int)
    assert pixels.shape[:2] == (800, 1280)
    # the charts were drawn (their kept-run dots) on the first screen, below the leaderboard
    green = (np.abs(pixels - np.array(KEPT_GREEN)).max(axis=-1) <= 12)
    rows = np.nonzero(green.any(axis=1))[0]
    assert green.sum() >= 50 and rows.min() > 120, (green.sum(), rows[:5])
    # each chart is the SVG of its platform: its title ends at the platform's best
    for platform, (val, *_) in summary["best"].items():
        assert f"-&gt; {val:.6f}" in requests.get(f"{base}/chart/{platform}.svg", timeout=60).text
    target = os.environ.get("AUTORESEARCH_HUB_SCREENSHOT")
    if target:
        shutil.copyfile(shot, os.path.join(ROOT, target) if not os.path.isabs(target) else target)
