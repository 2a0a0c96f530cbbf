"""Perplexity against a direct computation, the sliding-window protocol, and the sparsity report."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sparsealloc.core.errors import SpecError
from sparsealloc.core.plan import AllocationPlan
from sparsealloc.pruning.apply import prune_
from sparsealloc.pruning.calibration.stats import collect_stats
from sparsealloc.pruning.model import evaluation
from sparsealloc.pruning.model.evaluation import eval_windows, perplexity, sparsity_report
from sparsealloc.pruning.model.structure import model_layout


@pytest.fixture(scope="module")
def stream() -> torch.Tensor:
    return torch.randint(3, 128, (200,), generator=torch.Generator().manual_seed(11))


def test_perplexity_equals_exp_mean_cross_entropy(tiny_llama, stream):
    seq_len, n = 16, 5
    nll = []
    with torch.no_grad():
        for w in range(n):
            ids = stream[w * seq_len : (w + 1) * seq_len].unsqueeze(0)
            logits = tiny_llama(input_ids=ids).logits[0]
            logp = torch.log_softmax(logits.double(), dim=-1)
            nll += [-logp[t, ids[0, t + 1]].item() for t in range(seq_len - 1)]
    expected = math.exp(sum(nll) / len(nll))
    assert len(nll) == n * (seq_len - 1)
    assert perplexity(tiny_llama, stream, seq_len, n) == pytest.approx(expected, rel=1e-5)
    assert perplexity(tiny_llama, stream, seq_len, n, batch_size=2) == pytest.approx(expected, rel=1e-5)


def test_random_model_is_near_uniform(tiny_llama, stream):
    ppl = perplexity(tiny_llama, stream, 16, 4)
    assert 0.5 * 128 < ppl < 2 * 128


def test_all_windows_when_n_is_none(stream):
    assert len(eval_windows(stream, 16, None)) == 200 // 16
    assert len(eval_windows(stream, 16, 3)) == 3


@pytest.mark.parametrize("stride", [4, 8, 15])
def test_sliding_windows_score_every_covered_token_once(tiny_llama, stream, stride, monkeypatch):
    seq_len, n = 16, 6
    targets: list[torch.Tensor] = []
    real = F.cross_entropy

    def spy(pred, target, **kwargs):
        targets.append(target.clone())
        return real(pred, target, **kwargs)

    monkeypatch.setattr(evaluation.F, "cross_entropy", spy)
    perplexity(tiny_llama, stream, seq_len, n, stride=stride)
    end = (n - 1) * stride + seq_len  # the last token any window covers
    scored = torch.cat(targets)
    assert scored.numel() == end - 1
    assert torch.equal(scored, stream[1:end])  # each covered token exactly once, in order


def test_non_overlapping_windows_score_all_but_their_first_token(tiny_llama, stream, monkeypatch):
    targets: list[torch.Tensor] = []
    real = F.cross_entropy
    monkeypatch.setattr(evaluation.F, "cross_entropy",
                        lambda pred, target, **kw: targets.append(target.clone()) or real(pred, target, **kw))
    perplexity(tiny_llama, stream, 16, 5)
    assert torch.equal(torch.cat(targets), torch.cat([stream[w * 16 + 1 : (w + 1) * 16] for w in range(5)]))


def test_sliding_window_value(tiny_llama, stream):
    seq_len, stride, n = 16, 8, 4
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(n):
            begin = w * stride
            ids = stream[begin : begin + seq_len].unsqueeze(0)
            logp = torch.log_softmax(tiny_llama(input_ids=ids).logits[0].double(), dim=-1)
            first = 1 if w == 0 else seq_len - stride
            for t in range(first, seq_len):
                nll -= logp[t - 1, ids[0, t]].item()
                count += 1
    got = perplexity(tiny_llama, stream, seq_len, n, stride=stride)
    assert got == pytest.approx(math.exp(nll / count), rel=1e-5)


@pytest.mark.parametrize(("length", "seq_len", "stride"), [(10, 16, None), (100, 16, 17), (100, 16, -1)])
def test_bad_windows(length, seq_len, stride):
    with pytest.raises(SpecError):
        eval_windows(torch.arange(length), seq_len, 2, stride)


def test_sparsity_report(fresh_model, tiny_calib):
    model = fresh_model("llama")
    layout = model_layout(model)
    dense = sparsity_report(model)
    assert dense.attrs["total_sparsity"] == 0.0
    assert len(dense) == len(layout.linears)
    plan = AllocationPlan(sparsity={"model.layers.0": 0.5, "model.layers.2.mlp.up_proj": 0.25})
    report = prune_(model, plan, collect_stats(model, tiny_calib), layout=layout)
    frame = sparsity_report(model)
    assert list(frame.module) == list(layout.linears)
    assert list(frame.block) == [layout.block_of[n] for n in layout.linears]
    assert frame.params.sum() == layout.total_params
    zeros = sum(int((dict(model.named_modules())[n].weight == 0).sum()) for n in layout.linears)
    assert frame.zeros.sum() == zeros
    assert frame.attrs["total_sparsity"] == pytest.approx(zeros / layout.total_params)
    assert frame.attrs["total_sparsity"] == pytest.approx(report.achieved_mean)
    row = frame.set_index("module").loc["model.layers.2.mlp.up_proj"]
    assert row.sparsity == pytest.approx(0.25, abs=1 / row.params)
    assert (frame[frame.block == "model.layers.1"].zeros == 0).all()
