"""A pretraining job from its config: data set, frozen-feature evaluation, engine.

Why here: the CLI and the pipeline's pretrain component both start runs; this is the one place
that turns a :class:`PretrainConfig` into the engine's arguments.
"""

from __future__ import annotations

from typing import Any

import torch

from dinoflow.config import CropsConfig, DataConfig, PretrainConfig
from dinoflow.storage import Storage
from dinoflow.tracking import Tracker
from evaluators.classification import labelled_images
from evaluators.linear import LinearProbeConfig
from evaluators.report import classification_report, report_metrics
from trainer.data.datasets import FashionMnistDataset, ImageFolderDataset, collate_samples
from trainer.data.shards import ShardDataset
from trainer.engine import EvalFn, pretrain
from trainer.models.vit import DinoVisionTransformer


def build_dataset(data: DataConfig, crops: CropsConfig, storage: Storage) -> torch.utils.data.Dataset:
    """The training images of ``data`` decoded to ``crops.load_size`` squares holding their regions of
    aspect up to ``crops.max_aspect`` (labels unused)."""
    if not data.uri:
        raise ValueError("data.uri is empty: give the folder, shard folder or Fashion-MNIST folder")
    if data.kind == "fashion_mnist":
        return FashionMnistDataset(storage, data.uri, "train", crops.load_size)
    if data.kind == "folder":
        return ImageFolderDataset(storage, data.uri, crops.load_size, max_aspect=crops.max_aspect)
    return ShardDataset(storage, data.uri, crops.load_size, max_aspect=crops.max_aspect)


def labelled_evaluators(cfg: PretrainConfig, storage: Storage) -> tuple[EvalFn | None, EvalFn | None]:
    """The teacher's scores on labelled images: ``eval.data_uri`` (Fashion-MNIST's files or class
    folders, :mod:`evaluators.classification`), else the training data when it is Fashion-MNIST:
    k-NN for the periodic evaluation and k-NN + linear probe for the final one, both over images
    read once; (None, None) when there are no labels to score on. A bad ``eval.data_uri`` fails
    here, before training starts."""
    uri = cfg.eval.data_uri or (cfg.data.uri if cfg.data.kind == "fashion_mnist" else "")
    if not uri:
        return None, None
    images = labelled_images(uri, "auto", storage, cfg.eval.train_limit, cfg.eval.test_limit,
                             cfg.eval.image_size or cfg.crops.global_crop_size,
                             num_workers=cfg.data.num_workers)  # class folders: decoded by the loader's workers

    def scorer(linear: bool) -> EvalFn:
        def evaluate(backbone: DinoVisionTransformer, step: int) -> dict[str, float]:
            was_training = backbone.training
            data = images.features(backbone, views=linear)
            backbone.train(was_training)
            return report_metrics(classification_report(data, (cfg.eval.knn_k,), cfg.eval.knn_temperature,
                                                        LinearProbeConfig() if linear else None,
                                                        next(backbone.parameters()).device))

        return evaluate

    return scorer(linear=False), scorer(linear=True)


def run_pretrain(cfg: PretrainConfig, storage: Storage, tracker: Tracker, evaluate: bool = True) -> dict[str, Any]:
    """Train per ``cfg`` (resuming from ``cfg.out`` when a checkpoint is there).

    With ``evaluate`` and labelled images (:func:`labelled_evaluators`) the teacher is scored by
    k-NN every ``cfg.eval.every_steps`` and by k-NN + linear probe at the end; a pipeline leaves
    that to its evaluate stage.
    """
    dataset = build_dataset(cfg.data, cfg.crops, storage)
    periodic, final = labelled_evaluators(cfg, storage) if evaluate else (None, None)
    return pretrain(cfg, dataset, collate_samples, storage, tracker, evaluate=periodic, final_evaluate=final)
