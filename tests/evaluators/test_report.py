"""k-NN accuracies per k (too-large k skipped, one pass for all) and the flat metric names."""

from __future__ import annotations

import json

import pytest
import torch

from evaluators.knn import knn_predict
from evaluators.linear import LinearProbeConfig, linear_probe
from evaluators.report import knn_accuracies, report_metrics


def features(num_samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    centres = torch.randn(4, 16, generator=torch.Generator().manual_seed(99))
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (num_samples,), generator=generator)
    return centres[labels] + 1.5 * torch.randn(num_samples, 16, generator=generator), labels


def test_knn_accuracies_match_knn_predict_and_skip_too_large_ks() -> None:
    train_features, train_labels = features(150, 0)
    test_features, test_labels = features(60, 1)
    accuracies = knn_accuracies(train_features, train_labels, test_features, test_labels, ks=(1, 10, 20, 100, 200))
    assert list(accuracies) == ["k1", "k10", "k20", "k100"]  # k200 > 150 train samples: skipped
    for k in (1, 10, 20, 100):
        predictions = knn_predict(train_features, train_labels, test_features, k=k, temperature=0.07)
        assert accuracies[f"k{k}"] == pytest.approx((predictions == test_labels).float().mean().item())
    assert 0.5 < accuracies["k20"] <= 1.0
    other_temperature = knn_accuracies(train_features, train_labels, test_features, test_labels, ks=(10,),
                                       temperature=0.5)
    predictions = knn_predict(train_features, train_labels, test_features, k=10, temperature=0.5)
    assert other_temperature == {"k10": pytest.approx((predictions == test_labels).float().mean().item())}
    assert knn_accuracies(train_features[:5], train_labels[:5], test_features, test_labels, ks=(10,)) == {}


def test_report_metrics_are_the_flat_names_every_run_logs() -> None:
    train_features, train_labels = features(120, 0)
    test_features, test_labels = features(40, 1)
    probe = linear_probe(train_features, train_labels, test_features, test_labels,
                         LinearProbeConfig(batch_size=32, epochs=3))
    report = {"knn": knn_accuracies(train_features, train_labels, test_features, test_labels, ks=(10, 20)),
              "linear": probe.to_dict()}
    assert json.loads(json.dumps(report)) == report
    assert report_metrics(report) == {
        "knn_top1_k10": report["knn"]["k10"], "knn_top1_k20": report["knn"]["k20"],
        "linear_top1": probe.test_accuracy, "linear_val_top1": probe.val_accuracy, "linear_best_lr": probe.best_lr,
    }
    assert report_metrics({"knn": report["knn"]}) == {"knn_top1_k10": report["knn"]["k10"],
                                                      "knn_top1_k20": report["knn"]["k20"]}
