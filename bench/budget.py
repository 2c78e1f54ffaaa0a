"""
Which clock should the CPU's time budget run on? The unmodified train.py, quiet and busy, per candidate clock.

    uv run bench/budget.py                              # budget 60 s, 2 competing processes, every candidate
    uv run bench/budget.py --budget 30 --only wall,thread-passive --log-dir /tmp/budget_logs
    uv run bench/budget.py --budget 300 --only train.py --sequence qbqq   # the spread under changing load

For each candidate the script runs train.py twice in fresh processes, on the data in the autoresearch cache
(AUTORESEARCH_CACHE_DIR): once as the machine is, once with --busy CPU-bound processes (Python busy loops) it
starts itself and stops after the run. A candidate is a budget clock (what hardware.budget_clock returns) and
an OpenMP wait policy (OMP_WAIT_POLICY, set or not before torch starts). The budget is shortened through
prepare.TIME_BUDGET in the driver, the clock replaced as hardware.budget_clock; train.py itself is unchanged.

The table gives steps quiet and busy, their ratio, val_bpb, the run's wall time, and the 1-minute load average
(/proc/loadavg) read just before each run: "quiet" is only as quiet as the machine was. The clock to keep is
the one whose busy/quiet step ratio is nearest 1 without costing steps when quiet. Each run takes the budget
plus startup and evaluation (about 1.5 x the budget, more when busy).

With --sequence the first candidate runs in the order given (q quiet, b busy), a row per run, then the
spread (max - min) of val_bpb and steps over the quiet runs and over the first three runs: for "qbqq" that is
quiet/busy/quiet against three quiet runs. Its rows also give startup (process start to the training loader,
just before the first step) and evaluation seconds, timed by the driver.
"""

import argparse
import os
import subprocess
import sys
import time

from noise import parse_summary  # bench/noise.py: the summary block as a dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (expression of the budget clock in the driver, OMP_WAIT_POLICY or None for libgomp's default)
CANDIDATES = {
    "wall": ("time.time", None),                                  # the reference's clock
    "wall-passive": ("time.time", "PASSIVE"),                     # does PASSIVE alone cost steps?
    "cpu/threads": ("lambda: time.process_time() / torch.get_num_threads()", None),
    "cpu/threads-passive": ("lambda: time.process_time() / torch.get_num_threads()", "PASSIVE"),
    "thread": ("time.thread_time", None),                         # the main thread's CPU time
    "thread-passive": ("time.thread_time", "PASSIVE"),
    "train.py": ("hardware.budget_clock", "PASSIVE"),             # as shipped: the above, floored at wall / 3
}

DRIVER = """
import os, runpy, sys, time
T0 = time.time()
sys.path.insert(0, {root!r})
os.chdir({root!r})
import torch, prepare, hardware  # torch starts here, with this process's OMP_WAIT_POLICY
prepare.TIME_BUDGET = {budget}
hardware.budget_clock = {clock}
make_dataloader, evaluate_bpb = prepare.make_dataloader, prepare.evaluate_bpb
def timed_loader(*args, **kwargs):  # train.py makes the training loader just before its first step
    if "train" in args:
        print(f"startup_seconds: {{time.time() - T0:.1f}}", flush=True)
    return make_dataloader(*args, **kwargs)
def timed_evaluate(*args, **kwargs):
    t = time.time()
    value = evaluate_bpb(*args, **kwargs)
    print(f"eval_seconds: {{time.time() - t:.1f}}", flush=True)
    return value
prepare.make_dataloader, prepare.evaluate_bpb = timed_loader, timed_evaluate
print("omp_wait_policy:", os.environ.get("OMP_WAIT_POLICY", "default"), flush=True)
runpy.run_path("train.py", run_name="__main__")
"""

BUSY = "while True: pass"


def run_once(name, budget, busy, log_dir, timeout, tag=""):
    """One train.py run under candidate `name` with `busy` competing processes. Returns a dict of the results."""
    clock, policy = CANDIDATES[name]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    env.setdefault("PYTHONUNBUFFERED", "1")
    load_before = os.getloadavg()[0]
    hogs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(busy)]
    t0 = time.time()
    try:
        out = subprocess.run([sys.executable, "-c", DRIVER.format(root=ROOT, budget=budget, clock=clock)], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=timeout)
        text = out.stdout + out.stderr
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode() + "\nTIMEOUT"  # bytes even with text=True (or None)
    finally:
        for hog in hogs:
            hog.kill()
        for hog in hogs:
            hog.wait()
    wall = time.time() - t0
    with open(os.path.join(log_dir, f"{name.replace('/', '-per-')}-busy{busy}{tag}.log"), "w") as f:
        f.write(text)
    summary = parse_summary(text)
    lines = {line.split(":")[0]: line.split()[1] for line in text.splitlines()
             if line.startswith(("cpu_share:", "startup_seconds:", "eval_seconds:"))}
    return dict(load=load_before, wall=wall, steps=int(summary.get("num_steps", 0)), val_bpb=summary.get("val_bpb", "-"),
                training=summary.get("training_seconds", "-"), share=lines.get("cpu_share", "-"),
                startup=lines.get("startup_seconds", "-"), eval=lines.get("eval_seconds", "-"))


def spread(runs):
    """(val_bpb max - min, steps max - min) over runs that finished."""
    bpbs = [float(r["val_bpb"]) for r in runs if r["val_bpb"] != "-"]
    steps = [r["steps"] for r in runs]
    return (max(bpbs) - min(bpbs) if bpbs else float("nan")), max(steps) - min(steps)


def run_sequence(name, args, timeout):
    """Run candidate `name` in the order of args.sequence; print a row per run, then the spreads."""
    print(f"candidate {name}, sequence {args.sequence}")
    print(f"{'run':>3} {'load':>6} {'steps':>6} {'val_bpb':>9} {'wall':>6} {'share':>6} {'startup':>7} {'eval':>6}", flush=True)
    runs = []
    for i, kind in enumerate(args.sequence):
        r = run_once(name, args.budget, args.busy if kind == "b" else 0, args.log_dir, timeout, tag=f"-{i}")
        runs.append(r)
        print(f"{i}{kind:>2} {r['load']:>6.2f} {r['steps']:>6} {r['val_bpb']:>9} {r['wall']:>6.0f} {r['share']:>6} "
              f"{r['startup']:>7} {r['eval']:>6}", flush=True)
    quiet, busy = [r for r, k in zip(runs, args.sequence) if k == "q"], [r for r, k in zip(runs, args.sequence) if k == "b"]
    first = runs[:3]
    if len(quiet) >= 2:
        print(f"quiet runs ({len(quiet)}): val_bpb spread {spread(quiet)[0]:.4f}, steps spread {spread(quiet)[1]}")
    print(f"first {len(first)} runs ({args.sequence[:3]}): val_bpb spread {spread(first)[0]:.4f}, steps spread {spread(first)[1]}")
    if len(quiet) >= 2 and len(first) == 3:
        print(f"spread ratio (first three / quiet): val_bpb {spread(first)[0] / max(spread(quiet)[0], 1e-9):.2f}")
    if quiet and busy:
        q, b = sum(r["steps"] for r in quiet) / len(quiet), sum(r["steps"] for r in busy) / len(busy)
        print(f"busy/quiet steps: {b:.1f} / {q:.1f} = {b / q:.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--budget", type=float, default=60, help="training budget per run, seconds (default 60)")
    parser.add_argument("--busy", type=int, default=2, help="competing CPU-bound processes when busy (default 2)")
    parser.add_argument("--only", default="", help="comma-separated candidates (default: all of " + ", ".join(CANDIDATES) + ")")
    parser.add_argument("--log-dir", default="/tmp/budget_logs", help="each run's full output goes here")
    parser.add_argument("--sequence", default="", help='run the first candidate in this order of quiet (q) and busy '
                        '(b) runs, e.g. "qbqq", and print the spreads')
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(CANDIDATES)
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown or args.budget <= 0 or args.busy < 1 or set(args.sequence) - set("qb"):
        raise SystemExit(f"unknown candidates {unknown} (known: {', '.join(CANDIDATES)})" if unknown
                         else "--sequence takes only q and b" if set(args.sequence) - set("qb")
                         else "--budget must be > 0 and --busy >= 1")
    os.makedirs(args.log_dir, exist_ok=True)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"budget {args.budget:g} s, {args.busy} busy processes when busy, {cores} cores; "
          f"cache {os.environ.get('AUTORESEARCH_CACHE_DIR', '~/.cache/autoresearch')}; {time.strftime('%Y-%m-%d %H:%M')}")
    timeout = 20 * args.budget + 600
    if args.sequence:
        return run_sequence(names[0], args, timeout)
    header = (f"{'candidate':<20} {'load q':>6} {'steps q':>7} {'bpb q':>8} {'wall q':>6} {'share q':>7}   "
              f"{'load b':>6} {'steps b':>7} {'bpb b':>8} {'wall b':>6} {'share b':>7}   {'busy/quiet':>10}")
    print(header, flush=True)
    for name in names:
        quiet = run_once(name, args.budget, 0, args.log_dir, timeout)
        busy = run_once(name, args.budget, args.busy, args.log_dir, timeout)
        ratio = busy["steps"] / quiet["steps"] if quiet["steps"] else float("nan")
        print(f"{name:<20} {quiet['load']:>6.2f} {quiet['steps']:>7} {quiet['val_bpb']:>8} {quiet['wall']:>6.0f} "
              f"{quiet['share']:>7}   {busy['load']:>6.2f} {busy['steps']:>7} {busy['val_bpb']:>8} {busy['wall']:>6.0f} "
              f"{busy['share']:>7}   {ratio:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
