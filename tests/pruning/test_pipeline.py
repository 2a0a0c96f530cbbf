"""The one-shot pipeline (pruning/pipeline.py): the steps in their order, and the options that reach them."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from sparsealloc.cli.main import main
from sparsealloc.core.plan import AllocationPlan, MetricChoice
from sparsealloc.pruning.apply import prune_
from sparsealloc.pruning.calibration.stats import collect_stats
from sparsealloc.pruning.calibration.text import sample_windows, tokenize_stream
from sparsealloc.pruning.layer_drop import blocks_removed
from sparsealloc.pruning.layer_prune import compensate_, with_dropped_blocks
from sparsealloc.pruning.model.models import load_model
from sparsealloc.pruning.model.structure import model_layout
from sparsealloc.pruning.pipeline import calibrate_and_prune_, prune_with_plan_
from sparsealloc.pruning.sequential import prune_sequential_


def assert_same_weights(model, reference) -> None:
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize(("metric", "drop"), [("sparsegpt", 0), ("wanda", 1)])
def test_one_shot_is_calibrate_drop_schedule_compensate_prune(fresh_model, tiny_calib, metric, drop):
    model, reference = fresh_model("llama"), fresh_model("llama")
    layout = model_layout(model)
    plan = AllocationPlan.uniform(layout.linears, 0.5, MetricChoice(metric))
    applied, report, timings = calibrate_and_prune_(model, plan, tiny_calib, layout=layout, batch_size=2,
                                                    drop_blocks=drop)

    stats = collect_stats(reference, tiny_calib, batch_size=2, gram=metric == "sparsegpt")
    expected = with_dropped_blocks(plan, reference, tiny_calib, drop, True, batch_size=2)
    if drop:
        compensate_(reference, expected.provenance["layer_prune"]["compensation"])
    prune_(reference, expected, stats)
    assert applied == expected and len(applied.dropped_layers) == drop
    assert len(report.dropped_blocks) == drop == len(layout.blocks) - len(model.model.layers)
    assert set(timings) == {"calibration_s", "prune_s"}
    assert_same_weights(model, reference)


def test_sequential_and_the_plan_database_reach_the_pruning(fresh_model, tiny_calib, tmp_path):
    layout = model_layout(fresh_model("llama"))
    plan = AllocationPlan.uniform(layout.linears, 0.5, MetricChoice("sparsegpt")).replace(
        provenance={"level_db": {"path": str(tmp_path / "db" / "key")}})

    sequential, reference = fresh_model("llama"), fresh_model("llama")
    applied, _, _ = calibrate_and_prune_(sequential, plan, tiny_calib, batch_size=2, sequential=True)
    prune_sequential_(reference, plan, tiny_calib, batch_size=2)
    assert_same_weights(sequential, reference)
    assert applied.provenance == {"sequential": True}  # the database record is not the model's any more
    assert not (tmp_path / "db").exists()

    independent, reference = fresh_model("llama"), fresh_model("llama")
    applied, _, _ = calibrate_and_prune_(independent, plan, tiny_calib, batch_size=2)
    prune_(reference, plan, collect_stats(reference, tiny_calib, batch_size=2, gram=True))
    assert_same_weights(independent, reference)
    assert applied == plan
    assert list((tmp_path / "db").rglob("*.safetensors"))  # layers went through the study's database
    assert not torch.equal(independent.model.layers[-1].mlp.down_proj.weight,
                           sequential.model.layers[-1].mlp.down_proj.weight)


def test_prune_with_plan_from_pristine_leaves_dropped_blocks_to_the_caller(fresh_model, tiny_calib):
    model, reference = fresh_model("llama"), fresh_model("llama")
    layout = model_layout(model)
    dropped = layout.blocks[2]
    plan = AllocationPlan.uniform(layout.linears, 0.5, MetricChoice("wanda")).replace(
        dropped_layers=(dropped,), provenance={"layer_prune": {"compensation": {dropped: 1.5}}})
    stats = collect_stats(model, tiny_calib, batch_size=2)
    modules = dict(model.named_modules())
    pristine = {name: modules[name].weight.detach().clone() for name in layout.linears}
    for name in layout.linears:  # not dense any more: pristine must put every Linear back first
        modules[name].weight.data.mul_(3.0)
    report = prune_with_plan_(model, plan, stats, layout=layout, pristine=pristine, remove_dropped=False)

    compensate_(reference, {dropped: 1.5})
    expected = prune_(reference, plan, stats)
    assert len(model.model.layers) == len(layout.blocks) and report.dropped_blocks == []
    assert report.requested == expected.requested and report.achieved == expected.achieved
    assert all(report.achieved[n] == 1.0 for n in layout.linears if layout.block_of[n] == dropped)
    with blocks_removed(model, [dropped]):
        assert_same_weights(model, reference)


@pytest.mark.parametrize("extra", [[], ["--no-compensation"]])
def test_prune_command_builds_the_model_of_the_engine(tiny_llama_dir, text_file, tmp_path, capsys, extra):
    code = main(["--quiet", "prune", "--model", str(tiny_llama_dir), "--calib-text", str(text_file),
                 "--calib-samples", "4", "--calib-seq-len", "16", "--calib-batch-size", "3", "--no-eval",
                 "--drop-blocks", "1", *extra, "--save", str(tmp_path / "cli")])
    assert code == 0, capsys.readouterr().err
    model, tokenizer, _ = load_model(str(tiny_llama_dir), device="cpu")
    windows = sample_windows(tokenize_stream(tokenizer, text_file.read_text()), 4, 16, 0)
    plan = AllocationPlan.uniform(model_layout(model).linears, 0.5, MetricChoice("wanda"))
    applied, _, _ = calibrate_and_prune_(model, plan, windows, batch_size=3, drop_blocks=1, compensate=not extra)
    saved = load_file(str(tmp_path / "cli" / "model.safetensors"))
    assert saved.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(saved[name], tensor), name
    scales = applied.provenance["layer_prune"]["compensation"]
    assert (set(scales.values()) == {1.0}) == bool(extra)
