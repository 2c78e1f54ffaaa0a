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


def test_train_command_is_the_one_that_works(program):
    launches = [s for s in snippets(program) if re.search(r"\b(uv run|python)\b.*train\.py", s)]
    assert set(launches) == {"uv run train.py > run.log 2>&1"}


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


def test_tail_command_shows_the_end_of_the_log(program, tmp_path):
    assert "tail -n 50 run.log" in commands(program, "tail")
    (tmp_path / "run.log").write_text("".join(f"line {i}\n" for i in range(200)))
    assert bash("tail -n 50 run.log", tmp_path).stdout.splitlines() == [f"line {i}" for i in range(150, 200)]


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
