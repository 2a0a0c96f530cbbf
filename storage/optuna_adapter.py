"""Every use of Optuna's and pymoo's private internals, in one place.

Checked against Optuna 5.1.0 and pymoo 0.6.2; pyproject.toml bounds them (``optuna<6``,
``pymoo<0.7``). After an upgrade, check this module first. Optuna has no public way to write a
trial's attributes by trial number outside ``Trial`` objects, which the orchestrator (writing
outcomes that come back from workers) needs. Public APIs Optuna marks experimental are called
inside :func:`experimental_api`.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import optuna
from sqlalchemy import insert, text


@contextlib.contextmanager
def experimental_api() -> Iterator[None]:
    """Calls of Optuna APIs marked experimental (RDB heartbeats, ``set_metric_names``), without the
    ExperimentalWarning each would print."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


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


def count_trials(study: optuna.Study, *states: optuna.trial.TrialState) -> int:
    """Trials of the study in ``states``, counted by the database for RDB stores.

    ``Study.get_trials`` re-reads every unfinished trial with all its parameters on each call (the
    cache keeps only finished ones): with an evo generation's staged trials (210 parameters each)
    that was 75 ms per call. A ``count(*)`` on Optuna's ``trials`` table (state stored by enum name)
    costs a fraction of a millisecond; other stores count their trial list.
    """
    backend = backend_of(study)
    engine = getattr(backend, "engine", None)
    if engine is None:
        return len(study.get_trials(deepcopy=False, states=states))
    names = {f"s{i}": state.name for i, state in enumerate(states)}
    query = text(f"SELECT count(*) FROM trials WHERE study_id = :study AND state IN "
                 f"({', '.join(':' + k for k in names)})")
    with engine.connect() as conn:
        return int(conn.execute(query, {"study": study._study_id, **names}).scalar_one())


def best_single_value(study: optuna.Study) -> float | None:
    """The best value of a single-objective study's COMPLETE trials (None: none yet).

    For RDB stores one aggregate over Optuna's ``trial_values`` table (finite values in ``value``,
    infinities as NULL with ``value_type`` INF_POS / INF_NEG) instead of ``Study.get_trials``, which
    re-reads every RUNNING trial with all its parameters: called after every told outcome for the
    progress line, that read took 12% of an evo study's loop at Wanda 70% on SmolLM2 (py-spy, 150 s
    study, SQLite).
    """
    minimize = study.direction == optuna.study.StudyDirection.MINIMIZE
    engine = getattr(backend_of(study), "engine", None)
    if engine is None:
        values = [t.values[0] for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
        return (min(values) if minimize else max(values)) if values else None
    query = text(
        "SELECT min(CASE WHEN v.value_type = 'FINITE' THEN v.value END), "
        "max(CASE WHEN v.value_type = 'FINITE' THEN v.value END), "
        "sum(CASE WHEN v.value_type = 'INF_NEG' THEN 1 ELSE 0 END), "
        "sum(CASE WHEN v.value_type = 'INF_POS' THEN 1 ELSE 0 END), count(*) "
        "FROM trial_values v JOIN trials t ON v.trial_id = t.trial_id "
        "WHERE t.study_id = :study AND t.state = 'COMPLETE' AND v.objective = 0")
    with engine.connect() as conn:
        lowest, highest, neg_inf, pos_inf, n = conn.execute(query, {"study": study._study_id}).one()
    if not n:
        return None
    if minimize:
        return -math.inf if neg_inf else float(lowest) if lowest is not None else math.inf
    return math.inf if pos_inf else float(highest) if highest is not None else -math.inf


def create_running_trial(study: optuna.Study, params: dict[str, Any],
                         distributions: dict[str, optuna.distributions.BaseDistribution],
                         user_attrs: dict[str, Any]) -> tuple[int, int]:
    """A RUNNING trial with these parameters and attributes, written in one transaction.

    ``Study.ask`` writes each suggested parameter in its own transaction, and even a template trial
    (``BaseStorage.create_new_trial``) costs two queries per parameter in RDBStorage
    (``_set_trial_param_without_commit`` looks the trial up and checks the parameter's earlier
    distribution): 0.32 s per trial for a per-Linear SmolLM2 genome (210 parameters) on SQLite.
    Here, for RDB stores, the parameters of the template are inserted in the same transaction by one
    multi-row INSERT, without those two queries (the caller's distributions are the study's fixed
    ones, so there is nothing to check), and the new trial's number is read from Optuna's cache
    instead of reading the trial back with all its parameters (benchmarks/trial_reuse.md: 15 ms per
    210-parameter trial on SQLite, against 243 ms through Optuna's template path).
    Returns ``(number, trial_id)``.
    """
    import datetime

    storage, backend = study._storage, backend_of(study)
    template = optuna.trial.FrozenTrial(
        number=-1, state=optuna.trial.TrialState.RUNNING, value=None, values=None,
        datetime_start=datetime.datetime.now(), datetime_complete=None, params=dict(params),
        distributions={k: distributions[k] for k in params}, user_attrs=dict(user_attrs), system_attrs={},
        intermediate_values={}, trial_id=-1)
    if hasattr(backend, "_set_trial_param_without_commit") and hasattr(backend, "engine"):
        from optuna.distributions import distribution_to_json
        from optuna.storages._rdb import models

        json_of: dict[int, str] = {}
        rows: list[dict[str, Any]] = []

        def add_param(session, trial_id, param_name, param_value_internal, distribution,
                      previous_distribution=None):
            text_ = json_of.setdefault(id(distribution), distribution_to_json(distribution))
            rows.append({"trial_id": trial_id, "param_name": param_name, "param_value": param_value_internal,
                         "distribution_json": text_})
            if len(rows) == len(params):  # the last one: all rows in one statement
                session.execute(insert(models.TrialParamModel), rows)

        backend._set_trial_param_without_commit = add_param  # instance attribute: this call only
        try:
            trial_id = storage.create_new_trial(study._study_id, template_trial=template)
        finally:
            del backend._set_trial_param_without_commit
    else:
        trial_id = storage.create_new_trial(study._study_id, template_trial=template)
    cached = getattr(storage, "_trial_id_to_study_id_and_number", {}).get(trial_id)  # _CachedStorage's map
    return (cached[1] if cached is not None else storage.get_trial_number_from_id(trial_id)), trial_id


def set_trial_user_attr(study: optuna.Study, trial_id: int, key: str, value: Any) -> None:
    """Write a user attribute of any trial (``Study.tell`` would refuse a finished one too)."""
    study._storage.set_trial_user_attr(trial_id, key, value)


def set_trial_user_attrs(study: optuna.Study, trial_id: int, attrs: dict[str, Any],
                         intermediate: tuple[tuple[int, float], ...] = ()) -> None:
    """Write user attributes and intermediate values of an unfinished trial in one transaction.

    ``set_trial_user_attr`` commits each attribute on its own (3 to 5 ms each on SQLite; a trial's
    outcome carries half a dozen). For RDB stores they go through RDBStorage's
    ``_set_trial_attr_without_commit`` / ``_set_trial_intermediate_value_without_commit`` inside one
    scoped session; other stores write them one by one.
    """
    backend = backend_of(study)
    if not attrs and not intermediate:
        return
    if not (hasattr(backend, "scoped_session") and hasattr(backend, "_set_trial_attr_without_commit")):
        for key, value in attrs.items():
            study._storage.set_trial_user_attr(trial_id, key, value)
        for step, value in intermediate:
            study._storage.set_trial_intermediate_value(trial_id, step, value)
        return
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(backend.scoped_session, True) as session:
        for key, value in attrs.items():
            backend._set_trial_attr_without_commit(session, models.TrialUserAttributeModel, trial_id, key, value)
        for step, value in intermediate:
            backend._set_trial_intermediate_value_without_commit(session, trial_id, step, value)


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
