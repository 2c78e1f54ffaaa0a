"""Precision paths of train.py, run on the CPU: the fp16 path of GPUs without bf16 (T4, V100, RTX 20xx) against
float32, the loss scaler around MuonAdamW, a short main() in fp16, and the reference's bf16 casts inside the
Muon step against a naive implementation.
"""

import gc

import pytest
import torch

import prepare
import train

STEPS = 6


def small_model(seed=0):
    """A 2-layer GPT built as main() builds it (meta device, to_empty, init_weights), with the current dtypes."""
    config = train.GPTConfig(sequence_len=64, vocab_size=128, n_layer=2, n_head=2, n_kv_head=2, n_embd=128,
                             window_pattern="SL")
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = train.GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    return model


def batches(n, B=4, T=64, vocab=128):
    """Token batches with structure (each sequence counts up from a random start), so the loss can fall."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        start = torch.randint(0, vocab, (B, 1), generator=gen)
        rows = (start + torch.arange(T + 1)) % vocab
        out.append((rows[:, :-1].contiguous(), rows[:, 1:].contiguous()))
    return out


def train_steps(monkeypatch, amp_dtype, steps=STEPS, grad_accum=2, poison_step=None):
    """main()'s step with AMP_DTYPE set as on a GPU of that kind: autocast, GradScaler, MuonAdamW.

    Returns the losses, the scaler's scale after each step, and the model. poison_step: that step's
    gradients get an inf, as an fp16 overflow would make them.
    """
    monkeypatch.setattr(train, "AMP_DTYPE", amp_dtype)
    model = small_model()
    optimizer = model.setup_optimizer(unembedding_lr=0.004, embedding_lr=0.6, scalar_lr=0.5, matrix_lr=0.04,
                                      weight_decay=0.2, adam_betas=(0.8, 0.95))
    autocast_ctx = torch.amp.autocast(device_type="cpu", dtype=amp_dtype, enabled=amp_dtype != torch.float32)
    scaler = torch.amp.GradScaler("cpu", enabled=amp_dtype == torch.float16)
    losses, scales = [], []
    data = iter(batches(steps * grad_accum))
    for step in range(steps):
        for _ in range(grad_accum):
            x, y = next(data)
            with autocast_ctx:
                loss = model(x, y)
            losses.append(loss.item())
            scaler.scale(loss / grad_accum).backward()
        if step == poison_step:
            model.transformer.h[0].mlp.c_fc.weight.grad[0, 0] = float("inf")
        scaler.step(optimizer)
        scaler.update()
        model.zero_grad(set_to_none=True)
        scales.append(scaler.get_scale() if scaler.is_enabled() else 1.0)
    return losses, scales, model


def test_fp16_first_steps_follow_float32(monkeypatch):
    """fp16 autocast with dynamic loss scaling tracks the float32 run step by step, as closely as bf16 autocast
    (the reference's precision) does: no step is skipped, and neither the losses nor the weights stray further
    from float32's than bf16's do. (At these learning rates the weights of both drift by ~10% in 6 steps.)"""
    loss16, scales, model16 = train_steps(monkeypatch, torch.float16)
    loss32, _, model32 = train_steps(monkeypatch, torch.float32)
    loss_bf16, _, model_bf16 = train_steps(monkeypatch, torch.bfloat16)
    assert scales == [65536.0] * STEPS  # the scaler's initial scale, never backed off: no step skipped
    assert loss32[-1] < loss32[0] - 1.0  # the run learns, so the comparison is not between two idle models

    def deviation(losses):
        return max(abs(a - b) / b for a, b in zip(losses, loss32))

    assert deviation(loss16) < 1e-2 and deviation(loss16) <= 1.5 * deviation(loss_bf16), (loss16, loss_bf16, loss32)

    def weight_deviation(model):
        return sum((p - p32).norm() ** 2 for p, p32 in zip(model.parameters(), model32.parameters())) ** 0.5

    assert weight_deviation(model16) <= 1.5 * weight_deviation(model_bf16)
    # the rotary tables follow autocast; stored weights and embeddings stay float32 for the scaler
    assert model16.cos.dtype == torch.float16 and model32.cos.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model16.parameters())


def test_fp16_overflowing_step_is_skipped_and_the_scale_backs_off(monkeypatch):
    """An inf gradient (fp16 overflow) skips that optimizer step entirely (weights and Muon/AdamW state
    untouched) and halves the scale; the run continues."""
    before, scales_before, model_before = train_steps(monkeypatch, torch.float16, steps=2)
    losses, scales, model = train_steps(monkeypatch, torch.float16, steps=3, poison_step=2)
    assert scales == [65536.0, 65536.0, 32768.0]
    for p, q in zip(model.parameters(), model_before.parameters()):
        assert torch.equal(p, q)  # step 2 changed nothing
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_scaler_unscales_before_muon_adamw_steps(monkeypatch):
    """The optimizer sees the true gradients: GradScaler divides the scale out before MuonAdamW.step."""
    seen = []
    real_step = train.MuonAdamW.step

    def spy(self):
        seen.append([p.grad.clone() for group in self.param_groups for p in group["params"]])
        return real_step(self)

    monkeypatch.setattr(train.MuonAdamW, "step", spy)
    train_steps(monkeypatch, torch.float16, steps=1)
    train_steps(monkeypatch, torch.float32, steps=1)
    grads16, grads32 = seen
    for g16, g32 in zip(grads16, grads32):
        assert (g16 - g32).norm() <= 2e-2 * g32.norm() + 1e-9


def test_main_runs_the_fp16_path(cache, monkeypatch, capsys):
    """main() on the CPU as it runs on a T4: fp16 autocast with loss scaling, a tiny model, a 1 s budget."""
    # fp16 matmuls are slow on CPUs (~2 s a step for 4 x 64 tokens here), so: 2 x 32 tokens a step
    for name, value in dict(AMP_DTYPE=torch.float16, DEPTH=1, ASPECT_RATIO=64, HEAD_DIM=64, MAX_SEQ_LEN=32,
                            DEVICE_BATCH_SIZE=2, TOTAL_BATCH_SIZE=2 * 32, TIME_BUDGET=1).items():
        monkeypatch.setattr(train, name, value)
    monkeypatch.setattr(prepare, "MAX_SEQ_LEN", 32)
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 2 * 32 * 2)
    scalers = []

    class RecordingScaler(torch.amp.GradScaler):
        def step(self, optimizer):
            scalers.append(self.is_enabled())
            return super().step(optimizer)

    monkeypatch.setattr(torch.amp, "GradScaler", RecordingScaler)
    try:
        train.main()
    finally:  # main() freezes and disables the garbage collector for the rest of its process
        gc.enable()
        gc.unfreeze()
    out = capsys.readouterr().out
    assert out.startswith("platform: cpu-")
    summary = dict(line.split(":", 1) for line in out[out.rindex("---\n") + 4:].splitlines())
    assert 0 < float(summary["val_bpb"]) < 20 and int(summary["num_steps"]) >= 1
    assert len(scalers) == int(summary["num_steps"]) and all(scalers)  # every step went through the loss scaler


# ---------------------------------------------------------------------------
# The reference's dtypes inside the Muon step (the reference's, inside the Muon step)
# ---------------------------------------------------------------------------

def naive_muon_bf16(p, g, buf, buf2, lr, momentum, wd, beta2):
    """One Muon step for one matrix with ns_steps=0, with the reference's dtypes on CUDA. Returns the new
    (p, buf, buf2). Written from the SPEC text, one operation at a time."""
    rows, cols = p.shape
    momentum = torch.tensor(momentum, dtype=torch.float32)  # cast to the gradient's dtype (float32)
    buf = buf + (1 - momentum) * (g - buf)
    g = g + momentum * (buf - g)
    X = g.to(torch.bfloat16)  # the bf16 copy...
    X = X / (X.float().square().sum().sqrt().to(torch.bfloat16) * 1.02 + 1e-6)  # ...normalised in bf16
    # NorMuon on X.float(), per row (rows >= cols) or per column; EMA weight 1 - bf16(beta2)
    v = X.float().square().mean(dim=1 if rows >= cols else 0, keepdim=True)
    ema_weight = 1 - torch.tensor(beta2, dtype=torch.bfloat16).float()
    buf2 = buf2 + ema_weight * (v - buf2)
    scaled = X.float() / buf2.sqrt()
    scale = torch.linalg.matrix_norm(X.float()) / torch.linalg.matrix_norm(scaled)
    g = X * (scale / buf2.sqrt()).to(torch.bfloat16)  # the scale is cast back to bf16: g leaves in bf16
    lr16 = torch.tensor(lr * max(1.0, rows / cols) ** 0.5, dtype=torch.bfloat16)
    wd16 = torch.tensor(wd, dtype=torch.bfloat16)
    update = (lr16 * g).float()  # a bf16 product
    decay = (lr16 * wd16).float() * p * (g.float() * p >= 0).float()  # float32, p is float32
    return p - (update + decay), buf, buf2


@pytest.mark.parametrize("shape", [(64, 16), (16, 64)])
def test_muon_casts_match_the_reference_in_bf16(monkeypatch, shape):
    """With COMPUTE_DTYPE bf16 (CUDA), the Muon step rounds lr, wd and 1 - beta2 to bf16 and forms lr * g in
    bf16, as the reference does; a float32 update or an unrounded beta2 misses by far more than the tolerance
    (bf16(0.04) = 0.0400390625, 1 - bf16(0.95) = 0.05078125)."""
    monkeypatch.setattr(train, "COMPUTE_DTYPE", torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.05)
    opt = train.MuonAdamW([dict(kind="muon", params=[p], lr=0.04, momentum=0.85, ns_steps=0, beta2=0.95,
                                weight_decay=0.2)])
    ref_p, ref_buf = p.detach().clone(), torch.zeros(shape)
    ref_buf2 = torch.zeros(shape[0], 1) if shape[0] >= shape[1] else torch.zeros(1, shape[1])
    for momentum, lr, wd in [(0.85, 0.04, 0.2), (0.9, 0.03, 0.15), (0.95, 0.02, 0.1)]:
        grad = torch.randn(shape, generator=gen)
        opt.param_groups[0].update(momentum=momentum, lr=lr, weight_decay=wd)
        p.grad = grad.clone()
        before = p.detach().clone()
        opt.step()
        ref_p, ref_buf, ref_buf2 = naive_muon_bf16(ref_p, grad, ref_buf, ref_buf2, lr, momentum, wd, 0.95)
        assert torch.allclose(opt.state[p]["second_momentum_buffer"][0], ref_buf2, rtol=1e-5, atol=0)
        # The step taken: where float32 reductions happen in another order, a bf16 rounding can flip (one
        # element in ~10^4); a float32 lr * g or an unrounded lr would move almost every element by 2e-4 to 2e-3.
        step, ref_step = before - p.detach(), before - ref_p
        close = (step - ref_step).abs() <= 1e-4 * ref_step.abs()
        assert close.float().mean() > 0.99
        assert torch.allclose(step, ref_step, rtol=1e-2, atol=0)
        ref_p = p.detach().clone()


# ---------------------------------------------------------------------------
# Precision by capability: hardware.select_precision, with the CPU's probe mocked
# ---------------------------------------------------------------------------

import hardware  # noqa: E402


def probe_answering(speedup, calls=None):
    """A stand-in for hardware.bf16_matmul_speedup that measures nothing and answers `speedup`."""
    def probe(model_dim):
        if calls is not None:
            calls.append(model_dim)
        return speedup, 0.010, 0.010 / speedup
    return probe


@pytest.mark.parametrize("speedup, dtype, words", [
    (3.9, torch.bfloat16, "bf16 autocast (bf16 matmul 3.9x faster than float32 on this CPU"),  # AMX, AVX512-BF16
    (1.5, torch.bfloat16, "bf16 autocast (bf16 matmul 1.5x faster"),
    (1.2, torch.float32, "float32 (bf16 matmul 1.2x faster"),  # not enough to pay for the casts
    (0.04, torch.float32, "float32 (bf16 matmul 25x slower than float32 on this CPU"),  # AVX2 only: this machine
])
def test_cpu_precision_follows_the_probe(monkeypatch, speedup, dtype, words):
    monkeypatch.delenv("AUTORESEARCH_PRECISION")
    calls = []
    chosen, line = hardware.select_precision(256, probe=probe_answering(speedup, calls))
    assert chosen == dtype and line.startswith(words), line
    assert calls == [256]  # measured at the model's width
    assert "width 256" in line and "\n" not in line


@pytest.mark.parametrize("forced, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32), (" BF16 ", torch.bfloat16)])
@pytest.mark.parametrize("speedup", [3.9, 0.04])
def test_forced_precision_skips_the_probe(monkeypatch, forced, dtype, speedup):
    monkeypatch.setenv("AUTORESEARCH_PRECISION", forced)
    calls = []
    chosen, line = hardware.select_precision(256, probe=probe_answering(speedup, calls))
    assert chosen == dtype and line.endswith("(forced by AUTORESEARCH_PRECISION)") and calls == []


def test_unknown_or_impossible_forced_precision_stops_with_one_line(monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_PRECISION", "fp16")
    with pytest.raises(SystemExit, match=r"^AUTORESEARCH_PRECISION='fp16': expected bf16 or fp32$"):
        hardware.select_precision(256, probe=probe_answering(3.9))
    # a device that cannot compute in bf16: here, one this machine does not have at all
    monkeypatch.setenv("AUTORESEARCH_PRECISION", "bf16")
    monkeypatch.setattr(hardware, "DEVICE_TYPE", "mps" if not torch.backends.mps.is_available() else "meta-none")
    with pytest.raises(SystemExit) as e:
        hardware.select_precision(256, probe=probe_answering(3.9))
    assert str(e.value).startswith("AUTORESEARCH_PRECISION=bf16: this ") and "cannot compute in bf16" in str(e.value)
    assert "\n" not in str(e.value)


def test_mps_keeps_float32_and_cuda_goes_by_capability(monkeypatch):
    monkeypatch.delenv("AUTORESEARCH_PRECISION")
    calls = []
    monkeypatch.setattr(hardware, "DEVICE_TYPE", "mps")
    assert hardware.select_precision(256, probe=probe_answering(3.9, calls)) == (torch.float32, "float32 (default on mps)")
    monkeypatch.setattr(hardware, "ON_CUDA", True)
    monkeypatch.setattr(hardware, "DEVICE_TYPE", "cuda")
    for capability, expected in [((9, 0), "bf16 autocast (compute capability 9.0)"),
                                 ((7, 5), "fp16 autocast, dynamic loss scaling (compute capability 7.5)")]:
        monkeypatch.setattr(hardware, "CAPABILITY", capability)
        assert hardware.select_precision(512, probe=probe_answering(0.04, calls))[1] == expected
    assert calls == []  # the probe is for CPUs only


def test_the_probe_times_both_dtypes_at_the_model_width():
    """The real probe, small: positive times, and the speedup is their ratio (on this AVX2-only machine bf16 is
    the slower one; the test does not assume which)."""
    speedup, fp32_s, bf16_s = hardware.bf16_matmul_speedup(64, rows=32)
    assert fp32_s > 0 and bf16_s > 0 and speedup == pytest.approx(fp32_s / bf16_s)


def test_cpu_bf16_keeps_float32_weights_and_muon(monkeypatch):
    """With bf16 autocast on a CPU the embeddings and Muon stay float32 (COMPUTE_DTYPE: bf16 storage gained nothing
    more there); the rotary tables follow autocast, and the loss still falls."""
    assert train.COMPUTE_DTYPE == torch.float32 and not train.ON_CUDA
    losses, _, model = train_steps(monkeypatch, torch.bfloat16, steps=3)
    assert model.cos.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert losses[-1] < losses[0]
