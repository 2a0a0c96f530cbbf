"""Data-pruning math on synthetic clustered embeddings whose prototypes and hard/easy split are known."""

from __future__ import annotations

import math

import pytest
import torch

from sparsealloc.core.errors import SpecError, UnknownNameError
from sparsealloc.pruning.calibration.data_selection import (
    METRIC_NEEDS,
    SELECTION_METRICS,
    WindowFeatures,
    kmeans_pp_init,
    prototype_distances,
    score_windows,
    select,
    spherical_kmeans,
    ssp_scores,
    unit_rows,
)

DIM, K, PER_CLUSTER = 16, 4, 30


def clustered(seed: int = 0, per_cluster: int = PER_CLUSTER, hard_per_cluster: int = 3):
    """K orthonormal centers (scaled); most points at angle ~0.1 rad from their center, a few "hard"
    ones at ~0.8 rad. Returns (points, true centers, true labels, hard mask)."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.eye(DIM)[:K] * 3.0
    points, labels, hard = [], [], []
    for c in range(K):
        for i in range(per_cluster):
            is_hard = i < hard_per_cluster
            direction = torch.randn(DIM, generator=gen)
            direction -= (direction @ torch.eye(DIM)[c]) * torch.eye(DIM)[c]  # orthogonal to the center
            direction /= direction.norm()
            angle = 0.8 if is_hard else 0.05 + 0.1 * float(torch.rand(1, generator=gen))
            point = math.cos(angle) * torch.eye(DIM)[c] + math.sin(angle) * direction
            points.append(point * (1 + float(torch.rand(1, generator=gen))))  # norm must not matter
            labels.append(c)
            hard.append(is_hard)
    order = torch.randperm(len(points), generator=gen)
    return (torch.stack(points)[order], centers, torch.tensor(labels)[order], torch.tensor(hard)[order])


def match(found: torch.Tensor, truth: torch.Tensor) -> list[int]:
    """For each true center, the index of the most similar found center."""
    return (unit_rows(truth) @ unit_rows(found).T).argmax(1).tolist()


# ----------------------------------------------------------------------------- k-means
def test_kmeans_recovers_the_prototypes_and_the_clusters():
    points, centers, labels, _ = clustered()
    result = spherical_kmeans(points, K, seed=0)
    mapping = match(result.centers, centers)
    assert sorted(mapping) == list(range(K))  # one found center per true center
    cos = (unit_rows(centers) * unit_rows(result.centers[mapping])).sum(1)
    assert (cos > 0.98).all(), cos
    assert torch.equal(result.labels, torch.tensor(mapping)[labels])  # every point in its true cluster
    assert torch.allclose(result.centers.norm(dim=1), torch.ones(K), atol=1e-5)


def test_kmeans_is_deterministic_given_the_seed():
    points = torch.randn(80, 8, generator=torch.Generator().manual_seed(1))  # no structure: init matters
    a, b = spherical_kmeans(points, 5, seed=3), spherical_kmeans(points, 5, seed=3)
    assert torch.equal(a.centers, b.centers) and torch.equal(a.labels, b.labels)
    inits = {tuple(kmeans_pp_init(unit_rows(points), 5, torch.Generator().manual_seed(s)).tolist()) for s in range(6)}
    assert len(inits) > 1  # the seed does drive the initialisation


def test_kmeans_pp_spreads_the_seeds_over_the_clusters():
    # D² weighting: a point of an already-seeded tight cluster weighs ~1e-3 of an unseeded one
    points, _, labels, _ = clustered(hard_per_cluster=0)
    for seed in range(10):
        seeds = kmeans_pp_init(unit_rows(points), K, torch.Generator().manual_seed(seed))
        assert len(set(labels[seeds].tolist())) == K


def test_kmeans_with_duplicate_points_and_too_many_clusters():
    points = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(5, 1)
    result = spherical_kmeans(points, 3, seed=0)
    assert result.labels.shape == (10,)
    assert torch.isfinite(result.centers).all()
    assert len(set(result.labels.tolist())) >= 2


@pytest.mark.parametrize("k", [0, 11])
def test_kmeans_rejects_bad_k(k):
    with pytest.raises(SpecError, match=r"k in \[1, 10\]"):
        spherical_kmeans(torch.randn(10, 3), k)


# ----------------------------------------------------------------------------- scores
def test_prototype_distance_is_cosine_distance_to_the_nearest_center():
    centers = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    x = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, -3.0], [0.1, 5.0]])
    dist, nearest = prototype_distances(x, centers)
    assert dist[0] == pytest.approx(0.0, abs=1e-7)
    assert dist[1] == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-6)
    assert dist[2] == pytest.approx(1.0, abs=1e-6)  # orthogonal to the first, opposite to the second
    assert nearest.tolist()[0] == 0 and nearest.tolist()[3] == 1


@pytest.mark.parametrize("center", [False, True])
def test_hard_points_are_far_from_their_prototype(center):
    points, _, _, hard = clustered()
    scored, _ = ssp_scores(points, K, seed=0, center=center)
    n_hard = int(hard.sum())
    picked = select(scored.scores, n_hard, "hard")
    assert hard[picked].all()  # exactly the far-out points
    easy = select(scored.scores, len(points) - n_hard, "easy")
    assert not hard[easy].any()


def test_registry_metrics_and_their_needs():
    assert SELECTION_METRICS.names() == ["loss", "random", "ssp"]
    assert METRIC_NEEDS == {"ssp": {"embeddings"}, "loss": {"losses"}, "random": set()}
    points, _, labels, hard = clustered()
    scored = score_windows("ssp", WindowFeatures(len(points), embeddings=points), k=K, seed=0)
    assert scored.labels is not None and len(set(scored.labels.tolist())) == K
    assert hard[select(scored.scores, int(hard.sum()), "hard")].all()
    losses = torch.tensor([0.5, 3.0, 1.0, 2.0])
    assert select(score_windows("loss", WindowFeatures(4, losses=losses)).scores, 2, "hard").tolist() == [1, 3]
    with pytest.raises(UnknownNameError, match="loss, random, ssp"):
        score_windows("el2n", WindowFeatures(4))
    with pytest.raises(SpecError, match="needs window embeddings"):
        score_windows("ssp", WindowFeatures(4, losses=losses))


def test_random_metric_is_seeded():
    a = score_windows("random", WindowFeatures(50), seed=1).scores
    assert torch.equal(a, score_windows("random", WindowFeatures(50), seed=1).scores)
    assert not torch.equal(a, score_windows("random", WindowFeatures(50), seed=2).scores)


# ----------------------------------------------------------------------------- selection rules
def test_select_orders_and_nests():
    scores = torch.tensor([0.3, 0.9, 0.1, 0.5, 0.7])
    assert select(scores, 3, "hard").tolist() == [1, 4, 3]
    assert select(scores, 2, "easy").tolist() == [2, 0]
    assert select(scores, 5, "hard")[:3].tolist() == select(scores, 3, "hard").tolist()


def test_ties_are_broken_by_the_seed_and_deterministically():
    scores = torch.zeros(40)
    a, b = select(scores, 10, seed=5), select(scores, 10, seed=5)
    assert torch.equal(a, b)
    assert any(not torch.equal(a, select(scores, 10, seed=s)) for s in range(6, 10))


def test_balanced_takes_from_every_cluster():
    # cluster 0 is big and holds all the hardest points: a global ranking takes only from it
    labels = torch.tensor([0] * 20 + [1] * 4 + [2] * 4 + [3] * 2)
    scores = torch.cat([torch.linspace(10, 20, 20), torch.rand(10, generator=torch.Generator().manual_seed(0))])
    assert set(labels[select(scores, 8, "hard", labels)].tolist()) == {0}
    picked = select(scores, 8, "hard", labels, balanced=True)
    counts = torch.bincount(labels[picked], minlength=4).tolist()
    assert counts == [2, 2, 2, 2]
    for c in range(4):  # the hardest of each cluster
        members = torch.nonzero(labels == c).flatten()
        best = members[scores[members].argsort(descending=True)[:2]]
        assert set(best.tolist()) <= set(picked.tolist())
    # a small cluster runs out: the others fill the quota evenly
    counts = torch.bincount(labels[select(scores, 16, "hard", labels, balanced=True)], minlength=4).tolist()
    assert counts == [6, 4, 4, 2]


def test_balanced_on_known_clusters_keeps_each_clusters_hard_points():
    points, _, labels, hard = clustered()
    scored, _ = ssp_scores(points, K, seed=0, center=False)
    picked = select(scored.scores, 2 * K, "hard", scored.labels, balanced=True)
    assert torch.bincount(labels[picked], minlength=K).tolist() == [2] * K
    assert hard[picked].all()


@pytest.mark.parametrize(("n", "keep", "labels", "balanced", "message"), [
    (0, "hard", None, False, "between 1 and 5"),
    (6, "hard", None, False, "between 1 and 5"),
    (2, "middle", None, False, "hard, easy"),
    (2, "hard", None, True, "needs a cluster"),
    (2, "hard", torch.zeros(3, dtype=torch.long), True, "one cluster label per score"),
])
def test_select_rejects_bad_requests(n, keep, labels, balanced, message):
    with pytest.raises(SpecError, match=message):
        select(torch.rand(5), n, keep, labels, balanced)
