"""What train.py's main() does with the pieces it calls, run in-process on the CPU with a tiny model:
the LR, momentum and weight-decay schedules reach the optimizer's groups at every step, gradients are cleared
between steps, and the time budget counts the right steps.

The clock is simulated: synchronize() (called just before a step's start time is read and just before its end
time is read) advances a fake clock by DT seconds, read both as time.time() and as the budget's clock
(hardware.budget_clock), so every step lasts exactly DT and the number of steps a budget buys is known in
advance. Nothing here is timed.
"""

import gc
import time as real_time

import pytest
import torch

import prepare
import train

DT = 0.5  # simulated seconds per step


class FakeClock:
    """Stands in for the time module inside train.py: time() reads a counter that only tick() moves."""

    def __init__(self):
        self.now = 1000.0

    def time(self):
        return self.now

    def tick(self):
        self.now += DT  # one synchronize() falls between a step's start time and its end time

    def __getattr__(self, name):  # anything else (sleep, perf_counter, ...) from the real module
        return getattr(real_time, name)


def run_main(monkeypatch, capsys, budget, batches=None, warmup_steps=0):
    """main() with a 1-layer model on 32-token rows, float32, the simulated clock and `budget` seconds;
    warmup_steps: 0 as on CPU and MPS, 11 as on CUDA (where the first steps compile).

    batches: an iterator to use instead of the training loader. Returns (stdout, summary dict).
    """
    clock = FakeClock()
    monkeypatch.setattr(train, "time", clock)
    monkeypatch.setattr(train, "budget_clock", clock.time)
    monkeypatch.setattr(train, "synchronize", clock.tick)
    monkeypatch.setattr(train, "WARMUP_STEPS", warmup_steps)
    for name, value in dict(DEPTH=1, ASPECT_RATIO=64, HEAD_DIM=64, MAX_SEQ_LEN=32, DEVICE_BATCH_SIZE=2,
                            TOTAL_BATCH_SIZE=4 * 32, TIME_BUDGET=budget).items():
        monkeypatch.setattr(train, name, value)
    monkeypatch.setattr(prepare, "MAX_SEQ_LEN", 32)
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 2 * 32 * 2)
    if batches is not None:
        monkeypatch.setattr(train, "make_dataloader", lambda *args, **kwargs: batches)
    try:
        train.main()
    finally:  # main() freezes and disables the garbage collector for the rest of its process
        gc.enable()
        gc.unfreeze()
    out = capsys.readouterr().out
    summary = {k: v.strip() for k, v in (line.split(":", 1) for line in out[out.rindex("---\n") + 4:].splitlines())}
    return out, summary


def test_schedules_reach_the_optimizer_groups(cache, monkeypatch, capsys):
    """At every step each group's lr is its initial lr times get_lr_multiplier's answer for that step, and
    Muon's momentum and weight decay follow their schedules: the values the optimizer actually steps with."""
    schedule, seen = [], []  # (progress, multiplier) as main() asked for them; the groups as the optimizer saw them
    real_multiplier = train.get_lr_multiplier
    monkeypatch.setattr(train, "get_lr_multiplier",
                        lambda progress: schedule.append((progress, real_multiplier(progress))) or schedule[-1][1])
    real_step = train.MuonAdamW.step

    def spy(self):
        seen.append([(g["lr"] / g["initial_lr"], g.get("momentum"), g["weight_decay"], g["kind"]) for g in self.param_groups])
        return real_step(self)

    monkeypatch.setattr(train.MuonAdamW, "step", spy)
    _, summary = run_main(monkeypatch, capsys, budget=8 * DT, warmup_steps=11)
    steps = int(summary["num_steps"])
    assert len(seen) == len(schedule) == steps
    assert min(lrm for _, lrm in schedule) < 0.5  # deep into the warmdown, so a constant lr would be caught
    for step, (groups, (progress, lrm)) in enumerate(zip(seen, schedule)):
        for ratio, momentum, wd, kind in groups:
            assert ratio == pytest.approx(lrm, rel=1e-12), (step, kind)
            if kind == "muon":
                assert momentum == pytest.approx(train.get_muon_momentum(step))
                assert wd == pytest.approx(train.get_weight_decay(progress))


def test_gradients_are_cleared_between_steps(cache, monkeypatch, capsys):
    """With the same batch every time and an optimizer that changes nothing, every step must hand the optimizer
    the same gradients: gradients left over from the previous step would add up (step k would see k + 1 times)."""
    x = torch.randint(0, 200, (2, 32))
    batches = iter(lambda: (x, x.roll(-1, dims=1), 1), None)
    grads = []
    monkeypatch.setattr(train.MuonAdamW, "step", lambda self: grads.append(self.param_groups[0]["params"][0].grad.clone()))
    _, summary = run_main(monkeypatch, capsys, budget=3 * DT, batches=batches)
    assert len(grads) == int(summary["num_steps"]) == 3
    assert grads[0].abs().sum() > 0
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=1e-5, atol=0)


@pytest.mark.parametrize("warmup_steps", [0, 11])
def test_budget_counts_steps_after_the_warm_up(cache, monkeypatch, capsys, warmup_steps):
    """Each step lasts DT simulated seconds: a budget of 4 * DT buys 4 counted steps after the uncounted warm-up
    steps (11 on CUDA, none on CPU), and training_seconds reports the counted time only."""
    _, summary = run_main(monkeypatch, capsys, budget=4 * DT, warmup_steps=warmup_steps)
    assert int(summary["num_steps"]) == warmup_steps + 4
    assert float(summary["training_seconds"]) == pytest.approx(4 * DT, abs=0.05)


def test_warm_up_steps_only_where_something_compiles():
    """The steps outside the budget exist for torch.compile: 11 where train.py compiles (CUDA), none here."""
    assert (train.USE_COMPILE, train.WARMUP_STEPS) == (False, 0)
