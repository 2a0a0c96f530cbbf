"""The pruning engine: model loading, calibration statistics, metrics, masks, ``prune_``, evaluation.

Knows nothing of search or storage; its only instruction is an
:class:`~sparsealloc.core.plan.AllocationPlan`. Four concerns, one place each:

* weight pruning, at the top of this folder: :mod:`~sparsealloc.pruning.metrics` (scores),
  :mod:`~sparsealloc.pruning.masks`, :mod:`~sparsealloc.pruning.allocators` (per-layer sparsity),
  :mod:`~sparsealloc.pruning.apply` (``prune_``, ``save_pruned``), :mod:`~sparsealloc.pruning.masked`
  (forwards through masks without writing weights), :mod:`~sparsealloc.pruning.sparsegpt`,
  :mod:`~sparsealloc.pruning.esd`, :mod:`~sparsealloc.pruning.layer_drop`,
  :mod:`~sparsealloc.pruning.layer_prune`, :mod:`~sparsealloc.pruning.level_db`,
  :mod:`~sparsealloc.pruning.sequential` (block-by-block compression) and
  :mod:`~sparsealloc.pruning.pipeline` (the one-shot order: calibrate, compensate, prune, drop);
* :mod:`sparsealloc.pruning.model`: model loading and structure (layouts, checkpoint formats,
  perplexity, lm-evaluation-harness);
* :mod:`sparsealloc.pruning.calibration`: calibration text and windows, the statistics pass, and the
  selection of calibration sets;
* :mod:`sparsealloc.pruning.kv`: the quantized KV cache (fake quantization for studies, the packed
  cache and generation).

Dependencies run one way: ``model`` imports none of the others (except the lazy
:func:`~sparsealloc.pruning.apply.save_pruned` in ``model.checkpoint_formats.save_checkpoint``),
``calibration`` and ``kv`` import only ``model``, and weight pruning imports ``model`` and
``calibration``. The names below are the public entry points.
"""

from sparsealloc.pruning.apply import PruneReport, prune_, resolve_plan, save_pruned
from sparsealloc.pruning.calibration.stats import collect_stats
from sparsealloc.pruning.calibration.text import (
    TextSource,
    calibration_windows,
    sample_windows,
    tokenize_stream,
)
from sparsealloc.pruning.masks import nm_mask, row_mask, select_mask
from sparsealloc.pruning.metrics import METRICS, score
from sparsealloc.pruning.model.evaluation import perplexity, sparsity_report
from sparsealloc.pruning.model.models import default_device, load_model, resolve_source
from sparsealloc.pruning.model.structure import ModelLayout, model_layout
from sparsealloc.pruning.pipeline import calibrate_and_prune_, prune_with_plan_

__all__ = [
    "METRICS",
    "ModelLayout",
    "PruneReport",
    "TextSource",
    "calibrate_and_prune_",
    "calibration_windows",
    "collect_stats",
    "default_device",
    "load_model",
    "model_layout",
    "nm_mask",
    "perplexity",
    "prune_",
    "prune_with_plan_",
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
