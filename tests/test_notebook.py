"""analysis.ipynb, executed headless (nbclient) in a temp dir against generated results.tsv files.

Each case writes its own results.tsv, runs the whole notebook top to bottom (any cell error fails the
test), and checks what it prints against numbers computed here from the same rows.
"""

import json
import os
import random
import re

import matplotlib.image
import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "analysis.ipynb")
HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Appended to the notebook in the normal case: reports the axis limits and whether any two kept-run
# labels overlap, measured on the drawn figure. Labels are slanted, so each one's axis-aligned box is
# turned back into the text's own rectangle (width W along the slant, height H across it).
CHECK_CELL = r'''
import json as _json
import numpy as _np
from matplotlib.backends.backend_agg import FigureCanvasAgg as _Canvas
_Canvas(fig)  # the inline backend detached the shown figure from its canvas: attach a fresh one
fig.canvas.draw()
_renderer = fig.canvas.get_renderer()
_boxes = []
for _t in ax.texts:
    _a = _np.radians(_t.get_rotation())
    _c, _s = _np.cos(_a), _np.sin(_a)
    _bb = _t.get_window_extent(_renderer)
    _w = (_bb.width * _c - _bb.height * _s) / (_c * _c - _s * _s)
    _h = (_bb.height * _c - _bb.width * _s) / (_c * _c - _s * _s)
    _corner = _np.array([_bb.x0 + _h * _s, _bb.y0])  # the text's lower-left corner, before rotation
    _u, _v = _corner @ [_c, _s], _corner @ [-_s, _c]
    _boxes.append((_u, _u + _w, _v, _v + _h, _t.get_text()))
_overlaps = [(p[4], q[4]) for i, p in enumerate(_boxes) for q in _boxes[i + 1:]
             if p[0] < q[1] - 0.5 and q[0] < p[1] - 0.5 and p[2] < q[3] - 0.5 and q[2] < p[3] - 0.5]
_legend = [_t.get_text() for _t in ax.get_legend().get_texts()]
_kept = [c for c in ax.collections if c.get_label().startswith("Kept (")][0].get_offsets().tolist()
_best = [l for l in ax.lines if l.get_label() == "Running best"][0].get_ydata().tolist()
print("CHECK " + _json.dumps({"ylim": list(ax.get_ylim()), "labels": len(_boxes), "overlaps": _overlaps,
                             "legend": _legend, "title": ax.get_title(), "kept": _kept, "best": _best}))
'''


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """One kernel for all the cases of this module (starting one per case costs several seconds).

    "python3" is ipykernel's own kernelspec; jupyter_client starts it with this interpreter.
    """
    start_dir = tmp_path_factory.mktemp("kernel")
    client = NotebookClient(nbformat.v4.new_notebook(), kernel_name="python3", timeout=120,
                            resources={"metadata": {"path": str(start_dir)}})
    with client.setup_kernel():
        yield client


def run_notebook(kernel, workdir, results=None, extra_cells=()):
    """Execute analysis.ipynb top to bottom with `workdir` as its working directory; return all it printed.

    The kernel's namespace is wiped first, so every case starts from nothing but the notebook.
    results: the text of results.tsv to write first, or None to leave it missing.
    """
    if results is not None:
        with open(os.path.join(workdir, "results.tsv"), "w", encoding="utf-8") as f:
            f.write(results)
    kernel.nb = nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.extend(nbformat.v4.new_code_cell(source) for source in extra_cells)
    reset = nbformat.v4.new_code_cell(f"%reset -f\nimport os\nos.chdir({str(workdir)!r})\ndel os")
    kernel.execute_cell(reset, 0, store_history=False)
    texts = []
    for index, cell in enumerate(nb.cells):
        kernel.execute_cell(cell, index)  # raises CellExecutionError if the cell fails
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                texts.append(output.text)
            elif "text/plain" in output.get("data", {}):
                texts.append(output.data["text/plain"])
    return "\n".join(texts)


def tsv(rows, trailing="\n"):
    return HEADER + "\n" + "\n".join("\t".join(row) for row in rows) + trailing


def count(output, status):
    match = re.search(rf"^\s*{status}\s+(\d+)\s*$", output, re.MULTILINE)
    assert match, f"no count for {status} in:\n{output}"
    return int(match.group(1))


def assert_png(path):
    with open(path, "rb") as f:
        head = f.read(8)
    assert head == PNG_SIGNATURE
    assert os.path.getsize(path) > 1000
    image = matplotlib.image.imread(path)  # decodes the whole file
    assert image.shape[0] > 100 and image.shape[1] > 100


# ---------------------------------------------------------------------------
# A normal night: baseline, then 120 keep / discard / crash rows
# ---------------------------------------------------------------------------

DESCRIPTIONS = [
    "increase MATRIX_LR to 0.05",
    'embedding lr 0.6 -> 0.8, "tied" head',
    "it's #3: GELU (x2); 100% sure?",
    "a,b,c = window pattern SSL",
    "drop value embeddings   (simpler!)",
    "tab\tinside the description",
    "weight decay 0.1 & warmdown 0.6 [try 2]",
]


def normal_rows():
    """Rows as the agent would log them, with statuses in mixed case, and a streak of kept runs
    that each gain very little: their dots nearly touch, the hard case for the labels."""
    rng = random.Random(3)
    rows = [("a0b1c2d", "0.997900", "44.0", "keep", "baseline")]
    best = 0.9979
    for i in range(1, 121):
        commit = f"{rng.getrandbits(28):07x}"
        desc = f"{rng.choice(DESCRIPTIONS)} #{i}"
        status = rng.choices(["keep", "discard", "crash"], weights=[25, 65, 10])[0]
        if 40 <= i < 46 or i == 7:
            status = "keep"
        spelled = rng.choice([status, status.upper(), status.capitalize()])
        if i == 7:
            spelled = " Keep "  # stray spaces around the status
        if status == "crash":
            rows.append((commit, "0.000000", "0.0", spelled, desc))
        elif status == "keep":
            best -= rng.uniform(0.00002, 0.0001) if 40 <= i < 46 else rng.uniform(0.0001, 0.002)
            rows.append((commit, f"{best:.6f}", f"{rng.uniform(40, 50):.1f}", spelled, desc))
        else:
            worse = 1.5 if i == 60 else best + rng.uniform(0.0001, 0.006)  # one far-off run
            rows.append((commit, f"{worse:.6f}", f"{rng.uniform(40, 55):.1f}", spelled, desc))
    return rows


@pytest.fixture(scope="module")
def normal(kernel, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("normal")
    rows = normal_rows()
    output = run_notebook(kernel, workdir, tsv(rows, trailing="\n\n"), extra_cells=[CHECK_CELL])
    return rows, output, workdir


def test_normal_counts_and_keep_rate(normal):
    rows, output, _ = normal
    statuses = [row[3].strip().lower() for row in rows]
    assert f"Experiments: {len(rows)}" in output
    for status in ("keep", "discard", "crash"):
        assert count(output, status.upper()) == statuses.count(status)
    kept, discarded = statuses[1:].count("keep"), statuses[1:].count("discard")
    assert f"Keep rate: {kept}/{kept + discarded} = {kept / (kept + discarded):.1%}" in output


def test_normal_baseline_best_improvement_and_ranking(normal):
    rows, output, _ = normal
    kept = [row for row in rows if row[3].strip().lower() == "keep"]
    base = float(rows[0][1])
    best_row = min(kept, key=lambda row: float(row[1]))
    best = float(best_row[1])
    assert f"Baseline:          {base:.6f}" in output
    assert f"Best:              {best:.6f}  (experiment {rows.index(best_row)}, {best_row[0]}" in output
    assert f"Total improvement: {base - best:.6f}  ({(base - best) / base:.2%} lower" in output

    # ranking: the kept experiment with the largest gain over the previous kept one comes first
    gains = [(float(prev[1]) - float(row[1]), row[0]) for prev, row in zip(kept, kept[1:])]
    top_commit = max(gains, key=lambda g: g[0])[1]
    ranking = output.split("Kept experiments by gain over the previous kept experiment:")[1]
    first_row = [line for line in ranking.splitlines() if re.search(r"\b[0-9a-f]{7}\b", line)][0]
    assert top_commit in first_row
    assert re.search(r"\s1\s", first_row)
    assert len([line for line in ranking.splitlines() if re.search(r"\b[0-9a-f]{7}\b", line)]) == len(kept) - 1


def test_normal_lists_kept_descriptions_verbatim(normal):
    rows, output, _ = normal
    listing = output.split("Kept experiments by gain")[0]
    for row in rows:
        if row[3].strip().lower() == "keep" and row[4] != "baseline":
            assert row[4] in listing


def test_normal_writes_a_readable_progress_png(normal):
    rows, output, workdir = normal
    assert_png(workdir / "progress.png")
    check = json.loads(output.split("CHECK ", 1)[1].splitlines()[0])
    kept = [float(row[1]) for row in rows if row[3].strip().lower() == "keep"]
    low, high = check["ylim"]
    span = max(kept) - min(kept)
    # the y-axis comes from the kept runs only: crashes (0.0) and the 1.5 outlier do not stretch it
    assert min(kept) - 0.5 * span < low < min(kept)
    assert max(kept) < high < max(kept) + 0.5 * span
    assert check["labels"] == len(kept)
    assert check["overlaps"] == []
    # one run per commit, as the reference logs: no noise floor, the chart as before
    assert "Noise floor: n/a (no commit was run more than once)" in output
    assert not any("noise" in label.lower() for label in check["legend"])


# ---------------------------------------------------------------------------
# Repeated runs of one commit (program.md's keep rule): the noise floor
# ---------------------------------------------------------------------------

REPEAT_ROWS = [
    ("a0b1c2d", "0.997900", "44.0", "keep", "baseline"),
    ("a0b1c2d", "0.998600", "44.0", "keep", "baseline"),
    ("a0b1c2d", "0.997500", "44.0", "keep", "baseline"),
    ("b2c3d4e", "0.996100", "44.2", "keep", "increase MATRIX_LR to 0.05"),
    ("c3d4e5f", "1.005000", "44.0", "discard", "switch to GeLU activation"),
    ("d4e5f60", "0.995800", "44.0", "discard", "warmdown 0.6"),
    ("d4e5f60", "0.996200", "44.0", "discard", "warmdown 0.6"),
    ("e5f6071", "0.995900", "44.1", "keep", "rotary base 20000"),
    ("e5f6071", "0.995700", "44.1", "keep", "rotary base 20000"),
    ("f60718a", "0.000000", "0.0", "crash", "double the model width (OOM)"),
    ("0718a9b", "0.990000", "44.0", "keep", "three times the learning rate"),
]


def flat(points):
    return [v for point in points for v in point]


def check_of(output):
    return json.loads(output.split("CHECK ", 1)[1].splitlines()[0])


def test_repeated_runs_give_a_noise_floor_band_and_marks(kernel, tmp_path):
    import statistics

    output = run_notebook(kernel, tmp_path, tsv(REPEAT_ROWS), extra_cells=[CHECK_CELL])
    runs = {}
    for commit, value, _, status, _ in REPEAT_ROWS:
        if status != "crash":
            runs.setdefault(commit, []).append(float(value))
    noise = statistics.stdev(runs["a0b1c2d"])  # the baseline's three runs, as program.md measures it
    assert f"Noise floor: {noise:.6f} (standard deviation of the baseline's 3 runs)" in output
    assert "Experiments: 7 (11 runs)" in output
    # gains between kept commits' means: b2c3d4e 0.0019 and 0718a9b 0.0058 are clear; e5f6071 gained 0.0003
    mean = {c: statistics.fmean(v) for c, v in runs.items()}
    assert mean["b2c3d4e"] - mean["e5f6071"] < noise < mean["a0b1c2d"] - mean["b2c3d4e"]
    marked = output.split("Kept experiments whose gain is within the noise floor (1):")[1].splitlines()[1]
    assert "e5f6071" in marked and "rotary base 20000" in marked
    check = check_of(output)
    assert f"Noise floor (±{noise:.4f})" in check["legend"]
    assert "Kept, gain within noise (1)" in check["legend"]
    assert "Range of a repeated commit's runs (3)" in check["legend"]  # baseline, d4e5f60 and e5f6071
    # one point per kept commit, at the mean of its runs, at its experiment number
    assert flat(check["kept"]) == pytest.approx([0, mean["a0b1c2d"], 1, mean["b2c3d4e"], 4, mean["e5f6071"],
                                                 6, mean["0718a9b"]])
    assert_png(tmp_path / "progress.png")


def test_baseline_run_once_pools_the_repeated_commits(kernel, tmp_path):
    """A log whose baseline ran once: the noise floor is the pooled sd of the commits that ran more than once."""
    import statistics

    rows = [("a0b1c2d", "0.997900", "44.0", "keep", "baseline")] + REPEAT_ROWS[3:]
    output = run_notebook(kernel, tmp_path, tsv(rows))
    repeated = [[0.9958, 0.9962], [0.9959, 0.9957]]
    pooled = (sum(statistics.variance(v) for v in repeated) / 2) ** 0.5
    assert f"Noise floor: {pooled:.6f} (pooled standard deviation of 4 runs of 2 commits" in output


# The night of the issue that asked for means: the baseline run three times (two more runs killed by the timeout,
# logged as crash rows), then a kept commit whose one lucky run (1.828643) was repeated (2.136335), a crash, a
# discard, and a small kept gain within the noise.
NIGHT = [
    ("a1b2c3d", "0.000000", "0.0", "crash", "baseline (killed by the timeout)"),
    ("a1b2c3d", "2.093805", "3.6", "keep", "baseline"),
    ("a1b2c3d", "0.000000", "0.0", "crash", "baseline (killed by the timeout)"),
    ("a1b2c3d", "2.101442", "3.6", "keep", "baseline"),
    ("a1b2c3d", "2.087015", "3.6", "keep", "baseline"),
    ("b2c3d4e", "1.828643", "3.7", "keep", "MATRIX_LR 0.05"),
    ("b2c3d4e", "2.136335", "3.7", "keep", "MATRIX_LR 0.05"),
    ("c3d4e5f", "0.000000", "0.0", "crash", "double the width (OOM)"),
    ("d4e5f60", "2.050000", "3.6", "discard", "GeLU"),
    ("e5f6071", "1.979000", "3.6", "keep", "warmdown 0.6"),
    ("f607182", "1.975000", "3.6", "keep", "rotary base 20000"),
]


def test_a_commit_with_several_runs_is_one_point_at_their_mean(kernel, tmp_path):
    import statistics

    output = run_notebook(kernel, tmp_path, tsv(NIGHT), extra_cells=[CHECK_CELL])
    base = statistics.fmean([2.093805, 2.101442, 2.087015])  # the crash rows do not count
    lucky = statistics.fmean([1.828643, 2.136335])
    noise = statistics.stdev([2.093805, 2.101442, 2.087015])  # not pooled with the 0.31 spread of b2c3d4e
    assert "Experiments: 6 (11 runs)" in output
    assert count(output, "KEEP") == 4 and count(output, "CRASH") == 1 and count(output, "DISCARD") == 1
    assert f"Baseline:          {base:.6f}  (experiment 0, a1b2c3d; mean of 3 runs, sd {noise:.6f})" in output
    assert f"Best:              1.975000  (experiment 5, f607182: rotary base 20000; 1 run)" in output
    assert f"Total improvement: {base - 1.975:.6f}" in output
    assert f"Noise floor: {noise:.6f} (standard deviation of the baseline's 3 runs)" in output
    # the three baseline runs are one point, not three successive improvements; the lucky run is no point at all
    check = check_of(output)
    assert flat(check["kept"]) == pytest.approx([0, base, 1, lucky, 4, 1.979, 5, 1.975])
    assert len(set(check["best"])) == 4 and min(check["best"]) == pytest.approx(1.975)
    assert "1.828643" not in check["title"] and "12.66%" not in check["title"]
    assert f"val_bpb {base:.6f} -> 1.975000 ({(base - 1.975) / base:.2%} lower" in check["title"]
    # e5f6071 gained 0.0035 over b2c3d4e's mean and f607182 0.004 over e5f6071: within the baseline's noise (0.0072)
    marked = output.split("Kept experiments whose gain is within the noise floor (2):")[1].splitlines()[1:3]
    assert "e5f6071" in marked[0] and "f607182" in marked[1]
    listing = output.split("Kept experiments by gain")[0]
    assert re.search(r"b2c3d4e\s+2\s+" + f"{lucky:.6f}" + r"\s+" + f"{statistics.stdev([1.828643, 2.136335]):.6f}",
                     listing)


# ---------------------------------------------------------------------------
# Edge cases
# ---------------------------------------------------------------------------

def test_only_the_baseline(kernel, tmp_path):
    output = run_notebook(kernel, tmp_path, tsv([("a0b1c2d", "0.997900", "44.0", "Keep", "baseline")], trailing=""))
    assert count(output, "KEEP") == 1
    assert count(output, "DISCARD") == 0
    assert "Keep rate: n/a" in output
    assert "Baseline:          0.997900" in output
    assert "Best:              0.997900" in output
    assert "Total improvement: 0.000000" in output
    assert "nothing to rank" in output
    assert_png(tmp_path / "progress.png")


def test_every_run_after_the_baseline_crashed(kernel, tmp_path):
    rows = [("a0b1c2d", "0.997900", "44.0", "keep", "baseline")]
    rows += [(f"{i:07x}", "0.000000", "0.0", ["crash", "CRASH", "Crash"][i % 3], f"idea {i}: OOM, sadly")
             for i in range(1, 9)]
    output = run_notebook(kernel, tmp_path, tsv(rows, trailing="\n\n"))
    assert f"Experiments: {len(rows)}" in output
    assert count(output, "CRASH") == 8
    assert count(output, "KEEP") == 1
    assert "Keep rate: n/a" in output
    assert "8 crashes" in output
    assert "Best:              0.997900" in output
    assert "Total improvement: 0.000000" in output
    assert "nothing to rank" in output
    assert_png(tmp_path / "progress.png")


def test_header_only(kernel, tmp_path):
    output = run_notebook(kernel, tmp_path, HEADER + "\n")
    assert "Experiments: 0" in output
    assert "Nothing to plot" in output
    assert "No experiment has finished yet" in output
    assert not (tmp_path / "progress.png").exists()


def test_missing_results_tsv(kernel, tmp_path):
    output = run_notebook(kernel, tmp_path, None)
    assert f"No results.tsv at {os.path.realpath(tmp_path / 'results.tsv')}" in output
    assert "program.md" in output
    assert "Nothing to plot" in output
    assert "No kept experiments yet" in output
    assert not (tmp_path / "progress.png").exists()


def test_notebook_is_saved_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert nb.metadata["kernelspec"]["name"] == "python3"
