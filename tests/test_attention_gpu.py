"""Attention backends on a CUDA GPU (skipped without one): FA3, compiled FlexAttention and SDPA in bf16, each
through hardware.FlashAttention (FA3's call, which train.py's model makes), against the naive float64 reference of test_attention.py, and each inside the compiled model.

FA3 is skipped when the kernel hub cannot be reached. This process imported train.py and hardware.py with the CPU profile
(see conftest.py); the backends themselves pick their CUDA code from the tensors' device.
"""

import types

import pytest
import torch

import hardware
import train
from test_attention import attention, naive_attention, rel_err, tiny_model

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
]

# bf16 rounds to 8 bits of mantissa (relative 2**-9); the kernels also round the softmax weights to bf16.
FORWARD_TOL, GRAD_TOL = 1e-2, 2e-2


@pytest.fixture(scope="module")
def fa3_loaded():
    return hardware.load_fa3(torch.cuda.get_device_capability(), torch.version.hip is not None)


@pytest.fixture(params=["fa3", "flex", "sdpa"])
def backend(request, monkeypatch, fa3_loaded):
    """A FlashAttention on one backend, also installed as the one train.py's model calls."""
    module = None
    if request.param == "fa3":
        module, reason = fa3_loaded
        if module is None:
            pytest.skip(reason)
    fa3 = hardware.FlashAttention(request.param, module)
    monkeypatch.setattr(train, "fa3", fa3)
    return fa3


# (B, T, H, H_kv, D, window), as on CPU, with head dims FA3 supports; the last two are the reference shape.
CASES = [
    (2, 256, 2, 2, 64, 256),
    (2, 256, 2, 2, 64, 128),
    (2, 256, 2, 2, 64, 5),
    (2, 256, 2, 2, 64, 0),
    (1, 200, 3, 3, 64, 17),
    (2, 256, 4, 2, 64, 100),
    (4, 2048, 4, 4, 128, 2048),
    (4, 2048, 4, 4, 128, 1024),
]


@pytest.mark.parametrize("B,T,H,H_kv,D,window", CASES)
def test_bf16_forward_and_gradients_match_naive(backend, B, T, H, H_kv, D, window):
    gen = torch.Generator(device="cuda").manual_seed(T * 1000 + window)
    q = torch.randn(B, T, H, D, generator=gen, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(B, T, H_kv, D, generator=gen, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    y = attention(backend, q, k, v, window)
    y_ref = naive_attention(q, k, v, window)
    assert y.shape == q.shape and y.dtype == torch.bfloat16
    assert rel_err(y, y_ref) < FORWARD_TOL

    dy = torch.randn(y.shape, generator=gen, device="cuda", dtype=torch.bfloat16)
    grads = torch.autograd.grad(y, (q, k, v), dy)
    grads_ref = torch.autograd.grad(y_ref, (q, k, v), dy.double())
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert rel_err(g, g_ref) < GRAD_TOL, f"d{name}"


def test_compiled_model_matches_naive_attention(backend, monkeypatch):
    """The whole model compiled as train.py does, masks built first; flex and SDPA must trace as one graph."""
    monkeypatch.setattr(train, "COMPUTE_DTYPE", torch.bfloat16)  # the CUDA profile: bf16 embeddings and rotary
    model, idx = tiny_model(seq_len=256, n_embd=256, n_head=2)  # head_dim 128
    model, idx = model.cuda(), idx.cuda()
    x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    backend.build_masks(256, model.window_sizes, "cuda")
    compiled = torch.compile(model, dynamic=False, fullgraph=backend.backend != "fa3")  # FA3 is the reference's own op
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = compiled(x, y)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    naive = lambda q, k, v, causal, window_size: naive_attention(q, k, v, window_size[0]).to(q.dtype)  # noqa: E731
    monkeypatch.setattr(train, "fa3", types.SimpleNamespace(flash_attn_func=naive))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        loss_ref = model(x, y)
    assert abs(loss.item() - loss_ref.item()) < 2e-2
