"""Stage ``promote``: a registered model's alias moved to a version by hand, past the gate.

Why a stage: users work from the Kubeflow UI, where a rollback (the champion misbehaves in use)
is a run of the ``promote`` pipeline like any other, recorded in MLflow beside the runs that
registered the versions. The move itself is :func:`dinoflow.registry.move_alias` (``dinoflow
models promote`` on the command line), written on the version as ``alias.<alias>``. Never cached:
each run moves the alias. Torch-free, so the task starts in seconds.
"""

from __future__ import annotations

from typing import Any

from components.stage import StageContext, recording_errors, stage_run, storage_from_env
from dinoflow.registry import move_alias


def run_promote_stage(ctx: StageContext, model_name: str, version: str, alias: str = "champion",
                      reason: str = "") -> dict[str, Any]:
    """Point ``alias`` of ``model_name`` at ``version``; returns ``{"previous": ..., "version": ...}``
    (``previous`` "" when the alias pointed nowhere). The checks run inside the error record: an
    empty ``version``, the pipeline's default, is named in the pipeline's failure."""
    from mlflow.tracking import MlflowClient

    storage = storage_from_env()
    with recording_errors(ctx, storage, "promote"), stage_run(ctx, "promote") as tracker:
        if not ctx.tracking_uri:
            raise ValueError("promote needs an MLflow tracking URI (the registry lives there)")
        if not model_name or not version:
            raise ValueError(f"promote needs model_name and version (the registered model and the version its "
                             f"alias should point at), got {model_name!r} and {version!r}")
        client = MlflowClient(tracking_uri=ctx.tracking_uri, registry_uri=ctx.tracking_uri)
        previous = move_alias(client, model_name, version, alias, reason) or ""
        tracker.set_tags({"promote.model": model_name, "promote.alias": alias, "promote.version": version,
                          "promote.previous": previous, "promote.reason": reason or "(no reason given)"})
    return {"previous": previous, "version": version}
