"""Sequential compression: each block's Linears compressed from the inputs the already-compressed
earlier blocks produce.

SparseGPT (Frantar & Alistarh 2023, arXiv:2301.00774) and Wanda's reference code prune a model
block by block: block ``i`` is calibrated on the outputs of blocks ``0..i−1`` as they are *after*
pruning, so each layer's weight update also absorbs the error that arrives from below. A level
database (:mod:`sparsealloc.pruning.level_db`) cannot do that: its entries are compressed from the
*dense* model's inputs, each Linear independently, which is what makes any stitching of levels
consistent (EvoPress, Sieberling et al. 2025). ``prune_sequential_`` re-runs a plan's method in the
sequential order at the plan's ratios: a different model from the one a study scored, usually a
better one for weight-updating methods; ``benchmarks/sequential_sparsegpt.md`` measures by how much.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import nn

from sparsealloc.core.errors import SpecError
from sparsealloc.core.plan import AllocationPlan
from sparsealloc.core.progress import track
from sparsealloc.pruning.apply import PruneReport, prune_, resolve_plan
from sparsealloc.pruning.calibration.stats import collect_stats
from sparsealloc.pruning.metrics import metric_traits
from sparsealloc.pruning.model.structure import ModelLayout, model_layout


def block_plans(plan: AllocationPlan, layout: ModelLayout) -> list[tuple[str, AllocationPlan]]:
    """``plan`` cut into one plan per decoder block (its Linears' ratios only), in block order;
    blocks with nothing to prune are left out."""
    ratios = resolve_plan(plan, layout)
    out = []
    for block in layout.blocks:
        mine = {name: ratios[name] for name in layout.linears if layout.block_of[name] == block and ratios[name] > 0}
        if mine:
            out.append((block, plan.replace(sparsity=mine)))
    return out


@torch.no_grad()
def prune_sequential_(model: nn.Module, plan: AllocationPlan, windows: torch.Tensor, batch_size: int = 4,
                      layout: ModelLayout | None = None) -> PruneReport:
    """Prune ``model`` in place as ``plan`` says, block by block on the compressed model's inputs.

    For each block in order: one calibration pass through the model as compressed so far collects
    the statistics of that block's Linears only (the Gram matrix where the metric needs it), then
    :func:`~sparsealloc.pruning.apply.prune_` compresses them. Costs one calibration pass per block.

    Args:
        model: The dense model (mutated).
        plan: The allocation plan (no dropped blocks).
        windows: Calibration token ids, shape (n, seq_len).
        batch_size: Windows per forward call.
        layout: Precomputed layout of ``model``.

    Raises:
        SpecError: the plan drops blocks (Prune&Comp's scales are fitted on the dense model).

    Returns:
        The :class:`~sparsealloc.pruning.apply.PruneReport` over all Linears.
    """
    if plan.dropped_layers:
        raise SpecError("expected a plan without dropped blocks for sequential compression, but it drops "
                        f"{len(plan.dropped_layers)}")
    layout = layout or model_layout(model)
    gram = metric_traits(plan.metric.name).gram is not None
    report = PruneReport(numels=dict(layout.numels))
    report.requested.update(resolve_plan(plan, layout))
    report.achieved.update(dict.fromkeys(layout.linears, 0.0))
    for block, block_plan in track(block_plans(plan, layout), desc="sequential", unit="block"):
        names = tuple(block_plan.sparsity)
        sub = replace(layout, linears=names)  # collect_stats hooks only the layout's Linears
        stats: Mapping = collect_stats(model, windows, batch_size=batch_size, gram=gram, layout=sub)
        part = prune_(model, block_plan, stats, layout=layout)
        report.biased.extend(part.biased)
        report.achieved.update({name: part.achieved[name] for name in names})
    return report
