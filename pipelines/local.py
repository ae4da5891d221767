"""Run a pipeline on this machine with ``kfp.local`` and summarise it from MLflow.

Why: the same pipeline definition that a cluster runs must run on a laptop with the embedded
defaults: a local run root (work folders, cache, KFP outputs under ``<run_root>/kfp``) and the
sqlite MLflow store. A failed pipeline is reported with the failing stage's own error, read
from the record the stage wrote (KFP's message names only the task).
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dinoflow.storage import Storage, join_uri
from dinoflow.tracking import TAG_HEALTH


class PipelineFailed(RuntimeError):
    """A local pipeline run failed; ``errors`` maps each failed stage to its error line."""

    def __init__(self, pipeline: str, errors: dict[str, str]) -> None:
        self.pipeline, self.errors = pipeline, errors
        detail = "; ".join(f"stage {stage!r} failed: {error}" for stage, error in errors.items())
        super().__init__(f"pipeline {pipeline!r} failed: {detail or 'see the task logs above'}")


@dataclass
class StageSummary:
    """One stage run of a pipeline run, as MLflow recorded it."""

    stage: str
    status: str
    seconds: float
    cached: bool
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


def local_root(run_root: str) -> str:
    """``run_root`` as an absolute local path, or unchanged when it is a remote URI."""
    if "://" in run_root and not run_root.startswith("file://"):
        return run_root
    return str(Path(run_root.removeprefix("file://")).resolve())


# the pipeline parameters a local run takes from settings of its own, and the setting of each
LOCAL_SETTINGS = {"run_root": "--run-root", "tracking_uri": "MLFLOW_TRACKING_URI"}


def local_settings(params: Mapping[str, Any], defaults: Mapping[str, Any],
                   given: Mapping[str, str | None]) -> tuple[str | None, str | None, dict[str, Any]]:
    """A local run's run root and MLflow store, and the other ``params``.

    Why: ``run_root`` and ``tracking_uri`` are pipeline parameters too, so a parameter file that
    ``dinoflow pipeline params`` wrote holds them at the pipeline's defaults, the cluster's
    (``s3://dinoflow/runs``, the in-cluster MLflow); these say nothing of a run on this machine and
    are left out. Another value (a file's or a ``key=value``) is that setting, as
    :data:`LOCAL_SETTINGS` names it; ``given`` holds those settings' values (None: not set), and a
    setting given both ways must agree. Returns (run root, tracking URI, the other parameters).
    """
    rest = dict(params)
    chosen = {key: given.get(key) for key in LOCAL_SETTINGS}
    for key, setting in LOCAL_SETTINGS.items():
        value = rest.pop(key, None)
        if not value or value == defaults.get(key):
            continue
        if chosen[key] not in (None, value):
            raise ValueError(f"the parameter {key}={value!r} and {setting} {chosen[key]!r} disagree: give one of them")
        chosen[key] = value
    return chosen["run_root"], chosen["tracking_uri"], rest


def run_locally(pipeline: Any, name: str, run_root: str, kfp_root: str, tracking_uri: str, params: dict[str, Any],
                storage: Storage) -> list[StageSummary]:
    """Run ``pipeline`` (a ``@dsl.pipeline`` function) with kfp.local's subprocess runner.

    ``run_root`` (local or ``s3://``) holds the stages' state; KFP's own outputs go to the local
    folder ``kfp_root``; ``params`` holds neither ``run_root`` nor ``tracking_uri``
    (:func:`local_settings`). ``name`` may be spelt with hyphens (``evaluate-only``). Returns the
    stage runs of this pipeline run (in start order); raises :class:`PipelineFailed` with the
    failing stages' errors.
    """
    from kfp import local

    name = name.replace("-", "_")  # as the pipelines tag their parent runs (pipelines.definitions)
    root = local_root(run_root)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(Path(kfp_root).resolve()))
    started = time.time()
    try:
        with warnings.catch_warnings():  # the cluster's CPU/memory/GPU settings, which kfp.local ignores
            warnings.filterwarnings("ignore", message=r".*have no effect in the current local runner")
            pipeline(run_root=root, tracking_uri=tracking_uri, **params)
    except RuntimeError as err:
        raise PipelineFailed(name, stage_errors(storage, root, since=started)) from err
    return stage_summaries(tracking_uri, params.get("experiment", "dinoflow"), name, since=started)


def stage_errors(storage: Storage, run_root: str, since: float) -> dict[str, str]:
    """Errors that stages recorded under ``run_root`` at or after ``since`` (epoch seconds)."""
    errors = {}
    for uri in storage.list(join_uri(run_root, "pipeline-runs"), recursive=True):
        if "/errors/" in uri and uri.endswith(".json"):
            record = json.loads(storage.read_bytes(uri))
            if record.get("time", 0) >= since:
                errors[record["stage"]] = record["error"]
    return errors


def stage_summaries(tracking_uri: str, experiment: str, pipeline: str, since: float) -> list[StageSummary]:
    """The stage runs under the newest parent run of ``pipeline`` started at or after ``since``."""
    from mlflow.tracking import MlflowClient

    from components.pipeline_run import TAG_PIPELINE
    from components.stage import TAG_CACHED
    from dinoflow.tracking import TAG_PARENT

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    parents = client.search_runs([found.experiment_id], filter_string=f"tags.`{TAG_PIPELINE}` = '{pipeline}' and "
                                 f"attributes.start_time >= {int(since * 1000)}", order_by=["start_time DESC"])
    if not parents:
        return []
    children = client.search_runs([found.experiment_id],
                                  filter_string=f"tags.`{TAG_PARENT}` = '{parents[0].info.run_id}'",
                                  order_by=["start_time ASC"])
    return [StageSummary(
        stage=run.info.run_name, status=run.info.status,
        seconds=((run.info.end_time or run.info.start_time) - run.info.start_time) / 1000,
        cached=run.data.tags.get(TAG_CACHED) == "true", metrics=dict(run.data.metrics), tags=dict(run.data.tags),
    ) for run in children]


KEY_METRICS = ("curation_pool", "curation_curated", "steps", "train_minutes", "knn_top1_k20", "linear_top1",
               "pixels_knn_top1_k20", "gate_value")


def format_summary(stages: list[StageSummary]) -> str:
    """A plain-text table: stage, status, seconds, cached, key metrics."""
    lines = [f"{'stage':<10} {'status':<9} {'seconds':>8} {'cached':>6}  key figures"]
    for s in stages:
        figures = [f"{k}={s.metrics[k]:.4g}" for k in KEY_METRICS if k in s.metrics]
        if TAG_HEALTH in s.tags:
            figures.append(f"health {s.tags[TAG_HEALTH]}")
        if "promote.version" in s.tags:
            figures.append(f"{s.tags['promote.model']}@{s.tags['promote.alias']}: version "
                           f"{s.tags['promote.previous'] or '(none)'} -> {s.tags['promote.version']}")
        if "gate.verdict" in s.tags:
            figures.append(f"version {s.tags.get('gate.model_version')}: {s.tags['gate.verdict']} ({s.tags['gate.reason']})")
        lines.append(f"{s.stage:<10} {s.status:<9} {s.seconds:>8.1f} {'yes' if s.cached else 'no':>6}  {', '.join(figures)}")
    return "\n".join(lines)
