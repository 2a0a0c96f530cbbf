"""Heavy-tail metrics of weight spectra (AlphaPruning's "alpha_peak"): pure functions.

Lu et al., "AlphaPruning: Using Heavy-Tailed Self Regularization Theory for Improved Layer-wise
Pruning of Large Language Models", NeurIPS 2024; haiquanlu/AlphaPruning ``lib/esd_utils.py``
(``net_esd_estimator`` with ``fix_fingers="xmin_peak"``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def esd(weight: Tensor) -> Tensor:
    """Eigenvalues of WᵀW (squared singular values of W), ascending, float64."""
    return torch.linalg.svdvals(weight.detach().float()).double().pow(2).sort().values


def _peak(eigs: Tensor, bins: int) -> float:
    """Left edge of the most populated of ``bins`` equal bins of log10 eigenvalues, as an eigenvalue."""
    logs = eigs.log10()
    lo, hi = float(logs.min()), float(logs.max())
    if hi <= lo:
        return float(eigs[0])
    counts = torch.histc(logs, bins, min=lo, max=hi)
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    return float(10 ** edges[int(torch.argmax(counts))])


def hill_alpha(eigs: Tensor, bins: int = 100, window: tuple[float, float] = (0.95, 1.5)) -> float:
    """Power-law exponent of an eigenvalue spectrum by the Hill estimator with a KS-chosen xmin.

    For each candidate ``xmin = λ_k`` (ascending λ, ``n = N − k`` values in the tail)
    ``α = 1 + n / (Σ_{i≥k} ln λ_i − n·ln λ_k)`` and the Kolmogorov–Smirnov distance
    ``D = max_i |1 − (λ_i/xmin)^{1−α} − i/n|``; the α of the smallest D is returned (Clauset et
    al. 2009, as in weightwatcher). Candidates are restricted, as AlphaPruning's "xmin_peak", to
    ``window`` × the peak of a ``bins``-bin histogram of log10 λ (0.95× to 1.5×). The reference
    compares λ against ``log10(0.95·peak)`` for the lower bound (so, in effect, almost no lower
    bound); we apply 0.95× the peak as written in the paper's description.

    Args:
        eigs: Positive eigenvalues (any order).
        bins: Histogram bins for the peak.
        window: (low, high) multiples of the peak bounding the xmin candidates.

    Returns:
        α, or NaN when no candidate gives a finite estimate (e.g. all eigenvalues equal).
    """
    eigs = eigs.double().flatten().sort().values
    eigs = eigs[eigs > 0]
    n_total = eigs.numel()
    if n_total < 2:
        return math.nan
    peak = _peak(eigs, bins)
    idx = torch.arange(n_total - 1)
    inside = (eigs[:-1] >= window[0] * peak) & (eigs[:-1] <= window[1] * peak)
    candidates = idx[inside] if bool(inside.any()) else idx
    logs = eigs.log()
    tail_sum = logs.flip(0).cumsum(0).flip(0)  # Σ_{i≥k} ln λ_i
    best_d, best_alpha = math.inf, math.nan
    for k in candidates.tolist():
        n = n_total - k
        denom = float(tail_sum[k]) - n * float(logs[k])
        if denom <= 0:
            continue
        alpha = 1 + n / denom
        fitted = 1 - (eigs[k:] / eigs[k]).pow(1 - alpha)
        d = float((fitted - torch.arange(n, dtype=torch.float64) / n).abs().max())
        if d < best_d:
            best_d, best_alpha = d, alpha
    return best_alpha


def matrix_alpha(weight: Tensor, bins: int = 100) -> float:
    """AlphaPruning's per-matrix metric: :func:`hill_alpha` of the ESD of WᵀW."""
    return hill_alpha(esd(weight), bins)
