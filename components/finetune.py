"""Stage ``finetune``: a backbone (a registered version, or given weights in any layout the path
tells: a folder holding ``backbone.safetensors``, Meta's ``.pth``, a Hugging Face folder) fine-tuned
whole with a linear classifier on labelled images (:mod:`trainer.finetune`).

The recipe is the preset plus the pipeline's data, budget and seed, then user overrides (last
wins), validated before any work. Checkpoints go to ``<run_root>/work/finetune/<key>`` (``key``:
the content hash of the recipe and the backbone artifact's bytes), so a killed task rerun resumes and a
finished one is reused from the cache. Output folder: ``backbone.safetensors`` (fine-tuned),
``classifier.safetensors``, ``config.yaml``, ``summary.json``; the report folder holds
``report.json`` with ``finetune_top1`` (and ``finetune_top5``) of the weights written (the last
step's, or with ``keep=best`` the best evaluation's) on the test split: the register stage's gate
reads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from components.stage import (
    REPORT_FILE,
    StageContext,
    cache_key,
    mark_cached,
    recording_errors,
    run_cached,
    stage_run,
    storage_from_env,
)
from dinoflow.config import FinetuneConfig, load_config
from dinoflow.config_dump import to_yaml
from dinoflow.run_files import BACKBONE_FILE, CLASSIFIER_FILE, SUMMARY_FILE
from dinoflow.storage import join_uri


def finetune_config(preset: str, overrides: list[str], weights: str, data_uri: str, max_minutes: float,
                    seed: int) -> FinetuneConfig:
    """The stage's recipe: ``preset`` + the backbone, the pipeline's data and budget + user
    ``overrides`` (last wins)."""
    return load_config(FinetuneConfig, preset, [f"weights={weights}", "weights_source=auto",
                                                f"data.uri={data_uri}", f"max_minutes={max_minutes}",
                                                f"seed={seed}", *overrides])


def run_finetune_stage(ctx: StageContext, out_dir: str | Path, report_dir: str | Path, backbone_dir: str | Path,
                       preset: str, overrides: list[str], data_uri: str, max_minutes: float,
                       seed: int) -> dict[str, Any]:
    """Fine-tune (or resume, or reuse) and fill ``out_dir`` and ``report_dir``; returns steps,
    minutes, the test scores (``metrics``) and ``cached``."""
    storage = storage_from_env()
    out, weights = Path(out_dir), Path(backbone_dir)  # a folder or a file: its layout found from the path
    with recording_errors(ctx, storage, "finetune"), stage_run(ctx, "finetune") as tracker:
        cfg = finetune_config(preset, overrides, str(weights), data_uri, max_minutes, seed)
        key = cache_key("finetune", {"config": to_yaml(cfg.model_copy(update={"weights": ""}))}, {"backbone": weights})
        cfg = cfg.model_copy(update={"out": join_uri(ctx.run_root, "work", "finetune", key[:20])})

        def work() -> dict[str, Any]:
            from trainer.finetune import finetune  # only when the cache misses: a reused stage never loads torch

            summary = finetune(cfg, storage, tracker)
            out.mkdir(parents=True, exist_ok=True)
            storage.get_file(summary["backbone"], out / BACKBONE_FILE)
            storage.get_file(summary["classifier"], out / CLASSIFIER_FILE)
            (out / "config.yaml").write_text(to_yaml(cfg))
            (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
            return {"steps": summary["steps"], "train_minutes": summary["train_minutes"],
                    "classes": summary["classes"],
                    "metrics": {f"finetune_{name}": summary["released"][name] for name in ("top1", "top5")
                                if name in summary["released"]}}

        result = run_cached(ctx, storage, "finetune", key, out, work)
        mark_cached(tracker, result)
        tracker.log_metrics({**result["metrics"], "steps": float(result["steps"])}, step=0, force=True)
        report = Path(report_dir)
        report.mkdir(parents=True, exist_ok=True)
        (report / REPORT_FILE).write_text(json.dumps({"metrics": result["metrics"], "classes": result["classes"],
                                                      "config": cfg.model_dump(mode="json")}, indent=2))
        return result
