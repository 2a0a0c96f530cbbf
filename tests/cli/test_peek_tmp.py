"""The study CLI end to end on the tiny on-disk Llama: run, export, list/show, spec files, kill and
resume, the dashboard over HTTP, and one-line errors for bad input."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from sparsealloc.cli.main import main
from sparsealloc.core.plan import AllocationPlan, weighted_mean_sparsity
from sparsealloc.pruning import load_model, model_layout

optuna.logging.set_verbosity(optuna.logging.WARNING)


def data_args(model_dir: Path, text: Path) -> list[str]:
    return ["--model", str(model_dir), "--calib-text", str(text), "--calib-samples", "4", "--calib-seq-len", "16",
            "--eval-text", str(text), "--eval-seq-len", "16", "--eval-windows", "2"]


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` with stdout/stderr captured (usable outside function-scoped fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def store_snapshot(url: str) -> dict:
    """What a store holds: per study, trial states/values/params and the study attributes."""
    storage = optuna.storages.RDBStorage(url)
    try:
        snapshot = {}
        for summary in optuna.get_all_study_summaries(storage):
            study = optuna.load_study(study_name=summary.study_name, storage=storage)
            snapshot[summary.study_name] = {
                "user_attrs": study.user_attrs,
                "trials": [(t.number, t.state.name, t.values, t.params) for t in study.trials],
            }
        return snapshot
    finally:
        storage.engine.dispose()


def states(url: str, name: str) -> dict[str, int]:
    storage = optuna.storages.RDBStorage(url)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
        out: dict[str, int] = {}
        for t in study.get_trials(deepcopy=False):
            out[t.state.name] = out.get(t.state.name, 0) + 1
        return out
    finally:
        storage.engine.dispose()


@pytest.fixture(scope="module")
def linear_numels(tiny_llama_dir) -> dict[str, int]:
    model, _, _ = load_model(str(tiny_llama_dir), device="cpu")
    layout = model_layout(model)
    assert layout.numels and set(layout.numels) == set(layout.linears)
    return dict(layout.numels)


def plan_sparsity(plan: AllocationPlan, numels: dict[str, int]) -> float:
    return weighted_mean_sparsity(plan.expand(list(numels)), numels)


@pytest.fixture(scope="module")
def finished_study(tiny_llama_dir, text_file, tmp_path_factory):
    """Study "a" (single objective, TPE, 6 trials) run once by the CLI, exported to OUT."""
    root = tmp_path_factory.mktemp("study-a")
    url = sqlite_url(root / "s.db")
    out_dir = root / "out"
    code, out, err = run_cli(["--quiet", "study", "run", "--name", "a", "--storage", url,
                              *data_args(tiny_llama_dir, text_file), "--target-sparsity", "0.5", "--trials", "6",
                              "--export", str(out_dir)])
    assert code == 0, err
    return {"url": url, "db": root / "s.db", "out_dir": out_dir, "stdout": out, "stderr": err, "root": root}


# --------------------------------------------------------------------------- 1. run, export, list, show
def test_run_exports_exact_budget_plan(finished_study, linear_numels):
    out = finished_study["stdout"]
    assert "study: a" in out
    assert "validation (held-out perplexity)" in out and "spearman" in out
    best = finished_study["out_dir"] / "best.json"
    assert best.is_file() and f"exported: {best}" in out
    plan = AllocationPlan.load(best)
    assert abs(plan_sparsity(plan, linear_numels) - 0.5) < 1e-9
    prov = plan.provenance
    assert prov["study"] == "a"
    assert isinstance(prov["trial"], int)
    assert len(prov["values"]) == 1 and prov["values"][0] >= 0
    assert prov["sampler"] == "tpe"
    assert isinstance(prov["spec_hash"], str) and len(prov["spec_hash"]) == 12

    # the exported trial is the study's best, with its stored values
    study = optuna.load_study(study_name="a", storage=finished_study["url"])
    assert prov["trial"] == study.best_trial.number
    assert prov["values"] == pytest.approx(study.best_trial.values)
    assert prov["spec_hash"] == study.user_attrs["spec_hash"]
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    assert len(complete) == 6
    assert "validation" in study.user_attrs and study.user_attrs["validation"]["ppl"]


def test_list_show_and_export(finished_study, linear_numels, tmp_path, capsys):
    url = finished_study["url"]
    assert main(["--quiet", "study", "list", "--storage", url]) == 0
    out = capsys.readouterr().out
    assert out.startswith("a  objectives=1") and "complete=6" in out

    assert main(["--quiet", "study", "show", "a", "--storage", url]) == 0
    out = capsys.readouterr().out
    assert "study: a" in out and "complete=6" in out and "best: trial" in out
    assert "spearman" in out  # the stored validation is shown again

    out_dir = tmp_path / "again"
    assert main(["--quiet", "export", "a", "--storage", url, "--out", str(out_dir)]) == 0
    assert f"exported: {out_dir / 'best.json'}" in capsys.readouterr().out
    again = AllocationPlan.load(out_dir / "best.json")
    first = AllocationPlan.load(finished_study["out_dir"] / "best.json")
    assert again.to_dict() == first.to_dict()
    assert abs(plan_sparsity(again, linear_numels) - 0.5) < 1e-9

    # an empty store lists no studies
    assert main(["--quiet", "study", "list", "--storage", sqlite_url(tmp_path / "empty.db")]) == 0
    assert "no studies" in capsys.readouterr().out


def test_export_unknown_study(finished_study, tmp_path, capsys):
    before = store_snapshot(finished_study["url"])
    code = main(["--quiet", "export", "nosuch", "--storage", finished_study["url"], "--out", str(tmp_path / "x")])
    line = assert_one_line_error(code, capsys, "'nosuch'")
    assert "holds: a" in line
    assert not (tmp_path / "x").exists()
    assert store_snapshot(finished_study["url"]) == before


def assert_one_line_error(code: int, capsys, *fragments: str) -> str:
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error:"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    return lines[0]
def test_peek(finished_study):
    print(finished_study["stdout"]); print("ERR", finished_study["stderr"])
    assert 0
