"""
The hardware layer of train.py (fixed: the agent does not edit this file).

    from hardware import ON_CUDA, fa3, select_precision, ...

What differs between CUDA, MPS and CPU lives here, so that train.py holds only what is researched: the device
and its capability, the precision, the attention kernel (Flash Attention 3 where it runs, else FlexAttention or
SDPA behind FA3's own call), the memory fit of the batch, the clock the time budget runs on and the load the run
saw, peak FLOP/s for MFU, the `platform:` tag, and the CPU allocator setting. prepare.py decides the device
(AUTORESEARCH_DEVICE); this module reads it.
"""

import ctypes
import importlib.util
import os
import platform
import re
import resource
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from prepare import DEVICE_REASON, DEVICE_TYPE  # noqa: F401  (DEVICE_REASON: for train.py's `Device:` line)

# ---------------------------------------------------------------------------
# Device and precision
# ---------------------------------------------------------------------------

ON_CUDA = DEVICE_TYPE == "cuda"  # NVIDIA, or AMD under ROCm (torch calls both "cuda")
IS_ROCM = ON_CUDA and torch.version.hip is not None
CAPABILITY = torch.cuda.get_device_capability() if ON_CUDA else None  # (major, minor), e.g. (9, 0) on H100


def select_amp_dtype(capability):
    """The autocast dtype for a GPU of this compute capability (None: not CUDA, float32 until measured).

    bf16 from Ampere (8.0) on, as the reference. Older GPUs (T4, V100, RTX 20xx) have no bf16 tensor cores
    and emulate it slowly: fp16 with dynamic loss scaling there.
    """
    if capability is None:
        return torch.float32
    return torch.bfloat16 if capability >= (8, 0) else torch.float16


PRECISION_NAMES = {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast, dynamic loss scaling",
                   torch.float32: "float32"}
BF16_MIN_SPEEDUP = 1.5  # bf16 autocast on a CPU only where its matmuls run at least this much faster


def bf16_matmul_speedup(model_dim, rows=256, max_seconds=0.5):
    """How many times faster this CPU multiplies in bf16 than in float32, at the model's MLP shape:
    (rows, model_dim) @ (model_dim, 4 * model_dim), the best of three timed calls per dtype after one untimed.

    CPUs with bf16 units (AMX, AVX512-BF16, Arm BF16) run these 3-5x faster in bf16; CPUs without them convert
    in software, 10-100x slower. bf16 stops after max_seconds of calls, so that the slow case costs a fraction
    of a second. Returns (speedup, float32 seconds, bf16 seconds) per call.
    """
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, model_dim, generator=gen), torch.randn(model_dim, 4 * model_dim, generator=gen)
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = x.to(dtype), w.to(dtype)
        start, times = time.perf_counter(), []
        for _ in range(4):
            t0 = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t0)
            if time.perf_counter() - start > max_seconds:
                break
        best[dtype] = min(times[1:] or times)  # the first call packs the weights: untimed where there is a second
    return best[torch.float32] / best[torch.bfloat16], best[torch.float32], best[torch.bfloat16]


def select_precision(model_dim, probe=bf16_matmul_speedup):
    """The autocast dtype and the `precision:` line's text (which and why), e.g. "bf16 autocast (compute
    capability 9.0)" or "float32 (bf16 matmul 24x slower than float32 on this CPU: ...)".

    CUDA: select_amp_dtype. MPS: float32. CPU: bf16 autocast where probe(model_dim) (bf16_matmul_speedup)
    measures bf16 at least BF16_MIN_SPEEDUP times faster, else float32. AUTORESEARCH_PRECISION=bf16|fp32 forces
    one. Raises SystemExit (one line) for another value, or a forced bf16 that this device cannot compute.
    """
    forced = os.environ.get("AUTORESEARCH_PRECISION", "").strip().lower()
    if forced not in ("", "bf16", "fp32"):
        raise SystemExit(f"AUTORESEARCH_PRECISION={forced!r}: expected bf16 or fp32")
    if forced == "bf16":
        try:
            x = torch.ones(2, 2, dtype=torch.bfloat16, device=DEVICE_TYPE)
            x @ x
        except Exception as e:  # e.g. MPS before macOS 14
            raise SystemExit(" ".join(f"AUTORESEARCH_PRECISION=bf16: this {DEVICE_TYPE} cannot compute in bf16 "
                                      f"({type(e).__name__}: {e})".split())[:300])
    if forced:
        dtype = torch.bfloat16 if forced == "bf16" else torch.float32
        return dtype, f"{PRECISION_NAMES[dtype]} (forced by AUTORESEARCH_PRECISION)"
    if ON_CUDA:
        dtype = select_amp_dtype(CAPABILITY)
        return dtype, f"{PRECISION_NAMES[dtype]} (compute capability {CAPABILITY[0]}.{CAPABILITY[1]})"
    if DEVICE_TYPE != "cpu":
        return torch.float32, f"float32 (default on {DEVICE_TYPE})"
    speedup, fp32_s, bf16_s = probe(model_dim)
    dtype = torch.bfloat16 if speedup >= BF16_MIN_SPEEDUP else torch.float32
    ratio = f"{speedup:.1f}x faster" if speedup >= 1 else f"{1 / speedup:.0f}x slower"
    return dtype, (f"{PRECISION_NAMES[dtype]} (bf16 matmul {ratio} than float32 on this CPU: "
                   f"{bf16_s * 1e3:.1f} vs {fp32_s * 1e3:.1f} ms at width {model_dim})")


if DEVICE_TYPE == "cpu" and sys.platform == "linux":
    # glibc gives every freed block over 32 MB (one step's logits are 134 MB) back to the kernel, so each step
    # page-faults its activations in again: 40% of the CPU time went to the kernel. Keep them in the heap.
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: large blocks from the heap, not mmap
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: never shrink the heap
    except (OSError, AttributeError):  # not glibc
        pass


# ---------------------------------------------------------------------------
# Peak FLOP/s (MFU) and the platform line
# ---------------------------------------------------------------------------

# Peak dense (not sparse) tensor FLOP/s for MFU, per autocast dtype: (name, bf16, fp16), None where the GPU
# has no tensor cores for that dtype. Matched as a whole word, ignoring case, in torch.cuda.get_device_name(),
# first match wins, so the more specific names come first. Sources: NVIDIA's datasheets and architecture
# whitepapers (half the "with sparsity" figures; GeForce cards at the FP32-accumulate rate that PyTorch's
# matmuls use) and AMD's Instinct datasheets. torch sees each of an MI250X/MI250's two dies as one device,
# so those rows are per die (half the card's figure).
PEAK_FLOPS = [
    # NVIDIA data centre: Blackwell, Hopper, Ada, Ampere, Volta, Turing
    ("GB200", 2500e12, 2500e12), ("B200", 2250e12, 2250e12), ("B100", 1750e12, 1750e12),
    ("GH200", 989.5e12, 989.5e12), ("H200 NVL", 835.5e12, 835.5e12), ("H200", 989.5e12, 989.5e12),
    ("H100 NVL", 835.5e12, 835.5e12), ("H100 PCIe", 756.5e12, 756.5e12), ("H100", 989.5e12, 989.5e12),
    ("L40S", 362.05e12, 362.05e12), ("L40", 181.05e12, 181.05e12), ("L4", 121e12, 121e12),
    ("A100", 312e12, 312e12), ("A10G", 70e12, 70e12),  # A10G (AWS only): no NVIDIA datasheet; the usual figure
    ("A10", 125e12, 125e12),
    ("V100S", None, 130e12), ("V100-PCIE", None, 112e12), ("V100", None, 125e12), ("T4", None, 65e12),
    # NVIDIA workstation and GeForce
    ("RTX 6000 Ada", 364.25e12, 364.25e12), ("A6000", 154.8e12, 154.8e12),
    ("RTX 5090", 209.5e12, 209.5e12), ("RTX 5080", 112.6e12, 112.6e12),
    ("RTX 4090 D", 147.1e12, 147.1e12), ("RTX 4090", 165.2e12, 165.2e12), ("RTX 4080", 97.5e12, 97.5e12),
    ("RTX 3090 Ti", 80e12, 80e12), ("RTX 3090", 71e12, 71e12), ("RTX 3080", 59.5e12, 59.5e12),
    # AMD Instinct
    ("MI325X", 1307.4e12, 1307.4e12), ("MI300X", 1307.4e12, 1307.4e12),
    ("MI250X", 191.5e12, 191.5e12), ("MI250", 181.05e12, 181.05e12), ("MI210", 181.0e12, 181.0e12),
]


def peak_flops_for(name, dtype):
    """Peak dense FLOP/s of the GPU called `name` (torch.cuda.get_device_name()) computing in `dtype`
    (torch.bfloat16 or torch.float16); 0.0 if the GPU is not in PEAK_FLOPS or has no tensor cores for dtype."""
    column = {torch.bfloat16: 1, torch.float16: 2}.get(dtype)
    row = next((row for row in PEAK_FLOPS if re.search(rf"\b{re.escape(row[0])}\b", name, re.IGNORECASE)), None)
    return (row[column] or 0.0) if row and column else 0.0


def get_peak_flops(dtype):
    """Peak FLOP/s of this device computing in dtype (the autocast dtype), for MFU; 0 (no MFU) on CPU, MPS,
    unknown GPUs and float32. Prints one line for a GPU not in PEAK_FLOPS."""
    if not ON_CUDA or dtype not in (torch.bfloat16, torch.float16):
        return 0.0
    name = torch.cuda.get_device_name()
    flops = peak_flops_for(name, dtype)
    if not flops:
        print(f"Unknown GPU {name!r}: MFU is reported as 0 (add its peak FLOP/s to PEAK_FLOPS)")
    return flops


PLATFORM_SLUG_MAX = 40
PLATFORM_NOISE = re.compile(r"\((r|tm|c)\)|\b(nvidia|geforce|tesla|cpu|processor|\d+-core)\b|@.*$", re.IGNORECASE)


def platform_slug(device_type, name, cores=None):
    """The canonical tag of a device, for the `platform:` line and the hub: lowercase [a-z0-9.-], at most
    PLATFORM_SLUG_MAX characters, the same on every machine of one kind.

    device_type: "cuda", "mps" or "cpu"; name: the GPU's name (torch.cuda.get_device_name()), the chip's
    (Apple), or the CPU's model name; cores: the CPU cores this process may use (CPU only). Words that tell no
    two devices apart are dropped (NVIDIA, GeForce, Tesla, (R), (TM), CPU, Processor, N-Core, "@ <clock>"); a
    name too long loses whole words from its end. Examples: "NVIDIA H100 80GB HBM3" -> "h100-80gb-hbm3",
    "Apple M2 Max" on MPS -> "apple-m2-max", "AMD EPYC" on CPU with 2 cores -> "cpu-amd-epyc-2c".
    """
    slug = re.sub(r"[^a-z0-9.]+", "-", PLATFORM_NOISE.sub(" ", name).lower()).strip("-.")
    prefix, suffix = ("cpu-", f"-{cores}c") if device_type == "cpu" else ("", "")
    room = PLATFORM_SLUG_MAX - len(prefix) - len(suffix)
    if len(slug) > room:  # whole words from the end, or the first word cut if it alone is too long
        slug = slug[:room + 1].rsplit("-", 1)[0] if "-" in slug[:room + 1] else slug[:room]
    return prefix + (slug.strip("-.") or ("unknown" if prefix else device_type)) + suffix


def usable_cores():
    """The number of CPU cores this process may use (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def platform_name():
    """This device's platform_slug: the GPU's name on CUDA, the chip's on MPS, else the CPU model and the
    number of cores this process may use."""
    if ON_CUDA:
        return platform_slug("cuda", torch.cuda.get_device_name())
    name = platform.processor() or platform.machine()
    try:
        if sys.platform == "linux":
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1] for line in f if line.startswith("model name"))
        elif sys.platform == "darwin":
            import subprocess
            name = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True).stdout
    except (OSError, StopIteration):
        pass
    return platform_slug(DEVICE_TYPE, name, usable_cores())


# ---------------------------------------------------------------------------
# The time budget's clock, and the load the run saw
# ---------------------------------------------------------------------------

_START = time.time(), time.thread_time()  # wall and main-thread CPU seconds at import
CPU_WALL_FACTOR = 3  # on a CPU the budget also runs out after this many times its length in wall time


def budget_clock():
    """Seconds on the clock the time budget runs on: wall time (time.time) on CUDA and MPS, as the reference.

    On a CPU: the main thread's CPU time since import (time.thread_time). With OMP_WAIT_POLICY=PASSIVE (train.py
    sets it before torch starts) OpenMP's worker threads sleep instead of spinning when they wait, so the main
    thread runs exactly while the step computes and not while other processes hold the cores: the budget buys
    about as many steps on a busy machine as on a quiet one (bench/budget.py measures the candidates). The clock
    never falls behind a third of the wall time since import, so a machine so busy that the main thread runs
    less than a third of the time still ends the run within 3x the budget (with fewer steps, a low cpu_share)
    instead of hours later.
    """
    if DEVICE_TYPE != "cpu":
        return time.time()
    return max(time.thread_time() - _START[1], (time.time() - _START[0]) / CPU_WALL_FACTOR)


def load_report():
    """What load the run saw, for the line after `device:`: "<share> (...)" where share is the fraction of the
    wall time since import that the main thread ran (1.00: a core to itself all along; 0.50: other processes
    held its core half the time), then the 1-minute load average against the cores this process may use."""
    wall, cpu = time.time() - _START[0], time.thread_time() - _START[1]
    load = f"; load average {os.getloadavg()[0]:.1f} on {usable_cores()} cores" if hasattr(os, "getloadavg") else ""
    return f"{min(cpu / wall, 1.0):.2f} (share of the wall time the main thread ran{load})"


# ---------------------------------------------------------------------------
# Device sync and memory readings
# ---------------------------------------------------------------------------

def synchronize():
    """Wait for the device's queued work (a no-op on CPU), so that a step's time includes it."""
    if ON_CUDA:
        torch.cuda.synchronize()
    elif DEVICE_TYPE == "mps":
        torch.mps.synchronize()


def peak_memory_mb():
    """Peak memory in MiB: the CUDA allocator's peak; on MPS the driver's current allocation; on CPU peak RSS."""
    if ON_CUDA:
        return torch.cuda.max_memory_allocated() / 1024 / 1024
    if DEVICE_TYPE == "mps":
        return torch.mps.driver_allocated_memory() / 1024 / 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 1024 / (1024 if sys.platform == "darwin" else 1)


# ---------------------------------------------------------------------------
# Attention backend: Flash Attention 3 where it runs, else FlexAttention or SDPA
# ---------------------------------------------------------------------------

# Attention by compute capability. The kernel hub's FA3 builds are CUDA-only; the reference loads them with
# `kernels` 0.12.1 (pinned in pyproject.toml: later versions refuse get_kernel(repo) without a version).
FA3_HOPPER_REPO = "varunneal/flash-attention-3"  # the reference's build for compute capability 9.0
FA3_COMMUNITY_REPO = "kernels-community/flash-attn3"  # the reference's build for every other GPU


def fa3_repo(capability, is_rocm):
    """The kernel-hub repo of the FA3 build for a GPU of this compute capability, or None where none runs:
    Hopper (9.0) the Hopper build, Ampere and Ada (8.x) the community build; Blackwell (10.x, 12.x), pre-Ampere
    (< 8.0), AMD GPUs under ROCm and non-CUDA devices (capability None) none."""
    if is_rocm or capability is None:
        return None
    if capability == (9, 0):
        return FA3_HOPPER_REPO
    return FA3_COMMUNITY_REPO if capability[0] == 8 else None


def load_fa3(capability, is_rocm):
    """Flash Attention 3 from the Hugging Face kernel hub, as the reference loads it (downloads on first use).

    Returns (module, reason): module has flash_attn_func, or is None when there is no build for this GPU or
    it could not be loaded (no `kernels` package, no network, no build for this torch); reason says which.
    """
    repo = fa3_repo(capability, is_rocm)
    if repo is None:
        gpu = "ROCm" if is_rocm else f"compute capability {capability[0]}.{capability[1]}" if capability else DEVICE_TYPE
        return None, f"no Flash Attention 3 build for {gpu}"
    try:
        from kernels import get_kernel
        return get_kernel(repo).flash_attn_interface, f"Flash Attention 3 from {repo}"
    except Exception as e:
        return None, " ".join(f"no Flash Attention 3 from {repo} ({type(e).__name__}: {e})".split())


FA3_CHECK_TOL = 2e-2  # bf16 keeps 8 significant bits (relative 2**-9); FA3 also rounds the softmax weights to bf16


def fa3_check(fa3, device="cuda"):
    """Run one small causal, sliding-window forward and backward through FA3 and compare it with SDPA in float32.

    A build can load and still have no kernel for this GPU (it then raises at the first call) or compute
    something else. Returns None if output and gradients agree within FA3_CHECK_TOL (relative error), else
    the reason, on one line. Never raises.
    """
    try:
        B, T, H, D, window = 2, 256, 2, 128, 64
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(B, T, H, D, generator=gen, device=device, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        dy = torch.randn(B, T, H, D, generator=gen, device=device, dtype=torch.bfloat16)
        y = fa3.flash_attn_func(q, k, v, causal=True, window_size=(window, 0))
        grads = torch.autograd.grad(y, (q, k, v), dy)
        dist = torch.arange(T, device=device)[:, None] - torch.arange(T, device=device)[None, :]
        q32, k32, v32 = (t.detach().float().transpose(1, 2).requires_grad_() for t in (q, k, v))
        y_ref = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=(dist >= 0) & (dist <= window))
        grads_ref = [g.transpose(1, 2) for g in torch.autograd.grad(y_ref, (q32, k32, v32), dy.float().transpose(1, 2))]
        errors = [((a.float() - b).norm() / b.norm()).item() for a, b in zip([y, *grads], [y_ref.transpose(1, 2), *grads_ref])]
    except Exception as e:
        return " ".join(f"fails at the first call ({type(e).__name__}: {e})".split())[:300]
    if not max(errors) <= FA3_CHECK_TOL:  # also catches NaN
        return f"differs from SDPA (relative errors of output, dq, dk, dv {', '.join(f'{e:.1e}' for e in errors)})"
    return None


def select_attention_backend(capability, is_rocm):
    """Choose the attention backend once, at import, for a CUDA GPU of this compute capability (None: CPU, MPS).

    AUTORESEARCH_ATTENTION=fa3|flex|sdpa forces one. Otherwise CUDA takes the first that runs of FA3 (where
    fa3_repo has a build that loads and passes fa3_check), FlexAttention (Triton kernels: needs Triton and
    compute capability 8.0+) and SDPA; CPU and MPS take SDPA. Returns (backend, reason, fa3 module or None).
    Raises SystemExit if the forced backend is unknown or cannot run here.
    """
    forced = os.environ.get("AUTORESEARCH_ATTENTION", "").strip().lower()
    if forced not in ("", "fa3", "flex", "sdpa"):
        raise SystemExit(f"AUTORESEARCH_ATTENTION={forced!r}: expected fa3, flex or sdpa")
    if forced == "fa3" and capability is None:
        raise SystemExit(f"AUTORESEARCH_ATTENTION=fa3: Flash Attention 3 needs CUDA, this run is on {DEVICE_TYPE}")
    has_triton = importlib.util.find_spec("triton") is not None
    has_flex = capability is None or (capability >= (8, 0) and has_triton)
    if forced == "flex" and not has_flex:
        raise SystemExit("AUTORESEARCH_ATTENTION=flex: FlexAttention on CUDA needs Triton and compute capability 8.0+")
    if forced in ("flex", "sdpa") or capability is None:
        return forced or "sdpa", "forced by AUTORESEARCH_ATTENTION" if forced else f"default on {DEVICE_TYPE}", None
    fa3, reason = load_fa3(capability, is_rocm)
    if fa3 is not None:
        failure = fa3_check(fa3)
        if failure is None:
            return "fa3", reason + ("; forced by AUTORESEARCH_ATTENTION" if forced else ""), fa3
        reason = f"{reason} loads but {failure}"
    if forced:
        raise SystemExit(f"AUTORESEARCH_ATTENTION=fa3: {reason}")
    if has_flex:
        return "flex", f"{reason}; FlexAttention with a sliding-window block mask instead", None
    why = "compute capability below 8.0" if has_triton else "no Triton"
    return "sdpa", f"{reason}; no FlexAttention ({why}); SDPA with a boolean mask instead", None


class FlashAttention:
    """Flash Attention 3's call on every device: `fa3.flash_attn_func(q, k, v, causal=True, window_size=(w, 0))`.

    Causal attention where query i attends to keys j with i - w <= j <= i; q: (B, T, H, D), k and v:
    (B, T, H_kv, D) with H a multiple of H_kv, all of one dtype; returns (B, T, H, D) in that dtype. The FA3
    build itself where it runs (the reference's kernel, called exactly as the reference calls it), else
    FlexAttention with a block mask or SDPA with a boolean mask. Every backend computes this same function
    (tests/test_attention.py). The fallbacks need their masks built before the model is compiled
    (build_masks): torch.compile reads a cached one as a constant, but cannot trace create_block_mask (a graph
    break per layer) and would trace the SDPA mask into the graph and then recompile.
    """

    def __init__(self, backend, fa3_module=None):
        self.backend = backend  # "fa3", "flex" or "sdpa"
        self.fa3 = fa3_module
        self.masks = {}

    def flash_attn_func(self, q, k, v, causal=True, window_size=(-1, -1)):
        if self.backend == "fa3":
            return self.fa3.flash_attn_func(q, k, v, causal=causal, window_size=window_size)
        assert causal and window_size[1] == 0, "the fallbacks implement causal attention only"
        window = window_size[0] if window_size[0] >= 0 else q.size(1)
        mask = self.mask(q.size(1), window, q.device.type)
        gqa = k.size(2) != q.size(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if self.backend == "flex":
            y = (compiled_flex if q.is_cuda else flex_attention)(q, k, v, block_mask=mask, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        return y.transpose(1, 2)

    def mask(self, T, window, device_type):
        """This backend's mask for sequence length T and this window, built once and cached: a FlexAttention
        BlockMask, an SDPA boolean (T, T) mask (True = attend), or None (plain causal)."""
        key = (T, window, device_type)
        if key not in self.masks:
            if self.backend == "flex":
                mask_mod = lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx - kv_idx <= window)  # noqa: E731
                self.masks[key] = create_block_mask(mask_mod, None, None, T, T, device=device_type)
            elif window < T - 1:
                dist = torch.arange(T, device=device_type)[:, None] - torch.arange(T, device=device_type)[None, :]
                self.masks[key] = (dist >= 0) & (dist <= window)
            else:  # the window covers the whole causal context
                self.masks[key] = None
        return self.masks[key]

    def build_masks(self, T, windows, device_type):
        """Build and cache the masks for sequence length T and each window (none needed for FA3)."""
        if self.backend != "fa3":
            for window in set(windows):
                self.mask(T, window, device_type)


ATTENTION_BACKEND, ATTENTION_REASON, _fa3_module = select_attention_backend(CAPABILITY, IS_ROCM)
# FlexAttention is fast only when compiled into one fused kernel. On CPU, torch 2.9 cannot compile its
# backward, so CPU tensors run it eagerly: exact, but it materialises the (T, T) scores.
compiled_flex = torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else None
fa3 = FlashAttention(ATTENTION_BACKEND, _fa3_module)

# ---------------------------------------------------------------------------
# Memory fit of the batch
# ---------------------------------------------------------------------------

DEVICE_MEMORY = torch.cuda.get_device_properties(0).total_memory if ON_CUDA else None  # bytes; None: not CUDA


def fit_device_batch(batch_size, total_memory, config, num_params):
    """Halve batch_size until the predicted peak memory of a training step fits in 90% of total_memory.

    Decided before the first step (not by catching out-of-memory errors, which would come after compiling).
    Predicted peak, in bytes: 16 per parameter (weights, gradients, two optimizer states) plus, per token,
    what the compiled forward keeps for the backward: (48 * n_layer + 24) * n_embd + 8 * vocab_size. That
    covers torch.compile's own partition of the step as bench/simulate_gpu.py measures it, in bf16 (41.2 *
    n_layer * n_embd + 8 * vocab_size) and in fp16, whose float32 embeddings save more (~49 * n_layer * n_embd
    at the reference), and is 54% above the reference's measured 45,060 MB at batch 128 on an H100, which
    keeps 128 (bench/RESULTS.md).
    total_memory: bytes, or None (not CUDA: keep batch_size). Returns batch_size // 2**k, at least 1, and
    prints one line when that differs from batch_size (main() keeps TOTAL_BATCH_SIZE by gradient accumulation).
    """
    per_token = (48 * config.n_layer + 24) * config.n_embd + 8 * config.vocab_size
    predict = lambda b: 16 * num_params + b * config.sequence_len * per_token  # noqa: E731
    fitted = batch_size
    while total_memory is not None and fitted > 1 and predict(fitted) > 0.9 * total_memory:
        fitted //= 2
    if fitted != batch_size:
        print(f"DEVICE_BATCH_SIZE {batch_size} -> {fitted}: {batch_size} would need ~{predict(batch_size) / 2**30:.1f} GiB "
              f"of this GPU's {total_memory / 2**30:.1f} GiB, {fitted} ~{predict(fitted) / 2**30:.1f} GiB; "
              f"TOTAL_BATCH_SIZE kept by gradient accumulation")
    return fitted
