"""The command line, in-process: prune and evaluate a tiny model from disk; one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from sparsealloc.cli.main import main
from sparsealloc.core.plan import AllocationPlan, MetricChoice
from sparsealloc.pruning.model.structure import model_layout


def common_args(model_dir: Path, text: Path) -> list[str]:
    return ["--model", str(model_dir), "--calib-text", str(text), "--calib-samples", "4",
            "--calib-seq-len", "16", "--eval-text", str(text), "--eval-seq-len", "16", "--eval-windows", "3"]


def parse_output(out: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)


def test_prune_and_save(tiny_llama_dir, text_file, tmp_path, capsys):
    out_dir = tmp_path / "pruned"
    code = main(["--quiet", "prune", *common_args(tiny_llama_dir, text_file), "--sparsity", "0.5",
                 "--save", str(out_dir)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    fields = parse_output(captured.out)
    assert float(fields["perplexity"]) > 1
    assert float(fields["achieved_sparsity"]) == pytest.approx(0.5, abs=1e-3)
    assert fields["metric"] == "wanda" and fields["saved"] == str(out_dir)

    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    layout = model_layout(model)
    modules = dict(model.named_modules())
    zeros = sum(int((modules[n].weight == 0).sum()) for n in layout.linears)
    assert zeros / layout.total_params == pytest.approx(0.5, abs=1e-3)
    plan = AllocationPlan.load(out_dir / "plan.json")
    assert plan.model["n_layers"] == 4
    assert plan.provenance["calibration"]["samples"] == 4

    # the saved directory evaluates like any model
    code = main(["--quiet", "evaluate", "--model", str(out_dir), "--text", str(text_file), "--seq-len", "16",
                 "--windows", "3"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    evaluated = parse_output(captured.out)
    assert float(evaluated["perplexity"].split()[0]) == pytest.approx(float(fields["perplexity"]), rel=1e-3)
    assert float(evaluated["sparsity (prunable linears)"]) == pytest.approx(0.5, abs=1e-3)


def test_prune_with_plan_and_pattern(tiny_llama_dir, text_file, tmp_path, capsys):
    plan_path = AllocationPlan(sparsity={"model.layers.1": 0.5, "model.layers.2.mlp": 0.25}).save(
        tmp_path / "plan.json")
    code = main(["--quiet", "prune", *common_args(tiny_llama_dir, text_file), "--plan", str(plan_path),
                 "--no-eval"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    fields = parse_output(captured.out)
    assert "perplexity" not in fields
    assert 0.0 < float(fields["achieved_sparsity"]) < 0.25

    code = main(["--quiet", "--log-format", "json", "prune", *common_args(tiny_llama_dir, text_file),
                 "--pattern", "2:4", "--metric", "stade", "--metric-arg", "bias=true"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["pattern"] == "2:4" and result["metric"] == "stade"
    assert result["achieved_sparsity"] == pytest.approx(0.5)


def test_evaluate_dense(tiny_llama_dir, text_file, capsys):
    code = main(["--quiet", "evaluate", "--model", str(tiny_llama_dir), "--text", str(text_file), "--seq-len",
                 "16", "--windows", "3", "--report"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "perplexity: " in captured.out
    assert "model.layers.0.self_attn.q_proj" in captured.out
    assert float(parse_output(captured.out)["sparsity (prunable linears)"]) == 0.0


BAD = {
    "sparsity-too-high": (["--sparsity", "1.5"], "1.5"),
    "bad-pattern": (["--pattern", "3:3"], "3:3"),
    "unknown-metric": (["--metric", "wandda"], "wandda"),
    "plan-and-sparsity": (["--plan", "{plan}", "--sparsity", "0.5"], "--sparsity"),
    "plan-bad-json": (["--plan", "{bad_json}"], "valid JSON"),
    "plan-missing": (["--plan", "{missing}"], "missing.json"),
    "nm-wrong-sparsity": (["--pattern", "2:4", "--sparsity", "0.7"], "2:4"),
    "plan-unknown-module": (["--plan", "{foreign_plan}"], "model.layers.9"),
    "plan-unknown-metric": (["--plan", "{plan_bad_metric}"], "wandda"),
    "metric-bad-param": (["--metric", "wanda", "--metric-arg", "alpha=2", "--no-eval"], "alpha"),
    "plan-bad-param": (["--plan", "{plan_bad_param}"], "alpha"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_prune_inputs(case, tiny_llama_dir, text_file, tmp_path, capsys):
    paths = {
        "plan": AllocationPlan(sparsity={"*": 0.5}).save(tmp_path / "plan.json"),
        "foreign_plan": AllocationPlan(sparsity={"model.layers.9": 0.5}).save(tmp_path / "foreign.json"),
        "bad_json": tmp_path / "bad.json",
        "missing": tmp_path / "missing.json",
        "plan_bad_metric": AllocationPlan(sparsity={"*": 0.5}, metric=MetricChoice("wandda")).save(
            tmp_path / "bad_metric.json"),
        "plan_bad_param": AllocationPlan(sparsity={"*": 0.5}, metric=MetricChoice("ria", {"alpha": 1})).save(
            tmp_path / "bad_param.json"),
    }
    paths["bad_json"].write_text("{not json", encoding="utf-8")
    extra, fragment = BAD[case]
    extra = [arg.format(**paths) for arg in extra]
    quiet = ["--quiet"] if case == "plan-unknown-module" else []  # needs the model: no loading bars
    code = main([*quiet, "prune", *common_args(tiny_llama_dir, text_file), *extra])
    _assert_one_line_error(code, capsys, fragment)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["prune", "--model", "/nonexistent"], "/nonexistent"),
        (["evaluate", "--model", "/nonexistent"], "/nonexistent"),
        (["prune", "--calib-text", "/nonexistent/calib.txt"], "calib.txt"),
        (["evaluate", "--text", "/nonexistent/eval.txt"], "eval.txt"),
        (["frobnicate"], "frobnicate"),
        ([], "required"),
        (["prune", "--calib-samples", "0"], "0"),
        (["prune", "--metric-arg", "novalue"], "KEY=VALUE"),
    ],
)
def test_bad_inputs_anywhere(argv, fragment, capsys):
    _assert_one_line_error(main(argv), capsys, fragment)


def _assert_one_line_error(code, capsys, fragment):
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error:")
    assert fragment in lines[0]
    assert "Traceback" not in captured.err + captured.out


def test_help(capsys):
    assert main(["--help"]) == 0
    assert "prune" in capsys.readouterr().out


def test_console_script_help():
    exe = shutil.which("sparsealloc") or str(Path(sys.executable).parent / "sparsealloc")
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "prune" in result.stdout and "evaluate" in result.stdout


def test_module_entry_point_reports_errors():
    result = subprocess.run([sys.executable, "-P", "-m", "sparsealloc.cli", "prune", "--sparsity", "2"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and "Traceback" not in result.stderr


def test_global_options_are_accepted_after_the_command(capsys):
    from sparsealloc.cli.main import _globals_first

    assert _globals_first(["study", "run", "--quiet", "--log-format", "json", "--trials", "3"]) == [
        "--quiet", "--log-format", "json", "study", "run", "--trials", "3"]
    assert main(["prune", "--sparsity", "1.5", "--quiet"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
