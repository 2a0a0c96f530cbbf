"""Pruning metrics: pure functions ``score(weight, stats, **params) -> Tensor``.

Every metric returns a score shaped like ``weight`` (out, in); higher means keep. Masks are chosen
elsewhere (:mod:`sparsealloc.pruning.masks`), so a metric never sees sparsity, hooks or devices.

A metric may declare :class:`MetricTraits` (attribute ``traits``) when it needs more than
``(weight, stats)`` from :func:`sparsealloc.pruning.prune_`:

* ``needs_name``: the score depends on which module it is (STADEW); it receives the module FQN
  as the keyword ``fqn``;
* ``gram``: ``"required"`` or ``"optional"`` use of ``stats.gram = XᵀX`` (callers should then run
  ``collect_stats(..., gram=True)``);
* ``bias``: ``(params, fqn) -> bool``, whether mean compensation folds the pruned weights'
  expected contribution into the layer bias (STADE), computed from the *unpruned* weights;
* ``updater``: a pruner that also updates the surviving weights (SparseGPT),
  ``(weight, stats, sparsity, nm, **params) -> (new_weight, mask)``; its registered score is only
  the saliency used where a plain ranking is asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from sparsealloc.core.errors import SpecError
from sparsealloc.core.registry import Registry, check_call
from sparsealloc.core.types import LayerStats
from sparsealloc.pruning.sparsegpt import inverse_hessian_factor, obs_saliency, sparsegpt_prune


class Metric(Protocol):
    """A pruning metric: scores per weight from the weight and its input statistics."""

    def __call__(self, weight: Tensor, stats: LayerStats, **params: object) -> Tensor: ...


@dataclass(frozen=True)
class MetricTraits:
    """What a metric needs from ``prune_`` beyond ``(weight, stats)`` (see the module docstring)."""

    needs_name: bool = False
    gram: str | None = None  # None | "optional" | "required"
    bias: Callable[[dict, str | None], bool] | None = None
    updater: Callable[..., tuple[Tensor, Tensor]] | None = None


def _declare(**traits):
    """Decorator attaching :class:`MetricTraits` to a metric function."""

    def deco(fn):
        fn.traits = MetricTraits(**traits)
        return fn

    return deco


def metric_traits(name: str) -> MetricTraits:
    """The :class:`MetricTraits` of metric ``name`` (defaults for plain scores)."""
    return getattr(METRICS.get(name), "traits", MetricTraits())


METRICS: Registry[Metric] = Registry("pruning metric")

#: Last Linear of attention and MLP, the ones writing into the residual stream
#: (Llama/Mistral/Qwen2: o_proj, down_proj; OPT: out_proj, fc2).
OUTPUT_PROJECTIONS = ("o_proj", "down_proj", "out_proj", "fc2")


def is_output_projection(fqn: str | None) -> bool:
    """Whether module ``fqn`` is an attention or MLP output projection (:data:`OUTPUT_PROJECTIONS`)."""
    return bool(fqn) and fqn.rsplit(".", 1)[-1] in OUTPUT_PROJECTIONS


@METRICS.register("magnitude")
def magnitude(weight: Tensor, stats: LayerStats | None = None) -> Tensor:
    """|W_ij| (Han et al. 2015; the magnitude baseline of Wanda, arXiv:2306.11695)."""
    return weight.abs().float()


@METRICS.register("wanda")
def wanda(weight: Tensor, stats: LayerStats) -> Tensor:
    """Wanda score |W_ij|·‖X_j‖₂ (Sun et al. 2024, arXiv:2306.11695; locuslab/wanda)."""
    return weight.abs().float() * stats.norm.float()  # (out, in) * (in,)


@METRICS.register("stade")
@_declare(bias=lambda params, fqn: bool(params.get("bias", False)))
def stade(weight: Tensor, stats: LayerStats, bias: bool = False) -> Tensor:
    """STADE score |W_ij|·σ_j (Coello de Portugal Mecke et al. 2025, arXiv:2503.22451).

    σ_j is the standard deviation of input feature j over the calibration tokens. The method pairs
    it with mean compensation ``b_i += Σ_{j pruned} W_ij·μ_j`` (computed from the unpruned weights);
    pass ``bias=True`` to have :func:`~sparsealloc.pruning.prune_` apply it.
    """
    return weight.abs().float() * stats.std.float()


@METRICS.register("stadew")
@_declare(needs_name=True,
          bias=lambda params, fqn: bool(params.get("bias", True)) and is_output_projection(fqn))
def stadew(weight: Tensor, stats: LayerStats, fqn: str = "", bias: bool = True) -> Tensor:
    """STADEW: STADE with mean compensation on output projections, Wanda elsewhere.

    The practical hybrid of STADE (arXiv:2503.22451; Coello-dev/STADE ``lib/prune_zoo/stadew.py``,
    v1 name "stade"): ``|W|·σ`` plus ``b_i += Σ_{j pruned} W_ij·μ_j`` on ``o_proj``/``down_proj``
    (OPT ``out_proj``/``fc2``), Wanda ``|W|·‖X_j‖₂`` without compensation on the other Linears.

    Args:
        weight: Weight (out, in).
        stats: Input statistics.
        fqn: Module FQN, passed by ``prune_``; an empty name scores as Wanda.
        bias: Mean compensation on the output projections (the method's default; False ablates it).
    """
    return stade(weight, stats) if is_output_projection(fqn) else wanda(weight, stats)


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
    if name == "no_coe":
        return torch.ones((), dtype=a.dtype, device=a.device)
    table: dict[str, Callable[[Tensor], Tensor]] = {
        "row_sum": lambda t: t.sum(dim=1, keepdim=True),
        "column_sum": lambda t: t.sum(dim=0, keepdim=True),
        "relative_sum": lambda t: t.sum(dim=1, keepdim=True) + t.sum(dim=0, keepdim=True),
        "to_sum_scalar": torch.sum,
        "to_mean_scalar": torch.mean,
        "frobenius_norm": torch.norm,
    }
    if name not in table:
        raise SpecError(f"coefficient must be one of {list(COEFFICIENTS)}, but got {name!r}")
    return 1 / table[name](a).clamp_min(1e-12)


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


# ----------------------------------------------------------------------------- ACE (our formulation)
def _output_moments(w: Tensor, stats: LayerStats) -> tuple[Tensor, Tensor]:
    """``P = W·XᵀX`` (P_ij = ⟨X_j, y_i⟩) and ‖y_i‖² per row, float64; diagonal XᵀX without gram."""
    if stats.gram is not None:
        p = w @ stats.gram.double().to(w.device)
    else:
        p = w * stats.sum_sq.double().to(w.device)
    return p, (w * p).sum(dim=1, keepdim=True)


def cosine_loss(weight: Tensor, stats: LayerStats) -> Tensor:
    """``1 − cos(y_i, y_i − W_ij·X_j)``: cosine loss of output channel i when only W_ij is pruned.

    ``y_i = W_i·X`` is output channel i over the calibration tokens. From ``P = W·XᵀX``,
    ``Y_i = ‖y_i‖²`` and ``G_jj = ‖X_j‖²`` (exact with ``stats.gram``; with the diagonal of XᵀX
    otherwise), written in the cancellation-free form
    ``(‖y‖²‖ŷ‖² − ⟨y,ŷ⟩²) / (‖y‖‖ŷ‖·(‖y‖‖ŷ‖ + ⟨y,ŷ⟩))`` where ``⟨y,ŷ⟩ > 0``.
    """
    w = weight.detach().double()
    g = stats.sum_sq.double().to(w.device).reshape(1, -1)
    p, y2 = _output_moments(w, stats)
    dot = y2 - w * p  # ⟨y, ŷ⟩
    norms = (y2 * (y2 - 2 * w * p + w * w * g).clamp_min(0)).sqrt()  # ‖y‖·‖ŷ‖
    cross = (w * w * (y2 * g - p * p)).clamp_min(0)  # ‖y‖²‖ŷ‖² − ⟨y,ŷ⟩²
    tiny = torch.finfo(torch.float64).tiny
    stable = cross / (norms * (norms + dot)).clamp_min(tiny)
    direct = torch.where(norms > 0, 1 - dot / norms.clamp_min(tiny), torch.ones_like(norms))
    return torch.where(dot > 0, stable, direct).float()


def variance_share(weight: Tensor, stats: LayerStats) -> Tensor:
    """``W_ij²·σ_j² / Var_t(y_i)``: share of output channel i's token variance carried by W_ij.

    ``Var_t(y_i) = W_i Σ W_iᵀ`` with the unbiased input covariance Σ from ``stats.gram`` and the
    mean, or ``Σ_k W_ik²·σ_k²`` (diagonal Σ) without gram.
    """
    w = weight.detach().double()
    var = stats.var.double().to(w.device).reshape(1, -1)
    if stats.gram is not None and stats.count > 1:
        mu = stats.mean.double().to(w.device)
        cov = (stats.gram.double().to(w.device) - stats.count * torch.outer(mu, mu)) / (stats.count - 1)
        total = ((w @ cov) * w).sum(dim=1, keepdim=True)
    else:
        total = (w * w * var).sum(dim=1, keepdim=True)
    tiny = torch.finfo(torch.float64).tiny
    return (w * w * var / total.clamp_min(tiny)).float()


_ACE_DOC = """

    ACE (Mi, Kong, Yuan, Huang 2025, arXiv:2505.21987) proposes a cosine-similarity-loss-guided
    metric (CosP), an input-variance-guided metric (VarP) and their combination S_(cos+var); the
    exact formulas are not public (seeds.md §4). A third-party review (themoonlight.io) shows only
    that CosP looks at the per-token output ``a = Wx``, the change ``Δa_i = −W_ij·x_j``, a first-order
    expansion ``1 − cos ≈ −a_i·Δa_i/‖a‖²`` and a score ``|W_ij|·‖X_j‖₂·(…)``, the rest cut off.
    **This formulation is ours** and differs from that: the cosine is taken per output channel
    over the calibration tokens, so that it is exact from XᵀX (per-token output norms are not in
    :class:`LayerStats`), and it is not truncated at first order (the first-order term of
    ``1 − cos`` vanishes at ``ŷ = y``; the expansion above keeps only the change of ``⟨a, â⟩``).

    * ``ace_cos`` = :func:`cosine_loss`, the exact cosine loss of output channel i over the
      calibration tokens when W_ij alone is pruned. For small removals it is
      ``≈ W_ij²‖X_j‖²·(1 − ρ_ij²) / (2‖y_i‖²)``, i.e. Wanda's score squared times ``sin²`` of the
      angle between input channel j and output channel i over the tokens
      (``ρ_ij = ⟨X_j, y_i⟩ / (‖X_j‖‖y_i‖)``): a weight whose input is aligned with
      its output mostly rescales it and costs little angle. It needs ``stats.gram`` for ρ; without
      it (diagonal XᵀX, ρ_ij² = the weight's share of ‖y_i‖²) it ranks like Wanda within a row.
    * ``ace_var`` = :func:`variance_share`, the share of output channel i's across-token variance
      (what distinguishes tokens) that W_ij carries; within a row it ranks like STADE ``|W|·σ``
      without compensation.
    * ``ace`` = ``ace_cos + lam·ace_var``: both terms are dimensionless fractions of channel i, so
      ``lam`` (default 1) is a scale-free mixing weight.
    """


@METRICS.register("ace_cos")
@_declare(gram="optional")
def ace_cos(weight: Tensor, stats: LayerStats) -> Tensor:
    """ACE cosine-similarity-guided score (our formulation; see below)."""
    return cosine_loss(weight, stats)


@METRICS.register("ace_var")
@_declare(gram="optional")
def ace_var(weight: Tensor, stats: LayerStats) -> Tensor:
    """ACE variance-guided score (our formulation; see below)."""
    return variance_share(weight, stats)


@METRICS.register("ace")
@_declare(gram="optional")
def ace(weight: Tensor, stats: LayerStats, lam: float = 1.0) -> Tensor:
    """ACE combined score ``ace_cos + lam·ace_var`` (our formulation; see below)."""
    return cosine_loss(weight, stats) + lam * variance_share(weight, stats)


for _fn in (ace_cos, ace_var, ace):
    if _fn.__doc__:  # None under python -OO
        _fn.__doc__ += _ACE_DOC


# ----------------------------------------------------------------------------- SparseGPT
@METRICS.register("sparsegpt")
@_declare(gram="required", updater=sparsegpt_prune)
def sparsegpt(weight: Tensor, stats: LayerStats, blocksize: int = 128, percdamp: float = 0.01,
              per_row: bool = True) -> Tensor:
    """SparseGPT (Frantar & Alistarh 2023, arXiv:2301.00774): OBS pruning with weight update.

    ``prune_`` runs :func:`~sparsealloc.pruning.sparsegpt.sparsegpt_prune` (adaptive masks per
    block of ``blocksize`` columns, weight update, dampening ``percdamp``). As a plain score this
    is the initial OBS saliency ``W_ij² / U_jj²`` (no update), for callers that only rank weights.
    """
    if stats is None or stats.gram is None:
        raise SpecError("metric 'sparsegpt' needs the Gram matrix XᵀX; collect_stats(..., gram=True)")
    return obs_saliency(weight, inverse_hessian_factor(stats.gram.to(weight.device), percdamp))


def metric_uses_bias(name: str, params: dict, fqn: str | None = None) -> bool:
    """Whether metric ``name`` asks for mean compensation into the bias of module ``fqn``."""
    rule = metric_traits(name).bias
    return bool(rule(dict(params), fqn)) if rule is not None else False


def check_params(name: str, params: dict | None = None) -> None:
    """Raise before any work if metric ``name`` is unknown or does not take ``params``."""
    fn = METRICS.get(name)
    params = dict(params or {})
    if metric_traits(name).needs_name and "fqn" in params:
        raise SpecError(f"parameter 'fqn' of pruning metric {name!r} is set by prune_, not by the plan")
    check_call(fn, params, f"pruning metric {name!r}", None, None)


def score(name: str, weight: Tensor, stats: LayerStats, params: dict | None = None,
          fqn: str | None = None) -> Tensor:
    """Look up metric ``name`` and score ``weight``; unknown parameters give a SpecError.

    ``fqn`` (the module's name) is passed on to metrics that declare ``needs_name``.
    """
    fn = METRICS.get(name)
    params = dict(params or {})
    check_params(name, params)
    if metric_traits(name).needs_name:
        params["fqn"] = fqn or ""
    return fn(weight, stats, **params)
