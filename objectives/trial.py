"""TrialEvaluator: built once per worker, called once per trial with the sampler's values.

Lifecycle per call: decode values → (allocator) → AllocationPlan → restore dense weights in place →
``prune_`` → objectives (with the plan's KV bits fake-quantized in attention) →
:class:`~sparsealloc.core.types.Outcome`. Faults inside a trial (NaN,
out-of-memory, an exception) become a failed Outcome with a reason; the study goes on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from sparsealloc.core.errors import TrialFailed
from sparsealloc.core.plan import AllocationPlan, MetricChoice
from sparsealloc.core.types import Outcome
from sparsealloc.objectives.base import OBJECTIVES
from sparsealloc.objectives.context import EvalContext
from sparsealloc.pruning.allocators import AllocationInputs, allocate
from sparsealloc.pruning.apply import PruneReport, prune_
from sparsealloc.pruning.kv_quant import kv_fake_quant
from sparsealloc.pruning.layer_drop import blocks_removed
from sparsealloc.pruning.layer_prune import compensate_, first_dropped
from sparsealloc.spaces.budget import budget_with_removed
from sparsealloc.spaces.space import SearchSpace
from sparsealloc.spaces.spec import StudySpec


@dataclass
class TrialState:
    """The candidate being scored, handed to objectives."""

    plan: AllocationPlan
    prune_report: PruneReport
    group_size: int = 32
    report: Callable[[int, float], None] | None = None
    intermediate: list[tuple[int, float]] = field(default_factory=list)


class TrialEvaluator:
    """Scores candidates of one study on one worker (see module docstring).

    Args:
        ctx: The worker's :class:`EvalContext`.
        spec: The study spec.
        space: The study's search space (built from ``ctx.layout``).
    """

    def __init__(self, ctx: EvalContext, spec: StudySpec, space: SearchSpace | None = None) -> None:
        self.ctx = ctx
        self.spec = spec
        self.space = space or SearchSpace(spec, ctx.layout)
        self.objectives = [OBJECTIVES.get(name) for name in spec.objectives]
        if "metric" not in spec.space and spec.pattern == "unstructured":
            ctx.cache_orders(MetricChoice(spec.metric.name, dict(spec.metric.params)))
        if "kl" in spec.objectives:
            ctx.cache_dense_logprobs()
        if "layer_drop" in spec.space:
            ctx.cache_drop_schedule(min(spec.layer_drop.max_blocks, len(ctx.layout.blocks) - 1),
                                    spec.layer_drop.compensate)

    def plan_for(self, values: Mapping[str, Any]) -> AllocationPlan:
        """The AllocationPlan a candidate decodes to (allocator spaces run their allocator).

        With ``layer_drop`` in the space, the first ``k`` blocks of the Block-Influence schedule are
        dropped (their Prune&Comp scales go into the plan's provenance) and the other blocks'
        ratios are re-budgeted so that dropped weights count toward the target.
        """
        decoded = self.space.decode(values)
        budget = self.spec.target_sparsity if decoded.budget is None else decoded.budget
        sparsity = None
        if decoded.allocator is not None:
            name, params = decoded.allocator
            inputs = AllocationInputs(self.ctx.layout, self.ctx.weights(), self.ctx.stats)
            sparsity = allocate(name, inputs, budget, **params)
        provenance: dict[str, Any] = {}
        if decoded.kv_bits:  # how the bits are meant travels with the plan (sparsealloc generate)
            provenance["kv"] = {"group_size": self.spec.kv.group_size, "residual": self.spec.kv.residual}
        dropped: list[str] = []
        if decoded.dropped_blocks:
            steps = first_dropped(self.ctx.drop_schedule, decoded.dropped_blocks)
            dropped = list(steps.dropped)
            provenance.update(steps.provenance())
            layout = self.ctx.layout
            ratios = dict(sparsity if sparsity is not None else decoded.sparsity)
            removed = {n for n in layout.linears if layout.block_of[n] in set(dropped)}
            sparsity = budget_with_removed(ratios, layout.numels, removed, budget, 0.0,
                                           self.spec.layerwise.max_sparsity)
        plan = decoded.to_plan(self.spec.pattern, self.ctx.model_info, sparsity=sparsity, provenance=provenance or None)
        return plan.replace(dropped_layers=tuple(dropped)) if dropped else plan

    @contextmanager
    def applied(self, plan: AllocationPlan) -> Iterator[PruneReport]:
        """The worker's model compressed as ``plan`` says, for as long as the block runs.

        Restores the dense weights, fuses the Prune&Comp scales of dropped blocks, prunes (slicing
        cached row orders when the metric is the cached one), takes the dropped blocks out and
        fake-quantizes the KV bits; on exit everything is put back. The report counts the dropped
        blocks' Linears as fully sparse.
        """
        ctx = self.ctx
        ctx.restore_()
        try:
            scales = plan.provenance.get("layer_prune", {}).get("compensation", {}) if plan.dropped_layers else {}
            if scales:
                compensate_(ctx.model, scales)
            orders = ctx.orders if plan.metric == ctx.orders_metric else None
            report = prune_(ctx.model, plan.replace(dropped_layers=()), ctx.stats, layout=ctx.layout, orders=orders)
            dropped = set(plan.dropped_layers)
            for name in ctx.layout.linears:
                if ctx.layout.block_of[name] in dropped:
                    report.requested[name] = report.achieved[name] = 1.0
            with kv_fake_quant(ctx.model, plan.kv_bits, self.spec.kv.group_size, self.spec.kv.residual), \
                    blocks_removed(ctx.model, list(plan.dropped_layers)):
                yield report
        finally:
            ctx.restore_()

    def __call__(self, values: Mapping[str, Any], report: Callable[[int, float], None] | None = None) -> Outcome:
        start = time.perf_counter()
        try:
            plan = self.plan_for(values)
            with self.applied(plan) as prune_report:
                state = TrialState(plan, prune_report, self.spec.kv.group_size)

                def record(step: int, value: float) -> None:
                    state.intermediate.append((step, value))
                    if report is not None:
                        report(step, value)

                state.report = record
                values_out = tuple(float(fn(self.ctx, state)) for fn in self.objectives)
        except TrialFailed as exc:
            return Outcome("failed", reason=exc.reason)
        except (torch.OutOfMemoryError, MemoryError) as exc:
            return Outcome("failed", reason=f"out of memory: {str(exc)[:200]}")
        finally:
            self.ctx.restore_()
        bad = [name for name, v in zip(self.spec.objectives, values_out) if not math.isfinite(v)]
        if bad:
            return Outcome("failed", reason=f"objective {bad[0]} is not finite", intermediate=tuple(state.intermediate))
        attrs = {
            "plan": plan.to_dict(),
            "achieved_sparsity": prune_report.achieved_mean,
            "trial_seconds": time.perf_counter() - start,
        }
        return Outcome("complete", values_out, attrs=attrs, intermediate=tuple(state.intermediate))
