"""Stage ``evaluate``: the benchmark suite on a backbone; its JSON is the gate's contract.

Output folder: ``report.json`` (:func:`evaluators.suite.run_suite`'s report plus ``backbone_sha256``:
``{"metrics": {name: value}, "tasks": {...}, ...}``,
metric names as :func:`evaluators.report.report_metrics` gives them, e.g. ``knn_top1_k20`` and
``linear_top1``, plus ``pixels_knn_top1_k*``: the same k-NN on raw pixels, the baseline every
backbone must beat) and the suite's pictures (``confusion_knn.png``, attention maps). Cached by the backbone's bytes and
the parameters. ``data_uri`` is Fashion-MNIST's folder or one of class folders, ``train/<class>/``
and ``val/<class>/`` (:mod:`evaluators.classification`). The suite's long work, the labelled images'
feature pass in parts (:mod:`evaluators.feature_parts`) and the dense heads' training
(:class:`evaluators.dense.HeadSaves`), is saved under ``<run_root>/work/evaluate/<key>``, so a rerun
of a lost task resumes it; it is removed once the report is written.

The backbone artifact is a stage's folder (``backbone.safetensors``) or, imported by
``evaluate_only``, any weights :func:`~trainer.models.hub.locate_weights` finds from the path:
Meta's released ``.pth``, a Hugging Face folder, a ``.safetensors`` file.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from components.stage import (
    REPORT_FILE,
    StageContext,
    cache_key,
    file_digest,
    mark_cached,
    recording_errors,
    run_cached,
    stage_run,
    storage_from_env,
)
from dinoflow.storage import join_uri
from evaluators.suite import (CLASSIFICATION_TASKS, DEFAULT_TASKS, TASKS, SuiteConfig, option_values, run_suite,
                              with_options)
from trainer.devices import available_device
from trainer.models.hub import load_backbone, locate_weights

# the suite's settings the pipelines set through parameters of their own, refused in ``eval_options``
OWN_PARAMETERS = {"data_uri": "eval_data_uri", "test_uri": "eval_test_uri", "image_size": "eval_image_size",
                  "precision": "eval_precision", "train_limit": "train_limit", "test_limit": "test_limit",
                  "temperature": "knn_temperature", "seg_data": "seg_data", "depth_data": "depth_data",
                  "retrieval_data": "retrieval_data", "video_data": "video_data", "depth_head_kind": "eval_depth_head",
                  "seg_head.steps": "eval_seg_steps", "depth_head.steps": "eval_depth_steps",
                  "num_workers": "the pipeline (3 with a GPU, else 0)",
                  "work_dir": "run_root (the stage's work is saved under it)"}


def run_evaluate_stage(ctx: StageContext, backbone_dir: str | Path, out_dir: str | Path, data_uri: str,
                       train_limit: int = 0, test_limit: int = 0, ks: list[int] | None = None,
                       temperature: float = 0.07, tasks: list[str] | None = None, device: str = "cpu",
                       num_workers: int = 0, seg_data: str = "", depth_data: str = "", retrieval_data: str = "",
                       image_size: int = 224, precision: str = "fp32", seg_steps: int = 0,
                       depth_steps: int = 0, test_uri: str = "", depth_head: str = "linear",
                       video_data: str = "", options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the benchmark suite on the backbone in ``backbone_dir`` on ``device`` (images decoded by
    ``num_workers`` processes; seg, depth, retrieval and video on ``seg_data``, ``depth_data``,
    ``retrieval_data`` and ``video_data`` when given, as :class:`~evaluators.suite.SuiteConfig` names them, else on the
    synthetic sets; ``precision``: the feature passes'; the dense heads trained ``seg_steps`` and
    ``depth_steps`` steps, 0: the suite's defaults; ``test_uri``: knn, linear and logreg's test set
    of its own; ``depth_head``: linear or dpt; ``options``: any other setting of the suite by name,
    :func:`~evaluators.suite.with_options`, e.g. ``{"video_frames": 16, "seg_head.lr": 3e-4}``);
    returns ``{"metrics": ...}``."""
    storage = storage_from_env()
    out = Path(out_dir)
    ks = sorted({int(k) for k in ks or []} | {20})  # k=20 always, with knn: the default gate metric
    with recording_errors(ctx, storage, "evaluate"), stage_run(ctx, "evaluate") as tracker:
        asked = tuple(tasks or DEFAULT_TASKS)
        if not data_uri and set(CLASSIFICATION_TASKS) & set(asked) and set(asked) <= set(TASKS):  # (unknown: below)
            raise ValueError("no labelled images for knn, linear and logreg: give the pipeline eval_data_uri (class "
                             "folders) or data_source (Fashion-MNIST); evaluate_only: data_uri")
        data_sets = {"test_uri": test_uri, "seg_data": seg_data, "depth_data": depth_data,
                     "retrieval_data": retrieval_data, "video_data": video_data}
        config = SuiteConfig(tasks=asked, data_uri=data_uri, train_limit=train_limit, test_limit=test_limit,
                             ks=tuple(ks), temperature=temperature, num_workers=num_workers, image_size=image_size,
                             precision=precision, depth_head_kind=depth_head, **data_sets)
        config = replace(config, seg_head=replace(config.seg_head, steps=seg_steps or config.seg_head.steps),
                         depth_head=replace(config.depth_head, steps=depth_steps or config.depth_head.steps))
        config = with_options(config, options or {}, OWN_PARAMETERS)
        chosen = option_values(config)  # as the config holds them (a KFP Struct's 6 arrives as 6.0)
        params = {"data_uri": data_uri, "train_limit": train_limit, "test_limit": test_limit, "ks": ks,
                  "temperature": temperature, "tasks": list(config.tasks), "device": device,
                  "image_size": image_size, "precision": precision, "seg_steps": config.seg_head.steps,
                  "depth_steps": config.depth_head.steps, "depth_head": depth_head, **data_sets,
                  **{f"option.{name}": chosen[name] for name in sorted(options or {})}}
        tracker.log_params(params)
        uri, source = locate_weights(str(backbone_dir), storage)
        weights = Path(uri) / "model.safetensors" if source == "hf" else Path(uri)  # the bytes that key the cache
        key = cache_key("evaluate", params, {"backbone": weights})
        work = join_uri(ctx.run_root, "work", "evaluate", key[:20])  # resumed by a rerun
        config = replace(config, work_dir=work)

        def evaluate() -> dict[str, Any]:
            backbone = load_backbone(uri, source, storage).to(available_device(device)).eval()
            out.mkdir(parents=True, exist_ok=True)
            report = run_suite(backbone, config, storage, pictures=out)
            report.pop("features")
            (out / REPORT_FILE).write_text(json.dumps({**report, "backbone_sha256": file_digest(weights)}, indent=2))
            storage.delete(work, recursive=True)  # the report holds what it was for
            return {"metrics": report["metrics"]}

        result = run_cached(ctx, storage, "evaluate", key, out, evaluate)
        mark_cached(tracker, result)
        tracker.log_metrics(result["metrics"], step=0, force=True)
        for path in sorted(out.iterdir()):
            tracker.log_artifact(path)
    return result
