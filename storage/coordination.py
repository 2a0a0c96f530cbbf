"""Several orchestrators on one study: an advisory lock for budget decisions, heartbeats, stale sweep.

Two orchestrators (on two machines) sharing a PostgreSQL study must neither overshoot the trial
budget nor leave trials RUNNING forever when one dies:

* :class:`BudgetLock` serializes "count the study's COMPLETE + RUNNING trials, then ask" with a
  PostgreSQL advisory lock keyed on the study (a no-op on SQLite, which has one writer).
* :class:`Heartbeat` records Optuna heartbeats for the trials this process has in flight, from a
  background thread (Optuna records none under ask/tell by itself).
* :func:`sweep_stale` fails trials whose heartbeat stopped (a dead orchestrator) through
  ``optuna.storages.fail_stale_trials``; the storage's ``RetryHeartbeatStaleTrialCallback``
  re-queues them once.
"""

from __future__ import annotations

import datetime
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import optuna
from optuna.trial import TrialState
from sqlalchemy import text

from sparsealloc.core.keys import FAIL_REASON, GENERATION, RETRY_OF, WARM_START
from sparsealloc.storage.optuna_adapter import backend_of, trials_with_heartbeat, storage_of, trial_id_of


class BudgetLock:
    """Cross-process lock on one study (PostgreSQL advisory lock; in-process lock elsewhere)."""

    def __init__(self, study: optuna.Study) -> None:
        self.engine = getattr(backend_of(study), "engine", None)
        self.key = zlib.crc32(f"sparsealloc:{study.study_name}".encode()) & 0x7FFFFFFF
        self._local = threading.Lock()

    @property
    def distributed(self) -> bool:
        return self.engine is not None and self.engine.dialect.name == "postgresql"

    @contextmanager
    def hold(self) -> Iterator[None]:
        with self._local:
            if not self.distributed:
                yield
                return
            with self.engine.connect() as conn:
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
                try:
                    yield
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
                    conn.commit()


class Heartbeat:
    """Background heartbeats for in-flight trial ids (only when the storage has heartbeats on)."""

    def __init__(self, study: optuna.Study) -> None:
        self.storage = storage_of(study)
        interval = self.storage.get_heartbeat_interval() if hasattr(self.storage, "get_heartbeat_interval") else None
        self.interval = interval
        self.trial_ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        if interval:
            self._thread = threading.Thread(target=self._run, daemon=True, name="sparsealloc-heartbeat")
            self._thread.start()

    def add(self, trial_id: int) -> None:
        if self.interval:
            self.storage.record_heartbeat(trial_id)  # a trial with no heartbeat is never stale
            with self._lock:
                self.trial_ids.add(trial_id)

    def discard(self, trial_id: int) -> None:
        with self._lock:
            self.trial_ids.discard(trial_id)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                ids = list(self.trial_ids)
            for trial_id in ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception:  # noqa: BLE001 - a finished trial or a passing DB hiccup
                    self.discard(trial_id)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def sweep_stale(study: optuna.Study) -> None:
    """Fail trials whose heartbeat is older than the grace period (no-op without heartbeats).

    Also fails trials that never recorded a heartbeat and started longer than the grace period
    ago: an orchestrator killed between creating a trial and its first heartbeat leaves such a
    trial, which Optuna alone never considers stale (and a resumed study would wait for forever).
    """
    interval = getattr(storage_of(study), "get_heartbeat_interval", lambda: None)()
    if interval:
        optuna.storages.fail_stale_trials(study)
        fail_silent_trials(study, interval)


def fail_silent_trials(study: optuna.Study, interval: float) -> list[int]:
    """Fail RUNNING trials without any heartbeat that started more than the grace period ago and
    re-queue their parameters (``retry_of``, as :func:`~sparsealloc.storage.rdb.recover_orphans`
    does); returns their numbers."""
    storage, backend = storage_of(study), backend_of(study)
    engine = getattr(backend, "engine", None)
    if engine is None:
        return []
    grace = getattr(backend, "grace_period", None) or 2 * interval
    cutoff = datetime.datetime.now() - datetime.timedelta(seconds=grace)
    running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
               if t.datetime_start is not None and t.datetime_start < cutoff]
    if not running:
        return []
    beating = trials_with_heartbeat(engine)
    failed = []
    for trial in running:
        if trial_id_of(trial) in beating:
            continue  # Optuna's own sweep judges those
        try:
            storage.set_trial_user_attr(trial_id_of(trial), FAIL_REASON,
                                        "orphaned: its orchestrator stopped before the first heartbeat")
            if not storage.set_trial_state_values(trial_id_of(trial), state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:  # another orchestrator finished it meanwhile
            continue
        failed.append(trial.number)
        requeue(study, trial)
    return failed


def requeue(study: optuna.Study, trial: optuna.trial.FrozenTrial, once: bool = False) -> int | None:
    """Queue ``trial``'s parameters as a new WAITING trial marked ``retry_of`` (its warm-start name
    and generation kept).

    Args:
        study: The study.
        trial: The failed trial.
        once: Do not re-queue a trial that is itself a retry (a worker that died twice on the same
            parameters). Trials orphaned by a stopped orchestrator are always re-queued.

    Returns:
        The number of the trial retried, or None when it was not re-queued.
    """
    if once and RETRY_OF in trial.user_attrs:
        return None
    kept = {k: v for k, v in trial.user_attrs.items() if k in (WARM_START, GENERATION)}
    study.enqueue_trial(dict(trial.params), user_attrs={RETRY_OF: trial.number, **kept})
    return trial.number
