"""k-NN accuracies per k, and the flat metric names every report is logged under.

Why: a training run, a pipeline stage and a notebook should all score a backbone the same way
and log the same metric names. The report itself (k-NN plus the linear probe over its views) is
:func:`evaluators.classification.classification_report`'s, JSON-able; :func:`report_metrics`
flattens it. Accuracies are fractions in [0, 1].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from evaluators.knn import knn_predictions

DEFAULT_KS: tuple[int, ...] = (10, 20, 100, 200)  # the original's k-NN protocol
DEFAULT_TEMPERATURE = 0.07


def knn_accuracies(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Top-1 accuracy of :func:`~evaluators.knn.knn_predict` per k: ``{"k10": acc, ...}``, every k
    voting from one similarity pass (:func:`~evaluators.knn.knn_predictions`, on ``device``).

    A k larger than the train set is skipped (absent from the result), not clipped.
    """
    train_labels, test_labels = train_labels.long(), test_labels.long()
    classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    usable = [k for k in ks if k <= len(train_features)]
    if not usable:
        return {}
    predictions = knn_predictions(train_features, train_labels, test_features, usable, temperature, classes,
                                  device=device)
    return {f"k{k}": float((predictions[k] == test_labels).double().mean()) for k in usable}


def report_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """Flat metric names for a report: ``knn_top1_k20``, ``linear_top1``, ``linear_val_top1``, ``linear_best_lr``,
    ``logreg_top1``, ``logreg_val_top1``, ``logreg_best_c``."""
    metrics = {f"knn_top1_{name}": float(acc) for name, acc in report.get("knn", {}).items()}
    linear = report.get("linear")
    if linear is not None:
        metrics["linear_top1"] = float(linear["test_accuracy"])
        metrics["linear_val_top1"] = float(linear["val_accuracy"])
        metrics["linear_best_lr"] = float(linear["best_lr"])
    logreg = report.get("logreg")
    if logreg is not None:
        metrics["logreg_top1"] = float(logreg["test_accuracy"])
        metrics["logreg_val_top1"] = float(logreg["val_accuracy"])
        metrics["logreg_best_c"] = float(logreg["best_c"])
    return metrics
