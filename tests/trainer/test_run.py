"""A pretraining job scored on one's own labelled images while it trains (``eval.data_uri``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dinoflow.config import ConfigError, PretrainConfig, load_config
from dinoflow.storage import Storage
from dinoflow.tracking import NullTracker
from evaluators.classification import labelled_images
from trainer.data.fashion_mnist import copy_fashion_mnist
from evaluators.report import knn_accuracies
from tests.evaluators.test_classification import write_folders
from tests.trainer.test_engine import TINY
from trainer.models.hub import load_backbone
from trainer.models.vit import build_vit
from trainer.run import labelled_evaluators, run_pretrain


def test_pretraining_on_a_folder_is_scored_on_class_folders(tmp_path: Path) -> None:
    """Unlabelled training images and labelled class folders to score on: k-NN during training, k-NN
    and the probe at the end (training data other than Fashion-MNIST was never scored); the final
    k-NN is the released teacher's, recomputed here."""
    write_folders(tmp_path / "labelled", {"cat": (10, 4), "dog": (10, 4), "fish": (10, 4)})
    cfg = load_config(PretrainConfig, "tiny", [*TINY, f"out={tmp_path / 'run'}", "data.kind=folder",
                                               f"data.uri={tmp_path / 'labelled' / 'train'}", "max_steps=2",
                                               "crops.max_aspect=2",  # the images' whole regions (30-60 px sides)
                                               "eval.every_steps=1", f"eval.data_uri={tmp_path / 'labelled'}",
                                               "data.num_workers=0"])
    summary = run_pretrain(cfg, Storage(), NullTracker())
    assert [h["step"] for h in summary["history"]][:2] == [1, 2] and "knn_top1_k20" in summary["history"][0]
    final = summary["final"]
    assert {"knn_top1_k20", "linear_top1"} <= set(final)
    data = labelled_images(str(tmp_path / "labelled"), "folder", Storage(), image_size=28).features(
        load_backbone(summary["backbone"], "safetensors"))
    expected = knn_accuracies(data.train_x, data.train_y, data.test_x, data.test_y, ks=(20,), num_classes=3)
    assert final["knn_top1_k20"] == pytest.approx(expected["k20"])


def test_a_bad_evaluation_setting_fails_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="eval.image_size = 30 is not a multiple of model.patch_size = 7"):
        load_config(PretrainConfig, "tiny", [*TINY, "eval.image_size=30"])
    cfg = load_config(PretrainConfig, "tiny", [*TINY, f"out={tmp_path / 'run'}", f"eval.data_uri={tmp_path}",
                                               "data.uri=/usr/share/datasets/fashion-mnist"])
    with pytest.raises(ValueError, match="holds neither Fashion-MNIST"):
        run_pretrain(cfg, Storage(), NullTracker())
    assert not (tmp_path / "run").exists()


def test_the_labelled_images_are_read_once_for_every_evaluation(tmp_path: Path) -> None:
    """Training scores the same images at each evaluation: the files are read before training,
    not at each pass (here they are gone after the first read, and every evaluation still runs)."""
    storage = Storage()
    copy_fashion_mnist(storage, "/usr/share/datasets/fashion-mnist", str(tmp_path / "fmnist"))
    cfg = load_config(PretrainConfig, "tiny", [*TINY, f"eval.data_uri={tmp_path / 'fmnist'}", "eval.train_limit=40",
                                               "eval.test_limit=20"])
    periodic, final = labelled_evaluators(cfg, storage)
    assert periodic is not None and final is not None
    for path in (tmp_path / "fmnist").iterdir():
        path.unlink()
    model = build_vit("vit_small", patch_size=7, embed_dim=32, depth=3, num_heads=2, img_size=28)
    first, second = periodic(model, 1), periodic(model, 2)
    assert first == second and set(first) == {"knn_top1_k20"}
    assert {"knn_top1_k20", "linear_top1"} <= set(final(model, 3))
