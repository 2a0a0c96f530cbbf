"""``prune_``: apply an AllocationPlan to a model in place, and save the result.

This module composes the pure pieces (metrics, masks) with the model; it holds no scoring formula.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from sparsealloc.core.errors import IncompatiblePlanError, SpecError
from sparsealloc.core.plan import AllocationPlan, MetricChoice, parse_pattern, weighted_mean_sparsity
from sparsealloc.core.progress import track
from sparsealloc.core.types import LayerStats
from sparsealloc.pruning.layer_drop import drop_blocks_
from sparsealloc.pruning.masks import masked_copy_, select_mask
from sparsealloc.pruning.metrics import check_params, metric_traits, metric_uses_bias, score
from sparsealloc.pruning.model.structure import ModelLayout, model_layout


class LevelDatabaseLike(Protocol):
    def entry(self, name: str, ratio: float) -> tuple[torch.Tensor, torch.Tensor | None]: ...


@dataclass
class PruneReport:
    """What :func:`prune_` did: requested and achieved sparsity per module FQN."""

    requested: dict[str, float] = field(default_factory=dict)
    achieved: dict[str, float] = field(default_factory=dict)
    numels: dict[str, int] = field(default_factory=dict)
    dropped_blocks: list[int] = field(default_factory=list)
    biased: list[str] = field(default_factory=list)
    in_place: bool = True  # False: masks applied on the fly (pruning.masked), weights untouched

    @property
    def requested_mean(self) -> float:
        return weighted_mean_sparsity(self.requested, self.numels)

    @property
    def achieved_mean(self) -> float:
        return weighted_mean_sparsity(self.achieved, self.numels)


def resolve_plan(plan: AllocationPlan, layout: ModelLayout) -> dict[str, float]:
    """Check ``plan`` against ``layout`` and return one ratio per prunable Linear FQN."""
    check_params(plan.metric.name, dict(plan.metric.params))  # unknown name → UnknownNameError
    plan.check_dropped(layout.blocks)
    plan.check_kv_layers(layout.attention)
    n_layers = plan.model.get("n_layers")
    if n_layers is not None and n_layers != len(layout.blocks):
        raise IncompatiblePlanError(
            f"plan was made for a model with {n_layers} layers, but this model has {len(layout.blocks)}"
        )
    return plan.expand(layout.linears)


def rank_maskable(plan: AllocationPlan, name: str) -> bool:
    """Whether ``plan``'s mask of Linear ``name`` is a plain per-row cut of the metric's score order
    (unstructured, no weight update, no bias compensation, no per-module rule), so that cached row
    orders or ranks give it without scoring again."""
    traits = metric_traits(plan.metric.name)
    return (parse_pattern(plan.pattern) is None and traits.updater is None and not traits.needs_name
            and not metric_uses_bias(plan.metric.name, dict(plan.metric.params), name))


def _check_stats(metric: str, need_gram: bool, stats: Mapping[str, LayerStats] | None,
                 names: list[str]) -> None:
    """Fail before any weight changes when ``stats`` lack what metric ``metric`` needs."""
    for name in names:
        layer_stats = stats.get(name) if stats is not None else None
        if layer_stats is None and metric != "magnitude":
            raise SpecError(f"metric {metric!r} needs calibration statistics for {name!r}")
        if need_gram and layer_stats.gram is None:
            raise SpecError(
                f"metric {metric!r} needs the Gram matrix XᵀX of every pruned layer's input, but the "
                f"statistics of {name!r} have none; collect them with collect_stats(..., gram=True)"
            )


def _mean_compensation(weight: torch.Tensor, mask: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    """Σ_{j pruned} W_ij·μ_j per output row, from the *unpruned* weights (STADE)."""
    return (weight.float() * mask) @ stats.mean.float().to(weight.device)


def _add_bias_(module: nn.Linear, delta: torch.Tensor) -> None:
    if module.bias is None:
        module.bias = nn.Parameter(torch.zeros(module.out_features, dtype=module.weight.dtype,
                                               device=module.weight.device))
    module.bias.data += delta.to(module.bias.dtype)


@torch.no_grad()
def compress_linear(weight: torch.Tensor, stats: LayerStats | None, ratio: float, metric: MetricChoice,
                    fqn: str, nm: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One Linear pruned by ``metric`` at ``ratio``, the dense input left untouched.

    Scores and masks the weights (per output row, or N:M); a metric with an ``updater``
    (SparseGPT) selects the mask and updates the surviving weights itself; a metric that asks for
    mean compensation for module ``fqn`` (STADE, STADEW) returns the bias change, computed from the
    unpruned weights. Pure: :func:`prune_` and the level database
    (:mod:`sparsealloc.pruning.level_db`) both build on it, so their layers are identical.

    Returns:
        (pruned weight in ``weight``'s dtype, bias delta per output row or None).
    """
    traits = metric_traits(metric.name)
    params = dict(metric.params)
    if stats is not None:
        stats = stats.to(weight.device)
    if traits.updater is not None:
        new_weight, mask = traits.updater(weight, stats, ratio, nm, **params)
        return new_weight.to(weight.dtype).masked_fill_(mask, 0), None
    mask = select_mask(score(metric.name, weight, stats, params, fqn=fqn), ratio, nm)
    delta = _mean_compensation(weight, mask, stats) if metric_uses_bias(metric.name, params, fqn) else None
    return weight.masked_fill(mask, 0), delta


@torch.no_grad()
def prune_(
    model: nn.Module,
    plan: AllocationPlan,
    stats: Mapping[str, LayerStats] | None,
    layout: ModelLayout | None = None,
    ranks: Mapping[str, torch.Tensor] | None = None,
    pristine: Mapping[str, torch.Tensor] | None = None,
    database: LevelDatabaseLike | None = None,
    remove_dropped: bool = True,
) -> PruneReport:
    """Prune ``model`` in place as ``plan`` says.

    For every Linear with a ratio > 0: score its weights with the plan's metric (metrics that
    declare ``needs_name`` get the module FQN), select the mask (per output row, or N:M), fold the
    pruned weights' mean contribution into the bias when the metric asks for it for this module
    (STADE, STADEW; from the unpruned weights), and zero the pruned weights. A metric with an
    ``updater`` (SparseGPT) instead selects the mask and updates the surviving weights itself.
    Then drop the plan's blocks. KV-cache bits are not weights and are applied at inference time.

    Args:
        model: The dense model (mutated).
        plan: The allocation plan.
        stats: Calibration statistics per Linear FQN (None only for data-free metrics).
        layout: Precomputed layout of ``model``.
        ranks: Cached :func:`~sparsealloc.pruning.masks.row_rank` of the plan's metric per FQN
            (studies with a fixed metric); used for unstructured masks without bias compensation,
            never for metrics that need the module name or update weights (without ``pristine``,
            the mask is applied to the current weights in place).
        pristine: Dense weights per FQN. When given, every Linear starts from them (the caller
            need not restore weights first): with ``ranks`` a layer is restored and pruned in one
            fused pass (:func:`~sparsealloc.pruning.masks.masked_copy_`), otherwise it is copied
            back and then pruned as usual.
        database: A :class:`~sparsealloc.pruning.level_db.LevelDatabase` of the plan's metric and
            calibration: layers that are not plain cuts of cached ranks come from it (built there on
            first use) instead of being compressed again; identical weights either way.
        remove_dropped: False leaves the plan's dropped blocks in the model (still reported fully
            sparse; :func:`~sparsealloc.pruning.layer_drop.blocks_removed` takes them out for a while).

    Raises:
        SpecError: statistics are missing, or lack the Gram matrix a metric requires (SparseGPT:
            ``collect_stats(..., gram=True)``); raised before any weight changes.

    Returns:
        A :class:`PruneReport` with requested and achieved sparsity.
    """
    layout = layout or model_layout(model)
    ratios = resolve_plan(plan, layout)
    nm = parse_pattern(plan.pattern)
    traits = metric_traits(plan.metric.name)
    modules = dict(model.named_modules())
    report = PruneReport(numels=dict(layout.numels))
    work = [name for name in layout.linears if ratios[name] > 0]
    _check_stats(plan.metric.name, traits.gram == "required", stats, work)
    fused = {name for name in work if ranks is not None and name in ranks and rank_maskable(plan, name)}
    if pristine is not None:
        for name in layout.linears:
            if name not in fused:
                modules[name].weight.data.copy_(pristine[name])
    for name in track(work, desc="pruning", total=len(work), unit="layer"):
        module = modules[name]
        layer_stats = stats.get(name) if stats is not None else None
        weight = module.weight.data
        if name in fused:  # restore (when pristine is given) and prune in one pass
            masked_copy_(weight, weight if pristine is None else pristine[name], ranks[name], ratios[name])
            continue
        if database is not None:  # the same layer, computed once and kept on disk
            new_weight, delta = database.entry(name, ratios[name])
        else:
            new_weight, delta = compress_linear(weight, layer_stats, ratios[name], plan.metric, name, nm)
        weight.copy_(new_weight)
        if delta is not None:
            _add_bias_(module, delta)
            report.biased.append(name)
    dropped = set(plan.dropped_layers)
    for name in layout.linears:
        if layout.block_of[name] in dropped:  # removed outright: fully sparse
            report.requested[name] = report.achieved[name] = 1.0
            continue
        weight = modules[name].weight.data
        report.requested[name] = ratios[name]
        report.achieved[name] = float((weight == 0).sum().item()) / weight.numel()
    if remove_dropped:
        report.dropped_blocks = drop_blocks_(model, list(plan.dropped_layers))
    return report


def _reloaded_biases(model: nn.Module) -> set[str]:
    """FQNs of the Linear layers that have a bias when ``model.config`` is instantiated again."""
    with torch.device("meta"):
        fresh = type(model)(copy.deepcopy(model.config))
    return {n for n, m in fresh.named_modules() if isinstance(m, nn.Linear) and m.bias is not None}


def _make_biases_representable(model: nn.Module) -> None:
    """Biases added by mean compensation must survive save → plain transformers reload.

    Llama-style configs have ``attention_bias`` / ``mlp_bias`` switches that give every projection a
    bias; turn the needed one on and give the other projections zero biases. A bias the config
    cannot express (no such switch) is an error rather than a silent loss on reload.
    """
    config = model.config
    groups = {"attention_bias": ("self_attn",), "mlp_bias": ("mlp",)}
    layout = model_layout(model)
    modules = dict(model.named_modules())
    for flag, parts in groups.items():
        names = [n for n in layout.linears if any(f".{p}." in n for p in parts)]
        reloaded = _reloaded_biases(model)
        if not hasattr(config, flag) or all(modules[n].bias is None or n in reloaded for n in names):
            continue
        setattr(config, flag, True)
        reloaded = _reloaded_biases(model)
        for n in names:
            if modules[n].bias is None and n in reloaded:
                _add_bias_(modules[n], torch.zeros(modules[n].out_features))
    reloaded = _reloaded_biases(model)
    lost = [n for n in layout.linears if modules[n].bias is not None and n not in reloaded]
    if lost:
        raise SpecError(
            f"{type(model).__name__} cannot store the bias that mean compensation added to "
            f"{lost[0]!r}; prune without bias compensation to save this model"
        )


def save_pruned(model: nn.Module, tokenizer, directory: str | Path, plan: AllocationPlan | None = None) -> Path:
    """Save a pruned model as a plain Hugging Face checkpoint (safetensors), plus ``plan.json``.

    The weight files get ordinary permissions (0644 under umask 022). Other formats and dtypes:
    :func:`sparsealloc.pruning.model.checkpoint_formats.save_checkpoint`.
    """
    from sparsealloc.pruning.model.checkpoint_formats import fix_permissions
    from sparsealloc.pruning.model.models import forget_gguf_quantization_, library_bars_follow_progress_mode

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    forget_gguf_quantization_(model)  # a model loaded from GGUF holds de-quantized float weights
    _make_biases_representable(model)
    with library_bars_follow_progress_mode():  # "Writing model shards"
        model.save_pretrained(directory)
    fix_permissions(directory)  # transformers leaves model.safetensors at 0600
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if plan is not None:
        plan.save(directory / "plan.json")
    return directory
