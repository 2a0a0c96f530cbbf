"""Calibration domains (``calibration.domains``) and the proxy weighted per domain
(``calibration.domain_weights``): each domain's mean, weighted, instead of one mean over all tokens."""

from __future__ import annotations

import pytest
import torch

from sparsealloc.core.errors import SpecError
from sparsealloc.objectives.context import EvalContext
from sparsealloc.objectives.reconstruction import forward_errors
from sparsealloc.pruning.calibration.text import (DOMAIN_SEPARATOR, TextSource, domain_starts, tokenize_stream,
                                                  window_domains)
from sparsealloc.search.samplers.evo import calibration_pool, stage_windows
from sparsealloc.search.session import build_evaluator
from sparsealloc.spaces.spec import StudySpec

KINDS = ("kl", "hidden", "logits")


def test_a_window_belongs_to_the_part_that_holds_its_middle_token():
    starts = [0, 100, 250]
    assert window_domains([0, 85, 90, 239, 240, 400], 20, starts) == (0, 0, 1, 1, 2, 2)


def test_domain_starts_are_where_each_part_begins_in_the_joined_stream(tiny_tokenizer):
    parts = ["the cat sat on the mat " * 5, "a dog ran in the park " * 7, "one two three " * 3]
    starts = domain_starts(tiny_tokenizer, parts)
    joined = tokenize_stream(tiny_tokenizer, DOMAIN_SEPARATOR.join(parts))
    assert starts[0] == 0 and starts[1] == tokenize_stream(tiny_tokenizer, parts[0] + DOMAIN_SEPARATOR).numel()
    assert starts[0] < starts[1] < starts[2] < joined.numel()
    # The last part's tokens end the joined stream (the boundary is where they begin, up to a merge).
    last = tokenize_stream(tiny_tokenizer, parts[2])
    assert abs((joined.numel() - starts[2]) - last.numel()) <= 2


def test_a_files_source_reads_its_files_as_one_text_and_round_trips(tmp_path):
    first, second = tmp_path / "prose.txt", tmp_path / "code.txt"
    first.write_text("some prose")
    second.write_text("def f(): pass")
    source = TextSource.of(None, None, domains=[str(first), str(second)])
    assert source.read() == "some prose" + DOMAIN_SEPARATOR + "def f(): pass"
    assert source.parts() == ["some prose", "def f(): pass"]
    assert TextSource.parse(source.describe()) == source


def _pruned_contexts(model_builder, windows_builder, domains, weights):
    model = model_builder("llama")
    windows = windows_builder(len(domains), 16, seed=1)
    weighted = EvalContext.build(model, windows, batch_size=4, window_domains=domains, domain_weights=weights)
    plain = EvalContext.build(model, windows, batch_size=4)
    with torch.no_grad():  # any pruned model: half of every Linear's weights zeroed
        generator = torch.Generator().manual_seed(0)
        for n in plain.layout.linears:
            weight = model.get_submodule(n).weight
            weight.mul_((torch.rand(weight.shape, generator=generator) > 0.5).to(weight.dtype))
    return weighted, plain


def test_a_weighted_proxy_is_the_weighted_mean_of_each_domains_proxy(model_builder, windows_builder):
    domains = (0, 1, 0, 0, 1, 0)  # batches of 4 hold both domains
    weighted, plain = _pruned_contexts(model_builder, windows_builder, domains, (1.0, 3.0))
    try:
        first = forward_errors(plain, KINDS, windows=[i for i, d in enumerate(domains) if d == 0])
        second = forward_errors(plain, KINDS, windows=[i for i, d in enumerate(domains) if d == 1])
        together = forward_errors(plain, KINDS)
        got = forward_errors(weighted, KINDS)
        for kind in KINDS:
            assert got[kind] == pytest.approx(0.25 * first[kind] + 0.75 * second[kind], rel=1e-6)
            assert got[kind] != pytest.approx(together[kind], rel=1e-4)  # not the per-token mean
        # A subset of windows weighs the domains it holds; with one domain, that domain's value.
        assert forward_errors(weighted, KINDS, windows=(0, 2)) == pytest.approx(
            forward_errors(plain, KINDS, windows=(0, 2)), rel=1e-6)
        reports = []
        forward_errors(weighted, ("kl",), report=lambda done, value: reports.append(value))
        assert reports[-1] == pytest.approx(got["kl"], rel=1e-9) and len(reports) == 2
    finally:
        plain.restore_()


def test_weights_proportional_to_the_token_shares_give_the_per_token_mean(model_builder, windows_builder):
    domains = (0, 0, 1, 0, 1, 0, 0, 0)  # 6 : 2 windows of equal length
    weighted, plain = _pruned_contexts(model_builder, windows_builder, domains, (6.0, 2.0))
    try:
        got, together = forward_errors(weighted, ("kl", "hidden")), forward_errors(plain, ("kl", "hidden"))
        assert got["kl"] == pytest.approx(together["kl"], rel=1e-6)  # KL: a mean per token either way
    finally:
        plain.restore_()


def test_weights_without_a_domain_for_every_window_are_refused(model_builder, windows_builder):
    model = model_builder("llama")
    windows = windows_builder(4, 16, seed=1)
    with pytest.raises(ValueError, match="domain weights need the domain of each of the 4 scored windows"):
        EvalContext.build(model, windows, domain_weights=(1.0, 1.0))
    with pytest.raises(SpecError, match=r"expected one domain weight per domain \(3\), but got 2"):
        EvalContext.build(model, windows, window_domains=(0, 1, 2, 0), domain_weights=(1.0, 1.0))


def _domain_files(tmp_path, text_file):
    words = text_file.read_text().split()
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text(" ".join(words[: len(words) // 3]))
    second.write_text(" ".join(words[len(words) // 3:]))
    return first, second


def _spec(model_dir, **calibration):
    return StudySpec.from_dict({
        "name": "domains", "model": str(model_dir), "target_sparsity": 0.5, "trials": 2, "sampler": "evo",
        "evo": {"stages": [[2, 2], [4, 1]]}, "device": "cpu",
        "calibration": {"samples": 8, "seq_len": 16, "batch_size": 2, **calibration}})


def test_a_study_with_domains_labels_its_windows_and_stratifies_its_stages(tiny_llama_dir, text_file, tmp_path):
    first, second = _domain_files(tmp_path, text_file)
    joined = tmp_path / "joined.txt"
    joined.write_text(first.read_text() + DOMAIN_SEPARATOR + second.read_text())
    spec = _spec(tiny_llama_dir, domains=[str(first), str(second)], domain_weights=[1, 1])
    evaluator = build_evaluator(spec)
    ctx = evaluator.ctx
    assert torch.equal(ctx.windows, build_evaluator(_spec(tiny_llama_dir, text=str(joined))).ctx.windows)
    assert set(ctx.window_domains) == {0, 1} and len(ctx.window_domains) == 8
    assert ctx.domain_weights == (1.0, 1.0)
    assert evaluator.space.window_strata == ctx.window_domains
    pool, strata = calibration_pool(spec, evaluator.space.window_strata)
    assert (pool, strata) == (8, ctx.window_domains)
    assert min(strata.count(0), strata.count(1)) >= 2
    for generation in range(20):  # a 4-window stage holds both domains: each has at least a quarter of the pool
        drawn = stage_windows(3, generation, 0, 4, pool, strata)
        assert len(drawn) == 4 and {strata[i] for i in drawn} == {0, 1}
    outcome = evaluator(evaluator.space.defaults(), windows=(0, 1, 2, 3))
    assert outcome.state == "complete"
    assert evaluator.calibration["source"] == f"files:{first}:{second}"
    with pytest.raises(ValueError, match="expected the domain of each scored window with the given windows"):
        build_evaluator(spec, windows=ctx.windows)  # a worker given the windows but not their domains
    worker = build_evaluator(spec, windows=ctx.windows, window_domains=ctx.window_domains)
    assert worker(worker.space.defaults(), windows=(0, 1, 2, 3)).values == outcome.values


@pytest.mark.parametrize("calibration, message", [
    ({"domains": ["a.txt"]}, "calibration.domains must be a list of at least two text file paths"),
    ({"domains": ["a.txt", "b.txt"], "text": "c.txt"}, "calibration takes one of text, dataset, windows_file or domains"),
    ({"domain_weights": [1, 1]}, "calibration.domain_weights needs domains"),
    ({"domains": ["a.txt", "b.txt"], "domain_weights": [1]}, "calibration.domain_weights must be null or a list"),
    ({"domains": ["a.txt", "b.txt"], "domain_weights": [1, 2, 3]}, r"one weight per domain \(2\)"),
    ({"domains": ["a.txt", "b.txt"], "domain_weights": [1, -1]}, "list of positive numbers"),
])
def test_domains_and_weights_are_checked(tmp_path, calibration, message):
    with pytest.raises(SpecError, match=message):
        _spec(tmp_path, **calibration)


def test_domains_enter_the_spec_hash_only_when_given(tmp_path):
    spec = _spec(tmp_path, text="corpus.txt")
    older = spec.to_dict()
    for key in ("domains", "domain_weights"):  # a study stored before the fields existed
        del older["calibration"][key]
    assert StudySpec.from_stored(older).spec_hash() == spec.spec_hash()
    with_domains = _spec(tmp_path, domains=["a.txt", "b.txt"])
    assert with_domains.spec_hash() != spec.spec_hash()
    assert _spec(tmp_path, domains=["a.txt", "b.txt"], domain_weights=[1, 1]).spec_hash() != with_domains.spec_hash()
    assert StudySpec.from_stored(with_domains.to_dict()).spec_hash() == with_domains.spec_hash()


def test_apply_rebuilds_a_domains_study_from_its_plans_provenance(tmp_path):
    import argparse

    from sparsealloc.cli.common import calibration_source

    first, second = tmp_path / "prose.txt", tmp_path / "code.txt"
    first.write_text("prose")
    second.write_text("code")
    plan = argparse.Namespace(provenance={"calibration": {
        "source": TextSource.of(None, None, domains=[str(first), str(second)]).describe(),
        "samples": 32, "seq_len": 128, "seed": 0, "batch_size": 4}})
    args = argparse.Namespace(calib_text=None, calib_dataset=None, calib_windows=None, calib_text_field="text",
                              calib_samples=None, calib_seq_len=None, calib_batch_size=None, seed=None)
    source = calibration_source(args, plan)
    assert source.read() == "prose" + DOMAIN_SEPARATOR + "code" and (args.calib_samples, args.calib_seq_len) == (32, 128)
    args = argparse.Namespace(**{**vars(args), "calib_text": str(first)})  # a flag given overrides the plan
    assert calibration_source(args, plan).read() == "prose"


def test_a_mixed_windows_file_gives_its_clusters_as_domains(tiny_llama_dir, tiny_tokenizer, text_file, tmp_path):
    from sparsealloc.pruning.calibration.select import mix_calibration_set, write_calibration_set

    words = text_file.read_text().split()
    thirds = [words[i * len(words) // 3:(i + 1) * len(words) // 3] for i in range(3)]
    streams = [(f"part {i}", tokenize_stream(tiny_tokenizer, " ".join(part))) for i, part in enumerate(thirds)]
    path = write_calibration_set(mix_calibration_set(tiny_tokenizer, streams, 6, 16), tmp_path / "mixed.jsonl")
    evaluator = build_evaluator(_spec(tiny_llama_dir, windows_file=str(path), domain_weights=[1, 2, 1]))
    assert evaluator.ctx.window_domains == (0, 0, 1, 1, 2, 2) and evaluator.ctx.domain_weights == (1.0, 2.0, 1.0)
    with pytest.raises(SpecError, match=r"expected one domain weight per domain \(3\), but got 2"):
        build_evaluator(_spec(tiny_llama_dir, windows_file=str(path), domain_weights=[1, 2]))
