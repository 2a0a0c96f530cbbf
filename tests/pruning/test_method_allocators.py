"""Allocators: exact budget on every tiny model, AlphaPruning's Hill estimator, MRP, DP vs brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsealloc.core.errors import SpecError, UnknownNameError
from sparsealloc.core.types import LayerStats
from sparsealloc.pruning.allocators import (
    ALLOCATORS,
    AllocationInputs,
    alphapruning,
    allocate,
    check_allocator,
    layer_error,
    mrp,
    non_outlier_ratio,
    solve_budget_dp,
)
from sparsealloc.pruning.esd import esd, hill_alpha, matrix_alpha
from sparsealloc.pruning.model.structure import model_layout

ARCHS = ("llama", "mistral", "qwen2", "opt")
NAMES = ("uniform", "owl", "depth_ramp", "alphapruning", "mrp", "dp")


def random_stats(layout, seed: int, gram: bool) -> dict[str, LayerStats]:
    """Random but valid statistics per Linear (heavy-tailed channel scales, non-zero means)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in layout.linears:
        d, n = layout.in_features[name], 32
        scale, mean = torch.exp(torch.randn(d, generator=gen)), torch.randn(d, generator=gen)
        x = torch.randn(n, d, generator=gen) * scale + mean
        out[name] = LayerStats((x * x).sum(0), x.sum(0), n, x.T @ x if gram else None)
    return out


def inputs_of(model, stats) -> AllocationInputs:
    layout = model_layout(model)
    modules = dict(model.named_modules())
    return AllocationInputs(layout, {n: modules[n].weight.detach() for n in layout.linears}, stats)


def weighted_mean(ratios, layout) -> float:
    return sum(ratios[n] * layout.numels[n] for n in layout.linears) / layout.total_params


def test_registry_lists_the_allocators():
    assert set(NAMES) <= set(ALLOCATORS.names())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("arch", ARCHS)
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(target=st.floats(0.05, 0.9), seed=st.integers(0, 10_000), gram=st.booleans())
def test_every_allocator_meets_the_budget_exactly(tiny_models, arch, name, target, seed, gram):
    inputs = inputs_of(tiny_models[arch], None)
    inputs.stats = random_stats(inputs.layout, seed, gram)
    ratios = allocate(name, inputs, target)
    assert set(ratios) == set(inputs.layout.linears)  # keys are Linear FQNs
    assert all(0.0 <= r < 1.0 for r in ratios.values())
    assert weighted_mean(ratios, inputs.layout) == pytest.approx(target, abs=1e-9)
    for block in inputs.layout.blocks:  # every allocator here is block-wise
        assert len({ratios[n] for n in inputs.layout.block_linears(block)}) == 1


def test_check_allocator_names_and_params():
    check_allocator("owl", {"m": 5, "lam": 0.1})
    with pytest.raises(UnknownNameError) as info:
        check_allocator("owll")
    assert all(name in str(info.value) for name in NAMES)
    with pytest.raises(SpecError, match="alpha"):
        check_allocator("dp", {"alpha": 1})


# ----------------------------------------------------------------------------- AlphaPruning
@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.0])
def test_hill_estimator_recovers_power_law_exponent(alpha):
    gen = torch.Generator().manual_seed(int(alpha))
    u = torch.rand(2000, generator=gen, dtype=torch.float64)
    eigs = 0.5 * u.pow(-1 / (alpha - 1))  # Pareto: density ∝ λ^(−α) above 0.5
    assert hill_alpha(eigs) == pytest.approx(alpha, abs=0.2)


def _matrix_with_spectrum(eigs: torch.Tensor, rows: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=gen, dtype=torch.float64))
    k = min(rows, cols)
    return (u[:, :k] * eigs[:k].sqrt()) @ v[:, :k].T


def test_matrix_alpha_uses_the_esd_of_wtw():
    gen = torch.Generator().manual_seed(0)
    eigs = torch.rand(128, generator=gen, dtype=torch.float64).pow(-0.5).sort().values  # α = 3
    w = _matrix_with_spectrum(eigs, 128, 160, 0)
    torch.testing.assert_close(esd(w), eigs, rtol=1e-4, atol=1e-6)
    assert matrix_alpha(w) == pytest.approx(hill_alpha(eigs), rel=1e-3)
    assert hill_alpha(torch.ones(10)) != hill_alpha(torch.ones(10))  # all equal: NaN, no estimate


def test_alphapruning_prunes_heavy_tailed_blocks_less(tiny_models):
    inputs = inputs_of(tiny_models["llama"], None)
    weights = dict(inputs.weights)
    heavy = inputs.layout.blocks[1]
    gen = torch.Generator().manual_seed(1)
    for n in inputs.layout.block_linears(heavy):  # α ≈ 2 spectra in block 1
        rows, cols = weights[n].shape
        eigs = torch.rand(min(rows, cols), generator=gen, dtype=torch.float64).pow(-1.0) * 1e-3
        weights[n] = _matrix_with_spectrum(eigs, rows, cols, 1).float()
    inputs.weights = weights
    ratios = alphapruning(inputs, 0.5, epsilon=0.3)
    block = {b: ratios[inputs.layout.block_linears(b)[0]] for b in inputs.layout.blocks}
    assert min(block, key=block.get) == heavy
    assert max(block.values()) / min(block.values()) == pytest.approx(1.3 / 0.7, rel=1e-6)  # no clipping
    with pytest.raises(SpecError, match="epsilon"):
        alphapruning(inputs, 0.5, epsilon=1.5)


# ----------------------------------------------------------------------------- MRP
def test_non_outlier_ratio_by_hand(tiny_models):
    inputs = inputs_of(tiny_models["llama"], None)
    layout = inputs.layout
    block = layout.blocks[0]
    ones = {n: LayerStats(torch.full((layout.in_features[n],), 1.0), torch.zeros(layout.in_features[n]), 1)
            for n in layout.linears}
    weights = {n: torch.ones_like(w) for n, w in inputs.weights.items()}
    first = layout.block_linears(block)[0]
    weights[first] = weights[first].clone()
    weights[first][0, 0] = 1e6  # one huge outlier in the block
    inputs = AllocationInputs(layout, weights, ones)
    count = sum(layout.numels[n] for n in layout.block_linears(block))
    assert non_outlier_ratio(inputs, block, 0.0, 5.0) == pytest.approx((count - 1) / count)


def test_mrp_prunes_outlier_heavy_blocks_less(tiny_models):
    inputs = inputs_of(tiny_models["llama"], random_stats(model_layout(tiny_models["llama"]), 0, False))
    weights = dict(inputs.weights)
    heavy = inputs.layout.blocks[2]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for n in inputs.layout.block_linears(heavy):  # Student-t weights: many Wanda outliers
            weights[n] = torch.distributions.StudentT(1.5).sample(weights[n].shape) * 0.02
    inputs.weights = weights
    before = [non_outlier_ratio(inputs, heavy, s, 5.0) for s in (0.0, 0.4, 0.8)]
    assert before[0] > before[1] > before[2]  # pruning a block lowers its redundancy: the loop balances
    ratios = mrp(inputs, 0.5)
    block = {b: ratios[inputs.layout.block_linears(b)[0]] for b in inputs.layout.blocks}
    assert min(block, key=block.get) == heavy
    assert block[heavy] < 0.5 - 0.05
    assert weighted_mean(ratios, inputs.layout) == pytest.approx(0.5, abs=1e-9)


# ----------------------------------------------------------------------------- DP
def _brute_force(costs, units, total):
    best, best_cost = None, math.inf
    choices = list(itertools.product(*[range(len(c)) for c in costs]))
    reachable = {sum(u * k for u, k in zip(units, ks)) for ks in choices
                 if all(np.isfinite(c[k]) for c, k in zip(costs, ks))}
    goal = min(reachable, key=lambda b: abs(b - total))
    for ks in choices:
        cost = sum(c[k] for c, k in zip(costs, ks))
        if sum(u * k for u, k in zip(units, ks)) == goal and cost < best_cost:
            best, best_cost = ks, cost
    return best_cost


def test_dp_on_a_hand_made_table():
    # 3 blocks, grid offsets {−1, 0, +1} (index 0..2), budget Σk = 3 (mean offset 0).
    costs = [[0.0, 1.0, 5.0],    # block 0 hates sparsity
             [3.0, 1.0, 1.5],    # block 1 tolerates it
             [2.0, 1.0, 1.2]]
    picks = solve_budget_dp(costs, [1, 1, 1], 3)
    assert picks == [0, 2, 1] or picks == [0, 1, 2]
    assert sum(costs[i][k] for i, k in enumerate(picks)) == pytest.approx(_brute_force(costs, [1, 1, 1], 3))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 100_000), n_blocks=st.integers(1, 5), grid=st.integers(1, 4),
       unequal=st.booleans())
def test_dp_matches_brute_force(seed, n_blocks, grid, unequal):
    rng = np.random.default_rng(seed)
    costs = rng.random((n_blocks, grid)).tolist()
    if grid > 1:
        costs[0][rng.integers(grid)] = np.inf  # an unavailable choice
    units = rng.integers(1, 4, n_blocks).tolist() if unequal else [1] * n_blocks
    total = int(rng.integers(0, sum(units) * (grid - 1) + 1))
    picks = solve_budget_dp(costs, units, total)
    cost = sum(costs[i][k] for i, k in enumerate(picks))
    assert cost == pytest.approx(_brute_force(costs, units, total))


def test_layer_error_by_hand():
    w = torch.tensor([[1.0, 2.0], [3.0, -4.0]])
    x = torch.tensor([[1.0, 1.0], [1.0, -1.0]])  # Σx² = [2, 2], XᵀX = diag(2, 2)
    stats = LayerStats((x * x).sum(0), x.sum(0), 2)
    # 50%: prune w00 (1·√2 < 2·√2) and w10 (3 < 4): error = (1 + 9)·2 / 2 tokens
    assert layer_error(w, stats, [0.0, 0.5]) == pytest.approx([0.0, 10.0])
    stats.gram = x.T @ x
    assert layer_error(w, stats, [0.5]) == pytest.approx([10.0])
    # relative: (1 + 9)·2 over the dense output energy (1 + 4 + 9 + 16)·2 — the token count cancels
    assert layer_error(w, stats, [0.0, 0.5], relative=True) == pytest.approx([0.0, 1 / 3])


def test_dp_relative_ignores_activation_scale(tiny_models):
    """Scaling one block's inputs changes absolute errors 10⁴× but no relative error: same allocation."""
    inputs = inputs_of(tiny_models["qwen2"], random_stats(model_layout(tiny_models["qwen2"]), 3, False))
    plain = allocate("dp", inputs, 0.5, step=0.05, radius=0.1, relative=True)
    stats = dict(inputs.stats)
    for n in inputs.layout.block_linears(inputs.layout.blocks[0]):
        s = stats[n]
        stats[n] = LayerStats(s.sum_sq * 1e4, s.sum * 1e2, s.count)
    inputs.stats = stats
    assert allocate("dp", inputs, 0.5, step=0.05, radius=0.1, relative=True) == pytest.approx(plain)
    assert allocate("dp", inputs, 0.5, step=0.05, radius=0.1, relative=False) != pytest.approx(plain)


def test_dp_prefers_cheap_blocks(tiny_models):
    inputs = inputs_of(tiny_models["qwen2"], random_stats(model_layout(tiny_models["qwen2"]), 3, False))
    stats = dict(inputs.stats)
    costly = inputs.layout.blocks[0]
    for n in inputs.layout.block_linears(costly):  # 100× larger inputs: errors 10⁴× larger
        s = stats[n]
        stats[n] = LayerStats(s.sum_sq * 1e4, s.sum * 1e2, s.count)
    inputs.stats = stats
    ratios = allocate("dp", inputs, 0.5, step=0.05, radius=0.1, relative=False)
    assert ratios[inputs.layout.block_linears(costly)[0]] == pytest.approx(0.4)
