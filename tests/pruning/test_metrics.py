"""Pruning metrics on hand-computable tensors, and the OptiShear meta-metric's invariances."""

from __future__ import annotations

import math

import pytest
import torch

from sparsealloc.core.errors import SpecError, UnknownNameError
from sparsealloc.core.types import LayerStats
from sparsealloc.pruning.masks import row_mask
from sparsealloc.pruning.metrics import (
    COEFFICIENTS,
    MASK_CHANGING_COEFFICIENTS,
    MASK_EQUIVALENT_TRANSFORM_PAIRS,
    MASK_INVARIANT_COEFFICIENTS,
    METRICS,
    TRANSFORMS,
    metric_uses_bias,
    score,
)

# W (2 × 4) and statistics of 4 tokens, chosen so that every quantity is easy to work out by hand:
#   token inputs x_t (rows):  [1, 2, 0, 3], [1, -2, 2, 3], [1, 2, 0, -3], [1, -2, 2, 3]
#   Σx² = [4, 16, 8, 36]   Σx = [4, 0, 4, 6]   count = 4
#   ‖X_j‖₂ = [2, 4, √8, 6]   E[x²] = [1, 4, 2, 9]
#   unbiased σ² = (Σx² − (Σx)²/n)/(n−1) = [0, 16/3, 4/3, 27/3 = 9]
W = torch.tensor([[1.0, -2.0, 3.0, -4.0], [-0.5, 1.0, -1.5, 2.0]])
X = torch.tensor([[1.0, 2, 0, 3], [1, -2, 2, 3], [1, 2, 0, -3], [1, -2, 2, 3]])
STATS = LayerStats(sum_sq=torch.tensor([4.0, 16, 8, 36]), sum=torch.tensor([4.0, 0, 4, 6]), count=4)


def stats_of(x: torch.Tensor) -> LayerStats:
    return LayerStats(sum_sq=(x * x).sum(0), sum=x.sum(0), count=x.shape[0])


def test_hand_stats_match_their_tokens():
    assert torch.equal(stats_of(X).sum_sq, STATS.sum_sq)
    assert torch.equal(stats_of(X).sum, STATS.sum)
    torch.testing.assert_close(STATS.var, X.var(dim=0, unbiased=True))


def test_magnitude_is_absolute_weight():
    expected = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 1.0, 1.5, 2.0]])
    assert torch.equal(score("magnitude", W, None), expected)
    assert torch.equal(score("magnitude", W, STATS), expected)


def test_wanda_is_weight_times_input_norm():
    norm = torch.tensor([2.0, 4.0, math.sqrt(8), 6.0])
    expected = torch.tensor([[1 * 2, 2 * 4, 3 * norm[2], 4 * 6], [0.5 * 2, 1 * 4, 1.5 * norm[2], 2 * 6]])
    torch.testing.assert_close(score("wanda", W, STATS), expected)


def test_stade_uses_unbiased_std():
    std = torch.tensor([0.0, math.sqrt(16 / 3), math.sqrt(4 / 3), 3.0])
    expected = W.abs() * std
    torch.testing.assert_close(score("stade", W, STATS), expected)
    torch.testing.assert_close(score("stade", W, STATS), W.abs() * X.std(dim=0, unbiased=True))
    # bias=True changes nothing in the scores, only asks prune_ for mean compensation
    torch.testing.assert_close(score("stade", W, STATS, {"bias": True}), expected)


def test_stade_bias_flag():
    assert metric_uses_bias("stade", {"bias": True})
    assert not metric_uses_bias("stade", {})
    assert not metric_uses_bias("wanda", {"bias": True})


def test_ria_default_exponent_half():
    a = W.abs()
    col_sum = torch.tensor([1.5, 3.0, 4.5, 6.0])
    row_sum = torch.tensor([[10.0], [5.0]])
    norm_pow = torch.tensor([2.0, 4.0, math.sqrt(8), 6.0]).sqrt()
    expected = (a / col_sum + a / row_sum) * norm_pow
    torch.testing.assert_close(score("ria", W, STATS), expected)
    # element (0, 0) by hand: (1/1.5 + 1/10)·√2
    assert score("ria", W, STATS)[0, 0].item() == pytest.approx((1 / 1.5 + 1 / 10) * math.sqrt(2), rel=1e-6)
    # a = 1 uses the plain norm
    torch.testing.assert_close(score("ria", W, STATS, {"a": 1.0}), (a / col_sum + a / row_sum) * norm_pow**2)


def test_lognorm_by_hand():
    a = W.abs()
    row_norm = torch.tensor([[math.sqrt(30)], [math.sqrt(7.5)]])
    col_norm = torch.tensor([math.sqrt(1.25), math.sqrt(5), math.sqrt(11.25), math.sqrt(20)])
    mean_sq = torch.tensor([1.0, 4.0, 2.0, 9.0])
    expected = torch.log1p(a / row_norm + a / col_norm) * mean_sq**0.25
    torch.testing.assert_close(score("lognorm", W, STATS), expected)


# ----------------------------------------------------------------------------- generalized (OptiShear)
# Smaller example for the meta-metric: |W| = [[1, 2], [3, 4]], s = E[x²] = [1, 4] (√s = [1, 2]).
W2 = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
S2 = LayerStats(sum_sq=torch.tensor([2.0, 8.0]), sum=torch.tensor([0.0, 0.0]), count=2)
WA = W2.abs()
ROOT_S = torch.tensor([[1.0, 2.0]])


def test_generalized_default_is_wanda_up_to_a_constant():
    torch.testing.assert_close(score("generalized", W2, S2), WA * ROOT_S)
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(16, 32, generator=gen)
    stats = stats_of(torch.randn(50, 32, generator=gen) * 3 + 1)
    g = score("generalized", weight, stats)
    w = score("wanda", weight, stats)
    torch.testing.assert_close(g * math.sqrt(stats.count), w)
    assert torch.equal(g.argsort(dim=1), w.argsort(dim=1))
    for sparsity in (0.25, 0.5, 0.7):
        assert torch.equal(row_mask(g, sparsity), row_mask(w, sparsity))


W_COEF_EXPECTED = {
    "no_coe": torch.ones(2, 2),
    "row_sum": torch.tensor([[1 / 3, 1 / 3], [1 / 7, 1 / 7]]),
    "column_sum": torch.tensor([[1 / 4, 1 / 6], [1 / 4, 1 / 6]]),
    "relative_sum": torch.tensor([[1 / (3 + 4), 1 / (3 + 6)], [1 / (7 + 4), 1 / (7 + 6)]]),
    "to_sum_scalar": torch.full((2, 2), 1 / 10),
    "to_mean_scalar": torch.full((2, 2), 1 / 2.5),
    "frobenius_norm": torch.full((2, 2), 1 / math.sqrt(30)),
}
X_COEF_EXPECTED = {  # s = [1, 4]
    "no_coe": torch.tensor([[1.0, 1.0]]),
    "row_sum": torch.tensor([[1 / 5, 1 / 5]]),
    "column_sum": torch.tensor([[1.0, 1 / 4]]),
    "relative_sum": torch.tensor([[1 / (5 + 1), 1 / (5 + 4)]]),
    "to_sum_scalar": torch.tensor([[1 / 5, 1 / 5]]),
    "to_mean_scalar": torch.tensor([[1 / 2.5, 1 / 2.5]]),
    "frobenius_norm": torch.tensor([[1 / math.sqrt(17), 1 / math.sqrt(17)]]),
}
TRANSFORM_FN = {
    "no_op": lambda t: t,
    "sqrt": lambda t: t.sqrt(),
    "square": lambda t: t * t,
    "exp": lambda t: t.exp(),
    "log": lambda t: t.log(),
    "sigmoid": lambda t: 1 / (1 + (-t).exp()),
    "softmax": lambda t: t.exp() / t.exp().sum(dim=1, keepdim=True),
}


def test_tables_cover_every_choice():
    assert set(W_COEF_EXPECTED) == set(COEFFICIENTS) == set(X_COEF_EXPECTED)
    assert set(TRANSFORM_FN) == set(TRANSFORMS)


@pytest.mark.parametrize("coef", COEFFICIENTS)
def test_generalized_w_coefficient(coef):
    torch.testing.assert_close(score("generalized", W2, S2, {"w_coef": coef}), W_COEF_EXPECTED[coef] * WA * ROOT_S)


@pytest.mark.parametrize("coef", COEFFICIENTS)
def test_generalized_x_coefficient(coef):
    torch.testing.assert_close(score("generalized", W2, S2, {"x_coef": coef}), WA * X_COEF_EXPECTED[coef] * ROOT_S)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_generalized_w_transform(transform):
    expected = TRANSFORM_FN[transform](WA) * ROOT_S
    torch.testing.assert_close(score("generalized", W2, S2, {"w_transform": transform}), expected)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_generalized_x_transform(transform):
    expected = WA * TRANSFORM_FN[transform](ROOT_S)
    torch.testing.assert_close(score("generalized", W2, S2, {"x_transform": transform}), expected)


def test_generalized_softmax_hand_value():
    # softmax of √s = [1, 2] along the input dimension: [1, e] / (1 + e)
    got = score("generalized", W2, S2, {"x_transform": "softmax"})
    e = math.e
    torch.testing.assert_close(got, torch.tensor([[1 / (1 + e), 2 * e / (1 + e)], [3 / (1 + e), 4 * e / (1 + e)]]))


def test_generalized_exponents():
    got = score("generalized", W2, S2, {"w_exponent": 2.0, "x_exponent": 2.0})
    torch.testing.assert_close(got, torch.tensor([[1.0 * 1, 4.0 * 4], [9.0 * 1, 16.0 * 4]]))
    got = score("generalized", W2, S2, {"w_exponent": 0.5, "x_transform": "square"})
    torch.testing.assert_close(got, WA.sqrt() * ROOT_S**2)


def test_generalized_output_is_finite():
    huge = score("generalized", W2 * 1000, S2, {"w_transform": "exp", "x_transform": "exp"})
    assert torch.isfinite(huge).all()


def _random_case(seed: int):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(12, 24, generator=gen)
    x = torch.randn(40, 24, generator=gen) * torch.rand(24, generator=gen) * 4 + torch.randn(24, generator=gen)
    return weight, stats_of(x)


@pytest.mark.parametrize("key", sorted(MASK_INVARIANT_COEFFICIENTS))
def test_mask_invariant_coefficients_keep_the_default_mask(key):
    for seed in range(3):
        weight, stats = _random_case(seed)
        for sparsity in (0.3, 0.5, 0.75):
            reference = row_mask(score("generalized", weight, stats), sparsity)
            for choice in MASK_INVARIANT_COEFFICIENTS[key]:
                got = row_mask(score("generalized", weight, stats, {key: choice}), sparsity)
                assert torch.equal(got, reference), (key, choice, seed, sparsity)


def test_mask_equivalent_transform_pairs_keep_the_default_mask():
    for seed in range(3):
        weight, stats = _random_case(seed)
        reference = row_mask(score("generalized", weight, stats), 0.5)
        for w_t, x_t in MASK_EQUIVALENT_TRANSFORM_PAIRS:
            got = row_mask(score("generalized", weight, stats, {"w_transform": w_t, "x_transform": x_t}), 0.5)
            assert torch.equal(got, reference), (w_t, x_t)


@pytest.mark.parametrize("choice", MASK_CHANGING_COEFFICIENTS["w_coef"])
def test_w_column_and_relative_sum_change_the_mask(choice):
    assert choice in ("column_sum", "relative_sum")
    changed = False
    for seed in range(5):
        weight, stats = _random_case(seed)
        reference = row_mask(score("generalized", weight, stats), 0.5)
        changed |= not torch.equal(row_mask(score("generalized", weight, stats, {"w_coef": choice}), 0.5), reference)
    assert changed


def test_mask_changing_and_invariant_lists_are_disjoint():
    for key in ("w_coef", "x_coef"):
        assert not set(MASK_CHANGING_COEFFICIENTS[key]) & set(MASK_INVARIANT_COEFFICIENTS[key])
        assert set(MASK_CHANGING_COEFFICIENTS[key]) | set(MASK_INVARIANT_COEFFICIENTS[key]) == set(COEFFICIENTS)


# ----------------------------------------------------------------------------- errors
def test_registry_holds_the_metrics():
    assert {"magnitude", "wanda", "stade", "ria", "lognorm", "generalized"} <= set(METRICS.names())


def test_unknown_metric_lists_valid_names():
    with pytest.raises(UnknownNameError) as info:
        score("wandda", W, STATS)
    message = str(info.value)
    assert "wandda" in message
    for name in ("magnitude", "wanda", "stade", "generalized"):
        assert name in message


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("wanda", {"alpha": 1}),
        ("ria", {"b": 2}),
        ("generalized", {"w_coef": "nope"}),
        ("generalized", {"x_coef": "nope"}),
        ("generalized", {"w_transform": "cube"}),
        ("generalized", {"x_transform": "cube"}),
        ("generalized", {"unknown": 1}),
    ],
)
def test_bad_params_raise_spec_error(name, params):
    with pytest.raises(SpecError) as info:
        score(name, W2, S2, params)
    assert name in str(info.value) or any(str(v) in str(info.value) for v in params.values())


def test_check_params_fails_before_any_scoring():
    from sparsealloc.pruning.metrics import check_params

    check_params("stade", {"bias": True})
    check_params("generalized", {"w_coef": "column_sum", "x_exponent": 0.5})
    check_params("magnitude")
    with pytest.raises(SpecError, match="alpha"):
        check_params("wanda", {"alpha": 2})
    with pytest.raises(UnknownNameError):
        check_params("wandda", {})
