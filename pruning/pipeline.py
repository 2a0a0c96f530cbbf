"""The one-shot pipeline, written once: calibrate, (allocate), choose blocks to drop, then
:func:`prune_with_plan_`: fuse their Prune&Comp scales, prune, drop them. The ``prune``, ``apply``
and ``generate`` commands run :func:`calibrate_and_prune_`; the trial evaluator's in-place path
runs :func:`prune_with_plan_`."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from sparsealloc.core.plan import AllocationPlan
from sparsealloc.core.types import LayerStats
from sparsealloc.pruning.apply import LevelDatabaseLike, PruneReport, prune_
from sparsealloc.pruning.calibration.stats import collect_stats
from sparsealloc.pruning.layer_prune import compensate_, with_dropped_blocks
from sparsealloc.pruning.level_db import LevelDatabase, needs_database
from sparsealloc.pruning.metrics import metric_traits
from sparsealloc.pruning.model.structure import ModelLayout, model_layout
from sparsealloc.pruning.sequential import prune_sequential_


def prune_with_plan_(model: nn.Module, plan: AllocationPlan, stats: Mapping[str, LayerStats] | None, *,
                     layout: ModelLayout | None = None, windows: torch.Tensor | None = None, batch_size: int = 4,
                     sequential: bool = False, database: LevelDatabaseLike | None = None,
                     ranks: Mapping[str, torch.Tensor] | None = None,
                     pristine: Mapping[str, torch.Tensor] | None = None, remove_dropped: bool = True) -> PruneReport:
    """Compress ``model`` in place as ``plan`` says: compensate, prune, drop blocks.

    The Prune&Comp scales of a plan that drops blocks (``provenance.layer_prune.compensation``)
    are fused first. ``stats``, ``layout``, ``database``, ``ranks``, ``pristine`` (the dense
    weights every Linear starts from; copied back before the scales are fused) and
    ``remove_dropped`` (False: the blocks stay, for
    :func:`~sparsealloc.pruning.layer_drop.blocks_removed`) are those of
    :func:`~sparsealloc.pruning.apply.prune_`; ``sequential`` prunes block by block on the
    compressed model's ``windows`` instead
    (:func:`~sparsealloc.pruning.sequential.prune_sequential_`; no dropped blocks).

    Raises:
        SpecError: ``sequential`` with dropped blocks, or statistics that lack what the metric needs.

    Returns:
        The :class:`~sparsealloc.pruning.apply.PruneReport`.
    """
    if sequential:
        return prune_sequential_(model, plan, windows, batch_size=batch_size, layout=layout)
    scales = plan.provenance.get("layer_prune", {}).get("compensation") if plan.dropped_layers else None
    if scales:  # masks go onto the compensated weights
        if pristine is not None:
            modules = dict(model.named_modules())
            for name, weight in pristine.items():
                modules[name].weight.data.copy_(weight)
            pristine = None
        compensate_(model, scales)
    return prune_(model, plan, stats, layout=layout, ranks=ranks, pristine=pristine, database=database,
                  remove_dropped=remove_dropped)


def calibrate_and_prune_(model: nn.Module, plan: AllocationPlan, windows: torch.Tensor, *,
                         layout: ModelLayout | None = None, batch_size: int = 4,
                         adjust: Callable[[AllocationPlan, Mapping[str, LayerStats]], AllocationPlan] | None = None,
                         drop_blocks: int = 0, compensate: bool = True, sequential: bool = False
                         ) -> tuple[AllocationPlan, PruneReport, dict[str, float]]:
    """One-shot compression of a dense ``model`` on calibration ``windows``, in place.

    Collects the statistics (with the Gram matrix XᵀX where the plan's metric needs it: SparseGPT,
    ACE), lets ``adjust(plan, stats) -> plan`` change the plan (an allocator), adds the
    ``drop_blocks`` lowest Block-Influence blocks at the same overall sparsity
    (:func:`~sparsealloc.pruning.layer_prune.with_dropped_blocks`, Prune&Comp scales when
    ``compensate``), then :func:`prune_with_plan_`. A plan from a study's level database
    (``provenance.level_db``) reads its layers back from there (the same weights); ``sequential``
    records itself in the plan in place of the database.

    Returns:
        (plan as applied, PruneReport, {"calibration_s": ..., "prune_s": ...}).
    """
    layout = layout or model_layout(model)
    start = time.perf_counter()
    gram = metric_traits(plan.metric.name).gram is not None
    stats = collect_stats(model, windows, batch_size=batch_size, gram=gram, layout=layout)
    timings = {"calibration_s": time.perf_counter() - start}
    if adjust is not None:
        plan = adjust(plan, stats)
    plan = with_dropped_blocks(plan, model, windows, drop_blocks, compensate, layout, batch_size)
    start = time.perf_counter()
    if sequential:
        plan = plan.replace(provenance={**{k: v for k, v in plan.provenance.items() if k != "level_db"},
                                        "sequential": True})
    database = None if sequential else _plan_database(plan, model, layout, stats, windows)
    report = prune_with_plan_(model, plan, stats, layout=layout, windows=windows, batch_size=batch_size,
                              sequential=sequential, database=database)
    timings["prune_s"] = time.perf_counter() - start
    return plan, report, timings


def _plan_database(plan: AllocationPlan, model: nn.Module, layout: ModelLayout, stats, windows: torch.Tensor):
    """The level database a study's plan came from (``provenance.level_db``), opened on this model and
    calibration: the same layers are read back instead of compressed again (a database with another
    key, i.e. another model or calibration, is filled instead). None for other plans."""
    recorded = plan.provenance.get("level_db")
    if not recorded or plan.dropped_layers or not needs_database(plan.metric, plan.pattern, layout.linears):
        return None
    root = Path(recorded["path"]).parent if recorded.get("path") else None
    try:
        return LevelDatabase.open(model, layout.linears, stats, plan.metric, plan.pattern, windows, root=root)
    except OSError:  # an unwritable cache: compress the layers here instead (the same weights)
        return None
