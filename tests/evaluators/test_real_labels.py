"""ImageNet-ReaL's labels score the linear probe on the validation images, matched by their names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinoflow.storage import Storage
from evaluators.real_labels import real_accuracy
from evaluators.suite import SuiteConfig, run_suite
from tests.evaluators.test_classification import backbone

WNIDS = ("n01440764", "n01443537", "n02119789")


def write_imagenet(root: Path) -> list[int]:
    """Class folders of three colours; the validation images named ILSVRC2012_val_<n>.JPEG in their
    class folders (as valprep.sh leaves them), the classes in shuffled order of n; returns each
    image n's class (n = 1, 2, ...)."""
    rng = np.random.default_rng(0)
    truth = rng.permutation(np.repeat(np.arange(3), 5)).tolist()
    for split, count in (("train", 8), ("val", 0)):
        for index, wnid in enumerate(WNIDS):
            (root / split / wnid).mkdir(parents=True)
            for i in range(count):
                colour = np.eye(3)[index] * 200 + 30
                Image.fromarray(np.clip(colour + rng.normal(0, 60, (32, 32, 3)), 0, 255).astype(np.uint8)).save(
                    root / split / wnid / f"{wnid}_{i}.JPEG")
    for n, index in enumerate(truth, 1):
        colour = np.eye(3)[index] * 200 + 30
        Image.fromarray(np.clip(colour + rng.normal(0, 60, (32, 32, 3)), 0, 255).astype(np.uint8)).save(
            root / "val" / WNIDS[index] / f"ILSVRC2012_val_{n:08d}.JPEG")
    return truth


def test_real_labels_score_the_linear_probe_by_each_images_set_of_classes(tmp_path: Path) -> None:
    """ReaL lists holding each image's own class give the probe's top-1 accuracy; lists holding
    every class but its own give one minus it (so each image is matched to its own list); images
    with an empty list are left out."""
    truth = write_imagenet(tmp_path)

    def scores(lists: list[list[int]]) -> dict[str, float]:
        (tmp_path / "real.json").write_text(json.dumps(lists))
        config = SuiteConfig(tasks=("linear",), data_uri=str(tmp_path), image_size=28,
                             real_labels=str(tmp_path / "real.json"))
        report = run_suite(backbone(), config)
        return {**report["metrics"], "images": report["tasks"]["classification"]["linear"]["real_images"]}

    own = scores([[label] for label in truth])
    assert own["linear_real_top1"] == own["linear_top1"] and own["images"] == 15
    others = scores([[c for c in range(3) if c != label] for label in truth])
    assert others["linear_real_top1"] == pytest.approx(1 - own["linear_top1"])
    halves = scores([[0, 1, 2] if n % 2 else [] for n in range(len(truth))])
    assert halves["linear_real_top1"] == 1.0 and halves["images"] == 7


def test_real_accuracy_matches_by_name_and_refuses_other_images() -> None:
    real = [[3], [], [1, 2]]
    keys = ["s3://b/val/n1/ILSVRC2012_val_00000003.JPEG", "/v/ILSVRC2012_val_00000001.jpeg",
            "/v/ILSVRC2012_val_00000002.JPEG"]
    assert real_accuracy(torch.tensor([2, 3, 0]), keys, real) == (1.0, 2)  # the third image's 2, the first's 3
    assert real_accuracy(torch.tensor([1, 0, 0]), keys, real) == (0.5, 2)
    with pytest.raises(ValueError, match=r"other.jpg: ReaL scores ImageNet's validation images"):
        real_accuracy(torch.tensor([0]), ["/v/other.jpg"], real)
    with pytest.raises(ValueError, match="n from 1 to 3"):
        real_accuracy(torch.tensor([0]), ["/v/ILSVRC2012_val_00000004.JPEG"], real)


def test_real_labels_need_the_linear_probe_on_class_folders(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="real_labels .* needs the linear task"):
        SuiteConfig(tasks=("knn",), data_uri="/in1k", real_labels="/real.json")
    config = SuiteConfig(tasks=("linear",), data_uri=str(tmp_path), image_size=28, real_labels="/nowhere/real.json")
    write_imagenet(tmp_path)
    with pytest.raises(FileNotFoundError, match="real_labels /nowhere/real.json is missing"):
        run_suite(backbone(), config, storage=Storage())
