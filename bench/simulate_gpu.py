"""A simulated GPU: FLOPs, peak memory, batch fit, graph breaks and one training step per GPU, all on the CPU.

    python bench/simulate_gpu.py            # everything (a few minutes on 2 busy cores)
    python bench/simulate_gpu.py --quick    # skip the eager memory tracker and the per-GPU steps
    python bench/simulate_gpu.py --inductor # real Inductor's saved tensors vs the simulation's, small config

No GPU is needed: the reference model is built on the "meta" device (shapes and dtypes, no storage), where
every tensor op runs instantly at any size. FakeTensorMode tensors on device "cuda" would keep CUDA's
autocast, but autograd asks the CUDA driver for the current stream when it records a backward node (and
random init needs the CUDA generator), so a backward pass fails on a machine without CUDA. So, on "meta":

- CUDA autocast is emulated by MetaAutocast below: for the ops this model calls, torch 2.9's CUDA autocast
  lists only linear/matmul/SDPA (compute in the low-precision dtype); rms_norm is not on its float32 list in
  2.9 (no autocast kernel is registered for it), and the model casts the logits to float32 itself.
- Attention is replaced by FlashAttention's memory model (aten._scaled_dot_product_flash_attention, which
  has meta kernels): it keeps q, k, v, the output and the log-sum-exp for the backward, as FA3 and a fused
  FlexAttention kernel do. The window only changes the FLOPs, not the memory.
- "Compiled" memory: torch.compile's own AOTAutograd min-cut partitioner (the one Inductor uses) decides
  what the forward saves for the backward; we sum those tensors. It cannot see Inductor's later passes.
- "Eager" memory: torch.distributed._tools.mem_tracker.MemTracker over one step without compile.
"""

import argparse
import collections
import datetime
import os
import sys
import time
import types
import warnings
from unittest import mock

os.environ.setdefault("AUTORESEARCH_DEVICE", "cpu")  # the simulation itself runs on the CPU
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

import hardware  # noqa: E402
import train  # noqa: E402

warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")  # eager flex on CPU

REFERENCE_PEAK_MIB = 45060.2  # peak_vram_mb of the reference run on one H100 80GB (the reference's)
REFERENCE_BATCH = 128
GIB = 2**30

# (name, compute capability, torch's total_memory in bytes). Memory as torch reports it: a little under the
# marketing size (the driver keeps some); figures for the rows marked ~ are nvidia-smi's MiB, rounded down.
GPUS = [
    ("Tesla T4 16GB", (7, 5), 15_095 * 2**20),  # ~ nvidia-smi 15360 MiB
    ("RTX 4090 24GB", (8, 9), 24_080 * 2**20),  # ~ 24564 MiB
    ("RTX 5090 32GB", (12, 0), 31_840 * 2**20),  # ~ 32607 MiB
    ("A100 40GB", (8, 0), 40_339 * 2**20),  # 39.39 GiB
    ("L40S 48GB", (8, 9), 45_488 * 2**20),  # ~ 46068 MiB
    ("H100 80GB", (9, 0), 81_004 * 2**20),  # 79.1 GiB
    ("H200 141GB", (9, 0), 143_160 * 2**20),  # ~ 143771 MiB
]


def reference_config():
    """The reference GPTConfig: DEPTH 8, ASPECT_RATIO 64, HEAD_DIM 128, SSSL, T 2048, vocab 8192 (the reference's)."""
    return train.GPTConfig(sequence_len=2048, vocab_size=8192, n_layer=8, n_head=4, n_kv_head=4, n_embd=512,
                           window_pattern="SSSL")


def meta_model(config, amp_dtype=torch.bfloat16):
    """train.GPT on the meta device with CUDA's dtypes: embeddings stored in bf16 when autocast is bf16 (else
    float32, as fp16 runs keep them), rotary tables in the autocast dtype. No init: meta tensors hold no values."""
    with torch.device("meta"):
        model = train.GPT(config)
    embed_dtype = torch.bfloat16 if amp_dtype == torch.bfloat16 else torch.float32
    model.transformer.wte.to(embed_dtype)
    for ve in model.value_embeds.values():
        ve.to(embed_dtype)
    model.cos, model.sin = model.cos.to(amp_dtype), model.sin.to(amp_dtype)
    return model


def explicit_cross_entropy(logits, targets, weight=None, size_average=None, ignore_index=-100, reduce=None,
                           reduction="mean", label_smoothing=0.0):
    """F.cross_entropy as log_softmax + gather: under AOTAutograd on meta, aten.nll_loss's backward is not tied
    to the loss gradient (torch warns "an autograd kernel was not registered"), so the partitioner would move
    the whole backward into the forward graph. Same saved tensors as the real one (the float32 log-softmax)."""
    logp = logits.float().log_softmax(-1)
    valid = targets != ignore_index
    nll = -logp.gather(-1, targets.clamp_min(0)[:, None])[:, 0] * valid
    return nll if reduction == "none" else nll.sum() / valid.sum()


class MetaAutocast(TorchFunctionMode):
    """CUDA autocast for this model on meta tensors (which have no autocast dispatch key): floating inputs of
    linear, matmul and SDPA are cast to `dtype`, as torch 2.9's CUDA autocast does; everything else runs in
    its inputs' dtypes. With explicit_ce, F.cross_entropy is computed by explicit_cross_entropy."""

    LOW_PRECISION = frozenset({F.linear, torch.matmul, F.scaled_dot_product_attention})

    def __init__(self, dtype, explicit_ce=False):
        super().__init__()
        self.dtype, self.explicit_ce = dtype, explicit_ce

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.cross_entropy and self.explicit_ce:
            return explicit_cross_entropy(*args, **kwargs)
        if func in self.LOW_PRECISION:
            cast = lambda t: t.to(self.dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
            args, kwargs = [cast(a) for a in args], {k: cast(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def flash_memory_attention(q, k, v, window):
    """Causal attention with FlashAttention's memory (saves q, k, v, out, logsumexp); the window is ignored."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, is_causal=True)[0].transpose(1, 2)


def as_fa3(attention):
    """An object with FA3's call (what train.py's model calls) that runs attention(q, k, v, window)."""
    return types.SimpleNamespace(flash_attn_func=lambda q, k, v, causal=True, window_size=(-1, 0): attention(q, k, v, window_size[0]))


class patched:
    """Context manager: set attributes (of train) and restore them on exit."""

    def __init__(self, obj, **values):
        self.obj, self.values, self.saved = obj, values, {}

    def __enter__(self):
        for name, value in self.values.items():
            self.saved[name] = getattr(self.obj, name)
            setattr(self.obj, name, value)

    def __exit__(self, *exc):
        for name, value in self.saved.items():
            setattr(self.obj, name, value)


def nbytes(t):
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def persistent_bytes(model, optimizer):
    """Parameters, their gradients (same dtypes) and the optimizer state, in bytes (after one step)."""
    params = sum(nbytes(p) for p in model.parameters())
    state = sum(nbytes(t) for s in optimizer.state.values() for t in s.values())
    return 2 * params + state


def make_optimizer(model):
    return model.setup_optimizer(unembedding_lr=0.004, embedding_lr=0.6, scalar_lr=0.5, matrix_lr=0.04,
                                 weight_decay=0.2, adam_betas=(0.8, 0.95))


def training_step(model, optimizer, B, amp_dtype, attention=flash_memory_attention, tracker=None):
    """One forward, backward and optimizer step at batch B on meta; fp16 scales the loss as GradScaler does.
    Returns the loss tensor (meta). Attention is `attention(q, k, v, window)`, in place of train.fa3."""
    T = model.config.sequence_len
    x = torch.zeros(B, T, dtype=torch.long, device="meta")
    with patched(train, fa3=as_fa3(attention)):
        with MetaAutocast(amp_dtype):
            loss = model(x, x)
        scale = 2.0**16 if amp_dtype == torch.float16 else 1.0  # GradScaler's initial scale
        (loss * scale).backward()
    if scale != 1.0:
        for p in model.parameters():
            p.grad.mul_(1 / scale)  # unscale (GradScaler also checks for inf/NaN, which meta cannot)
    optimizer.step()
    model.zero_grad(set_to_none=True)
    return loss


def eager_peak_bytes(config, B, amp_dtype=torch.bfloat16):
    """Peak memory of an eager (uncompiled) training step by MemTracker: a warm-up step creates the optimizer
    state, the second step is measured. Returns (peak bytes, {category: bytes at the peak})."""
    from torch.distributed._tools.mem_tracker import MemTracker
    model = meta_model(config, amp_dtype)
    optimizer = make_optimizer(model)
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        training_step(model, optimizer, B, amp_dtype)
        tracker.reset_mod_stats()
        training_step(model, optimizer, B, amp_dtype)
    snap = tracker.get_tracker_snapshot("peak")[torch.device("meta")]
    return snap["Total"], {str(k.value): v for k, v in snap.items() if k != "Total" and v}


VIEW_OPS = {"view", "_unsafe_view", "reshape", "transpose", "permute", "t", "expand", "slice", "select", "alias",
            "unsqueeze", "squeeze", "as_strided"}  # not getitem: a multi-output op's outputs are separate


def base_of(node):
    """The graph node whose memory `node` views (itself if it is not a view)."""
    while node.op == "call_function" and getattr(node.target, "__name__", "").split(".")[0] in VIEW_OPS:
        node = node.args[0]
    return node


def compiled_saved_bytes(config, B, amp_dtype=torch.bfloat16):
    """Bytes the compiled forward keeps for the backward at batch B: torch.compile (Dynamo + AOTAutograd) with
    the min-cut partitioner that Inductor uses; the forward graph's extra outputs are the saved tensors
    (graph inputs such as the weights excluded). Returns (bytes, Counter of (dtype, shape) -> count)."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    saved = {}

    def forward_compiler(gm, example_inputs):
        outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        # a saved view shares its base's memory: count each base once (graph inputs such as weights: not at all)
        bases = {base_of(n) for n in outputs[1:] if n is not None}
        vals = [n.meta["val"] for n in bases if n.op != "placeholder"]
        saved["bytes"] = saved.get("bytes", 0) + sum(nbytes(v) for v in vals)
        saved.setdefault("shapes", collections.Counter()).update((str(v.dtype), tuple(v.shape)) for v in vals)
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=forward_compiler, bw_compiler=lambda gm, _: make_boxed_func(gm.forward),
                           partition_fn=min_cut_rematerialization_partition)
    torch._dynamo.reset()
    model = meta_model(config, amp_dtype)
    compiled = torch.compile(model, backend=backend, dynamic=False)
    x = torch.zeros(B, config.sequence_len, dtype=torch.long, device="meta")
    with patched(train, fa3=as_fa3(flash_memory_attention)), MetaAutocast(amp_dtype, explicit_ce=True):
        compiled(x, x)
    torch._dynamo.reset()
    return saved["bytes"], saved["shapes"]


def inductor_saved_tensors(config, B):
    """What real Inductor (torch.compile's default backend: its decompositions and joint-graph passes, then the
    min-cut partition) saves for the backward, on the CPU with real tensors under CPU bf16 autocast, embeddings
    and rotary tables in bf16 as on CUDA, train.fa3 as the CPU has it (SDPA with a mask). Small configs
    only (a real compile, a minute or more). Returns a Counter of (dtype, shape) -> count of saved tensors
    (bases of views once; graph inputs and bf16 copies of weights included, as compiled_saved_bytes counts)."""
    import torch._inductor.compile_fx as compile_fx
    saved = collections.Counter()
    partition = compile_fx.min_cut_rematerialization_partition

    def recording_partition(gm, joint_inputs, **kwargs):
        fw, bw = partition(gm, joint_inputs, **kwargs)
        outputs = next(n for n in fw.graph.nodes if n.op == "output").args[0][kwargs["num_fwd_outputs"]:]
        bases = {base_of(n) for n in outputs if n is not None}
        saved.update((str(n.meta["val"].dtype), tuple(n.meta["val"].shape)) for n in bases
                     if n.op != "placeholder" and isinstance(n.meta.get("val"), torch.Tensor))
        return fw, bw

    model = tiny_model(config)
    model.transformer.wte.to(torch.bfloat16)
    for ve in model.value_embeds.values():
        ve.to(torch.bfloat16)
    model.cos, model.sin = model.cos.to(torch.bfloat16), model.sin.to(torch.bfloat16)
    x = torch.randint(0, config.vocab_size, (B, config.sequence_len))
    torch._dynamo.reset()
    no_cache = dict(fx_graph_cache=False, fx_graph_remote_cache=False)  # a cache hit skips the partitioner
    with patched(compile_fx, min_cut_rematerialization_partition=recording_partition), \
            torch._inductor.config.patch(no_cache), torch._functorch.config.patch(enable_autograd_cache=False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.compile(model, dynamic=False)(x, x)
        loss.backward()
    torch._dynamo.reset()
    return saved


def simulated_compiled_peak(config, B, amp_dtype=torch.bfloat16):
    """Persistent state (weights, gradients, optimizer state) plus what the compiled forward saves, in bytes."""
    model = meta_model(config, amp_dtype)
    optimizer = make_optimizer(model)
    training_step(model, optimizer, 1, amp_dtype)  # creates the optimizer state
    return persistent_bytes(model, optimizer) + compiled_saved_bytes(config, B, amp_dtype)[0]


def fit_per_token_bytes():
    """The compiled step's saved bytes per token as a * n_layer * n_embd + c * vocab_size + e * n_embd, from
    the slope between batches 2 and 4 (weight-sized saved tensors cancel) on four configurations that vary
    n_layer, n_embd and vocab_size one at a time. Returns {(n_layer, n_embd, vocab): bytes per token}, a, c, e."""
    per_token = {}
    for L, d, V in [(8, 512, 8192), (4, 512, 8192), (8, 1024, 8192), (8, 512, 16384)]:
        config = train.GPTConfig(sequence_len=2048, vocab_size=V, n_layer=L, n_head=d // 128, n_kv_head=d // 128,
                                 n_embd=d, window_pattern="SSSL")
        per_token[L, d, V] = (compiled_saved_bytes(config, 4)[0] - compiled_saved_bytes(config, 2)[0]) / (2 * 2048)
    ref = per_token[8, 512, 8192]
    a = (ref - per_token[4, 512, 8192]) / (4 * 512)
    c = (per_token[8, 512, 16384] - ref) / 8192
    e = (ref - a * 8 * 512 - c * 8192) / 512
    return per_token, a, c, e


def predicted_bytes(config, B):
    """hardware.fit_device_batch's prediction for batch B (the largest b <= B it keeps is B itself at any memory
    above it), read back by bisection on total_memory so the bench uses the rule exactly as train.py has it."""
    num_params = sum(p.numel() for p in meta_model(config).parameters())
    lo, hi = 0, 2**50
    while hi - lo > 2**20:  # the smallest total_memory that keeps B, within 1 MiB
        mid = (lo + hi) // 2
        with patched(sys.modules["builtins"], print=lambda *a, **k: None):
            kept = hardware.fit_device_batch(B, mid, config, num_params) == B
        lo, hi = (lo, mid) if kept else (mid, hi)
    return hi * 0.9  # fit_device_batch keeps B while predicted <= 0.9 * total_memory


# ---------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------

def counted_flops_per_token(config):
    """Training FLOPs per token (forward + backward) by torch.utils.flop_counter.FlopCounterMode on the meta
    model at batch 1, with train.py's CPU attention (SDPA with boolean window masks), in bf16 autocast.
    Returns (total, {op: flops})."""
    from torch.utils.flop_counter import FlopCounterMode
    model = meta_model(config)
    T = config.sequence_len
    x = torch.zeros(1, T, dtype=torch.long, device="meta")
    with patched(train, fa3=hardware.FlashAttention("sdpa")):
        counter = FlopCounterMode(display=False)
        with counter, MetaAutocast(torch.bfloat16):
            model(x, x).backward()
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops() / T, {op: n / T for op, n in by_op.items()}


def window_flops_gap(config):
    """What FlopCounterMode counts beyond estimate_flops(): SDPA counts every (query, key) pair of the (T, T)
    score matrix, masked or not, so each layer costs 12 * h * q * T; estimate_flops() counts min(window, T)."""
    h, q, T = config.n_head, config.n_embd // config.n_head, config.sequence_len
    windows = train.GPT._compute_window_sizes(config)
    return sum(12 * h * q * (T - min(w, T)) for w in windows)


# ---------------------------------------------------------------------------
# Graph breaks
# ---------------------------------------------------------------------------

def tiny_config():
    return train.GPTConfig(sequence_len=64, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=64,
                           window_pattern="SL")


def tiny_model(config):
    torch.manual_seed(0)
    with torch.device("meta"):
        model = train.GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    return model


def model_graph_breaks(backend):
    """Graph breaks of the model's forward (torch._dynamo.explain) and of forward + backward compiled with
    fullgraph=True (aot_eager: AOTAutograd traces the backward too) under attention `backend`, on the CPU.
    Returns (explain's graph_break_count, None or the error of the fullgraph forward + backward)."""
    config = tiny_config()
    model = tiny_model(config)
    x = torch.randint(0, config.vocab_size, (2, config.sequence_len))
    with patched(train, fa3=hardware.FlashAttention(backend)):
        train.fa3.build_masks(config.sequence_len, model.window_sizes, "cpu")  # as main() does
        torch._dynamo.reset()
        breaks = torch._dynamo.explain(model)(x, x).graph_break_count
        torch._dynamo.reset()
        try:
            torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)(x, x).backward()
            error = None
        except Exception as e:  # a graph break under fullgraph=True raises
            error = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        torch._dynamo.reset()
    return breaks, error


def optimizer_graph_breaks():
    """Graph breaks of adamw_step_fused and muon_step_fused (compiled with fullgraph=True on CUDA), traced by
    torch._dynamo.explain with the arguments MuonAdamW passes them. Returns {name: graph_break_count}."""
    fn = {name: getattr(train, name) for name in ("adamw_step_fused", "muon_step_fused")}
    fn = {name: getattr(f, "_torchdynamo_orig_callable", f) for name, f in fn.items()}  # unwrap if compiled
    scalar = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    p, g = torch.randn(16, 8), torch.randn(16, 8)
    adam_args = (p, g, torch.zeros_like(p), torch.zeros_like(p), scalar(1.0), scalar(0.01), scalar(0.8),
                 scalar(0.95), scalar(1e-10), scalar(0.0))
    ps, gs = torch.randn(3, 16, 8), torch.randn(3, 16, 8)
    muon_args = (gs, ps, torch.zeros_like(ps), torch.zeros(3, 16, 1), scalar(0.95), scalar(0.04), scalar(0.2),
                 scalar(0.95), 5, -1)
    result = {}
    for name, args in (("adamw_step_fused", adam_args), ("muon_step_fused", muon_args)):
        torch._dynamo.reset()
        result[name] = torch._dynamo.explain(fn[name])(*args).graph_break_count
    torch._dynamo.reset()
    return result


# ---------------------------------------------------------------------------
# Per-GPU choices and simulated steps
# ---------------------------------------------------------------------------

def gpu_choices(capability, total_memory, config):
    """(attention backend, autocast dtype, device batch) that train.py would choose on this GPU, with the
    kernel hub answering (kernels.get_kernel mocked; load_fa3 still decides which repo, if any) and FA3's
    smoke check passing, Triton as installed here."""
    amp_dtype = hardware.select_amp_dtype(capability)
    hub = types.ModuleType("kernels")  # the kernel hub answers every repo with a module that has flash_attn_func
    hub.get_kernel = lambda repo, *args, **kwargs: types.SimpleNamespace(flash_attn_interface=object())
    with mock.patch.dict(sys.modules, kernels=hub), patched(hardware, fa3_check=lambda fa3, device="cuda": None):
        backend, _, _ = hardware.select_attention_backend(capability, False)
    num_params = sum(p.numel() for p in meta_model(config, amp_dtype).parameters())
    with patched(sys.modules["builtins"], print=lambda *a, **k: None):
        batch = hardware.fit_device_batch(REFERENCE_BATCH, total_memory, config, num_params)
    return backend, amp_dtype, batch


def simulated_step(config, backend, amp_dtype, batch):
    """One training step (forward, backward, optimizer) of the reference model on meta with this GPU's
    autocast dtype and batch, through hardware.FlashAttention under `backend` ("fa3" and "flex" use the
    FlashAttention memory model, since their kernels need a GPU; "sdpa" runs train.py's SDPA path with its
    boolean window masks). Checks dtypes on the way. Returns (grad_accum_steps, seconds)."""
    t0 = time.time()
    model = meta_model(config, amp_dtype)
    optimizer = make_optimizer(model)
    seen = []

    def checked_attention(q, k, v, window):
        # q, k come from the low-precision linears; v too, unless fp16 runs add float32 value embeddings
        assert q.dtype == k.dtype == amp_dtype and v.dtype in (amp_dtype, torch.float32), (q.dtype, k.dtype, v.dtype)
        seen.append(window)
        if backend == "sdpa":
            return real_attention(q, k, v, window)
        return flash_memory_attention(q, k, v, window)

    fallback = hardware.FlashAttention(backend)
    fallback.build_masks(config.sequence_len, model.window_sizes, "meta")
    real_attention = lambda q, k, v, window: fallback.flash_attn_func(q, k, v, causal=True, window_size=(window, 0))  # noqa: E731
    loss = training_step(model, optimizer, batch, amp_dtype, attention=checked_attention)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert seen == model.window_sizes, seen
    assert all(s for s in optimizer.state.values())  # every group stepped
    tokens = batch * config.sequence_len
    assert train.TOTAL_BATCH_SIZE % tokens == 0 or config.sequence_len != train.MAX_SEQ_LEN
    return 2**19 // tokens, time.time() - t0


# ---------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="skip the eager tracker and the per-GPU steps")
    parser.add_argument("--fit", action="store_true", help="only fit the rule's per-token bytes (a few minutes)")
    parser.add_argument("--gpus", action="store_true", help="only the per-GPU table")
    parser.add_argument("--inductor", action="store_true", help="only real Inductor's saved tensors vs the "
                        "min-cut simulation's, at a small config on the CPU (a minute or more)")
    args = parser.parse_args()
    if args.inductor:  # vocab 320, B*T 96, 4d 512: every dimension tells which tensor it is
        config = train.GPTConfig(sequence_len=48, vocab_size=320, n_layer=2, n_head=1, n_kv_head=1, n_embd=128,
                                 window_pattern="SSSL")
        print(f"torch {torch.__version__}, {datetime.date.today()}, {config}, batch 2: saved tensors (count)")
        simulated, real = compiled_saved_bytes(config, 2)[1], inductor_saved_tensors(config, 2)
        for key in sorted(set(simulated) | set(real), key=lambda k: (k[0], k[1])):
            print(f"  {key[0][6:]:9s} {str(key[1]):18s} min-cut on meta {simulated[key]:2d}   "
                  f"Inductor on CPU {real[key]:2d}")
        return
    if args.fit:
        per_token, a, c, e = fit_per_token_bytes()
        for (L, d, V), b in per_token.items():
            print(f"n_layer {L} n_embd {d:4d} vocab {V:5d}: {b:9,.0f} saved bytes per token; "
                  f"fit {a * L * d + c * V + e * d:9,.0f}; rule: {(48 * L + 24) * d + 8 * V:9,}")
        print(f"saved bytes per token = {a:.2f} * n_layer * n_embd + {c:.2f} * vocab_size + {e:.2f} * n_embd")
        return
    config = reference_config()
    num_params = sum(p.numel() for p in meta_model(config).parameters())
    print(f"simulate_gpu.py: torch {torch.__version__}, {datetime.date.today()}, reference config {config}")
    print(f"parameters: {num_params:,}")

    if args.gpus:
        return per_gpu_table(config, args.quick)

    print("\n## FLOPs per token (training: forward + backward)")
    counted, by_op = counted_flops_per_token(config)
    estimate = meta_model(config).estimate_flops()
    gap = window_flops_gap(config)
    print(f"FlopCounterMode:              {counted:.6e}  ({', '.join(f'{k} {v:.3e}' for k, v in sorted(by_op.items()))})")
    print(f"estimate_flops():             {estimate:.6e}")
    print(f"difference:                   {counted - estimate:+.6e} ({100 * (counted / estimate - 1):+.2f}%)")
    print(f"  SDPA counts full (T, T):    {gap:+.6e}  (6 S-layers x 12 h q (T - T/2))")
    print(f"  unexplained:                {counted - estimate - gap:+.6e}")

    print(f"\n## Peak memory at batch {REFERENCE_BATCH} (MiB; reference, H100, compiled: {REFERENCE_PEAK_MIB:,.1f})")
    mib = lambda b: b / 2**20  # noqa: E731
    rows = []
    compiled_saved, shapes = compiled_saved_bytes(config, REFERENCE_BATCH)
    model = meta_model(config)
    optimizer = make_optimizer(model)
    training_step(model, optimizer, 1, torch.bfloat16)
    persistent = persistent_bytes(model, optimizer)
    rows.append(("compiled (min-cut saved + weights, grads, optimizer)", compiled_saved + persistent))
    if not args.quick:
        eager, parts = eager_peak_bytes(config, REFERENCE_BATCH)
        rows.append(("eager (MemTracker)", eager))
    rows.append(("fit_device_batch rule", predicted_bytes(config, REFERENCE_BATCH)))
    for name, value in rows:
        print(f"{name:55s} {mib(value):10,.0f}  {100 * (mib(value) / REFERENCE_PEAK_MIB - 1):+6.1f}%")
    if not args.quick:
        print("  eager at its peak: " + ", ".join(f"{k} {mib(v):,.0f}" for k, v in parts.items()))
    print("  compiled saves (count x dtype shape): " + ", ".join(
        f"{n}x {d[6:]} {tuple(s)}" for (d, s), n in shapes.most_common() if n and nbytes_of(d, s) > 2**20))

    print("\n## Graph breaks (goal 0)")
    for backend in ("sdpa", "flex"):
        breaks, error = model_graph_breaks(backend)
        print(f"model forward, {backend:4s}: {breaks}; forward + backward with fullgraph=True: {error or 'compiles'}")
    for name, breaks in optimizer_graph_breaks().items():
        print(f"{name}: {breaks}")

    per_gpu_table(config, args.quick)


def per_gpu_table(config, quick):
    """Print, per GPU in GPUS: the choices, the rule's and the simulation's memory, and a simulated step."""
    print("\n## Per GPU: what train.py chooses, and one simulated step at that batch")
    print("rule: fit_device_batch's prediction at the chosen batch; sim: weights, gradients and optimizer state +"
          " the compiled forward's saved tensors (min-cut at batch 128, scaled to the batch), in this autocast dtype")
    print(f"{'GPU':15s} {'cc':>5s} {'GiB':>6s} {'attention':9s} {'autocast':9s} {'batch':>5s} {'accum':>5s} "
          f"{'rule GiB':>8s} {'sim GiB':>8s}  step")
    sim_at_128 = {}
    for name, capability, total in GPUS:
        backend, amp_dtype, batch = gpu_choices(capability, total, config)
        if amp_dtype not in sim_at_128:
            model = meta_model(config, amp_dtype)
            optimizer = make_optimizer(model)
            training_step(model, optimizer, 1, amp_dtype)
            saved = compiled_saved_bytes(config, REFERENCE_BATCH, amp_dtype)[0]
            sim_at_128[amp_dtype] = (persistent_bytes(model, optimizer), saved)
        persistent, saved = sim_at_128[amp_dtype]
        sim = persistent + saved * batch / REFERENCE_BATCH
        rule = predicted_bytes(config, batch)
        if quick:
            status, accum = "skipped (--quick)", 2**19 // (batch * config.sequence_len)
        else:
            accum, seconds = simulated_step(config, backend, amp_dtype, batch)
            status = f"ok ({seconds:.1f} s)"
        print(f"{name:15s} {capability[0]:>2d}.{capability[1]:<2d} {total / GIB:6.1f} {backend:9s} "
              f"{str(amp_dtype)[6:]:9s} {batch:5d} {accum:5d} {rule / GIB:8.1f} {sim / GIB:8.1f}  {status}")


def nbytes_of(dtype, shape):
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=getattr(torch, dtype[6:])).element_size()


if __name__ == "__main__":
    main()
