"""The study CLI end to end on the tiny on-disk Llama: run, export, list/show, spec files, kill and
resume, the dashboard over HTTP, and one-line errors for bad input."""

from __future__ import annotations

import contextlib
import io
import json
import math
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
import pandas as pd
import pytest

from sparsealloc.storage.rdb import open_storage
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
    return {"url": url, "db": root / "s.db", "out_dir": out_dir, "stdout": out, "stderr": err}


# --------------------------------------------------------------------------- 1. run, export, list, show
def test_run_exports_exact_budget_plan(finished_study, linear_numels):
    out, err = finished_study["stdout"], finished_study["stderr"]
    assert "study: a" in out
    assert "Loading weights" not in err and "Traceback" not in err  # --quiet: no transformers bars either
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

    # the exported trial is the study's best validated one (lowest held-out PPL), with its stored values
    study = optuna.load_study(study_name="a", storage=finished_study["url"])
    ppl = study.user_attrs["validation"]["ppl"]
    assert prov["trial"] == int(min(ppl, key=ppl.get))
    assert prov["validation"]["perplexity"] == min(ppl.values())
    assert prov["values"] == pytest.approx(study.trials[prov["trial"]].values)
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
    # Reading commands never create a store: a mistyped path is an error, not an empty listing.
    missing = tmp_path / "missing.db"
    assert main(["--quiet", "study", "list", "--storage", sqlite_url(missing)]) == 2
    assert "does not exist" in capsys.readouterr().err and not missing.exists()
    open_storage(sqlite_url(tmp_path / "empty.db"))
    assert main(["--quiet", "study", "list", "--storage", sqlite_url(tmp_path / "empty.db")]) == 0
    assert "no studies" in capsys.readouterr().out


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


# --------------------------------------------------------------------------- 2. spec files, Pareto export
def dominates(a: list[float], b: list[float]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


@pytest.mark.parametrize("sampler", ["nsga3", "optuna-nsga3"])
def test_spec_file_multi_objective_pareto_export(sampler, tiny_llama_dir, text_file, linear_numels, tmp_path,
                                                 capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "name: from-file\n"
        "target_sparsity: 0.5\n"
        "space: [layerwise, kv]\n"
        "objectives: [kl, kv_bytes]\n"
        f"sampler: {sampler}\n"
        "population_size: 4\n"
        "trials: 8\n"
        "kv: {bits: [2, 4, 16]}\n", encoding="utf-8")
    url = sqlite_url(tmp_path / "s.db")
    validate = [] if sampler == "nsga3" else ["--no-validate"]
    code = main(["--quiet", "study", "run", str(spec), "--name", "m", "--storage", url,
                 *data_args(tiny_llama_dir, text_file), *validate])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"study: m  store: {url}  space: layerwise,kv  sampler: {sampler}" in captured.out
    assert ("spearman" in captured.out) == (sampler == "nsga3")

    study = optuna.load_study(study_name="m", storage=url)
    assert study.metric_names == ["kl", "kv_bytes"]
    assert len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) == 8
    assert study.user_attrs["sparsealloc:spec"]["sampler"] == sampler

    out_dir = tmp_path / "D"
    assert main(["--quiet", "export", "m", "--storage", url, "--pareto", "--out", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    files = sorted((out_dir / "pareto").glob("*.json"))
    assert files and len(files) == printed.count("exported: ")
    plans = [AllocationPlan.load(f) for f in files]
    values = []
    for path, plan in zip(files, plans):
        assert abs(plan_sparsity(plan, linear_numels) - 0.5) < 1e-9, path
        prov = plan.provenance
        assert prov["study"] == "m" and prov["sampler"] == sampler
        assert prov["spec_hash"] == study.user_attrs["spec_hash"]
        assert path.name == f"trial_{prov['trial']:04d}.json"
        assert len(prov["values"]) == 2 and prov["objectives"] == ["kl", "kv_bytes"]
        assert plan.kv_bits and all(set(b) == {"k", "v"} for b in plan.kv_bits.values())
        values.append(prov["values"])
    for i, a in enumerate(values):
        for j, b in enumerate(values):
            assert i == j or not dominates(a, b), (files[i].name, a, files[j].name, b)
    # the exported set is the study's Pareto set, and nothing completed dominates any of it
    assert sorted(p.provenance["trial"] for p in plans) == sorted(t.number for t in study.best_trials)
    front = pd.read_csv(out_dir / "pareto" / "front.csv")
    assert sorted(front["trial"]) == sorted(p.provenance["trial"] for p in plans)
    by_trial = {p.provenance["trial"]: p for p in plans}
    for row in front.itertuples(index=False):  # bytes of each plan = its kv_bytes objective; mean bits from its plan
        plan = by_trial[row.trial]
        assert row.kv_bytes_per_token == pytest.approx(plan.provenance["values"][1]) == plan.provenance["kv_bytes_per_token"]
        widths = [b for bits in plan.kv_bits.values() for b in bits.values()]
        assert row.mean_kv_bits == pytest.approx(sum(widths) / len(widths))
        validated = plan.provenance.get("validation", {}).get("perplexity")
        assert (validated is None and math.isnan(row.validation_ppl)) or row.validation_ppl == pytest.approx(validated)
    assert (sampler != "nsga3") or front["validation_ppl"].notna().any()
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        assert not any(dominates(t.values, v) for v in values)


# --------------------------------------------------------------------------- 3. kill and resume
def sqlite_counts(db: Path) -> dict[str, int]:
    """Trial states read straight from the SQLite file (cheap enough to poll)."""
    import sqlite3

    if not db.exists():
        return {}
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return dict(con.execute("SELECT state, COUNT(*) FROM trials GROUP BY state").fetchall())
        finally:
            con.close()
    except sqlite3.Error:  # not created yet / schema being written
        return {}


def test_kill_mid_run_then_resume(tiny_llama_dir, text_file, tmp_path, capsys):
    db = tmp_path / "s.db"
    url = sqlite_url(db)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-P", "-m", "sparsealloc.cli", "--quiet", "study", "run", "--name", "k", "--storage", url,
           *data_args(tiny_llama_dir, text_file), "--calib-samples", "16", "--calib-seq-len", "32",
           "--target-sparsity", "0.5", "--trials", "40"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if sqlite_counts(db).get("COMPLETE", 0) >= 3:
                break
            time.sleep(0.01)
        still_running = proc.poll() is None
        proc.kill()
    finally:
        if proc.poll() is None:
            proc.kill()
        out, err = proc.communicate(timeout=30)
    assert still_running, f"the study ended before it could be killed (rc={proc.returncode}): {err[-2000:]}"
    assert proc.returncode == -signal.SIGKILL

    at_kill = states(url, "k")
    assert 3 <= at_kill.get("COMPLETE", 0) < 10, at_kill
    orphans = at_kill.get("RUNNING", 0)
    assert orphans <= 1  # one orchestrator, one trial in flight

    code = main(["--quiet", "study", "resume", "k", "--storage", url, "--trials", "10", "--no-validate"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert ("re-queued 1 trial(s)" in captured.out) == (orphans == 1)
    after = states(url, "k")
    assert after.get("COMPLETE") == 10, after
    assert "RUNNING" not in after and "WAITING" not in after, after
    assert after.get("FAIL", 0) == orphans, after
    study = optuna.load_study(study_name="k", storage=url)
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        assert t.user_attrs["fail_reason"].startswith("orphaned")
    spec = study.user_attrs["sparsealloc:spec"]
    assert spec["trials"] == 40 and spec["calibration"]["samples"] == 16  # the stored spec is not rewritten

    # resuming a finished study again changes nothing
    before = store_snapshot(url)
    assert main(["--quiet", "study", "resume", "k", "--storage", url, "--trials", "10", "--no-validate"]) == 0
    assert "trials this run: {}" in capsys.readouterr().out
    assert states(url, "k") == after
    assert store_snapshot(url) == before


# --------------------------------------------------------------------------- 4. dashboard over HTTP
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        return json.loads(response.read().decode())


def test_dashboard_serves_the_store(finished_study):
    if shutil.which("optuna-dashboard") is None:
        pytest.skip("optuna-dashboard is not installed (pip install 'sparsealloc[dashboard]')")
    port = free_port()
    exe = shutil.which("sparsealloc")
    cmd = [exe] if exe else [sys.executable, "-P", "-m", "sparsealloc.cli"]
    cmd += ["dashboard", "--storage", finished_study["url"], "--port", str(port)]
    # own session: the dashboard child dies with the group however the test ends
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        listing = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                listing = get_json(f"{base}/api/studies")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
        assert listing is not None, f"dashboard did not answer on {base} (rc={proc.poll()})"
        by_name = {s["study_name"]: s for s in listing["study_summaries"]}
        assert set(by_name) == {"a"}
        assert by_name["a"]["user_attrs"]  # spec, spec_hash... are visible there
        detail = get_json(f"{base}/api/studies/{by_name['a']['study_id']}")
        assert detail["name"] == "a"
        assert len(detail["trials"]) == 6
        assert all(t["state"].lower() == "complete" for t in detail["trials"])

        # SIGTERM to sparsealloc alone (as kill / systemd / docker stop send it) stops the server too
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and port_open(port):
            time.sleep(0.1)
        assert not port_open(port), "optuna-dashboard outlived 'sparsealloc dashboard' (orphaned server)"
    finally:  # whatever happened, nothing of ours keeps running (the group is this test's own session)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=10)
    assert f"optuna-dashboard on http://127.0.0.1:{port}/dashboard" in out


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


# --------------------------------------------------------------------------- 5. bad input
BAD_RUN = {
    # case: (extra argv, fragments the one error line must contain)
    "unknown-space": (["--space", "foo"], ["space", "layerwise", "foo"]),
    "unknown-sampler": (["--sampler", "bogus"], ["sampler", "nsga3", "bogus"]),
    "sparsity-out-of-range": (["--target-sparsity", "1.2"], ["[0, 1)", "1.2"]),
    "first-objective-not-proxy": (["--objectives", "kv_bytes"], ["error proxy", "kv_bytes"]),
    "storage-bad-scheme": (["--storage", "http://x"], ["sqlite", "'http'"]),
    "storage-missing-dir": (["--storage", "sqlite:////nonexistent_dir/x.db"],
                            ["existing directory", "/nonexistent_dir"]),
    "spec-unknown-key": (["{unknown_key}"], ["spec accepts keys", "target_sparsty"]),
    "spec-not-yaml": (["{not_yaml}"], ["YAML", "bad.yaml"]),
    "spec-missing": (["{missing}"], ["readable spec file", "missing.yaml"]),
    "extra-eval-text-missing": (["--eval-text", "{second}", "{missing_text}"], ["readable text file", "missing.txt"]),
    "spec-mismatch": (["--name", "a", "--target-sparsity", "0.4"],
                      ["'a'", "different spec", "target_sparsity: stored 0.5, given 0.4", "resume"]),
}


@pytest.mark.parametrize("case", sorted(BAD_RUN))
def test_bad_study_run_inputs(case, finished_study, tiny_llama_dir, text_file, tmp_path, capsys):
    files = {"unknown_key": tmp_path / "unknown.yaml", "not_yaml": tmp_path / "bad.yaml",
             "missing": tmp_path / "missing.yaml", "second": text_file, "missing_text": tmp_path / "missing.txt"}
    files["unknown_key"].write_text("name: u\ntarget_sparsty: 0.5\n", encoding="utf-8")
    files["not_yaml"].write_text("name: [unclosed\n  : : {\n", encoding="utf-8")
    extra, fragments = BAD_RUN[case]
    extra = [arg.format(**files) for arg in extra]
    if case == "spec-mismatch":  # against the store that holds study "a"
        url, db = finished_study["url"], finished_study["db"]
    else:
        db = tmp_path / "fresh.db"
        url = sqlite_url(db)
    before = store_snapshot(url) if db.exists() else None
    argv = ["--quiet", "study", "run", *data_args(tiny_llama_dir, text_file), "--trials", "2"]
    if "--storage" not in extra:
        argv += ["--storage", url]
    if "--name" not in extra:
        argv += ["--name", "x"]
    line = assert_one_line_error(main([*argv, *extra]), capsys, *fragments)
    assert "Traceback" not in line
    assert not Path("/nonexistent_dir").exists()
    if before is None:
        assert not db.exists(), f"{case} created the store"
    else:
        assert store_snapshot(url) == before


@pytest.mark.parametrize("action", ["resume", "show", "export"])
def test_unknown_study_names_the_stored_ones(action, finished_study, tmp_path, capsys):
    url = finished_study["url"]
    before = store_snapshot(url)
    argv = {"resume": ["study", "resume", "nosuch", "--storage", url],
            "show": ["study", "show", "nosuch", "--storage", url],
            "export": ["export", "nosuch", "--storage", url, "--out", str(tmp_path / "x")]}[action]
    assert_one_line_error(main(["--quiet", *argv]), capsys, "no study named 'nosuch'", "it holds: a")
    assert store_snapshot(url) == before
    assert not (tmp_path / "x").exists()


def test_resume_needs_a_positive_budget(finished_study, capsys):
    code = main(["study", "resume", "a", "--storage", finished_study["url"], "--trials", "0"])
    assert_one_line_error(code, capsys, "positive integer", "0")


def test_exported_plans_are_study_artifacts(finished_study, tmp_path, capsys):
    """``study run --export`` and ``export`` attach the plan to the study; the same bytes only once."""
    from optuna.artifacts import get_all_artifact_meta

    from sparsealloc.storage.artifacts import default_artifact_dir, fetch

    url = finished_study["url"]
    folder = default_artifact_dir(url)
    assert folder == finished_study["db"].with_name("s-artifacts")
    study = optuna.load_study(study_name="a", storage=url)
    metas = get_all_artifact_meta(study)
    assert [m.filename for m in metas] == ["best.json"]
    copy = fetch(folder, metas[0].artifact_id, tmp_path / "fetched.json")
    assert copy.read_bytes() == (finished_study["out_dir"] / "best.json").read_bytes()

    # exporting the same result again adds nothing; another folder can be named
    assert main(["--quiet", "export", "a", "--storage", url, "--out", str(tmp_path / "again")]) == 0
    assert "as artifacts in" in capsys.readouterr().out
    assert len(get_all_artifact_meta(study)) == 1
    other = tmp_path / "elsewhere"
    assert main(["--quiet", "export", "a", "--storage", url, "--out", str(tmp_path / "x"),
                 "--artifact-dir", str(other)]) == 0
    assert len(list(other.iterdir())) == 1
    assert f"--artifact-dir {other}" in capsys.readouterr().out
    assert main(["--quiet", "export", "a", "--storage", url, "--out", str(tmp_path / "y"), "--no-artifacts"]) == 0
    assert "artifacts" not in capsys.readouterr().out


def test_kv_budget_and_seed_plan_flags_reach_the_spec(tiny_llama_dir, tmp_path, capsys):
    """--kv-budget / --kv-budget-bytes / --seed-plan set the spec; bad values are one-line errors before any load."""
    from sparsealloc.cli.main import build_parser
    from sparsealloc.cli.study import spec_from_args

    plan = AllocationPlan(sparsity={"*": 0.5}).save(tmp_path / "seed.json")
    args = build_parser().parse_args(["study", "run", "--space", "layerwise,kv", "--kv-budget", "3",
                                      "--seed-plan", str(plan), "--seed-plan", str(plan)])
    spec = spec_from_args(args)
    assert spec.kv.budget == 3.0 and spec.kv.budget_bytes is None and spec.seed_plans == (str(plan), str(plan))
    args = build_parser().parse_args(["study", "run", "--space", "kv", "--kv-budget-bytes", "5760"])
    assert spec_from_args(args).kv.budget_bytes == 5760.0
    url = sqlite_url(tmp_path / "s.db")
    code = main(["--quiet", "study", "run", "--space", "layerwise", "--kv-budget", "3", "--storage", url])
    assert_one_line_error(code, capsys, "need kv in the space")
    code = main(["--quiet", "study", "run", "--space", "kv", "--kv-budget", "3", "--kv-budget-bytes", "5000",
                 "--storage", url])
    assert_one_line_error(code, capsys, "alternatives")
    code = main(["--quiet", "study", "run", "--space", "kv", "--seed-plan", str(tmp_path / "nope.json"),
                 "--model", str(tiny_llama_dir), "--storage", url])
    assert_one_line_error(code, capsys, "nope.json")
    assert not (tmp_path / "s.db").exists()  # nothing written


def test_validation_on_two_texts_exports_the_best_geometric_mean(tiny_llama_dir, text_file, tmp_path, capsys):
    """``--eval-text A B``: every validated plan is scored on both texts; the exported plan has the lowest
    geometric mean, and its provenance holds each text's perplexity."""
    second = tmp_path / "second.txt"
    second.write_text(" ".join(reversed(text_file.read_text().split())), encoding="utf-8")
    url, out_dir = sqlite_url(tmp_path / "two.db"), tmp_path / "out"
    argv = ["--quiet", "study", "run", *data_args(tiny_llama_dir, text_file), "--eval-text", str(text_file), str(second),
            "--storage", url, "--name", "two", "--trials", "4", "--export", str(out_dir)]
    assert main(argv) == 0
    shown = capsys.readouterr().out
    assert "geometric mean over 2 texts" in shown and f"text 2: file:{second}" in shown
    assert "exported plan perplexity: " in shown and "(geometric mean over 2 texts: " in shown.split("exported plan")[1]
    validation = optuna.load_study(study_name="two", storage=url).user_attrs["validation"]
    texts = list(validation["by_text"])
    assert texts == [f"file:{text_file}", f"file:{second}"]
    for number, ppl in validation["ppl"].items():
        each = [validation["by_text"][t][number] for t in texts]
        assert ppl == pytest.approx(math.sqrt(each[0] * each[1]))
    best = min(validation["ppl"], key=validation["ppl"].get)
    plan = AllocationPlan.load(out_dir / "best.json")
    assert plan.provenance["trial"] == int(best)
    assert plan.provenance["validation"]["perplexity_by_text"] == {t: validation["by_text"][t][best] for t in texts}
