"""``sparsealloc prune --allocator NAME --allocator-arg k=v`` and Gram-needing metrics on a tiny model dir."""

from __future__ import annotations

import pytest

from sparsealloc.cli.main import main
from sparsealloc.core.plan import AllocationPlan
from sparsealloc.pruning.allocators import ALLOCATORS


def common_args(model_dir, text) -> list[str]:
    return ["--model", str(model_dir), "--calib-text", str(text), "--calib-samples", "4",
            "--calib-seq-len", "16", "--no-eval"]


def fields(out: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)


def test_prune_with_owl_allocator(tiny_llama_dir, text_file, tmp_path, capsys):
    out_dir = tmp_path / "owl"
    code = main(["--quiet", "prune", *common_args(tiny_llama_dir, text_file), "--sparsity", "0.6",
                 "--allocator", "owl", "--allocator-arg", "m=5", "--allocator-arg", "lam=0.1",
                 "--save", str(out_dir)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert float(fields(captured.out)["achieved_sparsity"]) == pytest.approx(0.6, abs=1e-3)
    plan = AllocationPlan.load(out_dir / "plan.json")
    assert len(set(plan.sparsity.values())) > 1  # non-uniform, keyed by Linear FQN
    assert all(key.startswith("model.layers.") for key in plan.sparsity)
    assert plan.provenance["allocator"] == {"name": "owl", "params": {"m": 5, "lam": 0.1}, "target": 0.6}


@pytest.mark.parametrize("metric", ["sparsegpt", "ace"])
def test_prune_collects_gram_for_metrics_that_use_it(tiny_llama_dir, text_file, capsys, metric):
    code = main(["--quiet", "prune", *common_args(tiny_llama_dir, text_file), "--metric", metric])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert float(fields(captured.out)["achieved_sparsity"]) == pytest.approx(0.5, abs=1e-3)


def _assert_one_line_error(code, capsys, *fragments):
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), captured.err
    assert all(fragment in lines[0] for fragment in fragments), lines[0]
    assert "Traceback" not in captured.err + captured.out


def test_unknown_allocator_fails_before_the_model_loads(capsys, text_file):
    # the model path does not exist: the allocator must be rejected first
    code = main(["prune", "--model", "/nonexistent/model", "--calib-text", str(text_file),
                 "--allocator", "owll"])
    _assert_one_line_error(code, capsys, "owll", *ALLOCATORS.names())


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--allocator", "owl", "--allocator-arg", "alpha=2"], "alpha"),
        (["--allocator-arg", "m=5"], "--allocator"),
        (["--allocator", "owl", "--pattern", "2:4"], "2:4"),
        (["--allocator", "owl", "--plan", "{plan}"], "--allocator"),
    ],
)
def test_bad_allocator_flags(capsys, text_file, tmp_path, extra, fragment):
    plan = AllocationPlan(sparsity={"*": 0.5}).save(tmp_path / "plan.json")
    extra = [arg.format(plan=plan) for arg in extra]
    code = main(["prune", "--model", "/nonexistent/model", "--calib-text", str(text_file), *extra])
    _assert_one_line_error(code, capsys, fragment)


@pytest.mark.parametrize("compensation", [True, False])
def test_prune_drops_blocks_within_the_sparsity_budget(tiny_llama_dir, text_file, tmp_path, capsys, compensation):
    out_dir = tmp_path / "dropped"
    extra = [] if compensation else ["--no-compensation"]
    code = main(["--quiet", "prune", *common_args(tiny_llama_dir, text_file), "--sparsity", "0.5",
                 "--drop-blocks", "1", *extra, "--save", str(out_dir)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert float(fields(captured.out)["achieved_sparsity"]) == pytest.approx(0.5, abs=2e-3)
    plan = AllocationPlan.load(out_dir / "plan.json")
    assert len(plan.dropped_layers) == 1
    (alpha,) = plan.provenance["layer_prune"]["compensation"].values()
    assert (alpha != 1.0) == compensation
    kept = [r for n, r in plan.sparsity.items() if not n.startswith(plan.dropped_layers[0] + ".")]
    assert all(r < 0.5 for r in kept)  # the dropped block's weights pay part of the budget

    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(out_dir).num_hidden_layers == 3


def test_no_compensation_needs_drop_blocks(capsys, text_file):
    code = main(["prune", "--model", "/nonexistent/model", "--calib-text", str(text_file), "--no-compensation"])
    _assert_one_line_error(code, capsys, "--drop-blocks")
