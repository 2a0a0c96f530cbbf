"""Sparsity levels: a per-group integer genome whose every value meets the budget exactly.

EvoPress (Sieberling et al., ICML 2025, arXiv:2410.14649) gives every prunable Linear an integer
*level*. A level is a fixed number of pruned weights, the same count for every group, so moving one
level from one group to another keeps the total number of pruned weights exact. Level 0 is the
uniform target. Here a group is a search group of the space (one Linear with granularity
``module``; a block, a bin or a projection kind otherwise):

    ratio_g(l) = target + l · step / N_g,

with ``N_g`` the group's weight count and ``step`` an integer number of weights. The parameter-
weighted mean of the ratios is ``target + step·Σl / ΣN``: exactly the target when the levels sum to
zero. Bounds come from the ratio window ``[lo, hi]`` of the space: ``l ∈ [⌈(lo−t)·N_g/step⌉,
⌊(hi−t)·N_g/step⌋]``, which always contains 0.

Pure Python: no optimizer, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class LevelGrid:
    """Level ↔ ratio for every search group (see the module docstring).

    Attributes:
        target: The budget (parameter-weighted mean sparsity).
        numels: Weight count per group.
        step: Weights per level (an integer, the same for every group).
        bounds: (lowest, highest) level per group.
    """

    target: float
    numels: Mapping[str, int]
    step: int
    bounds: Mapping[str, tuple[int, int]]

    @classmethod
    def build(cls, numels: Mapping[str, int], target: float, lo: float, hi: float, step_fraction: float) -> LevelGrid:
        """Grid whose step is ``step_fraction`` of the mean group size (at least one weight).

        Args:
            numels: Weight count per group.
            target: Budget; must lie in ``[lo, hi]``.
            lo: Lowest ratio of any group.
            hi: Highest ratio of any group.
            step_fraction: Weights per level as a fraction of the mean group size.
        """
        mean = sum(numels.values()) / max(len(numels), 1)
        step = max(1, int(round(step_fraction * mean)))
        eps = 1e-9
        bounds = {g: (min(0, math.ceil((lo - target) * n / step - eps)), max(0, math.floor((hi - target) * n / step + eps)))
                  for g, n in numels.items()}
        return cls(float(target), dict(numels), step, bounds)

    def ratio(self, group: str, level: int) -> float:
        """The ratio of ``group`` at ``level``."""
        return self.target + level * self.step / self.numels[group]

    def ratios(self, levels: Mapping[str, int]) -> dict[str, float]:
        """Ratio per group of a genome."""
        return {g: self.ratio(g, levels[g]) for g in self.numels}

    def nearest(self, group: str, ratio: float) -> float:
        """The level (real-valued, unclipped) closest to ``ratio``."""
        return (ratio - self.target) * self.numels[group] / self.step

    def clip(self, group: str, level: int) -> int:
        low, high = self.bounds[group]
        return min(high, max(low, int(level)))

    def levels_of(self, ratios: Mapping[str, float]) -> dict[str, int]:
        """The balanced genome closest to ``ratios`` (:func:`balance` of the rounded levels).

        Ratios on the grid with levels that sum to zero come back unchanged.
        """
        raw = {g: self.nearest(g, ratios[g]) if g in ratios else 0.0 for g in self.numels}
        return balance({g: self.clip(g, round(v)) for g, v in raw.items()}, self.bounds, raw)


def balance(levels: Mapping[str, int], bounds: Mapping[str, tuple[int, int]],
            preferred: Mapping[str, float] | None = None) -> dict[str, int]:
    """Shift levels one at a time until they sum to zero, within their bounds.

    Each step moves the group whose level is furthest from its ``preferred`` real value in the
    direction that brings the sum toward zero (ties by name), so a genome off budget by a few levels
    changes where its rounding was least sure.

    Args:
        levels: Integer level per group, each within its bounds.
        bounds: (lowest, highest) level per group; every range contains 0, so a balance exists.
        preferred: Real-valued levels the result should stay close to (default: ``levels``).

    Returns:
        Levels with sum 0.
    """
    out = dict(levels)
    preferred = preferred or {g: float(v) for g, v in levels.items()}
    total = sum(out.values())
    while total:
        direction = -1 if total > 0 else 1
        movable = [g for g in out if bounds[g][0] <= out[g] + direction <= bounds[g][1]]
        # Moving down: prefer groups sitting above their preferred value (and the reverse).
        g = max(movable, key=lambda name: (direction * (preferred[name] - out[name]), name))
        out[g] += direction
        total += direction
    return out
