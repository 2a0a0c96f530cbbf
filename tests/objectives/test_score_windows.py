"""Held-out scoring windows (``calibration.score_samples``): statistics from one set of windows of
the calibration text, trials scored on another, disjoint one."""

from __future__ import annotations

import pytest
import torch

from sparsealloc.core.errors import SpecError
from sparsealloc.objectives.context import EvalContext
from sparsealloc.objectives.reconstruction import forward_errors
from sparsealloc.pruning.calibration.text import disjoint_windows, sample_windows, window_starts
from sparsealloc.search.samplers.evo import calibration_pool
from sparsealloc.search.session import build_evaluator
from sparsealloc.spaces.spec import StudySpec


def test_disjoint_windows_share_no_token_with_the_taken_windows_or_each_other():
    stream = torch.arange(1000)  # a token's value is its position
    taken = window_starts(stream.numel(), 12, 20, seed=3)
    held_out = disjoint_windows(stream, 30, 20, taken, seed=5)
    assert held_out.shape == (30, 20)
    used = {int(t) for s in taken for t in stream[s : s + 20]}
    positions = held_out.flatten().tolist()
    assert len(set(positions)) == len(positions)  # no two held-out windows overlap
    assert not used & set(positions)
    assert all(int(w[-1] - w[0]) == 19 for w in held_out)  # consecutive tokens
    assert torch.equal(held_out, disjoint_windows(stream, 30, 20, taken, seed=5))
    assert not torch.equal(held_out, disjoint_windows(stream, 30, 20, taken, seed=6))
    # sample_windows draws at window_starts' offsets (what the statistics windows are).
    assert torch.equal(sample_windows(stream, 12, 20, seed=3)[:, 0], torch.tensor(taken))


def test_disjoint_windows_say_how_many_fit_when_the_text_is_too_short():
    stream = torch.arange(200)
    with pytest.raises(SpecError, match=r"expected a calibration text with 9 windows of 20 tokens besides the 2 "
                                        r"statistics windows, but it has room for [0-9]+"):
        disjoint_windows(stream, 9, 20, [0, 100], seed=0)


def test_statistics_come_from_the_windows_and_scores_from_the_score_windows(model_builder, windows_builder):
    model = model_builder("llama")
    windows, scored = windows_builder(6, 16, seed=1), windows_builder(5, 16, seed=9)
    split = EvalContext.build(model, windows, batch_size=2, score_windows=scored)
    plain = EvalContext.build(model, windows, batch_size=2)
    on_scored = EvalContext.build(model, scored, batch_size=2)
    name = split.layout.linears[0]
    assert torch.equal(split.stats[name].sum_sq, plain.stats[name].sum_sq)
    assert torch.equal(split.scored, scored) and torch.equal(plain.scored, windows)
    with torch.no_grad():  # any pruned model: here half of every Linear's weights zeroed
        generator = torch.Generator().manual_seed(0)
        for n in split.layout.linears:
            weight = model.get_submodule(n).weight
            weight.mul_((torch.rand(weight.shape, generator=generator) > 0.5).to(weight.dtype))
    try:
        kinds = ("kl", "hidden", "logits")
        assert forward_errors(split, kinds) == pytest.approx(forward_errors(on_scored, kinds), rel=1e-5)
        assert forward_errors(split, kinds, windows=(1, 4)) == pytest.approx(
            forward_errors(on_scored, kinds, windows=(1, 4)), rel=1e-5)
        assert forward_errors(split, ("kl",))["kl"] != pytest.approx(forward_errors(plain, ("kl",))["kl"], rel=1e-3)
        with pytest.raises(ValueError, match=r"window indices must lie in \[0, 5\)"):
            forward_errors(split, ("kl",), windows=(5,))
    finally:
        plain.restore_()


def _spec(model_dir, text_file, **calibration):
    return StudySpec.from_dict({
        "name": "held-out", "model": str(model_dir), "target_sparsity": 0.5, "trials": 2, "sampler": "evo",
        "evo": {"stages": [[2, 2], [3, 1]]}, "device": "cpu",
        "calibration": {"text": str(text_file), "samples": 4, "seq_len": 16, "batch_size": 2, **calibration}})


def test_a_study_with_score_samples_scores_its_trials_on_that_many_held_out_windows(tiny_llama_dir, text_file):
    spec = _spec(tiny_llama_dir, text_file, score_samples=6)
    evaluator = build_evaluator(spec)
    assert evaluator.ctx.windows.shape == (4, 16) and evaluator.ctx.scored.shape == (6, 16)
    assert calibration_pool(spec) == (6, None)
    assert evaluator.calibration["samples"] == 4  # what apply rebuilds: the statistics windows
    outcome = evaluator(evaluator.space.defaults(), windows=(0, 5))
    assert outcome.state == "complete" and outcome.attrs["calibration_tokens"] == 2 * 16
    assert calibration_pool(_spec(tiny_llama_dir, text_file)) == (4, None)
    assert build_evaluator(_spec(tiny_llama_dir, text_file)).ctx.score_windows is None
    with pytest.raises(ValueError, match="expected the held-out score_windows with the given windows"):
        build_evaluator(spec, windows=evaluator.ctx.windows)  # a worker given only half of the driver's windows


def test_a_calibration_text_shorter_than_a_window_is_a_spec_error(tiny_llama_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("a short text")
    with pytest.raises(SpecError, match="need more than seq_len=16"):
        build_evaluator(_spec(tiny_llama_dir, short))


@pytest.mark.parametrize("calibration, message", [
    ({"score_samples": -1}, "calibration.score_samples must be an integer >= 0"),
    ({"score_samples": 2}, r"calibration.score_samples \(the window pool\) must hold the largest evo stage"),
    ({"score_samples": 8, "text": None, "windows_file": "calib.jsonl"},
     "calibration.score_samples draws from calibration text; expected 0 with windows_file"),
])
def test_score_samples_is_checked(tmp_path, calibration, message):
    with pytest.raises(SpecError, match=message):
        _spec(tmp_path, tmp_path / "text.txt", **calibration).validate()


def test_score_samples_enters_the_spec_hash_only_when_on(tmp_path):
    spec = _spec(tmp_path, tmp_path / "text.txt")
    older = spec.to_dict()
    del older["calibration"]["score_samples"]  # a study stored before the field existed
    assert StudySpec.from_stored(older).spec_hash() == spec.spec_hash()
    assert _spec(tmp_path, tmp_path / "text.txt", score_samples=8).spec_hash() != spec.spec_hash()
