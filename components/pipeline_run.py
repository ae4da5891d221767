"""The pipeline's parent MLflow run: opened by the first task, closed by the exit handler.

Why: every stage's run nests under one parent per pipeline run, on a laptop and on a cluster, so
the parent is made inside the pipeline (not by whoever launched it). The exit handler cannot take
the opener's output (KFP forbids it), so it finds the parent by the pipeline-run tag.
"""

from __future__ import annotations

import json

from components.stage import StageContext, errors_uri, recording_errors, storage_from_env
from dinoflow.tracking import TAG_PIPELINE_RUN, MlflowTracker, default_artifact_location, standard_tags

TAG_PIPELINE = "dinoflow.pipeline"
TAG_FAILED_STAGES = "dinoflow.failed_stages"
# how long the opener waits for the store to create the parent run: every stage names it as its
# parent, so without its id the pipeline cannot start (a store restarting answers within this)
PARENT_START_TIMEOUT_S = 120.0


def open_pipeline_run(ctx: StageContext, pipeline: str) -> str:
    """Create the parent run (tagged with the pipeline and its KFP run id); returns its id. Fails,
    with an error record naming the store, when the store has not created it within
    :data:`PARENT_START_TIMEOUT_S`."""
    if not ctx.tracking_uri:
        return ""
    tags = {**standard_tags("pipeline", ctx.pipeline_run_id or None), TAG_PIPELINE: pipeline}
    with recording_errors(ctx, storage_from_env(), "open_run"):
        tracker = MlflowTracker.start(ctx.tracking_uri, ctx.experiment, run_name=pipeline, tags=tags,
                                      artifact_location=default_artifact_location(ctx.tracking_uri, ctx.run_root),
                                      start_timeout_s=PARENT_START_TIMEOUT_S, require_run=True)
    tracker.log_params({"run_root": ctx.run_root, "pipeline_run_id": ctx.pipeline_run_id})
    assert tracker.run_id is not None  # (require_run)
    return tracker.run_id


def close_pipeline_run(ctx: StageContext, state: str) -> dict[str, object]:
    """End the parent run FINISHED or FAILED (from KFP's final ``state``), recording failed stages."""
    storage = storage_from_env()
    errors = [json.loads(storage.read_bytes(uri)) for uri in storage.list(errors_uri(ctx)) if uri.endswith(".json")]
    summary = {"state": state, "failed_stages": [e["stage"] for e in errors],
               "errors": {e["stage"]: e["error"] for e in errors}}
    if not ctx.tracking_uri:
        return summary
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=ctx.tracking_uri)
    experiment = client.get_experiment_by_name(ctx.experiment)
    if experiment is None:
        return summary
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`{TAG_PIPELINE_RUN}` = '{ctx.pipeline_run_id}' "
                                            f"and tags.`{TAG_PIPELINE}` != ''")
    failed = state not in ("SUCCEEDED", "SUCCESS") or bool(errors)
    for run in runs:
        if summary["failed_stages"]:
            client.set_tag(run.info.run_id, TAG_FAILED_STAGES, ",".join(summary["failed_stages"]))
            client.log_text(run.info.run_id, json.dumps(errors, indent=2), "errors.json")
        client.set_terminated(run.info.run_id, status="FAILED" if failed else "FINISHED")
    return summary
