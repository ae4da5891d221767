"""Metrics of the dense and retrieval benchmarks: segmentation, monocular depth, instance retrieval.

Why one module: the heads and data adapters of each task differ, but their scores are small,
exact formulas that every task's report and its tests share.

* **Segmentation**: a ``C x C`` confusion matrix accumulated over images (rows: ground truth,
  columns: prediction), pixels labelled ``ignore_index`` (255) skipped. Per class
  ``IoU_c = TP_c / (TP_c + FP_c + FN_c)``; mIoU averages the classes that occur in the ground
  truth or the predictions (union > 0); pixel accuracy is ``trace / total``.
* **Depth** over each image's valid pixels (ground truth > 0, optionally at most ``max_depth``):
  ``RMSE_i = sqrt(mean((d - d*)^2))``, ``AbsRel_i = mean(|d - d*| / d*)``,
  ``delta1_i = mean(max(d / d*, d* / d) < 1.25)``, then each averaged over the images that have a
  valid pixel (``RMSE = mean_i RMSE_i``, ...), as the depth toolbox the paper used scores them
  (per image, then the mean; not pooled over the test set's pixels).
* **Retrieval** (revisited Oxford/Paris, Radenovic et al. 2018): each query has ``easy``,
  ``hard`` and ``junk`` database images. The protocols pick positives and ignored images:
  easy (positives easy; ignore junk + hard), medium (easy + hard; ignore junk), hard (hard;
  ignore junk + easy). Ignored images are removed from the ranking; average precision is the
  trapezoidal area under precision-recall: for the ``j``-th positive (0-based) at rank ``r``
  (0-based, counted without ignored images), the area gains
  ``(1 / P) * (j / r + (j + 1) / (r + 1)) / 2`` (with ``j / r := 1`` when ``r = 0``), ``P``
  the number of positives. A query without positives is left out of the mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

IGNORE_INDEX = 255
PROTOCOLS = ("easy", "medium", "hard")


def segmentation_confusion(predictions: Tensor, targets: Tensor, num_classes: int,
                           ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``(C, C)`` int64 counts of (ground truth, prediction) over pixels not ``ignore_index``."""
    if predictions.shape != targets.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} differ in shape")
    keep = targets != ignore_index
    truth, guess = targets[keep].long(), predictions[keep].long()
    if len(truth) and (truth.min() < 0 or truth.max() >= num_classes or guess.min() < 0 or guess.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}) or {ignore_index} (ignored)")
    return torch.bincount(truth * num_classes + guess, minlength=num_classes * num_classes).view(num_classes, -1)


def segmentation_scores(confusion: Tensor) -> dict[str, float]:
    """``miou``, ``pixel_accuracy`` and ``iou_<c>`` per class (NaN where a class never occurs)."""
    confusion = confusion.double()
    true_positive = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    iou = torch.where(union > 0, true_positive / union.clamp(min=1), torch.full_like(union, float("nan")))
    present = union > 0
    scores = {
        "miou": float(iou[present].mean()) if present.any() else float("nan"),
        "pixel_accuracy": float(true_positive.sum() / confusion.sum().clamp(min=1)),
    }
    scores.update({f"iou_{c}": float(v) for c, v in enumerate(iou)})
    return scores


def depth_scores(predictions: Tensor, targets: Tensor, max_depth: float | None = None) -> dict[str, float]:
    """``rmse``, ``abs_rel`` and ``delta1`` of ``(N, H, W)`` depth maps (metres), each image's over
    its valid pixels, averaged over the images (see the module docstring)."""
    return depth_scores_of(depth_tally(predictions, targets, max_depth))


def depth_tally(predictions: Tensor, targets: Tensor, max_depth: float | None = None) -> Tensor:
    """``(4,)`` float64: the images of ``(N, H, W)`` maps with a valid pixel, and the sums over them
    of each image's RMSE, AbsRel and delta1. Added over batches of images, they score the whole
    test set per image without holding its depth maps (:func:`depth_scores_of`); an image with no
    valid pixel adds nothing, as the toolbox leaves it out of the mean."""
    if predictions.shape != targets.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} differ in shape")
    if targets.ndim != 3:  # the first dimension is the images scored one by one
        raise ValueError(f"depth maps must be (N, H, W), got {tuple(targets.shape)}")
    valid = targets > 0
    if max_depth is not None:
        valid &= targets <= max_depth
    valid = valid.flatten(1)
    truth = torch.where(valid, targets.flatten(1).double(), 1.0)  # 1: any positive value, masked out below
    guess = predictions.flatten(1).double().clamp(min=1e-6)
    ratio = torch.maximum(guess / truth, truth / guess)
    pixels = valid.sum(dim=1)
    scored = pixels > 0
    per_pixel = torch.stack([(guess - truth) ** 2, (guess - truth).abs() / truth, (ratio < 1.25).double()])
    means = torch.where(valid, per_pixel, 0.0).sum(dim=2)[:, scored] / pixels[scored]  # (3, images scored)
    means[0] = means[0].sqrt()
    return torch.cat([scored.sum().double()[None], means.sum(dim=1)]).cpu()


def depth_scores_of(tally: Tensor) -> dict[str, float]:
    """``rmse``, ``abs_rel`` and ``delta1``, the means over images of :func:`depth_tally`'s sums."""
    images, rmse, relative, within = tally.tolist()
    if not images:
        raise ValueError("no valid ground-truth pixel (depth > 0) to score")
    return {"rmse": rmse / images, "abs_rel": relative / images, "delta1": within / images}


@dataclass(frozen=True)
class QueryTruth:
    """Database indices of one query's easy, hard and junk images (revisited Oxford/Paris)."""

    easy: Sequence[int]
    hard: Sequence[int]
    junk: Sequence[int]

    def split(self, protocol: str) -> tuple[np.ndarray, np.ndarray]:
        """``(positives, ignored)`` under ``protocol`` (easy, medium or hard)."""
        easy, hard, junk = (np.asarray(x, dtype=np.int64) for x in (self.easy, self.hard, self.junk))
        if protocol == "easy":
            return easy, np.concatenate([junk, hard])
        if protocol == "medium":
            return np.concatenate([easy, hard]), junk
        if protocol == "hard":
            return hard, np.concatenate([junk, easy])
        raise ValueError(f"unknown protocol {protocol!r}; allowed: {', '.join(PROTOCOLS)}")


def average_precision(ranking: np.ndarray, positives: np.ndarray, ignored: np.ndarray) -> float:
    """AP of one ranked list of database indices (best first); see the module docstring."""
    if len(positives) == 0:
        return float("nan")
    kept = ranking[~np.isin(ranking, ignored)]
    ranks = np.flatnonzero(np.isin(kept, positives)).astype(np.float64)  # 0-based, sorted
    found = np.arange(len(ranks), dtype=np.float64)
    before = np.divide(found, ranks, out=np.ones_like(ranks), where=ranks > 0)
    return float(((before + (found + 1) / (ranks + 1)) / 2).sum() / len(positives))


def rank(similarity: np.ndarray) -> np.ndarray:
    """Database indices per query, most similar first (ties: lower index first)."""
    return np.argsort(-similarity, axis=1, kind="stable")


def retrieval_map(rankings: np.ndarray, truths: Sequence[QueryTruth],
                  protocols: Sequence[str] = PROTOCOLS) -> Mapping[str, float]:
    """mAP per protocol (``map_easy`` …) from full rankings ``(queries, database)``, best first."""
    if rankings.shape[0] != len(truths):
        raise ValueError(f"{rankings.shape[0]} ranked queries but {len(truths)} ground truths")
    scores = {}
    for protocol in protocols:
        aps = [average_precision(rankings[q], *truths[q].split(protocol)) for q in range(len(truths))]
        valid = [ap for ap in aps if not np.isnan(ap)]
        scores[f"map_{protocol}"] = float(np.mean(valid)) if valid else float("nan")
    return scores
