"""Allocators: pure functions from a model's weights and statistics to a ratio per Linear FQN.

Signature: ``allocator(inputs: AllocationInputs, target: float, **params) -> {fqn: ratio}``. Every
allocator meets the budget exactly (parameter-weighted mean == target) through
:func:`sparsealloc.spaces.budget.project_to_budget`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from sparsealloc.core.registry import Registry
from sparsealloc.core.types import LayerStats
from sparsealloc.pruning.metrics import wanda
from sparsealloc.pruning.structure import ModelLayout
from sparsealloc.spaces.budget import project_to_budget

MAX_RATIO = 0.99


@dataclass
class AllocationInputs:
    """What allocators may look at: the layout, dense weights and calibration statistics."""

    layout: ModelLayout
    weights: Mapping[str, Tensor]
    stats: Mapping[str, LayerStats] | None = None


class Allocator(Protocol):
    def __call__(self, inputs: AllocationInputs, target: float, **params: float) -> dict[str, float]: ...


ALLOCATORS: Registry[Allocator] = Registry("allocator")


def _per_block(inputs: AllocationInputs, block_ratio: Mapping[str, float], target: float) -> dict[str, float]:
    """Repair block ratios onto the exact budget and spread them over each block's Linears."""
    layout = inputs.layout
    block_numels = {b: sum(layout.numels[n] for n in layout.block_linears(b)) for b in layout.blocks}
    repaired = project_to_budget(block_ratio, block_numels, target, 0.0, MAX_RATIO)
    return {n: repaired[layout.block_of[n]] for n in layout.linears}


@ALLOCATORS.register("uniform")
def uniform(inputs: AllocationInputs, target: float) -> dict[str, float]:
    """The same ratio everywhere (the Wanda/SparseGPT default)."""
    return {n: float(target) for n in inputs.layout.linears}


def outlier_ratios(inputs: AllocationInputs, m: float) -> dict[str, float]:
    """OWL's layerwise outlier distribution D_ℓ: % of a block's Wanda scores above M × their mean."""
    out = {}
    for block in inputs.layout.blocks:
        count = above = 0
        total = torch.zeros((), dtype=torch.float64)
        scores = [wanda(inputs.weights[n], inputs.stats[n]) for n in inputs.layout.block_linears(block)]
        for s in scores:
            total += s.double().sum()
            count += s.numel()
        mean = total / count
        for s in scores:
            above += int((s > m * mean).sum().item())
        out[block] = 100.0 * above / count
    return out


@ALLOCATORS.register("owl")
def owl(inputs: AllocationInputs, target: float, m: float = 5.0, lam: float = 0.08) -> dict[str, float]:
    """OWL (Yin et al., ICML 2024; luuyin/OWL ``prune_wanda_outlier``): fewer cuts where outliers are.

    ``density_ℓ = 2λ·(D_ℓ − min D)/(max D − min D) − mean(·) + (1 − S)`` with D the outlier
    ratio at threshold ``m``; ratios span a window of width 2λ around the target (M=5, λ=0.08 are
    the paper's LLaMA-7B settings).
    """
    d = outlier_ratios(inputs, m)
    lo, hi = min(d.values()), max(d.values())
    norm = {b: (v - lo) / (hi - lo) if hi > lo else 0.0 for b, v in d.items()}
    mean = sum(norm.values()) / len(norm)
    ratios = {b: 1 - (2 * lam * (v - mean) + (1 - target)) for b, v in norm.items()}
    return _per_block(inputs, ratios, target)


@ALLOCATORS.register("depth_ramp")
def depth_ramp(inputs: AllocationInputs, target: float, beta: float = 0.005) -> dict[str, float]:
    """Arithmetic-progression allocation of ATP (ICML 2025): ``s_i = S − β(L−1)/2 + β·i``.

    Deeper blocks get more sparsity for β > 0.
    """
    blocks = inputs.layout.blocks
    n = len(blocks)
    ratios = {b: target - beta * (n - 1) / 2 + beta * i for i, b in enumerate(blocks)}
    return _per_block(inputs, ratios, target)


def allocate(name: str, inputs: AllocationInputs, target: float, **params: float) -> dict[str, float]:
    """Run allocator ``name``; unknown names fail with the list of valid ones."""
    return ALLOCATORS.get(name)(inputs, target, **params)
