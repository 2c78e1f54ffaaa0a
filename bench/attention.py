"""Time forward + backward of each attention backend that can run here, through hardware.FlashAttention.

    python bench/attention.py           # the reference shape: B 128, T 2048, 4 heads of 128, windows 2048 and 1024
    python bench/attention.py --small   # B 2, T 256, 2 heads of 64, windows 256 and 128: minutes on a CPU

On CUDA the inputs are bf16 and timed with CUDA events; elsewhere float32 and wall-clock time.
FLOP convention: the exact number of attended (query, key) pairs for causal attention with window w
(query i sees keys max(0, i - w) .. i), times 4 * D per pair and head for the forward (Q K^T and P V, 2 each),
times 3.5 for forward + backward (the backward counted as 2.5 forwards, as FlashAttention does).
The ratio column is each backend's time over the fastest backend's at that window.
"""

import argparse
import datetime
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import hardware  # noqa: E402

warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")  # eager flex on CPU


def attended_pairs(T, window):
    """Number of (query, key) pairs with 0 <= i - j <= window, for 0 <= j <= i < T."""
    full = min(window, T - 1) + 1  # queries from this index on see window + 1 keys
    return sum(range(1, full + 1)) + (T - full) * full


def attention_flops(B, T, H, D, window):
    """Forward + backward FLOPs of one attention call (see the module docstring for the convention)."""
    return 3.5 * 4 * D * B * H * attended_pairs(T, window)


def available_backends():
    """[(name, FlashAttention or the reason it cannot run)] for fa3, flex and sdpa on this machine."""
    fa3 = hardware.fa3.fa3
    fa3_reason = f"needs CUDA, this is {hardware.DEVICE_TYPE}"
    if hardware.ON_CUDA and fa3 is None:
        fa3, fa3_reason = hardware.load_fa3(hardware.CAPABILITY, hardware.IS_ROCM)
    fa3_backend = hardware.FlashAttention("fa3", fa3) if fa3 is not None else fa3_reason
    return [("fa3", fa3_backend), ("flex", hardware.FlashAttention("flex")), ("sdpa", hardware.FlashAttention("sdpa"))]


def time_backend(attention, q, k, v, dy, window, warmup, iters):
    """Mean milliseconds of attention forward + backward for one backend (a hardware.FlashAttention)."""
    attention.build_masks(q.size(1), [window], hardware.DEVICE_TYPE)

    def step():
        y = attention.flash_attn_func(q, k, v, causal=True, window_size=(window, 0))
        torch.autograd.grad(y, (q, k, v), dy)

    for _ in range(warmup):  # compiles flex on the first call
        step()
    if hardware.ON_CUDA:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - t0) * 1000 / iters


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="B 2, T 256, 2 heads of 64 (for a CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per backend (default 5, --small 1)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per backend (default 20, --small 3)")
    args = parser.parse_args()
    B, T, H, D = (2, 256, 2, 64) if args.small else (128, 2048, 4, 128)
    windows = [T, T // 2]  # the model's L and S layers
    warmup = args.warmup if args.warmup is not None else (1 if args.small else 5)
    iters = args.iters if args.iters is not None else (3 if args.small else 20)
    device, dtype = hardware.DEVICE_TYPE, torch.bfloat16 if hardware.ON_CUDA else torch.float32
    name = torch.cuda.get_device_name() if hardware.ON_CUDA else f"{device} ({os.cpu_count()} cores)"
    print(f"attention forward + backward: B {B}, T {T}, {H} heads of {D}, {str(dtype)[6:]}, {warmup} warm-up + "
          f"{iters} timed calls; {name}; torch {torch.__version__}; {datetime.date.today()}")

    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, generator=gen, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    dy = torch.randn(B, T, H, D, generator=gen, device=device, dtype=dtype)
    backends = available_backends()
    print(f"{'window':>6}  {'backend':<7} {'ms':>9} {'TFLOP/s':>8} {'/fastest':>8}")
    for window in windows:
        results = {}  # backend -> milliseconds, or the reason it did not run
        for backend, attention in backends:
            try:
                results[backend] = attention if isinstance(attention, str) else time_backend(attention, q, k, v, dy, window, warmup, iters)
            except Exception as e:  # e.g. a kernel without support for this GPU
                results[backend] = " ".join(f"{type(e).__name__}: {e}".split())[:160]
        fastest = min((ms for ms in results.values() if not isinstance(ms, str)), default=None)
        for backend, ms in results.items():
            if isinstance(ms, str):
                print(f"{window:>6}  {backend:<7} {'-':>9} {'-':>8} {'-':>8}  ({ms})")
            else:
                tflops = attention_flops(B, T, H, D, window) / (ms / 1000) / 1e12
                print(f"{window:>6}  {backend:<7} {ms:>9.2f} {tflops:>8.3g} {ms / fastest:>8.2f}")

if __name__ == "__main__":
    main()
