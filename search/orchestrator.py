"""The study loop: ask → dispatch → tell, until the budget, the timeout or all-failing trials.

The orchestrator is the single writer of the store: workers only score.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from functools import partial
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState

from sparsealloc.core.errors import SparseAllocError
from sparsealloc.core.progress import duration, get_mode, log_event, say
from sparsealloc.search.dispatch.base import Dispatcher
from sparsealloc.search.samplers.base import Sampler
from sparsealloc.storage.coordination import BudgetLock, Heartbeat, requeue, sweep_stale
from sparsealloc.storage.optuna_adapter import best_single_value, count_trials, storage_of, trial_id

logger = logging.getLogger(__name__)


class AllTrialsFailed(SparseAllocError):
    """Every trial of a study failed; the message carries the last reason."""


class NoWorkersLeft(SparseAllocError):
    """Every worker of the dispatcher died for good; the message carries the last reason."""


@dataclass
class StudyRun:
    """Counts of what one run did."""

    told: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    last_failure: str = ""
    retried: int = 0  # failed trials whose parameters were queued again (a worker died)


def complete_count(study: optuna.Study) -> int:
    """COMPLETE trials in the study (the budget counts these)."""
    return count_trials(study, TrialState.COMPLETE)


def best_value_text(study: optuna.Study) -> str:
    if len(study.directions) == 1:
        best = best_single_value(study)
        return "-" if best is None else f"{best:.4g}"
    if count_trials(study, TrialState.COMPLETE) == 0:
        return "-"
    return f"pareto={len(study.best_trials)}"


def run_study(sampler: Sampler, dispatcher: Dispatcher, n_trials: int, timeout: float | None = None,
              max_failures_in_a_row: int = 5, poll_seconds: float = 1.0) -> StudyRun:
    """Run trials until the study holds ``n_trials`` COMPLETE trials (or ``timeout`` seconds pass).

    The budget counts the whole study: COMPLETE trials plus RUNNING ones (of this or another
    orchestrator), decided under :class:`~sparsealloc.storage.coordination.BudgetLock`, so several
    orchestrators on one PostgreSQL study neither overshoot nor duplicate. Failed trials are recorded
    and the loop goes on; a trial whose worker died (``Outcome.retry``) is recorded as failed with the
    reason and its parameters are queued once more (``retry_of``), for the next free worker; if
    ``max_failures_in_a_row`` trials fail with none completing in between, it stops with
    :class:`AllTrialsFailed`; once the dispatcher has no worker left (``capacity`` 0) it stops with
    :class:`NoWorkersLeft`.
    """
    study = sampler.study
    run = StudyRun()
    start = time.perf_counter()
    failures_in_a_row = 0
    lock, heartbeat = BudgetLock(study), Heartbeat(study)
    bar = _progress_bar(study, n_trials, timeout)
    staged: dict[int, bool] = {}
    try:
        while True:
            sweep_stale(study)
            timed_out = timeout is not None and time.perf_counter() - start > timeout
            proposals = []
            if not timed_out:
                with lock.hold():
                    # RUNNING trials a multi-stage sampler holds between its stages are not in flight.
                    in_flight = count_trials(study, TrialState.RUNNING) - sampler.parked
                    remaining = n_trials - complete_count(study) - in_flight
                    free = max(0, dispatcher.capacity - dispatcher.in_flight)
                    if min(free, remaining) > 0:
                        proposals = sampler.ask(min(free, remaining))
                        for proposal in proposals:
                            known = proposal.trial_id is not None
                            heartbeat.add(proposal.trial_id if known else trial_id(study, proposal.trial_number))
            for proposal in proposals:
                report = partial(sampler.report, proposal.trial_number) if sampler.prunes else None
                dispatcher.submit(proposal, report)
                staged[proposal.trial_number] = not proposal.final
            if dispatcher.in_flight == 0:
                # Nothing of ours in flight: done, unless another orchestrator's RUNNING trials may
                # still fail (and need redoing) before the budget is reached.
                if timed_out or complete_count(study) >= n_trials or count_trials(study, TrialState.RUNNING) == 0:
                    break
                time.sleep(poll_seconds)
                continue
            for number, outcome in dispatcher.wait():
                sampler.tell(number, outcome)
                # A selection stage's score (evo) does not finish the trial: it stays RUNNING (and
                # beating) until its last stage; counted as "staged".
                was_staged = staged.pop(number, False) and outcome.state == "complete"
                if not was_staged:
                    heartbeat.discard(trial_id(study, number))
                if outcome.state == "failed" and outcome.retry:
                    trial = storage_of(study).get_trial(trial_id(study, number))
                    if requeue(study, trial, once=True) is not None:
                        run.retried += 1
                run.told["staged" if was_staged else outcome.state] += 1
                log_event("trial", number=number, state=outcome.state, values=outcome.values, reason=outcome.reason)
                if outcome.state == "failed":
                    failures_in_a_row += 1
                    run.last_failure = outcome.reason
                    logger.warning("trial %d failed: %s", number, outcome.reason)
                else:
                    failures_in_a_row = 0
                if bar is not None:
                    bar.show(min(complete_count(study), n_trials), best_value_text(study), run.told["failed"])
            if dispatcher.capacity == 0:
                raise NoWorkersLeft(f"no worker is left to score trials; last reason: {run.last_failure}")
            if failures_in_a_row >= max_failures_in_a_row:
                raise AllTrialsFailed(
                    f"{failures_in_a_row} trials in a row failed; last reason: {run.last_failure}")
    finally:
        sampler.close()
        heartbeat.close()
        if bar is not None:
            bar.close()
        run.seconds = time.perf_counter() - start
    return run


class _TrialBar:
    """The trials' progress: a tqdm bar ("bar" mode) or, in "plain" mode, a line at every tenth of
    the budget and at least once a minute, with the ETA of the rate so far."""

    def __init__(self, study: optuna.Study, n_trials: int, mode: str, timeout: float | None = None) -> None:
        self.n_trials, self.mode, self.timeout = n_trials, mode, timeout
        self.initial = min(complete_count(study), n_trials)
        self.start = self.last_line = time.perf_counter()
        self.next_mark = self.initial + max(1, n_trials // 10)
        self.tqdm = None
        if mode == "bar":
            from tqdm.auto import tqdm

            self.tqdm = tqdm(total=n_trials, initial=self.initial, desc="trials", unit="trial", dynamic_ncols=True)

    def show(self, complete: int, best: str, failed: int) -> None:
        if self.tqdm is not None:
            self.tqdm.n = complete
            self.tqdm.set_postfix_str(f"best={best} failed={failed}", refresh=False)
            self.tqdm.refresh()
            return
        now = time.perf_counter()
        if complete < self.next_mark and now - self.last_line < 60 and complete < self.n_trials:
            return
        self.next_mark = complete + max(1, self.n_trials // 10)
        self.last_line = now
        done, elapsed = complete - self.initial, now - self.start
        left = self.n_trials - complete
        seconds = elapsed / done * left if done > 0 and left > 0 else None
        if self.timeout is not None and left > 0:  # the timeout ends the run first
            seconds = min(seconds if seconds is not None else math.inf, max(self.timeout - elapsed, 0.0))
        eta = f", about {duration(seconds)} left" if seconds is not None else ""
        say(f"trials: {complete}/{self.n_trials} complete, best {best}, {failed} failed, "
            f"{duration(elapsed)} elapsed{eta}")

    def close(self) -> None:
        if self.tqdm is not None:
            self.tqdm.close()


def _progress_bar(study: optuna.Study, n_trials: int, timeout: float | None = None) -> _TrialBar | None:
    mode = get_mode()
    return _TrialBar(study, n_trials, mode, timeout) if mode in ("bar", "plain") else None
