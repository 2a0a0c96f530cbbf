"""Lean trials: cached-rank masks, the exact memory-bounded KL, the one-forward proxies, the Gram rung."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsealloc.core.plan import AllocationPlan, MetricChoice
from sparsealloc.objectives import EvalContext, TrialEvaluator
from sparsealloc.objectives.context import lm_head_of
from sparsealloc.objectives.divergence import kl_reference, kl_sum
from sparsealloc.objectives.layer_local import compact_grams, quadratic_error
from sparsealloc.objectives.reconstruction import forward_errors
from sparsealloc.pruning.apply import prune_
from sparsealloc.pruning.calibration.stats import collect_stats, decoder_trunk
from sparsealloc.pruning.masks import masked_copy_, pruned_part, row_mask, row_mask_from_rank, row_rank
from sparsealloc.pruning.metrics import score
from sparsealloc.spaces.spec import StudySpec


def _ratios(layout, seed: int, low: float = 0.2, high: float = 0.8) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    return {n: float(low + (high - low) * torch.rand((), generator=gen)) for n in layout.linears}


@pytest.fixture
def ctx(model_builder, windows_builder):
    """A tiny Llama's context with everything cached: ranks (Wanda), KL reference, layer Grams."""
    model = model_builder("llama")
    context = EvalContext.build(model, windows_builder(6, 16, seed=1), batch_size=2, layer_grams=True)
    context.cache_ranks(MetricChoice("wanda"))
    context.cache_kl_reference()
    return context


# ----------------------------------------------------------------------------- masks from cached ranks
@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 10), cols=st.integers(1, 40), sparsity=st.floats(0.0, 0.99), seed=st.integers(0, 999))
def test_rank_masks_equal_fresh_masks(rows, cols, sparsity, seed):
    gen = torch.Generator().manual_seed(seed)
    score = torch.randn(rows, cols, generator=gen).round(decimals=1)  # ties on purpose: stable order
    weight = torch.randn(rows, cols, generator=gen)
    mask = row_mask(score, sparsity)
    rank = row_rank(score)
    assert torch.equal(row_mask_from_rank(rank, sparsity), mask)
    out = torch.full_like(weight, float("nan"))
    assert torch.equal(masked_copy_(out, weight, rank, sparsity), weight.masked_fill(mask, 0))
    assert torch.equal(pruned_part(weight, rank, sparsity), weight * mask)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prune_from_cached_ranks_equals_fresh_prune(ctx, seed):
    """The fused restore-and-prune of a trial gives the very weights a fresh prune_ gives."""
    ratios = _ratios(ctx.layout, seed)
    ratios[ctx.layout.linears[0]] = 0.0  # a layer left dense is restored too
    plan = AllocationPlan(sparsity=ratios, metric=MetricChoice("wanda"))
    fresh = copy.deepcopy(ctx.model)
    prune_(fresh, plan, ctx.stats, layout=ctx.layout)
    # start from a model pruned by another plan: prune_ with pristine= must not depend on it
    prune_(ctx.model, plan.replace(sparsity=_ratios(ctx.layout, seed + 10)), ctx.stats, layout=ctx.layout)
    report = prune_(ctx.model, plan, ctx.stats, layout=ctx.layout, ranks=ctx.ranks, pristine=ctx.pristine_weight)
    got, want = dict(ctx.model.named_modules()), dict(fresh.named_modules())
    for name in ctx.layout.linears:
        assert torch.equal(got[name].weight, want[name].weight), name
    assert report.achieved_mean == pytest.approx(sum(r * ctx.layout.numels[n] for n, r in ratios.items())
                                                 / sum(ctx.layout.numels.values()), abs=1e-3)
    ctx.restore_()


# ----------------------------------------------------------------------------- KL without a vocab-sized reference
def test_kl_reference_matches_direct_kl_with_bias():
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(300, 16, generator=gen), torch.randn(300, generator=gen)
    dense = 2 * torch.randn(2, 7, 16, generator=gen)
    pruned = dense + 0.3 * torch.randn(2, 7, 16, generator=gen)
    for b in (None, bias):
        m, c = kl_reference(dense, weight, b, chunk=5)
        logp = F.log_softmax(F.linear(dense, weight, b).double(), -1)
        logq = F.log_softmax(F.linear(pruned, weight, b).double(), -1)
        exact = float((logp.exp() * (logp - logq)).sum())
        assert kl_sum(pruned, weight, b, m, c, chunk=3) == pytest.approx(exact, rel=1e-5)
        assert abs(kl_sum(dense, weight, b, m, c)) < 1e-4  # KL(p ‖ p) = 0


def test_trial_kl_equals_exact_kl_of_the_pruned_model(ctx):
    """The trial's KL (d-sized reference) equals log_softmax/kl_div against the dense logits."""
    plan = AllocationPlan(metric=MetricChoice("wanda"), sparsity=_ratios(ctx.layout, 3))
    with torch.inference_mode():
        dense_logits = [lm_head_of(ctx.model)(h) for h in ctx.dense_hidden]
    prune_(ctx.model, plan, ctx.stats, layout=ctx.layout)
    got = forward_errors(ctx, ("kl",))["kl"]
    total = tokens = 0.0
    with torch.inference_mode():
        for batch, logits in zip(ctx.windows.split(ctx.batch_size), dense_logits):
            pruned_logits = ctx.model(input_ids=batch, use_cache=False).logits
            logp, logq = F.log_softmax(logits.double(), -1), F.log_softmax(pruned_logits.double(), -1)
            total += float(F.kl_div(logq, logp, log_target=True, reduction="sum"))
            tokens += batch.numel()
    ctx.restore_()
    assert got > 0 and got == pytest.approx(total / tokens, rel=1e-4)


def test_one_forward_gives_every_proxy(ctx):
    """forward_errors over several kinds equals each kind alone; hidden is ‖h − h_dense‖²/‖h_dense‖²."""
    plan = AllocationPlan(metric=MetricChoice("wanda"), sparsity=_ratios(ctx.layout, 4))
    prune_(ctx.model, plan, ctx.stats, layout=ctx.layout)
    together = forward_errors(ctx, ("kl", "logits", "hidden"))
    alone = {k: forward_errors(ctx, (k,))[k] for k in ("kl", "logits", "hidden")}
    with torch.inference_mode():
        h = torch.cat([decoder_trunk(ctx.model)(input_ids=b, use_cache=False).last_hidden_state
                       for b in ctx.windows.split(ctx.batch_size)])
    dense = torch.cat(ctx.dense_hidden)
    ctx.restore_()
    assert together == pytest.approx(alone, rel=1e-9)
    assert together["hidden"] == pytest.approx(float((h - dense).pow(2).sum() / dense.pow(2).sum()), rel=1e-5)
    assert all(v > 0 for v in together.values())


def test_forward_errors_reports_running_value_per_batch(ctx):
    seen = []
    plan = AllocationPlan(metric=MetricChoice("wanda"), sparsity=_ratios(ctx.layout, 5))
    prune_(ctx.model, plan, ctx.stats, layout=ctx.layout)
    final = forward_errors(ctx, ("kl",), report=lambda step, value: seen.append((step, value)))["kl"]
    ctx.restore_()
    assert [s for s, _ in seen] == [1, 2, 3] and seen[-1][1] == pytest.approx(final)


# ----------------------------------------------------------------------------- the zero-forward Gram rung
def _brute_force_layer_error(model, layout, windows, batch_size, pristine, ratios, stats) -> float:
    """Σ_layers ‖X·ΔWᵀ‖² / N from the layers' actual inputs X on the dense model."""
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in layout.linears}
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_pre_hook(lambda m, a, n=n: inputs[n].append(a[0].detach().reshape(-1, a[0].shape[-1])))
             for n in layout.linears]
    with torch.inference_mode():
        for batch in windows.split(batch_size):
            decoder_trunk(model)(input_ids=batch, use_cache=False)
    for h in hooks:
        h.remove()
    total = 0.0
    for name in layout.linears:
        x = torch.cat(inputs[name]).double()
        rank = row_rank(score("wanda", pristine[name], stats[name], {}))
        delta = pruned_part(pristine[name], rank, ratios[name]).double()
        total += float((x @ delta.T).pow(2).sum()) / x.shape[0]
    return total


def test_gram_rung_equals_brute_force_output_error(ctx):
    ratios = _ratios(ctx.layout, 6)
    brute = _brute_force_layer_error(ctx.model, ctx.layout, ctx.windows, ctx.batch_size, ctx.pristine_weight,
                                     ratios, ctx.stats)
    rung = ctx.layer_error(ratios)  # bfloat16 H/N: a few tenths of a percent
    assert rung == pytest.approx(brute, rel=2e-2)
    exact = collect_stats(ctx.model, ctx.windows, batch_size=ctx.batch_size, gram=True, layout=ctx.layout)
    grams = compact_grams(exact, dtype=torch.float32)
    fp32 = sum(quadratic_error(pruned_part(ctx.pristine_weight[n], ctx.ranks[n], r), grams[n]) for n, r in ratios.items())
    assert fp32 == pytest.approx(brute, rel=1e-5)
    # the same error from the pruned model's weights (the layer_local objective)
    plan = AllocationPlan(metric=MetricChoice("wanda"), sparsity=ratios)
    prune_(ctx.model, plan, ctx.stats, layout=ctx.layout, ranks=ctx.ranks, pristine=ctx.pristine_weight)
    assert ctx.layer_error() == pytest.approx(rung, rel=1e-9)
    ctx.restore_()


def test_layer_local_objective_needs_no_forward(ctx, monkeypatch):
    spec = StudySpec(target_sparsity=0.5, objectives=("layer_local",), warm_start=())
    evaluator = TrialEvaluator(ctx, spec)
    calls = []
    monkeypatch.setattr(type(ctx.model), "forward", lambda *a, **k: calls.append(1))
    outcome = evaluator(evaluator.space.defaults())
    assert outcome.state == "complete" and outcome.values[0] > 0 and not calls


def test_layer_error_without_grams_is_a_clear_error(model_builder, windows_builder):
    context = EvalContext.build(model_builder("llama"), windows_builder(2, 8), batch_size=2)
    with pytest.raises(ValueError, match="Gram"):
        context.layer_error()


# ----------------------------------------------------------------------------- masks on the fly, no pristine copy
def test_masked_forward_trial_equals_in_place_pruning(model_builder, windows_builder):
    """A lazy worker scores trials with masks applied on the fly: same values as pruning in place,
    no weight written, no pristine copy taken."""
    windows = windows_builder(6, 16, seed=1)
    spec = StudySpec(target_sparsity=0.5, objectives=("kl",), warm_start=())
    lazy = EvalContext.build(model_builder("llama"), windows, batch_size=2, lazy_pristine=True, layer_grams=True)
    eager = EvalContext.build(model_builder("llama"), windows, batch_size=2, layer_grams=True)
    fast, slow = TrialEvaluator(lazy, spec), TrialEvaluator(eager, spec)
    dense = {n: w.clone() for n, w in lazy.weights().items()}
    values = fast.space.encode_sparsity(_ratios(lazy.layout, 7, 0.3, 0.7))
    plan = fast.plan_for(values)
    assert fast.cached_ratios(plan) is not None
    with fast.applied(plan) as report:
        assert not report.in_place
        on_the_fly = forward_errors(lazy, ("kl", "logits", "hidden"))
        layer = lazy.layer_error(report.requested)
    eager.cache_ranks(MetricChoice("wanda"))
    eager.restore_()
    prune_(eager.model, plan, eager.stats, layout=eager.layout)
    in_place = forward_errors(eager, ("kl", "logits", "hidden"))
    assert eager.layer_error() == pytest.approx(layer, rel=1e-6)
    eager.restore_()
    assert on_the_fly == pytest.approx(in_place, rel=1e-5)
    assert fast(values).values == pytest.approx(slow(values).values, rel=1e-5)
    assert lazy.pristine_weight == {}  # never needed
    assert all(torch.equal(w, dense[n]) for n, w in lazy.weights().items())
    assert all("forward" not in m.__dict__ for m in lazy.model.modules())  # instance forwards removed


def test_lazy_context_takes_its_copy_before_pruning_in_place(model_builder, windows_builder):
    ctx = EvalContext.build(model_builder("llama"), windows_builder(4, 8), batch_size=2, lazy_pristine=True)
    dense = {n: w.clone() for n, w in ctx.weights().items()}
    ctx.restore_()  # the contract: restore_ before pruning in place
    prune_(ctx.model, AllocationPlan.uniform(ctx.layout.linears, 0.5), ctx.stats, layout=ctx.layout)
    assert ctx.pristine_weight
    ctx.restore_()
    assert all(torch.equal(w, dense[n]) for n, w in ctx.weights().items())
    assert all(torch.equal(ctx.model.get_submodule(n).weight, w) for n, w in dense.items())
