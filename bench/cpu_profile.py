"""
Compare candidate CPU profiles: full train.py runs, side by side, one table.

    uv run bench/cpu_profile.py                        # the default candidates, 300 s each
    uv run bench/cpu_profile.py --time-budget 120 --only d256L4,d128L2
    uv run bench/cpu_profile.py --config "mine:DEPTH=3,TOTAL_BATCH_SIZE=8192"

Each candidate runs train.py's own main() in a fresh process with some module
constants overridden (prepare's MAX_SEQ_LEN / EVAL_TOKENS / TIME_BUDGET and
train's hyperparameters), on the data in the autoresearch cache. Run it on a quiet
machine: the runs measure throughput. val_bpb compares only between candidates
with the same MAX_SEQ_LEN (the metric is computed on sequences of that length).
"""

import argparse
import os
import re
import subprocess
import sys
import time

from noise import parse_summary  # bench/noise.py: the summary block as a dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> overrides of train.py / prepare.py constants, on top of the current CPU profile
# (d128, 4 layers, HEAD_DIM 64, window "L", 4096 tokens/step in batches of 16 rows of MAX_SEQ_LEN 256)
CANDIDATES = {
    "d128L4": {},                                                 # the current profile
    "d256L4": {"ASPECT_RATIO": 64},                               # the profile before issue 23
    "d128L3": {"DEPTH": 3, "ASPECT_RATIO": 42},
    "d128L2": {"DEPTH": 2, "ASPECT_RATIO": 64},
    "d256L2": {"DEPTH": 2, "ASPECT_RATIO": 128},
    "d128L2b8k": {"DEPTH": 2, "ASPECT_RATIO": 64, "TOTAL_BATCH_SIZE": 2**13, "DEVICE_BATCH_SIZE": 32},
    "b8k": {"TOTAL_BATCH_SIZE": 2**13, "DEVICE_BATCH_SIZE": 32},  # 8192 tokens/step
    "b2k": {"TOTAL_BATCH_SIZE": 2**11, "DEVICE_BATCH_SIZE": 8},   # 2048 tokens/step
    "t512": {"MAX_SEQ_LEN": 512, "DEVICE_BATCH_SIZE": 8},
    "compile": {"COMPILE": True},
}

PREPARE_KEYS = {"MAX_SEQ_LEN", "EVAL_TOKENS", "TIME_BUDGET"}

DRIVER = """
import os, sys, time
sys.path.insert(0, {root!r})
os.chdir({root!r})
import train, prepare, torch  # train first: it sets OMP_WAIT_POLICY (and the allocator) before torch starts
overrides = {overrides!r}
for key, value in overrides.items():
    if key == "COMPILE":
        continue
    if key in {prepare_keys!r}:
        setattr(prepare, key, value)
    setattr(train, key, value)
if overrides.get("COMPILE"):
    # what USE_COMPILE=True does at import, applied afterwards
    train.USE_COMPILE = True
    train.WARMUP_STEPS = 11
    train.adamw_step_fused = torch.compile(train.adamw_step_fused, dynamic=False, fullgraph=True)
    train.muon_step_fused = torch.compile(train.muon_step_fused, dynamic=False, fullgraph=True)
print(f"tokens_per_step: {{train.TOTAL_BATCH_SIZE}}")
print(f"warmup_steps: {{train.WARMUP_STEPS}}")
train.main()
"""


def parse_config(text):
    name, _, body = text.partition(":")
    overrides = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        overrides[key.strip()] = eval(value)  # numbers, strings, True
    return name, overrides


def run(name, overrides, time_budget):
    overrides = {"TIME_BUDGET": time_budget, **overrides}
    code = DRIVER.format(root=ROOT, overrides=overrides, prepare_keys=PREPARE_KEYS)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    wall = time.time() - t0
    log_path = os.path.join(ROOT, "bench", f"cpu_profile_{name}.log")
    with open(log_path, "w") as f:
        f.write(proc.stdout.replace("\r", "\n") + proc.stderr)
    summary = parse_summary(proc.stdout)
    summary["tokens_per_step"] = int(re.search(r"tokens_per_step: (\d+)", proc.stdout).group(1)) if summary else 0
    summary["warmup_steps"] = int(re.search(r"warmup_steps: (\d+)", proc.stdout).group(1)) if summary else 0
    epochs = re.findall(r"epoch: (\d+)", proc.stdout)
    summary["epoch"] = epochs[-1] if epochs else "?"
    summary["wall"] = wall
    summary["ok"] = proc.returncode == 0
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--time-budget", type=float, default=300)
    parser.add_argument("--only", default="", help="comma-separated candidate names")
    parser.add_argument("--config", action="append", default=[], help='extra candidate "name:KEY=VALUE,..."')
    args = parser.parse_args()
    candidates = dict(CANDIDATES)
    candidates.update(parse_config(c) for c in args.config)
    names = args.only.split(",") if args.only else list(candidates)
    if args.config and not args.only:
        names = [parse_config(c)[0] for c in args.config]

    import torch
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, time budget {args.time_budget:.0f}s")
    header = f"{'name':<10} {'overrides':<48} {'steps':>6} {'tok/s':>8} {'train_s':>8} {'total_s':>8} {'extra_s':>8} {'val_bpb':>9} {'mem_mb':>8} {'epoch':>5}"
    print(header)
    print("-" * len(header))
    for name in names:
        s = run(name, candidates[name], args.time_budget)
        if not s["ok"]:
            print(f"{name:<10} {str(candidates[name]):<48} FAILED (see bench/cpu_profile_{name}.log)")
            continue
        steps, train_s, total_s = int(s["num_steps"]), float(s["training_seconds"]), float(s["total_seconds"])
        tok_s = (steps - s["warmup_steps"]) * s["tokens_per_step"] / train_s  # warm-up steps are not timed
        print(f"{name:<10} {str(candidates[name]):<48} {steps:>6} {tok_s:>8.0f} {train_s:>8.1f} {total_s:>8.1f} "
              f"{total_s - train_s:>8.1f} {float(s['val_bpb']):>9.6f} {float(s['peak_vram_mb']):>8.0f} {s['epoch']:>5}", flush=True)


if __name__ == "__main__":
    main()
