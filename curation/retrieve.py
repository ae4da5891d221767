"""Retrieval of pool images like a seed set (DINOv2's LVD-142M recipe).

* Sample-based, for large seed sets: the ``n`` nearest pool images of each seed image.
* Cluster-based, for small seed sets: k-means over the pool, then up to ``m`` pool images of the
  cluster of each seed image (those nearest the seed, or random).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from curation.embed import l2_normalise
from curation.index import IndexConfig, build_index
from curation.kmeans import assign, kmeans


def retrieve_nearest(pool: np.ndarray, seeds: np.ndarray, n: int = 4,
                     index_config: IndexConfig = IndexConfig()) -> tuple[np.ndarray, str]:
    """Sorted unique pool rows among the ``n`` nearest of each seed, and the index kind used."""
    index = build_index(pool, index_config)
    _, neighbours = index.search(seeds, n)  # (S, n)
    rows = neighbours.ravel()
    return np.unique(rows[rows >= 0]), index.kind


def retrieve_cluster(pool: np.ndarray, seeds: np.ndarray, clusters: int, m: int = 100,
                     order: Literal["nearest", "random"] = "nearest", seed: int = 0,
                     iterations: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique pool rows: up to ``m`` of the k-means cluster of each seed image; and the pool's
    cluster labels ``(N,)``. Clustering is on L2-normalised embeddings."""
    if order not in ("nearest", "random"):
        raise ValueError(f"order must be 'nearest' or 'random', got {order!r}")
    x = torch.from_numpy(l2_normalise(pool)).double()
    q = torch.from_numpy(l2_normalise(seeds)).double()
    centroids, labels = kmeans(x, clusters, iterations, seed)
    seed_clusters = assign(q, centroids)[0].numpy()
    labels_np = labels.numpy()
    rng = np.random.default_rng(seed)
    chosen = []
    for query, cluster in zip(q, seed_clusters):
        members = np.flatnonzero(labels_np == cluster)
        if order == "random":
            chosen.append(rng.choice(members, min(m, len(members)), replace=False))
        else:
            sims = (x[members] @ query).numpy()
            chosen.append(members[np.argsort(-sims, kind="stable")[:m]])
    rows = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
    return np.unique(rows), labels_np
