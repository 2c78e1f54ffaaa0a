"""bench/keep_rule.py: the simulated rules do what they say (zero noise, hand cases, invariants)."""

import importlib.util
import itertools
import os

import numpy as np
import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("keep_rule", os.path.join(ROOT, "bench", "keep_rule.py"))
kr = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kr)

RULES = [kr.rule_greedy, kr.rule_bootstrap, kr.RuleC()]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dist", ["typical", "many"])
def test_without_noise_every_rule_keeps_exactly_the_helpful_ideas(rule, dist):
    loop = kr.simulate(rule, 0.0, kr.EFFECTS[dist], 0.001, reps=300, seed=1)
    assert loop.false_keeps.sum() == 0
    assert (loop.keeps == loop.helpful_decided).all()
    assert loop.keeps.sum() > 0


@pytest.mark.parametrize("rule", RULES)
def test_invariants_with_noise(rule):
    loop = kr.simulate(rule, 0.004, kr.EFFECTS["typical"], 0.005, reps=300, seed=2)
    assert (loop.runs == kr.BUDGET).all()
    assert (loop.false_keeps <= loop.keeps).all() and (loop.keeps <= loop.decisions).all()
    assert (loop.decisions <= kr.BUDGET).all()
    s = kr.summarise(loop)
    assert 0 <= s["false_keep_share"] <= 1 and s["runs_per_decision"] >= 1
    # the same seed gives the same result
    again = kr.simulate(rule, 0.004, kr.EFFECTS["typical"], 0.005, reps=300, seed=2)
    assert np.array_equal(loop.mu, again.mu)


def fixed(effect):
    return lambda size: np.full(size, effect)


def run_fixed(rule, effect):
    loop = kr.Loop(4, 0.0, fixed(effect), np.random.default_rng(0))
    rule(loop)
    return loop


def test_runs_per_idea_by_hand():
    # (a): one baseline run, then one run per idea
    assert (run_fixed(kr.rule_greedy, 1.0).decisions == 99).all()
    assert (run_fixed(kr.rule_greedy, -1.0).mu == -99.0).all()
    # (b): three baseline runs; a worse first run fails fast, a better idea takes three runs (32 decided, 1 run left)
    assert (run_fixed(kr.rule_bootstrap, 1.0).decisions == 97).all()
    helpful = run_fixed(kr.rule_bootstrap, -1.0)
    assert (helpful.decisions == 32).all() and (helpful.mu == -32.0).all()
    # (c): three baseline runs; without noise every idea is clear after one run; a kept one runs once more
    assert (run_fixed(kr.RuleC(), 1.0).decisions == 97).all()
    assert (run_fixed(kr.RuleC(), -1.0).mu == -49.0).all()  # 97 runs: 48 x (idea, re-run) + 1 idea


def test_rule_c_runs_an_ambiguous_idea_twice():
    """sigma 1 and an idea that always measures 1.5 below the best: 1.5 > 2.5 se after one run, so it runs again."""
    loop = kr.Loop(1, 1.0, fixed(-1.5), np.random.default_rng(0))
    loop.rng = type("NoNoise", (), {"standard_normal": staticmethod(lambda n: np.zeros(n))})()
    kr.RuleC()(loop)
    # baseline 3 runs; each idea: run 1 (diff -1.5, se 1.15: ambiguous), run 2 (se 0.91: -1.5 < -1.37, keep),
    # then one more run of the new best (3 runs again); 97 runs = 32 ideas of 3 runs + 1
    assert loop.keeps[0] == 32 and loop.runs[0] == 100 and loop.decisions[0] == 32


def bootstrap_naive(idea, best):
    pairs = [(np.mean([idea[i] for i in a]), np.mean([best[j] for j in b]))
             for a in itertools.product(range(3), repeat=3) for b in itertools.product(range(3), repeat=3)]
    return sum(mi < mb for mi, mb in pairs) / len(pairs)


def test_bootstrap_is_the_exact_resampling_distribution():
    rng = np.random.default_rng(3)
    idea, best = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    got = kr.bootstrap_p_better(idea, best)
    assert got == pytest.approx([bootstrap_naive(i, b) for i, b in zip(idea, best)])
    assert kr.bootstrap_p_better(np.array([[0.0, 0.1, 0.2]]), np.array([[1.0, 1.1, 1.2]]))[0] == 1.0


def test_effect_distribution_shares_and_means():
    rng = np.random.default_rng(4)
    d = kr.draw_effects(rng, kr.EFFECTS["typical"], 0.001, 200_000)
    assert (d < 0).mean() == pytest.approx(0.20, abs=0.005)
    assert -d[d < 0].mean() == pytest.approx(0.001, rel=0.02) and d[d > 0].mean() == pytest.approx(0.002, rel=0.02)


def test_ideal_bound_respects_the_false_keep_limit():
    gain, false, cost, _ = kr.ideal_bound(0.0005, kr.EFFECTS["typical"], 0.001, ideas=50_000)
    assert false <= 0.05 and 1 <= cost <= 2 and gain > 0
