"""STADEW, ACE (our formulation) and SparseGPT: hand-computable scores, bias, OBS update, gram checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsealloc.core.errors import SpecError
from sparsealloc.core.plan import AllocationPlan, MetricChoice
from sparsealloc.core.types import LayerStats
from sparsealloc.pruning.apply import prune_
from sparsealloc.pruning.masks import nm_mask, row_mask, row_rank
from sparsealloc.pruning.metrics import check_params, metric_traits, metric_uses_bias, score
from sparsealloc.pruning.model.structure import model_layout
from sparsealloc.pruning.sparsegpt import sparsegpt_prune


def stats_of(x: torch.Tensor, gram: bool = True) -> LayerStats:
    x = x.double()
    gram_matrix = (x.T @ x).float() if gram else None
    return LayerStats((x * x).sum(0).float(), x.sum(0).float(), x.shape[0], gram_matrix)


def low_rank_inputs(n: int, d: int, seed: int, rank: int = 8) -> torch.Tensor:
    """Strongly correlated inputs (rank-``rank`` signal plus noise), like LLM activations."""
    gen = torch.Generator().manual_seed(seed)
    signal = torch.randn(n, rank, generator=gen) @ torch.randn(rank, d, generator=gen)
    return signal + 0.3 * torch.randn(n, d, generator=gen)


def correlated_inputs(n: int, d: int, seed: int, mean: float = 0.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=gen) / d**0.5 + torch.eye(d)
    return torch.randn(n, d, generator=gen) @ mix + mean * torch.randn(d, generator=gen)


# ----------------------------------------------------------------------------- STADEW
class _Block(nn.Module):
    """A one-block "decoder" with q_proj and o_proj Linears (what model_layout needs)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        attn = nn.Module()
        attn.q_proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        attn.o_proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        attn.q_proj.weight.data.copy_(weight)
        attn.o_proj.weight.data.copy_(weight)
        block = nn.Module()
        block.self_attn = attn
        self.layers = nn.ModuleList([block])


def test_stadew_scores_by_module_role():
    gen = torch.Generator().manual_seed(1)
    w, x = torch.randn(4, 8, generator=gen), correlated_inputs(64, 8, 1, mean=2.0)
    stats = stats_of(x, gram=False)
    for fqn in ("model.layers.0.self_attn.o_proj", "model.layers.3.mlp.down_proj",
                "model.decoder.layers.0.self_attn.out_proj", "model.decoder.layers.0.fc2"):
        torch.testing.assert_close(score("stadew", w, stats, fqn=fqn), score("stade", w, stats))
        assert metric_uses_bias("stadew", {}, fqn)
        assert not metric_uses_bias("stadew", {"bias": False}, fqn)
    inner = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "model.decoder.layers.0.fc1", "")
    for fqn in inner:
        torch.testing.assert_close(score("stadew", w, stats, fqn=fqn), score("wanda", w, stats))
        assert not metric_uses_bias("stadew", {}, fqn)
    assert metric_traits("stadew").needs_name
    with pytest.raises(SpecError, match="fqn"):
        check_params("stadew", {"fqn": "x"})


def test_stadew_bias_only_on_output_projection_and_lowers_error():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 32, generator=gen)
    x = torch.randn(512, 32, generator=gen) * 0.5 + torch.randn(32, generator=gen) * 3  # non-zero mean
    stats = {f"layers.0.self_attn.{p}": stats_of(x, gram=False) for p in ("q_proj", "o_proj")}
    dense = x @ weight.T
    errors = {}
    for bias in (False, True):
        model = _Block(weight)
        plan = AllocationPlan(sparsity={"*": 0.5}, metric=MetricChoice("stadew", {"bias": bias}))
        report = prune_(model, plan, stats)
        o_proj, q_proj = model.layers[0].self_attn.o_proj, model.layers[0].self_attn.q_proj
        assert q_proj.bias is None  # Wanda, never compensated
        wanda_mask = row_mask(score("wanda", weight, stats["layers.0.self_attn.q_proj"]), 0.5)
        assert torch.equal(q_proj.weight == 0, wanda_mask)
        with torch.no_grad():
            errors[bias] = (o_proj(x) - dense).pow(2).mean().item()
        if bias:
            assert report.biased == ["layers.0.self_attn.o_proj"]
            pruned = o_proj.weight.detach() == 0
            assert o_proj.bias.abs().sum() > 0
            expected = (weight * pruned) @ x.mean(0)  # from the unpruned weights
            torch.testing.assert_close(o_proj.bias.detach(), expected, rtol=1e-4, atol=1e-4)
        else:
            assert o_proj.bias is None and report.biased == []
    assert errors[True] < 0.5 * errors[False]


def test_stadew_on_llama_ignores_cached_ranks(fresh_model, tiny_calib):
    from sparsealloc.pruning.calibration.stats import collect_stats

    model = fresh_model("llama")
    layout = model_layout(model)
    stats = collect_stats(model, tiny_calib, layout=layout)
    plan = AllocationPlan.uniform(layout.linears, 0.5, MetricChoice("stadew"))
    modules = dict(model.named_modules())
    bogus = {n: row_rank(-modules[n].weight.abs()) for n in layout.linears}  # would prune the largest
    report = prune_(model, plan, stats, layout=layout, ranks=bogus)
    expected = [n for n in layout.linears if n.endswith(("o_proj", "down_proj"))]
    assert sorted(report.biased) == sorted(expected)
    reference = fresh_model("llama")
    prune_(reference, plan, stats)
    ref_modules = dict(reference.named_modules())
    for n in layout.linears:
        assert torch.equal(modules[n].weight, ref_modules[n].weight), n


# ----------------------------------------------------------------------------- ACE
def test_ace_cos_by_hand_orthogonal_inputs():
    # two tokens, X = I: y = [3, 4]; pruning w1 → ŷ = [0, 4], cos = 16/20; pruning w2 → ŷ = [3, 0], cos = 9/15
    w = torch.tensor([[3.0, 4.0]])
    stats = stats_of(torch.eye(2))
    torch.testing.assert_close(score("ace_cos", w, stats), torch.tensor([[0.2, 0.4]]))
    no_gram = stats_of(torch.eye(2), gram=False)  # XᵀX is diagonal here: same values
    torch.testing.assert_close(score("ace_cos", w, no_gram), torch.tensor([[0.2, 0.4]]))


def test_ace_cos_matches_brute_force_cosine():
    gen = torch.Generator().manual_seed(3)
    w, x = torch.randn(3, 5, generator=gen), correlated_inputs(40, 5, 3, mean=1.0)
    got = score("ace_cos", w, stats_of(x))
    y = x.double() @ w.double().T  # (tokens, out)
    for i in range(3):
        for j in range(5):
            y_hat = y[:, i] - w[i, j].double() * x[:, j].double()
            expected = 1 - torch.nn.functional.cosine_similarity(y[:, i], y_hat, dim=0)
            assert got[i, j].item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-7)


def test_ace_cos_without_gram_ranks_like_wanda_within_rows():
    gen = torch.Generator().manual_seed(4)
    w, x = torch.randn(6, 16, generator=gen), correlated_inputs(64, 16, 4)
    stats = stats_of(x, gram=False)
    wanda_mask = row_mask(score("wanda", w, stats), 0.5)
    assert torch.equal(row_mask(score("ace_cos", w, stats), 0.5), wanda_mask)
    assert not torch.equal(row_mask(score("ace_cos", w, stats_of(x)), 0.5), wanda_mask)


def test_ace_var_by_hand():
    # x1 over tokens [1, -1, 0, 0] (σ² = 2/3), x2 [0, 0, 2, -2] (σ² = 8/3), uncorrelated, zero mean
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    w = torch.tensor([[3.0, 4.0]])
    parts = torch.tensor([9 * 2 / 3, 16 * 8 / 3])
    expected = (parts / parts.sum()).reshape(1, 2)
    torch.testing.assert_close(score("ace_var", w, stats_of(x)), expected)
    torch.testing.assert_close(score("ace_var", w, stats_of(x, gram=False)), expected)
    # combination: cos + lam·var
    for lam in (1.0, 0.25):
        torch.testing.assert_close(score("ace", w, stats_of(x), {"lam": lam}),
                                   score("ace_cos", w, stats_of(x)) + lam * expected)
    assert metric_traits("ace").gram == "optional"


def test_ace_var_ranks_like_stade_within_rows():
    gen = torch.Generator().manual_seed(5)
    w, x = torch.randn(6, 16, generator=gen), correlated_inputs(64, 16, 5, mean=2.0)
    stats = stats_of(x)
    assert torch.equal(row_mask(score("ace_var", w, stats), 0.5), row_mask(score("stade", w, stats), 0.5))


# ----------------------------------------------------------------------------- SparseGPT
def _layer_error(w_hat: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> float:
    return (x @ (w - w_hat).T).norm().item()


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_beats_wanda_reconstruction(nm):
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(32, 64, generator=gen), low_rank_inputs(512, 64, 0)
    stats = stats_of(x)
    new_w, mask = sparsegpt_prune(w, stats, 0.5, nm, blocksize=16)
    assert torch.equal(new_w == 0, mask) and mask.sum().item() == w.numel() // 2
    if nm:
        assert mask.reshape(32, 16, 4).sum(-1).eq(2).all()
        wanda_mask = nm_mask(score("wanda", w, stats), *nm)
    else:
        assert mask.sum(1).eq(32).all()  # per-row share of every block
        wanda_mask = row_mask(score("wanda", w, stats), 0.5)
    wanda_error = _layer_error(w.masked_fill(wanda_mask, 0), w, x)
    assert _layer_error(new_w, w, x) < 0.7 * wanda_error


@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("sparsity", [0.3, 0.55, 0.7])
def test_sparsegpt_exact_counts(per_row, sparsity):
    gen = torch.Generator().manual_seed(2)
    w, x = torch.randn(10, 40, generator=gen), correlated_inputs(128, 40, 2)
    _, mask = sparsegpt_prune(w, stats_of(x), sparsity, blocksize=16, per_row=per_row)
    assert mask.sum().item() == round(w.numel() * sparsity)
    if per_row:
        assert mask.sum(1).max() - mask.sum(1).min() <= 1


def test_sparsegpt_needs_gram(fresh_model, tiny_calib):
    from sparsealloc.pruning.calibration.stats import collect_stats

    model = fresh_model("llama")
    layout = model_layout(model)
    plan = AllocationPlan.uniform(layout.linears, 0.5, MetricChoice("sparsegpt"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(SpecError, match=r"gram=True"):
        prune_(model, plan, collect_stats(model, tiny_calib, layout=layout))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # nothing changed
    assert metric_traits("sparsegpt").gram == "required" and metric_traits("sparsegpt").updater is not None
    report = prune_(model, plan, collect_stats(model, tiny_calib, gram=True, layout=layout))
    assert report.achieved_mean == pytest.approx(0.5, abs=1e-3)
    assert all(abs(report.achieved[n] - 0.5) < 1e-2 for n in layout.linears)


def test_sparsegpt_score_is_obs_saliency():
    x = torch.eye(3) * torch.tensor([1.0, 2.0, 4.0])  # H = diag(1, 4, 16), no damping effect on ranks
    w = torch.tensor([[1.0, 1.0, 1.0]])
    s = score("sparsegpt", w, stats_of(x), {"percdamp": 0.0})
    torch.testing.assert_close(s, torch.tensor([[1.0, 4.0, 16.0]]))  # w²/[H⁻¹]_jj with diagonal H
