"""The study store: Optuna RDB storage from a URL (SQLite in WAL mode by default, PostgreSQL).

The orchestrator is the single writer. SQLite gets ``journal_mode=WAL`` and
``synchronous=NORMAL`` (≈15× faster per trial than the default, and dashboard readers never block
the writer); PostgreSQL gets ``pool_pre_ping``. SQLAlchemy errors are translated into
:class:`~sparsealloc.core.errors.StorageError` here and nowhere else.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from sparsealloc.core.errors import SpecError, StorageError

DEFAULT_STORAGE = "sqlite:///sparsealloc.db"


def _sqlite_path(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def parse_storage_url(url: str) -> str:
    """Validate a storage URL (sqlite:///file.db, postgresql+psycopg2://...) or a bare .db path."""
    if not isinstance(url, str) or not url.strip():
        raise SpecError(f"expected a storage URL such as sqlite:///study.db, but got {url!r}")
    if "://" not in url:
        if url.endswith((".db", ".sqlite", ".sqlite3")):
            return f"sqlite:///{url}"
        raise SpecError(f"expected a storage URL such as sqlite:///study.db or postgresql://host/db, but got {url!r}")
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise SpecError(f"expected a storage URL such as sqlite:///study.db, but got {url!r}") from None
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql", "mysql"):
        raise SpecError(f"expected a sqlite, postgresql or mysql storage URL, but got backend {backend!r}")
    return url


def open_storage(url: str = DEFAULT_STORAGE, create: bool = True,
                 heartbeat_interval: int | None = None) -> optuna.storages.RDBStorage:
    """Open (and with ``create``, create if needed) the store at ``url``.

    Commands that only read or continue studies pass ``create=False``, so a mistyped SQLite path
    fails instead of leaving an empty database behind. With ``heartbeat_interval`` (seconds),
    trials whose orchestrator stops beating for 4 intervals are failed and re-queued once
    (see :mod:`sparsealloc.storage.coordination`).

    Raises:
        SpecError: malformed URL.
        StorageError: the database cannot be reached or created.
    """
    url = parse_storage_url(url)
    engine_kwargs: dict[str, Any] = {}
    path = _sqlite_path(url)
    try:
        if path is not None:
            if not create and not path.is_file():
                raise StorageError(f"expected an existing SQLite study store, but {str(path)!r} does not exist")
            if not path.parent.exists():
                raise StorageError(f"expected an existing directory for the SQLite store, but {str(path.parent)!r} does not exist")
            con = sqlite3.connect(path)
            con.execute("PRAGMA journal_mode=WAL")  # persists in the file
            con.close()
            engine_kwargs["connect_args"] = {"timeout": 30}
        elif url.startswith("postgresql"):
            engine_kwargs.update(pool_size=4, max_overflow=4, pool_pre_ping=True, pool_recycle=1800,
                                 connect_args={"connect_timeout": 10})
        heartbeat = {}
        if heartbeat_interval:
            heartbeat = {"heartbeat_interval": heartbeat_interval, "grace_period": 4 * heartbeat_interval,
                         "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)}
        storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)
    except (SQLAlchemyError, sqlite3.Error, ImportError) as exc:
        raise StorageError(f"cannot open the study store {redact(url)}: {_first_line(exc)}") from None
    if path is not None:
        @event.listens_for(storage.engine, "connect")
        def _pragmas(dbapi_con, _record) -> None:  # per-connection setting
            dbapi_con.execute("PRAGMA synchronous=NORMAL")

        storage.engine.dispose()
    return storage


def redact(url: str) -> str:
    """The URL with any password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def create_or_load_study(storage: optuna.storages.BaseStorage, name: str, directions: Sequence[str],
                         sampler: optuna.samplers.BaseSampler | None = None, pruner=None) -> optuna.Study:
    """Create study ``name`` or load it (``load_if_exists``); directions must match a stored study."""
    try:
        study = optuna.create_study(study_name=name, storage=storage, directions=list(directions),
                                    sampler=sampler, pruner=pruner, load_if_exists=True)
    except SQLAlchemyError as exc:
        raise StorageError(f"cannot create study {name!r}: {_first_line(exc)}") from None
    stored = [d.name.lower() for d in study.directions]
    if stored != [d.lower() for d in directions]:
        raise SpecError(f"study {name!r} exists with {len(stored)} objective(s) {stored}, but this run asks for {list(directions)}")
    return study


def load_study(storage: optuna.storages.BaseStorage, name: str, sampler=None, pruner=None) -> optuna.Study:
    """Load an existing study; a clear error listing the stored names if it is not there."""
    names = study_names(storage)
    if name not in names:
        raise StorageError(f"no study named {name!r} in the store; it holds: {', '.join(names) or 'no studies'}")
    return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)


def study_names(storage: optuna.storages.BaseStorage) -> list[str]:
    """Names of all studies in the store."""
    try:
        return [s.study_name for s in storage.get_all_studies()]
    except SQLAlchemyError as exc:
        raise StorageError(f"cannot read the study store: {_first_line(exc)}") from None


def recover_orphans(study: optuna.Study) -> list[int]:
    """Fail RUNNING trials left by a dead orchestrator and re-queue their parameters.

    Returns:
        Numbers of the trials that were failed.
    """
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", "orphaned: orchestrator stopped mid-trial")
        study.tell(trial.number, state=TrialState.FAIL)
        study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number, **{
            k: v for k, v in trial.user_attrs.items() if k in ("warm_start", "generation")}})
        failed.append(trial.number)
    return failed
