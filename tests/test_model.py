"""The GPT in train.py against the reference's model: init, structure, FLOPs and a naive forward."""

import math

import pytest
import torch
import torch.nn.functional as F

import train
from train import GPT, GPTConfig


def build(config, seed=0):
    """As train.py builds it: on the meta device, then to_empty on the CPU, then init_weights."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(config)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    return model


def small_config(**overrides):
    kw = dict(sequence_len=16, vocab_size=64, n_layer=4, n_head=2, n_kv_head=2, n_embd=64, window_pattern="SSSL")
    kw.update(overrides)
    return GPTConfig(**kw)


def ve_layers(n_layer):
    return [i for i in range(n_layer) if i % 2 == (n_layer - 1) % 2]


# ---------------------------------------------------------------------------
# Init and structure
# ---------------------------------------------------------------------------

def test_init_statistics():
    d = 128
    model = build(GPTConfig(sequence_len=32, vocab_size=1024, n_layer=3, n_head=2, n_kv_head=2, n_embd=d))
    s = math.sqrt(3) / math.sqrt(d)
    wte = model.transformer.wte.weight.float()
    assert wte.mean().abs() < 0.02 and wte.std().item() == pytest.approx(1.0, rel=0.02)
    lm = model.lm_head.weight
    assert lm.std().item() == pytest.approx(0.001, rel=0.02)
    uniforms = []
    for block in model.transformer.h:
        uniforms += [block.attn.c_q.weight, block.attn.c_k.weight, block.attn.c_v.weight, block.mlp.c_fc.weight]
        assert (block.attn.c_proj.weight == 0).all()
        assert (block.mlp.c_proj.weight == 0).all()
        if block.attn.ve_gate is not None:
            assert (block.attn.ve_gate.weight == 0).all()
    uniforms += [ve.weight.float() for ve in model.value_embeds.values()]
    for w in uniforms:
        assert w.abs().max() <= s
        assert w.abs().max() > 0.98 * s  # fills the whole interval, not a narrower one
        assert w.std().item() == pytest.approx(s / math.sqrt(3), rel=0.03)
        assert w.mean().abs() < 0.05 * s
    assert (model.resid_lambdas == 1).all()
    assert torch.allclose(model.x0_lambdas, torch.full((3,), 0.1))
    # COMPUTE_DTYPE is float32 on the CPU (bf16 on CUDA) for the embeddings
    assert train.COMPUTE_DTYPE == torch.float32
    assert model.transformer.wte.weight.dtype == train.COMPUTE_DTYPE
    assert all(ve.weight.dtype == train.COMPUTE_DTYPE for ve in model.value_embeds.values())
    assert not any(p.is_meta for p in model.parameters())
    assert torch.isfinite(model.cos).all() and model.cos.shape == (1, 320, 1, 32)


@pytest.mark.parametrize("n_layer", [1, 2, 3, 4, 5, 8])
def test_value_embedding_layers(n_layer):
    with torch.device("meta"):
        model = GPT(small_config(n_layer=n_layer))
    expected = ve_layers(n_layer)
    assert expected[-1] == n_layer - 1
    assert sorted(int(k) for k in model.value_embeds.keys()) == expected
    assert [i for i, b in enumerate(model.transformer.h) if b.attn.ve_gate is not None] == expected
    for i in expected:
        assert model.value_embeds[str(i)].weight.shape == (64, 2 * 32)  # vocab x kv_dim
        assert model.transformer.h[i].attn.ve_gate.weight.shape == (2, 32)  # 32 channels -> n_kv_head


@pytest.mark.parametrize("n_layer,pattern,expected", [
    (1, "SSSL", "L"),
    (3, "SSSL", "SSL"),
    (4, "SSSL", "SSSL"),
    (5, "SSSL", "SSSLL"),
    (6, "SSSL", "SSSLSL"),
    (8, "SSSL", "SSSLSSSL"),
    (9, "SSSL", "SSSLSSSLL"),
    (5, "L", "LLLLL"),
    (4, "SL", "SLSL"),
    (3, "S", "SSL"),
])
def test_window_sizes(n_layer, pattern, expected):
    T = 32
    with torch.device("meta"):
        model = GPT(small_config(n_layer=n_layer, window_pattern=pattern, sequence_len=T))
    assert model.window_sizes == [T if c == "L" else T // 2 for c in expected]


def test_reference_config_param_count(monkeypatch):
    monkeypatch.setattr(train, "ASPECT_RATIO", 64)
    monkeypatch.setattr(train, "HEAD_DIM", 128)
    monkeypatch.setattr(train, "WINDOW_PATTERN", "SSSL")
    monkeypatch.setattr(train, "MAX_SEQ_LEN", 2048)
    config = train.build_model_config(8, 8192)
    assert (config.n_embd, config.n_head, config.n_kv_head, config.n_layer) == (512, 4, 4, 8)
    assert (config.sequence_len, config.vocab_size, config.window_pattern) == (2048, 8192, "SSSL")
    with torch.device("meta"):
        model = GPT(config)
    n = sum(p.numel() for p in model.parameters())
    d, V = 512, 8192
    expected = (2 * V * d              # wte, lm_head
                + 4 * V * d            # value embeddings on layers 1, 3, 5, 7
                + 8 * 12 * d * d       # q, k, v, proj (4 d^2) + MLP (8 d^2) per layer
                + 4 * 32 * 4           # VE gates
                + 2 * 8)               # resid and x0 lambdas
    assert n == expected
    assert round(n / 1e6, 1) == 50.3
    assert model.window_sizes == [1024, 1024, 1024, 2048, 1024, 1024, 1024, 2048]


@pytest.mark.parametrize("depth,aspect,head_dim,dim,heads", [
    (8, 64, 128, 512, 4), (4, 32, 64, 128, 2), (6, 64, 128, 384, 3), (5, 50, 128, 256, 2), (3, 10, 64, 64, 1),
])
def test_build_model_config(monkeypatch, depth, aspect, head_dim, dim, heads):
    monkeypatch.setattr(train, "ASPECT_RATIO", aspect)
    monkeypatch.setattr(train, "HEAD_DIM", head_dim)
    config = train.build_model_config(depth, 1000)
    assert (config.n_embd, config.n_head, config.n_kv_head, config.n_layer, config.vocab_size) == \
        (dim, heads, heads, depth, 1000)
    assert config.sequence_len == train.MAX_SEQ_LEN


def test_estimate_flops_by_hand():
    V, d, L, H, T = 64, 32, 3, 2, 16
    model = build(GPTConfig(sequence_len=T, vocab_size=V, n_layer=L, n_head=H, n_kv_head=H, n_embd=d,
                            window_pattern="SL"))
    assert model.window_sizes == [8, 16, 16]
    # matmul params: lm_head + per layer (q, k, v, proj: 4 d^2; MLP: 8 d^2) + VE gates on layers 0 and 2
    matmul_params = V * d + L * 12 * d * d + 2 * 32 * H
    attn = 12 * H * (d // H) * (8 + 16 + 16)
    assert model.estimate_flops() == 6 * matmul_params + attn
    # and the excluded parameters are exactly wte, value embeddings and the 2L scalars
    total = sum(p.numel() for p in model.parameters())
    assert total - matmul_params == V * d + 2 * V * d + 2 * L


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------

def test_output_shapes_softcap_and_initial_loss():
    V = 512
    model = build(small_config(vocab_size=V))
    idx = torch.randint(0, V, (3, 16), generator=torch.Generator().manual_seed(1))
    tgt = torch.randint(0, V, (3, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(idx)
        loss = model(idx, tgt)
        per_tok = model(idx, tgt, reduction="none")
        # a shorter sequence than sequence_len works too
        assert model(idx[:, :5]).shape == (3, 5, V)
    assert logits.shape == (3, 16, V) and logits.dtype == torch.float32
    assert loss.shape == () and per_tok.shape == (48,)
    assert loss.item() == pytest.approx(per_tok.mean().item(), rel=1e-6)
    assert loss.item() == pytest.approx(math.log(V), abs=0.01)  # lm_head ~ N(0, 0.001): near-uniform
    # soft cap: huge lm_head weights still give |logit| <= 15 (float32 tanh rounds to 1 far out)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 100)
        big = model(idx)
    assert big.abs().max() <= 15 and big.abs().max() > 14.9


def test_ignore_index():
    V = 64
    model = build(small_config(vocab_size=V))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5, generator=g)
    idx = torch.randint(0, V, (2, 16), generator=g)
    tgt = torch.randint(0, V, (2, 16), generator=g)
    tgt_ign = tgt.clone()
    tgt_ign[0, :5] = -1
    tgt_ign[1, 10] = -1
    keep = (tgt_ign != -1).view(-1)
    with torch.no_grad():
        full = model(idx, tgt, reduction="none")
        part = model(idx, tgt_ign, reduction="none")
        mean = model(idx, tgt_ign)
    assert (part[~keep] == 0).all()
    assert torch.allclose(part[keep], full[keep])
    assert mean.item() == pytest.approx(full[keep].mean().item(), rel=1e-6)
    assert mean.item() != pytest.approx(full.mean().item(), rel=1e-4)


def rotate(x, positions, base=10000.0):
    """Rotary embedding: the pair (x[i], x[i + D/2]) turned by angle -pos * base^(-2i/D). x: (..., T, D)."""
    D = x.shape[-1]
    half = D // 2
    out = torch.empty_like(x)
    for i in range(half):
        theta = positions.to(x.dtype) * base ** (-2 * i / D)
        c, s = torch.cos(theta), torch.sin(theta)
        a, b = x[..., i], x[..., i + half]
        out[..., i] = c * a + s * b
        out[..., i + half] = -s * a + c * b
    return out


def rms(x):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)


def naive_forward(model, idx):
    """The reference's model written out loop by loop in float64, reading the weights of `model`."""
    cfg = model.config
    P = {name: p.detach().double() for name, p in model.named_parameters()}
    B, T = idx.shape
    d, H, Hkv = cfg.n_embd, cfg.n_head, cfg.n_kv_head
    D = d // H
    pattern = cfg.window_pattern
    windows = [cfg.sequence_len if pattern[i % len(pattern)] == "L" else cfg.sequence_len // 2
               for i in range(cfg.n_layer)]
    windows[-1] = cfg.sequence_len
    pos = torch.arange(T)

    x = rms(P["transformer.wte.weight"][idx])
    x0 = x
    for layer in range(cfg.n_layer):
        pre = f"transformer.h.{layer}."
        x = P["resid_lambdas"][layer] * x + P["x0_lambdas"][layer] * x0
        h = rms(x)
        q = (h @ P[pre + "attn.c_q.weight"].T).view(B, T, H, D).transpose(1, 2)    # (B, H, T, D)
        k = (h @ P[pre + "attn.c_k.weight"].T).view(B, T, Hkv, D).transpose(1, 2)
        v = (h @ P[pre + "attn.c_v.weight"].T).view(B, T, Hkv, D).transpose(1, 2)
        if layer % 2 == (cfg.n_layer - 1) % 2:
            ve = P[f"value_embeds.{layer}.weight"][idx].view(B, T, Hkv, D).transpose(1, 2)
            gate = 2 * torch.sigmoid(h[..., :32] @ P[pre + "attn.ve_gate.weight"].T)  # (B, T, Hkv)
            v = v + gate.transpose(1, 2)[..., None] * ve
        q, k = rms(rotate(q, pos)), rms(rotate(k, pos))
        y = torch.zeros(B, H, T, D, dtype=torch.float64)
        w = windows[layer]
        for b in range(B):
            for hd in range(H):
                kv = hd * Hkv // H
                for i in range(T):
                    js = [j for j in range(T) if i - w <= j <= i]
                    scores = torch.stack([q[b, hd, i] @ k[b, kv, j] for j in js]) / math.sqrt(D)
                    p = torch.softmax(scores, dim=0)
                    y[b, hd, i] = sum(p[n] * v[b, kv, j] for n, j in enumerate(js))
        x = x + y.transpose(1, 2).reshape(B, T, d) @ P[pre + "attn.c_proj.weight"].T
        h = rms(x)
        x = x + torch.relu(h @ P[pre + "mlp.c_fc.weight"].T) ** 2 @ P[pre + "mlp.c_proj.weight"].T
    logits = rms(x) @ P["lm_head.weight"].T
    return 15 * torch.tanh(logits / 15)


def randomise(model, seed):
    """Give every parameter a non-trivial value (the init zeroes c_proj and the VE gates)."""
    g = torch.Generator().manual_seed(seed)
    d = model.config.n_embd
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "resid_lambdas":
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name == "x0_lambdas":
                p.copy_(torch.rand(p.shape, generator=g) * 0.5)
            elif name == "lm_head.weight":
                p.copy_(torch.randn(p.shape, generator=g) * 20 / math.sqrt(d))  # logits reach the soft cap
            elif "ve_gate" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.dim() == 2 and "wte" not in name and "value_embeds" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            else:
                p.copy_(torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("T", [16, 11])
def test_forward_matches_naive_reference(T):
    # 4 layers with "SSSL": windows 8, 8, 8, 16; value embeddings on layers 1 and 3
    model = build(small_config())
    randomise(model, seed=4)
    idx = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(5))
    expected = naive_forward(model, idx)
    assert expected.abs().max() > 10  # the soft cap is exercised
    with torch.no_grad():
        got32 = model(idx)
        got64 = model.double()(idx)
    assert torch.allclose(got64.double(), expected, atol=2e-5, rtol=0)
    assert torch.allclose(got32.double(), expected, atol=2e-3, rtol=0)
    # and the loss is cross-entropy of those logits
    tgt = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        loss = model(idx, tgt, reduction="none")
    ref = F.cross_entropy(expected.view(-1, 64), tgt.view(-1), reduction="none")
    assert torch.allclose(loss.double(), ref, atol=1e-4)


def test_window_limits_attention():
    """With window w, position i must not depend on tokens before i - w (and never on later tokens)."""
    model = build(small_config(n_layer=1, window_pattern="L"))
    randomise(model, seed=7)
    model.window_sizes = [4]  # a 1-layer model: only attention mixes positions
    g = torch.Generator().manual_seed(8)
    idx = torch.randint(0, 64, (1, 16), generator=g)
    with torch.no_grad():
        base = model(idx)
        # change token 5: positions 5..9 (5 <= i <= 5 + 4) change, all others do not
        idx2 = idx.clone()
        idx2[0, 5] = (idx[0, 5] + 1) % 64
        diff = (model(idx2) - base).abs().amax(-1)[0]
    changed = (diff > 1e-6).nonzero().flatten().tolist()
    assert changed == [5, 6, 7, 8, 9]


def test_rotary_relative_position():
    head_dim, T = 32, 64
    with torch.device("meta"):
        model = GPT(small_config(sequence_len=T))
    model.to_empty(device="cpu")
    model.init_weights()
    cos, sin = model.cos[:, :T], model.sin[:, :T]
    assert cos.shape == (1, T, 1, head_dim // 2)
    g = torch.Generator().manual_seed(9)
    q = torch.randn(head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(head_dim, generator=g, dtype=torch.float64)
    rq = train.apply_rotary_emb(q.float().expand(1, T, 1, head_dim), cos, sin)[0, :, 0].double()
    rk = train.apply_rotary_emb(k.float().expand(1, T, 1, head_dim), cos, sin)[0, :, 0].double()
    dots = rq @ rk.T  # dots[m, n] = <R_m q, R_n k>
    for offset in (-7, -1, 0, 3, 20):
        diag = torch.diagonal(dots, offset=offset)
        assert (diag - diag[0]).abs().max() < 1e-4, offset
    assert (dots[0, 0] - dots[0, 3]).abs() > 1e-2  # it does depend on the offset
    assert torch.allclose(rq.norm(dim=-1), q.norm().expand(T), rtol=1e-5)  # a rotation
    # the convention: pairs (i, i + D/2), matching the naive reference above
    assert torch.allclose(rq, rotate(q.expand(T, head_dim), torch.arange(T)), atol=1e-4)
