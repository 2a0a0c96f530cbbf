"""KV-cache budgets: per-slot bit-widths on a ladder whose mean bits, or bytes per token, meet a budget.

A slot is the K or the V cache of one attention layer (or both, when they share a width); in a
decoder every slot holds the same number of values per token, so the cache's bits per token are
proportional to the plain sum of the slots' widths, and a budget of ``b`` mean bits is the total
``⌊b·n⌋`` over ``n`` slots. The ladder (``kv.bits``, e.g. 2, 3, 4, 8, 16) has uneven steps, so the
exact total is not always reachable; :func:`fit_to_budget` returns widths whose sum is at most the
total and within one ladder step of it: exact whenever a 1-bit step is left to take.

A budget in *bytes per token* (``kv.budget_bytes``, the unit of the ``kv_bytes`` objective) gives
each slot a cost per rung (:func:`slot_bytes`: packed codes plus group parameters, 16 bits with
none; :mod:`sparsealloc.core.kv_layout`) and fits the same way on the summed cost.

EvoPress (Sieberling et al., ICML 2025) searches quantization bit-widths per layer under a bits
budget with the same level switch as sparsity levels (``bit_switch`` in the evo sampler); every
candidate here meets
the budget, whichever sampler proposed it.

Pure Python: no optimizer, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence

from sparsealloc.core.kv_layout import key_bytes_per_token, value_bytes_per_token

#: Slack of a byte-budget comparison (sums of float byte counts).
BYTES_SLACK = 1e-6


def budget_total(budget: float, slots: int) -> int:
    """The integer bit total of ``slots`` slots at ``budget`` mean bits (rounded down, 1e-9 slack)."""
    return int(math.floor(budget * slots + 1e-9))


def slot_bytes(kinds: str, ladder: Sequence[int], kv_heads: int, head_dim: int, group_size: int) -> dict[int, float]:
    """Bytes per token of one slot at each rung: ``kinds`` is "k", "v" or "kv" (K and V sharing a width)."""
    parts = {"k": key_bytes_per_token, "v": value_bytes_per_token}
    return {int(b): kv_heads * sum(parts[kind](int(b), head_dim, group_size) for kind in kinds) for b in ladder}


def fit_to_budget(bits: Mapping[str, int], ladder: Sequence[int], total: float,
                  protect: Collection[str] = (), cost: Mapping[str, Mapping[int, float]] | None = None
                  ) -> dict[str, int]:
    """Step widths along the ladder until their sum is at most ``total`` and no step up still fits.

    Down: the widest slot first (ties: the last name), so an over-budget proposal loses its peaks.
    Up: the narrowest slot whose next step fits, smallest step first (ties: the first name), so the
    budget is used up as evenly as the ladder allows. A proposal that already meets the budget and
    has no step up left comes back unchanged.

    Args:
        bits: Width per slot, each on the ladder.
        ladder: The allowed widths.
        total: The largest allowed sum of costs; at least every slot's cost at the lowest rung.
        protect: Slots lowered only when no other slot can be (a mutation's raised slots).
        cost: Cost of each slot at each rung (e.g. :func:`slot_bytes`); default: the width itself.

    Raises:
        ValueError: a width is off the ladder, or the total is below the narrowest assignment.
    """
    rungs = sorted(set(int(b) for b in ladder))
    index = {b: i for i, b in enumerate(rungs)}
    bad = [k for k, b in bits.items() if int(b) not in index]
    if bad:
        raise ValueError(f"widths must lie on the ladder {rungs}, but {bad[0]!r} has {bits[bad[0]]}")
    price = (lambda n, i: float(cost[n][rungs[i]])) if cost is not None else (lambda n, i: float(rungs[i]))  # noqa: E731
    slack = BYTES_SLACK if cost is not None else 0.0
    floor = sum(price(n, 0) for n in bits)
    if total + slack < floor:
        raise ValueError(f"a total of {total:g} is below {len(bits)} slots at {rungs[0]} bits ({floor:g})")
    level = {k: index[int(b)] for k, b in bits.items()}
    names = sorted(level)
    current = sum(price(n, i) for n, i in level.items())
    while current > total + slack:
        lowerable = [n for n in names if level[n] > 0]
        k = max(lowerable, key=lambda n: (n not in protect, level[n], n))
        current -= price(k, level[k]) - price(k, level[k] - 1)
        level[k] -= 1
    while True:
        room = total + slack - current
        step = lambda n: price(n, level[n] + 1) - price(n, level[n])  # noqa: E731
        fits = [n for n in names if level[n] + 1 < len(rungs) and step(n) <= room]
        if not fits:
            break
        k = min(fits, key=lambda n: (step(n), level[n], n))
        current += step(k)
        level[k] += 1
    return {k: rungs[level[k]] for k in bits}
