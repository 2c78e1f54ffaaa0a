"""evaluate_bpb, the metric (the reference's `evaluate_bpb`), checked against hand computations."""

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


@pytest.mark.parametrize("eval_tokens, batch_size, calls", [
    (2 * 16, 2, 1),            # 2 rows, one full batch
    (5 * 2 * 16, 2, 5),        # 10 rows in 5 batches: B divides, as the reference
    (5 * 2 * 16 - 1, 2, 5),    # 9 rows: the reference scored 8 (4 batches); the 5th batch counts 1 row
    (5 * 2 * 16 - 1, 4, 3),    # 9 rows: 4 + 4 + 1
    (7 * 16 + 15, 16, 1),      # 7 rows in one batch of 16, 9 rows ignored
])
def test_scores_the_first_eval_tokens_over_t_rows_whatever_the_batch(tokenizer, monkeypatch, cache, eval_tokens,
                                                                     batch_size, calls):
    monkeypatch.setattr(prepare, "MAX_SEQ_LEN", 16)
    monkeypatch.setattr(prepare, "EVAL_TOKENS", eval_tokens)
    model = FixedLossModel()
    bpb = prepare.evaluate_bpb(model, tokenizer, batch_size)
    assert model.calls == [((batch_size, 16), (batch_size, 16))] * calls  # every batch has the same shape

    # by hand on the first EVAL_TOKENS // T rows, read one row at a time
    loader = prepare.make_dataloader(tokenizer, 1, 16, "val")
    nats, nbytes = 0.0, 0
    for _ in range(eval_tokens // 16):
        x, y, _ = next(loader)
        for xi, yi in zip(x.flatten().tolist(), y.flatten().tolist()):
            b = byte_len(tokenizer, yi)
            nats += FixedLossModel.token_loss(xi, yi) if b else 0.0
            nbytes += b
    assert bpb == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-6)


def tiny_gpt(seq_len):
    import train

    config = train.GPTConfig(sequence_len=seq_len, vocab_size=8192, n_layer=1, n_head=1, n_kv_head=1, n_embd=32,
                             window_pattern="L")
    with torch.device("meta"):
        model = train.GPT(config)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    return model


def test_val_bpb_does_not_depend_on_device_batch_size(tokenizer, monkeypatch, cache):
    """B 8, 12 and 16 give one val_bpb on 40 rows (12 and 16 do not divide 40)."""
    monkeypatch.setattr(prepare, "MAX_SEQ_LEN", 16)
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 40 * 16)  # 40 rows: 8 divides, 12 and 16 do not
    model = tiny_gpt(16)
    with torch.no_grad():  # a non-uniform model, so that every row counts differently
        model.lm_head.weight.normal_(0, 0.5)
    values = {b: prepare.evaluate_bpb(model, tokenizer, b) for b in (8, 12, 16)}
    assert values[12] == pytest.approx(values[8], rel=1e-6) and values[16] == pytest.approx(values[8], rel=1e-6)
    # and a different row count does give another value (the check can fail)
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 36 * 16)
    assert prepare.evaluate_bpb(model, tokenizer, 12) != pytest.approx(values[8], rel=1e-6)


def test_uniform_model_gives_log2_vocab_bits_per_token(tokenizer, small_eval):
    """A model with all-zero logits has loss ln(V) on every token: bpb = log2(V) * tokens / bytes."""
    model = tiny_gpt(T)
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
