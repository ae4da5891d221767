"""Connected components, k-means, balancing, the indexes and retrieval against independent
implementations (scipy, sklearn, plain numpy dot products)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components as scipy_components

from curation.dedup import connected_components, deduplicate
from curation.embed import l2_normalise
from curation.index import IndexConfig, build_index, pq_subquantisers
from curation.kmeans import LevelConfig, balanced_sample, entropy, hierarchical_kmeans, kmeans, water_fill
from curation.retrieve import kmeans_clusters, retrieve_cluster, retrieve_nearest

IVF = IndexConfig(flat_max=1000, nlist=16, pq_m=16, nprobe=16)  # all lists probed: only PQ approximates


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


def test_connected_components_of_a_long_chain_in_reverse_order() -> None:
    n = 2000
    pairs = np.stack([np.arange(n - 1, 0, -1), np.arange(n - 2, -1, -1)], axis=1)  # (i, i-1), i descending
    labels = connected_components(n + 3, pairs)
    assert labels[:n].tolist() == [0] * n and labels[n:].tolist() == [1, 2, 3]


def _near_copies(rng: np.random.Generator, sources: np.ndarray, cosine: float) -> np.ndarray:
    sigma = np.sqrt((1 / cosine**2 - 1) / sources.shape[1])
    return (sources + sigma * rng.normal(size=sources.shape)).astype(np.float32)


def test_ivfpq_similarities_are_exact_and_rank_like_flat() -> None:
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(3000, 32)).astype(np.float32)
    seeds = _near_copies(rng, pool[:20], 0.95)
    index = build_index(pool, IVF)
    assert index.kind == "ivfpq" and index.describe()["nlist"] == 16 and index.describe()["pq_m"] == 16
    sims, rows = index.search(seeds, 5)
    exact = np.einsum("qf,qkf->qk", l2_normalise(seeds), l2_normalise(pool)[rows])
    np.testing.assert_allclose(sims, exact, atol=1e-5)
    assert (np.diff(sims, axis=1) <= 1e-6).all()
    assert (rows[:, 0] == np.arange(20)).all()
    graph_sims, graph = index.neighbours(3)
    flat = build_index(pool)
    flat_sims, flat_graph = flat.neighbours(3)
    assert flat.kind == "flat" and (flat_graph[:, 0] == np.arange(3000)).all()
    assert (graph[:, 0] == np.arange(3000)).all() and np.allclose(graph_sims[:, 0], 1, atol=1e-5)
    assert (graph_sims <= flat_sims + 1e-5).all()  # exact scores: never above the true k nearest
    assert (graph[:, 1] == flat_graph[:, 1]).mean() > 0.6  # 4-bit PQ on isotropic 32-d data: 0.72


def test_ivf_dedup_finds_the_injected_pairs_as_flat_does() -> None:
    rng = np.random.default_rng(1)
    pool = rng.normal(size=(4000, 64)).astype(np.float32)
    pool[3800:] = _near_copies(rng, pool[:200], 0.9)
    injected = {(i, 3800 + i) for i in range(200)}
    for config in (IndexConfig(), IndexConfig(flat_max=1000, nlist=32, nprobe=8)):
        result = deduplicate(pool, threshold=0.6, index_config=config)
        assert {tuple(p) for p in result.pairs.tolist()} == injected
        assert result.keep.sum() == 3800 and len(result.groups()) == 200
        assert all(len(g) == 2 and g[1] - g[0] == 3800 for g in result.groups())


def test_retrieve_nearest_skips_rows_not_allowed() -> None:
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(500, 16)).astype(np.float32)
    seeds = _near_copies(rng, pool[:10], 0.95)
    index = build_index(pool)
    first = retrieve_nearest(index, seeds, n=3)
    assert [r[0] for r in first] == list(range(10)) and all(len(r) == 3 for r in first)
    allowed = np.ones(500, bool)
    allowed[:5] = False
    masked = retrieve_nearest(index, seeds, n=3, allowed=allowed)
    _, top = index.search(seeds, 12)
    assert [m.tolist() for m in masked] == [[r for r in row if r >= 5][:3] for row in top.tolist()]
    assert [m[0] for m in masked[5:]] == list(range(5, 10))


def test_retrieve_cluster_takes_the_seed_cluster_nearest_first_or_at_random() -> None:
    rng = np.random.default_rng(0)
    centres = 8 * np.eye(8)[:5]  # 5 blobs at right angles: well apart once normalised
    pool = np.concatenate([c + rng.normal(size=(100, 8)) for c in centres]).astype(np.float32)
    blob = np.repeat(np.arange(5), 100)
    clusters = kmeans_clusters(pool, 5)
    assert _same_partition(clusters.labels, blob)
    seeds = pool[[0, 150, 420]] + 0.01
    nearest = retrieve_cluster(pool, clusters, seeds, m=7)
    assert [r[0] for r in nearest] == [0, 150, 420]
    assert [set(blob[r]) for r in nearest] == [{0}, {1}, {4}] and all(len(r) == 7 for r in nearest)
    allowed = blob != 1
    drawn = retrieve_cluster(pool, clusters, seeds, m=200, order="random", allowed=allowed)
    assert [len(r) for r in drawn] == [100, 0, 100] and set(blob[drawn[2]]) == {4}
    index = build_index(pool, IndexConfig(flat_max=100, nlist=5, pq_m=4))
    assert index.clusters().labels.shape == (500,) and index.clusters().centroids.shape == (5, 8)
    with pytest.raises(ValueError, match="no coarse clusters"):
        build_index(pool).clusters()


def test_l2_normalise_copies_only_when_it_must() -> None:
    x = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    unit = l2_normalise(x)
    assert unit is not x and np.allclose(np.linalg.norm(unit, axis=1), 1)
    assert l2_normalise(unit) is unit
    assert l2_normalise(unit.astype(np.float64)) is not unit


def test_pq_subquantisers() -> None:
    assert pq_subquantisers(384) == 48 and pq_subquantisers(108) == 12 and pq_subquantisers(32, 8) == 8
    with pytest.raises(ValueError, match="must divide"):
        pq_subquantisers(384, 10)


def test_kmeans_rejects_too_many_clusters() -> None:
    with pytest.raises(ValueError, match="k must be"):
        kmeans(torch.zeros(3, 2), 5)
