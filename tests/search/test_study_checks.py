"""Checks of ``search.study.run`` that need no model: they fail before anything is loaded."""

from __future__ import annotations

import pytest

from sparsealloc.core.errors import SpecError
from sparsealloc.search import study as study_api
from sparsealloc.spaces.spec import CalibrationSpec, StudySpec


def test_a_name_taken_by_another_spec_fails_before_the_model_loads(tiny_llama_dir, text_file, tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = StudySpec(name="taken", model=str(tiny_llama_dir), target_sparsity=0.5, trials=1, warm_start=("uniform",),
                     calibration=CalibrationSpec(text=str(text_file), samples=4, seq_len=16))
    study_api.run(spec, url, validate=False)

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(study_api, "build_evaluator", no_load)
    with pytest.raises(SpecError, match="exists with a different spec.*target_sparsity"):
        study_api.run(spec.override(target_sparsity=0.6), url, validate=False)
    with pytest.raises(AssertionError, match="the model was loaded"):  # the same spec goes on to load it
        study_api.run(spec.override(trials=2), url, validate=False)
