"""The pruning engine: model loading, calibration statistics, metrics, masks, ``prune_``, evaluation.

Knows nothing of search or storage; its only instruction is an
:class:`~sparsealloc.core.plan.AllocationPlan`.
"""

from sparsealloc.pruning.apply import PruneReport, prune_, resolve_plan, save_pruned
from sparsealloc.pruning.calibration import (
    TextSource,
    calibration_windows,
    collect_stats,
    sample_windows,
    tokenize_stream,
)
from sparsealloc.pruning.evaluation import perplexity, sparsity_report
from sparsealloc.pruning.masks import nm_mask, row_mask, select_mask
from sparsealloc.pruning.metrics import METRICS, score
from sparsealloc.pruning.models import default_device, load_model, resolve_source
from sparsealloc.pruning.structure import ModelLayout, model_layout

__all__ = [
    "METRICS",
    "ModelLayout",
    "PruneReport",
    "TextSource",
    "calibration_windows",
    "collect_stats",
    "default_device",
    "load_model",
    "model_layout",
    "nm_mask",
    "perplexity",
    "prune_",
    "resolve_plan",
    "resolve_source",
    "row_mask",
    "sample_windows",
    "save_pruned",
    "score",
    "select_mask",
    "sparsity_report",
    "tokenize_stream",
]
