"""KV-cache bit budgets: per-slot bit-widths on a ladder whose mean meets a budget.

A slot is the K or the V cache of one attention layer (or both, when they share a width); in a
decoder every slot holds the same number of values per token, so the cache's bits per token are
proportional to the plain sum of the slots' widths, and a budget of ``b`` mean bits is the total
``⌊b·n⌋`` over ``n`` slots. The ladder (``kv.bits``, e.g. 2, 3, 4, 8, 16) has uneven steps, so the
exact total is not always reachable; :func:`fit_to_budget` returns widths whose sum is at most the
total and within one ladder step of it: exact whenever a 1-bit step is left to take.

EvoPress (Sieberling et al., ICML 2025) searches quantization bit-widths per layer under a bits
budget with the same level switch as sparsity levels (``bit_switch`` in the evo sampler); every
candidate here meets
the budget, whichever sampler proposed it.

Pure Python: no optimizer, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence


def budget_total(budget: float, slots: int) -> int:
    """The integer bit total of ``slots`` slots at ``budget`` mean bits (rounded down, 1e-9 slack)."""
    return int(math.floor(budget * slots + 1e-9))


def fit_to_budget(bits: Mapping[str, int], ladder: Sequence[int], total: int,
                  protect: Collection[str] = ()) -> dict[str, int]:
    """Step widths along the ladder until their sum is at most ``total`` and no step up still fits.

    Down: the widest slot first (ties: the last name), so an over-budget proposal loses its peaks.
    Up: the narrowest slot whose next step fits, smallest step first (ties: the first name), so the
    budget is used up as evenly as the ladder allows. A proposal that already meets the budget and
    has no step up left comes back unchanged.

    Args:
        bits: Width per slot, each on the ladder.
        ladder: The allowed widths.
        total: The largest allowed sum; at least ``min(ladder) · len(bits)``.
        protect: Slots lowered only when no other slot can be (a mutation's raised slots).

    Raises:
        ValueError: a width is off the ladder, or the total is below the narrowest assignment.
    """
    rungs = sorted(set(int(b) for b in ladder))
    index = {b: i for i, b in enumerate(rungs)}
    bad = [k for k, b in bits.items() if int(b) not in index]
    if bad:
        raise ValueError(f"widths must lie on the ladder {rungs}, but {bad[0]!r} has {bits[bad[0]]}")
    if total < rungs[0] * len(bits):
        raise ValueError(f"a total of {total} bits is below {len(bits)} slots at {rungs[0]} bits")
    level = {k: index[int(b)] for k, b in bits.items()}
    names = sorted(level)
    current = sum(rungs[i] for i in level.values())
    while current > total:
        lowerable = [n for n in names if level[n] > 0]
        k = max(lowerable, key=lambda n: (n not in protect, level[n], n))
        current -= rungs[level[k]] - rungs[level[k] - 1]
        level[k] -= 1
    while True:
        room = total - current
        fits = [n for n in names if level[n] + 1 < len(rungs) and rungs[level[n] + 1] - rungs[level[n]] <= room]
        if not fits:
            break
        k = min(fits, key=lambda n: (rungs[level[n] + 1] - rungs[level[n]], level[n], n))
        current += rungs[level[k] + 1] - rungs[level[k]]
        level[k] += 1
    return {k: rungs[level[k]] for k in bits}
