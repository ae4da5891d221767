"""One benchmark report on frozen features: weighted k-NN at several k plus the linear probe.

Why: a training run, a pipeline stage and a notebook should all score a backbone the same way
and log the same metric names. :func:`benchmark_report` returns a JSON-able dict (written as an
artifact), :func:`log_report` turns it into flat metrics on a :class:`~dinoflow.tracking.Tracker`.
Accuracies are fractions in [0, 1].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from dinoflow.tracking import Tracker
from evaluators.knn import knn_predictions
from evaluators.linear import LinearProbeConfig, linear_probe

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


def benchmark_report(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    linear: LinearProbeConfig | None = LinearProbeConfig(),
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """k-NN and linear-probe accuracies on one train/test split of frozen features.

    Args:
        train_features, test_features: ``(N, F)`` and ``(M, F)`` features (raw: k-NN normalises
            them itself, the probe uses them as they are).
        train_labels, test_labels: ``(N,)`` and ``(M,)`` int class indices.
        ks, temperature: the k-NN settings; ks above N are skipped.
        linear: the probe's recipe; None skips the probe (no ``"linear"`` key).
        num_classes: C; None means ``1 + the largest label`` seen.
        device: where the k-NN similarities are computed and the linear probe trains.

    Returns:
        ``{"knn": {"k10": acc, ...}, "linear": LinearProbeResult.to_dict()}``, JSON-able.
    """
    train_labels, test_labels = train_labels.long().cpu(), test_labels.long().cpu()
    classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    report: dict[str, Any] = {
        "knn": knn_accuracies(
            train_features, train_labels, test_features, test_labels, ks, temperature, classes, device
        )
    }
    if linear is not None:
        result = linear_probe(
            train_features, train_labels, test_features, test_labels, linear, num_classes=classes, device=device
        )
        report["linear"] = result.to_dict()
    return report


def report_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """Flat metric names for a report: ``knn_top1_k20``, ``linear_top1``, ``linear_val_top1``, ``linear_best_lr``."""
    metrics = {f"knn_top1_{name}": float(acc) for name, acc in report.get("knn", {}).items()}
    linear = report.get("linear")
    if linear is not None:
        metrics["linear_top1"] = float(linear["test_accuracy"])
        metrics["linear_val_top1"] = float(linear["val_accuracy"])
        metrics["linear_best_lr"] = float(linear["best_lr"])
    return metrics


def log_report(report: Mapping[str, Any], tracker: Tracker, step: int) -> dict[str, float]:
    """Log :func:`report_metrics` at ``step`` (always recorded: ``force=True``) and return them."""
    metrics = report_metrics(report)
    tracker.log_metrics(metrics, step=step, force=True)
    return metrics
