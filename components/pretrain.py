"""Stage ``pretrain``: a recipe trained on the pipeline's data, its teacher backbone as output.

The config is the preset plus overrides, validated before any work. Checkpoints go to
``<run_root>/work/pretrain/<key>`` (``key``: the stage's content hash), so a killed task rerun
with the same inputs resumes where it stopped, and a finished one is reused from the cache.
Output folder: ``backbone.safetensors``, ``heads.safetensors`` (the teacher's DINO/iBOT heads and
centres: a retrain or a distillation starts from them), ``config.yaml`` (the resolved recipe),
``summary.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from components.stage import (
    StageContext,
    cache_key,
    mark_cached,
    recording_errors,
    run_cached,
    stage_run,
    storage_from_env,
)
from dinoflow.config import PretrainConfig, load_config
from dinoflow.config_dump import to_yaml
from dinoflow.run_files import BACKBONE_FILE, HEADS_FILE, SUMMARY_FILE
from dinoflow.storage import Storage, join_uri
from dinoflow.tracking import TAG_HEALTH, Tracker


def pretrain_config(preset: str, overrides: list[str], data_kind: str, data_uri: str, max_minutes: float,
                    seed: int) -> PretrainConfig:
    """The stage's recipe: ``preset`` + the pipeline's data and budget + user ``overrides`` (last wins)."""
    return load_config(PretrainConfig, preset, [
        f"data.kind={data_kind}", f"data.uri={data_uri}", f"max_minutes={max_minutes}", f"seed={seed}",
        *overrides,
    ])


def run_pretrain_stage(ctx: StageContext, out_dir: str | Path, preset: str, overrides: list[str], data_kind: str,
                       data_uri: str, max_minutes: float, seed: int, init_dir: str | None = None) -> dict[str, Any]:
    """Train (or resume, or reuse) and fill ``out_dir``; returns steps, minutes, images seen, cached."""
    storage = storage_from_env()
    out = Path(out_dir)
    with recording_errors(ctx, storage, "pretrain"), stage_run(ctx, "pretrain") as tracker:
        cfg = pretrain_config(preset, overrides, data_kind, data_uri, max_minutes, seed)
        init = {"init": Path(init_dir) / BACKBONE_FILE} if init_dir else {}
        if init_dir and (Path(init_dir) / HEADS_FILE).is_file():  # the champion's heads: the run starts from them
            init["init_heads"] = Path(init_dir) / HEADS_FILE
        # the init artifact's bytes key the cache; an init_weights override (Meta's released weights, a
        # fixed URI) keys it by its URI, in the config
        key = cache_key("pretrain", {"config": to_yaml(cfg)}, init)
        cfg = cfg.model_copy(update={
            "out": join_uri(ctx.run_root, "work", "pretrain", key[:20]),
            "init_weights": str(init["init"]) if init else cfg.init_weights,
        })
        return run_training(ctx, storage, tracker, "pretrain", key, out, cfg, lambda: _train(cfg, storage, tracker))


def _train(cfg: PretrainConfig, storage: Storage, tracker: Tracker) -> dict[str, Any]:
    """The trainer, imported only when the cache misses: a reused stage never loads torch."""
    from trainer.run import run_pretrain

    return run_pretrain(cfg, storage, tracker, evaluate=False)


def run_training(ctx: StageContext, storage: Storage, tracker: Tracker, stage: str, key: str, out: Path,
                 cfg: PretrainConfig, train: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A training stage's body (pretrain, distill): ``train()`` (the trainer's summary) unless the
    cache holds ``key``; ``out`` gets the released backbone (and its heads, when the run has them),
    the resolved recipe and the summary;
    steps, images seen and minutes are logged, and pretraining's collapse verdict tagged (``TAG_HEALTH``).
    Returns those and ``cached``."""

    def work() -> dict[str, Any]:
        summary = train()
        out.mkdir(parents=True, exist_ok=True)
        storage.get_file(summary["backbone"], out / BACKBONE_FILE)
        if "heads" in summary:  # beside the backbone: a run continued from this output starts from them
            storage.get_file(summary["heads"], out / HEADS_FILE)
        (out / "config.yaml").write_text(to_yaml(cfg))
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        kept = ("steps", "images_seen", "train_minutes", "health")  # health: pretraining's collapse verdict
        return {name: summary[name] for name in kept if name in summary}

    result = run_cached(ctx, storage, stage, key, out, work)
    mark_cached(tracker, result)
    if "health" in result:  # also on a cache hit, whose training set no tag on this run
        tracker.set_tags({TAG_HEALTH: result["health"]})
    tracker.log_metrics({k: float(result[k]) for k in ("steps", "images_seen", "train_minutes")}, step=0, force=True)
    return result
