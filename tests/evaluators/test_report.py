"""The benchmark report: k-NN per k (too-large k skipped), the linear probe, flat tracker metrics."""

from __future__ import annotations

import json
from collections.abc import Mapping

import pytest
import torch

from evaluators.knn import knn_predict
from evaluators.linear import LinearProbeConfig
from evaluators.report import benchmark_report, knn_accuracies, log_report


class RecordingTracker:
    """A Tracker that remembers every log_metrics call."""

    run_id: str | None = None

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, float], int, bool]] = []

    def log_metrics(self, metrics: Mapping[str, float], step: int, force: bool = False) -> None:
        self.calls.append((dict(metrics), step, force))


def features(num_samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    centres = torch.randn(4, 16, generator=torch.Generator().manual_seed(99))
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (num_samples,), generator=generator)
    return centres[labels] + 1.5 * torch.randn(num_samples, 16, generator=generator), labels


@pytest.fixture(scope="module")
def report() -> dict:
    train_features, train_labels = features(150, 0)
    test_features, test_labels = features(60, 1)
    return benchmark_report(
        train_features, train_labels, test_features, test_labels, ks=(1, 10, 20, 100, 200),
        linear=LinearProbeConfig(batch_size=32, epochs=3),
    )


def test_report_keys_and_json(report: dict) -> None:
    assert set(report) == {"knn", "linear"}
    assert list(report["knn"]) == ["k1", "k10", "k20", "k100"]  # k200 > 150 train samples: skipped
    for key in ("best_lr", "val_accuracy", "test_accuracy", "learning_rates", "val_accuracies"):
        assert key in report["linear"]
    assert json.loads(json.dumps(report)) == report
    assert 0.5 < report["knn"]["k20"] <= 1.0 and 0.5 < report["linear"]["test_accuracy"] <= 1.0


def test_knn_values_match_knn_predict(report: dict) -> None:
    train_features, train_labels = features(150, 0)
    test_features, test_labels = features(60, 1)
    for k in (1, 10, 20, 100):
        predictions = knn_predict(train_features, train_labels, test_features, k=k, temperature=0.07)
        assert report["knn"][f"k{k}"] == pytest.approx((predictions == test_labels).float().mean().item())
    other_temperature = knn_accuracies(train_features, train_labels, test_features, test_labels, ks=(10,),
                                       temperature=0.5)
    predictions = knn_predict(train_features, train_labels, test_features, k=10, temperature=0.5)
    assert other_temperature == {"k10": pytest.approx((predictions == test_labels).float().mean().item())}


def test_linear_probe_can_be_skipped() -> None:
    train_features, train_labels = features(30, 0)
    report = benchmark_report(train_features, train_labels, train_features, train_labels, linear=None)
    assert set(report) == {"knn"} and list(report["knn"]) == ["k10", "k20"]  # 30 train samples


def test_log_report_flat_metrics(report: dict) -> None:
    tracker = RecordingTracker()
    metrics = log_report(report, tracker, step=12)
    assert tracker.calls == [(metrics, 12, True)]
    assert metrics == {
        "knn_top1_k1": report["knn"]["k1"], "knn_top1_k10": report["knn"]["k10"],
        "knn_top1_k20": report["knn"]["k20"], "knn_top1_k100": report["knn"]["k100"],
        "linear_top1": report["linear"]["test_accuracy"], "linear_val_top1": report["linear"]["val_accuracy"],
        "linear_best_lr": report["linear"]["best_lr"],
    }
