"""Stage ``register``: the backbone into the MLflow registry, the ``champion`` alias through the gate.

The stage logs the backbone as an MLflow model (:mod:`trainer.models.packaging`; a fine-tuned
backbone with its classifier: the model predicts class probabilities) in its run,
with the run's DINO/iBOT heads beside it (artifact ``heads/heads.safetensors``: the ``champion``
stage hands them to a retrain), creates a new version of ``model_name`` tagged with the evaluate
stage's metrics, and lets
:func:`dinoflow.registry.gate` decide whether ``champion`` moves. The decision is written to the
run (tags ``gate.*``, ``gate.json``) and to the output folder as ``decision.json``. Never cached:
each run registers a version.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from components.stage import (
    REPORT_FILE,
    StageContext,
    recording_errors,
    stage_run,
    storage_from_env,
)
from dinoflow.registry import gate, register_version
from dinoflow.run_files import BACKBONE_FILE, CLASSIFIER_FILE, HEADS_FILE
from dinoflow.tracking import MlflowTracker
from trainer.models.packaging import save_mlflow_model

MODEL_ARTIFACT = "backbone"
BACKBONE_IN_RUN = f"{MODEL_ARTIFACT}/artifacts/{BACKBONE_FILE}"  # the weights inside the logged model
HEADS_ARTIFACT = "heads"  # the run's heads.safetensors: a retrain from this version starts from them


def run_register_stage(ctx: StageContext, backbone_dir: str | Path, report_dir: str | Path, out_dir: str | Path,
                       model_name: str, metric: str = "knn_top1_k20", margin: float = 0.0) -> dict[str, Any]:
    """Register and gate; returns the decision as a dict (``promoted``, ``version``, the numbers).

    The version points at the run's artifacts, so they are uploaded before it is made
    (:meth:`~dinoflow.tracking.MlflowTracker.upload_artifact`): an upload that fails fails the
    stage with nothing registered. Every check runs inside the error record, so a bad parameter
    reaches the pipeline's parent run."""
    storage = storage_from_env()
    backbone = Path(backbone_dir)
    with recording_errors(ctx, storage, "register"), stage_run(ctx, "register") as tracker:
        if not isinstance(tracker, MlflowTracker):  # stage_run's NullTracker: no tracking URI
            raise ValueError("register needs an MLflow tracking URI (the registry lives there)")
        metrics = json.loads((Path(report_dir) / REPORT_FILE).read_text())["metrics"]
        if metric not in metrics:
            raise ValueError(f"gate metric {metric!r} is not in the evaluate report; it has: "
                             f"{', '.join(sorted(metrics))}")
        with tempfile.TemporaryDirectory() as scratch:
            arch = _arch(backbone)
            size = arch["image_size"]
            classifier = backbone / CLASSIFIER_FILE
            model_dir = save_mlflow_model(backbone / BACKBONE_FILE, arch, Path(scratch) / MODEL_ARTIFACT,
                                          example=np.zeros((2, size, size), dtype=np.uint8),
                                          classifier=classifier if classifier.is_file() else None)
            tracker.upload_artifact(model_dir, MODEL_ARTIFACT)
        heads = f"{HEADS_ARTIFACT}/{HEADS_FILE}" if (backbone / HEADS_FILE).is_file() else ""
        if heads:  # beside the model, not in it: serving needs no heads; the version names them
            tracker.upload_artifact(backbone / HEADS_FILE, HEADS_ARTIFACT)
        client = tracker.client
        version = register_version(client, model_name, str(tracker.run_id), MODEL_ARTIFACT, metrics,
                                   description=f"pipeline run {ctx.pipeline_run_id}", heads=heads)
        decision = gate(client, model_name, version, metric, margin)
        tracker.set_tags({"gate.verdict": "promoted" if decision.promoted else "kept",
                          "gate.reason": decision.reason, "gate.model_version": version,
                          "gate.model_name": model_name})
        tracker.log_metrics({"gate_value": decision.value, "gate_promoted": float(decision.promoted)}, step=0,
                            force=True)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "decision.json").write_text(json.dumps(decision.to_dict(), indent=2))
        tracker.log_artifact(out / "decision.json")
    return decision.to_dict()


def _arch(backbone_dir: Path) -> dict[str, Any]:
    """Architecture facts for the model's config (and the input example's size): the weights' own,
    plus the training image size from the stage's recipe when present (a pretraining or distillation
    recipe's global crop, a fine-tuning recipe's ``image_size``; else 224)."""
    from trainer.models.hub import load_backbone

    loaded = load_backbone(str(backbone_dir / BACKBONE_FILE), "safetensors")
    config_file = backbone_dir / "config.yaml"
    recipe = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    size = recipe["crops"]["global_crop_size"] if "crops" in recipe else recipe.get("image_size", 224)
    return {"patch_size": loaded.patch_size, "embed_dim": loaded.embed_dim, "depth": len(loaded.blocks),
            "image_size": size}


def run_champion_stage(ctx: StageContext, model_name: str, out_dir: str | Path) -> str:
    """Copy a registered version's weights into ``out_dir`` as ``backbone.safetensors`` (and its
    heads as ``heads.safetensors`` when it was registered with them); returns the version.
    ``model_name`` picks it: ``<name>`` (its ``champion``), ``<name>@<alias>`` or ``<name>/<version>``.
    Fails clearly when there is no such version yet."""
    from mlflow.tracking import MlflowClient

    from dinoflow.registry import download_version, pick_version

    storage = storage_from_env()
    with recording_errors(ctx, storage, "champion"), stage_run(ctx, "champion") as tracker:
        if not ctx.tracking_uri:
            raise ValueError("champion needs an MLflow tracking URI (the registry lives there)")
        client = MlflowClient(tracking_uri=ctx.tracking_uri)
        found = pick_version(client, model_name)
        download_version(client, found, BACKBONE_IN_RUN, Path(out_dir))
        tracker.set_tags({"champion.model": found.name, "champion.version": str(found.version)})
    return str(found.version)
