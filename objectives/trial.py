"""TrialEvaluator: built once per worker, called once per trial with the sampler's values.

Lifecycle per call: decode values → (allocator) → AllocationPlan → [zero-forward rung] → the model
as pruned (masks from the cached row ranks applied on the fly when the metric is fixed, else pruned
in place and restored after) → objectives (with the plan's KV bits fake-quantized in attention) →
:class:`~sparsealloc.core.types.Outcome`. Faults inside a trial (NaN,
out-of-memory, an exception) become a failed Outcome with a reason; the study goes on.

Multi-fidelity (the fidelity ladder). With a ``report`` callback, the first objective's running
value is reported after every calibration batch, and a True answer stops the trial (Outcome
"pruned", with its intermediate values). Steps are 1-based: step ``b`` holds the value after ``b``
batches; with the zero-forward rung (``early_stopping.gram_rung``) step 1 holds the summed
layer-local error Σ tr(ΔW·H·ΔWᵀ) — computed from the cached ranks before the model is touched,
on its own scale — and step ``1 + b`` the value after ``b`` batches. The last step is never stopped
(its work is done).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sparsealloc.core.errors import TrialFailed
from sparsealloc.core.keys import (ACHIEVED_SPARSITY, CALIBRATION_TOKENS, DATABASE_BUILD_SECONDS, KV_BYTES, PLAN,
                                   PRUNED_AT_STEP, TRIAL_SECONDS)
from sparsealloc.core.plan import AllocationPlan, MetricChoice
from sparsealloc.core.types import Outcome
from sparsealloc.objectives.base import OBJECTIVES
from sparsealloc.objectives.context import EvalContext
from sparsealloc.pruning.allocators import AllocationInputs, allocate
from sparsealloc.pruning.apply import PruneReport, rank_maskable, resolve_plan
from sparsealloc.pruning.calibration.text import TextSource
from sparsealloc.pruning.kv.quant import kv_fake_quant
from sparsealloc.pruning.layer_drop import blocks_removed
from sparsealloc.pruning.layer_prune import first_dropped
from sparsealloc.pruning.level_db import LevelDatabase, needs_database
from sparsealloc.pruning.masked import mask_report, masked_forward, stitched_forward
from sparsealloc.pruning.model.models import resolve_proxy_dtype
from sparsealloc.pruning.pipeline import prune_with_plan_
from sparsealloc.spaces.budget import budget_with_removed
from sparsealloc.spaces.space import SearchSpace
from sparsealloc.spaces.spec import StudySpec


class StopTrial(Exception):
    """Raised inside a trial when the pruner says stop (becomes Outcome "pruned")."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped at step {step}")
        self.step = step


@dataclass
class TrialState:
    """The candidate being scored, handed to objectives."""

    plan: AllocationPlan
    prune_report: PruneReport
    group_size: int = 32
    report: Callable[[int, float], None] | None = None  # report(batches_done, value_so_far)
    intermediate: list[tuple[int, float]] = field(default_factory=list)
    windows: tuple[int, ...] | None = None  # calibration windows to score on (None: all)
    model: nn.Module | None = None  # the model the plan is applied to (None: ctx.model)
    blocks: tuple | None = None  # compression of each decoder block, where known (block output reuse)


class TrialEvaluator:
    """Scores candidates of one study on one worker (see module docstring).

    Args:
        ctx: The worker's :class:`EvalContext`.
        spec: The study spec.
        space: The study's search space (built from ``ctx.layout``).
    """

    def __init__(self, ctx: EvalContext, spec: StudySpec, space: SearchSpace | None = None,
                 database_root: str | None = None) -> None:
        self.ctx = ctx
        self.spec = spec
        metric = MetricChoice(spec.metric.name, dict(spec.metric.params))
        fixed = "metric" not in spec.space and spec.pattern == "unstructured"  # one metric, per-row masks
        #: Level database of a fixed weight-updating metric (SparseGPT, STADEW...), else None.
        self.database = None
        if fixed and needs_database(metric, spec.pattern, ctx.layout.linears):
            self.database = LevelDatabase.open(ctx.model, ctx.layout.linears, ctx.stats, metric, spec.pattern,
                                               ctx.windows, root=database_root, model_name=str(spec.model))
        self.space = space or SearchSpace(spec, ctx.layout, leveled=spec.sampler == "evo" or self.database is not None,
                                          window_strata=ctx.window_domains)
        self.objectives = [OBJECTIVES.get(name) for name in spec.objectives]
        c = spec.calibration
        #: What plans record of the calibration, so that ``apply`` rebuilds the very same model.
        self.calibration = {"source": f"windows:{c.windows_file}" if c.windows_file else
                            TextSource.of(c.text, c.dataset, domains=c.domains).describe(), "samples": int(ctx.windows.shape[0]),
                            "seq_len": int(ctx.windows.shape[1]), "seed": c.seed, "batch_size": ctx.batch_size}
        if "kl" in spec.objectives:  # first: its temporaries come and go before the ranks exist
            ctx.cache_kl_reference()
        if fixed:
            ctx.cache_ranks(metric)
        self.gram_rung = spec.early_stopping.uses_gram_rung
        #: The model of the latest :meth:`applied` block (ctx.model or the compute-dtype copy).
        self.last_model = ctx.model
        #: The compression of each decoder block in the latest :meth:`applied` block where its
        #: Linears were stitched (:meth:`block_keys`), else None.
        self.last_blocks: tuple | None = None
        self._block_parts = [(tuple(ctx.layout.block_linears(b)),
                              tuple(a for a in ctx.layout.attention if a.startswith(f"{b}."))) for b in ctx.layout.blocks]
        #: Compute dtype of trial forwards (``spec.proxy_dtype``, "auto" resolved on this worker's device).
        self.proxy_dtype = resolve_proxy_dtype(spec.proxy_dtype, ctx.device)
        if "layer_local" in spec.objectives:
            ctx.cache_layer_grams()
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
        provenance: dict[str, Any] = {"calibration": self.calibration}
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
        if self.database is not None and decoded.metric == self.database.metric:
            provenance["level_db"] = self.database.provenance()
        plan = decoded.to_plan(self.spec.pattern, self.ctx.model_info, sparsity=sparsity, provenance=provenance or None)
        return plan.replace(dropped_layers=tuple(dropped)) if dropped else plan

    def cached_ratios(self, plan: AllocationPlan) -> dict[str, float] | None:
        """Ratio per Linear when every mask of ``plan`` is a cut of the cached ranks (fixed metric,
        plain per-row masks, no dropped blocks), else None."""
        ranks = self.ctx.ranks_for(plan)
        if ranks is None or plan.dropped_layers:
            return None
        ratios = resolve_plan(plan, self.ctx.layout)
        if not all(rank_maskable(plan, name) for name, ratio in ratios.items() if ratio > 0):
            return None
        return ratios

    def database_ratios(self, plan: AllocationPlan) -> dict[str, float] | None:
        """Ratio per Linear when ``plan``'s layers come from the level database (its metric and
        pattern, no dropped blocks), else None."""
        db = self.database
        if db is None or plan.metric != db.metric or plan.pattern != db.pattern or plan.dropped_layers:
            return None
        return resolve_plan(plan, self.ctx.layout)

    def block_keys(self, plan: AllocationPlan, ratios: Mapping[str, float], source: Any) -> tuple:
        """What each decoder block computes with under ``plan`` when its Linears are stitched from
        ``source`` at ``ratios`` (a Linear's weights are a function of its ratio there): the ratios of
        the block's Linears and its attention's KV bits. Equal keys, equal inputs: equal outputs
        (:mod:`~sparsealloc.objectives.block_cache`)."""
        kv = plan.kv_bits
        quantized = any(min(bits["k"], bits["v"]) < 16 for bits in kv.values())
        common = (source, quantized, self.spec.kv.group_size, self.spec.kv.residual) if quantized else (source,)
        return tuple((common, tuple(ratios.get(n, 0.0) for n in linears),
                      tuple(tuple(sorted(kv[a].items())) if a in kv else None for a in attention))
                     for linears, attention in self._block_parts)

    @contextmanager
    def applied(self, plan: AllocationPlan, fast: bool = False) -> Iterator[PruneReport]:
        """The worker's model compressed as ``plan`` says, for as long as the block runs.

        ``fast``: where the plan's Linears are stitched (cached masks or the level database), apply
        it to :meth:`~EvalContext.compute_model` in :attr:`proxy_dtype` instead of
        ``ctx.model`` (how trials are scored); the model used is :attr:`last_model`. Validation
        and ``apply`` use the default, ``ctx.model`` in its own dtype.

        When every mask is a cut of the cached ranks (:meth:`cached_ratios`), the model runs through
        :func:`~sparsealloc.pruning.masked.masked_forward`: no weight is written, nothing is restored
        and no pristine copy is needed. Otherwise :func:`~sparsealloc.pruning.pipeline.prune_with_plan_`
        compresses it in place from the pristine weights (Prune&Comp scales of dropped blocks fused,
        restore and masks fused per Linear where the ranks allow), the dropped blocks are taken out,
        and everything is put back on exit. Either way the plan's KV bits are fake-quantized; the
        report counts dropped blocks' Linears as fully sparse.
        """
        ctx = self.ctx
        kv = (plan.kv_bits, self.spec.kv.group_size, self.spec.kv.residual)
        dtype = self.proxy_dtype if fast else None
        self.last_model, self.last_blocks = ctx.model, None
        ratios = self.cached_ratios(plan)
        if ratios is not None:
            if ctx.mask_cache_bytes:
                model = self.last_model = ctx.compute_model(dtype) if fast else ctx.model
                masked = stitched_forward(model, ctx.masked_entries(ratios, model.dtype))
            else:
                model, masked = ctx.model, masked_forward(ctx.model, ratios, ctx.ranks)
            self.last_blocks = self.block_keys(plan, ratios, ("ranks", str(ctx.ranks_metric)))
            with masked, kv_fake_quant(model, *kv):
                yield mask_report(ratios, ctx.layout)
            return
        ratios = self.database_ratios(plan)
        if ratios is not None:
            model = self.last_model = ctx.compute_model(dtype) if fast else ctx.model
            self.last_blocks = self.block_keys(plan, ratios, ("level_db", self.database.key))
            with stitched_forward(model, self.database.entries(ratios, model.dtype)), kv_fake_quant(model, *kv):
                yield mask_report(ratios, ctx.layout)
            return
        try:
            ctx.restore_(weights=False)  # biases, embeddings; the Linears are written from ctx.pristine_weight
            report = prune_with_plan_(ctx.model, plan, ctx.stats, layout=ctx.layout, ranks=ctx.ranks_for(plan),
                                      pristine=ctx.pristine_weight, remove_dropped=False)
            with kv_fake_quant(ctx.model, *kv), blocks_removed(ctx.model, list(plan.dropped_layers)):
                yield report
        finally:
            ctx.restore_()

    def rung_value(self, plan: AllocationPlan) -> float:
        """The zero-forward rung: summed layer-local error of ``plan`` (from the cached ranks when
        the plan's metric is the cached one, without touching the model; else from the pruned
        weights, still without a forward pass)."""
        self.ctx.cache_layer_grams()  # no-op when built with layer_grams; the model is dense here
        ratios = self.cached_ratios(plan)
        if ratios is not None:
            return self.ctx.layer_error(ratios)
        with self.applied(plan):
            return self.ctx.layer_error()

    def __call__(self, values: Mapping[str, Any], report: Callable[[int, float], object] | None = None,
                 windows: Sequence[int] | None = None) -> Outcome:
        """Score one candidate.

        Args:
            values: The sampler's parameter values.
            report: ``report(step, value)`` along the fidelity ladder (module docstring); a True
                answer stops the trial, which then returns Outcome "pruned".
            windows: Calibration windows to score on (a selection stage's fidelity); None: all.
        """
        start = time.perf_counter()
        built = self.database.build_seconds if self.database is not None else 0.0
        intermediate: list[tuple[int, float]] = []
        offset = 1 if report is not None and self.gram_rung else 0
        n_windows = len(self.ctx.scored) if windows is None else len(windows)
        last = offset + -(-n_windows // self.ctx.batch_size)
        windows = None if windows is None else tuple(int(w) for w in windows)

        def publish(step: int, value: float) -> None:
            intermediate.append((step, float(value)))
            if report is not None and report(step, float(value)) and step < last:
                raise StopTrial(step)

        plan = None
        try:
            plan = self.plan_for(values)
            if offset:
                publish(1, self.rung_value(plan))
            with self.applied(plan, fast=True) as prune_report:
                state = TrialState(plan, prune_report, self.spec.kv.group_size, intermediate=intermediate,
                                   windows=windows, model=self.last_model, blocks=self.last_blocks)
                state.report = lambda batches, value: publish(offset + batches, value)
                values_out = tuple(float(fn(self.ctx, state)) for fn in self.objectives)
        except StopTrial as stop:
            attrs = {PLAN: plan.to_dict(), PRUNED_AT_STEP: stop.step, TRIAL_SECONDS: time.perf_counter() - start}
            return Outcome("pruned", attrs=attrs, intermediate=tuple(intermediate))
        except TrialFailed as exc:
            return Outcome("failed", reason=exc.reason)
        except (torch.OutOfMemoryError, MemoryError) as exc:
            return Outcome("failed", reason=f"out of memory: {str(exc)[:200]}")
        bad = [name for name, v in zip(self.spec.objectives, values_out) if not math.isfinite(v)]
        if bad:
            return Outcome("failed", reason=f"objective {bad[0]} is not finite", intermediate=tuple(intermediate))
        attrs = {
            PLAN: plan.to_dict(),
            ACHIEVED_SPARSITY: prune_report.achieved_mean,
            TRIAL_SECONDS: time.perf_counter() - start,
        }
        if plan.kv_bits:
            attrs[KV_BYTES] = float(OBJECTIVES.get("kv_bytes")(self.ctx, state))
        if self.database is not None:
            attrs[DATABASE_BUILD_SECONDS] = self.database.build_seconds - built
        if windows is not None:
            attrs[CALIBRATION_TOKENS] = n_windows * int(self.ctx.scored.shape[1])
        return Outcome("complete", values_out, attrs=attrs, intermediate=tuple(intermediate))
