"""The classification report of labelled features (k-NN accuracies per k, the probes), and the flat
metric names every report is logged under.

Why: a training run, a pipeline stage and a notebook should all score a backbone the same way
and log the same metric names. The report itself (k-NN, the linear probe over its views, the
logistic regression) is :func:`classification_report`'s, JSON-able; :func:`report_metrics`
flattens it. Accuracies are fractions in [0, 1]. (Apart from the labelled images and their
features, :mod:`evaluators.classification`, so fine-tuning, which reads those, ships without the
probes.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from evaluators.classification import PROBE_VIEWS, LabelledFeatures, view
from evaluators.knn import knn_predictions
from evaluators.linear import LinearProbeConfig, LinearProbeResult, best_by_val, linear_probe
from evaluators.logreg import LogRegConfig, LogRegResult, logistic_regression

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
    ``linear_real_top1`` (ImageNet-ReaL's), ``logreg_top1``, ``logreg_val_top1``, ``logreg_best_c``."""
    metrics = {f"knn_top1_{name}": float(acc) for name, acc in report.get("knn", {}).items()}
    linear = report.get("linear")
    if linear is not None:
        metrics["linear_top1"] = float(linear["test_accuracy"])
        metrics["linear_val_top1"] = float(linear["val_accuracy"])
        metrics["linear_best_lr"] = float(linear["best_lr"])
        if "real_accuracy" in linear:  # scored by ImageNet-ReaL's labels too (:mod:`evaluators.real_labels`)
            metrics["linear_real_top1"] = float(linear["real_accuracy"])
    logreg = report.get("logreg")
    if logreg is not None:
        metrics["logreg_top1"] = float(logreg["test_accuracy"])
        metrics["logreg_val_top1"] = float(logreg["val_accuracy"])
        metrics["logreg_best_c"] = float(logreg["best_c"])
    return metrics


def knn_bank(data: LabelledFeatures) -> tuple[Tensor, Tensor]:
    """The k-NN's train features and labels: all, or those of the classes a restricted test set
    holds (a k-NN classifier over its classes, as the probe's logits are restricted to them)."""
    if data.test_classes is None:
        return data.train_x, data.train_y
    kept = torch.isin(data.train_y, data.test_classes)
    return data.train_x[kept], data.train_y[kept]


def classification_report(data: LabelledFeatures, ks: tuple[int, ...], temperature: float,
                          linear: LinearProbeConfig | None = None, device: str | torch.device = "cpu",
                          logreg: LogRegConfig | None = None, knn: bool = True) -> dict:
    """With ``knn``, k-NN accuracies on the final CLS token and, with ``linear`` (features taken with
    views), the linear probe of the view that wins on the held-out split, with ``logreg`` the logistic
    regression on the final CLS token (:mod:`evaluators.logreg`): ``{"knn": {"k20": acc, ...},
    "linear": {..., "view": name, "val_accuracy_by_view": {name: acc}}, "logreg": {...}}``, each key
    only for what ran (``knn=False``: a suite asked for the probes alone spends nothing on k-NN). All
    run on ``device``: the backbone's, so a GPU that made the features also scores them (ImageNet's
    probe: 16 classifiers x 4 views x 10 epochs over 1.28M features, hours on a CPU)."""
    classes = len(data.classes)
    report: dict = {}
    if knn:
        report["knn"] = knn_accuracies(*knn_bank(data), data.test_x, data.test_y, ks, temperature, classes, device)
    if data.test_classes is not None:
        report["test_classes"] = len(data.test_classes)
    if linear is not None:
        report["linear"] = linear_report(data, linear, device)[0]
    if logreg is not None:
        report["logreg"] = logreg_fit(data, logreg, device).to_dict()
    return report


def logreg_fit(data: LabelledFeatures, logreg: LogRegConfig, device: str | torch.device = "cpu") -> LogRegResult:
    """The logistic regression on ``data``'s final CLS features (over its test classes when
    restricted), its refit classifier kept to score further test sets
    (:func:`~evaluators.logreg.logreg_accuracy`: ImageNet-C's folders)."""
    return logistic_regression(data.train_x, data.train_y, data.test_x, data.test_y, logreg, len(data.classes),
                               device, data.test_classes)


def linear_report(data: LabelledFeatures, linear: LinearProbeConfig,
                  device: str | torch.device = "cpu") -> tuple[dict, LinearProbeResult]:
    """The linear probe on each of :data:`PROBE_VIEWS` of ``data`` (features taken with views):
    the report of the view whose probe wins on the held-out split (``{..., "view": name,
    "val_accuracy_by_view": {name: acc}}``), and that probe, its classifier kept to score further
    test sets of the same view (:func:`~evaluators.linear.probe_accuracy`: ImageNet-C's folders)."""
    if data.views is None:
        raise ValueError("the linear probe needs the features taken with views=True")
    dim = data.train_x.shape[1]
    probes = {name: linear_probe(view(data.views[0], name, dim), data.train_y, view(data.views[1], name, dim),
                                 data.test_y, linear, num_classes=len(data.classes), device=device,
                                 test_classes=data.test_classes) for name in PROBE_VIEWS}
    best = best_by_val(probes)
    return ({**probes[best].to_dict(), "view": best,
             "val_accuracy_by_view": {name: probe.val_accuracy for name, probe in probes.items()}}, probes[best])
