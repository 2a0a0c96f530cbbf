"""The objective contract (``sparsealloc.objectives.base``), for every name in ``OBJECTIVES``.

An objective measures a pruned candidate, minimized: a finite, non-negative number, the same for
the same candidate, and the worker's model is dense again after the trial. Secondary objectives
(not error proxies) are checked behind the ``hidden`` proxy, as a study runs them.
"""

from __future__ import annotations

import math

import pytest
import torch

from sparsealloc.objectives import EvalContext, TrialEvaluator
from sparsealloc.objectives.base import OBJECTIVES
from sparsealloc.spaces.spec import ERROR_PROXIES, StudySpec


@pytest.fixture(scope="module")
def ctx(model_builder, windows_builder) -> EvalContext:
    return EvalContext.build(model_builder("llama"), windows_builder(4, 16, seed=1), batch_size=2, layer_grams=True)


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_an_objective_is_a_finite_non_negative_repeatable_number(ctx, name):
    objectives = (name,) if name in ERROR_PROXIES else ("hidden", name)
    spec = StudySpec(target_sparsity=0.5, space=("layerwise", "kv"), objectives=objectives,
                     sampler="tpe" if len(objectives) == 1 else "nsga3", warm_start=())
    evaluator = TrialEvaluator(ctx, spec)
    dense = {n: w.clone() for n, w in ctx.weights().items()}
    values = evaluator.space.defaults()  # the uniform allocation at the target, 16-bit KV cache
    first = evaluator(values)
    assert first.state == "complete", first.reason
    value = first.values[objectives.index(name)]
    assert math.isfinite(value) and value >= 0, value
    assert evaluator(values).values == pytest.approx(first.values, rel=1e-6)
    assert all(torch.equal(w, dense[n]) for n, w in ctx.weights().items())
