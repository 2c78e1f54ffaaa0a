"""MuonAdamW and the schedules of train.py against the reference's.

The references below are written from the SPEC text, one matrix at a time. On the
CPU, train.py orthogonalises in float32 (COMPUTE_DTYPE), so the references do too.
"""

import pytest
import torch

import train
from train import GPT, GPTConfig, MuonAdamW

PE_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


# ---------------------------------------------------------------------------
# Reference implementations
# ---------------------------------------------------------------------------

def ref_polar_express(g, steps=5):
    X = g / (torch.linalg.matrix_norm(g) * 1.02 + 1e-6)
    rows, cols = X.shape
    for a, b, c in PE_COEFFS[:steps]:
        if rows > cols:
            A = X.T @ X
            X = a * X + X @ (b * A + c * A @ A)
        else:
            A = X @ X.T
            X = a * X + (b * A + c * A @ A) @ X
    return X


class RefMuon:
    """SPEC's Muon step for one matrix at a time."""

    def __init__(self, params):
        self.params = [p.detach().clone() for p in params]
        self.unsure = [torch.zeros_like(p, dtype=torch.bool) for p in self.params]
        self.alt = [p.clone() for p in self.params]
        self.buf = [torch.zeros_like(p) for p in self.params]
        self.buf2 = [torch.zeros(p.shape[0], 1) if p.shape[0] >= p.shape[1] else torch.zeros(1, p.shape[1])
                     for p in self.params]

    def step(self, grads, lr, momentum, wd, beta2=0.95, ns_steps=5):
        for i, (p, g) in enumerate(zip(self.params, grads)):
            rows, cols = p.shape
            # 1. Nesterov momentum
            self.buf[i] = self.buf[i] + (1 - momentum) * (g - self.buf[i])
            g = g + momentum * (self.buf[i] - g)
            # 2. Polar Express
            X = ref_polar_express(g, ns_steps)
            # 3. NorMuon: per row (rows >= cols) or per column, keep the Frobenius norm
            v = (X * X).mean(dim=1, keepdim=True) if rows >= cols else (X * X).mean(dim=0, keepdim=True)
            self.buf2[i] = self.buf2[i] + (1 - beta2) * (v - self.buf2[i])
            Y = X / self.buf2[i].sqrt()
            Y = Y * torch.linalg.matrix_norm(X) / torch.linalg.matrix_norm(Y)
            # 4. cautious weight decay and update
            eff_lr = lr * max(1.0, rows / cols) ** 0.5
            mask = (Y * p >= 0).float()
            self.params[i] = p - eff_lr * Y - eff_lr * wd * p * mask
            # where the update is ~0, float rounding decides the sign test: allow either outcome
            self.unsure[i] = Y.abs() < 1e-4
            self.alt[i] = p - eff_lr * Y - eff_lr * wd * p * (1 - mask)

    def check(self, actual, atol=2e-5, rtol=1e-4):
        """Assert the actual params equal the reference's; adopt them where the sign test was a toss-up."""
        for i, a in enumerate(actual):
            a = a.detach()
            sure = ~self.unsure[i]
            assert self.unsure[i].float().mean() < 0.01
            assert torch.allclose(a[sure], self.params[i][sure], atol=atol, rtol=rtol)
            either = (torch.isclose(a, self.params[i], atol=atol, rtol=rtol)
                      | torch.isclose(a, self.alt[i], atol=atol, rtol=rtol))
            assert either.all()
            self.params[i] = torch.where(self.unsure[i], a, self.params[i])


class RefAdamW:
    def __init__(self, params):
        self.params = [p.detach().double().clone() for p in params]
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    def step(self, grads, lr, betas, eps, wd):
        self.t += 1
        b1, b2 = betas
        for i, g in enumerate(grads):
            g = g.double()
            p = self.params[i] * (1 - lr * wd)
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
            m_hat = self.m[i] / (1 - b1 ** self.t)
            v_hat = self.v[i] / (1 - b2 ** self.t)
            self.params[i] = p - lr * m_hat / (v_hat.sqrt() + eps)


def muon_group(params, lr=0.04, momentum=0.95, wd=0.2):
    return dict(kind="muon", params=params, lr=lr, momentum=momentum, ns_steps=5, beta2=0.95, weight_decay=wd)


# ---------------------------------------------------------------------------
# Muon
# ---------------------------------------------------------------------------

def test_muon_matches_reference():
    assert train.COMPUTE_DTYPE == torch.float32
    g = torch.Generator().manual_seed(0)
    shapes = {(64, 16): 3, (16, 64): 2, (32, 32): 3}
    params = {s: [torch.nn.Parameter(torch.randn(s, generator=g) * 0.05) for _ in range(n)] for s, n in shapes.items()}
    initial = [p.detach().clone() for p in params[(64, 16)]]
    opt = MuonAdamW([muon_group(ps) for ps in params.values()])
    refs = {s: RefMuon(ps) for s, ps in params.items()}
    schedule = [(0.04, 0.85, 0.2), (0.03, 0.90, 0.15), (0.02, 0.95, 0.1)]  # (lr, momentum, wd) per step
    for lr, momentum, wd in schedule:
        grads = {s: [torch.randn(s, generator=g) for _ in ps] for s, ps in params.items()}
        for group in opt.param_groups:
            group.update(lr=lr, momentum=momentum, weight_decay=wd)
        for s, ps in params.items():
            for p, gr in zip(ps, grads[s]):
                p.grad = gr.clone()
        opt.step()
        for s, ps in params.items():
            refs[s].step(grads[s], lr, momentum, wd)
            refs[s].check(ps)
    # the state buffers agree too
    for s, ps in params.items():
        state = opt.state[ps[0]]
        assert torch.allclose(state["momentum_buffer"], torch.stack(refs[s].buf), atol=1e-6)
        assert torch.allclose(state["second_momentum_buffer"], torch.stack(refs[s].buf2), rtol=1e-3, atol=1e-8)
    # the params moved well beyond the tolerance
    assert all((p.detach() - p0).abs().max() > 0.05 for p, p0 in zip(params[(64, 16)], initial))


def test_cautious_weight_decay():
    """Decay applies exactly where the update u and the weight agree in sign (u * p >= 0)."""
    g = torch.Generator().manual_seed(1)
    p0 = torch.randn(48, 12, generator=g)
    grad = torch.randn(48, 12, generator=g)
    lr, wd = 0.04, 0.5
    eff_lr = lr * 2.0  # tall 48x12: lr * sqrt(4)
    out = {}
    for decay in (0.0, wd):
        p = torch.nn.Parameter(p0.clone())
        p.grad = grad.clone()
        MuonAdamW([muon_group([p], lr=lr, wd=decay)]).step()
        out[decay] = p.detach()
    update = (p0 - out[0.0]) / eff_lr  # the orthogonalised, normalised step, same in both runs
    agree = update * p0 >= 0
    assert 0.2 < agree.float().mean() < 0.8  # both cases occur
    decayed = out[0.0] - out[wd]
    assert torch.allclose(decayed[agree], eff_lr * wd * p0[agree], atol=1e-6)
    assert (decayed[~agree].abs() < 1e-7).all()


def raw_polar_express(g):
    """Polar Express through train.muon_step_fused, with every other part of the step made the identity:
    momentum 0 (g passes through), beta2 = 1 with a unit second-moment buffer (NorMuon scale 1),
    lr 1, wd 0 and zero params (params become -X)."""
    grads = g[None].clone()
    params = torch.zeros_like(grads)
    red_dim = -1 if g.shape[0] >= g.shape[1] else -2
    second = torch.ones(g.shape[0], 1) if red_dim == -1 else torch.ones(1, g.shape[1])
    t = lambda v: torch.tensor(float(v))  # noqa: E731
    train.muon_step_fused(grads, params, torch.zeros_like(grads), second[None], t(0), t(1), t(0), t(1), 5, red_dim)
    return -params[0]


def composite_polynomial(x):
    for a, b, c in PE_COEFFS:
        x = a * x + b * x**3 + c * x**5
    return x


def test_polar_express_polynomial_band():
    # Each step maps every singular value x of the normalised input through a x + b x^3 + c x^5.
    # The composition maps [1e-3, 1] into about [0.859, 1.141], the band asserted below.
    xs = torch.logspace(-3, 0, 20001, dtype=torch.float64)
    ys = composite_polynomial(xs)
    assert 0.85 < ys.min() < 0.87 and 1.13 < ys.max() < 1.15


def spectrum(shape, singular_values, g):
    rows, cols = shape
    U, _ = torch.linalg.qr(torch.randn(rows, min(shape), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(cols, min(shape), generator=g, dtype=torch.float64))
    return (U * singular_values) @ V.T


@pytest.mark.parametrize("kind", ["tall", "wide", "square", "square_random"])
def test_polar_express_singular_values(kind):
    g = torch.Generator().manual_seed(2)
    for trial in range(3):
        if kind == "tall":
            G = torch.randn(64, 16, generator=g)
        elif kind == "wide":
            G = torch.randn(16, 64, generator=g)
        elif kind == "square":  # condition number 20: every singular value is in the band's domain
            G = spectrum((32, 32), torch.linspace(0.05, 1, 32, dtype=torch.float64), g).float()
        else:  # a random square matrix can have a tiny singular value, which is not driven to 1
            G = torch.randn(32, 32, generator=g)
        X = raw_polar_express(G)
        assert X.dtype == torch.float32
        assert torch.allclose(X, ref_polar_express(G), atol=1e-5)
        x_in = torch.linalg.svdvals(G.double()) / (torch.linalg.matrix_norm(G.double()) * 1.02 + 1e-6)
        s_out = torch.linalg.svdvals(X.double())
        predicted = composite_polynomial(x_in)
        assert torch.allclose(s_out.sort().values, predicted.sort().values, atol=2e-4)
        in_domain = x_in >= 1e-3
        if kind != "square_random":
            assert in_domain.all()
        assert ((predicted[in_domain] > 0.85) & (predicted[in_domain] < 1.15)).all()
        assert ((s_out > 0.85) & (s_out < 1.15)).sum() >= in_domain.sum()


# ---------------------------------------------------------------------------
# AdamW
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("betas,wd", [((0.8, 0.95), 0.0), ((0.96, 0.95), 0.0), ((0.9, 0.99), 0.1)])
def test_adamw_matches_reference(betas, wd):
    g = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(5, 7, generator=g)), torch.nn.Parameter(torch.randn(4, generator=g))]
    ref = RefAdamW(params)
    torch_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    torch_opt = torch.optim.AdamW(torch_params, lr=0.01, betas=betas, eps=1e-10, weight_decay=wd, foreach=False)
    opt = MuonAdamW([dict(kind="adamw", params=params, lr=0.01, betas=betas, eps=1e-10, weight_decay=wd)])
    for lr in (0.01, 0.02, 0.005):
        grads = [torch.randn(p.shape, generator=g) * 0.1 for p in params]
        opt.param_groups[0]["lr"] = lr
        torch_opt.param_groups[0]["lr"] = lr
        for p, tp, gr in zip(params, torch_params, grads):
            p.grad, tp.grad = gr.clone(), gr.clone()
        opt.step()
        torch_opt.step()
        ref.step(grads, lr, betas, 1e-10, wd)
        for p, tp, rp in zip(params, torch_params, ref.params):
            assert torch.allclose(p.detach().double(), rp, atol=1e-6)
            assert torch.allclose(p.detach(), tp.detach(), atol=1e-6)
    assert opt.state[params[0]]["step"] == 3


def test_adamw_skips_params_without_grad():
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = MuonAdamW([dict(kind="adamw", params=[p, q], lr=0.1, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)])
    p.grad = torch.ones(3)
    opt.step()
    assert torch.allclose(p.detach(), torch.full((3,), 0.9))  # first step: m_hat/sqrt(v_hat) = sign(g)
    assert (q.detach() == 1).all() and q not in opt.state


# ---------------------------------------------------------------------------
# setup_optimizer on a small GPT
# ---------------------------------------------------------------------------

def small_gpt():
    config = GPTConfig(sequence_len=16, vocab_size=64, n_layer=3, n_head=2, n_kv_head=2, n_embd=64)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    return model


def make_optimizer(model):
    return model.setup_optimizer(unembedding_lr=train.UNEMBEDDING_LR, embedding_lr=train.EMBEDDING_LR,
                                 scalar_lr=train.SCALAR_LR, matrix_lr=train.MATRIX_LR,
                                 weight_decay=train.WEIGHT_DECAY, adam_betas=train.ADAM_BETAS)


def test_setup_optimizer_groups():
    model = small_gpt()
    opt = make_optimizer(model)
    scale = (64 / 768) ** -0.5
    by_param = {}
    for gi, group in enumerate(opt.param_groups):
        for p in group["params"]:
            assert id(p) not in by_param, "a parameter is in two groups"
            by_param[id(p)] = gi
    assert set(by_param) == {id(p) for p in model.parameters()}

    def group_of(p):
        return opt.param_groups[by_param[id(p)]]

    expected_adamw = [
        ([model.lm_head.weight], train.UNEMBEDDING_LR * scale, train.ADAM_BETAS),
        ([model.transformer.wte.weight], train.EMBEDDING_LR * scale, train.ADAM_BETAS),
        ([ve.weight for ve in model.value_embeds.values()], train.EMBEDDING_LR * scale, train.ADAM_BETAS),
        ([model.resid_lambdas], train.SCALAR_LR * 0.01, train.ADAM_BETAS),
        ([model.x0_lambdas], train.SCALAR_LR, (0.96, 0.95)),
    ]
    for ps, lr, betas in expected_adamw:
        group = group_of(ps[0])
        assert [id(p) for p in group["params"]] == [id(p) for p in ps]
        assert group["kind"] == "adamw"
        assert group["lr"] == pytest.approx(lr) and group["initial_lr"] == group["lr"]
        assert tuple(group["betas"]) == tuple(betas)
        assert group["eps"] == 1e-10 and group["weight_decay"] == 0.0
    assert len(model.value_embeds) == 2  # layers 0 and 2 of 3

    muon = [grp for grp in opt.param_groups if grp["kind"] == "muon"]
    block_params = list(model.transformer.h.parameters())
    shapes = {p.shape for p in block_params}
    assert len(muon) == len(shapes) == 4  # (64, 64), (256, 64), (64, 256), VE gate (2, 32)
    assert len(opt.param_groups) == 5 + len(muon)
    for group in muon:
        shape = group["params"][0].shape
        assert [id(p) for p in group["params"]] == [id(p) for p in block_params if p.shape == shape]
        assert group["lr"] == train.MATRIX_LR and group["initial_lr"] == train.MATRIX_LR
        assert (group["momentum"], group["ns_steps"], group["beta2"]) == (0.95, 5, 0.95)
        assert group["weight_decay"] == train.WEIGHT_DECAY


def test_setup_optimizer_step_matches_references():
    """One step of the model's optimizer equals the references run with the SPEC's per-group lrs."""
    model = small_gpt()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    grads = {name: torch.randn(p.shape, generator=g) for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.grad = grads[name].clone()
    opt = make_optimizer(model)
    opt.step()
    after = dict(model.named_parameters())

    scale = (64 / 768) ** -0.5
    adam_lr = {"lm_head.weight": train.UNEMBEDDING_LR * scale, "transformer.wte.weight": train.EMBEDDING_LR * scale,
               "value_embeds.0.weight": train.EMBEDDING_LR * scale, "value_embeds.2.weight": train.EMBEDDING_LR * scale,
               "resid_lambdas": train.SCALAR_LR * 0.01, "x0_lambdas": train.SCALAR_LR}
    for name, lr in adam_lr.items():
        ref = RefAdamW([before[name]])
        ref.step([grads[name]], lr, (0.96, 0.95) if name == "x0_lambdas" else train.ADAM_BETAS, 1e-10, 0.0)
        assert torch.allclose(after[name].detach().double(), ref.params[0], atol=1e-5), name
    for name in before:
        if name.startswith("transformer.h."):
            ref = RefMuon([before[name]])
            ref.step([grads[name]], train.MATRIX_LR, 0.95, train.WEIGHT_DECAY)
            ref.check([after[name]])


# ---------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------

def test_default_schedule_ratios():
    assert (train.WARMUP_RATIO, train.WARMDOWN_RATIO, train.FINAL_LR_FRAC) == (0.0, 0.5, 0.0)


@pytest.mark.parametrize("warmup,warmdown,final,points", [
    (0.0, 0.5, 0.0, [(0.0, 1.0), (0.25, 1.0), (0.5, 1.0), (0.6, 0.8), (0.75, 0.5), (0.9, 0.2), (1.0, 0.0)]),
    (0.1, 0.5, 0.0, [(0.0, 0.0), (0.02, 0.2), (0.05, 0.5), (0.1, 1.0), (0.4, 1.0), (0.75, 0.5), (1.0, 0.0)]),
    (0.0, 0.5, 0.1, [(0.3, 1.0), (0.75, 0.55), (1.0, 0.1)]),
    (0.2, 0.2, 0.0, [(0.1, 0.5), (0.5, 1.0), (0.8, 1.0), (0.9, 0.5), (0.95, 0.25)]),
])
def test_lr_multiplier(monkeypatch, warmup, warmdown, final, points):
    monkeypatch.setattr(train, "WARMUP_RATIO", warmup)
    monkeypatch.setattr(train, "WARMDOWN_RATIO", warmdown)
    monkeypatch.setattr(train, "FINAL_LR_FRAC", final)
    for progress, expected in points:
        assert train.get_lr_multiplier(progress) == pytest.approx(expected, abs=1e-12), progress


def test_muon_momentum():
    for step, expected in [(0, 0.85), (30, 0.86), (150, 0.90), (270, 0.94), (300, 0.95), (301, 0.95), (5000, 0.95)]:
        assert train.get_muon_momentum(step) == pytest.approx(expected, abs=1e-12), step


def test_weight_decay_schedule(monkeypatch):
    assert train.WEIGHT_DECAY == 0.2
    for progress, expected in [(0.0, 0.2), (0.25, 0.15), (0.5, 0.1), (1.0, 0.0)]:
        assert train.get_weight_decay(progress) == pytest.approx(expected, abs=1e-12)
    monkeypatch.setattr(train, "WEIGHT_DECAY", 0.1)
    assert train.get_weight_decay(0.5) == pytest.approx(0.05)
