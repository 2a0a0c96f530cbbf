"""Exact-budget repair: project per-group ratios onto the set whose weighted mean is the target.

Optspa rejects off-budget trials and OptiShear adds a penalty objective; we do neither. Every
candidate is repaired by the clipped shift ``r_g ← clip(r_g + c, lo, hi)`` with the scalar ``c``
chosen so that ``Σ n_g·r_g / Σ n_g = target`` (monotone in ``c``, solved by bisection). Among
shifts it is the smallest change, and it keeps the shape of the proposal wherever no bound binds.
"""

from __future__ import annotations

from collections.abc import Mapping

from sparsealloc.core.errors import SpecError


def weighted_mean(ratios: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """Σ w_g·r_g / Σ w_g over the keys of ``ratios``."""
    total = sum(weights[k] for k in ratios)
    return sum(ratios[k] * weights[k] for k in ratios) / total


def project_to_budget(
    ratios: Mapping[str, float],
    weights: Mapping[str, float],
    target: float,
    lo: float = 0.0,
    hi: float = 0.99,
    tol: float = 1e-12,
) -> dict[str, float]:
    """Shift-and-clip ``ratios`` so their ``weights``-weighted mean equals ``target`` exactly.

    Args:
        ratios: Proposed ratio per group.
        weights: Parameter count per group (same keys).
        target: Required weighted mean.
        lo: Lower bound of every ratio.
        hi: Upper bound of every ratio.
        tol: Bisection tolerance on the mean.

    Returns:
        Repaired ratios, each in [lo, hi], weighted mean within ``tol`` of ``target``.

    Raises:
        SpecError: ``target`` is outside [lo, hi] (no repair exists).
    """
    if not lo <= target <= hi:
        raise SpecError(f"target sparsity {target} must lie within the ratio bounds [{lo}, {hi}]")
    keys = list(ratios)
    if not keys:
        return {}

    def mean_after(shift: float) -> float:
        clipped = {k: min(hi, max(lo, ratios[k] + shift)) for k in keys}
        return weighted_mean(clipped, weights)

    low, high = (lo - max(ratios.values())) - 1.0, (hi - min(ratios.values())) + 1.0
    for _ in range(200):
        mid = (low + high) / 2
        value = mean_after(mid)
        if abs(value - target) <= tol:
            break
        if value < target:
            low = mid
        else:
            high = mid
    repaired = {k: min(hi, max(lo, ratios[k] + mid)) for k in keys}
    # Put the last rounding residue on the largest unclipped group so the mean is exact.
    residue = (target - weighted_mean(repaired, weights)) * sum(weights[k] for k in keys)
    free = [k for k in keys if lo < repaired[k] < hi]
    if free and residue:
        k = max(free, key=lambda name: weights[name])
        repaired[k] = min(hi, max(lo, repaired[k] + residue / weights[k]))
    return repaired


def budget_with_removed(
    ratios: Mapping[str, float],
    weights: Mapping[str, float],
    removed: set[str] | frozenset[str],
    target: float,
    lo: float = 0.0,
    hi: float = 0.99,
) -> dict[str, float]:
    """Repair ``ratios`` when the groups in ``removed`` are deleted outright (dropped blocks).

    Removed groups count as fully sparse toward ``target``; the others are projected
    (:func:`project_to_budget`) onto the rest of the budget,
    ``(target·Σw − Σ_removed w) / Σ_kept w``. Removed groups get ratio 0 in the result (their
    weights are gone, not masked).

    Raises:
        SpecError: the removed groups alone exceed the budget, or the rest cannot be met within
            [lo, hi].
    """
    total = sum(weights[k] for k in ratios)
    gone = sum(weights[k] for k in ratios if k in removed)
    kept = {k: v for k, v in ratios.items() if k not in removed}
    if not kept:
        raise SpecError("cannot remove every group")
    rest = (target * total - gone) / (total - gone)
    if rest < lo - 1e-12:
        raise SpecError(f"removing {gone / total:.1%} of the weights exceeds the sparsity target {target}")
    out = project_to_budget(kept, weights, max(rest, lo), lo, hi)
    return {k: out.get(k, 0.0) for k in ratios}
