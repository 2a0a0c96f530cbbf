"""The switch model behind evo.guide: a discounted Bayesian ridge fit with Thompson draws."""

from __future__ import annotations

import numpy as np
import pytest

from sparsealloc.search.samplers.switch_model import SwitchModel


def _stages(g: np.ndarray, n_stages: int, per_stage: int, noise: float, rng: np.random.Generator):
    """Sparse ±1 switch vectors (one column down, one up), a large offset per stage, small noise."""
    for _ in range(n_stages):
        x = np.zeros((per_stage, len(g)))
        for row in x:
            a, b = rng.choice(len(g), size=2, replace=False)
            row[a], row[b] = -1.0, 1.0
        yield x, 100.0 * rng.standard_normal() + x @ g + noise * rng.standard_normal(per_stage)


def test_the_fit_recovers_the_sensitivities_whatever_each_stage_s_offset():
    rng = np.random.default_rng(0)
    g = rng.standard_normal(12)
    model = SwitchModel(12, forgetting=1.0, prior=1e-3)
    assert np.all(model.mean() == 0) and model.stages == 0
    for x, y in _stages(g, 60, 16, 0.05, rng):
        model.observe(x, y)
    assert model.stages == 60
    # One switch lowers one column and raises another: g is known up to a common shift.
    fitted = model.mean()
    assert np.allclose(fitted - fitted.mean(), g - g.mean(), atol=0.05)


def test_draws_spread_with_the_noise_and_centre_on_the_mean():
    rng = np.random.default_rng(1)
    g = rng.standard_normal(6)
    spread = {}
    for noise in (0.01, 1.0):
        model = SwitchModel(6, forgetting=1.0)
        for x, y in _stages(g, 20, 8, noise, np.random.default_rng(2)):
            model.observe(x, y)
        draws = np.stack([model.draw(np.random.default_rng(k)) for k in range(400)])
        assert np.allclose(draws.mean(axis=0), model.mean(), atol=0.2 * max(noise, 0.05))
        spread[noise] = draws.std(axis=0).mean()
    assert spread[1.0] > 20 * spread[0.01]


def test_forgetting_follows_sensitivities_that_move():
    rng = np.random.default_rng(3)
    before, after = rng.standard_normal(8), rng.standard_normal(8)
    errors = {}
    for forgetting in (1.0, 0.9):
        model = SwitchModel(8, forgetting=forgetting, prior=1e-3)
        for g in (before, after):
            for x, y in _stages(g, 40, 8, 0.01, np.random.default_rng(4)):
                model.observe(x, y)
        fitted = model.mean()
        errors[forgetting] = np.abs((fitted - fitted.mean()) - (after - after.mean())).max()
    assert errors[0.9] < 0.1 < 0.5 < errors[1.0]


def test_a_stage_of_one_child_or_bad_shapes():
    model = SwitchModel(3)
    model.observe(np.ones((1, 3)), np.ones(1))
    assert model.stages == 0
    model.observe(np.eye(3), np.array([1.0, np.nan, 2.0]))  # a NaN value is left out
    assert model.stages == 1
    with pytest.raises(ValueError, match=r"shape \(n, 3\)"):
        model.observe(np.ones((2, 4)), np.ones(2))
    with pytest.raises(ValueError, match="forgetting"):
        SwitchModel(3, forgetting=0.0)
