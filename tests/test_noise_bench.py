"""bench/noise.py against a fake train.py whose result is a known function of the seed."""

import importlib.util
import os
import statistics

import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("noise", os.path.join(ROOT, "bench", "noise.py"))
noise = importlib.util.module_from_spec(spec)
spec.loader.exec_module(noise)

# val_bpb = 2 + seed / 1000, num_steps = 100 + seed % 3; seed 45 crashes; progress lines use \r like train.py
FAKE_TRAIN = r'''
import os, sys
seed = int(os.environ["AUTORESEARCH_SEED"])
print("step 00001 (1.0%) | loss: 9.0 | epoch: 1 | x\rstep 00002 (2.0%) | loss: 8.0 | epoch: 2 | x", end="")
print()
if seed == 45:
    print("Traceback: boom", file=sys.stderr)
    sys.exit(1)
print("---")
print(f"val_bpb:          {2 + seed / 1000:.6f}")
print("training_seconds: 300.1")
print(f"num_steps:        {100 + seed % 3}")
print("device:           cpu")
'''


def test_parse_summary_takes_the_last_block():
    log = "---\nval_bpb: 9.0\nstep 1\r---\nval_bpb:          2.500000\nnum_steps:        7\ndevice:           cpu\n"
    assert noise.parse_summary(log) == {"val_bpb": "2.500000", "num_steps": "7", "device": "cpu"}
    assert noise.parse_summary("step 00001 | loss: nan\nFAIL\n") == {}


def test_runs_same_and_other_seeds_and_reports_their_spread(tmp_path, capsys):
    train = tmp_path / "train.py"
    train.write_text(FAKE_TRAIN)
    logs = tmp_path / "logs"
    noise.main(["--k", "3", "--seed", "42", "--train", str(train), "--log-dir", str(logs)])
    out = capsys.readouterr().out

    # one log per run, named by kind and seed; the crashed run's log keeps its error
    assert sorted(os.listdir(logs)) == ["other0_seed43.log", "other1_seed44.log", "other2_seed45.log",
                                        "same0_seed42.log", "same1_seed42.log", "same2_seed42.log"]
    assert "boom" in (logs / "other2_seed45.log").read_text()
    # the two kinds alternate
    order = [line.split()[0] for line in out.splitlines() if "seed" in line and "val_bpb" in line]
    assert order == ["same", "other"] * 3

    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith("| ") and "---" not in line}
    # same seed: three identical results
    assert rows["same seed (42)"] == ["3", "2.042000", "0.000000", "2.042000", "2.042000", "0.000000",
                                      "100-100 (100.0)", "0"]
    # other seeds 43, 44 finished, 45 crashed
    std = statistics.stdev([2.043, 2.044])
    assert rows["different seeds"] == ["2", "2.043500", f"{std:.6f}", "2.043000", "2.044000", "0.001000",
                                       "101-102 (101.5)", "1"]
    assert rows["all"][0] == "5" and rows["all"][-1] == "1"
    # the fit over the finished runs (steps 100, 101, 102 for seeds 42, 43, 44) and the repeated data
    fit = noise.steps_fit([dict(val_bpb=2 + s / 1000, num_steps=100 + s % 3) for s in (42, 42, 42, 43, 44)])
    assert f"slope {fit['slope']:+.6f} per step, r {fit['r']:+.2f}" in out
    assert "epoch 2 reached" in out


def test_steps_fit_by_hand():
    line = [dict(val_bpb=2.0 + 0.001 * s, num_steps=s) for s in (200, 220, 250)]
    fit = noise.steps_fit(line + [dict(val_bpb=None, num_steps=None)])
    assert fit["slope"] == pytest.approx(0.001) and fit["r"] == pytest.approx(1.0) and fit["resid_std"] < 1e-9
    # (0, 0), (1, 1), (2, 0), (3, 1): slope 0.2, residuals -0.2, 0.6, -0.6, 0.2 -> std sqrt(0.8 / 2)
    zigzag = noise.steps_fit([dict(val_bpb=float(v), num_steps=s) for s, v in enumerate((0, 1, 0, 1))])
    assert fit is not None and zigzag["slope"] == pytest.approx(0.2)
    assert zigzag["resid_std"] == pytest.approx((0.8 / 2) ** 0.5)
    assert zigzag["r"] == pytest.approx(0.2 * 5 / (5 * 1) ** 0.5)
    assert noise.steps_fit(line[:2]) is None and noise.steps_fit([dict(val_bpb=2.0, num_steps=5)] * 3) is None


def test_describe_matches_statistics():
    runs = [dict(val_bpb=v, num_steps=s) for v, s in [(2.1, 50), (2.3, 54), (2.2, 52), (None, None)]]
    d = noise.describe(runs)
    assert (d["n"], d["crashed"]) == (3, 1)
    assert d["mean"] == pytest.approx(2.2) and d["std"] == pytest.approx(0.1)
    assert d["range"] == pytest.approx(0.2) and (d["steps_min"], d["steps_max"], d["steps_mean"]) == (50, 54, 52)
    assert noise.describe([dict(val_bpb=None, num_steps=None)])["mean"] is None


def test_refuses_no_runs(capsys):
    with pytest.raises(SystemExit) as exit_:
        noise.main(["--k", "0"])
    assert exit_.value.code == 2 and "--k must be at least 1, got 0" in capsys.readouterr().err
