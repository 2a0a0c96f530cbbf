"""A study's exported plan, applied with ``sparsealloc apply`` and no calibration flags, is the model
the study scored: same calibration (from the plan's provenance), same layers (SparseGPT from the
level database), same proxy value."""

from __future__ import annotations

import pytest
import torch

from sparsealloc.cli.main import main
from sparsealloc.core.plan import AllocationPlan
from sparsealloc.objectives.reconstruction import forward_errors
from sparsealloc.pruning.model.models import load_model
from sparsealloc.search.session import build_evaluator
from sparsealloc.search.study import run
from sparsealloc.spaces.spec import CalibrationSpec, EvoSpec, MetricSpec, StudySpec


@pytest.mark.parametrize("metric", ["sparsegpt", "wanda"])
def test_applied_plan_scores_the_trials_proxy(tiny_llama_dir, text_file, tmp_path, monkeypatch, metric):
    monkeypatch.setenv("SPARSEALLOC_CACHE", str(tmp_path / "cache"))
    spec = StudySpec(name=f"repro-{metric}", model=str(tiny_llama_dir), target_sparsity=0.6, sampler="evo",
                     metric=MetricSpec(name=metric), trials=5, warm_start=("uniform", "depth_ramp"),
                     calibration=CalibrationSpec(text=str(text_file), samples=6, seq_len=16, batch_size=2, seed=3),
                     evo=EvoSpec(offspring=3, stages=((6, 1),)), proxy_dtype="float32")
    # float32 trials: the same weights give the same proxy to float rounding (bfloat16 trials run a
    # bfloat16 copy of these weights, test_evo.py::test_bfloat16_trials_run_a_copy...).
    result = run(spec, f"sqlite:///{tmp_path / 's.db'}", validate=False, export_dir=tmp_path / "export")
    plan = AllocationPlan.load(result.exported[0])
    assert plan.provenance["calibration"]["samples"] == 6 and plan.provenance["calibration"]["seed"] == 3
    assert ("level_db" in plan.provenance) == (metric == "sparsegpt")
    trial_value = result.study.trials[plan.provenance["trial"]].values[0]

    entries = sorted((tmp_path / "cache").glob("level-db/*/*/*.safetensors"))
    assert bool(entries) == (metric == "sparsegpt")
    if metric == "sparsegpt":  # apply must read the layers back, not run SparseGPT again
        def no_compression(*args, **kwargs):
            raise AssertionError("a layer was compressed again")

        monkeypatch.setattr("sparsealloc.pruning.apply.compress_linear", no_compression)
        monkeypatch.setattr("sparsealloc.pruning.level_db.compress_linear", no_compression)
    save = tmp_path / "applied"
    assert main(["apply", "--plan", str(result.exported[0]), "--model", str(tiny_llama_dir),
                 "--save", str(save)]) == 0
    assert sorted((tmp_path / "cache").glob("level-db/*/*/*.safetensors")) == entries
    applied, _, _ = load_model(str(save))
    reference = build_evaluator(spec)  # the study's windows and dense reference, dense model
    ctx = reference.ctx
    modules = dict(applied.named_modules())
    with torch.no_grad():
        for name, module in ctx.model.named_modules():
            if name in ctx.layout.linears:
                module.weight.data.copy_(modules[name].weight.data)
    assert forward_errors(ctx, ("kl",))["kl"] == pytest.approx(trial_value, rel=1e-4)
