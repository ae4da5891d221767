"""Fine-grained benchmarks: the logistic regression on frozen features of several small labelled sets.

Why: DINOv2 compares backbones beyond ImageNet on classic classification sets (Food-101,
CIFAR-10/100, SUN397, Stanford Cars, FGVC Aircraft, VOC 2007, DTD, Oxford Pets, Caltech-101,
Flowers-102, CUB-200), each scored by the logistic regression on the final CLS token
(:mod:`evaluators.logreg`: no learning rate or epochs to tune per set, so the accuracy is the
features'). One evaluation runs them all: ``finegrained_data`` names their roots, each class folders
of its own (``train/<class>/``, and ``val/`` or ``test/``), the set named by its root's last part
(:func:`~evaluators.data_settings.named_roots`). VOC 2007, multi-label, is scored by its own
protocol (:mod:`evaluators.multilabel`: a binary regression per class, 11-point mAP) when its root
is a Pascal VOC release.

Besides top-1, each set's mean per-class accuracy (the mean over the test classes of each one's
recall): the metric the protocol reports for the sets whose test classes are unevenly sized
(Aircraft, Pets, Caltech-101, Flowers), where top-1 favours the large classes. ``finegrained_mean``
averages each set's protocol figure (:func:`protocol_figure`), as the paper's transfer table does:
a set read from its release (:mod:`evaluators.released_sets`) is known by name; class folders
count by their top-1.

The suite runs the sets one after another, one set's features held at a time; with a
``work_dir`` each set's feature pass is saved in parts (:mod:`evaluators.feature_parts`) under
``<work_dir>/finegrained/<name>``, so a rerun resumes it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from evaluators.classification import LabelledFeatures
from evaluators.logreg import LogRegConfig, logreg_predictions
from evaluators.report import logreg_fit

# the released sets whose test classes are unevenly sized: the protocol reports their mean per-class accuracy
CLASS_MEAN_RELEASES = frozenset({"FGVC-Aircraft", "Oxford-IIIT Pets", "Caltech-101", "Flowers-102"})


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
    predicted = logreg_predictions(fit, data.test_x, data.test_classes).cpu()
    return {**fit.to_dict(), "mean_class_accuracy": mean_class_accuracy(predicted, data.test_y),
            "classes": len(data.classes)}


def protocol_figure(scores: dict) -> tuple[str, float]:
    """The figure the transfer protocol reports for a set (its report's ``scores``): 11-point mAP for
    Pascal VOC, mean per-class accuracy for the releases of :data:`CLASS_MEAN_RELEASES`, else top-1
    (class folders: their set unknown)."""
    if "test_map" in scores:
        return "map", float(scores["test_map"])
    if scores.get("release") in CLASS_MEAN_RELEASES:
        return "class_mean", float(scores["mean_class_accuracy"])
    return "top1", float(scores["test_accuracy"])


def finegrained_metrics(report: dict[str, dict]) -> dict[str, float]:
    """``finegrained_<name>_top1`` and ``finegrained_<name>_class_mean`` of each single-label set,
    and their means over those sets, ``finegrained_mean_top1`` and ``finegrained_mean_class_mean``;
    ``finegrained_<name>_map`` of a Pascal VOC release (:mod:`evaluators.multilabel`: no top-1);
    ``finegrained_mean``: the mean over every set of its :func:`protocol_figure`, the paper's
    average over its transfer sets."""
    metrics = {}
    single = {name: scores for name, scores in report.items() if "test_accuracy" in scores}
    for name, scores in report.items():
        if name not in single:
            metrics[f"finegrained_{name}_map"] = float(scores["test_map"])
    for name, scores in single.items():
        metrics[f"finegrained_{name}_top1"] = float(scores["test_accuracy"])
        metrics[f"finegrained_{name}_class_mean"] = float(scores["mean_class_accuracy"])
    if single:
        metrics["finegrained_mean_top1"] = sum(s["test_accuracy"] for s in single.values()) / len(single)
        metrics["finegrained_mean_class_mean"] = sum(s["mean_class_accuracy"] for s in single.values()) / len(single)
    if report:
        metrics["finegrained_mean"] = sum(protocol_figure(scores)[1] for scores in report.values()) / len(report)
    return metrics
