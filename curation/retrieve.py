"""Retrieval of pool images like a seed set (DINOv2's LVD-142M recipe).

* Sample-based, for large seed sets: the ``n`` nearest pool images of each seed image
  (:func:`retrieve_nearest`, through a :class:`~curation.index.SearchIndex`, exact cosines).
* Cluster-based, for small seed sets: a clustering of the pool, then up to ``m`` pool images of
  the cluster of each seed image, those nearest the seed or random (:func:`retrieve_cluster`).
  The clustering is the caller's choice: :func:`kmeans_clusters` (k-means on unit rows, any number
  of clusters) or, for an IVF index, its coarse k-means for free (``SearchIndex.clusters``).

``allowed`` ``(N,)`` bool masks rows out (removed duplicates, eval near-copies): a seed then gets
its nearest allowed rows. Both return one array of pool rows per seed.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from curation.embed import l2_normalise
from curation.index import Clusters, SearchIndex
from curation.kmeans import kmeans
from dinoflow.progress import progress

CANDIDATES_PER_RESULT = 4  # sample-based with `allowed`: the n nearest allowed among the 4n nearest


def retrieve_nearest(index: SearchIndex, seeds: np.ndarray, n: int = 4,
                     allowed: np.ndarray | None = None) -> list[np.ndarray]:
    """Per seed, up to ``n`` pool rows, nearest first. With ``allowed``, the nearest allowed rows
    among the ``4n`` nearest (fewer when more than ``3n`` of those are masked out)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    fetch = n if allowed is None else n * CANDIDATES_PER_RESULT
    _, neighbours = index.search(seeds, fetch)  # (S, fetch), best first
    valid = neighbours >= 0
    if allowed is not None:
        valid &= np.asarray(allowed, bool)[np.maximum(neighbours, 0)]
    return [row[ok][:n] for row, ok in zip(neighbours, valid)]


def kmeans_clusters(pool: np.ndarray, clusters: int, seed: int = 0, iterations: int = 50,
                    points_per_cluster: int = 256) -> Clusters:
    """k-means of the L2-normalised rows: k-means++ and Lloyd (:func:`curation.kmeans.kmeans`,
    float32) on a sample of at most ``points_per_cluster`` rows a cluster, centroids scaled to unit
    length, then every row to the centroid of highest inner product (an IVF index's rule)."""
    import faiss

    x = l2_normalise(pool)
    if not 1 <= clusters <= len(x):
        raise ValueError(f"clusters must be in [1, {len(x)}] (the pool size), got {clusters}")
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(x), min(len(x), points_per_cluster * clusters), replace=False))
    centroids = l2_normalise(kmeans(torch.from_numpy(x[sample]), clusters, iterations, seed,
                                    dtype=torch.float32)[0].numpy())
    search = faiss.IndexFlatIP(x.shape[1])
    search.add(centroids)
    _, labels = search.search(x, 1)
    return Clusters(centroids, labels[:, 0].astype(np.int64))


def retrieve_cluster(pool: np.ndarray, clusters: Clusters, seeds: np.ndarray, m: int = 100,
                     order: Literal["nearest", "random"] = "nearest", seed: int = 0,
                     allowed: np.ndarray | None = None) -> list[np.ndarray]:
    """Per seed, up to ``m`` allowed pool rows of the seed's cluster (the centroid of highest inner
    product with it): those nearest the seed (``order="nearest"``) or a random draw (``"random"``)."""
    if order not in ("nearest", "random"):
        raise ValueError(f"order must be 'nearest' or 'random', got {order!r}")
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    x, q = l2_normalise(pool), l2_normalise(seeds)
    labels = np.asarray(clusters.labels, np.int64)
    if allowed is not None:
        labels = np.where(np.asarray(allowed, bool), labels, -1)  # masked rows join no cluster
    by_cluster = np.argsort(labels, kind="stable")  # rows grouped by cluster, ascending rows within
    starts = np.searchsorted(labels[by_cluster], np.arange(len(clusters.centroids) + 1))
    seed_clusters = (q @ clusters.centroids.T).argmax(axis=1)  # (S,): highest inner product, as the rows
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = [np.zeros(0, np.int64)] * len(q)
    # seeds grouped by cluster: each cluster's rows are gathered once, scored against all its seeds
    for cluster in progress(np.unique(seed_clusters), desc="retrieve clusters", unit="cluster"):
        members = by_cluster[starts[cluster]:starts[cluster + 1]]
        group = np.flatnonzero(seed_clusters == cluster)
        if order == "random":
            for s in group:
                chosen[s] = np.sort(rng.choice(members, min(m, len(members)), replace=False))
            continue
        sims = x[members] @ q[group].T  # (members, seeds of this cluster)
        for column, s in enumerate(group):
            chosen[s] = members[np.argsort(-sims[:, column], kind="stable")[:m]]
    return chosen
