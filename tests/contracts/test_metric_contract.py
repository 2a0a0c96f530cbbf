"""The pruning-metric contract (``sparsealloc.pruning.metrics``), for every name in ``METRICS``.

A metric scores each weight from the weight and its input statistics, higher = keep: a score shaped
like the weight, finite, the same on every call, leaving the weight untouched; its default
parameters are valid, and a weight that is already zero never outranks a non-zero one in its row.
"""

from __future__ import annotations

import pytest
import torch

from sparsealloc.core.errors import SpecError
from sparsealloc.core.types import LayerStats
from sparsealloc.pruning.metrics import METRICS, check_params, metric_traits, score

FQN = "model.layers.0.mlp.down_proj"  # an output projection: metrics that look at the role see one


def weight_and_stats(seed: int = 0) -> tuple[torch.Tensor, LayerStats]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 16, generator=gen) * torch.exp(torch.randn(16, generator=gen)) + 0.3
    weight = torch.randn(8, 16, generator=gen)
    weight[0, 3] = 0.0
    return weight, LayerStats((x * x).sum(0), x.sum(0), x.shape[0], x.T @ x)


@pytest.mark.parametrize("name", METRICS.names())
def test_a_score_is_shaped_like_the_weight_finite_repeatable_and_pure(name):
    check_params(name, {})
    weight, stats = weight_and_stats()
    before = weight.clone()
    first = score(name, weight, stats, {}, fqn=FQN)
    assert first.shape == weight.shape and torch.isfinite(first).all()
    assert torch.equal(weight, before)
    assert torch.equal(score(name, weight, stats, {}, fqn=FQN), first)


@pytest.mark.parametrize("name", METRICS.names())
def test_a_zero_weight_never_outranks_a_non_zero_one(name):
    weight, stats = weight_and_stats(1)
    row = score(name, weight, stats, {}, fqn=FQN)[0]
    assert row[3] <= row[weight[0] != 0].min() + 1e-6 * row.abs().max()


@pytest.mark.parametrize("name", [n for n in METRICS.names() if metric_traits(n).gram == "required"])
def test_a_metric_that_needs_the_gram_matrix_says_so(name):
    weight, stats = weight_and_stats()
    with pytest.raises(SpecError, match="Gram"):
        score(name, weight, LayerStats(stats.sum_sq, stats.sum, stats.count), {}, fqn=FQN)
