"""Mask selection: exact counts per layer, per-row balance, lowest scores pruned, N:M groups."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsealloc.core.errors import SpecError
from sparsealloc.pruning.masks import nm_mask, pruned_count, row_mask, select_mask


def _scores(rows: int, cols: int, seed: int) -> torch.Tensor:
    # distinct values: a random permutation, so "the lowest" is unambiguous
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(rows * cols, generator=gen).reshape(rows, cols).float()


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 12),
    cols=st.integers(1, 40),
    sparsity=st.floats(0.0, 0.99, allow_nan=False, exclude_max=False),
    seed=st.integers(0, 1000),
)
def test_row_mask_properties(rows, cols, sparsity, seed):
    score = _scores(rows, cols, seed)
    mask = row_mask(score, sparsity)
    assert mask.shape == score.shape and mask.dtype == torch.bool
    assert int(mask.sum()) == round(rows * cols * sparsity)
    per_row = mask.sum(dim=1)
    assert int(per_row.max() - per_row.min()) <= 1
    for r in range(rows):
        pruned, kept = score[r][mask[r]], score[r][~mask[r]]
        if pruned.numel() and kept.numel():
            assert pruned.max() < kept.min()


@pytest.mark.parametrize(("rows", "cols"), [(1, 1), (3, 7), (8, 8), (64, 96), (96, 64), (5, 13)])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.25, 0.33, 0.5, 0.6, 0.75, 0.9, 0.95])
def test_row_mask_exact_count(rows, cols, sparsity):
    mask = row_mask(_scores(rows, cols, 0), sparsity)
    assert int(mask.sum()) == round(rows * cols * sparsity) == pruned_count(rows * cols, sparsity)


def test_row_mask_hand_example():
    score = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.5, 0.7, 0.1, 0.9], [9.0, 8.0, 7.0, 6.0]])
    # 12 weights, 0.5 → 6 pruned → 2 per row
    expected = torch.tensor([[0, 1, 0, 1], [1, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(row_mask(score, 0.5), expected)
    # 12 × 0.42 = 5.04 → 5 pruned: first row 2, the others... base 1, extra 2 → rows 0,1 prune 2, row 2 prunes 1
    expected = torch.tensor([[0, 1, 0, 1], [1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(row_mask(score, 0.42), expected)


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5])
def test_row_mask_rejects_bad_ratio(sparsity):
    with pytest.raises(SpecError):
        row_mask(torch.ones(2, 4), sparsity)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4), (3, 4)])
@pytest.mark.parametrize("seed", [0, 1])
def test_nm_mask_groups(n, m, seed):
    rows, cols = 6, 4 * m
    score = _scores(rows, cols, seed)
    mask = nm_mask(score, n, m)
    groups = mask.reshape(rows, cols // m, m)
    assert (groups.sum(dim=2) == m - n).all()
    scores = score.reshape(rows, cols // m, m)
    pruned_max = torch.where(groups, scores, torch.full_like(scores, -1e9)).amax(dim=2)
    kept_min = torch.where(~groups, scores, torch.full_like(scores, 1e9)).amin(dim=2)
    assert (pruned_max < kept_min).all()
    assert int(mask.sum()) == rows * cols * (m - n) // m


def test_nm_mask_hand_examples():
    score = torch.tensor([[1.0, 2.0, 3.0, 4.0, 8.0, 7.0, 6.0, 5.0], [5.0, 1.0, 6.0, 2.0, 0.0, 9.0, 0.5, 3.0]])
    expected_24 = torch.tensor([[1, 1, 0, 0, 0, 0, 1, 1], [0, 1, 0, 1, 1, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(nm_mask(score, 2, 4), expected_24)
    expected_48 = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0], [0, 1, 0, 1, 1, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(nm_mask(score, 4, 8), expected_48)


@pytest.mark.parametrize(("cols", "n", "m"), [(6, 2, 4), (12, 4, 8), (10, 4, 8)])
def test_nm_mask_width_not_divisible(cols, n, m):
    with pytest.raises(SpecError, match=f"{n}:{m}"):
        nm_mask(torch.ones(2, cols), n, m)


def test_select_mask_dispatch():
    score = _scores(4, 8, 3)
    assert not select_mask(score, 0.0, None).any()
    assert not select_mask(score, 0.0, (2, 4)).any()
    assert torch.equal(select_mask(score, 0.5, None), row_mask(score, 0.5))
    assert torch.equal(select_mask(score, 0.5, (2, 4)), nm_mask(score, 2, 4))
