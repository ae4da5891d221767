"""Stage ``distill``: a student distilled from the pipeline's frozen teacher backbone.

The teacher artifact is a folder (a pretrain stage's or the registry's: ``backbone.safetensors``,
``heads.safetensors`` beside it when trained with heads; a run folder with checkpoints; a Hugging
Face folder) or a weight file (Meta's ``.pth``, a ``.safetensors``), as ``teacher_uri`` imports
it: read with ``teacher.source=auto``, its layout found from the path as ``dinoflow distill
--teacher`` finds it. The ``features`` objective (the ``distill-tiny`` default) needs no heads; a
``heads`` preset distils from the teacher's trained heads (frozen random heads where there are
none). Checkpoints go to ``<run_root>/work/distill/<key>`` (``key``: the content hash of the
recipe and the teacher artifact's bytes), so a killed task rerun resumes and a finished one is
reused from the cache. Output folder: ``backbone.safetensors`` (the student EMA), its
``heads.safetensors`` with a ``heads`` objective, ``config.yaml``, ``summary.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from components.pretrain import run_training
from components.stage import StageContext, cache_key, recording_errors, stage_run, storage_from_env
from dinoflow.config import DistillConfig, load_config
from dinoflow.config_dump import to_yaml
from dinoflow.storage import Storage, join_uri
from dinoflow.tracking import Tracker


def distill_config(student: str, overrides: list[str], teacher: str, data_kind: str, data_uri: str,
                   max_minutes: float, seed: int) -> DistillConfig:
    """The stage's recipe: the ``student`` preset + the teacher (a folder or a file, its layout found
    from the path), the pipeline's data and budget + user ``overrides`` (last wins)."""
    return load_config(DistillConfig, student, [
        f"teacher.uri={teacher}", "teacher.source=auto", f"data.kind={data_kind}", f"data.uri={data_uri}",
        f"max_minutes={max_minutes}", f"seed={seed}", *overrides,
    ])


def registered_name(model_name: str, student: str) -> str:
    """The registry name of a student: the pipeline's model name and the preset's stem."""
    return f"{model_name}-{Path(student).stem}"


def run_distill_stage(ctx: StageContext, out_dir: str | Path, teacher: str | Path, student: str,
                      overrides: list[str], data_kind: str, data_uri: str, max_minutes: float,
                      seed: int) -> dict[str, Any]:
    """Distil (or resume, or reuse) and fill ``out_dir``; returns steps, minutes, images seen, cached."""
    storage = storage_from_env()
    out = Path(out_dir)
    with recording_errors(ctx, storage, "distill"), stage_run(ctx, "distill") as tracker:
        cfg = distill_config(student, overrides, str(teacher), data_kind, data_uri, max_minutes, seed)
        key = cache_key("distill", {"config": to_yaml(cfg.model_copy(update={"teacher": cfg.teacher.model_copy(
            update={"uri": ""})}))}, {"teacher": teacher})  # (a folder's heads and checkpoints with it)
        cfg = cfg.model_copy(update={"out": join_uri(ctx.run_root, "work", "distill", key[:20])})
        tracker.set_tags({"student": Path(student).stem})
        return run_training(ctx, storage, tracker, "distill", key, out, cfg, lambda: _train(cfg, storage, tracker))


def _train(cfg: DistillConfig, storage: Storage, tracker: Tracker) -> dict[str, Any]:
    """The distiller, imported only when the cache misses: a reused stage never loads torch."""
    from trainer.distill import run_distill

    return run_distill(cfg, storage, tracker, evaluate=False)
