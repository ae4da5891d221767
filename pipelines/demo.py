"""The demo job: what exists of dinoflow, end to end, on Fashion-MNIST.

Why: the README's first command must run the platform's real parts on the embedded defaults.
Until the KFP pipeline lands, the job is: copy the data set into the run's storage (atomic
puts), read it back from there, score the raw-pixel k-NN baseline that every backbone must beat,
pretrain the ``tiny`` recipe for a few minutes on the stored copy, benchmark its teacher (k-NN and
linear probe), and record it all in MLflow (config, metrics, a sample grid, a confusion matrix,
and the pretraining as a nested run).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinoflow.config import DemoConfig, PretrainConfig, load_config
from dinoflow.storage import Storage, join_uri
from dinoflow.tracking import Tracker
from evaluators.knn import knn_predict
from evaluators.visualize import confusion_matrix, save_confusion_matrix, save_image_grid
from trainer.data.fashion_mnist import CLASSES, copy_fashion_mnist, load_split
from trainer.run import run_pretrain


def demo_pretrain_config(config: DemoConfig) -> PretrainConfig:
    """The demo's pretraining run: its recipe on the stored copy of the data, for a few minutes."""
    return load_config(PretrainConfig, config.pretrain_preset, [
        f"out={join_uri(config.out, 'pretrain')}", "data.kind=fashion_mnist",
        f"data.uri={join_uri(config.out, 'data', 'fashion-mnist')}", f"max_minutes={config.pretrain_minutes}",
        f"seed={config.seed}", f"device={config.device}", *config.pretrain_overrides,
    ])


def run_demo(config: DemoConfig, storage: Storage, tracker: Tracker,
             pretrain_tracker: Tracker | None = None) -> dict[str, Any]:
    """Run the demo job and return its summary (also written to ``<out>/demo/summary.json``).

    ``pretrain_tracker`` records the pretraining (a nested run); without it nothing is pretrained.
    """
    started = time.perf_counter()
    tracker.log_config(config)
    pretrain_config = demo_pretrain_config(config)  # a bad recipe or override fails before any work
    data_uri = join_uri(config.out, "data", "fashion-mnist")
    copy_fashion_mnist(storage, config.data.source, data_uri)
    train = load_split(storage, data_uri, "train")
    test = load_split(storage, data_uri, "test")

    knn_started = time.perf_counter()
    predictions = knn_predict(
        torch.from_numpy(train.images.reshape(len(train.images), -1)).float(),
        torch.from_numpy(train.labels),
        torch.from_numpy(test.images.reshape(len(test.images), -1)).float(),
        k=config.data.knn_k,
        temperature=config.data.knn_temperature,
        num_classes=len(CLASSES),
    ).numpy()
    knn_seconds = time.perf_counter() - knn_started
    accuracy = float((predictions == test.labels).mean())
    matrix = confusion_matrix(test.labels, predictions, len(CLASSES))
    per_class = {
        name: float(matrix[i, i] / max(matrix[i].sum(), 1)) for i, name in enumerate(CLASSES)
    }

    pretrained = None
    if pretrain_tracker is not None and config.pretrain_minutes > 0:
        pretrained = run_pretrain(pretrain_config, storage, pretrain_tracker)
        tracker.log_metrics({f"pretrained_{k}": v for k, v in pretrained["final"].items()}, step=0, force=True)

    summary = {
        "job": "demo",
        "data_uri": data_uri,
        "train_images": int(len(train.images)),
        "test_images": int(len(test.images)),
        "features": "raw pixels",
        "knn": {"k": config.data.knn_k, "temperature": config.data.knn_temperature,
                "top1": accuracy, "per_class_top1": per_class, "seconds": knn_seconds},
        "pretrained": None if pretrained is None else {
            "recipe": config.pretrain_preset, "steps": pretrained["steps"],
            "minutes": pretrained["train_minutes"], "backbone": pretrained["backbone"], **pretrained["final"],
        },
        "seconds": time.perf_counter() - started,
        "mlflow_run_id": tracker.run_id,
    }
    tracker.log_metrics({"knn_top1": accuracy, "knn_seconds": knn_seconds}, step=0, force=True)
    with tempfile.TemporaryDirectory() as scratch:
        rng = np.random.default_rng(config.seed)
        pick = rng.choice(len(test.images), size=32, replace=False)
        titles = [f"{CLASSES[test.labels[i]]}\n→ {CLASSES[predictions[i]]}" for i in pick]
        grid = save_image_grid(test.images[pick], titles, Path(scratch) / "samples.png")
        plot = save_confusion_matrix(
            matrix, CLASSES, Path(scratch) / "confusion_knn.png",
            title=f"raw-pixel k-NN (k={config.data.knn_k}): {100 * accuracy:.1f}% top-1",
        )
        summary_path = Path(scratch) / "summary.json"
        summary_path.write_text(json.dumps(summary, indent=2))
        for path in (grid, plot, summary_path):
            tracker.log_artifact(path)
            storage.put_file(path, join_uri(config.out, "demo", path.name))
    return summary
