"""Every use of Optuna's and pymoo's private internals, in one place.

Checked against Optuna 5.1.0 and pymoo 0.6.2; pyproject.toml bounds them (``optuna<6``,
``pymoo<0.7``). After an upgrade, check this module first. Optuna has no public way to write a
trial's attributes by trial number outside ``Trial`` objects, which the orchestrator (writing
outcomes that come back from workers) needs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optuna
from sqlalchemy import text


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The study's storage (``Study._storage``; Optuna may wrap an RDB store in a cache)."""
    return study._storage


def backend_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage without Optuna's ``_CachedStorage`` wrapper (``._backend``): the RDBStorage itself."""
    storage = study._storage
    return getattr(storage, "_backend", storage)


def trial_id_of(trial: optuna.Trial | optuna.trial.FrozenTrial) -> int:
    """The storage id of a trial (``Trial._trial_id``, ``FrozenTrial._trial_id``)."""
    return trial._trial_id


def trial_id(study: optuna.Study, number: int) -> int:
    """The storage id of the study's trial ``number`` (``Study._study_id``)."""
    return study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)


def set_trial_user_attr(study: optuna.Study, trial_id: int, key: str, value: Any) -> None:
    """Write a user attribute of any trial (``Study.tell`` would refuse a finished one too)."""
    study._storage.set_trial_user_attr(trial_id, key, value)


def trials_with_heartbeat(engine) -> set[int]:
    """Ids of trials with a recorded heartbeat (Optuna's table ``trial_heartbeats``)."""
    with engine.connect() as conn:
        return {row[0] for row in conn.execute(text("SELECT trial_id FROM trial_heartbeats"))}


def pymoo_repair(fn: Callable[[Any], Any]):
    """A pymoo ``Repair`` that returns ``fn(X)`` (pymoo's hook to override is the protected ``_do``)."""
    from pymoo.core.repair import Repair  # optional dependency (sparsealloc[nsga])

    class FunctionRepair(Repair):
        def _do(self, problem, X, **kwargs):
            return fn(X)

    return FunctionRepair()
