"""Mask selection from scores: pure functions, True where a weight is pruned.

* :func:`row_mask` — unstructured, per output row (Wanda's comparison group), with the total count
  exact to one weight: ``round(numel·s)`` weights are pruned in the layer.
* :func:`nm_mask` — N:M semi-structured (keep N of every M consecutive inputs), e.g. 2:4, 4:8.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsealloc.core.errors import SpecError


def pruned_count(numel: int, sparsity: float) -> int:
    """Number of weights pruned for ``sparsity`` of ``numel`` (rounded to nearest)."""
    return int(round(numel * sparsity))


def row_mask(score: Tensor, sparsity: float) -> Tensor:
    """Prune the lowest-scoring weights of each output row.

    The layer total is ``round(numel·sparsity)``: every row prunes ``total // rows`` weights and the
    first ``total % rows`` rows one more, so achieved sparsity matches the request to one weight.

    Args:
        score: Scores, shape (out, in); higher means keep.
        sparsity: Fraction in [0, 1).

    Returns:
        Boolean mask, shape (out, in), True = prune.
    """
    return row_mask_from_order(row_order(score), sparsity)


def row_order(score: Tensor) -> Tensor:
    """Input indices of each row from lowest to highest score (stable on ties), shape (out, in).

    Stored as int16 where the width allows: a study with a fixed metric computes it once per layer
    and every trial's mask is then a slice (:func:`row_mask_from_order`).
    """
    order = torch.argsort(score, dim=1, stable=True)
    return order.to(torch.int16) if score.shape[1] <= torch.iinfo(torch.int16).max else order


def row_mask_from_order(order: Tensor, sparsity: float) -> Tensor:
    """The :func:`row_mask` of the scores whose :func:`row_order` is ``order``."""
    if not 0.0 <= sparsity < 1.0:
        raise SpecError(f"sparsity must be in [0, 1), but got {sparsity}")
    rows, cols = order.shape
    total = pruned_count(order.numel(), sparsity)
    base, extra = divmod(total, rows)
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=order.device)
    for start, stop, k in ((0, extra, base + 1), (extra, rows, base)):
        if k == 0 or start == stop:
            continue
        mask[start:stop].scatter_(1, order[start:stop, :k].long(), True)
    return mask


def nm_mask(score: Tensor, n: int, m: int) -> Tensor:
    """N:M mask: in every group of ``m`` consecutive inputs of a row, keep the ``n`` best.

    Args:
        score: Scores, shape (out, in); ``in`` must be divisible by ``m``.
        n: Weights kept per group.
        m: Group size.

    Returns:
        Boolean mask, shape (out, in), True = prune.
    """
    rows, cols = score.shape
    if cols % m:
        raise SpecError(f"N:M pattern {n}:{m} needs input width divisible by {m}, but got {cols}")
    groups = score.reshape(rows, cols // m, m)
    idx = torch.topk(groups, m - n, dim=2, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return mask.reshape(rows, cols)


def select_mask(score: Tensor, sparsity: float, nm: tuple[int, int] | None) -> Tensor:
    """Dispatch to :func:`row_mask` (nm is None) or :func:`nm_mask`."""
    if sparsity == 0.0:
        return torch.zeros_like(score, dtype=torch.bool)
    if nm is None:
        return row_mask(score, sparsity)
    return nm_mask(score, *nm)
