"""Fine-grained benchmarks: the logistic regression on frozen features of several small labelled sets.

Why: DINOv2 compares backbones beyond ImageNet on classic classification sets (Food-101,
CIFAR-10/100, SUN397, Stanford Cars, FGVC Aircraft, VOC 2007, DTD, Oxford Pets, Caltech-101,
Flowers-102, CUB-200), each scored by the logistic regression on the final CLS token
(:mod:`evaluators.logreg`: no learning rate or epochs to tune per set, so the accuracy is the
features'). One evaluation runs them all: ``finegrained_data`` names their roots, each class folders
of its own (``train/<class>/``, and ``val/`` or ``test/``), the set named by its root's last part.

Besides top-1, each set's mean per-class accuracy (the mean over the test classes of each one's
recall): the metric the protocol reports for the sets whose test classes are unevenly sized
(Aircraft, Pets, Caltech-101, Flowers), where top-1 favours the large classes.

The suite runs the sets one after another, one set's features held at a time; with a
``work_dir`` each set's feature pass is saved in parts (:mod:`evaluators.feature_parts`) under
``<work_dir>/finegrained/<name>``, so a rerun resumes it.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from evaluators.classification import LabelledFeatures
from evaluators.logreg import LogRegConfig, normalized, predict
from evaluators.report import logreg_fit


def finegrained_sets(given: str) -> list[tuple[str, str]]:
    """``(name, root)`` of each comma-separated root of ``given``, named by its last part
    (``s3://bucket/datasets/food101`` -> ``food101``); two of one name are refused."""
    roots = [root.strip().rstrip("/") for root in given.split(",") if root.strip()]
    sets = [(root.rsplit("/", 1)[-1], root) for root in roots]
    names = [name for name, _ in sets]
    bad = sorted({name for name in names if names.count(name) > 1 or not re.fullmatch(r"[\w.-]+", name)})
    if not sets or bad:
        raise ValueError(f"finegrained_data = {given!r}: give comma-separated roots of class folders, each named by "
                         f"its last part, of letters, digits, '_', '.' or '-', once (e.g. s3://d/food101,s3://d/cars); "
                         f"{'repeated or bad: ' + ', '.join(bad) if bad else 'none given'}")
    return sets


def mean_class_accuracy(predicted: Tensor, labels: Tensor) -> float:
    """The mean over the classes present in ``labels`` of the share of each one's rows predicted right."""
    classes, rows = labels.unique(return_inverse=True)
    right = torch.zeros(len(classes), dtype=torch.float64).index_add_(0, rows, (predicted == labels).double())
    counts = torch.bincount(rows, minlength=len(classes)).double()
    return float((right / counts).mean()) if len(classes) else 0.0


def finegrained_scores(data: LabelledFeatures, device: str | torch.device = "cpu",
                    logreg: LogRegConfig = LogRegConfig()) -> dict:
    """One set's features (:meth:`~evaluators.classification.FolderImages.features`) scored by the
    logistic regression fit on its own train split: ``{**LogRegResult.to_dict(), "mean_class_accuracy",
    "classes"}``."""
    fit = logreg_fit(data, logreg, device)
    assert fit.weight is not None and fit.bias is not None
    predicted = predict(normalized(data.test_x, device), fit.weight, fit.bias).cpu()
    return {**fit.to_dict(), "mean_class_accuracy": mean_class_accuracy(predicted, data.test_y),
            "classes": len(data.classes)}


def finegrained_metrics(report: dict[str, dict]) -> dict[str, float]:
    """``finegrained_<name>_top1`` and ``finegrained_<name>_class_mean`` of each set, and their means over
    the sets, ``finegrained_mean_top1`` and ``finegrained_mean_class_mean``."""
    metrics = {}
    for name, scores in report.items():
        metrics[f"finegrained_{name}_top1"] = float(scores["test_accuracy"])
        metrics[f"finegrained_{name}_class_mean"] = float(scores["mean_class_accuracy"])
    if report:
        metrics["finegrained_mean_top1"] = sum(s["test_accuracy"] for s in report.values()) / len(report)
        metrics["finegrained_mean_class_mean"] = sum(s["mean_class_accuracy"] for s in report.values()) / len(report)
    return metrics
