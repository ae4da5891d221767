"""Connected components, k-means, balancing and retrieval against independent implementations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components as scipy_components

from curation.dedup import connected_components, deduplicate
from curation.index import IndexConfig, build_index
from curation.kmeans import (LevelConfig, balanced_sample, entropy, hierarchical_kmeans, kmeans, water_fill)
from curation.retrieve import retrieve_cluster, retrieve_nearest


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize("seed", range(5))
def test_connected_components_match_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 60
    pairs = rng.integers(0, n, (40, 2))
    ours = connected_components(n, pairs)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    count, theirs = scipy_components(graph, directed=False)
    assert ours.max() + 1 == count
    assert _same_partition(ours, theirs)


def test_kmeans_matches_sklearn_on_blobs() -> None:
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (6, 5))
    x = np.concatenate([c + rng.normal(0, 1, (50, 5)) for c in centres])
    centroids, labels = kmeans(x, 6, seed=0)
    reference = sklearn_cluster.KMeans(6, n_init=10, random_state=0).fit(x)
    assert _same_partition(labels.numpy(), reference.labels_)
    inertia = float(((x - centroids.numpy()[labels.numpy()]) ** 2).sum())
    assert inertia == pytest.approx(reference.inertia_, rel=1e-6)


def test_kmeans_inertia_close_to_sklearn_on_noise() -> None:
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    x = np.random.default_rng(1).normal(size=(400, 4))
    centroids, labels = kmeans(x, 8, seed=0)
    inertia = float(((x - centroids.numpy()[labels.numpy()]) ** 2).sum())
    reference = sklearn_cluster.KMeans(8, n_init=5, random_state=0).fit(x)
    assert inertia <= reference.inertia_ * 1.05


def test_water_fill() -> None:
    rng = np.random.default_rng(0)
    counts = water_fill(np.array([100, 3, 10, 50]), 40, rng)
    assert counts.sum() == 40 and counts[1] == 3 and counts[2] == 10
    assert sorted(counts[[0, 3]].tolist()) == [13, 14]
    assert water_fill(np.array([2, 3]), 10, rng).tolist() == [2, 3]


def _skewed(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = [800, 400, 200, 100, 50, 30, 20, 10]
    centres = rng.normal(0, 1, (len(sizes), 16))
    x = np.concatenate([c + 0.15 * rng.normal(size=(s, 16)) for c, s in zip(centres, sizes)])
    return x, np.repeat(np.arange(len(sizes)), sizes)


@pytest.mark.parametrize("leaf", ["closest", "random"])
def test_balanced_sampling_flattens_skewed_concepts(leaf: str) -> None:
    x, concept = _skewed()
    hierarchy = hierarchical_kmeans(x, [LevelConfig(40), LevelConfig(8, resampling_steps=3, sample_size=3)])
    assert hierarchy.point_clusters().shape == (len(x), 2)
    chosen = balanced_sample(hierarchy, 160, leaf=leaf)  # type: ignore[arg-type]
    assert len(chosen) == 160 and len(np.unique(chosen)) == 160
    uniform = np.random.default_rng(0).choice(len(x), 160, replace=False)
    assert entropy(concept[chosen]) > entropy(concept[uniform]) + 0.3
    assert entropy(concept[chosen]) > 0.9 * np.log(8)


def test_dedup_keeps_one_per_group() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(size=(50, 32))
    copies = base[:10] + 0.01 * rng.normal(size=(10, 32))
    result = deduplicate(np.concatenate([base, copies]), threshold=0.95)
    assert result.keep.sum() == 50
    assert len(result.groups()) == 10
    for row in range(10):
        assert result.component[row] == result.component[50 + row]


def test_ivfpq_index_and_retrieval() -> None:
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(3000, 32)).astype(np.float32)
    seeds = pool[:20] + 0.05 * rng.normal(size=(20, 32)).astype(np.float32)
    config = IndexConfig(flat_max=1000, nlist=16, pq_m=8, nprobe=16)
    index = build_index(pool, config)
    assert index.kind == "ivfpq"
    _, top = index.search(seeds, 1)
    assert (top[:, 0] == np.arange(20)).mean() >= 0.9
    rows, kind = retrieve_nearest(pool, seeds, n=4)
    assert kind == "flat" and set(range(20)) <= set(rows.tolist()) and len(rows) <= 80
    rows, labels = retrieve_cluster(pool[:500], seeds[:5], clusters=10, m=7)
    assert len(rows) <= 35 and set(range(5)) <= set(rows.tolist())
    assert labels.shape == (500,)


def test_kmeans_rejects_too_many_clusters() -> None:
    with pytest.raises(ValueError, match="k must be"):
        kmeans(torch.zeros(3, 2), 5)
