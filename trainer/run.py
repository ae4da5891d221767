"""A pretraining job from its config: data set, frozen-feature evaluation, engine.

Why here: the CLI and the pipeline's pretrain component both start runs; this is the one place
that turns a :class:`PretrainConfig` into the engine's arguments.
"""

from __future__ import annotations

from typing import Any

import torch

from dinoflow.config import DataConfig, PretrainConfig
from dinoflow.storage import Storage
from dinoflow.tracking import Tracker
from evaluators.features import labelled_features
from evaluators.linear import LinearProbeConfig
from evaluators.report import benchmark_report, knn_accuracies, report_metrics
from trainer.data.datasets import FashionMnistDataset, ImageFolderDataset, ShardDataset, collate_samples
from trainer.data.fashion_mnist import load_split
from trainer.engine import EvalFn, pretrain
from trainer.models.vit import DinoVisionTransformer


def build_dataset(data: DataConfig, load_size: int, storage: Storage) -> torch.utils.data.Dataset:
    """The training images of ``data`` decoded to ``load_size`` squares (labels unused)."""
    if not data.uri:
        raise ValueError("data.uri is empty: give the folder, shard folder or Fashion-MNIST folder")
    if data.kind == "fashion_mnist":
        return FashionMnistDataset(storage, data.uri, "train", load_size)
    if data.kind == "folder":
        return ImageFolderDataset(storage, data.uri, load_size)
    return ShardDataset(storage, data.uri, load_size)


def fashion_mnist_evaluator(cfg: PretrainConfig, storage: Storage, linear: bool = False) -> EvalFn:
    """k-NN (and, if asked, the linear probe) of the teacher on Fashion-MNIST's labelled splits."""
    train, test = load_split(storage, cfg.data.uri, "train"), load_split(storage, cfg.data.uri, "test")
    train_limit = cfg.eval.train_limit or len(train.images)
    test_limit = cfg.eval.test_limit or len(test.images)
    train_images, train_labels = torch.from_numpy(train.images[:train_limit]), torch.from_numpy(train.labels[:train_limit])
    test_images, test_labels = torch.from_numpy(test.images[:test_limit]), torch.from_numpy(test.labels[:test_limit])

    def evaluate(backbone: DinoVisionTransformer, step: int) -> dict[str, float]:
        was_training = backbone.training
        train_x = labelled_features(backbone, train_images, cfg.model.patch_size)
        test_x = labelled_features(backbone, test_images, cfg.model.patch_size)
        backbone.train(was_training)
        if linear:
            report = benchmark_report(train_x, train_labels, test_x, test_labels, ks=(cfg.eval.knn_k,),
                                      temperature=cfg.eval.knn_temperature, linear=LinearProbeConfig(), num_classes=10)
            return report_metrics(report)
        accuracy = knn_accuracies(train_x, train_labels, test_x, test_labels, ks=(cfg.eval.knn_k,),
                                  temperature=cfg.eval.knn_temperature, num_classes=10)
        return {f"knn_top1_k{cfg.eval.knn_k}": accuracy[f"k{cfg.eval.knn_k}"]}

    return evaluate


def run_pretrain(cfg: PretrainConfig, storage: Storage, tracker: Tracker, evaluate: bool = True) -> dict[str, Any]:
    """Train per ``cfg`` (resuming from ``cfg.out`` when a checkpoint is there).

    With ``evaluate`` (and Fashion-MNIST data) the teacher is scored by k-NN every
    ``cfg.eval.every_steps`` and by k-NN + linear probe at the end; a pipeline leaves that to its
    evaluate stage.
    """
    dataset = build_dataset(cfg.data, cfg.crops.load_size, storage)
    scored = evaluate and cfg.data.kind == "fashion_mnist"
    periodic = fashion_mnist_evaluator(cfg, storage) if scored else None
    final = fashion_mnist_evaluator(cfg, storage, linear=True) if scored else None
    return pretrain(cfg, dataset, collate_samples, storage, tracker, evaluate=periodic, final_evaluate=final)
