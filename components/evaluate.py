"""Stage ``evaluate``: frozen-feature benchmarks of a backbone; its JSON is the gate's contract.

Output folder: ``report.json`` (``{"metrics": {name: value}, "report": {...}, "backbone_sha256"}``,
metric names as :func:`evaluators.report.report_metrics` gives them, e.g. ``knn_top1_k20`` and
``linear_top1``, plus ``pixels_knn_top1_k*``: the same k-NN on raw pixels, the baseline every
backbone must beat) and ``confusion_knn.png``. Cached by the backbone's bytes and the parameters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from components.stage import (
    StageContext,
    cache_key,
    file_digest,
    mark_cached,
    recording_errors,
    run_cached,
    stage_run,
    storage_from_env,
)
from evaluators.knn import knn_predict
from evaluators.linear import LinearProbeConfig
from evaluators.report import benchmark_report, knn_accuracies, report_metrics
from evaluators.visualize import confusion_matrix, save_confusion_matrix
from trainer.data.fashion_mnist import CLASSES, load_split
from trainer.models.hub import load_backbone
from trainer.run import labelled_features

REPORT_FILE = "report.json"


def run_evaluate_stage(ctx: StageContext, backbone_dir: str | Path, out_dir: str | Path, data_uri: str,
                       train_limit: int = 0, test_limit: int = 0, ks: list[int] | None = None,
                       temperature: float = 0.07, linear: bool = True) -> dict[str, Any]:
    """Score the backbone in ``backbone_dir`` on Fashion-MNIST (k-NN, linear probe); returns the metrics."""
    storage = storage_from_env()
    weights = Path(backbone_dir) / "backbone.safetensors"
    out = Path(out_dir)
    ks = sorted({int(k) for k in ks or []} | {20})  # k=20 always: the default gate metric
    with recording_errors(ctx, storage, "evaluate"), stage_run(ctx, "evaluate") as tracker:
        params = {"data_uri": data_uri, "train_limit": train_limit, "test_limit": test_limit, "ks": ks,
                  "temperature": temperature, "linear": linear}
        tracker.log_params(params)

        def work() -> dict[str, Any]:
            backbone = load_backbone(str(weights), "safetensors", storage).eval()
            splits, pixels = [], []
            for split, limit in (("train", train_limit), ("test", test_limit)):
                data = load_split(storage, data_uri, split)  # type: ignore[arg-type]
                count = limit or len(data.images)
                images = torch.from_numpy(data.images[:count])
                features = labelled_features(backbone, images, backbone.patch_size)
                splits += [features, torch.from_numpy(data.labels[:count])]
                pixels += [images.flatten(1).float(), splits[-1]]
            report = benchmark_report(*splits, ks=ks, temperature=temperature,
                                      linear=LinearProbeConfig() if linear else None, num_classes=len(CLASSES))
            baseline = knn_accuracies(*pixels, ks=ks, temperature=temperature, num_classes=len(CLASSES))
            report["pixels_knn"] = baseline
            metrics = {**report_metrics(report), **{f"pixels_knn_top1_{name}": v for name, v in baseline.items()}}
            out.mkdir(parents=True, exist_ok=True)
            (out / REPORT_FILE).write_text(json.dumps(
                {"metrics": metrics, "report": report, "backbone_sha256": file_digest(weights), "params": params},
                indent=2))
            k = 20 if 20 in ks else ks[0]
            predictions = knn_predict(splits[0], splits[1], splits[2], k=k, temperature=temperature,
                                      num_classes=len(CLASSES)).numpy()
            matrix = confusion_matrix(splits[3].numpy(), predictions, len(CLASSES))
            save_confusion_matrix(matrix, CLASSES, out / "confusion_knn.png",
                                  title=f"k-NN (k={k}) on frozen CLS features: {100 * metrics[f'knn_top1_k{k}']:.1f}%")
            return {"metrics": metrics}

        key = cache_key("evaluate", params, {"backbone": weights})
        result = run_cached(ctx, storage, "evaluate", key, out, work)
        mark_cached(tracker, result)
        tracker.log_metrics(result["metrics"], step=0, force=True)
        for name in (REPORT_FILE, "confusion_knn.png"):
            tracker.log_artifact(out / name)
    return result
