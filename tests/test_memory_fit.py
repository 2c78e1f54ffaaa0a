"""hardware.fit_device_batch: the batch that fits each GPU, the rule against a simulated compiled step, and main()'s
wiring (gradient accumulation keeps TOTAL_BATCH_SIZE). See bench/simulate_gpu.py for the simulation."""

import gc
import importlib.util
import os
import sys

import pytest
import torch

import hardware
import prepare
import train
from conftest import ROOT

spec = importlib.util.spec_from_file_location("simulate_gpu", os.path.join(ROOT, "bench", "simulate_gpu.py"))
simulate_gpu = sys.modules.setdefault("simulate_gpu", importlib.util.module_from_spec(spec))  # Dynamo looks it up
if not hasattr(simulate_gpu, "reference_config"):
    spec.loader.exec_module(simulate_gpu)

REFERENCE = simulate_gpu.reference_config()
REFERENCE_PARAMS = 50_332_176  # the reference's num_params_M 50.3


def naive_predicted_peak(batch, config, num_params):
    """The rule as its docstring states it, in bytes."""
    return 16 * num_params + batch * config.sequence_len * ((48 * config.n_layer + 24) * config.n_embd + 8 * config.vocab_size)


def fit(batch, total_memory, config=REFERENCE, num_params=REFERENCE_PARAMS):
    return hardware.fit_device_batch(batch, total_memory, config, num_params)


def test_reference_parameter_count():
    assert sum(p.numel() for p in simulate_gpu.meta_model(REFERENCE).parameters()) == REFERENCE_PARAMS


# total_memory as torch reports it for one card of each size, a little under the marketing figure
@pytest.mark.parametrize("gb, reported_mib, expected", [
    (16, 15_095, 16),    # Tesla T4: 32 would need ~17.5 GiB of its 14.7
    (24, 24_080, 32),    # RTX 4090
    (40, 40_339, 64),    # A100 40GB
    (48, 45_488, 64),    # L40S (A6000: 48,676 MiB)
    (80, 81_004, 128),   # H100 80GB keeps the reference's 128
    (141, 143_160, 128),  # H200: never more than DEVICE_BATCH_SIZE
])
def test_batch_for_each_memory_size(gb, reported_mib, expected, capsys):
    assert fit(128, reported_mib * 2**20) == expected
    out = capsys.readouterr().out
    if expected == 128:
        assert out == ""  # unchanged: silent, exactly the reference run
    else:
        assert out.count("\n") == 1  # one line
        assert out.startswith(f"DEVICE_BATCH_SIZE 128 -> {expected}: ")
        assert f"of this GPU's {reported_mib / 1024:.1f} GiB" in out and "kept by gradient accumulation" in out


def test_rule_hand_computed_at_the_reference():
    # 16 * 50,332,176 + 128 * 2048 * ((48 * 8 + 24) * 512 + 8 * 8192) = 805,314,816 + 71,940,702,208
    predicted = 72_746_017_024
    assert naive_predicted_peak(128, REFERENCE, REFERENCE_PARAMS) == predicted
    threshold = -(-predicted * 10 // 9)  # the smallest total_memory with predicted <= 0.9 * total_memory
    assert fit(128, threshold) == 128
    assert fit(128, threshold - 1) == 64
    # on the safe side of the reference's measured peak (45,060.2 MiB at batch 128, compiled, H100)
    assert predicted > 1.15 * 45_060.2 * 2**20


@pytest.mark.parametrize("batch", [128, 64, 16, 1])
def test_halves_until_it_fits(batch):
    for total in [10**6, 2**30, 4 * 2**30, 20 * 2**30, 100 * 2**30]:
        got = fit(batch, total)
        expected = batch
        while expected > 1 and naive_predicted_peak(expected, REFERENCE, REFERENCE_PARAMS) > 0.9 * total:
            expected //= 2
        assert got == expected
        assert got >= 1 and batch % got == 0 and (batch // got) & (batch // got - 1) == 0  # batch / 2**k


def test_no_memory_figure_keeps_the_batch(capsys):
    assert fit(128, None) == 128
    assert fit(16, None, simulate_gpu.tiny_config(), 1000) == 16
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("n_layer, n_embd, vocab_size, batch, amp_dtype", [
    (2, 128, 512, 64, "bfloat16"), (3, 256, 1024, 64, "bfloat16"), (3, 256, 1024, 64, "float16")])
def test_rule_never_predicts_below_the_simulated_compiled_peak(n_layer, n_embd, vocab_size, batch, amp_dtype):
    # weights + grads + optimizer state + what torch.compile's min-cut partition saves for the backward,
    # measured on a meta-device model with CUDA's autocast and FlashAttention's saved tensors
    config = train.GPTConfig(sequence_len=128, vocab_size=vocab_size, n_layer=n_layer, n_head=n_embd // 128,
                             n_kv_head=n_embd // 128, n_embd=n_embd, window_pattern="SSSL")
    simulated = simulate_gpu.simulated_compiled_peak(config, batch, getattr(torch, amp_dtype))
    num_params = sum(p.numel() for p in simulate_gpu.meta_model(config).parameters())
    predicted = naive_predicted_peak(batch, config, num_params)
    assert predicted >= simulated
    assert predicted < 1.5 * simulated  # and not wildly above it
    assert fit(batch, simulated / 0.9, config, num_params) < batch  # so a GPU that only just holds it is refused


def test_bench_reads_the_rule_back():
    predicted = simulate_gpu.predicted_bytes(REFERENCE, 128)
    assert abs(predicted - naive_predicted_peak(128, REFERENCE, REFERENCE_PARAMS)) <= 2**20


# ---------------------------------------------------------------------------
# main(): the fitted batch reaches the loader, the accumulation and the evaluation
# ---------------------------------------------------------------------------

def test_main_fits_batch_and_keeps_total_batch_size(cache, monkeypatch, capsys):
    fitted_to = 4
    calls = {"fit": [], "loader": [], "eval": [], "batches": 0}

    def fit_on_a_small_gpu(batch_size, total_memory, config, num_params):
        assert total_memory is None  # main() passes None on the CPU
        # memory for which the rule holds exactly fitted_to: as a GPU of that size would report it
        memory = naive_predicted_peak(fitted_to, config, num_params) / 0.9 + 1
        calls["fit"].append((batch_size, config, num_params))
        return real_fit(batch_size, memory, config, num_params)

    def counting_loader(tokenizer, B, T, split, *args, **kwargs):
        calls["loader"].append((B, T, split))
        for batch in real_loader(tokenizer, B, T, split, *args, **kwargs):
            calls["batches"] += split == "train"
            yield batch

    def recording_eval(model, tokenizer, batch_size):
        calls["eval"].append(batch_size)
        return real_eval(model, tokenizer, batch_size)

    real_fit, real_loader, real_eval = train.fit_device_batch, train.make_dataloader, train.evaluate_bpb
    monkeypatch.setattr(train, "fit_device_batch", fit_on_a_small_gpu)
    monkeypatch.setattr(train, "make_dataloader", counting_loader)
    monkeypatch.setattr(prepare, "make_dataloader", counting_loader)  # evaluate_bpb's own loader
    monkeypatch.setattr(train, "evaluate_bpb", recording_eval)
    monkeypatch.setattr(train, "DEPTH", 1)  # a tiny model: 11 steps of 4 micro-batches take seconds
    monkeypatch.setattr(train, "TIME_BUDGET", 1e-3)
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 2 * fitted_to * prepare.MAX_SEQ_LEN)
    try:
        train.main()
    finally:
        gc.enable()  # main() freezes and disables the collector after step 0
        gc.unfreeze()
    out = capsys.readouterr().out

    assert train.DEVICE_BATCH_SIZE != fitted_to
    assert [c[0] for c in calls["fit"]] == [train.DEVICE_BATCH_SIZE]
    accum = train.TOTAL_BATCH_SIZE // (fitted_to * prepare.MAX_SEQ_LEN)
    assert accum > 1
    assert sum(line.startswith(f"DEVICE_BATCH_SIZE {train.DEVICE_BATCH_SIZE} -> {fitted_to}: ") for line in out.splitlines()) == 1
    assert f"gradient accumulation steps: {accum}" in out
    assert calls["loader"][0] == (fitted_to, prepare.MAX_SEQ_LEN, "train")
    assert calls["eval"] == [fitted_to]
    assert ("val" in [c[2] for c in calls["loader"]]) and all(c[0] == fitted_to for c in calls["loader"])
    steps = int(out.split("num_steps:")[1].split()[0])
    # one batch before the loop, then accum micro-batches per step: TOTAL_BATCH_SIZE tokens per optimizer step
    assert calls["batches"] == 1 + steps * accum
    assert accum * fitted_to * prepare.MAX_SEQ_LEN == train.TOTAL_BATCH_SIZE


# ---------------------------------------------------------------------------
# One simulated training step per GPU, with what train.py chooses there
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name, capability, total_mib, backend, amp_dtype, batch", [
    ("Tesla T4", (7, 5), 15_095, "sdpa", "float16", 16),
    ("RTX 4090", (8, 9), 24_080, "fa3", "bfloat16", 32),
    ("RTX 5090", (12, 0), 31_840, "flex", "bfloat16", 32),
    ("A100 40GB", (8, 0), 40_339, "fa3", "bfloat16", 64),
    ("H100 80GB", (9, 0), 81_004, "fa3", "bfloat16", 128),
])
def test_simulated_step_per_gpu(name, capability, total_mib, backend, amp_dtype, batch):
    # the kernel hub answers (mocked) and Triton is installed, as on a GPU host with network
    choice = simulate_gpu.gpu_choices(capability, total_mib * 2**20, REFERENCE)
    assert choice == (backend, getattr(torch, amp_dtype), batch)
    accum, _ = simulate_gpu.simulated_step(REFERENCE, backend, getattr(torch, amp_dtype), batch)
    assert accum * batch * REFERENCE.sequence_len == 2**19  # the reference's TOTAL_BATCH_SIZE
