"""In-process dispatcher: scores each proposal synchronously in the orchestrator's process."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sparsealloc.core.types import Outcome, Proposal
from sparsealloc.search.dispatch.base import Dispatcher, Reporter, failure_reason

Evaluator = Callable[[Mapping[str, Any]], Outcome]


class LocalDispatcher(Dispatcher):
    """Runs ``evaluator(proposal.params)`` at submit time; :meth:`wait` returns the results.

    With a ``report`` callback (early stopping) it runs ``evaluator(params, report=report)``, so the
    evaluator can stop the trial when the study's pruner says so.

    Args:
        evaluator: Usually a :class:`~sparsealloc.objectives.TrialEvaluator`.
    """

    capacity = 1

    def __init__(self, evaluator: Evaluator) -> None:
        self.evaluator = evaluator
        self._done: list[tuple[int, Outcome]] = []

    def submit(self, proposal: Proposal, report: Reporter | None = None) -> None:
        options = {} if report is None else {"report": report}
        if proposal.windows is not None:  # a selection stage's fidelity (evo)
            options["windows"] = proposal.windows
        try:
            outcome = self.evaluator(proposal.params, **options)
        except Exception as exc:  # a trial's fault is data, not a crash of the study
            outcome = Outcome("failed", reason=failure_reason(exc))
        self._done.append((proposal.trial_number, outcome))

    def wait(self, timeout: float | None = None) -> list[tuple[int, Outcome]]:
        done, self._done = self._done, []
        return done

    @property
    def in_flight(self) -> int:
        return len(self._done)
