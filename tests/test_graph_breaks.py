"""torch.compile graph breaks (goal 0, as fullgraph=True demands): the model's forward and backward under each
attention backend that runs on the CPU, and the two compiled optimizer steps. Counted by torch._dynamo.explain
through bench/simulate_gpu.py, on a tiny model (the count does not depend on the size)."""

import importlib.util
import os
import sys

import pytest
import torch

import train
from conftest import ROOT

spec = importlib.util.spec_from_file_location("simulate_gpu", os.path.join(ROOT, "bench", "simulate_gpu.py"))
simulate_gpu = sys.modules.setdefault("simulate_gpu", importlib.util.module_from_spec(spec))  # Dynamo looks it up
if not hasattr(simulate_gpu, "reference_config"):
    spec.loader.exec_module(simulate_gpu)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_model_has_no_graph_breaks(backend):
    breaks, fullgraph_error = simulate_gpu.model_graph_breaks(backend)
    assert breaks == 0
    assert fullgraph_error is None


def test_optimizer_steps_have_no_graph_breaks():
    assert simulate_gpu.optimizer_graph_breaks() == {"adamw_step_fused": 0, "muon_step_fused": 0}


def test_a_graph_break_is_counted(monkeypatch):
    # the counter is not blind: a host sync in norm() breaks every graph that calls it
    real_norm = train.norm

    def norm_with_sync(x):
        if x.sum().item() > float("inf"):
            print("unreachable")
        return real_norm(x)

    monkeypatch.setattr(train, "norm", norm_with_sync)
    breaks, fullgraph_error = simulate_gpu.model_graph_breaks("sdpa")
    assert breaks > 0
    assert fullgraph_error is not None
    torch._dynamo.reset()
