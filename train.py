"""
Pretrain a small GPT for a fixed time budget and report val_bpb.

    uv run train.py

This is the file the agent edits: model, optimizer, hyperparameters and the
training loop all live here. prepare.py (fixed) supplies the data, the
tokenizer and the metric. On CUDA this is the reference run; CPU and MPS use a
smaller profile (see "Hyperparameters").
"""

import gc
import math
import os
import sys
import time
from dataclasses import dataclass

# Set before torch starts, as the reference does: growable allocator segments (less fragmentation, part of the
# reference's 45 GB peak), no kernel-hub download bars in run.log, and OpenMP threads that sleep rather than spin
# while they wait, so that on a CPU other processes' load does not eat the time budget (hardware.budget_clock).
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn as nn
import torch.nn.functional as F

from prepare import MAX_SEQ_LEN, TIME_BUDGET, Tokenizer, check_val_split, evaluate_bpb, make_dataloader
# The hardware layer (fixed, like prepare.py): device, precision, the attention kernel, memory fit, clock, MFU
from hardware import (ATTENTION_BACKEND, ATTENTION_REASON, DEVICE_MEMORY, DEVICE_REASON, DEVICE_TYPE, ON_CUDA,
                      budget_clock, fa3, fit_device_batch, get_peak_flops, load_report, peak_memory_mb, platform_name,
                      select_precision, synchronize)

USE_COMPILE = ON_CUDA  # on CPU, compiling costs more of the 5 minutes than it saves (docs/cpu.md)
WARMUP_STEPS = 11 if USE_COMPILE else 0  # steps outside the time budget: the first ones compile

# ---------------------------------------------------------------------------
# GPT model
# ---------------------------------------------------------------------------

@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 8192
    n_layer: int = 8
    n_head: int = 4
    n_kv_head: int = 4
    n_embd: int = 512
    window_pattern: str = "SSSL"


def norm(x):
    """RMSNorm over the last dimension, no learned weight."""
    return F.rms_norm(x, (x.size(-1),))


def has_ve(layer_idx, n_layer):
    """Value embeddings on alternating layers, always including the last one."""
    return layer_idx % 2 == (n_layer - 1) % 2


def apply_rotary_emb(x, cos, sin):
    """Rotate the two halves of each head: x (B, T, H, D), cos/sin (1, T, 1, D/2)."""
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=3)


class CausalSelfAttention(nn.Module):
    VE_GATE_CHANNELS = 32

    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        assert config.n_embd % config.n_head == 0 and config.n_head % config.n_kv_head == 0
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.ve_gate = nn.Linear(self.VE_GATE_CHANNELS, self.n_kv_head, bias=False) if has_ve(layer_idx, config.n_layer) else None

    def forward(self, x, ve, cos_sin, window):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # ResFormer value residual, gated per head
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :self.VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)
        y = fa3.flash_attn_func(q, k, v, causal=True, window_size=(window, 0))
        return self.c_proj(y.contiguous().view(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos_sin, window):
        x = x + self.attn(norm(x), ve, cos_sin, window)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.window_sizes = self._compute_window_sizes(config)
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        head_dim = config.n_embd // config.n_head
        kv_dim = config.n_kv_head * head_dim
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(config.vocab_size, kv_dim)
            for i in range(config.n_layer) if has_ve(i, config.n_layer)
        })
        self.rotary_seq_len = config.sequence_len * 10  # room to evaluate longer sequences
        cos, sin = self._precompute_rotary(self.rotary_seq_len, head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self):
        """Initialise every parameter (after to_empty on the target device), as the reference does."""
        n_embd = self.config.n_embd
        s = 3**0.5 * n_embd**-0.5  # uniform bound with the std of N(0, 1/d)
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        cos, sin = self._precompute_rotary(self.rotary_seq_len, n_embd // self.config.n_head)
        self.cos, self.sin = cos, sin
        self.transformer.wte.to(dtype=COMPUTE_DTYPE)
        for ve in self.value_embeds.values():
            ve.to(dtype=COMPUTE_DTYPE)

    def _precompute_rotary(self, seq_len, head_dim, base=10000):
        device = self.transformer.wte.weight.device
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
        cos, sin = freqs.cos().to(AMP_DTYPE), freqs.sin().to(AMP_DTYPE)
        return cos[None, :, None, :], sin[None, :, None, :]  # (1, T, 1, D/2)

    @staticmethod
    def _compute_window_sizes(config):
        """Per-layer attention window from the tiled pattern (L: full, S: half); the last layer is always L."""
        pattern = config.window_pattern.upper()
        assert pattern and set(pattern) <= {"S", "L"}, f"window_pattern must use only S and L: {pattern!r}"
        long_w, short_w = config.sequence_len, config.sequence_len // 2
        windows = [long_w if pattern[i % len(pattern)] == "L" else short_w for i in range(config.n_layer)]
        windows[-1] = long_w
        return windows

    def estimate_flops(self):
        """Training FLOPs per token: 6 * matmul params + 12 * h * q * effective context per layer."""
        nparams = sum(p.numel() for p in self.parameters())
        exclude = (self.transformer.wte.weight.numel() + sum(ve.weight.numel() for ve in self.value_embeds.values())
                   + self.resid_lambdas.numel() + self.x0_lambdas.numel())
        h, q, t = self.config.n_head, self.config.n_embd // self.config.n_head, self.config.sequence_len
        attn_flops = sum(12 * h * q * min(w, t) for w in self.window_sizes)
        return 6 * (nparams - exclude) + attn_flops

    def setup_optimizer(self, unembedding_lr, embedding_lr, scalar_lr, matrix_lr, weight_decay, adam_betas):
        """MuonAdamW: Muon for the block matrices (one group per shape), AdamW for the rest."""
        dmodel_lr_scale = (self.config.n_embd / 768) ** -0.5
        adam = dict(kind="adamw", betas=adam_betas, eps=1e-10, weight_decay=0.0)
        groups = [
            dict(adam, params=[self.lm_head.weight], lr=unembedding_lr * dmodel_lr_scale),
            dict(adam, params=[self.transformer.wte.weight], lr=embedding_lr * dmodel_lr_scale),
            dict(adam, params=[ve.weight for ve in self.value_embeds.values()], lr=embedding_lr * dmodel_lr_scale),
            dict(adam, params=[self.resid_lambdas], lr=scalar_lr * 0.01),
            dict(adam, params=[self.x0_lambdas], lr=scalar_lr, betas=(0.96, 0.95)),
        ]
        matrix_params = list(self.transformer.h.parameters())
        for shape in sorted({p.shape for p in matrix_params}):
            groups.append(dict(kind="muon", params=[p for p in matrix_params if p.shape == shape], lr=matrix_lr,
                               momentum=0.95, ns_steps=5, beta2=0.95, weight_decay=weight_decay))
        assert sum(len(g["params"]) for g in groups) == len(list(self.parameters())), "a parameter has no group"
        optimizer = MuonAdamW(groups)
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        return optimizer

    def forward(self, idx, targets=None, reduction="mean"):
        """idx, targets: int64 (B, T). Returns the loss (scalar, or per token with reduction="none"),
        else float32 logits (B, T, vocab) when targets is None."""
        B, T = idx.size()
        assert T <= self.cos.size(1), f"sequence length {T} exceeds the rotary cache {self.cos.size(1)}"
        cos_sin = self.cos[:, :T], self.sin[:, :T]
        x = norm(self.transformer.wte(idx))
        x0 = x
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, self.window_sizes[i])
        x = norm(x)
        logits = self.lm_head(x).float()
        softcap = 15
        logits = softcap * torch.tanh(logits / softcap)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1, reduction=reduction)


# ---------------------------------------------------------------------------
# Optimizer: MuonAdamW
# ---------------------------------------------------------------------------

# Polar Express coefficients (Amsel et al. 2025), one (a, b, c) per iteration.
POLAR_EXPRESS_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def adamw_step_fused(p, grad, exp_avg, exp_avg_sq, step_t, lr_t, beta1_t, beta2_t, eps_t, wd_t):
    """AdamW with decoupled weight decay and bias correction, in place. Scalars are 0-D tensors."""
    p.mul_(1 - lr_t * wd_t)
    exp_avg.lerp_(grad, 1 - beta1_t)
    exp_avg_sq.lerp_(grad.square(), 1 - beta2_t)
    bias1 = 1 - beta1_t**step_t
    bias2 = 1 - beta2_t**step_t
    denom = (exp_avg_sq / bias2).sqrt() + eps_t
    p.add_(exp_avg / denom * (-lr_t / bias1))


def muon_step_fused(grads, params, momentum_buf, second_buf, momentum_t, lr_t, wd_t, beta2_t, ns_steps, red_dim):
    """One Muon step on K stacked (K, rows, cols) matrices, in place on params and buffers.

    Nesterov momentum, Polar Express orthogonalisation (Amsel et al. 2025) in
    COMPUTE_DTYPE, NorMuon variance reduction (Li et al. 2025) along red_dim
    (-1: per row, -2: per column), cautious weight decay. As the reference. The scalars are cast as the reference
    casts them (bf16 on CUDA, no-ops where COMPUTE_DTYPE is float32): they move the result at the 1e-3 level.
    """
    # Nesterov momentum, the momentum in the gradients' dtype
    momentum = momentum_t.to(grads.dtype)
    momentum_buf.lerp_(grads, 1 - momentum)
    g = grads.lerp_(momentum_buf, momentum)
    # Polar Express: drive all singular values towards 1
    X = g.to(COMPUTE_DTYPE)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    if g.size(-2) > g.size(-1):
        for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
            A = X.mT @ X
            B = b * A + c * (A @ A)
            X = a * X + X @ B
    else:
        for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
            A = X @ X.mT
            B = b * A + c * (A @ A)
            X = a * X + B @ X
    g = X
    # NorMuon: normalise per-row (or per-column) second moments, keep the Frobenius norm.
    # beta2 in COMPUTE_DTYPE: on CUDA the EMA weight is 1 - bf16(0.95) = 0.05078125
    beta2 = beta2_t.to(COMPUTE_DTYPE)
    v_mean = g.float().square().mean(dim=red_dim, keepdim=True)
    red_size = g.size(red_dim)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * red_size).sqrt()
    second_buf.lerp_(v_mean.to(second_buf.dtype), 1 - beta2)
    step_size = second_buf.clamp_min(1e-10).rsqrt()
    v_norm_new = ((v_mean * red_size) * step_size.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    g = g * (step_size * (v_norm / v_norm_new.clamp_min(1e-10))).to(g.dtype)
    # cautious weight decay: only where the update and the weight agree in sign. lr and wd in COMPUTE_DTYPE,
    # so lr * g is formed in COMPUTE_DTYPE (bf16 on CUDA) and the decay term and the mask in float32
    lr, wd = lr_t.to(COMPUTE_DTYPE), wd_t.to(COMPUTE_DTYPE)
    mask = (g * params) >= 0
    params.sub_(lr * g + lr * wd * params * mask)


if USE_COMPILE:
    adamw_step_fused = torch.compile(adamw_step_fused, dynamic=False, fullgraph=True)
    muon_step_fused = torch.compile(muon_step_fused, dynamic=False, fullgraph=True)


class MuonAdamW(torch.optim.Optimizer):
    """AdamW and Muon parameter groups in one optimizer; each group has kind="adamw" or kind="muon".

    Changing hyperparameters travel as 0-D CPU tensors so the compiled steps never recompile.
    """

    def __init__(self, param_groups):
        super().__init__(param_groups, defaults={})
        scalar = lambda: torch.tensor(0.0, dtype=torch.float32)  # noqa: E731
        self._t = {name: scalar() for name in ("step", "lr", "beta1", "beta2", "eps", "wd", "momentum")}

    def _set(self, **values):
        for name, value in values.items():
            self._t[name].fill_(value)
        return self._t

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            if group["kind"] == "adamw":
                self._step_adamw(group)
            else:
                self._step_muon(group)

    def _step_adamw(self, group):
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = self._set(step=state["step"], lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
                          eps=group["eps"], wd=group["weight_decay"])
            adamw_step_fused(p, p.grad, state["exp_avg"], state["exp_avg_sq"],
                             t["step"], t["lr"], t["beta1"], t["beta2"], t["eps"], t["wd"])

    def _step_muon(self, group):
        params = group["params"]
        if params[0].grad is None:
            return
        state = self.state[params[0]]  # the whole group's state lives with its first parameter
        rows, cols = params[0].shape
        if not state:
            state["momentum_buffer"] = torch.zeros(len(params), rows, cols, dtype=params[0].dtype, device=params[0].device)
            buf_shape = (len(params), rows, 1) if rows >= cols else (len(params), 1, cols)
            state["second_momentum_buffer"] = torch.zeros(buf_shape, dtype=params[0].dtype, device=params[0].device)
        red_dim = -1 if rows >= cols else -2
        stacked_grads = torch.stack([p.grad for p in params])
        stacked_params = torch.stack(params)
        t = self._set(momentum=group["momentum"], lr=group["lr"] * max(1.0, rows / cols) ** 0.5,
                      wd=group["weight_decay"], beta2=group["beta2"])
        muon_step_fused(stacked_grads, stacked_params, state["momentum_buffer"], state["second_momentum_buffer"],
                        t["momentum"], t["lr"], t["wd"], t["beta2"], group["ns_steps"], red_dim)
        torch._foreach_copy_(params, list(stacked_params.unbind(0)))


# ---------------------------------------------------------------------------
# Hyperparameters (edit these directly, no CLI flags)
# ---------------------------------------------------------------------------

# Where a line has two values, the first is the CUDA value (the reference's) and the `else` value applies on
# CPU and MPS: the reference model would take ~1 min a step there, so they run a smaller profile, chosen by
# 300 s runs on a 2-core CPU (docs/cpu.md). Edit the value for the device you run on.

# Model architecture
ASPECT_RATIO = 64 if ON_CUDA else 32             # model_dim = DEPTH * ASPECT_RATIO
HEAD_DIM = 128 if ON_CUDA else 64                # target head dimension for attention
WINDOW_PATTERN = "SSSL" if ON_CUDA else "L"      # sliding-window pattern: L = full context, S = half context

# Optimization
TOTAL_BATCH_SIZE = 2**19 if ON_CUDA else 2**12   # tokens per optimizer step
EMBEDDING_LR = 0.6        # token and value embeddings (Adam)
UNEMBEDDING_LR = 0.004    # lm_head (Adam)
MATRIX_LR = 0.04          # block matrices (Muon)
SCALAR_LR = 0.5           # per-layer scalars (Adam)
WEIGHT_DECAY = 0.2        # cautious weight decay for Muon
ADAM_BETAS = (0.8, 0.95)
WARMUP_RATIO = 0.0        # fraction of the time budget for LR warmup
WARMDOWN_RATIO = 0.5      # fraction of the time budget for LR warmdown
FINAL_LR_FRAC = 0.0       # final LR as a fraction of the initial one

# Model size
DEPTH = 8 if ON_CUDA else 4                      # number of transformer layers
DEVICE_BATCH_SIZE = 128 if ON_CUDA else 16       # per-device batch size (CUDA halves it if it would not fit)

# Precision: bf16 autocast where the device computes bf16 natively (CUDA from Ampere on; a CPU whose bf16 matmuls,
# timed at this model's width, run faster than float32), fp16 with loss scaling on older GPUs, else float32.
# AUTORESEARCH_PRECISION=bf16|fp32 forces one.
AMP_DTYPE, PRECISION = select_precision(DEPTH * ASPECT_RATIO)
# Embedding storage and Muon's orthogonalisation: bf16 like the reference where CUDA autocasts in bf16. fp16 runs
# keep the embeddings in float32 (the loss scaler unscales only float32 gradients) and orthogonalise in float32:
# ~3e11 FLOPs a step for the reference model, about 2% of a T4 step. CPUs gained nothing more from bf16 here.
COMPUTE_DTYPE = torch.bfloat16 if ON_CUDA and AMP_DTYPE == torch.bfloat16 else torch.float32


def build_model_config(depth, vocab_size):
    base_dim = depth * ASPECT_RATIO
    model_dim = ((base_dim + HEAD_DIM - 1) // HEAD_DIM) * HEAD_DIM
    num_heads = model_dim // HEAD_DIM
    return GPTConfig(sequence_len=MAX_SEQ_LEN, vocab_size=vocab_size, n_layer=depth, n_head=num_heads,
                     n_kv_head=num_heads, n_embd=model_dim, window_pattern=WINDOW_PATTERN)


def get_lr_multiplier(progress):
    """Linear warmup, flat, then linear warmdown to FINAL_LR_FRAC; progress in [0, 1]."""
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO
    if progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    cooldown = (1.0 - progress) / WARMDOWN_RATIO
    return cooldown + (1.0 - cooldown) * FINAL_LR_FRAC


def get_muon_momentum(step):
    frac = min(step / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


def get_weight_decay(progress):
    return WEIGHT_DECAY * (1 - progress)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------

PROGRESS_SECONDS = 5  # when stdout is not a terminal (run.log): one progress line this often


def main():
    print(f"platform: {platform_name()}")
    t_start = time.time()
    seed = int(os.environ.get("AUTORESEARCH_SEED", "42"))  # another seed re-runs a commit independently
    torch.manual_seed(seed)
    if ON_CUDA:
        torch.cuda.manual_seed(seed)
    torch.set_float32_matmul_precision("high")
    device = torch.device(DEVICE_TYPE)
    autocast_ctx = torch.amp.autocast(device_type=DEVICE_TYPE, dtype=AMP_DTYPE, enabled=AMP_DTYPE != torch.float32)
    # Dynamic loss scaling for fp16, so small gradients do not flush to zero: the scaler unscales the gradients
    # before the optimizer step and skips the step when one is inf or NaN. A no-op in bf16 and float32.
    scaler = torch.amp.GradScaler(DEVICE_TYPE, enabled=AMP_DTYPE == torch.float16)
    peak_flops = get_peak_flops(AMP_DTYPE)
    print(f"Device: {DEVICE_TYPE} ({DEVICE_REASON}); precision: {PRECISION}; compile: {USE_COMPILE}")
    print(f"attention: {ATTENTION_BACKEND} ({ATTENTION_REASON})")

    tokenizer = Tokenizer.from_directory()
    print(check_val_split(tokenizer))  # warns when the metric would measure a handful of repeated rows
    vocab_size = tokenizer.get_vocab_size()
    config = build_model_config(DEPTH, vocab_size)
    print(f"Model config: {config}")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()

    num_params = sum(p.numel() for p in model.parameters())
    num_flops_per_token = model.estimate_flops()
    print(f"Parameters: {num_params:,}; FLOPs per token: {num_flops_per_token:e}")

    device_batch_size = fit_device_batch(DEVICE_BATCH_SIZE, DEVICE_MEMORY, config, num_params)
    tokens_per_fwdbwd = device_batch_size * MAX_SEQ_LEN
    assert TOTAL_BATCH_SIZE % tokens_per_fwdbwd == 0, "TOTAL_BATCH_SIZE must be a multiple of DEVICE_BATCH_SIZE * MAX_SEQ_LEN"
    grad_accum_steps = TOTAL_BATCH_SIZE // tokens_per_fwdbwd

    optimizer = model.setup_optimizer(unembedding_lr=UNEMBEDDING_LR, embedding_lr=EMBEDDING_LR, scalar_lr=SCALAR_LR,
                                      matrix_lr=MATRIX_LR, weight_decay=WEIGHT_DECAY, adam_betas=ADAM_BETAS)
    fa3.build_masks(MAX_SEQ_LEN, model.window_sizes, DEVICE_TYPE)  # the fallbacks' masks, before compiling
    if USE_COMPILE:
        model = torch.compile(model, dynamic=False)

    train_loader = make_dataloader(tokenizer, device_batch_size, MAX_SEQ_LEN, "train")
    x, y, epoch = next(train_loader)  # first batch
    print(f"Time budget: {TIME_BUDGET}s; gradient accumulation steps: {grad_accum_steps}")

    smooth_train_loss = 0.0
    total_training_time = 0.0
    step = 0
    on_terminal = sys.stdout.isatty()
    last_print = 0.0
    while True:
        synchronize()
        t0, budget_t0 = time.time(), budget_clock()
        for _ in range(grad_accum_steps):
            with autocast_ctx:
                loss = model(x, y)
            train_loss = loss.detach()
            scaler.scale(loss / grad_accum_steps).backward()
            x, y, epoch = next(train_loader)

        progress = min(total_training_time / TIME_BUDGET, 1.0)
        lrm = get_lr_multiplier(progress)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = get_muon_momentum(step)
                group["weight_decay"] = get_weight_decay(progress)
        scaler.step(optimizer)
        scaler.update()
        model.zero_grad(set_to_none=True)

        train_loss_f = train_loss.item()
        if math.isnan(train_loss_f) or train_loss_f > 100:
            print("FAIL")
            sys.exit(1)

        synchronize()
        dt = time.time() - t0
        if step >= WARMUP_STEPS:
            total_training_time += budget_clock() - budget_t0

        ema_beta = 0.9
        smooth_train_loss = ema_beta * smooth_train_loss + (1 - ema_beta) * train_loss_f
        debiased_loss = smooth_train_loss / (1 - ema_beta ** (step + 1))
        mfu = 100 * num_flops_per_token * TOTAL_BATCH_SIZE / dt / peak_flops if peak_flops else 0.0
        remaining = max(0.0, TIME_BUDGET - total_training_time)
        status = (f"step {step:05d} ({100 * progress:.1f}%) | loss: {debiased_loss:.6f} | lrm: {lrm:.2f} | "
                  f"dt: {dt * 1000:.0f}ms | tok/sec: {int(TOTAL_BATCH_SIZE / dt):,} | mfu: {mfu:.1f}% | "
                  f"epoch: {epoch} | remaining: {remaining:.0f}s")
        if on_terminal:
            print(f"\r{status}    ", end="", flush=True)
        elif time.time() - last_print >= PROGRESS_SECONDS:  # a log file: whole lines, so `tail` shows the latest
            print(status, flush=True)
            last_print = time.time()

        # Python's GC costs ~500 ms per collection: freeze the startup objects and collect rarely
        if step == 0:
            gc.collect()
            gc.freeze()
            gc.disable()
        elif (step + 1) % 5000 == 0:
            gc.collect()

        step += 1
        if step >= WARMUP_STEPS and total_training_time >= TIME_BUDGET:
            break
    if on_terminal:
        print()

    total_tokens = step * TOTAL_BATCH_SIZE
    model.eval()
    with autocast_ctx:
        val_bpb = evaluate_bpb(model, tokenizer, device_batch_size)

    t_end = time.time()
    counted = TOTAL_BATCH_SIZE * (step - WARMUP_STEPS)
    steady_mfu = 100 * num_flops_per_token * counted / total_training_time / peak_flops if peak_flops and total_training_time > 0 else 0.0
    print("---")
    print(f"val_bpb:          {val_bpb:.6f}")
    print(f"training_seconds: {total_training_time:.1f}")
    print(f"total_seconds:    {t_end - t_start:.1f}")
    print(f"peak_vram_mb:     {peak_memory_mb():.1f}")
    print(f"mfu_percent:      {steady_mfu:.2f}")
    print(f"total_tokens_M:   {total_tokens / 1e6:.1f}")
    print(f"num_steps:        {step}")
    print(f"num_params_M:     {num_params / 1e6:.1f}")
    print(f"depth:            {DEPTH}")
    print(f"device:           {DEVICE_TYPE}")
    print(f"cpu_share:        {load_report()}")


if __name__ == "__main__":
    main()
