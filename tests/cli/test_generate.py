"""``sparsealloc generate`` on a tiny Llama from disk: plan applied, real quantized cache, bytes, errors."""

from __future__ import annotations

import json

import pytest

from sparsealloc.cli.main import main
from sparsealloc.core.plan import AllocationPlan
from sparsealloc.objectives.kv_memory import kv_cache_bytes

ATTENTION = [f"model.layers.{i}.self_attn" for i in range(4)]


def fields(out: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in out.split("---", 1)[1].splitlines() if ": " in line)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["--quiet", "generate", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_with_a_plan_prunes_and_uses_the_plans_bits(tiny_llama_dir, text_file, tmp_path, capsys):
    kv_bits = {a: {"k": 2 + 2 * (i % 2), "v": 8 if i == 0 else 2} for i, a in enumerate(ATTENTION)}
    plan = AllocationPlan(sparsity={"*": 0.5}, kv_bits=kv_bits,
                          provenance={"kv": {"group_size": 4, "residual": 2}}).save(tmp_path / "plan.json")
    code, out, err = run(capsys, "--model", str(tiny_llama_dir), "--plan", str(plan), "--prompt", "the quick brown",
                         "--max-new-tokens", "12", "--ignore-eos", "--threads", "1", "--calib-text", str(text_file),
                         "--calib-samples", "4", "--calib-seq-len", "16")
    assert code == 0, err
    assert out.startswith("the quick brown ")
    got = fields(out)
    assert float(got["achieved_sparsity"]) == pytest.approx(0.5, abs=1e-3)
    assert got["new_tokens"] == "12" and got["decoding"] == "greedy" and float(got["tokens_per_s"]) > 0
    assert (got["kv_group_size"], got["kv_residual"]) == ("4", "2")  # from the plan's study
    tokens = int(got["prompt_tokens"]) + 11
    assert int(got["cache_tokens"]) == tokens
    expected = kv_cache_bytes(ATTENTION, kv_bits, 2, 16, tokens, 4, 2)
    assert int(got["cache_bytes"]) == int(got["cache_bytes_analytic"]) == expected
    assert int(got["cache_bytes_fp16"]) == kv_cache_bytes(ATTENTION, {}, 2, 16, tokens) > expected


def test_generate_without_plan_uniform_bits_and_json(tiny_llama_dir, capsys):
    code, out, err = run(capsys, "--model", str(tiny_llama_dir), "--prompt", "the dog", "--max-new-tokens", "40",
                         "--ignore-eos", "--kv-bits", "2", "--kv-group-size", "8", "--do-sample", "--seed", "3",
                         "--log-format", "json")
    assert code == 0, err
    record = json.loads(out.strip().splitlines()[-1])
    assert record["decoding"] == "sampled" and record["new_tokens"] == 40 and record["kv_mean_bits"] == 2
    assert record["cache_bytes"] == record["cache_bytes_analytic"]
    assert record["cache_vs_fp16"] < 0.5
    again = run(capsys, "--model", str(tiny_llama_dir), "--prompt", "the dog", "--max-new-tokens", "40",
                "--ignore-eos", "--kv-bits", "2", "--kv-group-size", "8", "--do-sample", "--seed", "3",
                "--log-format", "json")[1]
    assert json.loads(again.strip().splitlines()[-1])["text"] == record["text"]  # seeded sampling


@pytest.mark.parametrize(("argv", "fragments"), [
    (["--kv-bits", "5"], ["--kv-bits", "'5'"]),
    (["--kv-residual", "-1"], ["--kv-residual", "'-1'"]),
    (["--plan", "missing.json"], ["missing.json"]),
    (["--prompt", ""], ["non-empty --prompt"]),
])
def test_bad_input_is_one_line_exit_2(tiny_llama_dir, capsys, argv, fragments):
    base = ["--model", str(tiny_llama_dir), "--prompt", "the dog"]
    code, out, err = run(capsys, *base, *argv)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    for fragment in fragments:
        assert fragment in err


def test_a_plan_for_another_model_fails_before_generating(tiny_llama_dir, tmp_path, capsys):
    plan = AllocationPlan(kv_bits={"model.layers.7.self_attn": {"k": 4, "v": 4}}).save(tmp_path / "other.json")
    code, out, err = run(capsys, "--model", str(tiny_llama_dir), "--plan", str(plan), "--prompt", "the dog")
    assert code == 2 and "model.layers.7.self_attn" in err and out == ""
