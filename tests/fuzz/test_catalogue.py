"""Every malformed input of the catalogue ends cleanly: exit code 2, one ``error:`` line saying what
was expected and what was received, no traceback, no store written, no model loaded before the
error (the tiny model where one is needed; SmolLM2 never)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


def _load_catalogue():
    path = Path(__file__).with_name("catalogue.py")
    spec = importlib.util.spec_from_file_location("sparsealloc_tests_fuzz_catalogue", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


catalogue = _load_catalogue()


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_llama_dir, text_file):
    return catalogue.make_env(tmp_path_factory.mktemp("catalogue"), tiny_llama_dir, text_file)


def test_the_catalogue_holds_at_least_50_distinct_cases():
    ids = [case.id for case in catalogue.CASES]
    assert len(ids) == len(set(ids))
    assert len({case.argv + tuple(case.files) for case in catalogue.CASES}) == len(ids)
    assert len(ids) >= 50
    assert {case.category for case in catalogue.CASES} == {"spec", "plan", "cli", "storage"}


@pytest.mark.parametrize("case", catalogue.CASES, ids=lambda case: case.id)
def test_malformed_input_gives_one_clean_error(case, env, tmp_path):
    result = catalogue.run_case(case, env, tmp_path / "case")
    assert result.clean, f"{case.id}: {result.problems}; stderr: {result.stderr[-2000:]}"


RANDOM = (catalogue.random_spec_cases(40, seed=1) + catalogue.random_cli_cases(40, seed=1)
          + catalogue.random_storage_cases(20, seed=1))


@pytest.mark.parametrize("case", RANDOM, ids=lambda case: case.id)
def test_random_malformed_input_gives_one_clean_error(case, env, tmp_path):
    result = catalogue.run_case(case, env, tmp_path / "case")
    assert result.clean, f"{case.id}: {result.problems}; stderr: {result.stderr[-2000:]}"


def test_the_runner_catches_what_it_must_catch(env, tmp_path):
    """The checks can fail: a valid command, a traceback and a store change are all reported."""
    ok = catalogue.Case("valid", "cli", ("study", "list", "--storage", "<store>"))
    result = catalogue.run_case(ok, env, tmp_path / "ok")
    assert "exit code 0, expected 2" in result.problems[0]

    valid_run = catalogue.Case("valid-run", "cli", catalogue.RUN_FRESH)  # a study that really runs
    result = catalogue.run_case(valid_run, env, tmp_path / "run")
    assert "a new store was created" in result.problems
    assert any(p.startswith("the model was loaded") for p in result.problems)
    assert not env.fresh_path.exists()  # cleaned up for the other cases

    def boom(args):
        raise RuntimeError("boom")

    import sparsealloc.cli.study as study_cli

    original = study_cli.list_command
    try:
        study_cli.list_command = boom
        result = catalogue.run_case(ok, env, tmp_path / "boom")
    finally:
        study_cli.list_command = original
    assert any(p.startswith("raised RuntimeError") for p in result.problems)
