"""evaluate_bpb, the metric (SPEC.md, `evaluate_bpb`), checked against hand computations."""

import math

import pytest
import torch
import torch.nn as nn

import prepare

B, T = 4, 32
BIG_LOSS = 50.0  # loss given to special-token targets: it must not count


class FixedLossModel(nn.Module):
    """A 'model' whose per-token loss is a known function of (input, target); records its calls."""

    def __init__(self, flat=False):
        super().__init__()
        self.flat = flat
        self.calls = []

    @staticmethod
    def token_loss(x, y):
        return 0.25 + 0.1 * (y % 13) + 0.01 * (x % 5) if y < 8188 else BIG_LOSS

    def forward(self, x, y, reduction="mean"):
        assert reduction == "none"
        self.calls.append((tuple(x.shape), tuple(y.shape)))
        loss = 0.25 + 0.1 * (y % 13).float() + 0.01 * (x % 5).float()
        loss = torch.where(y >= 8188, torch.full_like(loss, BIG_LOSS), loss)
        return loss.view(-1) if self.flat else loss


def val_batches(tokenizer, n):
    loader = prepare.make_dataloader(tokenizer, B, T, "val")
    out = []
    for _ in range(n):
        x, y, _ = next(loader)
        out.append((x.clone(), y.clone()))
    return out


def byte_len(tokenizer, token_id):
    return 0 if token_id >= 8188 else len(tokenizer.decode([token_id]).encode("utf-8"))


@pytest.fixture
def small_eval(monkeypatch, cache):
    monkeypatch.setattr(prepare, "MAX_SEQ_LEN", T)
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 3 * B * T + 7)  # -> 3 steps


@pytest.mark.parametrize("flat", [False, True])
def test_bpb_equals_hand_computation(tokenizer, small_eval, flat):
    model = FixedLossModel(flat=flat)
    bpb = prepare.evaluate_bpb(model, tokenizer, B)

    nats, nbytes, n_special = 0.0, 0, 0
    for x, y in val_batches(tokenizer, 3):
        for xi, yi in zip(x.flatten().tolist(), y.flatten().tolist()):
            b = byte_len(tokenizer, yi)
            if b == 0:
                n_special += 1
                continue
            nats += FixedLossModel.token_loss(xi, yi)
            nbytes += b
    assert n_special > 0, "the val batches should contain BOS targets (documents starting mid-row)"
    assert bpb == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-6)
    assert model.calls == [((B, T), (B, T))] * 3


def test_step_count(tokenizer, monkeypatch, cache):
    monkeypatch.setattr(prepare, "MAX_SEQ_LEN", 16)
    for eval_tokens, steps in [(2 * 16, 1), (5 * 2 * 16 - 1, 4), (5 * 2 * 16, 5)]:
        monkeypatch.setattr(prepare, "EVAL_TOKENS", eval_tokens)
        model = FixedLossModel()
        prepare.evaluate_bpb(model, tokenizer, 2)
        assert len(model.calls) == steps, eval_tokens


def test_uniform_model_gives_log2_vocab_bits_per_token(tokenizer, small_eval):
    """A model with all-zero logits has loss ln(V) on every token: bpb = log2(V) * tokens / bytes."""
    import train

    config = train.GPTConfig(sequence_len=T, vocab_size=8192, n_layer=1, n_head=1, n_kv_head=1, n_embd=32,
                             window_pattern="L")
    with torch.device("meta"):
        model = train.GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    bpb = prepare.evaluate_bpb(model, tokenizer, B)

    n_tokens, nbytes = 0, 0
    for _, y in val_batches(tokenizer, 3):
        for yi in y.flatten().tolist():
            b = byte_len(tokenizer, yi)
            n_tokens += b > 0
            nbytes += b
    assert bpb == pytest.approx(13.0 * n_tokens / nbytes, rel=1e-5)  # log2(8192) = 13
