"""
The noise floor of one train.py: how much val_bpb moves between runs of the same code.

    uv run bench/noise.py                       # K=4 runs with one seed, K=4 with other seeds, 300 s each
    uv run bench/noise.py --k 6 --log-dir /tmp/noise_logs

train.py runs unchanged, in a fresh process per run, with only AUTORESEARCH_SEED
set: K times with --seed (the same initialisation: what differs is the machine,
e.g. how many steps the time budget buys) and K times with seeds seed+1 ..
seed+K (initialisation noise on top). The two kinds alternate, so a change in the
machine's load shows in both. Each run's full log goes to --log-dir; the table
gives val_bpb mean, sample standard deviation and range, and num_steps min/max
per kind. The load average before each run is logged too: a busy machine buys
fewer steps and widens the spread. Run it on a quiet machine (~6 min per run on
the CPU profile). Uses the cache that prepare.py uses (AUTORESEARCH_CACHE_DIR).
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUMMARY_LINE = re.compile(r"^(\w+):\s+(\S+)\s*$")
EPOCH = re.compile(r"\| epoch: (\d+) \|")


def parse_summary(text):
    """The `key: value` lines after the last `---` line of a train.py log, as a dict of strings.

    Returns {} when there is no summary block (the run crashed).
    """
    lines = text.replace("\r", "\n").splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "---"]
    if not starts:
        return {}
    found = (SUMMARY_LINE.match(line) for line in lines[starts[-1] + 1:])
    return {m.group(1): m.group(2) for m in found if m}


def run_once(train_path, seed, log_path, timeout):
    """Run train_path once with AUTORESEARCH_SEED=seed; write its output to log_path.

    Returns a dict: seed, val_bpb (float or None on a crash), num_steps (int or None), epochs (the
    training data's epoch at the last progress line, int or None), wall_s, load (1-minute load
    average before the start), returncode.
    """
    env = dict(os.environ, AUTORESEARCH_SEED=str(seed), PYTHONUNBUFFERED="1")
    load = os.getloadavg()[0]
    t0 = time.time()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run([sys.executable, train_path], cwd=os.path.dirname(train_path), env=env,
                                  stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
            returncode = proc.returncode
        except subprocess.TimeoutExpired:
            returncode = "timeout"
    with open(log_path) as log:
        text = log.read()
    summary, epochs = parse_summary(text), EPOCH.findall(text)
    return dict(seed=seed, epochs=int(epochs[-1]) if epochs else None,
                val_bpb=float(summary["val_bpb"]) if "val_bpb" in summary else None,
                num_steps=int(summary["num_steps"]) if "num_steps" in summary else None,
                wall_s=time.time() - t0, load=load, returncode=returncode)


def describe(runs):
    """Statistics of a list of run dicts (crashed runs are counted, not used).

    Returns a dict: n, crashed, mean, std (sample, ddof 1; 0.0 for one run), min, max, range of val_bpb,
    steps_min, steps_max, steps_mean; the val_bpb entries are None when no run finished.
    """
    ok = [r for r in runs if r["val_bpb"] is not None]
    bpb = [r["val_bpb"] for r in ok]
    steps = [r["num_steps"] for r in ok]
    out = dict(n=len(ok), crashed=len(runs) - len(ok), mean=None, std=None, min=None, max=None, range=None,
               steps_min=None, steps_max=None, steps_mean=None)
    if ok:
        out.update(mean=statistics.fmean(bpb), std=statistics.stdev(bpb) if len(bpb) > 1 else 0.0,
                   min=min(bpb), max=max(bpb), range=max(bpb) - min(bpb),
                   steps_min=min(steps), steps_max=max(steps), steps_mean=statistics.fmean(steps))
    return out


def steps_fit(runs):
    """Least-squares line val_bpb = a + slope * num_steps over the finished runs.

    How much of the spread is the machine (how many steps the budget bought): slope (val_bpb per step),
    r (Pearson correlation) and resid_std (sample std of the residuals, ddof 2: the spread at a fixed
    number of steps). Returns None with fewer than 3 finished runs or a single step count.
    """
    ok = [(r["num_steps"], r["val_bpb"]) for r in runs if r["val_bpb"] is not None]
    if len(ok) < 3 or len({n for n, _ in ok}) < 2:
        return None
    n, v = zip(*ok)
    slope, intercept = statistics.linear_regression(n, v)
    resid = sum((y - intercept - slope * x) ** 2 for x, y in ok)
    r = statistics.correlation(n, v) if len(set(v)) > 1 else 0.0
    return dict(slope=slope, r=r, resid_std=(resid / (len(ok) - 2)) ** 0.5)


def table(kinds):
    """Markdown table, one row per (name, runs) in kinds."""
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines = ["| runs | n | val_bpb mean | std | min | max | range | num_steps min-max (mean) | crashed |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, runs in kinds:
        d = describe(runs)
        steps = "-" if d["steps_min"] is None else f"{d['steps_min']}-{d['steps_max']} ({d['steps_mean']:.1f})"
        lines.append(f"| {name} | {d['n']} | {fmt(d['mean'], '.6f')} | {fmt(d['std'], '.6f')} | "
                     f"{fmt(d['min'], '.6f')} | {fmt(d['max'], '.6f')} | {fmt(d['range'], '.6f')} | {steps} | "
                     f"{d['crashed']} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--k", type=int, default=4, help="runs per kind (default 4)")
    parser.add_argument("--seed", type=int, default=42, help="the repeated seed (default 42, train.py's)")
    parser.add_argument("--train", default=os.path.join(ROOT, "train.py"), help="the train.py to run")
    parser.add_argument("--log-dir", default=os.path.join(ROOT, "bench", "noise_logs"), help="per-run logs")
    parser.add_argument("--timeout", type=float, default=900, help="seconds before a run is killed (default 900)")
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error(f"--k must be at least 1, got {args.k}")
    train_path = os.path.abspath(args.train)
    os.makedirs(args.log_dir, exist_ok=True)

    same, other = [], []
    plan = [(kind, i) for i in range(args.k) for kind in ("same", "other")]  # alternate the two kinds
    for kind, i in plan:
        seed = args.seed if kind == "same" else args.seed + 1 + i
        log_path = os.path.join(args.log_dir, f"{kind}{i}_seed{seed}.log")
        r = run_once(train_path, seed, log_path, args.timeout)
        (same if kind == "same" else other).append(r)
        bpb = "crash" if r["val_bpb"] is None else f"{r['val_bpb']:.6f}"
        print(f"{kind:5s} seed {seed:5d}: val_bpb {bpb} num_steps {r['num_steps']} wall {r['wall_s']:.0f}s "
              f"load-before {r['load']:.2f} rc {r['returncode']} log {log_path}", flush=True)
    print()
    print(table([(f"same seed ({args.seed})", same), ("different seeds", other), ("all", same + other)]))
    fit = steps_fit(same + other)
    if fit:
        print(f"\nval_bpb vs num_steps over all runs: slope {fit['slope']:+.6f} per step, r {fit['r']:+.2f}, "
              f"std at a fixed num_steps {fit['resid_std']:.6f}")
    epochs = max((r["epochs"] for r in same + other if r["epochs"] is not None), default=None)
    if epochs and epochs > 1:
        print(f"The training data repeated (epoch {epochs} reached): more steps can mean more overfitting, "
              "so on this data val_bpb may rise with num_steps.")


if __name__ == "__main__":
    main()
