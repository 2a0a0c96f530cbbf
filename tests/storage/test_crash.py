"""Crash safety: ``sparsealloc study run`` killed with SIGKILL while it writes trials, on SQLite (WAL)
and PostgreSQL. After each kill the store opens and passes its integrity check, no finished trial is
partial (every COMPLETE trial has its values, its plan and all its parameters), at most the one
trial in flight is left RUNNING, ``study resume`` fails and redoes it and reaches the budget
exactly, and a second ``resume`` changes nothing.

The kill lands at a seeded random moment shortly after a new trial row appears, so it falls inside
the writes of a trial (parameters, attributes, state) most of the time.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from sparsealloc.cli.main import main
from sparsealloc.storage.coordination import fail_silent_trials
from sparsealloc.storage.rdb import open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)

PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
TRIALS = 8
N_PARAMS = 4 + 2 * 4  # block sparsities + K and V bits of 4 attention layers (tiny Llama)


def run_args(name: str, url: str, model_dir: Path, text: Path, trials: int) -> list[str]:
    return ["--quiet", "study", "run", "--name", name, "--storage", url, "--model", str(model_dir),
            "--calib-text", str(text), "--calib-samples", "4", "--calib-seq-len", "16", "--space", "layerwise,kv",
            "--target-sparsity", "0.5", "--trials", str(trials), "--no-validate", "--device", "cpu"]


def cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def trial_rows(url: str, name: str) -> int:
    """How many trials the study holds (0 while it does not exist); cheap enough to poll."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url.replace("sqlite:///", "sqlite:///file:") + "?mode=ro&uri=true"
                                      if url.startswith("sqlite") else url)
    try:
        with engine.connect() as con:
            return con.execute(sqlalchemy.text(
                "SELECT COUNT(*) FROM trials JOIN studies ON trials.study_id = studies.study_id "
                "WHERE studies.study_name = :n"), {"n": name}).scalar() or 0
    except sqlalchemy.exc.SQLAlchemyError:
        return 0
    finally:
        engine.dispose()


def kill_while_writing(argv: list[str], url: str, name: str, after_trials: int, rng: random.Random) -> str:
    """Start ``sparsealloc ARGV`` and SIGKILL it a random few ms after its trial count passes
    ``after_trials``; returns its stderr. Fails if it ended by itself first."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen([sys.executable, "-P", "-m", "sparsealloc.cli", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None and trial_rows(url, name) <= after_trials:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.04))
        alive = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=60)
    assert alive, f"the study ended before it could be killed (rc={proc.returncode}): {err[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    return err


def check_no_partial_trial(url: str, name: str) -> dict[str, int]:
    """The store opens; every finished trial is whole; at most one trial is left in flight."""
    storage = open_storage(url, create=False)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
        trials = study.get_trials(deepcopy=False)
        counts: dict[str, int] = {}
        for t in trials:
            counts[t.state.name] = counts.get(t.state.name, 0) + 1
            assert t.state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING), t
            if t.state == TrialState.COMPLETE:
                assert t.values is not None and len(t.values) == 1 and t.values[0] >= 0, t
                assert "plan" in t.user_attrs, f"trial {t.number} is COMPLETE without its plan"
                assert len(t.params) == N_PARAMS, f"trial {t.number} is COMPLETE with {len(t.params)} params"
        assert counts.get("RUNNING", 0) <= 1, counts  # one orchestrator, one trial in flight
        assert study.user_attrs["sparsealloc:spec"]["trials"] >= TRIALS  # the spec was written whole
        return counts
    finally:
        storage.engine.dispose()


def check_resumed(url: str, name: str, budget: int) -> None:
    storage = open_storage(url, create=False)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        assert len(complete) == budget, [t.state.name for t in trials]
        assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
        by_number = {t.number: t for t in trials}
        for t in complete:
            assert len(t.params) == N_PARAMS and "plan" in t.user_attrs
            origin = t.user_attrs.get("retry_of", t.system_attrs.get("failed_trial"))
            if origin is not None:  # a redone trial keeps what its orphan had sampled
                orphan = by_number[origin]
                assert orphan.state == TrialState.FAIL
                assert {**t.params, **orphan.params} == dict(t.params)
    finally:
        storage.engine.dispose()


def snapshot(url: str, name: str):
    storage = open_storage(url, create=False)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
        return study.user_attrs, [(t.number, t.state.name, t.values, t.params, t.user_attrs)
                                  for t in study.get_trials(deepcopy=False)]
    finally:
        storage.engine.dispose()


def crash_and_resume(url: str, name: str, model_dir: Path, text: Path, seed: int) -> None:
    rng = random.Random(seed)
    argv = run_args(name, url, model_dir, text, trials=40)
    kill_while_writing(argv, url, name, after_trials=rng.randrange(2, 4), rng=rng)
    check_no_partial_trial(url, name)
    # a resume killed in its turn
    resume = ["--quiet", "study", "resume", name, "--storage", url, "--trials", str(TRIALS), "--no-validate",
              "--device", "cpu"]
    already = trial_rows(url, name)
    kill_while_writing(resume, url, name, after_trials=already, rng=rng)
    check_no_partial_trial(url, name)

    code, out, err = cli(resume)
    assert code == 0, err
    check_resumed(url, name, TRIALS)

    before = snapshot(url, name)
    code, out, err = cli(resume)
    assert code == 0, err
    assert "trials this run: {}" in out
    assert snapshot(url, name) == before  # idempotent


@pytest.mark.slow
def test_sqlite_survives_sigkill_during_trial_writes(tiny_llama_dir, text_file, tmp_path):
    db = tmp_path / "s.db"
    url = f"sqlite:///{db}"
    crash_and_resume(url, "crash", tiny_llama_dir, text_file, seed=0)
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def _pg_reason() -> str | None:
    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(PG_URL, connect_args={"connect_timeout": 3})
        with engine.connect():
            pass
        engine.dispose()
        return None
    except Exception as exc:  # noqa: BLE001
        return f"no PostgreSQL answers at {PG_URL}: {str(exc).strip().splitlines()[0]}"


@pytest.fixture
def pg_study():
    reason = _pg_reason()
    if reason:
        pytest.skip(reason)
    name = f"crash-{uuid.uuid4().hex[:10]}"
    yield name
    with contextlib.suppress(Exception):
        optuna.delete_study(study_name=name, storage=PG_URL)


@pytest.mark.slow
@pytest.mark.postgres
def test_postgresql_survives_sigkill_during_trial_writes(tiny_llama_dir, text_file, pg_study):
    """On PostgreSQL the orphan is failed by the heartbeat sweep (after 4 heartbeat intervals)."""
    crash_and_resume(PG_URL, pg_study, tiny_llama_dir, text_file, seed=1)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_trial_that_never_beat_is_failed_and_requeued(backend, tmp_path, request):
    """A trial created just before its orchestrator died has no heartbeat: Optuna never calls it
    stale; the sweep fails it once it is older than the grace period and queues a retry."""
    if backend == "postgresql":
        reason = _pg_reason()
        if reason:
            pytest.skip(reason)
        url, name = PG_URL, f"silent-{uuid.uuid4().hex[:10]}"
    else:
        url, name = f"sqlite:///{tmp_path / 's.db'}", "silent"
    storage = open_storage(url, heartbeat_interval=1)
    try:
        study = optuna.create_study(study_name=name, storage=storage)
        silent = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        assert fail_silent_trials(study, 1) == []  # young: its orchestrator may be about to beat
        trial_id = silent._trial_id
        with storage.engine.begin() as con:
            import sqlalchemy

            con.execute(sqlalchemy.text("UPDATE trials SET datetime_start = :t WHERE trial_id = :i"),
                        {"t": datetime.datetime.now() - datetime.timedelta(seconds=60), "i": trial_id})
        assert fail_silent_trials(study, 1) == [silent.number]
        trials = study.get_trials(deepcopy=False)
        assert trials[silent.number].state == TrialState.FAIL
        assert trials[silent.number].user_attrs["fail_reason"].startswith("orphaned")
        waiting = [t for t in trials if t.state == TrialState.WAITING]
        assert len(waiting) == 1 and waiting[0].user_attrs["retry_of"] == silent.number
        assert waiting[0].system_attrs["fixed_params"] == trials[silent.number].params
        assert fail_silent_trials(study, 1) == []
    finally:
        if backend == "postgresql":
            with contextlib.suppress(Exception):
                optuna.delete_study(study_name=name, storage=storage)
        storage.engine.dispose()
