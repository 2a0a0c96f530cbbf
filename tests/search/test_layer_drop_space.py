"""The study dimension "number of dropped blocks" (space component ``layer_drop``), tiny Llama.

A trial that drops k blocks must score exactly the model that ``apply`` would build from its plan
(compensation fused, blocks removed for real), count dropped weights toward the budget, and leave
the worker's model dense afterwards.
"""

from __future__ import annotations

import copy

import pytest
import torch

from sparsealloc.core.errors import SpecError
from sparsealloc.objectives import EvalContext, TrialEvaluator
from sparsealloc.pruning.apply import prune_
from sparsealloc.pruning.calibration.stats import collect_stats
from sparsealloc.pruning.layer_drop import blocks_removed, drop_blocks_
from sparsealloc.pruning.layer_prune import compensate_, prune_layers_
from sparsealloc.pruning.model.structure import model_layout
from sparsealloc.spaces.budget import budget_with_removed
from sparsealloc.spaces.space import DROP_PARAM, SearchSpace
from sparsealloc.spaces.spec import StudySpec


def _spec(**layer_drop) -> StudySpec:
    return StudySpec.from_dict({"name": "drop", "target_sparsity": 0.5, "space": ["layerwise", "layer_drop"],
                                "layer_drop": {"max_blocks": 2, **layer_drop}, "objectives": ["kl", "remaining_weights"],
                                "sampler": "nsga3"})


@torch.inference_mode()
def test_blocks_removed_matches_a_real_drop_and_puts_everything_back(fresh_model, windows_builder):
    model = fresh_model("llama")
    ids = windows_builder(2, 12)
    dense = model(ids).logits
    dropped = copy.deepcopy(model)
    drop_blocks_(dropped, ["model.layers.1"])
    with blocks_removed(model, ["model.layers.1"]):
        assert len(model.model.layers) == len(dropped.model.layers)
        torch.testing.assert_close(model(ids).logits, dropped(ids).logits, rtol=0, atol=0)
    assert model.config.num_hidden_layers == len(model.model.layers)
    assert [b.self_attn.layer_idx for b in model.model.layers] == list(range(len(model.model.layers)))
    torch.testing.assert_close(model(ids).logits, dense, rtol=0, atol=0)


def test_budget_with_removed_counts_dropped_weights_as_sparse():
    weights = {"a": 10, "b": 10, "c": 20, "d": 60}
    out = budget_with_removed({k: 0.5 for k in weights}, weights, {"a"}, 0.5)
    assert out["a"] == 0.0
    total = sum(weights.values())
    assert (weights["a"] + sum(out[k] * weights[k] for k in "bcd")) / total == pytest.approx(0.5, abs=1e-9)
    assert out["b"] == pytest.approx(4 / 9)
    with pytest.raises(SpecError, match="exceeds the sparsity target"):
        budget_with_removed({k: 0.1 for k in weights}, weights, {"d"}, 0.5)


def test_space_has_the_drop_count_with_default_zero(model_builder):
    layout = model_layout(model_builder("llama"))
    space = SearchSpace(_spec(), layout)
    param = space.by_name[DROP_PARAM]
    assert (param.low, param.high) == (0, 2)
    assert space.defaults()[DROP_PARAM] == 0
    assert space.decode({DROP_PARAM: 2}).dropped_blocks == 2
    assert space.decode({DROP_PARAM: 9}).dropped_blocks == 2  # clipped
    with pytest.raises(SpecError, match="layer_drop.max_blocks"):
        _spec(max_blocks=0)
    with pytest.raises(SpecError, match="'layer_drop' accepts keys"):
        StudySpec.from_dict({"layer_drop": {"blocks": 2}})


@pytest.mark.parametrize("compensate", [True, False])
def test_trial_scores_the_model_that_apply_builds(fresh_model, windows_builder, compensate):
    model = fresh_model("llama")
    windows = windows_builder(4, 16)
    ctx = EvalContext.build(model, windows, batch_size=2, model_info={"name": "tiny-llama"})
    evaluator = TrialEvaluator(ctx, _spec(compensate=compensate))
    schedule = ctx.drop_schedule
    with torch.inference_mode():
        reference = copy.deepcopy(model)
        expected = prune_layers_(reference, windows, 2, compensate=compensate)
    assert schedule.dropped == expected.dropped
    assert schedule.alphas == pytest.approx(expected.alphas)
    assert (schedule.alphas != [1.0, 1.0]) == compensate

    ids = windows[:2]
    with torch.inference_mode():
        dense = model(ids).logits.clone()
    values = {**evaluator.space.defaults(), DROP_PARAM: 2}
    outcome = evaluator(values)
    assert outcome.state == "complete", outcome.reason
    plan = evaluator.plan_for(values)
    assert list(plan.dropped_layers) == schedule.dropped
    assert outcome.values[1] == pytest.approx(0.5, abs=5e-3)  # dropped blocks count toward the budget
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, dense, rtol=0, atol=0)  # dense again

    # The apply path: fresh dense model, fuse the plan's scales, prune (blocks dropped for real).
    applied = fresh_model("llama")
    with torch.inference_mode():
        stats = collect_stats(applied, windows, batch_size=2)
        compensate_(applied, plan.provenance["layer_prune"]["compensation"])
        prune_(applied, plan, stats)
        assert len(applied.model.layers) == len(model.model.layers) - 2
        with evaluator.applied(plan):
            torch.testing.assert_close(model(ids).logits, applied(ids).logits, rtol=1e-5, atol=1e-5)
