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


RUN = "timeout 600 uv run train.py > run.log 2>&1"
REPEAT = "AUTORESEARCH_SEED=2 timeout 600 uv run train.py > run.log 2>&1"


def test_train_commands_are_the_ones_that_work(program):
    launches = [s for s in snippets(program) if re.search(r"\b(uv run|python)\b.*train\.py", s)]
    assert set(launches) == {RUN, REPEAT}
    import prepare

    assert 600 == 2 * prepare.TIME_BUDGET  # the timeout is twice the training budget, as program.md says
    assert "twice `TIME_BUDGET`" in program


FAKE_UV = """#!/bin/bash
echo "uv $* seed=${AUTORESEARCH_SEED:-default} cache=${AUTORESEARCH_CACHE_DIR:-unset}"
echo "a warning on stderr" >&2
exit 3
"""


@pytest.mark.parametrize("command, seed", [(RUN, "default"), (REPEAT, "2")])
def test_run_command_as_written_logs_both_streams_and_passes_seed_and_cache(program, tmp_path, command, seed):
    """The run commands, run as written, with a stand-in `uv` first on PATH."""
    assert command in program
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "uv").write_text(FAKE_UV)
    os.chmod(tmp_path / "bin" / "uv", 0o755)
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", AUTORESEARCH_CACHE_DIR="/my/cache")
    env.pop("AUTORESEARCH_SEED", None)
    result = bash(command, tmp_path, env=env)
    assert result.returncode == 3 and result.stdout == result.stderr == ""  # nothing reaches the agent's context
    assert (tmp_path / "run.log").read_text().splitlines() == [
        f"uv run train.py seed={seed} cache=/my/cache", "a warning on stderr"]


def test_timeout_kills_a_run_that_overstays(tmp_path):
    """What `timeout` in the run command does, shortened: the run is killed and the status says so."""
    result = bash("timeout 1 sleep 30 > run.log 2>&1", tmp_path)
    assert result.returncode == 124


def test_summary_block_matches_what_train_py_prints(program, train_stdout):
    real = summary_block(train_stdout)
    shown = [summary_block(block) for block in fenced_blocks(program) if block.lstrip().startswith("---")]
    assert len(shown) == 1, "program.md should show the summary block once"
    shown = shown[0]
    key = lambda line: line.split(":", 1)[0]
    assert [key(line) for line in shown] == [key(line) for line in real]
    assert [key(line) for line in real][-2:] == ["depth", "device"]
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


def test_grep_commands_pull_the_metrics_from_a_real_log(program, train_stdout, tmp_path):
    (tmp_path / "run.log").write_text(train_stdout)
    greps = commands(program, "grep")
    assert 'grep "^val_bpb:\\|^peak_vram_mb:" run.log' in greps
    real = {line.split(":")[0]: line for line in summary_block(train_stdout)}
    for command in greps:
        keys = re.findall(r"\^(\w+):", command)
        assert keys, command
        result = bash(command, tmp_path)
        assert result.returncode == 0, (command, result.stderr)
        out = result.stdout.splitlines()
        assert out == [real[k] for k in keys], command  # each named line exactly once, in log order
        for line in out:
            value = line.split(":", 1)[1].strip()
            assert value in DEVICES if line.startswith("device:") else float(value) > 0


def test_grep_prints_nothing_for_a_crashed_run(program, tmp_path):
    """program.md's crash rule: empty grep output means the run did not finish."""
    (tmp_path / "run.log").write_text("step 00012 (4.0%) | loss: nan\nFAIL\n")
    result = bash('grep "^val_bpb:\\|^peak_vram_mb:" run.log', tmp_path)
    assert 'grep "^val_bpb:\\|^peak_vram_mb:" run.log' in program
    assert result.stdout == ""


def test_crash_reading_command_cannot_flood_the_context(program, tmp_path):
    assert "tail -c 3000 run.log" in commands(program, "tail")
    # a progress history written with \r (one ~100 KB line), then the traceback
    history = "".join(f"\rstep {i:05d} (1.0%) | loss: 3.0 | dt: 300ms" for i in range(3000))
    traceback = "Traceback (most recent call last):\n  File \"train.py\", line 1\nNameError: name 'x' is not defined\n"
    (tmp_path / "run.log").write_text(history + "\n" + traceback)
    out = bash("tail -c 3000 run.log", tmp_path).stdout
    assert len(out.encode()) <= 3000 and out.endswith(traceback)


def test_noise_floor_command_gives_mean_and_sd_of_a_commit(program, tmp_path):
    import statistics

    (awk,) = [c for c in commands(program, "awk") if "<commit>" in c]
    values = ["2.101234", "2.095678", "2.108765"]
    rows = [f"a1b2c3d\t{v}\t3.6\tkeep\tbaseline" for v in values] + ["b2c3d4e\t2.000000\t3.6\tdiscard\tx"]
    (tmp_path / "results.tsv").write_text("\t".join(COLUMNS) + "\n" + "\n".join(rows) + "\n")
    result = bash(awk.replace("<commit>", "a1b2c3d"), tmp_path)
    assert result.returncode == 0, result.stderr
    floats = [float(v) for v in values]
    assert result.stdout.strip() == (f"runs 3 mean {statistics.fmean(floats):.6f} "
                                     f"sd {statistics.stdev(floats):.6f}")


def test_results_tsv_header_is_the_five_columns(program, tmp_path):
    (make,) = [c for c in snippets(program) if "> results.tsv" in c]
    result = bash(make, tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "results.tsv").read_text() == "\t".join(COLUMNS) + "\n"
    # the header shown in the logging section, and the example rows under it
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
    assert any(len(block.splitlines()) > 3 for block in tables), "no example rows"


def decide(runs, best, noise):
    """program.md's keep rule on one experiment's runs: 'keep', 'discard' or 'again'."""
    import math

    n = len(runs)
    diff = sum(runs) / n - sum(best) / len(best)
    se = noise * math.sqrt(1 / n + 1 / len(best))
    if diff > -1.0 * se:
        return "discard"
    if diff < (-2.5 if n == 1 else -1.5) * se:
        return "keep"
    return "again" if n < 2 else "discard"


def test_keep_rule_as_stated_and_the_example_follows_it(program):
    text = " ".join(program.split())
    assert "diff > -1 * se" in text and "diff < -2.5 * se after one run, or diff < -1.5 * se after two" in text
    assert "se = N * sqrt(1/n + 1/n_best)" in text
    (block,) = [b for b in fenced_blocks(program) if b.startswith("commit\t") and len(b.splitlines()) > 3]
    rows = [line.split("\t") for line in block.splitlines()[1:]]
    noise = float(re.search(r"Example \(N = ([0-9.]+)\)", program).group(1))
    groups = []  # consecutive rows of one commit
    for row in rows:
        if groups and groups[-1][0][0] == row[0]:
            groups[-1].append(row)
        else:
            groups.append([row])
    best = [float(r[1]) for r in groups[0]]
    assert len(best) == 3 and {r[3] for r in groups[0]} == {"keep"}
    for group in groups[1:]:
        assert len({r[3] for r in group}) == 1, "the runs of one commit share its status"
        if group[0][3] == "crash":
            continue
        runs = [float(r[1]) for r in group]
        k, verdict = 1, decide(runs[:1], best, noise)
        while verdict == "again":
            k += 1
            verdict = decide(runs[:k], best, noise)
        assert verdict == group[0][3], group
        if verdict == "keep":
            assert len(runs) == k + 1, "a kept commit runs once more"
            best = runs
        else:
            assert len(runs) == k, "no run after a discard"


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
