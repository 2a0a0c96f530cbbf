"""Small value types that cross module and process boundaries."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch


@dataclass
class LayerStats:
    """Calibration statistics of one Linear layer's input, shared by every pruning metric.

    All sums run over the calibration tokens (rows of the flattened input X, shape (tokens, in)).

    Attributes:
        sum_sq: Σ_t x_tj², shape (in,). ``sqrt(sum_sq)`` is Wanda's ‖X_j‖₂.
        sum: Σ_t x_tj, shape (in,).
        count: Number of tokens.
        gram: XᵀX, shape (in, in), or None where it was not collected (memory).
    """

    sum_sq: torch.Tensor
    sum: torch.Tensor
    count: int
    gram: torch.Tensor | None = None

    @property
    def norm(self) -> torch.Tensor:
        """‖X_j‖₂ over calibration tokens, shape (in,)."""
        return self.sum_sq.sqrt()

    @property
    def mean(self) -> torch.Tensor:
        """Mean input per feature μ_j, shape (in,)."""
        return self.sum / max(self.count, 1)

    @property
    def mean_sq(self) -> torch.Tensor:
        """E[x_j²] per feature, shape (in,)."""
        return self.sum_sq / max(self.count, 1)

    @property
    def var(self) -> torch.Tensor:
        """Unbiased variance per feature σ_j², shape (in,), clamped at 0."""
        n = self.count
        if n < 2:
            return self.mean_sq * 0
        return ((self.sum_sq - self.sum * self.sum / n) / (n - 1)).clamp_min(0)

    @property
    def std(self) -> torch.Tensor:
        """Standard deviation per feature σ_j, shape (in,)."""
        return self.var.sqrt()

    def to(self, device: Any) -> LayerStats:
        """Copy onto ``device``."""
        gram = None if self.gram is None else self.gram.to(device)
        return LayerStats(self.sum_sq.to(device), self.sum.to(device), self.count, gram)


@dataclass(frozen=True)
class Proposal:
    """One candidate handed from a sampler to a dispatcher.

    Attributes:
        trial_number: Issued by the store; the only id that crosses process boundaries.
        params: Flat parameter values keyed by "/"-joined names (``sparsity/block_07``).
        attrs: Extra bookkeeping (generation index, warm-start name) written as user attrs.
        trial_id: The store's id of the trial (so nobody looks it up again), when the sampler knows it.
        windows: Indices of the calibration windows to score on (a selection stage's fidelity, e.g.
            the evo sampler's few-token first stage); None: every calibration window. It travels with
            the proposal, so a stage runs the same in process and on a Ray worker.
        final: Whether this scoring finishes the trial. A multi-stage sampler sends a trial several
            times (one proposal per stage); only the last one completes it.
    """

    trial_number: int
    params: Mapping[str, float | int | str]
    attrs: Mapping[str, Any] = field(default_factory=dict)
    trial_id: int | None = None
    windows: tuple[int, ...] | None = None
    final: bool = True


@dataclass(frozen=True)
class Outcome:
    """What became of a trial. Failed trials are data, never a crash of the study.

    Attributes:
        state: "complete", "failed" or "pruned".
        values: Objective values (complete trials only).
        reason: Short reason for a failure ("objective is NaN", "worker died").
        attrs: Extra per-trial results (e.g. achieved sparsity), stored as user attrs.
        intermediate: (step, value) pairs reported along the way (multi-fidelity).
        retry: The failure was the worker's (it died mid-trial), not the plan's: the orchestrator
            records the trial as failed and queues the same parameters once more.
    """

    state: Literal["complete", "failed", "pruned"]
    values: tuple[float, ...] | None = None
    reason: str = ""
    attrs: Mapping[str, Any] = field(default_factory=dict)
    intermediate: tuple[tuple[int, float], ...] = ()
    retry: bool = False
