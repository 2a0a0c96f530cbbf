"""The study store: Optuna RDB storage from a URL (SQLite in WAL mode by default, PostgreSQL).

The orchestrator is the single writer. SQLite gets ``journal_mode=WAL`` and
``synchronous=NORMAL`` (≈15× faster per trial than the default, and dashboard readers never block
the writer); PostgreSQL gets ``pool_pre_ping``. SQLAlchemy errors are translated into
:class:`~sparsealloc.core.errors.StorageError` here and nowhere else.
"""

from __future__ import annotations

import functools
import os
import re
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from sparsealloc.core.errors import SpecError, StorageError
from sparsealloc.core.keys import DEFAULT_STORAGE, FAIL_REASON
from sparsealloc.storage.coordination import requeue
from sparsealloc.storage.optuna_adapter import experimental_api, set_trial_user_attr, trial_id_of

#: How SQLite URLs are written, for messages.
SQLITE_FORMS = "sqlite:///relative.db or sqlite:////absolute.db"
DRIVER_HINTS = {
    "postgresql": "use postgresql+psycopg2://user@host:5432/db and pip install 'sparsealloc[postgres]'",
    "mysql": "install a MySQL driver, e.g. pip install pymysql, and use mysql+pymysql://user@host/db",
}


def _sqlite_path(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def parse_storage_url(url: str) -> str:
    """Validate a storage URL (sqlite:///file.db, postgresql+psycopg2://...) or a bare .db path.

    In-memory SQLite (``sqlite://``) is refused: a study there is lost when the command ends.
    """
    if not isinstance(url, str) or not url.strip():
        raise SpecError(f"expected a storage URL such as sqlite:///study.db, but got {url!r}")
    if url.lower().startswith("sqlite:") and "://" not in url:  # sqlite:/runs/s.db, sqlite:s.db
        raise SpecError(f"expected a SQLite URL such as {SQLITE_FORMS}, but got {url!r}, which names no existing "
                        f"file (a SQLite URL has three slashes after 'sqlite:', four for an absolute path)")
    if "://" not in url:
        if url.endswith((".db", ".sqlite", ".sqlite3")):
            return f"sqlite:///{url}"
        raise SpecError(f"expected a storage URL such as sqlite:///study.db or postgresql://host/db, but got {url!r}")
    try:
        parsed = make_url(url)
        port = parsed.port
    except (ArgumentError, ValueError):
        raise SpecError(f"expected a storage URL such as sqlite:///study.db or "
                        f"postgresql://user@host:5432/db, but got {redact(url)!r}") from None
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql", "mysql"):
        raise SpecError(f"expected a sqlite, postgresql or mysql storage URL, but got backend {backend!r}")
    if port is not None and not 0 < port < 65536:
        raise SpecError(f"expected a port in 1..65535 in the storage URL, but got {port}")
    if backend == "sqlite" and (not parsed.database or parsed.database == ":memory:"):
        raise SpecError(f"expected a SQLite file such as sqlite:///study.db, but got the in-memory database {url!r} "
                        f"(a study there is lost when the command ends)")
    if backend == "sqlite" and parsed.host:  # sqlite://runs/s.db would silently mean ./s.db
        raise SpecError(f"expected a SQLite URL such as {SQLITE_FORMS}, but got {url!r}, where {parsed.host!r} "
                        f"reads as a host name (a SQLite URL has three slashes after 'sqlite:', four for an "
                        f"absolute path)")
    return url


def _path_hint(path: Path) -> str:
    """For a relative SQLite path: where it points, and how an absolute one is written."""
    if path.is_absolute():
        return ""
    return f" (sqlite:///{path} is relative to {os.getcwd()}; an absolute path takes four slashes: sqlite:////path)"


@dataclass(frozen=True)
class StoreInfo:
    """What :func:`probe_storage` found at a store URL, read without writing anything.

    Attributes:
        url: The URL, password hidden.
        backend: "sqlite", "postgresql" or "mysql".
        exists: The database exists (SQLite: the file; servers: the connection succeeded).
        has_schema: It holds Optuna's tables.
        schema_version: Its Optuna schema revision (alembic), None without tables.
        head_version: The revision this Optuna expects.
        known_versions: Every revision this Optuna can upgrade from.
        n_studies: Studies stored, None without tables.
    """

    url: str
    backend: str
    exists: bool
    has_schema: bool = False
    schema_version: str | None = None
    head_version: str | None = None
    known_versions: tuple[str, ...] = ()
    n_studies: int | None = None

    @property
    def compatible(self) -> bool:
        """No tables yet, or tables of exactly this Optuna's schema."""
        return not self.has_schema or self.schema_version == self.head_version

    def schema_problem(self) -> str | None:
        """What to do about an incompatible schema, or None."""
        if self.compatible:
            return None
        if self.schema_version in self.known_versions:
            return (f"the store {self.url} has Optuna schema {self.schema_version!r}, this Optuna "
                    f"{optuna.__version__} expects {self.head_version!r}; upgrade it with: "
                    f"optuna storage upgrade --storage URL")
        return (f"the store {self.url} has Optuna schema {self.schema_version!r}, which this Optuna "
                f"{optuna.__version__} does not know; upgrade Optuna: pip install -U optuna")


@functools.lru_cache(maxsize=1)
def _optuna_versions() -> tuple[str, tuple[str, ...]]:
    """(head revision, all revisions) of this Optuna's storage schema, from an in-memory store."""
    memory = optuna.storages.RDBStorage("sqlite:///:memory:")
    try:
        return memory.get_head_version(), tuple(memory.get_all_versions())
    finally:
        memory.engine.dispose()


def probe_storage(url: str, timeout: int = 10) -> StoreInfo:
    """Reach the store at ``url`` and read its schema, writing nothing (no file, table or row;
    for a new SQLite file, the folder is tested with a nameless temporary file).

    Args:
        url: Storage URL (see :func:`parse_storage_url`).
        timeout: Seconds to wait for a database server.

    Raises:
        SpecError: malformed URL.
        StorageError: the server does not answer, the file is not a SQLite database, or the
            SQLite folder is missing or read-only.
    """
    url = parse_storage_url(url)
    shown = redact(url)
    backend = make_url(url).get_backend_name()
    path = _sqlite_path(url)
    if path is not None:
        if not path.exists():
            _check_sqlite_folder(path)
            return StoreInfo(shown, backend, exists=False)
        if not path.is_file():
            raise StorageError(f"expected a SQLite file for the study store, but {str(path)!r} is a directory")
        _check_sqlite_folder(path)  # WAL keeps -wal and -shm files beside the store, readers too
        engine = create_engine("sqlite://", creator=lambda: sqlite3.connect(f"file:{path}?mode=ro", uri=True))
    else:
        try:
            engine = create_engine(url, connect_args={"connect_timeout": timeout} if backend == "postgresql" else {})
        except ImportError as exc:
            hint = DRIVER_HINTS.get(backend, "install the database driver the URL names")
            raise StorageError(f"cannot open the study store {shown}: its database driver is not installed "
                               f"({_first_line(exc)}); {hint}") from None
    try:
        with engine.connect() as con:
            tables = set(inspect(con).get_table_names())
            if not {"studies", "alembic_version"} <= tables:
                return StoreInfo(shown, backend, exists=True)
            version = con.execute(text("SELECT version_num FROM alembic_version")).scalar()
            n_studies = con.execute(text("SELECT COUNT(*) FROM studies")).scalar()
    except (SQLAlchemyError, sqlite3.Error) as exc:
        raise StorageError(f"cannot open the study store {shown}: {_db_message(exc)}") from None
    finally:
        engine.dispose()
    head, known = _optuna_versions()
    return StoreInfo(shown, backend, exists=True, has_schema=True, schema_version=version, head_version=head,
                     known_versions=known, n_studies=int(n_studies or 0))


def _check_sqlite_folder(path: Path) -> None:
    folder = path.parent
    if not folder.exists():
        raise StorageError(f"expected an existing directory for the SQLite store, but {str(folder)!r} does not "
                           f"exist{_path_hint(path)}")
    if not folder.is_dir():
        raise StorageError(f"expected a directory for the SQLite store, but {str(folder)!r} is a file")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise StorageError(f"expected a writable directory for the SQLite store, but {str(folder)!r} is read-only "
                           f"(in WAL mode SQLite keeps -wal and -shm files beside the store, for readers too)")
    try:  # permissions can lie (root, read-only mounts, /proc): try a nameless temporary file
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise StorageError(f"expected a writable directory for the SQLite store, but {str(folder)!r} "
                           f"refused a new file: {exc.strerror}") from None


def check_storage(url: str, create: bool = True) -> StoreInfo:
    """What :func:`open_storage` checks before it writes anything: the store can be reached, holds
    Optuna's tables of this version (or none yet, with ``create``). Writes nothing.

    Raises:
        SpecError: malformed URL.
        StorageError: as :func:`open_storage`.
    """
    url = parse_storage_url(url)
    path = _sqlite_path(url)
    if not create and path is not None and not path.is_file():
        raise StorageError(f"expected an existing SQLite study store, but {str(path)!r} does not exist"
                           f"{_path_hint(path)}")
    info = probe_storage(url)
    if create and path is not None and info.exists and not os.access(path, os.W_OK):
        raise StorageError(f"expected a writable SQLite study store, but {str(path)!r} is read-only")
    if not create and not info.has_schema:
        raise StorageError(f"expected a study store, but {info.url} holds no Optuna tables")
    problem = info.schema_problem()
    if problem:
        raise StorageError(problem)
    return info


def postgres_connect_args() -> dict[str, Any]:
    """psycopg2 connection arguments: a 10 s connect timeout and ``synchronous_commit=off``.

    Optuna commits every parameter of a trial on its own, so a trial costs dozens of commits, each
    waiting for the server's WAL flush by default (≈1.4 s per 30-parameter trial measured on a busy
    2-core machine, 0.4 s without the wait: ``benchmarks/throughput.md``). With
    ``synchronous_commit=off`` a commit returns before the flush: a crash of the *server* can lose
    the last fraction of a second of commits, whole transactions only, never a partial trial; a
    killed orchestrator loses nothing it committed. ``SPARSEALLOC_PG_SYNCHRONOUS_COMMIT=on`` restores
    the server's default.
    """
    args: dict[str, Any] = {"connect_timeout": 10}
    mode = os.environ.get("SPARSEALLOC_PG_SYNCHRONOUS_COMMIT", "off").strip().lower()
    if mode not in ("on", "off", "local", "remote_write", "remote_apply"):
        raise SpecError(f"expected SPARSEALLOC_PG_SYNCHRONOUS_COMMIT to be on or off, but got {mode!r}")
    args["options"] = f"-c synchronous_commit={mode}"
    return args


def open_storage(url: str = DEFAULT_STORAGE, create: bool = True,
                 heartbeat_interval: int | None = None) -> optuna.storages.RDBStorage:
    """Open (and with ``create``, create if needed) the store at ``url``.

    Commands that only read or continue studies pass ``create=False``, so a mistyped SQLite path
    or a database without Optuna's tables fails instead of being turned into an empty store. A store
    written by another Optuna schema version is never touched: the error says how to upgrade it.
    With ``heartbeat_interval`` (seconds), trials whose orchestrator stops beating for 4 intervals
    are failed and re-queued once (see :mod:`sparsealloc.storage.coordination`).

    Raises:
        SpecError: malformed URL.
        StorageError: the database cannot be reached or created, holds no study store
            (``create=False``), or has an incompatible schema.
    """
    url = parse_storage_url(url)
    check_storage(url, create)
    path = _sqlite_path(url)
    engine_kwargs: dict[str, Any] = {}
    try:
        if path is not None:
            with closing(sqlite3.connect(path)) as con:
                con.execute("PRAGMA journal_mode=WAL")  # persists in the file
            engine_kwargs["connect_args"] = {"timeout": 30}
        elif url.startswith("postgresql"):
            engine_kwargs.update(pool_size=4, max_overflow=4, pool_pre_ping=True, pool_recycle=1800,
                                 connect_args=postgres_connect_args())
        heartbeat = {}
        if heartbeat_interval:
            heartbeat = {"heartbeat_interval": heartbeat_interval, "grace_period": 4 * heartbeat_interval,
                         "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)}
        with experimental_api():  # "heartbeat_interval is an experimental feature"
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)
    except (SQLAlchemyError, sqlite3.Error, ImportError, RuntimeError) as exc:
        raise StorageError(f"cannot open the study store {redact(url)}: {_db_message(exc)}") from None
    if path is not None:
        @event.listens_for(storage.engine, "connect")
        def _pragmas(dbapi_con, _record) -> None:  # per-connection setting
            dbapi_con.execute("PRAGMA synchronous=NORMAL")

        storage.engine.dispose()
    return storage


@contextmanager
def store_errors(url: str, resume_hint: str | None = None) -> Iterator[None]:
    """Turn a failure of the store in the middle of work (disk full, server gone, lock timeout)
    into a one-line :class:`StorageError`.

    Every trial is written in its own transactions, so what was committed before the failure stays
    (a trial cut off mid-write is RUNNING and ``study resume`` redoes it).

    Args:
        url: The store's URL (shown with the password hidden).
        resume_hint: Appended to the message, e.g. the resume command.
    """
    try:
        yield
    except (SQLAlchemyError, sqlite3.Error, optuna.exceptions.StorageInternalError) as exc:
        hint = f"; {resume_hint}" if resume_hint else ""
        raise StorageError(f"the study store {redact(url)} failed: {_db_message(exc)}{hint}") from None


def _db_message(exc: BaseException) -> str:
    """The driver's own words for a database failure (Optuna wraps them in generic messages)."""
    inner: BaseException = exc
    seen = set()
    while id(inner) not in seen:
        seen.add(id(inner))
        nxt = getattr(inner, "orig", None) or inner.__cause__ or inner.__context__
        if nxt is None:
            break
        inner = nxt
    return _first_line(inner)


def redact(url: str) -> str:
    """The URL with any password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


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


def state_counts(study: optuna.Study) -> dict[str, int]:
    """Trials of ``study`` per state name in lower case ("complete", "fail", ...)."""
    return dict(Counter(t.state.name.lower() for t in study.get_trials(deepcopy=False)))


def recover_orphans(study: optuna.Study) -> list[int]:
    """Fail RUNNING trials left by a dead orchestrator and re-queue their parameters.

    Returns:
        Numbers of the trials that were failed.
    """
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        set_trial_user_attr(study, trial_id_of(trial), FAIL_REASON, "orphaned: orchestrator stopped mid-trial")
        study.tell(trial.number, state=TrialState.FAIL)
        requeue(study, trial)
        failed.append(trial.number)
    return failed
