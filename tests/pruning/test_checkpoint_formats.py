"""Checkpoint formats without optional packages: dense at fp32/bf16/fp16, file permissions, bad flags.

The compressed-tensors, llm-compressor and lm-eval round trips are in tests/cli/test_interop.py (slow).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import sys

import pytest
import torch
import yaml

from sparsealloc.cli.main import main
from sparsealloc.core.plan import AllocationPlan, MetricChoice
from sparsealloc.pruning import model_layout, prune_
from sparsealloc.pruning.model.checkpoint_formats import DTYPES, save_checkpoint
from sparsealloc.storage.recipes import plan_recipe, recipe_sparsity, write_recipe


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def pruned_llama(fresh_model):
    """The tiny Llama with tied embeddings off, magnitude-pruned per block (no calibration needed)."""
    model = fresh_model("llama")
    layout = model_layout(model)
    plan = AllocationPlan(sparsity={"*": 0.5, "model.layers.0": 0.3, "model.layers.3": 0.7},
                          metric=MetricChoice("magnitude"))
    prune_(model, plan, None, layout=layout)
    return model, plan


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16"])
def test_dense_dtype_reloads_with_plain_transformers(pruned_llama, tiny_tokenizer, tmp_path, name):
    from transformers import AutoModelForCausalLM

    model, plan = pruned_llama
    dtype = DTYPES[name]
    info = save_checkpoint(model, tiny_tokenizer, tmp_path / name, plan, dtype=dtype)
    assert (info.format, info.dtype, info.compressed) == ("dense", name, ())
    assert json.loads((tmp_path / name / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    assert next(model.parameters()).dtype == torch.float32  # the model in memory is not cast
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype="auto")
    params = dict(reloaded.named_parameters())
    for key, param in model.named_parameters():
        assert params[key].dtype == dtype
        assert torch.equal(params[key], param.detach().to(dtype)), key
    assert AllocationPlan.load(tmp_path / name / "plan.json").sparsity == plan.sparsity
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert info.dense_bytes == fp32_bytes * dtype.itemsize // 4
    assert info.dense_bytes < info.bytes_on_disk < info.dense_bytes + 64 * 1024  # + the safetensors header


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_weight_files_get_ordinary_permissions(pruned_llama, tmp_path, mask, mode):
    model, plan = pruned_llama
    previous = os.umask(mask)
    try:
        save_checkpoint(model, None, tmp_path / "out", plan)
    finally:
        os.umask(previous)
    for path in (tmp_path / "out").glob("*.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path  # transformers alone leaves 0600


def test_recipe_lists_one_ratio_per_linear_in_module_order(tiny_llama):
    layout = model_layout(tiny_llama)
    plan = AllocationPlan(sparsity={"*": 0.5, "model.layers.1": 0.6, "model.layers.2.mlp.up_proj": 0.8},
                          metric=MetricChoice("sparsegpt"))
    recipe = plan_recipe(plan, layout.linears)
    (name, modifier), = recipe["sparsity_stage"]["sparsity_modifiers"].items()
    assert name == "SparseGPTModifier" and modifier["block_size"] == 128 and modifier["dampening_frac"] == 0.01
    names = [n for n, m in tiny_llama.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert modifier["targets"] == names  # llm-compressor pairs ratios with matches in named_modules() order
    assert recipe_sparsity(recipe) == plan.expand(layout.linears)


def test_recipe_header_says_what_llm_compressor_cannot_express(tiny_llama, tmp_path):
    layout = model_layout(tiny_llama)
    plan = AllocationPlan(sparsity={"*": 0.5}, metric=MetricChoice("stade", {"bias": True}),
                          kv_bits={"model.layers.0.self_attn": {"k": 4, "v": 8}},
                          dropped_layers=["model.layers.3"])
    text = write_recipe(plan, layout.linears, tmp_path / "recipe.yaml").read_text(encoding="utf-8")
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert header[0].startswith("# llm-compressor recipe written by sparsealloc")
    joined = "\n".join(header)
    assert "per block" in joined
    assert "no 'stade' modifier" in joined and "WandaPruningModifier" in joined
    assert "bias" in joined and "kv_bits" in joined and "model.layers.3" in joined
    assert list(yaml.safe_load(text)["sparsity_stage"]["sparsity_modifiers"]) == ["WandaPruningModifier"]


def test_per_linear_plan_is_named_per_linear(tiny_llama, tmp_path):
    layout = model_layout(tiny_llama)
    plan = AllocationPlan(sparsity={"*": 0.5, "model.layers.0.self_attn.q_proj": 0.7})
    text = write_recipe(plan, layout.linears, tmp_path / "recipe.yaml").read_text(encoding="utf-8")
    assert "(per Linear) is expressed exactly" in text.replace("\n# ", " ")


def _calib(model_dir, text) -> list[str]:
    return ["--model", str(model_dir), "--calib-text", str(text), "--calib-samples", "2", "--calib-seq-len", "8"]


@pytest.mark.parametrize("case", ["bad-format", "bad-dtype", "dtype-without-save", "format-without-save",
                                  "ct-without-package", "tasks-empty", "include-path-missing"])
def test_bad_save_and_eval_flags_exit_2_with_one_line(case, tiny_llama_dir, text_file, tmp_path, monkeypatch):
    plan = AllocationPlan(sparsity={"*": 0.5}).save(tmp_path / "plan.json")
    out = tmp_path / "out"
    calib = _calib(tiny_llama_dir, text_file)
    apply = ["apply", "--plan", str(plan), *calib, "--save", str(out)]
    argv, fragments = {
        "bad-format": ([*apply, "--format", "gguf"], ["--format", "invalid choice", "gguf"]),
        "bad-dtype": ([*apply, "--dtype", "fp8"], ["--dtype", "invalid choice", "fp8"]),
        "dtype-without-save": (["prune", *calib, "--no-eval", "--dtype", "bf16"], ["--dtype", "--save"]),
        "format-without-save": (["prune", *calib, "--no-eval", "--format", "compressed-tensors"],
                                ["--format", "--save"]),
        "ct-without-package": ([*apply, "--format", "compressed-tensors"],
                               ["compressed-tensors", "pip install 'sparsealloc[interop]'"]),
        "tasks-empty": (["evaluate", "--model", str(tiny_llama_dir), "--tasks", ","], ["--tasks"]),
        "include-path-missing": (["evaluate", "--model", str(tiny_llama_dir), "--tasks", "x",
                                  "--include-path", str(tmp_path / "none")], ["--include-path", "none"]),
    }[case]
    if case == "ct-without-package":
        monkeypatch.setitem(sys.modules, "compressed_tensors", None)  # import fails as if not installed
    if case == "include-path-missing":
        pytest.importorskip("lm_eval", reason="the lm-eval check runs after lm-eval imports; pip install "
                                              "'sparsealloc[interop]'")
    code, stdout, err = run_cli(["--quiet", *argv])
    assert code == 2, (stdout, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out.exists()
