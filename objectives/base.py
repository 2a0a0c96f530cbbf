"""Objectives: what a trial measures. Registry ``OBJECTIVES``; all are minimized.

An objective is a callable ``(ctx, trial) -> float`` where ``trial`` is the
:class:`~sparsealloc.objectives.trial.TrialState` of the current candidate (the pruned model sits in
``trial.model``: ``ctx.model`` or its :meth:`~sparsealloc.objectives.context.EvalContext.compute_model`).
Objectives that need no forward pass (``kv_bytes``, ``remaining_weights``) are
analytic; ``layer_local`` needs none either (per-layer Gram matrices).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from sparsealloc.core.registry import Registry
from sparsealloc.objectives.kv_memory import kv_bytes_per_token, kv_geometry
from sparsealloc.objectives.reconstruction import reconstruction_error

if TYPE_CHECKING:
    from sparsealloc.objectives.context import EvalContext
    from sparsealloc.objectives.trial import TrialState

Objective = Callable[["EvalContext", "TrialState"], float]
OBJECTIVES: Registry[Objective] = Registry("objective")


@OBJECTIVES.register("reconstruction")
def reconstruction(ctx: EvalContext, trial: TrialState) -> float:
    """Relative Frobenius error of the logits on the calibration windows (OptiShear)."""
    return reconstruction_error(ctx, "logits", trial.report, trial.windows, trial.model, trial.blocks)


@OBJECTIVES.register("kl")
def kl(ctx: EvalContext, trial: TrialState) -> float:
    """Mean per-token KL divergence of next-token distributions, dense ‖ pruned."""
    return reconstruction_error(ctx, "kl", trial.report, trial.windows, trial.model, trial.blocks)


@OBJECTIVES.register("hidden")
def hidden(ctx: EvalContext, trial: TrialState) -> float:
    """Relative squared error of the final hidden states, ‖h − h_dense‖² / ‖h_dense‖²."""
    return reconstruction_error(ctx, "hidden", trial.report, trial.windows, trial.model, trial.blocks)


@OBJECTIVES.register("layer_local")
def layer_local(ctx: EvalContext, trial: TrialState) -> float:
    """Summed layer-local output error Σ tr(ΔW·(H/N)·ΔWᵀ) from per-layer Gram matrices (no forward)."""
    report = trial.prune_report
    return ctx.layer_error(None if report.in_place else report.requested)


@OBJECTIVES.register("remaining_weights")
def remaining_weights(ctx: EvalContext, trial: TrialState) -> float:
    """Fraction of prunable weights left (1 − achieved parameter-weighted sparsity)."""
    return 1.0 - trial.prune_report.achieved_mean


@OBJECTIVES.register("kv_bytes")
def kv_bytes(ctx: EvalContext, trial: TrialState) -> float:
    """KV-cache bytes per token (analytic, fp16 scales and zeros included); dropped blocks hold none."""
    heads, head_dim = kv_geometry(ctx.model.config)
    dropped = tuple(f"{block}." for block in trial.plan.dropped_layers)
    attention = [a for a in ctx.layout.attention if not a.startswith(dropped)] if dropped else ctx.layout.attention
    return kv_bytes_per_token(attention, trial.plan.kv_bits, heads, head_dim, trial.group_size)
