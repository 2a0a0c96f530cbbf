"""Running a model as if pruned, without changing a weight: masks from cached row ranks, on the fly.

With a fixed metric, each Linear's per-row rank of the metric's scores is known once
(:func:`~sparsealloc.pruning.masks.row_rank`), and a trial's mask is ``rank < k`` per row. Writing
the pruned weights into the model would need a pristine copy to restore them afterwards, as much
memory as all prunable weights (430 MB for SmolLM2 in float32). :func:`masked_forward` instead
gives every pruned Linear an instance ``forward`` that builds its masked weight for the call, in one
fused pass into a temporary the size of that one layer, and multiplies with it. The model's own
weights stay dense, so nothing needs restoring. The price is one mask pass per layer and forward
call (instead of one per trial plus a restore), a few percent of the matrix products it feeds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from sparsealloc.pruning.apply import PruneReport
from sparsealloc.pruning.masks import masked_copy_, pruned_count
from sparsealloc.pruning.model.structure import ModelLayout


def _masked_linear(module: nn.Linear, rank: Tensor, sparsity: float):
    def forward(x: Tensor) -> Tensor:
        dense = module.weight.detach()
        weight = masked_copy_(torch.empty_like(dense), dense, rank, sparsity)
        return F.linear(x, weight, module.bias)

    return forward


@contextmanager
def _patched_linears(model: nn.Module, names: Iterable[str], make: Callable[[nn.Linear, str], Callable],
                     who: str) -> Iterator[None]:
    """Within the block, each Linear of ``names`` runs the instance ``forward`` ``make(module, name)``."""
    modules = dict(model.named_modules())
    patched = []
    try:
        for name in names:
            module = modules[name]
            if not isinstance(module, nn.Linear):
                raise TypeError(f"{who} needs nn.Linear modules, but {name!r} is {type(module).__name__}")
            module.forward = make(module, name)
            patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward


def masked_forward(model: nn.Module, ratios: Mapping[str, float], ranks: Mapping[str, Tensor]
                   ) -> AbstractContextManager[None]:
    """Within the block, ``model`` computes as if each Linear ``name`` were pruned to ``ratios[name]``
    by the mask ``rank < k`` of ``ranks[name]`` (exactly :func:`~sparsealloc.pruning.masks.row_mask`
    of the cached scores); its weights are never written.

    Args:
        model: The dense model.
        ratios: Ratio per Linear FQN (0 or missing: left dense).
        ranks: Cached :func:`~sparsealloc.pruning.masks.row_rank` per FQN.

    Raises:
        TypeError: a module to mask is not an ``nn.Linear``.
    """
    return _patched_linears(model, (n for n, ratio in ratios.items() if ratio > 0),
                            lambda module, name: _masked_linear(module, ranks[name], ratios[name]), "masked_forward")


def _stitched_linear(module: nn.Linear, weight: Tensor, bias_delta: Tensor | None):
    bias = module.bias
    if bias_delta is not None:
        bias = bias_delta.to(weight.dtype) if bias is None else bias + bias_delta.to(bias.dtype)

    def forward(x: Tensor) -> Tensor:
        return F.linear(x, weight, bias)

    return forward


def stitched_forward(model: nn.Module, entries: Mapping[str, tuple[Tensor, Tensor | None]]
                     ) -> AbstractContextManager[None]:
    """Within the block, each Linear ``name`` of ``entries`` computes with the given weight (and its
    bias plus the given bias change): a level database's layers stitched into the model by
    reference, no copy and no weight written (:mod:`sparsealloc.pruning.level_db`).

    Raises:
        TypeError: a module to stitch is not an ``nn.Linear``.
    """
    return _patched_linears(model, entries, lambda module, name: _stitched_linear(module, *entries[name]),
                            "stitched_forward")


def mask_report(ratios: Mapping[str, float], layout: ModelLayout) -> PruneReport:
    """The :class:`PruneReport` of :func:`masked_forward`: achieved = the masks' exact counts."""
    report = PruneReport(numels=dict(layout.numels), in_place=False)
    for name in layout.linears:
        ratio = ratios.get(name, 0.0)
        report.requested[name] = ratio
        report.achieved[name] = pruned_count(layout.numels[name], ratio) / layout.numels[name]
    return report
