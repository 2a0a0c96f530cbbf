"""Sequential compression (pruning/sequential.py): block by block on the compressed model's inputs."""

from __future__ import annotations

import pytest
import torch

from sparsealloc.core.errors import SpecError
from sparsealloc.core.plan import AllocationPlan, MetricChoice
from sparsealloc.pruning.apply import prune_
from sparsealloc.pruning.calibration.stats import collect_stats
from sparsealloc.pruning.sequential import block_plans, prune_sequential_
from sparsealloc.pruning.model.structure import model_layout


@pytest.mark.parametrize("metric", ["sparsegpt", "wanda"])
def test_sequential_matches_independent_on_the_first_block_only(fresh_model, tiny_calib, metric):
    model, independent = fresh_model("llama"), fresh_model("llama")
    layout = model_layout(model)
    ratios = {name: (0.4 if i % 2 else 0.6) for i, name in enumerate(layout.linears)}
    plan = AllocationPlan(sparsity=ratios, metric=MetricChoice(metric))
    report = prune_sequential_(model, plan, tiny_calib, batch_size=2)
    stats = collect_stats(independent, tiny_calib, batch_size=2, gram=metric == "sparsegpt")
    reference = prune_(independent, plan, stats)
    assert report.achieved == pytest.approx(reference.achieved)  # the same counts per Linear
    first = layout.blocks[0]
    seq, ind = dict(model.named_modules()), dict(independent.named_modules())
    for name in layout.linears:
        same = torch.allclose(seq[name].weight, ind[name].weight, atol=1e-6)
        if layout.block_of[name] == first:
            assert same, name  # block 0 sees the dense inputs either way
    later = [n for n in layout.linears if layout.block_of[n] == layout.blocks[-1]]
    assert not all(torch.allclose(seq[n].weight, ind[n].weight, atol=1e-6) for n in later)


def test_block_plans_cover_each_linear_once_and_skip_empty_blocks(fresh_model):
    layout = model_layout(fresh_model("llama"))
    dense_block = layout.blocks[1]
    ratios = {n: 0.0 if layout.block_of[n] == dense_block else 0.5 for n in layout.linears}
    plans = block_plans(AllocationPlan(sparsity=ratios), layout)
    assert [b for b, _ in plans] == [b for b in layout.blocks if b != dense_block]
    covered = [n for _, p in plans for n in p.sparsity]
    assert sorted(covered) == sorted(n for n in layout.linears if ratios[n] > 0)


def test_sequential_refuses_dropped_blocks(fresh_model, tiny_calib):
    model = fresh_model("llama")
    layout = model_layout(model)
    plan = AllocationPlan(sparsity={"*": 0.5}, dropped_layers=(layout.blocks[-1],))
    with pytest.raises(SpecError, match="dropped blocks"):
        prune_sequential_(model, plan, tiny_calib)
