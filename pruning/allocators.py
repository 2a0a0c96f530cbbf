"""Allocators: pure functions from a model's weights and statistics to a ratio per Linear FQN.

Signature: ``allocator(inputs: AllocationInputs, target: float, **params) -> {fqn: ratio}``. Every
allocator meets the budget exactly (parameter-weighted mean == target) through
:func:`sparsealloc.spaces.budget.project_to_budget`.

Registered: ``uniform``, ``owl``, ``depth_ramp`` (ATP), ``alphapruning``, ``mrp``, ``dp``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from sparsealloc.core.errors import SpecError
from sparsealloc.core.registry import Registry, check_call
from sparsealloc.core.types import LayerStats
from sparsealloc.pruning.esd import matrix_alpha
from sparsealloc.pruning.masks import row_mask_from_order, row_order
from sparsealloc.pruning.metrics import wanda
from sparsealloc.pruning.model.structure import ModelLayout
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


def _block_numels(layout: ModelLayout) -> dict[str, int]:
    return {b: sum(layout.numels[n] for n in layout.block_linears(b)) for b in layout.blocks}


def _per_block(inputs: AllocationInputs, block_ratio: Mapping[str, float], target: float) -> dict[str, float]:
    """Repair block ratios onto the exact budget and spread them over each block's Linears."""
    layout = inputs.layout
    repaired = project_to_budget(block_ratio, _block_numels(layout), target, 0.0, MAX_RATIO)
    return {n: repaired[layout.block_of[n]] for n in layout.linears}


@ALLOCATORS.register("uniform")
def uniform(inputs: AllocationInputs, target: float) -> dict[str, float]:
    """The same ratio everywhere (the Wanda/SparseGPT default)."""
    return {n: float(target) for n in inputs.layout.linears}


def outlier_ratios(inputs: AllocationInputs, m: float) -> dict[str, float]:
    """OWL's layerwise outlier distribution D_ℓ: % of a block's Wanda scores above M × their mean."""
    out = {}
    for block in inputs.layout.blocks:
        scores = [wanda(inputs.weights[n], inputs.stats[n]) for n in inputs.layout.block_linears(block)]
        count = sum(s.numel() for s in scores)
        mean = sum(float(s.double().sum()) for s in scores) / count  # on the scores' device (cuda included)
        out[block] = 100.0 * sum(int((s > m * mean).sum().item()) for s in scores) / count
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


def _need_stats(inputs: AllocationInputs, name: str) -> None:
    if inputs.stats is None:
        raise SpecError(f"allocator {name!r} needs calibration statistics (Wanda scores)")


# ----------------------------------------------------------------------------- AlphaPruning
@ALLOCATORS.register("alphapruning")
def alphapruning(inputs: AllocationInputs, target: float, epsilon: float = 0.3) -> dict[str, float]:
    """AlphaPruning (Lu et al., NeurIPS 2024; haiquanlu/AlphaPruning ``ww_sparsity``, block_wise).

    Per matrix, the Hill estimate α of the ESD of WᵀW (:func:`~sparsealloc.pruning.esd.matrix_alpha`,
    "alpha_peak"); per block, the mean α; linear map ``r = (α − α_min)/(α_max − α_min)·2ε + 1 − ε``
    and rescaling ``ratio = r·S·ΣN/Σ(N·r)`` so that heavier-tailed blocks (smaller α) are pruned
    less. ``epsilon`` 0.3 is the paper's Wanda setting for LLaMA-2-7B; then exact repair.
    """
    if not 0.0 <= epsilon < 1.0:
        raise SpecError(f"alphapruning epsilon must be in [0, 1), but got {epsilon}")
    layout = inputs.layout
    alphas = {n: matrix_alpha(inputs.weights[n]) for n in layout.linears}
    block_alpha = {b: float(np.nanmean([alphas[n] for n in layout.block_linears(b)])) for b in layout.blocks}
    values = [a for a in block_alpha.values() if np.isfinite(a)]
    lo, hi = (min(values), max(values)) if values else (0.0, 0.0)
    r = {b: 1.0 if not (hi > lo and np.isfinite(a)) else (a - lo) / (hi - lo) * 2 * epsilon + 1 - epsilon
         for b, a in block_alpha.items()}
    numels = _block_numels(layout)
    scale = target * sum(numels.values()) / sum(numels[b] * r[b] for b in r)
    return _per_block(inputs, {b: r[b] * scale for b in r}, target)


# ----------------------------------------------------------------------------- MRP (our formulation)
def non_outlier_ratio(inputs: AllocationInputs, block: str, ratio: float, m: float,
                      cache: dict[str, tuple[Tensor, Tensor]] | None = None) -> float:
    """Fraction of block ``block``'s Wanda scores ``≤ m × mean`` after pruning it to ``ratio``.

    The complement of OWL's outlier ratio, measured on the pruned block: each Linear is pruned per
    output row by Wanda at ``ratio`` and the pruned weights score 0 (they stay in the count).
    ``cache`` (Linear FQN → (scores, row order)) is filled on first use, so repeated calls for one
    block slice a stored order instead of re-scoring and re-sorting.
    """
    cache = {} if cache is None else cache
    scores = []
    for name in inputs.layout.block_linears(block):
        if name not in cache:
            s = wanda(inputs.weights[name], inputs.stats[name])
            cache[name] = (s, row_order(s))
        s, order = cache[name]
        scores.append(s.masked_fill(row_mask_from_order(order, ratio), 0.0) if ratio > 0 else s)
    count = sum(s.numel() for s in scores)
    mean = sum(float(s.double().sum()) for s in scores) / count
    return sum(int((s <= m * mean).sum()) for s in scores) / count


@ALLOCATORS.register("mrp")
def mrp(inputs: AllocationInputs, target: float, m: float = 5.0, step: float = 0.01,
        start_gap: float = 0.1) -> dict[str, float]:
    """Maximum Redundancy Pruning (Gao et al., ACM MM 2025, arXiv:2503.18377), our formulation.

    The paper's loop is known only in outline (seeds.md §5): start from a low uniform sparsity and
    repeatedly prune more in the most redundant layer, redundancy being the non-outlier ratio of
    the current sparse model's scores. **Ours**: start every block at ``max(target − start_gap, 0)``;
    redundancy = :func:`non_outlier_ratio` (Wanda scores of the current pruned weights, threshold
    ``m`` × mean, OWL's M = 5); add ``step`` to the ratio of the block with the highest redundancy,
    recompute that block's redundancy, and stop once the parameter-weighted mean reaches the
    target; then exact repair. Statistics are the dense model's (no re-calibration per step).
    """
    _need_stats(inputs, "mrp")
    if step <= 0:
        raise SpecError(f"mrp step must be positive, but got {step}")
    layout = inputs.layout
    numels = _block_numels(layout)
    total = sum(numels.values())
    ratios = {b: max(target - start_gap, 0.0) for b in layout.blocks}
    cache: dict[str, tuple[Tensor, Tensor]] = {}
    redundancy = {b: non_outlier_ratio(inputs, b, ratios[b], m, cache) for b in layout.blocks}
    while sum(ratios[b] * numels[b] for b in ratios) / total < target - 1e-12:
        open_blocks = [b for b in layout.blocks if ratios[b] + step <= MAX_RATIO]
        if not open_blocks:
            break
        block = max(open_blocks, key=lambda b: redundancy[b])  # first block on ties
        ratios[block] += step
        redundancy[block] = non_outlier_ratio(inputs, block, ratios[block], m, cache)
    return _per_block(inputs, ratios, target)


# ----------------------------------------------------------------------------- DP over an error table
def _output_energy(w: Tensor, stats: LayerStats) -> Tensor:
    """``tr(W·XᵀX·Wᵀ)`` with Gram statistics, else ``Σ_ij W_ij²·‖X_j‖²``: the error of pruning all of W."""
    if stats.gram is not None:
        return ((w @ stats.gram.float().to(w.device)) * w).sum()
    return (w.pow(2) * stats.sum_sq.float().to(w.device)).sum()


def layer_error(weight: Tensor, stats: LayerStats, ratios: list[float], relative: bool = False) -> list[float]:
    """Layer-local error of Wanda pruning at each of ``ratios`` (per output row, no update).

    ``Σ_ij pruned W_ij²·‖X_j‖² / count``, or ``tr(ΔW·XᵀX·ΔWᵀ) / count`` when ``stats.gram`` is
    present (ΔW = the pruned weights): the mean squared output error per token. With
    ``relative``, the same error divided by the layer's dense output energy (the error of pruning
    every weight), a number in [0, 1] that compares across layers whose activations differ in scale.
    """
    w = weight.detach().float()
    order = row_order(wanda(w, stats))
    scale = float(_output_energy(w, stats)) if relative else float(max(stats.count, 1))
    scale = scale if scale > 0 else 1.0
    out = []
    for ratio in ratios:
        delta = w * row_mask_from_order(order, ratio) if ratio > 0 else torch.zeros_like(w)
        out.append(float(_output_energy(delta, stats)) / scale)
    return out


def block_error_table(inputs: AllocationInputs, grid: list[float], relative: bool = False) -> dict[str, list[float]]:
    """Block → error at each grid ratio: the sum of :func:`layer_error` over the block's Linears."""
    table = {}
    for block in inputs.layout.blocks:
        names = inputs.layout.block_linears(block)
        per_layer = [layer_error(inputs.weights[n], inputs.stats[n], grid, relative) for n in names]
        table[block] = [float(sum(col)) for col in zip(*per_layer)]
    return table


def solve_budget_dp(costs: list[list[float]], units: list[int], total: int) -> list[int]:
    """Choose ``k_ℓ`` per item minimising ``Σ costs[ℓ][k_ℓ]`` subject to ``Σ units[ℓ]·k_ℓ = total``.

    A knapsack-style dynamic programme over the budget (``inf`` costs are unavailable choices).
    When ``total`` is unreachable, the reachable budget nearest to it is used.

    Returns:
        The chosen index per item.
    """
    budget = sum(u * (len(c) - 1) for u, c in zip(units, costs))
    best = np.full(budget + 1, np.inf)
    best[0] = 0.0
    choices = []
    for unit, row in zip(units, costs):
        new, arg = np.full(budget + 1, np.inf), np.full(budget + 1, -1)
        for k, cost in enumerate(row):
            if not np.isfinite(cost):
                continue
            shift = unit * k
            candidate = best[: budget + 1 - shift] + cost
            better = candidate < new[shift:]
            new[shift:][better] = candidate[better]
            arg[shift:][better] = k
        best = new
        choices.append(arg)
    reachable = np.flatnonzero(np.isfinite(best))
    if reachable.size == 0:
        raise SpecError("no feasible allocation: every choice of some block is unavailable")
    b = int(reachable[np.argmin(np.abs(reachable - total))])
    picks = []
    for unit, arg in zip(reversed(units), reversed(choices)):
        k = int(arg[b])
        picks.append(k)
        b -= unit * k
    return picks[::-1]


def _units(numels: list[int], resolution: int = 20) -> list[int]:
    """Integer budget weights: 1 each for equal blocks, else ``n/max n`` in 1/resolution steps."""
    if len(set(numels)) == 1:
        return [1] * len(numels)
    return [max(1, round(resolution * n / max(numels))) for n in numels]


@ALLOCATORS.register("dp")
def dp(inputs: AllocationInputs, target: float, step: float = 0.05, radius: float = 0.2,
       relative: bool = True) -> dict[str, float]:
    """Error-minimising allocation by dynamic programming over a per-block error table (ours).

    Grid ``target + k·step`` for ``|k·step| ≤ radius`` (within [0, 0.99]); the error of block ℓ at
    ratio s is :func:`block_error_table` (Wanda's layer-local objective, or ``tr(ΔW H ΔWᵀ)`` with
    Gram statistics). One grid value per block is chosen to minimise the total error subject to
    the parameter-weighted mean being the target, counted in grid units
    (:func:`solve_budget_dp`; exact for blocks of equal size), then exact repair. The sum of
    layer-local errors assumes errors add across layers, as OBC/EvoPress-style tables do. With
    ``relative`` (the default), each Linear's error is divided by its dense output energy
    (``layer_error``), so blocks whose activations are large do not dominate the table: on SmolLM2
    with Wanda (6 test windows of 512) absolute errors gave PPL 137.8 / 3750 / 73224 at 50 / 60 / 70%,
    because the deep blocks' large activations pushed the sparsity into the first blocks; relative
    errors gave 59.6 / 157.7 / 1621 (uniform: 49.2 / 98.3 / 587.3). Both remain worse than uniform:
    the additive layer-local proxy itself ranks allocations poorly (benchmarks/proxy_choice.md).
    ``relative=false`` keeps the absolute table.
    """
    _need_stats(inputs, "dp")
    if step <= 0 or radius < 0:
        raise SpecError(f"dp needs step > 0 and radius >= 0, but got step={step}, radius={radius}")
    span = int(round(radius / step))
    offsets = range(-span, span + 1)
    grid = [target + k * step for k in offsets]
    valid = [-1e-9 <= g <= MAX_RATIO + 1e-9 for g in grid]
    grid = [min(max(g, 0.0), MAX_RATIO) for g in grid]
    table = block_error_table(inputs, [g for g, ok in zip(grid, valid) if ok], relative)
    numels = _block_numels(inputs.layout)
    blocks = list(inputs.layout.blocks)
    units = _units([numels[b] for b in blocks])
    costs = []
    for b in blocks:
        values = iter(table[b])
        costs.append([next(values) if ok else np.inf for ok in valid])
    picks = solve_budget_dp(costs, units, span * sum(units))
    return _per_block(inputs, {b: grid[k] for b, k in zip(blocks, picks)}, target)


# ----------------------------------------------------------------------------- entry points
def check_allocator(name: str, params: Mapping[str, object] | None = None) -> None:
    """Raise before any work if allocator ``name`` is unknown or does not take ``params``."""
    check_call(ALLOCATORS.get(name), dict(params or {}), f"allocator {name!r}", None, 0.5)


def allocate(name: str, inputs: AllocationInputs, target: float, **params: float) -> dict[str, float]:
    """Run allocator ``name``; unknown names or parameters fail with a SpecError."""
    check_allocator(name, params)
    return ALLOCATORS.get(name)(inputs, target, **params)
