"""
Which clock should the CPU's time budget run on? The unmodified train.py, quiet and busy, per candidate clock.

    uv run bench/budget.py                              # budget 60 s, 2 competing processes, every candidate
    uv run bench/budget.py --budget 30 --only wall,thread-passive --log-dir /tmp/budget_logs

For each candidate the script runs train.py twice in fresh processes, on the data in the autoresearch cache
(AUTORESEARCH_CACHE_DIR): once as the machine is, once with --busy CPU-bound processes (Python busy loops) it
starts itself and stops after the run. A candidate is a budget clock (what hardware.budget_clock returns) and
an OpenMP wait policy (OMP_WAIT_POLICY, set or not before torch starts). The budget is shortened through
prepare.TIME_BUDGET in the driver, the clock replaced as hardware.budget_clock; train.py itself is unchanged.

The table gives steps quiet and busy, their ratio, val_bpb, the run's wall time, and the 1-minute load average
(/proc/loadavg) read just before each run: "quiet" is only as quiet as the machine was. The clock to keep is
the one whose busy/quiet step ratio is nearest 1 without costing steps when quiet. Each run takes the budget
plus startup and evaluation (about 1.5 x the budget, more when busy).
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
}

DRIVER = """
import os, runpy, sys, time
sys.path.insert(0, {root!r})
os.chdir({root!r})
import torch, prepare, hardware  # torch starts here, with this process's OMP_WAIT_POLICY
prepare.TIME_BUDGET = {budget}
hardware.budget_clock = {clock}
print("omp_wait_policy:", os.environ.get("OMP_WAIT_POLICY", "default"), flush=True)
runpy.run_path("train.py", run_name="__main__")
"""

BUSY = "while True: pass"


def run_once(name, budget, busy, log_dir, timeout):
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
    with open(os.path.join(log_dir, f"{name.replace('/', '-per-')}-busy{busy}.log"), "w") as f:
        f.write(text)
    summary = parse_summary(text)
    share = next((line.split()[1] for line in text.splitlines() if line.startswith("cpu_share:")), "-")
    return dict(load=load_before, wall=wall, steps=int(summary.get("num_steps", 0)), val_bpb=summary.get("val_bpb", "-"),
                training=summary.get("training_seconds", "-"), share=share)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--budget", type=float, default=60, help="training budget per run, seconds (default 60)")
    parser.add_argument("--busy", type=int, default=2, help="competing CPU-bound processes when busy (default 2)")
    parser.add_argument("--only", default="", help="comma-separated candidates (default: all of " + ", ".join(CANDIDATES) + ")")
    parser.add_argument("--log-dir", default="/tmp/budget_logs", help="each run's full output goes here")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(CANDIDATES)
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown or args.budget <= 0 or args.busy < 1:
        raise SystemExit(f"unknown candidates {unknown} (known: {', '.join(CANDIDATES)})" if unknown
                         else "--budget must be > 0 and --busy >= 1")
    os.makedirs(args.log_dir, exist_ok=True)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"budget {args.budget:g} s, {args.busy} busy processes when busy, {cores} cores; "
          f"cache {os.environ.get('AUTORESEARCH_CACHE_DIR', '~/.cache/autoresearch')}; {time.strftime('%Y-%m-%d %H:%M')}")
    header = (f"{'candidate':<20} {'load q':>6} {'steps q':>7} {'bpb q':>8} {'wall q':>6} {'share q':>7}   "
              f"{'load b':>6} {'steps b':>7} {'bpb b':>8} {'wall b':>6} {'share b':>7}   {'busy/quiet':>10}")
    print(header, flush=True)
    timeout = 20 * args.budget + 600
    for name in names:
        quiet = run_once(name, args.budget, 0, args.log_dir, timeout)
        busy = run_once(name, args.budget, args.busy, args.log_dir, timeout)
        ratio = busy["steps"] / quiet["steps"] if quiet["steps"] else float("nan")
        print(f"{name:<20} {quiet['load']:>6.2f} {quiet['steps']:>7} {quiet['val_bpb']:>8} {quiet['wall']:>6.0f} "
              f"{quiet['share']:>7}   {busy['load']:>6.2f} {busy['steps']:>7} {busy['val_bpb']:>8} {busy['wall']:>6.0f} "
              f"{busy['share']:>7}   {ratio:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
