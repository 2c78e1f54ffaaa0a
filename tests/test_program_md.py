"""program.md against the code: the commands it gives the agent must work here, as written.

The commands are taken out of program.md (inline code and fenced blocks) and run with bash, on the
summary that train.py really prints (the `train_stdout` fixture: stdout of a short real run).
"""

import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = ["commit", "val_bpb", "memory_gb", "status", "description"]
DEVICES = {"cuda", "mps", "cpu"}


@pytest.fixture(scope="module")
def program():
    with open(os.path.join(ROOT, "program.md"), encoding="utf-8") as f:
        return f.read()


def fenced_blocks(text):
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def snippets(text):
    """Every piece of code in program.md: the lines of fenced blocks and the inline `spans`."""
    lines = [line.strip() for block in fenced_blocks(text) for line in block.splitlines()]
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL))
    return lines + [s.strip() for s in inline]


def commands(text, program_name):
    found = sorted({s for s in snippets(text) if s.split(" ", 1)[0] == program_name})
    assert found, f"program.md gives no `{program_name}` command"
    return found


def bash(command, cwd, env=None):
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def summary_block(text):
    """The `key: value` lines after the last `---` line."""
    lines = text.replace("\r", "\n").splitlines()
    start = max(i for i, line in enumerate(lines) if line.strip() == "---")
    return [line for line in lines[start + 1:] if re.match(r"^\w+:\s", line)]


RUN = ('AUTORESEARCH_SEED=<seed> timeout <T> uv run train.py > run.log 2>&1; echo "exit status: $?" >> run.log; '
       'cp run.log logs/$(git rev-parse --short HEAD)-<seed>.log')


def fill(command, **values):
    for name, value in values.items():
        command = command.replace(f"<{name}>", str(value))
    assert not re.search(r"<[a-zA-Z_]+>", command), command
    return command


def the_command(program, marker):
    """The one snippet of program.md that contains marker."""
    found = sorted({s for s in snippets(program) if marker in s})
    assert len(found) == 1, (marker, found)
    return found[0]


def test_the_run_command_is_the_only_launch(program):
    launches = {s for s in snippets(program) if re.search(r"\b(uv run|python)\b.*train\.py", s)}
    assert launches == {RUN}


def repo_with_commit(tmp_path):
    """A git repository with one commit, a logs/ folder and a stand-in `uv` first on PATH; returns (env, short hash)."""
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x"],
                   cwd=tmp_path, check=True)
    (tmp_path / "logs").mkdir()
    (tmp_path / "bin").mkdir()
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", AUTORESEARCH_CACHE_DIR="/my/cache")
    env.pop("AUTORESEARCH_SEED", None)
    short = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True, text=True,
                           check=True).stdout.strip()
    return env, short


def fake_uv(tmp_path, body):
    (tmp_path / "bin" / "uv").write_text("#!/bin/bash\n" + body)
    os.chmod(tmp_path / "bin" / "uv", 0o755)


def test_run_command_logs_both_streams_and_the_exit_status_and_keeps_the_log(program, tmp_path):
    """The run command as written, with a stand-in `uv` that fails with status 3."""
    env, short = repo_with_commit(tmp_path)
    fake_uv(tmp_path, 'echo "uv $* seed=${AUTORESEARCH_SEED:-default} cache=${AUTORESEARCH_CACHE_DIR:-unset}"\n'
                      'echo "a warning on stderr" >&2\nexit 3\n')
    (tmp_path / "logs" / f"{short}-42.log").write_text("an earlier run of another seed\n")
    result = bash(fill(RUN, seed=43, T=60), tmp_path, env=env)
    assert result.returncode == 0 and result.stdout == result.stderr == ""  # nothing reaches the agent's context
    log = (tmp_path / "run.log").read_text()
    assert log.splitlines() == ["uv run train.py seed=43 cache=/my/cache", "a warning on stderr", "exit status: 3"]
    assert (tmp_path / "logs" / f"{short}-43.log").read_text() == log
    assert (tmp_path / "logs" / f"{short}-42.log").read_text() == "an earlier run of another seed\n"


def test_a_run_over_the_timeout_is_killed_and_says_so_at_the_end_of_its_log(program, tmp_path):
    env, short = repo_with_commit(tmp_path)
    fake_uv(tmp_path, 'for i in $(seq 1000); do printf "\\rstep %05d | loss: 3.0" $i; done; echo; sleep 30\n')
    result = bash(fill(RUN, seed=42, T=1), tmp_path, env=env)
    assert result.returncode == 0
    log = (tmp_path / "run.log").read_text()
    assert log.endswith("\nexit status: 124\n") and (tmp_path / "logs" / f"{short}-42.log").read_text() == log
    assert bash('grep "^val_bpb:\\|^peak_vram_mb:" run.log', tmp_path).stdout == ""  # read as a crash
    tail = bash("tail -c 3000 run.log", tmp_path).stdout
    assert len(tail.encode()) <= 3000 and tail.splitlines()[-1] == "exit status: 124"
    assert "124" in program and "killed by the timeout" in program


def test_summary_block_matches_what_train_py_prints(program, train_stdout):
    """The block program.md shows is train.py's, key for key up to `device:` (lines after it may be added)."""
    real = summary_block(train_stdout)
    shown = [summary_block(block) for block in fenced_blocks(program) if block.lstrip().startswith("---")]
    assert len(shown) == 1, "program.md should show the summary block once"
    shown = shown[0]
    key = lambda line: line.split(":", 1)[0]
    assert [key(line) for line in shown] == [key(line) for line in real][:len(shown)]
    assert [key(line) for line in shown][-2:] == ["depth", "device"]
    for shown_line, real_line in zip(shown, real):
        # same alignment: the value starts in the same column
        assert re.match(r"^\w+:\s+", shown_line).end() == re.match(r"^\w+:\s+", real_line).end(), real_line
        shown_value, real_value = shown_line.split()[1], real_line.split()[1]
        if key(real_line) == "device":
            assert shown_value in DEVICES and real_value in DEVICES
        else:  # same number format: digits after the point
            decimals = lambda v: len(v.split(".")[1]) if "." in v else 0
            float(real_value)
            assert decimals(shown_value) == decimals(real_value), real_line


def test_grep_commands_pull_their_lines_from_a_real_log(program, train_stdout, tmp_path):
    """Every grep of program.md on a real log (as the run command leaves it): each named line once, in order."""
    (tmp_path / "run.log").write_text(train_stdout + "exit status: 0\n")
    greps = commands(program, "grep")
    assert 'grep "^val_bpb:\\|^peak_vram_mb:" run.log' in greps and 'grep "^platform:\\|^num_steps:" run.log' in greps
    lines = train_stdout.replace("\r", "\n").splitlines()
    for command in greps:
        keys = re.findall(r"\^(\w+):", command)
        assert keys, command
        result = bash(command, tmp_path)
        assert result.returncode == 0, (command, result.stderr)
        expected = [line for line in lines if line.split(":", 1)[0] in keys]
        assert result.stdout.splitlines() == expected and len(expected) == len(keys), command
    platform = bash('grep "^platform:" run.log', tmp_path).stdout.split()[1]
    assert re.fullmatch(r"[a-z0-9.-]{1,40}", platform)


def test_grep_prints_nothing_for_a_crashed_run(program, tmp_path):
    """program.md's crash rule: empty grep output means the run did not finish."""
    (tmp_path / "run.log").write_text("step 00012 (4.0%) | loss: nan\nFAIL\nexit status: 1\n")
    result = bash('grep "^val_bpb:\\|^peak_vram_mb:" run.log', tmp_path)
    assert 'grep "^val_bpb:\\|^peak_vram_mb:" run.log' in program
    assert result.stdout == ""


def test_crash_reading_command_cannot_flood_the_context(program, tmp_path):
    assert "tail -c 3000 run.log" in commands(program, "tail")
    # a progress history written with \r (one ~100 KB line), then the traceback
    history = "".join(f"\rstep {i:05d} (1.0%) | loss: 3.0 | dt: 300ms" for i in range(3000))
    traceback = "Traceback (most recent call last):\n  File \"train.py\", line 1\nNameError: name 'x' is not defined\n"
    (tmp_path / "run.log").write_text(history + "\n" + traceback + "exit status: 1\n")
    out = bash("tail -c 3000 run.log", tmp_path).stdout
    assert len(out.encode()) <= 3000 and out.endswith(traceback + "exit status: 1\n")


# A night's results.tsv with what goes wrong: two crashed baseline runs (killed, logged as crash rows) among three
# finished ones, a crash, a run killed by the timeout, a kept commit run twice (the second run a confirmation),
# and a commit with nothing but a crash row.
NIGHT = [
    ("a1b2c3d", "0.000000", "0.0", "crash", "baseline (killed by the timeout)"),
    ("a1b2c3d", "2.093805", "3.6", "keep", "baseline"),
    ("a1b2c3d", "0.000000", "0.0", "crash", "baseline (killed by the timeout)"),
    ("a1b2c3d", "2.101442", "3.6", "keep", "baseline"),
    ("a1b2c3d", "2.087015", "3.6", "keep", "baseline"),
    ("b2c3d4e", "1.828643", "3.7", "keep", "MATRIX_LR 0.05"),
    ("b2c3d4e", "2.136335", "3.7", "keep", "MATRIX_LR 0.05"),
    ("c3d4e5f", "0.000000", "0.0", "crash", "double the width (OOM)"),
    ("d4e5f60", "0.000000", "0.0", "crash", "batch size 1 (killed by the timeout)"),
    ("e5f6071", "1.979000", "3.6", "keep", "warmdown 0.6"),
]


def mean_sd(values):
    import statistics

    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def test_mean_command_skips_crash_rows_and_handles_one_run_and_none(program, tmp_path):
    awk = the_command(program, "$1 == c && $2 > 0")
    assert awk.startswith("awk ") and "<commit>" in awk
    (tmp_path / "results.tsv").write_text("\t".join(COLUMNS) + "\n" + "\n".join("\t".join(r) for r in NIGHT) + "\n")
    for commit in ("a1b2c3d", "b2c3d4e", "e5f6071"):
        values = [float(r[1]) for r in NIGHT if r[0] == commit and r[3] != "crash"]
        result = bash(fill(awk, commit=commit), tmp_path)
        assert result.returncode == 0, result.stderr
        m, sd = mean_sd(values)
        assert result.stdout == f"runs {len(values)} mean {m:.6f} sd {sd:.6f}\n", commit
    for commit in ("c3d4e5f", "d4e5f60", "fffffff"):  # only crash rows, or no row at all: a clear line, no nan
        result = bash(fill(awk, commit=commit), tmp_path)
        assert result.returncode == 1 and result.stdout == f"no finished run of {commit}\n"


def test_timeout_command_takes_four_times_the_longest_finished_baseline_run(program, tmp_path):
    command = the_command(program, "logs/<commit>-*.log")
    logs = tmp_path / "logs"
    logs.mkdir()
    summary = "---\nval_bpb:          2.093805\ntraining_seconds: 300.2\ntotal_seconds:    {}\nexit status: 0\n"
    (logs / "a1b2c3d-42.log").write_text("step 00100 | loss: 3.1\nexit status: 124\n")  # killed: no summary
    (logs / "a1b2c3d-43.log").write_text(summary.format("331.7"))
    (logs / "a1b2c3d-44.log").write_text(summary.format("325.9"))
    (logs / "b2c3d4e-42.log").write_text(summary.format("999.0"))  # another commit: not the baseline
    result = bash(fill(command, commit="a1b2c3d"), tmp_path)
    assert result.returncode == 0 and result.stdout == "T = 1327\n"  # 4 * 331.7 = 1326.8, rounded up
    result = bash(fill(command, commit="d4e5f60"), tmp_path)
    assert "no finished run" in result.stdout


def test_setup_creates_results_tsv_and_the_ignored_logs_folder(program, tmp_path):
    make = the_command(program, "> results.tsv")
    result = bash(make, tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "results.tsv").read_text() == "\t".join(COLUMNS) + "\n"
    assert (tmp_path / "logs").is_dir()
    ignored = subprocess.run(["git", "check-ignore", "results.tsv", "run.log", "logs/a1b2c3d-42.log"], cwd=ROOT,
                             capture_output=True, text=True)
    assert ignored.stdout.split() == ["results.tsv", "run.log", "logs/a1b2c3d-42.log"]


def example_rows(program):
    tables = [block for block in fenced_blocks(program) if block.startswith("commit\t")]
    assert tables, "program.md shows no tab-separated results.tsv header"
    for block in tables:
        header, *rows = block.splitlines()
        assert header.split("\t") == COLUMNS
        for row in rows:
            commit, val_bpb, memory_gb, status, description = row.split("\t")
            assert re.fullmatch(r"[0-9a-f]{7}", commit)
            assert re.fullmatch(r"\d\.\d{6}", val_bpb) and re.fullmatch(r"\d+\.\d", memory_gb)
            assert status in ("keep", "discard", "crash") and description
            if status == "crash":
                assert (val_bpb, memory_gb) == ("0.000000", "0.0")
    (example,) = [block for block in tables if len(block.splitlines()) > 3]
    return [line.split("\t") for line in example.splitlines()[1:]]


def test_the_example_follows_the_default_keep_rule(program):
    """Greedy after a three-run baseline: a run is kept when below the best's value (the mean of its runs)."""
    text = " ".join(program.split())
    assert "**Keep** a run whose `val_bpb` is lower than the best's value" in text
    rows = example_rows(program)
    baseline = [r for r in rows if r[4] == "baseline"]
    assert len(baseline) == 3 and {r[3] for r in baseline} == {"keep"} and rows[:3] == baseline
    best = [float(r[1]) for r in baseline]
    seen = {"keep": 0, "discard": 0, "crash": 0}
    for commit, value, _, status, _ in rows[3:]:
        seen[status] += 1
        if status == "crash":
            continue
        expected = "keep" if float(value) < sum(best) / len(best) else "discard"
        assert status == expected, commit
        if status == "keep":
            best = [float(value)]
    assert min(seen.values()) >= 1 and "killed by the timeout" in " ".join(r[4] for r in rows)


def careful(runs, best, noise):
    """Careful mode on one experiment's runs: 'keep', 'discard' or 'again'."""
    import math

    n = len(runs)
    diff = sum(runs) / n - sum(best) / len(best)
    se = noise * math.sqrt(1 / n + 1 / len(best))
    if diff > -1.0 * se:
        return "discard"
    if diff < (-2.5 if n == 1 else -1.5) * se:
        return "keep"
    return "again" if n < 2 else "discard"


def test_careful_mode_is_bench_keep_rules_rule_c(program):
    """The thresholds program.md states are those of rule (c) that bench/keep_rule.py simulates."""
    import importlib.util

    text = " ".join(program.split())
    assert "**Careful mode**, only when the human asks for it" in text
    assert "diff > -1 * se" in text and "diff < -2.5 * se after one run, or diff < -1.5 * se after two" in text
    assert "se = N * sqrt(1/n + 1/n_best)" in text and "the keep stands" in text
    spec = importlib.util.spec_from_file_location("keep_rule", os.path.join(ROOT, "bench", "keep_rule.py"))
    kr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kr)
    c = kr.RuleC()
    assert (c.discard_se, c.keep1_se, c.keep_se, c.max_runs, c.fresh_runs) == (1.0, 2.5, 1.5, 2, 1)
    # the rule as a function, on hand cases (N = 1, best with three runs at 0)
    assert careful([-0.5], [0, 0, 0], 1.0) == "discard"   # se 1.15: not below -1.15
    assert careful([-3.0], [0, 0, 0], 1.0) == "keep"      # below -2.5 * 1.15 = -2.89
    assert careful([-2.0], [0, 0, 0], 1.0) == "again"
    assert careful([-2.0, -1.0], [0, 0, 0], 1.0) == "keep"  # mean -1.5, se 0.91: below -1.37
    assert careful([-2.0, 0.0], [0, 0, 0], 1.0) == "discard"


def test_noise_figures_per_device_are_in_program_md_itself(program):
    text = " ".join(program.split())
    assert "0.0007 on a CUDA GPU, 0.004 on the CPU (0.009 on a machine other jobs share), MPS unmeasured" in text
    assert "bench/" not in program.replace("(simulated in bench/keep_rule.py)", "")


def test_one_device_edit_example_changes_only_that_device(program):
    """The example line exists in train.py with one value, and the edit shown keeps CUDA's value."""
    text = " ".join(program.split())
    before, after = re.search(r"on the CPU, `(\w+ = [^`]+)` becomes `(\w+ = [^`]+)`", text).groups()
    with open(os.path.join(ROOT, "train.py"), encoding="utf-8") as f:
        assert re.search(rf"^{re.escape(before)}\s", f.read(), re.MULTILINE), before
    name = before.split()[0]
    for on_cuda, expected in ((True, before), (False, None)):
        values = {"ON_CUDA": on_cuda}
        exec(after, values)
        if expected:
            old = {}
            exec(before, old)
            assert values[name] == old[name]
        else:
            assert values[name] != eval(before.split("=", 1)[1])


def test_prepare_excerpt_holds_the_constants_and_the_metric_and_little_else(program):
    command = the_command(program, "Constants|Evaluation")
    assert command.startswith("awk ")
    out = bash(command, ROOT).stdout
    assert "TIME_BUDGET = " in out and "MAX_SEQ_LEN = " in out and "def evaluate_bpb(" in out
    assert "def download_data(" not in out and "def train_tokenizer(" not in out and "def make_dataloader(" not in out
    assert len(out.encode()) < 12_000


def cache_dir_of_prepare(monkeypatch, env):
    """Where prepare.py itself puts the cache under this environment (it decides at import time)."""
    import importlib

    import prepare

    original = dict(vars(prepare))
    with monkeypatch.context() as m:
        for name in ("HOME", "AUTORESEARCH_CACHE_DIR"):
            if name in env:
                m.setenv(name, env[name])
            else:
                m.delenv(name, raising=False)
        try:
            return importlib.reload(prepare).CACHE_DIR
        finally:  # put the very same objects back, so other tests never see the reloaded module
            vars(prepare).clear()
            vars(prepare).update(original)


def test_data_check_looks_where_prepare_puts_the_cache(program, tmp_path, monkeypatch):
    (check,) = [c for c in commands(program, "ls") if "AUTORESEARCH_CACHE_DIR" in c]
    home, custom = tmp_path / "home", tmp_path / "custom"
    for cache in (home / ".cache" / "autoresearch", custom):
        (cache / "data").mkdir(parents=True)
        (cache / "tokenizer").mkdir()
        (cache / "data" / "shard_00000.parquet").write_bytes(b"")
        (cache / "tokenizer" / "tokenizer.pkl").write_bytes(b"")
    base = {k: v for k, v in os.environ.items() if k != "AUTORESEARCH_CACHE_DIR"}

    default_env = dict(base, HOME=str(home))
    custom_env = dict(base, AUTORESEARCH_CACHE_DIR=str(custom))
    assert cache_dir_of_prepare(monkeypatch, default_env) == str(home / ".cache" / "autoresearch")
    assert cache_dir_of_prepare(monkeypatch, custom_env) == str(custom)
    for env, cache in ((default_env, home / ".cache" / "autoresearch"), (custom_env, custom)):
        result = bash(check, tmp_path, env=env)
        assert result.returncode == 0, result.stderr
        assert f"{cache}/data:" in result.stdout and "shard_00000.parquet" in result.stdout
        assert f"{cache}/tokenizer:" in result.stdout and "tokenizer.pkl" in result.stdout
    # an empty cache makes the check fail visibly
    result = bash(check, tmp_path, env=dict(base, AUTORESEARCH_CACHE_DIR=str(tmp_path / "empty")))
    assert result.returncode != 0 and "No such file" in result.stderr


def test_says_results_compare_only_on_the_same_device_and_budget(program):
    text = " ".join(program.split())
    assert "Results compare only on the same device and the same time budget" in text
    assert "CPU" in text and "Apple" in text and "NEVER STOP" in text


def test_setup_reading_is_at_most_75_kb(program):
    """Issue 21: program.md plus what its reading list names (README.md, train.py, the prepare.py excerpt)."""
    listed = program.split("**Read the in-scope files**", 1)[1].split("4. **Check the data.**", 1)[0]
    named = set(re.findall(r"^\s+- `([\w.]+)`", listed, re.MULTILINE))
    assert named == {"README.md", "train.py", "prepare.py"}
    excerpt = bash(the_command(program, "Constants|Evaluation"), ROOT).stdout
    sizes = {name: os.path.getsize(os.path.join(ROOT, name)) for name in ("README.md", "train.py")}
    total = len(program.encode()) + sum(sizes.values()) + len(excerpt.encode())
    assert total <= 75_000, (total, sizes)


def test_summary_end_command_shows_the_lines_after_device_and_the_exit_status(program, train_stdout, tmp_path):
    command = the_command(program, "sed -n")
    (tmp_path / "run.log").write_text(train_stdout + "exit status: 0\n")
    out = bash(command, tmp_path).stdout.splitlines()
    real = summary_block(train_stdout)
    after = real[[line.split(":")[0] for line in real].index("device"):]
    assert out == after + ["exit status: 0"]
    (tmp_path / "run.log").write_text("Traceback (most recent call last):\nexit status: 1\n")
    assert bash(command, tmp_path).stdout == ""  # a crash has no summary: tail -c 3000 reads it
