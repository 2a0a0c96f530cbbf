"""Data pruning for calibration sets: spherical k-means, prototype distances, selection rules.

Sorscher et al. 2022, "Beyond neural scaling laws: beating power law scaling via data pruning"
(NeurIPS 2022): embed every example with a self-supervised model, cluster the embeddings with
k-means, and score each example by its distance to the nearest cluster centroid ("prototype"); the
official scores use cosine similarity. Far from every prototype = hard, close = easy. The paper's
theory says to keep the hard examples when data is abundant and the easy ones when it is scarce.

Here the examples are candidate calibration windows and the embedding is the LM's own mean-pooled
hidden state (see :mod:`sparsealloc.pruning.calibration.select`). Everything in this module is a
pure function of tensors and a seed: the same inputs and seed give the same clusters and selection.

Selection metrics (registry :data:`SELECTION_METRICS`; score: higher = harder):

- ``ssp``: cosine distance to the nearest of ``k`` spherical k-means prototypes (Sorscher et al.).
- ``loss``: mean next-token loss of the window under the dense model, the LM analogue of EL2N
  (Paul et al. 2021, "Deep Learning on a Data Diet"), which scores an example by its error.
- ``random``: seeded uniform scores, so any keep rule is a random subset.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from sparsealloc.core.errors import SpecError
from sparsealloc.core.registry import Registry

KEEP_RULES = ("hard", "easy")


@dataclass(frozen=True)
class KMeansResult:
    """Spherical k-means: unit centers (k, d), a label per point (n,), iterations run."""

    centers: Tensor
    labels: Tensor
    iterations: int


@dataclass(frozen=True)
class Scored:
    """Difficulty per window (higher = harder) and, for clustering metrics, its cluster."""

    scores: Tensor
    labels: Tensor | None = None


@dataclass(frozen=True)
class WindowFeatures:
    """What selection metrics may look at: window count, embeddings (n, d), dense losses (n,)."""

    count: int
    embeddings: Tensor | None = None
    losses: Tensor | None = None


def unit_rows(x: Tensor, center: bool = False) -> Tensor:
    """Rows scaled to unit L2 norm (float64), optionally after subtracting the mean row.

    Centering removes the component every embedding shares (LM hidden states have large,
    nearly constant channels), so that cosine geometry reflects how windows differ.
    """
    x = x.detach().double()
    if center:
        x = x - x.mean(0, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def kmeans_pp_init(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) with cosine distance on unit rows ``x``.

    Returns:
        Indices of the ``k`` seed points, shape (k,).
    """
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    chosen = [first]
    dist = 1.0 - x @ x[first]
    for _ in range(1, k):
        weights = dist.clamp_min(0.0) ** 2
        if float(weights.sum()) <= 0.0:  # every point coincides with a seed: take unused points in order
            chosen.append(next(i for i in range(n) if i not in set(chosen)))
        else:
            chosen.append(int(torch.multinomial(weights, 1, generator=generator)))
        dist = torch.minimum(dist, 1.0 - x @ x[chosen[-1]])
    return torch.tensor(chosen)


def spherical_kmeans(x: Tensor, k: int, seed: int = 0, max_iter: int = 100) -> KMeansResult:
    """Cosine k-means (Dhillon & Modha 2001): assign by highest cosine, centers = normalized means.

    Args:
        x: Points, shape (n, d); rows are normalized here (not centered).
        k: Number of clusters, 1 ≤ k ≤ n.
        seed: Seed of the k-means++ initialisation (the only randomness).
        max_iter: Lloyd iterations at most; stops earlier when no label changes.

    Returns:
        Unit centers, labels and the iterations run. A cluster that loses all its members is
        re-seeded with the point that fits its own center worst.

    Raises:
        SpecError: ``k`` is not in [1, n].
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise SpecError(f"expected a cluster count k in [1, {n}] (the number of windows), but got {k}")
    unit = unit_rows(x)
    generator = torch.Generator().manual_seed(seed)
    centers = unit[kmeans_pp_init(unit, k, generator)].clone()
    labels = torch.full((n,), -1, dtype=torch.long)
    iterations = 0
    for iterations in range(1, max_iter + 1):
        new_labels = (unit @ centers.T).argmax(1)
        centers = _recenter(unit, new_labels, centers)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    labels = (unit @ centers.T).argmax(1)
    return KMeansResult(centers.float(), labels, iterations)


def _recenter(unit: Tensor, labels: Tensor, centers: Tensor) -> Tensor:
    """Normalized member means; empty clusters take the worst-fitting point (deterministic)."""
    sums = torch.zeros_like(centers).index_add_(0, labels, unit)
    counts = torch.bincount(labels, minlength=centers.shape[0])
    fit = (unit * centers[labels]).sum(1)
    for cluster in torch.nonzero(counts == 0).flatten().tolist():
        worst = int(fit.argmin())
        sums[cluster] = unit[worst]
        fit[worst] = float("inf")
    return sums / sums.norm(dim=1, keepdim=True).clamp_min(1e-12)


def prototype_distances(x: Tensor, centers: Tensor) -> tuple[Tensor, Tensor]:
    """Cosine distance 1 − cos(x, c) to the nearest prototype, and that prototype's index.

    Args:
        x: Points (n, d) (normalized here).
        centers: Prototypes (k, d) (normalized here).

    Returns:
        (distances (n,) in [0, 2], nearest prototype (n,)).
    """
    sims = unit_rows(x) @ unit_rows(centers).T
    best, nearest = sims.max(1)
    return (1.0 - best).float(), nearest


def ssp_scores(embeddings: Tensor, k: int, seed: int = 0, center: bool = True) -> tuple[Scored, KMeansResult]:
    """Self-supervised prototype difficulty (Sorscher et al. 2022).

    Args:
        embeddings: One row per example, shape (n, d).
        k: Number of prototypes (the paper finds results insensitive to k within an order of
            magnitude of the number of classes).
        seed: k-means++ seed.
        center: Subtract the mean embedding before the cosine geometry (see :func:`unit_rows`).

    Returns:
        (Scored with the cosine distance to the nearest prototype and the cluster of each example,
        the k-means result).
    """
    points = unit_rows(embeddings, center=center)
    result = spherical_kmeans(points, k, seed)
    distances, nearest = prototype_distances(points, result.centers)
    return Scored(distances, nearest), result


def _ordered(scores: Tensor, keep: str, seed: int) -> Tensor:
    """Indices from most to least preferred; ties broken by a seeded permutation."""
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(scores.numel(), generator=generator)
    values = scores.detach().double()[perm]
    order = torch.sort(values, descending=(keep == "hard"), stable=True).indices
    return perm[order]


def select(scores: Tensor, n: int, keep: str = "hard", labels: Tensor | None = None,
           balanced: bool = False, seed: int = 0) -> Tensor:
    """Pick ``n`` examples by difficulty.

    ``keep="hard"`` takes the highest scores (Sorscher et al.'s rule for abundant data), ``"easy"``
    the lowest (their rule for scarce data). With ``balanced`` the clusters take turns (largest
    cluster first, ties by index), each giving its next hardest (or easiest) member, so the
    selection spreads over every cluster as evenly as their sizes allow.

    Args:
        scores: Difficulty per example, shape (m,).
        n: How many to keep, 1 ≤ n ≤ m.
        keep: "hard" or "easy".
        labels: Cluster per example (m,); required with ``balanced``.
        balanced: Per-cluster round-robin instead of one global ranking.
        seed: Breaks ties in the ranking (deterministic given the seed).

    Returns:
        Indices into ``scores`` (n,), most preferred first: the first j of them are the
        selection of size j.

    Raises:
        SpecError: bad ``n``, unknown ``keep``, or ``balanced`` without labels.
    """
    m = scores.numel()
    if keep not in KEEP_RULES:
        raise SpecError(f"expected keep to be one of {', '.join(KEEP_RULES)}, but got {keep!r}")
    if not 1 <= n <= m:
        raise SpecError(f"expected to keep between 1 and {m} windows (the candidate pool), but got {n}")
    order = _ordered(scores, keep, seed)
    if not balanced:
        return order[:n]
    if labels is None:
        raise SpecError("balanced selection needs a cluster per window (metric ssp), but got none")
    if labels.numel() != m:
        raise SpecError(f"expected one cluster label per score ({m}), but got {labels.numel()}")
    return _round_robin(order, labels)[:n]


def _round_robin(order: Tensor, labels: Tensor) -> Tensor:
    """Interleave the clusters' members (each in ``order``), largest cluster first."""
    queues: dict[int, list[int]] = {}
    for index in order.tolist():
        queues.setdefault(int(labels[index]), []).append(index)
    clusters = sorted(queues, key=lambda c: (-len(queues[c]), c))
    picked: list[int] = []
    for depth in range(max(len(q) for q in queues.values())):
        picked += [queues[c][depth] for c in clusters if depth < len(queues[c])]
    return torch.tensor(picked, dtype=torch.long)


# --------------------------------------------------------------------------- metrics registry
SelectionMetric = Callable[[WindowFeatures, int, int], Scored]
SELECTION_METRICS: Registry[SelectionMetric] = Registry("calibration selection metric")
#: Which features each metric needs computed by the model (none for ``random``).
METRIC_NEEDS: dict[str, frozenset[str]] = {}


def _register(name: str, needs: frozenset[str]):
    def deco(fn: SelectionMetric) -> SelectionMetric:
        METRIC_NEEDS[name] = needs
        return SELECTION_METRICS.register(name)(fn)

    return deco


def _require(features: WindowFeatures, field: str, metric: str) -> Tensor:
    value = getattr(features, field)
    if value is None:
        raise SpecError(f"selection metric {metric!r} needs window {field}, but none were computed")
    return value


@_register("ssp", frozenset({"embeddings"}))
def ssp_metric(features: WindowFeatures, k: int, seed: int) -> Scored:
    """Cosine distance to the nearest of ``k`` k-means prototypes (Sorscher et al. 2022)."""
    return ssp_scores(_require(features, "embeddings", "ssp"), k, seed)[0]


@_register("loss", frozenset({"losses"}))
def loss_metric(features: WindowFeatures, k: int, seed: int) -> Scored:
    """Dense-model mean next-token loss per window (the EL2N analogue, Paul et al. 2021)."""
    return Scored(_require(features, "losses", "loss").float())


@_register("random", frozenset())
def random_metric(features: WindowFeatures, k: int, seed: int) -> Scored:
    """Seeded uniform scores: every keep rule then draws a uniform random subset."""
    generator = torch.Generator().manual_seed(seed)
    return Scored(torch.rand(features.count, generator=generator))


def score_windows(metric: str, features: WindowFeatures, k: int = 8, seed: int = 0) -> Scored:
    """Scores of the registered selection ``metric`` (unknown names list the valid ones)."""
    return SELECTION_METRICS.get(metric)(features, k, seed)
