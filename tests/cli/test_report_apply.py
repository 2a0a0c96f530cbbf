"""``sparsealloc report`` and ``sparsealloc apply`` on tiny studies of the tiny on-disk Llama.

One store holds a single-objective TPE study ("single", 6 trials) and a two-objective NSGA-III
study over layerwise sparsity and KV bits ("multi", kl + kv_bytes, 8 trials), both validated.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
import yaml

from sparsealloc.cli.main import main
from sparsealloc.core.plan import AllocationPlan, MetricChoice
from sparsealloc.pruning.model.models import load_layout
from sparsealloc.storage import figures
from sparsealloc.storage.recipes import recipe_sparsity
from sparsealloc.storage.report import (
    per_layer_frame,
    report_trial,
    warm_start_plan,
    write_report,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

N_BLOCKS = 4  # tests/conftest.py N_LAYERS
LM_EVAL = "lm_eval --model hf --model_args pretrained={} --tasks wikitext,hellaswag,arc_easy --batch_size 8"


def data_args(model_dir: Path, text: Path) -> list[str]:
    return ["--model", str(model_dir), "--calib-text", str(text), "--calib-samples", "4", "--calib-seq-len", "16",
            "--eval-text", str(text), "--eval-seq-len", "16", "--eval-windows", "2"]


def calib_args(model_dir: Path, text: Path) -> list[str]:
    return ["--model", str(model_dir), "--calib-text", str(text), "--calib-samples", "4", "--calib-seq-len", "16"]


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(code: int, out: str, err: str, *fragments: str) -> str:
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error:"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in out + err
    return lines[0]


@pytest.fixture(scope="module")
def store(tiny_llama_dir, text_file, tmp_path_factory):
    """The two studies, run once by the CLI into one SQLite store."""
    root = tmp_path_factory.mktemp("report-store")
    url = f"sqlite:///{root / 's.db'}"
    data = data_args(tiny_llama_dir, text_file)
    code, _, err = run_cli(["--quiet", "study", "run", "--name", "single", "--storage", url, *data,
                            "--target-sparsity", "0.5", "--trials", "6"])
    assert code == 0, err
    code, _, err = run_cli(["--quiet", "study", "run", "--name", "multi", "--storage", url, *data,
                            "--target-sparsity", "0.5", "--space", "layerwise,kv", "--objectives", "kl,kv_bytes",
                            "--sampler", "nsga3", "--population-size", "4", "--trials", "8"])
    assert code == 0, err
    return {"url": url, "root": root}


@pytest.fixture(scope="module")
def numels(tiny_llama_dir) -> dict[str, int]:
    return dict(load_layout(str(tiny_llama_dir)).numels)


def assert_real_png(path: Path) -> None:
    """A PNG over 1 KB that is not a blank single-colour image."""
    import numpy as np
    from matplotlib import image

    assert path.is_file() and path.stat().st_size > 1024, path
    pixels = image.imread(str(path))
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    colours = np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)
    assert len(colours) > 10, f"{path.name} looks blank ({len(colours)} colours)"


def load(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url)


# --------------------------------------------------------------------------- report
def test_report_single_objective(store, tmp_path):
    out = tmp_path / "report"
    code, stdout, err = run_cli(["--quiet", "report", "single", "--storage", store["url"], "--out", str(out)])
    assert code == 0, err
    for stem in ("history", "per_layer_sparsity", "proxy_vs_ppl"):
        assert_real_png(out / f"{stem}.png")
        page = (out / f"{stem}.html").read_text(encoding="utf-8")
        assert "data:image/png;base64," in page and "<table" in page  # self-contained, with its data
        assert f"wrote: {out / f'{stem}.png'}" in stdout
    assert not (out / "pareto.png").exists()  # one objective: no front
    assert not (out / "kv_bits.png").exists() and "no KV-cache bits" in stdout

    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert summary.startswith("# Study report: single")
    assert "**trials**: 6 complete of 6" in summary
    assert "![Per-layer sparsity](per_layer_sparsity.png)" in summary
    study = load(store["url"], "single")
    assert f"trial {study.best_trial.number} (best {study.metric_names[0]})" in summary
    assert study.metric_names[0] == "hidden"  # the default proxy
    assert "spearman(proxy, PPL)" in summary
    html = (out / "summary.html").read_text(encoding="utf-8")
    assert "Study report: single" in html and html.count("data:image/png;base64,") == 3
    assert "<table" in html and "6 complete of 6" in html


def test_report_multi_objective(store, tmp_path):
    out = tmp_path / "report"
    code, stdout, err = run_cli(["--quiet", "report", "multi", "--storage", store["url"], "--out", str(out)])
    assert code == 0, err
    for stem in ("history", "pareto", "per_layer_sparsity", "kv_bits", "proxy_vs_ppl"):
        assert_real_png(out / f"{stem}.png")
        assert (out / f"{stem}.html").is_file()
    assert not (out / "pareto_3d.png").exists()  # only for three objectives
    summary = (out / "summary.md").read_text(encoding="utf-8")
    study = load(store["url"], "multi")
    assert "# Study report: multi" in summary and "**trials**: 8 complete of 8" in summary
    assert f"**pareto set**: {len(study.best_trials)} trials" in summary
    assert "## Pareto set" in summary and "kv_bytes" in summary


def test_per_layer_table_has_one_row_per_block(store, numels):
    for name in ("single", "multi"):
        study = load(store["url"], name)
        trial = report_trial(study)
        plan = AllocationPlan.from_dict(trial.user_attrs["plan"])
        owl = warm_start_plan(study, "owl")
        assert owl is not None
        layers = per_layer_frame(plan, 0.5, owl, numels)
        assert list(layers["block"]) == list(range(N_BLOCKS))
        assert (layers["uniform"] == 0.5).all()
        # parameter-weighted, the blocks average to the exact budget
        block_weights = [sum(n for m, n in numels.items() if m.startswith(f"model.layers.{b}."))
                         for b in range(N_BLOCKS)]
        mean = sum(s * w for s, w in zip(layers["best"], block_weights)) / sum(block_weights)
        assert mean == pytest.approx(0.5, abs=1e-9)
        mean_owl = sum(s * w for s, w in zip(layers["owl"], block_weights)) / sum(block_weights)
        assert mean_owl == pytest.approx(0.5, abs=1e-9)
        # without the layout, a plan keyed per module still gives one value per block
        assert list(per_layer_frame(plan, 0.5).block) == list(range(N_BLOCKS))
        # the plotted line has one x point per block
        xs = figures.per_layer_figure(layers, trial.number).axes[0].lines[0].get_xdata()
        assert list(xs) == list(range(N_BLOCKS))
        if name == "multi":
            assert {"k_bits", "v_bits"} <= set(layers)
            for b, bits in enumerate(plan.kv_bits.values()):
                assert (layers.k_bits[b], layers.v_bits[b]) == (bits["k"], bits["v"])
        else:
            assert "k_bits" not in layers


def test_report_three_objectives_without_validation(tmp_path):
    """A synthetic 3-objective study (no model): 2D projection plus 3D scatter, notes for what is absent."""
    study = optuna.create_study(directions=["minimize"] * 3, study_name="three")
    study.set_metric_names(["kl", "remaining_weights", "kv_bytes"])
    study.set_user_attr("sparsealloc:spec", {"target_sparsity": 0.6, "model": "x", "space": ["layerwise"]})
    for i in range(8):
        ratios = {f"model.layers.{b}": 0.6 + 0.02 * ((i + b) % 3 - 1) for b in range(3)}
        plan = AllocationPlan(sparsity=ratios, metric=MetricChoice("wanda"), model={"n_layers": 3})
        trial = study.ask()
        trial.set_user_attr("plan", plan.to_dict())
        study.tell(trial, [0.1 + 0.01 * ((i * 5) % 7), 1.0 - 0.05 * i, float(100 + 13 * ((i * 3) % 5))])
    report = write_report(study, tmp_path / "r")
    for stem in ("history", "pareto", "pareto_3d", "per_layer_sparsity"):
        assert_real_png(tmp_path / "r" / f"{stem}.png")
    assert not (tmp_path / "r" / "proxy_vs_ppl.png").exists()
    notes = " ".join(report.notes)
    assert "no validation results" in notes and "no completed 'owl'" in notes and "unweighted" in notes
    assert list(report.tables["per_layer"]["block"]) == [0, 1, 2]
    assert "Notes" in (tmp_path / "r" / "summary.md").read_text(encoding="utf-8")


# --------------------------------------------------------------------------- apply
def export_plan(url: str, name: str, out: Path) -> Path:
    code, stdout, err = run_cli(["--quiet", "export", name, "--storage", url, "--out", str(out)])
    assert code == 0, err
    return sorted(out.rglob("*.json"))[0]


def linear_zeros(model) -> dict[str, torch.Tensor]:
    from sparsealloc.pruning import model_layout

    modules = dict(model.named_modules())
    return {n: modules[n].weight.detach() == 0 for n in model_layout(model).linears}


def test_apply_writes_checkpoint_recipe_and_lm_eval_line(store, tiny_llama_dir, text_file, numels, tmp_path):
    from transformers import AutoModelForCausalLM

    plan_path = export_plan(store["url"], "multi", tmp_path / "export")  # a Pareto plan with KV bits
    plan = AllocationPlan.load(plan_path)
    save = tmp_path / "pruned"
    code, stdout, err = run_cli(["--quiet", "apply", "--plan", str(plan_path), *calib_args(tiny_llama_dir, text_file),
                                 "--save", str(save)])
    assert code == 0, err
    lines = stdout.splitlines()
    assert LM_EVAL.format(save.resolve()) in lines
    assert f"recipe: {save / 'recipe.yaml'}" in lines
    fields = dict(line.split(": ", 1) for line in lines if ": " in line)
    assert float(fields["achieved_sparsity"]) == pytest.approx(0.5, abs=1e-3)

    # a plain transformers checkpoint whose zeros are the plan's
    model = AutoModelForCausalLM.from_pretrained(save, dtype=torch.float32)
    ratios = plan.expand(list(numels))
    zeros = linear_zeros(model)
    assert set(zeros) == set(ratios)
    for name, mask in zeros.items():
        rows = mask.shape[0]
        assert abs(mask.sum().item() - ratios[name] * mask.numel()) <= rows, name  # ≤ one weight per row
    saved_plan = AllocationPlan.load(save / "plan.json")
    assert saved_plan.sparsity == plan.sparsity and saved_plan.kv_bits == plan.kv_bits
    assert saved_plan.provenance["calibration"]["samples"] == 4

    # the same zeros as `prune --plan` with the same calibration (shared code path)
    again = tmp_path / "pruned-again"
    code, _, err = run_cli(["--quiet", "prune", "--plan", str(plan_path), *calib_args(tiny_llama_dir, text_file),
                            "--no-eval", "--save", str(again)])
    assert code == 0, err
    other = linear_zeros(AutoModelForCausalLM.from_pretrained(again, dtype=torch.float32))
    assert all(torch.equal(zeros[n], other[n]) for n in zeros)

    # recipe.yaml: llm-compressor recipe, one ratio per module equal to the plan's per-module sparsity
    text = (save / "recipe.yaml").read_text(encoding="utf-8")
    assert text.startswith("# llm-compressor recipe")
    recipe = yaml.safe_load(text)
    modifier = recipe["sparsity_stage"]["sparsity_modifiers"]["WandaPruningModifier"]
    assert recipe_sparsity(recipe) == ratios
    assert modifier["targets"] == list(numels) and modifier["mask_structure"] == "0:0"


def test_apply_sparsegpt_plan_collects_the_gram(tiny_llama_dir, text_file, tmp_path):
    plan_path = AllocationPlan(sparsity={"*": 0.5, "model.layers.0": 0.25}, metric=MetricChoice("sparsegpt"),
                               pattern="unstructured").save(tmp_path / "plan.json")
    save = tmp_path / "sgpt"
    code, stdout, err = run_cli(["--quiet", "--log-format", "json", "apply", "--plan", str(plan_path),
                                 *calib_args(tiny_llama_dir, text_file), "--save", str(save)])
    assert code == 0, err
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["metric"] == "sparsegpt" and result["lm_eval"] == LM_EVAL.format(save.resolve())
    recipe = yaml.safe_load((save / "recipe.yaml").read_text(encoding="utf-8"))
    (name,) = recipe["sparsity_stage"]["sparsity_modifiers"]
    assert name == "SparseGPTModifier"
    ratios = recipe_sparsity(recipe)
    assert ratios["model.layers.0.mlp.up_proj"] == 0.25 and ratios["model.layers.3.mlp.up_proj"] == 0.5


def test_apply_sequential_compresses_block_by_block_and_says_so(tiny_llama_dir, text_file, tmp_path):
    from safetensors.torch import load_file

    plan_path = AllocationPlan(sparsity={"*": 0.5}, metric=MetricChoice("sparsegpt")).save(tmp_path / "plan.json")
    saved = {}
    for mode in ("independent", "sequential"):
        extra = ["--sequential"] if mode == "sequential" else []
        code, _, err = run_cli(["--quiet", "apply", "--plan", str(plan_path), *calib_args(tiny_llama_dir, text_file),
                                "--save", str(tmp_path / mode), *extra])
        assert code == 0, err
        saved[mode] = load_file(str(tmp_path / mode / "model.safetensors"))
        provenance = AllocationPlan.load(tmp_path / mode / "plan.json").provenance
        assert provenance.get("sequential", False) == (mode == "sequential")
    first = "model.layers.0.self_attn.q_proj.weight"
    last = "model.layers.3.mlp.down_proj.weight"
    assert torch.equal(saved["independent"][first], saved["sequential"][first])  # dense inputs either way
    assert not torch.equal(saved["independent"][last], saved["sequential"][last])
    dropped = AllocationPlan(sparsity={"*": 0.5}, metric=MetricChoice("sparsegpt"),
                             dropped_layers=("model.layers.3",)).save(tmp_path / "dropped.json")
    code, _, err = run_cli(["apply", "--plan", str(dropped), *calib_args(tiny_llama_dir, text_file),
                            "--save", str(tmp_path / "d"), "--sequential"])
    assert code == 2 and "without dropped blocks" in err and not (tmp_path / "d").exists()


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("case", ["apply-missing-plan", "apply-foreign-plan", "apply-no-save", "apply-save-is-file",
                                  "report-unknown-study", "report-missing-store"])
def test_bad_inputs_exit_2_with_one_line(case, store, tiny_llama_dir, text_file, tmp_path):
    out = tmp_path / "out"
    foreign = AllocationPlan(sparsity={"model.layers.9": 0.5}).save(tmp_path / "foreign.json")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x", encoding="utf-8")
    calib = calib_args(tiny_llama_dir, text_file)
    argv, fragments = {
        "apply-missing-plan": (["apply", "--plan", str(tmp_path / "nope.json"), *calib, "--save", str(out)],
                               ["readable plan JSON file", "nope.json"]),
        "apply-foreign-plan": (["apply", "--plan", str(foreign), *calib, "--save", str(out)],
                               ["model.layers.9", "not a prunable Linear"]),
        "apply-no-save": (["apply", "--plan", str(foreign), *calib], ["required", "--save"]),
        "apply-save-is-file": (["apply", "--plan", str(foreign), *calib, "--save", str(a_file)],
                               ["folder", "file.txt"]),
        "report-unknown-study": (["report", "nosuch", "--storage", store["url"], "--out", str(out)],
                                 ["no study named 'nosuch'", "multi", "single"]),
        "report-missing-store": (["report", "single", "--storage", f"sqlite:///{tmp_path / 'none.db'}",
                                  "--out", str(out)], ["does not exist", "none.db"]),
    }[case]
    assert_one_line_error(*run_cli(["--quiet", *argv]), *fragments)
    assert not out.exists()
    assert not (tmp_path / "none.db").exists()


def test_pareto_figure_draws_the_uniform_ladder_on_the_front_axes():
    """The uniform KV warm starts ("uniform", "uniform-kvN") are drawn as their own line, by bytes."""
    frame = pd.DataFrame({
        "trial": [0, 1, 2, 3, 4], "kl": [0.01, 0.05, 0.2, 0.03, 0.04], "kv_bytes": [900.0, 500.0, 300.0, 450.0, 600.0],
        "pareto": [True, False, True, True, False],
        "warm_start": ["uniform", "uniform-kv4", "uniform-kv2", None, "owl"]})
    ladder = figures.uniform_ladder(frame)
    assert list(ladder.trial) == [2, 1, 0]  # sorted by bytes; "owl" and searched trials are not on it
    fig = figures.pareto_figure(frame, ["kl", "kv_bytes"])
    drawn = [line for line in fig.axes[0].lines if line.get_label() == "uniform ladder"]
    assert len(drawn) == 1 and list(drawn[0].get_xdata()) == [0.2, 0.05, 0.01]
    assert figures.uniform_ladder(frame.drop(columns="kv_bytes")).empty
