"""The fine-grained benchmarks: the logistic regression on each of several class-folder sets in one run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from evaluators.classification import FolderImages
from evaluators.data_settings import named_roots
from evaluators.finegrained import finegrained_metrics, mean_class_accuracy
from evaluators.suite import SuiteConfig, run_suite, with_options
from tests.evaluators.test_classification import backbone, write_folders


def two_sets(root: Path) -> str:
    """Two sets of class folders, their test classes unevenly sized, flowers' with 3 cats filed as
    fish in val (a classifier of the colours errs on those 3 alone); their roots as finegrained_data."""
    write_folders(root / "flowers", {"cat": (10, 6), "dog": (10, 2), "fish": (10, 4)}, seed=1)
    for index, cat in enumerate(sorted((root / "flowers" / "val" / "cat").iterdir())[:3]):
        shutil.copyfile(cat, root / "flowers" / "val" / "fish" / f"cat{index}.png")
    write_folders(root / "pets", {"cat": (8, 3), "dog": (12, 5), "fish": (6, 1)}, seed=2)
    return f"{root / 'flowers'},{root / 'pets'}/"


def test_each_set_scores_as_the_logistic_regression_on_it_alone(tmp_path: Path) -> None:
    """The independent reference: the suite's logreg run on each set as its data_uri."""
    given = two_sets(tmp_path)
    model = backbone()
    report = run_suite(model, SuiteConfig(tasks=("finegrained",), finegrained_data=given, image_size=28),
                       pictures=tmp_path / "pictures")
    section, metrics = report["tasks"]["finegrained"], report["metrics"]
    assert list(section) == ["flowers", "pets"]
    for name in section:
        alone = run_suite(model, SuiteConfig(tasks=("logreg",), data_uri=str(tmp_path / name), image_size=28))
        assert metrics[f"finegrained_{name}_top1"] == alone["metrics"]["logreg_top1"]
        assert section[name]["best_c"] == alone["metrics"]["logreg_best_c"]
        assert section[name]["classes"] == 3 and section[name]["root"] == str(tmp_path / name)
    for kind in ("top1", "class_mean"):
        assert metrics[f"finegrained_mean_{kind}"] == pytest.approx(
            np.mean([metrics[f"finegrained_{name}_{kind}"] for name in section]))
    # the 3 cats filed as fish are flowers' errors: 12 of 15 right, fish's recall 4 / 7
    assert metrics["finegrained_flowers_top1"] == pytest.approx(12 / 15)
    assert metrics["finegrained_flowers_class_mean"] == pytest.approx((1 + 1 + 4 / 7) / 3)
    assert (tmp_path / "pictures" / "finegrained_sweeps.png").stat().st_size > 0
    json.dumps(report["tasks"])


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_mean_class_accuracy_is_scikit_learns_balanced_accuracy() -> None:
    generator = torch.Generator().manual_seed(0)
    for classes in (2, 7, 30):
        labels = torch.randint(0, classes, (200,), generator=generator)
        predicted = torch.where(torch.rand(200, generator=generator) < 0.6, labels,
                                torch.randint(0, classes + 3, (200,), generator=generator))  # some outside labels'
        want = balanced_accuracy_score(labels.numpy(), predicted.numpy())
        assert mean_class_accuracy(predicted, labels) == pytest.approx(want)


def test_a_rerun_loads_each_sets_saved_features(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    given = two_sets(tmp_path)
    config = SuiteConfig(tasks=("finegrained",), finegrained_data=given, image_size=28, work_dir=str(tmp_path / "w"))
    model = backbone()
    first = run_suite(model, config)["metrics"]
    assert sorted(p.name for p in (tmp_path / "w" / "finegrained").iterdir()) == ["flowers", "pets"]
    made = []
    original = FolderImages._part
    monkeypatch.setattr(FolderImages, "_part", lambda self, *a, **k: made.append(1) or original(self, *a, **k))
    assert run_suite(model, config)["metrics"] == first and made == []


def test_finegrained_data_is_an_option_and_bad_sets_are_refused(tmp_path: Path) -> None:
    assert named_roots("s3://b/d/food101, /data/cars/", "finegrained_data") == [
        ("food101", "s3://b/d/food101"), ("cars", "/data/cars")]
    config = with_options(SuiteConfig(tasks=("finegrained",)), {"finegrained_data": "/data/cub"})
    assert config.finegrained_data == "/data/cub"
    with pytest.raises(ValueError, match="finegrained_data = '/a/food101,/b/food101': .*repeated or bad: food101"):
        named_roots("/a/food101,/b/food101", "finegrained_data")
    with pytest.raises(ValueError, match="repeated or bad: d e"):
        named_roots("/a/d e", "finegrained_data")
    with pytest.raises(ValueError, match="none given"):
        named_roots(" , ", "finegrained_data")
    with pytest.raises(ValueError, match="is scored by the finegrained task: add it to tasks"):
        SuiteConfig(tasks=("knn",), data_uri="/x", finegrained_data="/data/cub")
    with pytest.raises(ValueError, match="the finegrained task needs finegrained_data"):
        run_suite(backbone(), SuiteConfig(tasks=("finegrained",)))
    (tmp_path / "flat").mkdir()
    with pytest.raises(FileNotFoundError, match="no images under .*flat/train"):
        run_suite(backbone(), SuiteConfig(tasks=("finegrained",), finegrained_data=str(tmp_path / "flat"),
                                          image_size=28))


def test_the_mean_over_the_sets_takes_each_ones_protocol_figure() -> None:
    """Pets (a release of uneven classes): mean per-class accuracy; VOC: mAP; class folders: top-1."""
    report = {"pets": {"release": "Oxford-IIIT Pets", "test_accuracy": 0.5, "mean_class_accuracy": 0.4},
              "cars": {"release": "class folders", "test_accuracy": 0.7, "mean_class_accuracy": 0.6},
              "food": {"release": "Food-101", "test_accuracy": 0.8, "mean_class_accuracy": 0.1},
              "VOC2007": {"release": "Pascal VOC", "test_map": 0.9}}
    metrics = finegrained_metrics(report)
    assert metrics["finegrained_mean"] == pytest.approx((0.4 + 0.7 + 0.8 + 0.9) / 4)
    assert metrics["finegrained_mean_top1"] == pytest.approx((0.5 + 0.7 + 0.8) / 3)
    assert metrics["finegrained_VOC2007_map"] == 0.9 and "finegrained_VOC2007_top1" not in metrics
