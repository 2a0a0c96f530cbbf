"""Dispatchers hand proposals to workers and collect outcomes. Registry ``DISPATCHERS``.

Contract: ``submit(proposal)`` never blocks for long; ``wait(timeout)`` returns at least one
finished ``(trial_number, Outcome)`` when anything is in flight (fewer only on timeout); a worker
fault becomes a failed Outcome with its reason, never an exception; ``capacity`` is how many
proposals may be in flight at once.
"""

from __future__ import annotations

import abc

from sparsealloc.core.registry import Registry
from sparsealloc.core.types import Outcome, Proposal


class Dispatcher(abc.ABC):
    """Runs trials somewhere (in process, Ray actors...)."""

    capacity: int = 1

    @abc.abstractmethod
    def submit(self, proposal: Proposal) -> None:
        """Start scoring ``proposal``."""

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
