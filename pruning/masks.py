"""Mask selection from scores: pure functions, True where a weight is pruned.

* :func:`row_mask` — unstructured, per output row (Wanda's comparison group), with the total count
  exact to one weight: ``round(numel·s)`` weights are pruned in the layer.
* :func:`row_rank` / :func:`masked_copy_` — the same masks from a cached per-row rank: a study with a
  fixed metric scores and sorts once, and a trial then writes each pruned weight matrix from the
  pristine one in a single fused pass (restore and prune together, no mask built by scatter).
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


def row_groups(rows: int, cols: int, sparsity: float) -> list[tuple[int, int, int]]:
    """How :func:`row_mask` splits the layer's pruned count over its rows.

    Returns:
        ``(start, stop, k)`` triples: rows ``start:stop`` prune their ``k`` lowest-scoring weights
        (the first ``total % rows`` rows one more than the others). Empty row ranges are left out.
    """
    if not 0.0 <= sparsity < 1.0:
        raise SpecError(f"sparsity must be in [0, 1), but got {sparsity}")
    base, extra = divmod(pruned_count(rows * cols, sparsity), rows)
    return [(start, stop, k) for start, stop, k in ((0, extra, base + 1), (extra, rows, base)) if stop > start]


def row_mask_from_order(order: Tensor, sparsity: float) -> Tensor:
    """The :func:`row_mask` of the scores whose :func:`row_order` is ``order``."""
    rows, cols = order.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=order.device)
    for start, stop, k in row_groups(rows, cols, sparsity):
        if k:
            mask[start:stop].scatter_(1, order[start:stop, :k].long(), True)
    return mask


def row_rank(score: Tensor) -> Tensor:
    """Position of every weight in its row's :func:`row_order` (0 = pruned first), shape (out, in).

    ``rank < k`` is then the row's mask at ``k`` pruned weights: one comparison instead of a
    scatter. Stored as int16 where the width allows (2 bytes per weight, like the order).
    """
    order = torch.argsort(score, dim=1, stable=True)
    rows, cols = order.shape
    positions = torch.arange(cols, device=order.device).expand(rows, cols)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    return rank.to(torch.int16) if cols <= torch.iinfo(torch.int16).max else rank


def row_mask_from_rank(rank: Tensor, sparsity: float) -> Tensor:
    """The :func:`row_mask` of the scores whose :func:`row_rank` is ``rank``."""
    rows, cols = rank.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=rank.device)
    for start, stop, k in row_groups(rows, cols, sparsity):
        torch.lt(rank[start:stop], k, out=mask[start:stop])
    return mask


def masked_copy_(dst: Tensor, src: Tensor, rank: Tensor, sparsity: float) -> Tensor:
    """``dst ← src`` with :func:`row_mask_from_rank` zeroed, in one fused pass per row group.

    Restores and prunes at once (``src`` is the pristine weight): no separate copy, no boolean
    mask built by scatter. ``src`` must be finite (a pruned NaN would stay NaN).

    Returns:
        ``dst``.
    """
    return _rank_select(dst, src, rank, sparsity, torch.ge)


def pruned_part(src: Tensor, rank: Tensor, sparsity: float) -> Tensor:
    """The weights :func:`masked_copy_` would zero, as a dense tensor (ΔW = W − W_pruned)."""
    return _rank_select(torch.empty_like(src), src, rank, sparsity, torch.lt)


def _rank_select(dst: Tensor, src: Tensor, rank: Tensor, sparsity: float, keep) -> Tensor:
    """``dst ← src · keep(rank, k)`` per row group of :func:`row_groups` (``k``: the group's pruned count)."""
    rows, cols = rank.shape
    for start, stop, k in row_groups(rows, cols, sparsity):
        torch.mul(src[start:stop], keep(rank[start:stop], k), out=dst[start:stop])
    return dst


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
