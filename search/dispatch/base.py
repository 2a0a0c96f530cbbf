"""Dispatchers hand proposals to workers and collect outcomes. Registry ``DISPATCHERS``.

Contract: ``submit(proposal, report)`` never blocks for long; ``wait(timeout)`` returns at least one
finished ``(trial_number, Outcome)`` when a trial is in flight (fewer only on timeout, or when a
restarting worker became free again); a worker
fault becomes a failed Outcome with its reason, never an exception; ``capacity`` is how many
proposals may be in flight at once. ``report`` (early stopping) is ``report(step, value) -> bool``;
a dispatcher that can call it back from its worker passes it to the evaluator, the others ignore it
and the trial runs to full fidelity.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

from sparsealloc.core.registry import Registry
from sparsealloc.core.types import Outcome, Proposal

#: ``report(step, value) -> bool``: records an intermediate value, True = stop the trial.
Reporter = Callable[[int, float], bool]


class Dispatcher(abc.ABC):
    """Runs trials somewhere (in process, Ray actors...)."""

    capacity: int = 1
    #: Said when the study has early stopping that this dispatcher cannot run (None: it can).
    early_stopping_note: str | None = None

    @classmethod
    def for_study(cls, spec, evaluator, **options) -> Dispatcher:
        """The dispatcher for a study (:func:`sparsealloc.search.study.run`); ``options``: its keywords."""
        return cls(evaluator, **options)

    @abc.abstractmethod
    def submit(self, proposal: Proposal, report: Reporter | None = None) -> None:
        """Start scoring ``proposal``; ``report`` is the early-stopping callback, if any."""

    @abc.abstractmethod
    def wait(self, timeout: float | None = None) -> list[tuple[int, Outcome]]:
        """Finished trials since the last call."""

    @property
    @abc.abstractmethod
    def in_flight(self) -> int:
        """Proposals submitted and not yet returned by :meth:`wait`."""

    def close(self) -> None:
        """Release workers."""


def failure_reason(exc: BaseException) -> str:
    """Short, one-line reason for a failed trial."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__


DISPATCHERS: Registry[type[Dispatcher]] = Registry("dispatcher")
DISPATCHERS.register_lazy("local", "sparsealloc.search.dispatch.local:LocalDispatcher")
DISPATCHERS.register_lazy("ray", "sparsealloc.search.dispatch.ray_pool:RayDispatcher")
