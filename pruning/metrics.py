"""Pruning metrics: pure functions ``score(weight, stats, **params) -> Tensor``.

Every metric returns a score shaped like ``weight`` (out, in); higher means keep. Masks are chosen
elsewhere (:mod:`sparsealloc.pruning.masks`), so a metric never sees sparsity, hooks or devices.

A metric may carry the attribute ``bias_compensation = True`` when its method folds the expected
contribution of pruned weights into the layer bias (STADE); :func:`sparsealloc.pruning.prune_`
honours it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from sparsealloc.core.errors import SpecError
from sparsealloc.core.registry import Registry
from sparsealloc.core.types import LayerStats


class Metric(Protocol):
    """A pruning metric: scores per weight from the weight and its input statistics."""

    def __call__(self, weight: Tensor, stats: LayerStats, **params: object) -> Tensor: ...


METRICS: Registry[Metric] = Registry("pruning metric")


@METRICS.register("magnitude")
def magnitude(weight: Tensor, stats: LayerStats | None = None) -> Tensor:
    """|W_ij| (Han et al. 2015; the magnitude baseline of Wanda, arXiv:2306.11695)."""
    return weight.abs().float()


@METRICS.register("wanda")
def wanda(weight: Tensor, stats: LayerStats) -> Tensor:
    """Wanda score |W_ij|·‖X_j‖₂ (Sun et al. 2024, arXiv:2306.11695; locuslab/wanda)."""
    return weight.abs().float() * stats.norm.float()  # (out, in) * (in,)


def stade(weight: Tensor, stats: LayerStats, bias: bool = False) -> Tensor:
    """STADE score |W_ij|·σ_j (Coello de Portugal Mecke et al. 2025, arXiv:2503.22451).

    σ_j is the standard deviation of input feature j over the calibration tokens. The method pairs
    it with mean compensation ``b_i += Σ_{j pruned} W_ij·μ_j`` (computed from the unpruned weights);
    pass ``bias=True`` to have :func:`~sparsealloc.pruning.prune_` apply it.
    """
    return weight.abs().float() * stats.std.float()


METRICS.register("stade")(stade)


@METRICS.register("ria")
def ria(weight: Tensor, stats: LayerStats, a: float = 0.5) -> Tensor:
    """RIA: (|W|/Σ_row|W| + |W|/Σ_col|W|)·‖X_j‖₂^a (Zhang et al. ICLR 2024, "Plug-and-Play").

    ``a = 0.5`` is the paper's default.
    """
    w = weight.abs().float()
    relative = w / w.sum(dim=0, keepdim=True).clamp_min(1e-12) + w / w.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return relative * stats.norm.float().pow(a)


@METRICS.register("lognorm")
def lognorm(weight: Tensor, stats: LayerStats) -> Tensor:
    """Optspa's metric log(1 + |W|/‖W_i,:‖₂ + |W|/‖W_:,j‖₂)·(E[x_j²])^{1/4} (tezhang65/optspa)."""
    w = weight.abs().float()
    row = w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    col = w.norm(dim=0, keepdim=True).clamp_min(1e-12)
    return torch.log1p(w / row + w / col) * stats.mean_sq.float().pow(0.25)


# ----------------------------------------------------------------------------- OptiShear meta-metric
def _coefficient(name: str, a: Tensor) -> Tensor:
    """OptiShear coefficient operators on a 2-D tensor ``a`` (soda-lsq/AdaPrune operator_candidates.py)."""
    eps = 1e-12
    if name == "no_coe":
        return torch.ones((), dtype=a.dtype, device=a.device)
    if name == "row_sum":
        return 1 / a.sum(dim=1, keepdim=True).clamp_min(eps)
    if name == "column_sum":
        return 1 / a.sum(dim=0, keepdim=True).clamp_min(eps)
    if name == "relative_sum":
        return 1 / (a.sum(dim=1, keepdim=True) + a.sum(dim=0, keepdim=True)).clamp_min(eps)
    if name == "to_sum_scalar":
        return 1 / a.sum().clamp_min(eps)
    if name == "to_mean_scalar":
        return 1 / a.mean().clamp_min(eps)
    if name == "frobenius_norm":
        return 1 / a.norm().clamp_min(eps)
    raise SpecError(f"coefficient must be one of {list(COEFFICIENTS)}, but got {name!r}")


def _transform(name: str, a: Tensor) -> Tensor:
    """OptiShear transformation functions (softmax along the input dimension)."""
    table: dict[str, Callable[[Tensor], Tensor]] = {
        "no_op": lambda t: t,
        "sqrt": torch.sqrt,
        "square": torch.square,
        "exp": torch.exp,
        "log": lambda t: torch.log(t.clamp_min(1e-12)),
        "sigmoid": torch.sigmoid,
        "softmax": lambda t: torch.softmax(t, dim=1),
    }
    if name not in table:
        raise SpecError(f"transform must be one of {list(TRANSFORMS)}, but got {name!r}")
    return table[name](a)


COEFFICIENTS = ("no_coe", "row_sum", "column_sum", "relative_sum", "to_sum_scalar", "to_mean_scalar", "frobenius_norm")
TRANSFORMS = ("no_op", "sqrt", "square", "exp", "log", "sigmoid", "softmax")

#: Choices that leave the per-output-row mask unchanged (a positive factor constant along each
#: output row does not change the order within that row). Searching them wastes budget.
MASK_INVARIANT_COEFFICIENTS = {
    "w_coef": ("no_coe", "to_sum_scalar", "to_mean_scalar", "frobenius_norm", "row_sum"),
    "x_coef": ("no_coe", "to_sum_scalar", "to_mean_scalar", "frobenius_norm", "row_sum"),
}
#: Coefficients that do change the mask: W column_sum (RIA-like), W or X relative_sum, X column_sum.
MASK_CHANGING_COEFFICIENTS = {
    "w_coef": ("column_sum", "relative_sum"),
    "x_coef": ("column_sum", "relative_sum"),
}
#: Power transforms only change the relative exponent of |W| against ‖X‖: sqrt(|W|)·‖X‖ ranks
#: like |W|·‖X‖², so ("sqrt", "sqrt") and ("square", "square") for (w_transform, x_transform)
#: rank exactly like ("no_op", "no_op"); continuous exponents cover the rest.
MASK_EQUIVALENT_TRANSFORM_PAIRS = (("sqrt", "sqrt"), ("square", "square"), ("no_op", "no_op"))


@METRICS.register("generalized")
def generalized(
    weight: Tensor,
    stats: LayerStats,
    w_coef: str = "no_coe",
    w_transform: str = "no_op",
    x_coef: str = "no_coe",
    x_transform: str = "no_op",
    w_exponent: float = 1.0,
    x_exponent: float = 1.0,
) -> Tensor:
    """OptiShear meta-metric ``[cW(|W|)·fW(|W|^a)]·[cX(s)·fX(√s^b)]`` (Liu et al. 2025, arXiv:2502.10735).

    ``s_j = E[x_j²]`` over calibration tokens (Wanda's scaler_row), so ``√s ∝ ‖X_j‖₂``. Coefficients
    cW, cX are among :data:`COEFFICIENTS`, transforms fW, fX among :data:`TRANSFORMS`, as in
    soda-lsq/AdaPrune ``operator_candidates.py``. The exponents ``a``, ``b`` (``w_exponent``,
    ``x_exponent``) are our continuous extension; a = b = 1 with no-op choices is Wanda.

    Which choices leave the per-row mask unchanged (and so are not worth searching) is listed in
    :data:`MASK_INVARIANT_COEFFICIENTS` and :data:`MASK_EQUIVALENT_TRANSFORM_PAIRS`.
    """
    w_abs = weight.abs().float()  # (out, in)
    s = stats.mean_sq.float().reshape(1, -1)  # (1, in)
    w_term = _coefficient(w_coef, w_abs) * _transform(w_transform, w_abs.pow(w_exponent))
    x_term = _coefficient(x_coef, s) * _transform(x_transform, s.sqrt().pow(x_exponent))
    score = w_term * x_term
    finite_max = torch.finfo(score.dtype).max
    return torch.nan_to_num(score, nan=0.0, posinf=finite_max, neginf=-finite_max)


def metric_uses_bias(name: str, params: dict) -> bool:
    """Whether the metric asks for mean compensation into the bias (STADE ``bias=True``)."""
    return name in ("stade",) and bool(params.get("bias", False))


def check_params(name: str, params: dict | None = None) -> None:
    """Raise before any work if metric ``name`` is unknown or does not take ``params``."""
    fn = METRICS.get(name)
    try:
        inspect.signature(fn).bind(None, None, **dict(params or {}))
    except TypeError as exc:
        raise SpecError(f"bad parameters {dict(params or {})} for pruning metric {name!r}: {exc}") from None


def score(name: str, weight: Tensor, stats: LayerStats, params: dict | None = None) -> Tensor:
    """Look up metric ``name`` and score ``weight``; unknown parameters give a SpecError."""
    fn = METRICS.get(name)
    params = dict(params or {})
    try:
        return fn(weight, stats, **params)
    except TypeError as exc:
        raise SpecError(f"bad parameters {params} for pruning metric {name!r}: {exc}") from None
