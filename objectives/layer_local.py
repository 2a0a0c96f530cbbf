"""Summed layer-local output error from per-layer Gram matrices: no forward pass at all.

For a Linear layer with calibration inputs X (tokens × in) and pruned weights ΔW = W − W_pruned,
the output error on the calibration tokens is ‖X·ΔWᵀ‖²_F = tr(ΔW·H·ΔWᵀ) with H = XᵀX, the
layer-wise reconstruction objective of OBS/SparseGPT (Frantar & Alistarh 2023, arXiv:2301.00774)
that OBC/EvoPress-style error tables add over layers. With H collected once, a candidate's error
needs one (out × in) · (in × in) product per layer and no forward pass; it is the zero-forward first
rung of the fidelity ladder (:mod:`sparsealloc.objectives.trial`) and the ``layer_local`` proxy.

H is kept as H/N (N calibration tokens: the error is then a mean per token) in bfloat16, half the
memory of float32 (about 200 MB for SmolLM2) and a fast matrix product on CPUs with AVX512-BF16/AMX
and on GPUs; the products accumulate in float32 and the sum in float64.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from sparsealloc.core.types import LayerStats

#: Storage dtype of the per-layer H/N matrices.
GRAM_DTYPE = torch.bfloat16


def compact_grams(stats: Mapping[str, LayerStats], dtype: torch.dtype = GRAM_DTYPE,
                  drop: bool = False) -> dict[str, Tensor]:
    """H/N per Linear FQN in ``dtype``; Linears that share an input share one tensor.

    Args:
        stats: Statistics collected with ``gram=True``.
        dtype: Storage dtype.
        drop: Remove the float32 Gram from ``stats`` once converted (saves its memory).
    """
    out: dict[str, Tensor] = {}
    done: dict[int, Tensor] = {}
    for name, s in stats.items():
        key = id(s)
        if key not in done:
            if s.gram is None:
                raise ValueError(f"statistics of {name!r} have no Gram matrix; collect them with gram=True")
            done[key] = (s.gram / max(s.count, 1)).to(dtype)
            if drop:
                s.gram = None
        out[name] = done[key]
    return out


def quadratic_error(delta: Tensor, gram: Tensor) -> float:
    """tr(ΔW·G·ΔWᵀ) for one layer (``delta``: out × in, ``gram``: in × in), float64 sum."""
    if gram.dtype in (torch.bfloat16, torch.float16):
        product = (delta.to(gram.dtype) @ gram).float()
    else:
        product = delta.float() @ gram.float()
    return float((product * delta.float()).sum(dtype=torch.float64))


def summed_error(pairs: Iterable[tuple[Tensor, Tensor]]) -> float:
    """Σ over ``(ΔW, G)`` pairs of :func:`quadratic_error`."""
    return sum(quadratic_error(delta, gram) for delta, gram in pairs)
