"""A linear model of what a level switch does to the fitness, to guide the evo sampler's mutations.

EvoPress (Sieberling et al., ICML 2025, arXiv:2410.14649) draws its level switches uniformly. Near
the parent, the fitness of a child is close to additive over Linears: ``f(child) ≈ f(parent) + Σ_j
g_j · Δs_j``, where ``Δs_j`` is the change of Linear ``j``'s sparsity and ``g_j`` its local
sensitivity (the first-order view of layer-wise allocation, as in the sensitivity-and-DP step of
``benchmarks/sensitivity_step.md``). Every stage of every generation scores several children on the
same windows, so each stage is a small regression sample of ``g``, free of the windows' common
offset once centred within the stage. :class:`SwitchModel` keeps a Bayesian ridge fit of ``g`` over
the stages seen (older stages discounted, since ``g`` moves with the parent), and hands out
posterior draws: choosing, for each child, the best of a few random switch sets under a fresh draw
is linear Thompson sampling (Agrawal & Goyal, ICML 2013; Russo et al., "A Tutorial on Thompson
Sampling", 2018), which explores where the fit is unsure and exploits where it is not.

Pure math: numpy arrays in, numbers out; the sampler decides what the columns mean.
"""

from __future__ import annotations

import numpy as np


class SwitchModel:
    """Discounted Bayesian ridge regression of stage values on the children's changes.

    Model: ``y = c_stage + x · g + ε``, with ``ε ~ N(0, σ²)`` and prior ``g ~ N(0, σ²/prior · I)``.
    The intercept of each stage is removed by centring ``x`` and ``y`` within the stage.

    Args:
        size: Number of columns of ``x`` (one per search group).
        forgetting: Weight kept by past stages at each new stage (1: no forgetting).
        prior: Precision of the ridge prior, in units of one observation whose ``x`` has unit norm
            (columns should be scaled so that one switch changes them by about 1).
    """

    def __init__(self, size: int, forgetting: float = 0.985, prior: float = 1.0) -> None:
        if size < 1:
            raise ValueError(f"expected at least one column, but got size {size}")
        if not 0 < forgetting <= 1:
            raise ValueError(f"expected forgetting in (0, 1], but got {forgetting}")
        self.size, self.forgetting, self.prior = int(size), float(forgetting), float(prior)
        self._xx = np.zeros((self.size, self.size))
        self._xy = np.zeros(self.size)
        self._yy = 0.0
        self._n = 0.0  # discounted degrees of freedom (observations less one per stage)
        self.stages = 0

    def observe(self, x: np.ndarray, y: np.ndarray) -> None:
        """One stage: the changes ``x`` (children × size) of the children scored on the same windows
        and their values ``y``. Fewer than two children say nothing about ``g`` and are ignored."""
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        if x.ndim != 2 or x.shape[1] != self.size or y.shape != (x.shape[0],):
            raise ValueError(f"expected x of shape (n, {self.size}) and y of shape (n,), but got {x.shape} and {y.shape}")
        keep = np.isfinite(y)
        x, y = x[keep], y[keep]
        if len(y) < 2:
            return
        x, y = x - x.mean(axis=0), y - y.mean()
        f = self.forgetting
        self._xx = f * self._xx + x.T @ x
        self._xy = f * self._xy + x.T @ y
        self._yy = f * self._yy + float(y @ y)
        self._n = f * self._n + len(y) - 1
        self.stages += 1

    def _posterior(self) -> tuple[np.ndarray, np.ndarray, float]:
        """Mean of ``g``, the Cholesky factor of the posterior precision (÷ σ²), and σ²."""
        precision = self._xx + self.prior * np.eye(self.size)
        chol = np.linalg.cholesky(precision)
        mean = np.linalg.solve(precision, self._xy)
        residual = self._yy - 2 * float(mean @ self._xy) + float(mean @ self._xx @ mean)
        sigma2 = max(residual, 0.0) / max(self._n, 1.0)
        return mean, chol, sigma2

    def mean(self) -> np.ndarray:
        """The posterior mean of ``g`` (zeros before any stage)."""
        return self._posterior()[0]

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """One draw of ``g`` from the posterior (Thompson sampling)."""
        mean, chol, sigma2 = self._posterior()
        # chol·cholᵀ = precision, so solving cholᵀ·u = z gives u ~ N(0, precision⁻¹).
        noise = np.linalg.solve(chol.T, rng.standard_normal(self.size))
        return mean + np.sqrt(sigma2) * noise
