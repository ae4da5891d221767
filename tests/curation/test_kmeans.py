"""Resampling k-means as in ``ssl-data-curation`` (Vo et al. 2024) and the k-means++ draw.

The module is imported whole (not its names) so that each test stands or falls on its own."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from curation import kmeans as km


def _dense_blob_and_wide_spread(seed: int, n: int = 2000) -> torch.Tensor:
    """90 % of the points in a unit Gaussian blob at the origin, 10 % uniform over a 20 x 20 square."""
    rng = np.random.default_rng(seed)
    dense = rng.normal(0, 1, (9 * n // 10, 2))
    wide = rng.uniform(-10, 10, (n - len(dense), 2))
    return torch.as_tensor(np.concatenate([dense, wide]))


def _share_in_blob(centroids: torch.Tensor) -> float:
    return float((centroids.norm(dim=1) < 2.5).double().mean())


@pytest.mark.parametrize("seed", range(3))
def test_resampling_moves_centroids_out_of_the_dense_blob(seed: int) -> None:
    """Plain k-means puts ~40 % of 40 centroids in the blob (12 seeds: 0.375-0.425), resampling from
    fresh seeds 12-20 %; warm-started from the current centroids it stayed at 35-45 %."""
    x = _dense_blob_and_wide_spread(seed)
    plain = _share_in_blob(km.kmeans(x, 40, seed=seed)[0])
    resampled = _share_in_blob(km.resampling_kmeans(x, 40, steps=5, sample_size=3, seed=seed)[0])
    assert plain >= 0.3
    assert resampled <= plain - 0.15


def _spy_on_kmeans(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """The points of every :func:`~curation.kmeans.kmeans` call, in order."""
    calls: list[torch.Tensor] = []
    plain = km.kmeans

    def spy(x, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(torch.as_tensor(x).clone())
        return plain(x, *args, **kwargs)

    monkeypatch.setattr(km, "kmeans", spy)
    return calls


def test_resampling_samples_each_clusters_own_members(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cluster of 2 points far from one of 50 gives its 2 members to the sample, not the 3 points
    of the big cluster nearest its centroid; the big one gives the 5 members nearest its own."""
    rng = np.random.default_rng(0)
    big = rng.normal(0, 1, (50, 2))
    x = torch.as_tensor(np.concatenate([big, [[20.0, 0.0], [20.0, 1.0]]]))
    calls = _spy_on_kmeans(monkeypatch)
    _, labels = km.resampling_kmeans(x, 2, steps=1, sample_size=5, seed=0)
    assert labels.tolist() == [labels[0].item()] * 50 + [1 - labels[0].item()] * 2
    nearest = np.argsort(((big - big.mean(0)) ** 2).sum(1), kind="stable")[:5]
    expected = x[np.sort(np.concatenate([nearest, [50, 51]]))]
    assert len(calls) == 2 and torch.equal(calls[1], expected)


def test_cluster_samples_ranks_within_each_cluster() -> None:
    labels = torch.tensor([0, 2, 0, 0, 2, 0, 3])  # cluster 1 empty; a tie at 0.2 in cluster 0
    dists = torch.tensor([0.5, 9.0, 0.2, 0.2, 1.0, 0.1, 7.0], dtype=torch.float64)
    assert km.cluster_samples(labels, dists, 2).tolist() == [1, 2, 4, 5, 6]
    assert km.cluster_samples(labels, dists, 3).tolist() == [1, 2, 3, 4, 5, 6]
    assert km.cluster_samples(labels, dists, 10).tolist() == list(range(7))


@pytest.mark.parametrize("sample_size", [0, 1])
def test_sample_size_one_or_less_resamples_nothing(sample_size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    x = _dense_blob_and_wide_spread(0, 300)
    calls = _spy_on_kmeans(monkeypatch)
    resampled = km.hierarchical_kmeans(x.numpy(), [km.LevelConfig(10, resampling_steps=4, sample_size=sample_size)])
    plain = km.hierarchical_kmeans(x.numpy(), [km.LevelConfig(10)])
    assert len(calls) == 2  # one k-means per hierarchy, no resampling rerun
    assert np.array_equal(resampled.labels[0], plain.labels[0])
    assert np.array_equal(resampled.centroids[0], plain.centroids[0])


def test_resampling_steps_are_seeded_apart_and_reproducibly() -> None:
    assert km.step_seed(0, 0) != km.step_seed(0, 1) != km.step_seed(1, 0)
    x = _dense_blob_and_wide_spread(1, 500)
    first = km.resampling_kmeans(x, 10, steps=3, sample_size=4, seed=7)
    again = km.resampling_kmeans(x, 10, steps=3, sample_size=4, seed=7)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_weighted_draws_follow_the_weights() -> None:
    weights = torch.tensor([0.0, 1.0, 2.0, 0.0, 5.0, 2.0], dtype=torch.float64)
    draws = km.weighted_draws(weights, 200_000, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(draws, minlength=len(weights)).double() / len(draws)
    assert frequencies[[0, 3]].tolist() == [0.0, 0.0]
    assert torch.allclose(frequencies, weights / weights.sum(), atol=0.005)
    again = km.weighted_draws(weights, 200_000, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


def _no_multinomial(*args, **kwargs):  # type: ignore[no-untyped-def]
    raise AssertionError("torch.multinomial refuses more than 2**24 categories: draw by inverse CDF")


def test_weighted_draws_past_multinomials_category_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """``2**24 + 1`` weights (a level-1 pool above ~16.8M points), all zero but three."""
    monkeypatch.setattr(torch, "multinomial", _no_multinomial)
    weights = torch.zeros(2**24 + 1)
    positive = [0, 12_345, 2**24]
    weights[positive] = torch.tensor([1.0, 2.0, 1.0])
    draws = km.weighted_draws(weights, 4000, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == set(positive)
    assert abs((draws == 12_345).double().mean().item() - 0.5) < 0.05


def test_kmeans_plusplus_draws_without_multinomial(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "multinomial", _no_multinomial)
    x = _dense_blob_and_wide_spread(0, 300)
    seeds = km.kmeans_plusplus(x, 12, torch.Generator().manual_seed(0))
    assert seeds.shape == (12, 2) and len(torch.unique(seeds, dim=0)) == 12
