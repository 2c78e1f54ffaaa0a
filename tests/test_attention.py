"""Attention backends on CPU: SDPA and FlexAttention behind hardware.FlashAttention (FA3's call, which train.py's
model makes) against a naive float64 reference.

Every backend must compute the same function: causal attention where query i sees
keys j with i - window <= j <= i (Flash Attention's window_size=(window, 0)).
FlexAttention runs eagerly on CPU (exact, unfused); its compiled CUDA kernel and FA3
are checked in test_attention_gpu.py.
"""

import functools
import importlib.util
import math
import os
import subprocess
import sys
import types

import pytest
import torch

import hardware
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

CPU_BACKENDS = ["sdpa", "flex"]


def naive_attention(q, k, v, window):
    """Masked softmax in float64, written independently of train.py. (B, T, H, D) in, (B, T, H, D) float64 out."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    groups = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    T = q.size(2)
    ones = torch.ones(T, T, dtype=torch.bool, device=q.device)
    allowed = torch.tril(ones) & ~torch.tril(ones, diagonal=-(window + 1))  # j <= i and not j < i - window
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.size(-1))
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).transpose(1, 2)


def rel_err(x, ref):
    """Largest absolute difference relative to the reference's largest magnitude (absolute if it is all zeros)."""
    return (x.double() - ref).abs().max().item() / (ref.abs().max().item() or 1.0)


@pytest.fixture(params=CPU_BACKENDS)
def backend(request, monkeypatch):
    """A FlashAttention on one backend, also installed as the one train.py's model calls."""
    fa3 = hardware.FlashAttention(request.param)
    monkeypatch.setattr(train, "fa3", fa3)
    return fa3


def attention(fa3, q, k, v, window):
    return fa3.flash_attn_func(q, k, v, causal=True, window_size=(window, 0))


# (B, T, H, H_kv, D, window): full context (w = T - 1 and the model's w = T), half (the model's S),
# small windows down to self-only, T not a multiple of FlexAttention's 128-block, grouped kv heads,
# and the model's own shapes (CPU profile: T 256, 2 heads of 64; reference: T 2048, 4 heads of 128).
CASES = [
    (2, 64, 2, 2, 16, 63),
    (2, 64, 2, 2, 16, 64),
    (2, 64, 2, 2, 16, 32),
    (2, 64, 2, 2, 16, 5),
    (2, 64, 2, 2, 16, 1),
    (2, 64, 2, 2, 16, 0),
    (1, 200, 3, 3, 32, 150),
    (1, 200, 3, 3, 32, 17),
    (2, 64, 4, 2, 16, 20),
    (2, 256, 2, 2, 64, 256),
    (2, 256, 2, 2, 64, 128),
    (1, 2048, 4, 4, 128, 2048),
    (1, 2048, 4, 4, 128, 1024),
]


@functools.cache
def reference(B, T, H, H_kv, D, window):
    """Inputs, an output gradient, and the naive output and input gradients for one case (shared by the backends)."""
    gen = torch.Generator().manual_seed(T * 1000 + window)
    q = torch.randn(B, T, H, D, generator=gen, requires_grad=True)
    k, v = (torch.randn(B, T, H_kv, D, generator=gen, requires_grad=True) for _ in range(2))
    dy = torch.randn(B, T, H, D, generator=gen)
    y_ref = naive_attention(q, k, v, window)
    grads_ref = torch.autograd.grad(y_ref, (q, k, v), dy.double())
    return (q, k, v), dy, y_ref.detach(), grads_ref


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-T{}-H{}-Hkv{}-D{}-w{}".format(*c))
def test_forward_and_gradients_match_naive(backend, case):
    (q, k, v), dy, y_ref, grads_ref = reference(*case)
    y = attention(backend, q, k, v, case[-1])
    assert y.shape == q.shape and y.dtype == q.dtype
    assert rel_err(y, y_ref) < 1e-5
    grads = torch.autograd.grad(y, (q, k, v), dy)
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert rel_err(g, g_ref) < 1e-4, f"d{name}"


@pytest.mark.parametrize("window", [0, 1, 2, 5, 8])
def test_window_convention(backend, window):
    """Equal scores and one-hot values make the output the attention weights: 1/n on exactly keys i-window..i."""
    T = 8
    q = k = torch.zeros(1, T, 1, T)
    v = torch.eye(T).view(1, T, 1, T)
    weights = attention(backend, q, k, v, window)[0, :, 0]
    for i in range(T):
        seen = list(range(max(0, i - window), i + 1))
        expected = torch.zeros(T)
        expected[seen] = 1 / len(seen)
        torch.testing.assert_close(weights[i], expected, rtol=0, atol=1e-6)


def test_masks_built_once(backend):
    backend.build_masks(96, [96, 48, 48], "cpu")
    assert sorted(backend.masks) == [(96, 48, "cpu"), (96, 96, "cpu")]
    for window in (96, 48):
        assert backend.mask(96, window, "cpu") is backend.masks[(96, window, "cpu")]
    if backend.backend == "sdpa":
        assert backend.masks[(96, 96, "cpu")] is None  # full window: plain causal kernel
    else:
        assert backend.masks[(96, 48, "cpu")] is not backend.masks[(96, 96, "cpu")]


def tiny_model(seq_len=64, n_embd=64, n_head=2):
    """A 3-layer GPT with windows [seq_len // 2, seq_len, seq_len] and a batch of 2 x (seq_len + 1) token ids."""
    config = train.GPTConfig(sequence_len=seq_len, vocab_size=97, n_layer=3, n_head=n_head, n_kv_head=n_head,
                             n_embd=n_embd, window_pattern="SL")
    torch.manual_seed(0)
    model = train.GPT(config)
    model.init_weights()
    with torch.no_grad():  # the zero-initialised projections would hide attention from the loss
        for block in model.transformer.h:
            torch.nn.init.normal_(block.attn.c_proj.weight, std=0.1)
            torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.1)
    idx = torch.randint(0, 97, (2, seq_len + 1), generator=torch.Generator().manual_seed(1))
    return model, idx


def loss_and_grads(model, idx):
    model.zero_grad()
    loss = model(idx[:, :-1].contiguous(), idx[:, 1:].contiguous())
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_model_matches_naive_attention(backend, monkeypatch):
    model, idx = tiny_model()
    assert model.window_sizes == [32, 64, 64]
    loss, grads = loss_and_grads(model, idx)
    naive = lambda q, k, v, causal, window_size: naive_attention(q, k, v, window_size[0]).to(q.dtype)  # noqa: E731
    monkeypatch.setattr(train, "fa3", types.SimpleNamespace(flash_attn_func=naive))
    loss_ref, grads_ref = loss_and_grads(model, idx)
    assert abs(loss.item() - loss_ref.item()) < 1e-5
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref.double()) < 1e-4


def test_compiled_model_reads_cached_masks_without_graph_break(backend):
    """With the masks built first, the compiled forward and backward trace as one graph (fullgraph=True)."""
    model, idx = tiny_model()
    backend.build_masks(64, model.window_sizes, "cpu")
    loss_ref, _ = loss_and_grads(model, idx)
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
    loss, _ = loss_and_grads(compiled, idx)
    assert abs(loss.item() - loss_ref.item()) < 1e-5


@pytest.mark.parametrize("forced,expected", [("", "sdpa"), ("sdpa", "sdpa"), ("flex", "flex"), (" FLEX ", "flex")])
def test_backend_selection_on_cpu(monkeypatch, forced, expected):
    monkeypatch.setenv("AUTORESEARCH_ATTENTION", forced)
    backend, reason, fa3 = hardware.select_attention_backend(None, False)
    assert (backend, fa3) == (expected, None)
    assert reason == ("forced by AUTORESEARCH_ATTENTION" if forced else "default on cpu")


@pytest.mark.parametrize("forced,message", [("fa3", "needs CUDA"), ("flash", "expected fa3, flex or sdpa")])
def test_forcing_a_backend_that_cannot_run_exits(monkeypatch, forced, message):
    monkeypatch.setenv("AUTORESEARCH_ATTENTION", forced)
    with pytest.raises(SystemExit, match=message):
        hardware.select_attention_backend(None, False)


def test_import_on_cpu_is_offline_and_skips_fa3():
    """Importing train.py (and so hardware.py) on CPU neither imports `kernels` nor opens a socket."""
    code = ("import socket, sys\n"
            "sys.modules['kernels'] = None\n"
            "def no_network(*a, **k): raise AssertionError('network access')\n"
            "socket.socket.connect = no_network\n"
            "import train\n"
            "print(train.ATTENTION_BACKEND, train.fa3.fa3)\n")
    env = dict(os.environ, AUTORESEARCH_DEVICE="cpu", AUTORESEARCH_ATTENTION="")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["sdpa", "None"]


@pytest.mark.parametrize("T,window", [(1, 0), (7, 0), (7, 3), (7, 6), (7, 50), (2048, 1024)])
def test_bench_counts_attended_pairs(T, window):
    """bench/attention.py's FLOP count uses the exact number of (query, key) pairs the mask allows."""
    spec = importlib.util.spec_from_file_location("bench_attention", os.path.join(ROOT, "bench", "attention.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ones = torch.ones(T, T, dtype=torch.bool)
    assert bench.attended_pairs(T, window) == (torch.tril(ones) & ~torch.tril(ones, diagonal=-(window + 1))).sum()


def test_fa3_is_called_exactly_as_the_reference_calls_it(monkeypatch):
    """Where FA3 runs, the model's call reaches the FA3 build unchanged: the same tensors, causal=True and
    window_size=(w, 0) per layer, and FA3's output is the layer's attention output (nothing added around it)."""
    calls = []

    def fa3_build(q, k, v, causal, window_size):
        calls.append((q, k, v, causal, window_size))
        return naive_attention(q, k, v, window_size[0]).to(q.dtype)

    monkeypatch.setattr(train, "fa3", hardware.FlashAttention("fa3", types.SimpleNamespace(flash_attn_func=fa3_build)))
    model, idx = tiny_model()
    loss, _ = loss_and_grads(model, idx)
    assert [(c[3], c[4]) for c in calls] == [(True, (w, 0)) for w in model.window_sizes]
    assert all(c[0].shape == (2, 64, 2, 32) and c[1].shape == c[2].shape == (2, 64, 2, 32) for c in calls)
    monkeypatch.setattr(train, "fa3", types.SimpleNamespace(flash_attn_func=fa3_build))  # the build itself
    loss_direct, _ = loss_and_grads(model, idx)
    assert loss.item() == loss_direct.item()
