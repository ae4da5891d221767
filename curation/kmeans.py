"""k-means, hierarchical k-means with resampling, and balanced top-down sampling (Vo et al. 2024).

Why pure PyTorch (as ``ssl-data-curation``): the same code runs on CPU and GPU, in float64, with
the assignment chunked so the ``(chunk, k)`` distance matrix stays bounded.

* :func:`kmeans`: k-means++ seeding (``2 + floor(ln k)`` local trials), Lloyd iterations, L2.
* :func:`hierarchical_kmeans`: level 1 clusters the points, level ``l+1`` the centroids of level
  ``l``. Each level optionally runs resampling steps: take the ``sample_size`` members of each
  cluster nearest its centroid, rerun k-means (fresh k-means++ seeds) on that union, reassign all
  points. A dense region then weighs no more than a sparse one in the rerun, which moves centroids
  from dense regions towards an even cover of the support.
* :func:`balanced_sample`: split a target size over the top clusters by water-filling
  (largest cap ``x`` with ``sum(min(x, size_i)) <= T``, remainder +1 to random clusters above the
  cap), recursively down the tree; at the leaves take points closest to the centroid or at random.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor

LeafStrategy = Literal["closest", "random"]


def _sq_dist(x: Tensor, c: Tensor) -> Tensor:
    """Squared L2 distances ``(n, k)`` of rows ``x`` ``(n, F)`` to centroids ``c`` ``(k, F)``."""
    return ((x * x).sum(1, keepdim=True) - 2 * x @ c.T + (c * c).sum(1)).clamp_min_(0)


def assign(x: Tensor, centroids: Tensor, chunk_elements: int = 100_000_000) -> tuple[Tensor, Tensor]:
    """Nearest centroid ``(n,)`` and its squared distance ``(n,)``, in chunks of bounded size."""
    step = max(1, chunk_elements // max(1, len(centroids)))
    labels, dists = [], []
    for part in x.split(step):
        d = _sq_dist(part, centroids)
        best = d.min(dim=1)
        labels.append(best.indices)
        dists.append(best.values)
    return torch.cat(labels), torch.cat(dists)


def weighted_draws(weights: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """``count`` indices drawn with replacement, each with probability ``weights[i] / sum(weights)``
    (``weights >= 0`` with a positive sum), by inverse CDF: a uniform draw in ``(0, total]`` looked
    up in the cumulative sums.

    Why not ``torch.multinomial``: it refuses more than ``2**24`` categories, i.e. the first level of
    a pool above ~16.8M points."""
    cdf = weights.cumsum(0)
    # (0, total], never 0: a zero-weight prefix (cdf 0) is then never the first cdf >= u
    u = (1 - torch.rand(count, generator=generator, dtype=cdf.dtype)) * cdf[-1]
    return torch.searchsorted(cdf, u)


def kmeans_plusplus(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeds ``(k, F)`` with ``2 + floor(ln k)`` candidates per step (greedy)."""
    n = len(x)
    trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=generator))
    centroids = [x[first]]
    closest = _sq_dist(x, x[first : first + 1])[:, 0]  # (n,)
    for _ in range(1, k):
        total = closest.sum()
        if total <= 0:  # fewer distinct points than k: duplicate seeds
            candidates = torch.randint(n, (trials,), generator=generator)
        else:
            candidates = weighted_draws(closest, trials, generator)
        candidate_d = torch.minimum(closest[None], _sq_dist(x, x[candidates]).T)  # (trials, n)
        best = int(candidate_d.sum(1).argmin())
        centroids.append(x[candidates[best]])
        closest = candidate_d[best]
    return torch.stack(centroids)


def kmeans(x: Tensor | np.ndarray, k: int, iterations: int = 50, seed: int = 0,
           dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Centroids ``(k, F)`` and labels ``(n,)`` of Lloyd's k-means; an empty cluster keeps its centroid."""
    points = torch.as_tensor(x).to(dtype)
    if not 1 <= k <= len(points):
        raise ValueError(f"k must be in [1, {len(points)}] (the number of points), got {k}")
    generator = torch.Generator().manual_seed(seed)
    centroids = kmeans_plusplus(points, k, generator)
    labels = assign(points, centroids)[0]
    for _ in range(iterations):
        sums = torch.zeros_like(centroids).index_add_(0, labels, points)
        counts = torch.bincount(labels, minlength=k).to(dtype)
        nonempty = counts > 0
        centroids[nonempty] = sums[nonempty] / counts[nonempty, None]
        new_labels = assign(points, centroids)[0]
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return centroids, labels


def cluster_samples(labels: Tensor, dists: Tensor, sample_size: int) -> Tensor:
    """Sorted indices of the ``sample_size`` members of each cluster nearest its centroid (all the
    members of a smaller cluster), given each point's cluster ``labels`` and squared distance
    ``dists`` to it; ties go to the lower index.

    Why members only: a point of a dense neighbouring cluster can be nearer a centroid than that
    cluster's own members; sampling it would pull the rerun back towards the dense region."""
    by_dist = dists.argsort(stable=True)
    order = by_dist[labels[by_dist].argsort(stable=True)]  # by cluster, nearest first within one
    grouped = labels[order]
    counts = torch.bincount(grouped)
    rank = torch.arange(len(order)) - (counts.cumsum(0) - counts)[grouped]  # position within its cluster
    return order[rank < sample_size].sort().values


def step_seed(seed: int, step: int) -> int:
    """The k-means++ seed of resampling step ``step`` of a run seeded ``seed``, from a
    ``SeedSequence`` of both: ``seed + step`` would repeat the seeds of the next level's run
    (:func:`hierarchical_kmeans` seeds level ``l`` with ``seed + l``)."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def resampling_kmeans(x: Tensor, k: int, steps: int, sample_size: int, iterations: int = 50,
                      seed: int = 0) -> tuple[Tensor, Tensor]:
    """k-means, then ``steps`` rounds of: the ``sample_size`` members of each cluster nearest its
    centroid (:func:`cluster_samples`) -> k-means on their union from fresh k-means++ seeds ->
    reassign all points. ``sample_size <= 1`` resamples nothing (as ``ssl-data-curation``).

    Why fresh seeds: started from the current centroids, the rerun is nearly a no-op (each
    centroid's nearest members average back to it); reseeded, the union (where a dense cluster
    counts no more than a sparse one) decides where the centroids go."""
    centroids, labels = kmeans(x, k, iterations, seed)
    if sample_size <= 1 or steps <= 0:
        return centroids, labels
    points = torch.as_tensor(x).to(centroids.dtype)
    labels, dists = assign(points, centroids)
    for step in range(steps):
        subset = cluster_samples(labels, dists, sample_size)
        if len(subset) < k:
            break
        centroids, _ = kmeans(points[subset], k, iterations, step_seed(seed, step))
        labels, dists = assign(points, centroids)
    return centroids, labels


@dataclass(frozen=True)
class LevelConfig:
    """One level: ``clusters``, resampling ``steps`` and ``sample_size`` (members per cluster; <= 1:
    no resampling, whatever the steps)."""

    clusters: int
    resampling_steps: int = 0
    sample_size: int = 1


@dataclass
class Hierarchy:
    """``labels[l]`` ``(n_l,)``: the level-``l+1`` cluster of each node of level ``l`` (level 0 = the
    points); ``centroids[l]`` ``(k_l, F)``. :meth:`point_clusters` gives every point's path."""

    labels: list[np.ndarray]
    centroids: list[np.ndarray]
    points: np.ndarray = field(repr=False)

    def point_clusters(self) -> np.ndarray:
        """``(n, levels)``: each point's cluster id at every level, bottom to top."""
        path = [self.labels[0]]
        for labels in self.labels[1:]:
            path.append(labels[path[-1]])
        return np.stack(path, axis=1)


def hierarchical_kmeans(x: np.ndarray | Tensor, levels: list[LevelConfig], iterations: int = 50,
                        seed: int = 0) -> Hierarchy:
    """Level 1 clusters the points, each further level the centroids of the level below."""
    if not levels:
        raise ValueError("levels is empty: give at least one LevelConfig")
    points = torch.as_tensor(np.asarray(x)).double()
    nodes = points
    labels, centroids = [], []
    for depth, level in enumerate(levels):
        if level.clusters > len(nodes):
            raise ValueError(f"level {depth + 1} asks for {level.clusters} clusters of {len(nodes)} nodes; "
                             "each level must have fewer clusters than the one below")
        c, lab = resampling_kmeans(nodes, level.clusters, level.resampling_steps, level.sample_size,
                                   iterations, seed + depth)
        labels.append(lab.numpy())
        centroids.append(c.numpy())
        nodes = c
    return Hierarchy(labels, centroids, points.numpy())


def water_fill(sizes: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """Counts ``<= sizes`` summing to ``min(target, sum(sizes))``, as equal as the sizes allow."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if target >= sizes.sum():
        return sizes.copy()
    low, high = 0, int(sizes.max())
    while low < high:  # the largest cap x with sum(min(x, size)) <= target
        mid = (low + high + 1) // 2
        if np.minimum(mid, sizes).sum() <= target:
            low = mid
        else:
            high = mid - 1
    counts = np.minimum(low, sizes)
    remainder = target - int(counts.sum())
    above = np.flatnonzero(sizes > low)
    counts[rng.choice(above, remainder, replace=False)] += 1
    return counts


def balanced_sample(hierarchy: Hierarchy, target: int, leaf: LeafStrategy = "closest",
                    seed: int = 0) -> np.ndarray:
    """Indices of ``min(target, n)`` points, spread evenly top-down over the hierarchy's clusters."""
    if leaf not in ("closest", "random"):
        raise ValueError(f"leaf must be 'closest' or 'random', got {leaf!r}")
    rng = np.random.default_rng(seed)
    levels = len(hierarchy.labels)
    # children[l][c]: nodes of level l whose parent is cluster c of level l+1
    children = [[np.flatnonzero(hierarchy.labels[l] == c) for c in range(len(hierarchy.centroids[l]))]
                for l in range(levels)]
    # number of points under each node of each level (level 0 nodes are points: 1 each)
    weight = [np.ones(len(hierarchy.labels[0]), dtype=np.int64)]
    for l in range(levels):
        weight.append(np.array([weight[l][kids].sum() for kids in children[l]], dtype=np.int64))

    chosen: list[np.ndarray] = []

    def take(level: int, nodes: np.ndarray, budget: int) -> None:
        counts = water_fill(weight[level][nodes], budget, rng)
        for node, count in zip(nodes, counts):
            if count == 0:
                continue
            kids = children[level - 1][node]
            if level - 1 > 0:
                take(level - 1, kids, int(count))
            elif leaf == "random":
                chosen.append(rng.choice(kids, int(count), replace=False))
            else:
                d = ((hierarchy.points[kids] - hierarchy.centroids[0][node]) ** 2).sum(1)
                chosen.append(kids[np.argsort(d, kind="stable")[: int(count)]])

    take(levels, np.arange(len(hierarchy.centroids[-1])), target)
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def entropy(labels: np.ndarray) -> float:
    """Shannon entropy (nats) of the empirical distribution of ``labels``."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
