"""Segmentation, depth and retrieval metrics against hand-computed cases and independent references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix, jaccard_score

from evaluators.dense_metrics import (
    QueryTruth,
    average_precision,
    depth_scores,
    depth_scores_of,
    depth_tally,
    rank,
    retrieval_map,
    segmentation_confusion,
    segmentation_scores,
)


def test_segmentation_by_hand() -> None:
    targets = torch.tensor([[0, 0, 1], [1, 2, 255]])
    predictions = torch.tensor([[0, 1, 1], [1, 0, 2]])
    confusion = segmentation_confusion(predictions, targets, num_classes=4)
    assert confusion.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    scores = segmentation_scores(confusion)
    assert scores["iou_0"] == pytest.approx(1 / 3) and scores["iou_1"] == pytest.approx(2 / 3)
    assert scores["iou_2"] == 0 and np.isnan(scores["iou_3"])  # class 3 never occurs: left out of the mean
    assert scores["miou"] == pytest.approx(1 / 3) and scores["pixel_accuracy"] == pytest.approx(3 / 5)


def test_segmentation_against_scikit_learn_on_random_maps() -> None:
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 6, (4, 16, 16), generator=generator)
    targets[torch.rand(targets.shape, generator=generator) < 0.1] = 255
    predictions = torch.where(torch.rand(targets.shape, generator=generator) < 0.6, targets.clamp(max=5),
                              torch.randint(0, 6, targets.shape, generator=generator))
    confusion = sum(segmentation_confusion(p, t, 6) for p, t in zip(predictions, targets))  # accumulated per image
    keep = targets != 255
    expected = confusion_matrix(targets[keep].numpy(), predictions[keep].numpy(), labels=range(6))
    np.testing.assert_array_equal(confusion.numpy(), expected)
    scores = segmentation_scores(confusion)
    reference = jaccard_score(targets[keep].numpy(), predictions[keep].numpy(), labels=range(6), average="macro")
    assert scores["miou"] == pytest.approx(reference)


def test_segmentation_rejects_bad_labels() -> None:
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\) or 255"):
        segmentation_confusion(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="differ in shape"):
        segmentation_confusion(torch.zeros(2, 2), torch.zeros(2, 3), 3)


def _per_image(guess: np.ndarray, truth: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    """The depth toolbox's way, written plainly: each image's scores over its valid pixels, then the
    mean over the images that have one."""
    per_image = []
    for d, g, keep in zip(guess, truth, valid):
        if keep.any():
            d, g = d[keep], g[keep]
            per_image.append((np.sqrt(np.mean((d - g) ** 2)), np.mean(np.abs(d - g) / g),
                              np.mean(np.maximum(d / g, g / d) < 1.25)))
    rmse, abs_rel, delta1 = np.mean(per_image, axis=0)
    return {"rmse": rmse, "abs_rel": abs_rel, "delta1": delta1}


def test_depth_scores_are_per_image_then_averaged_over_images() -> None:
    """Random maps whose images keep different shares of valid pixels (one none, one a single
    pixel), scored in batches of 2 and 3 and at once: the toolbox's per-image means averaged over
    the images with a valid pixel, not the pixels pooled (which differ here)."""
    rng = np.random.default_rng(1)
    truth = rng.uniform(0.5, 10, (7, 8, 8))
    truth[rng.random(truth.shape) < rng.uniform(0.05, 0.9, (7, 1, 1))] = 0  # missing depth, a share per image
    truth[2] = 0  # no valid pixel: left out
    truth[4] = 0
    truth[4, 3, 3] = 2.0
    guess = truth * rng.uniform(0.6, 1.5, truth.shape) + rng.uniform(0, 3, (7, 1, 1))
    guess[truth == 0] = np.nan  # never read
    expected = _per_image(guess, truth, truth > 0)
    scores = depth_scores(torch.from_numpy(guess), torch.from_numpy(truth))
    assert scores == pytest.approx(expected, rel=1e-12)
    batched = depth_tally(torch.from_numpy(guess[:2]), torch.from_numpy(truth[:2])) + depth_tally(
        torch.from_numpy(guess[2:5]), torch.from_numpy(truth[2:5])) + depth_tally(torch.from_numpy(guess[5:]),
                                                                                  torch.from_numpy(truth[5:]))
    assert batched[0] == 6 and depth_scores_of(batched) == pytest.approx(expected, rel=1e-12)
    d, g = guess[truth > 0], truth[truth > 0]
    assert abs(scores["rmse"] - np.sqrt(np.mean((d - g) ** 2))) > 0.05  # the pooled RMSE is another number
    capped = depth_scores(torch.from_numpy(guess), torch.from_numpy(truth), max_depth=5.0)
    assert capped == pytest.approx(_per_image(guess, truth, (truth > 0) & (truth <= 5)), rel=1e-12)
    with pytest.raises(ValueError, match="no valid ground-truth pixel"):
        depth_scores(torch.ones(1, 2, 2), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match=r"depth maps must be \(N, H, W\), got \(2, 2\)"):
        depth_tally(torch.ones(2, 2), torch.ones(2, 2))


def brute_force_ap(ranking: list[int], positives: set[int], ignored: set[int]) -> float:
    """Walk the list, skipping ignored items; add a trapezoid of the P-R curve at every positive."""
    area, hits, position, last_precision = 0.0, 0, 0, 1.0
    for item in ranking:
        if item in ignored:
            continue
        position += 1
        if item in positives:
            hits += 1
            precision = hits / position
            area += (last_precision + precision) / 2 / len(positives)
        last_precision = hits / position  # precision just before the next item
    return area


def test_average_precision_by_hand_and_junk_is_invisible() -> None:
    # positives at ranks 0 and 2 of three: (1 + 1)/2 * 1/2 + (1/2 + 2/3)/2 * 1/2
    expected = 0.5 + (0.5 + 2 / 3) / 4
    assert average_precision(np.array([10, 11, 12]), np.array([10, 12]), np.array([])) == pytest.approx(expected)
    with_junk = average_precision(np.array([99, 10, 98, 11, 12]), np.array([10, 12]), np.array([98, 99]))
    assert with_junk == pytest.approx(expected)
    assert average_precision(np.array([1, 2]), np.array([5]), np.array([])) == 0  # never retrieved


def test_map_against_brute_force_on_random_rankings() -> None:
    rng = np.random.default_rng(2)
    database, queries = 40, 12
    similarity = rng.normal(size=(queries, database))
    truths = []
    for _ in range(queries):
        picks = rng.permutation(database)
        truths.append(QueryTruth(easy=picks[:4].tolist(), hard=picks[4:7].tolist(), junk=picks[7:10].tolist()))
    truths[3] = QueryTruth(easy=[], hard=[], junk=[1, 2])  # no positives: not in the mean
    scores = retrieval_map(rank(similarity), truths)
    for protocol in ("easy", "medium", "hard"):
        aps = []
        for q, truth in enumerate(truths):
            positives, ignored = truth.split(protocol)
            if len(positives):
                ranking = sorted(range(database), key=lambda i: -similarity[q, i])
                aps.append(brute_force_ap(ranking, set(positives.tolist()), set(ignored.tolist())))
        assert scores[f"map_{protocol}"] == pytest.approx(np.mean(aps))
    assert scores["map_easy"] != scores["map_hard"]


def test_protocols_pick_positives_and_ignored_images() -> None:
    truth = QueryTruth(easy=[1, 2], hard=[3], junk=[4])
    assert [sorted(x.tolist()) for x in truth.split("easy")] == [[1, 2], [3, 4]]
    assert [sorted(x.tolist()) for x in truth.split("medium")] == [[1, 2, 3], [4]]
    assert [sorted(x.tolist()) for x in truth.split("hard")] == [[3], [1, 2, 4]]
    with pytest.raises(ValueError, match="unknown protocol 'mid'"):
        truth.split("mid")
