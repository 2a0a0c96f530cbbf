"""Two orchestrator processes on one PostgreSQL study (marked ``postgres``; skipped without a server)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import optuna
import pytest

URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
pytestmark = pytest.mark.postgres


def _server_answers() -> str | None:
    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(URL, connect_args={"connect_timeout": 3})
        with engine.connect():
            pass
        engine.dispose()
        return None
    except Exception as exc:  # noqa: BLE001
        return f"no PostgreSQL answers at {URL}: {str(exc).splitlines()[0]}"


def test_two_orchestrators_share_one_budget(tiny_llama_dir, text_file):
    reason = _server_answers()
    if reason:
        pytest.skip(reason)
    name = f"two-orch-{uuid.uuid4().hex[:8]}"
    cmd = [sys.executable, "-P", "-m", "sparsealloc.cli", "--quiet", "study", "run", "--name", name,
           "--storage", URL, "--model", str(tiny_llama_dir), "--calib-text", str(text_file),
           "--calib-samples", "4", "--calib-seq-len", "16", "--target-sparsity", "0.5", "--trials", "12",
           "--no-validate", "--device", "cpu"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        outputs = [p.communicate(timeout=240) for p in procs]
        for p, (out, err) in zip(procs, outputs):
            assert p.returncode == 0, err[-2000:]
        study = optuna.load_study(study_name=name, storage=URL)
        states = [t.state.name for t in study.trials]
        numbers = [t.number for t in study.trials]
        assert states.count("COMPLETE") == 12
        assert "RUNNING" not in states and "WAITING" not in states
        assert len(set(numbers)) == len(numbers)
        # Both orchestrators ran to the end of their loop (each printed its summary).
        ran = [sum(1 for line in out.splitlines() if line.startswith("setup:")) for out, _ in outputs]
        assert ran == [1, 1]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        try:
            optuna.delete_study(study_name=name, storage=URL)
        except KeyError:
            pass
