"""The allocator contract (``sparsealloc.pruning.allocators``), for every name in ``ALLOCATORS``.

An allocator maps a model's layout, dense weights and calibration statistics to a ratio per Linear
FQN: every prunable Linear gets a ratio in [0, 1), the parameter-weighted mean equals the target
exactly, the same inputs give the same ratios, and the weights are left untouched.
"""

from __future__ import annotations

import pytest
import torch

from sparsealloc.pruning.allocators import ALLOCATORS, AllocationInputs, allocate
from sparsealloc.pruning.calibration.stats import collect_stats
from sparsealloc.pruning.model.structure import model_layout


@pytest.fixture(scope="module")
def inputs(tiny_llama, tiny_calib) -> AllocationInputs:
    layout = model_layout(tiny_llama)
    modules = dict(tiny_llama.named_modules())
    weights = {n: modules[n].weight.detach().clone() for n in layout.linears}
    return AllocationInputs(layout, weights, collect_stats(tiny_llama, tiny_calib, gram=True, layout=layout))


@pytest.mark.parametrize("target", [0.1, 0.5, 0.8])
@pytest.mark.parametrize("name", ALLOCATORS.names())
def test_an_allocation_covers_every_linear_on_the_exact_budget(inputs, name, target):
    before = {n: w.clone() for n, w in inputs.weights.items()}
    ratios = allocate(name, inputs, target)
    layout = inputs.layout
    assert set(ratios) == set(layout.linears)
    assert all(0.0 <= r < 1.0 for r in ratios.values())
    mean = sum(ratios[n] * layout.numels[n] for n in layout.linears) / sum(layout.numels[n] for n in layout.linears)
    assert mean == pytest.approx(target, abs=1e-9)
    assert allocate(name, inputs, target) == ratios
    assert all(torch.equal(inputs.weights[n], w) for n, w in before.items())
