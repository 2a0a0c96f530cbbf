"""SparseGPT: OBS mask selection with weight update (Frantar & Alistarh, ICML 2023, arXiv:2301.00774).

Follows the reference implementation (IST-DASLab/sparsegpt ``SparseGPT.fasterprune``, also vendored
by locuslab/wanda ``lib/sparsegpt.py``):

* ``H = XᵀX`` (the reference's ``2/n·XᵀX`` differs by a constant, to which every step below is
  invariant); inputs that never fire (``H_jj = 0``) get ``H_jj = 1``;
* dampening ``λ = percdamp · mean(diag H)`` added to the diagonal (``percdamp = 0.01``);
* ``U = chol(H⁻¹)ᵀ`` (upper Cholesky factor of the inverse), whose diagonal plays the role of
  ``[H⁻¹]_jj`` in the sequential OBS elimination;
* columns are processed in blocks of ``blocksize = 128``; the mask of each block is chosen
  *adaptively* from the current (already updated) weights with the OBS saliency ``w² / U_jj²``;
  then every column is pruned in turn and its error is spread over the remaining columns
  (``W[:, j:] -= (w_j − q_j)/U_jj · U[j, j:]``), lazily across blocks;
* N:M: in every group of ``m`` columns, the ``m − n`` lowest saliencies of each row are pruned, the
  group being chosen when the loop reaches its first column (as in the reference).

Mask groups (unstructured). The reference prunes, in each block, the lowest saliencies of the whole
``rows × blocksize`` tile (one threshold). The default here (``per_row=True``) prunes each row's
share of every block instead, Wanda's comparison group; ``per_row=False`` is the reference's tile
threshold. Both prune exactly ``round(numel·s)`` weights per layer (the count convention of
:func:`sparsealloc.pruning.masks.row_mask`) by spreading counts over blocks with cumulative
rounding. Unlike the reference, weights of dead inputs are not force-zeroed (they do not affect the
calibration output), so the achieved sparsity equals the request.

Statistics come from one pass of the dense model (as for every metric in this package), not from
the reference's sequential pass through already pruned blocks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsealloc.core.errors import SpecError
from sparsealloc.core.types import LayerStats
from sparsealloc.pruning.masks import pruned_count, row_rank


def inverse_hessian_factor(gram: Tensor, percdamp: float = 0.01) -> Tensor:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` with ``λ = percdamp·mean(diag H)``.

    Args:
        gram: ``H = XᵀX``, shape (in, in).
        percdamp: Dampening as a fraction of the mean diagonal.

    Returns:
        ``U`` (float32, upper triangular), with ``UᵀU = (H + λI)⁻¹``.
    """
    h = gram.detach().float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(percdamp * h.diagonal().mean())
    try:
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
        return torch.linalg.cholesky(inverse, upper=True)
    except RuntimeError as exc:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise SpecError(f"SparseGPT: the dampened Gram matrix is not positive definite ({exc}); "
                        f"raise percdamp (now {percdamp})") from None


def obs_saliency(weight: Tensor, factor: Tensor) -> Tensor:
    """OBS saliency ``w_ij² / U_jj²`` used for mask selection, shape of ``weight``."""
    return weight.float().pow(2) / factor.diagonal().reshape(1, -1).pow(2)


def _row_counts(rows: int, cols: int, sparsity: float) -> Tensor:
    """Weights pruned per row: ``round(numel·s)`` spread like :func:`row_mask` (first rows +1)."""
    base, extra = divmod(pruned_count(rows * cols, sparsity), rows)
    counts = torch.full((rows,), base, dtype=torch.long)
    counts[:extra] += 1
    return counts


def _block_mask(saliency: Tensor, start: int, stop: int, cols: int, row_counts: Tensor,
                per_row: bool) -> Tensor:
    """Mask of columns [start, stop) pruning each row's (or the tile's) share of this block."""
    if per_row:
        k = row_counts * stop // cols - row_counts * start // cols  # (rows,)
        return row_rank(saliency) < k.to(saliency.device).reshape(-1, 1)
    total = int(row_counts.sum())
    k = total * stop // cols - total * start // cols
    mask = torch.zeros(saliency.numel(), dtype=torch.bool, device=saliency.device)
    mask[torch.topk(saliency.flatten(), k, largest=False).indices] = True
    return mask.reshape(saliency.shape)


@torch.no_grad()
def sparsegpt_prune(
    weight: Tensor,
    stats: LayerStats,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    per_row: bool = True,
) -> tuple[Tensor, Tensor]:
    """Prune one layer with SparseGPT and return the updated weight and the mask.

    Args:
        weight: Dense weight, shape (out, in).
        stats: Input statistics with ``gram`` (``collect_stats(..., gram=True)``).
        sparsity: Fraction pruned (unstructured); ignored for N:M.
        nm: (n, m) to keep n of every m consecutive inputs, or None.
        blocksize: Columns per lazy-update block (the reference's 128).
        percdamp: Dampening fraction of the mean Hessian diagonal (the reference's 0.01).
        per_row: Unstructured mask group: each row's share per block (True) or the reference's
            tile threshold (False).

    Returns:
        (new_weight float32 with zeros where pruned, mask True = pruned), both (out, in).
    """
    if stats is None or stats.gram is None:
        raise SpecError("SparseGPT needs the Gram matrix XᵀX of the layer input; "
                        "collect statistics with collect_stats(..., gram=True)")
    if blocksize < 1 or (nm is not None and blocksize % nm[1]):
        raise SpecError(f"blocksize must be a positive multiple of the N:M group size, but got {blocksize}")
    w = weight.detach().float().clone()
    rows, cols = w.shape
    factor = inverse_hessian_factor(stats.gram.to(w.device), percdamp)
    mask = torch.zeros_like(w, dtype=torch.bool)
    row_counts = _row_counts(rows, cols, sparsity)
    for start in range(0, cols, blocksize):
        stop = min(start + blocksize, cols)
        _prune_block_(w, mask, factor, start, stop, nm, row_counts, per_row)
    w.masked_fill_(mask, 0.0)
    return w, mask


def _prune_block_(w: Tensor, mask: Tensor, factor: Tensor, start: int, stop: int,
                  nm: tuple[int, int] | None, row_counts: Tensor, per_row: bool) -> None:
    """Prune columns [start, stop) of ``w`` in place (OBS updates), fill ``mask``, push the error on."""
    block = w[:, start:stop].clone()
    u = factor[start:stop, start:stop]
    d = u.diagonal()
    errors = torch.zeros_like(block)
    if nm is None:
        block_mask = _block_mask(block.pow(2) / d.pow(2), start, stop, w.shape[1], row_counts, per_row)
    else:
        block_mask = torch.zeros_like(block, dtype=torch.bool)
    n, m = nm or (0, 0)
    for i in range(stop - start):
        if nm is not None and i % m == 0:
            group = block[:, i:i + m].pow(2) / d[i:i + m].pow(2)
            idx = torch.topk(group, m - n, dim=1, largest=False).indices
            block_mask[:, i:i + m].scatter_(1, idx, True)
        col = block[:, i]
        q = col.masked_fill(block_mask[:, i], 0.0)
        err = (col - q) / d[i]
        block[:, i:] -= err.unsqueeze(1) @ u[i, i:].unsqueeze(0)
        block[:, i] = q
        errors[:, i] = err
    w[:, start:stop] = block
    mask[:, start:stop] = block_mask
    w[:, stop:] -= errors @ factor[start:stop, stop:]
