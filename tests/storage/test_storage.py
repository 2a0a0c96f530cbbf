"""The study store: URLs, SQLite pragmas, clear errors, and PostgreSQL (marked ``postgres``).

The PostgreSQL tests use the server at 127.0.0.1:5432, database ``test`` (trust auth, user
``postgres`` or ``root``), and skip with the reason when none answers. They create studies with
unique names and delete them afterwards.
"""

from __future__ import annotations

import sqlite3
import uuid

import optuna
import pytest
from optuna.trial import TrialState

from sparsealloc.core.errors import SpecError, StorageError
from sparsealloc.core.plan import AllocationPlan
from sparsealloc.core.types import Outcome
from sparsealloc.search.dispatch.local import LocalDispatcher
from sparsealloc.search.orchestrator import run_study
from sparsealloc.search.session import open_sampler, stored_spec
from sparsealloc.spaces.space import SearchSpace
from sparsealloc.spaces.spec import KVSpec, StudySpec
from sparsealloc.storage.export import export_study
from sparsealloc.storage.optuna_adapter import best_single_value
from sparsealloc.storage.rdb import (create_or_load_study, load_study, open_storage, parse_storage_url,
                                     recover_orphans, redact, study_names)

optuna.logging.set_verbosity(optuna.logging.WARNING)

PG_HOST, PG_PORT, PG_DATABASE, PG_USERS = "127.0.0.1", 5432, "test", ("postgres", "root")


@pytest.fixture(scope="module")
def layout(layout_builder):
    return layout_builder(4, {"self_attn.v_proj": 2048, "mlp.gate_proj": 8192})


def make_spec(name: str, sampler: str = "random", n_obj: int = 1) -> StudySpec:
    objectives = ("reconstruction", "kv_bytes")[:n_obj]
    return StudySpec(name=name, target_sparsity=0.55, space=("layerwise", "kv"), objectives=objectives,
                     sampler=sampler, population_size=4, seed=0, kv=KVSpec(bits=(4, 8, 16), separate_kv=False))


def evaluator(space: SearchSpace, n_obj: int):
    def score(params) -> Outcome:
        decoded = space.decode(params)
        ratios = list(decoded.sparsity.values())
        mean = sum(ratios) / len(ratios)
        bits = [kv["k"] for kv in decoded.kv_bits.values()]
        values = (sum((r - mean) ** 2 for r in ratios) + sum(1 / b for b in bits), sum(bits) / 64)
        return Outcome("complete", values=values[:n_obj], attrs={"plan": decoded.to_plan().to_dict()})

    return score


# ----------------------------------------------------------------------------------- SQLite
def test_open_storage_turns_on_wal_for_sqlite(tmp_path):
    path = tmp_path / "store.db"
    storage = open_storage(f"sqlite:///{path}")
    create_or_load_study(storage, "wal-check", ["minimize"])
    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with storage.engine.connect() as con:
        assert con.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert con.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL, per connection


def test_a_bare_db_path_is_a_sqlite_url(tmp_path):
    path = tmp_path / "bare.db"
    assert parse_storage_url("studies.db") == "sqlite:///studies.db"
    open_storage(str(path))
    assert path.exists()


@pytest.mark.parametrize("url", ["", "   ", "foo", "http://x", "mongodb://host/db", "studies.txt", None, 42])
def test_bad_urls_are_spec_errors(url):
    with pytest.raises(SpecError, match="storage URL|sqlite, postgresql or mysql"):
        open_storage(url)


def test_a_sqlite_file_in_a_missing_directory_is_a_storage_error(tmp_path):
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(StorageError, match="existing directory") as info:
        open_storage(f"sqlite:///{missing / 'store.db'}")
    assert str(missing) in str(info.value)
    assert not missing.exists()


def test_an_unreachable_server_is_a_storage_error():
    with pytest.raises(StorageError, match="cannot open the study store") as info:
        open_storage("postgresql+psycopg2://someone:hunter2@127.0.0.1:1/none")
    assert "hunter2" not in str(info.value)  # the password is redacted


def test_redact_hides_the_password():
    assert "s3cret" not in redact("postgresql+psycopg2://user:s3cret@db.example/test")
    assert redact("sqlite:///a.db") == "sqlite:///a.db"


def test_load_study_of_an_unknown_name_lists_the_stored_names(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'store.db'}")
    with pytest.raises(StorageError, match="no studies"):
        load_study(storage, "anything")
    create_or_load_study(storage, "alpha", ["minimize"])
    create_or_load_study(storage, "beta", ["minimize", "minimize"])
    with pytest.raises(StorageError) as info:
        load_study(storage, "gamma")
    message = str(info.value)
    assert "'gamma'" in message and "alpha" in message and "beta" in message
    assert load_study(storage, "beta").study_name == "beta"
    assert study_names(storage) == ["alpha", "beta"]


def test_a_stored_study_keeps_its_directions_and_its_spec(tmp_path, layout):
    storage = open_storage(f"sqlite:///{tmp_path / 'store.db'}")
    create_or_load_study(storage, "two", ["minimize", "minimize"])
    with pytest.raises(SpecError, match="2 objective"):
        create_or_load_study(storage, "two", ["minimize"])
    spec = make_spec("spec-check")
    space = SearchSpace(spec, layout)
    open_sampler(spec, storage, space)
    assert stored_spec(storage, "spec-check") == spec
    open_sampler(spec.override(trials=99), storage, space)  # the budget is not part of the identity
    other = spec.override(target_sparsity=0.6)
    with pytest.raises(SpecError, match="different spec"):
        open_sampler(other, storage, SearchSpace(other, layout))


def check_best_single_value(storage, names: tuple[str, str]) -> None:
    """The best COMPLETE value by the store's aggregate equals the trial list's, for both directions
    and with infinities; RUNNING, PRUNED and FAILED trials do not count."""
    for name, (direction, finite_best, inf_best) in zip(
            names, (("minimize", -2.5, float("-inf")), ("maximize", 7.0, float("inf"))), strict=True):
        study = optuna.create_study(storage=storage, study_name=name, direction=direction)
        assert best_single_value(study) is None
        for value in (3.0, -2.5, 7.0):
            study.tell(study.ask(), value)
        running = study.ask()
        study.tell(study.ask(), state=TrialState.PRUNED)
        study.tell(study.ask(), state=TrialState.FAIL)
        assert best_single_value(study) == finite_best == study.best_value
        study.tell(study.ask(), -inf_best)  # the worst infinity changes nothing
        assert best_single_value(study) == finite_best
        study.tell(study.ask(), inf_best)
        assert best_single_value(study) == inf_best == study.best_value
        study.tell(running, 1.0)


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
def test_best_single_value_matches_the_trial_list(tmp_path, kind):
    storage = open_storage(f"sqlite:///{tmp_path / 'best.db'}") if kind == "sqlite" else optuna.storages.InMemoryStorage()
    check_best_single_value(storage, ("best-min", "best-max"))


# ----------------------------------------------------------------------------------- PostgreSQL
@pytest.fixture(scope="module")
def pg_url() -> str:
    try:
        import psycopg2
    except ImportError:
        pytest.skip("psycopg2 is not installed (pip install 'sparsealloc[postgres]')")
    errors = []
    for user in PG_USERS:
        try:
            psycopg2.connect(host=PG_HOST, port=PG_PORT, user=user, dbname=PG_DATABASE, connect_timeout=3).close()
        except psycopg2.Error as exc:
            errors.append(f"user {user}: {' '.join(str(exc).split())[:120]}")
            continue
        return f"postgresql+psycopg2://{user}@{PG_HOST}:{PG_PORT}/{PG_DATABASE}"
    pytest.skip(f"no PostgreSQL server answers at {PG_HOST}:{PG_PORT} (database {PG_DATABASE!r}): {'; '.join(errors)}")


@pytest.fixture
def pg_names(pg_url):
    """Unique study names, deleted from the server after the test."""
    names: list[str] = []

    def new(prefix: str) -> str:
        names.append(f"sparsealloc-test-{prefix}-{uuid.uuid4().hex[:10]}")
        return names[-1]

    yield new
    storage = open_storage(pg_url)
    for name in names:
        if name in study_names(storage):
            optuna.delete_study(study_name=name, storage=storage)
    storage.engine.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize(("sampler_name", "n_obj"), [("tpe", 1), ("nsga3", 2)])
def test_postgres_study_runs_resumes_and_exports(pg_url, pg_names, tmp_path, sampler_name, n_obj, layout):
    spec = make_spec(pg_names(sampler_name), sampler_name, n_obj)
    space = SearchSpace(spec, layout)
    sampler = open_sampler(spec, open_storage(pg_url), space)
    sampler.enqueue(space.defaults(), "uniform")
    run_study(sampler, LocalDispatcher(evaluator(space, n_obj)), n_trials=4)
    orphan = sampler.ask(1)[0]  # left RUNNING, as by a crash
    resumed = open_sampler(spec, open_storage(pg_url), space)
    assert recover_orphans(resumed.study) == [orphan.trial_number]
    run_study(resumed, LocalDispatcher(evaluator(space, n_obj)), n_trials=6)
    study = load_study(open_storage(pg_url), spec.name)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 6
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    assert study.get_trials()[0].user_attrs["warm_start"] == "uniform"
    assert stored_spec(open_storage(pg_url), spec.name) == spec
    paths = export_study(study, tmp_path / "export")
    assert paths and all(AllocationPlan.load(p).provenance["study"] == spec.name for p in paths)
    assert (paths[0].parent.name == "pareto") == (n_obj == 2)


@pytest.mark.postgres
def test_postgres_load_study_of_an_unknown_name_is_a_storage_error(pg_url, pg_names):
    storage = open_storage(pg_url)
    name = pg_names("known")
    create_or_load_study(storage, name, ["minimize"])
    with pytest.raises(StorageError) as info:
        load_study(storage, name + "-missing")
    assert name in str(info.value)


@pytest.mark.postgres
def test_postgres_best_single_value_matches_the_trial_list(pg_url, pg_names):
    check_best_single_value(open_storage(pg_url), (pg_names("best-min"), pg_names("best-max")))
