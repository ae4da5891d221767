"""A thin layer over MLflow: one run per stage, nested under a pipeline's parent run.

Why: library code reports through the small :class:`Tracker` protocol and never touches MLflow's
global "active run", so it can be tested with :class:`NullTracker`, run on non-zero ranks
silently, and pointed at any store by whoever builds the tracker. The store is a local
``sqlite:///`` file under the run root by default; a ``MLFLOW_TRACKING_URI`` (read by the CLI or
the component, never here) points it at a server.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

from dinoflow.config import flatten, to_yaml

PARAM_VALUE_LIMIT = 6000  # MLflow rejects longer parameter values
BATCH_LIMIT = 100  # parameters per log_batch call

TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_VERSION = "dinoflow.version"
TAG_PIPELINE_RUN = "dinoflow.pipeline_run_id"
TAG_STAGE = "dinoflow.stage"
TAG_PARENT = "mlflow.parentRunId"


class Tracker(Protocol):
    """What library code may do with a run."""

    run_id: str | None

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_config(self, config: BaseModel) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int, force: bool = False) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...


class NullTracker:
    """A tracker that records nothing: tests, non-zero ranks, dry runs."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Ignore."""

    def log_config(self, config: BaseModel) -> None:
        """Ignore."""

    def log_metrics(self, metrics: Mapping[str, float], step: int, force: bool = False) -> None:
        """Ignore."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Ignore."""

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Ignore."""


def default_tracking_uri(run_root: str | Path) -> str:
    """The embedded default store: ``sqlite:///<run root>/mlflow.db`` (local run roots only)."""
    root = str(run_root)
    if "://" in root and not root.startswith("file://"):
        raise ValueError(
            f"run root {root!r} is remote: set MLFLOW_TRACKING_URI to a server "
            "(a sqlite store must live on a local disk)"
        )
    folder = Path(root.removeprefix("file://")).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def default_artifact_location(tracking_uri: str, run_root: str) -> str | None:
    """Artifacts of the embedded sqlite store live beside it (``<run root>/mlartifacts``); a server
    decides its own (None)."""
    if not tracking_uri.startswith("sqlite:"):
        return None
    root = run_root.removeprefix("file://")
    return f"file://{os.path.abspath(os.path.join(root, 'mlartifacts'))}"


def git_commit(start: Path | None = None) -> str | None:
    """The commit of the checkout this code runs from, if it is one."""
    folder = start or Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def standard_tags(stage: str, pipeline_run_id: str | None = None) -> dict[str, str]:
    """Tags every dinoflow run carries: stage, code version, commit, pipeline run."""
    tags = {TAG_STAGE: stage, TAG_VERSION: metadata.version("dinoflow")}
    commit = git_commit()
    if commit:
        tags[TAG_GIT_COMMIT] = commit
    if pipeline_run_id:
        tags[TAG_PIPELINE_RUN] = pipeline_run_id
    return tags


class MlflowTracker:
    """One MLflow run, written through an explicit ``MlflowClient`` (no global fluent state).

    Metrics passed to :meth:`log_metrics` are recorded every ``metric_every`` steps, and always
    when ``force`` is set (final values). Use :meth:`start` to open a run and :meth:`child` for a
    nested run; both work as context managers that end the run FAILED on an exception.
    """

    def __init__(self, client: Any, run_id: str, metric_every: int = 1) -> None:
        if metric_every < 1:
            raise ValueError(f"metric_every must be >= 1, got {metric_every}")
        self.client = client
        self.run_id: str | None = run_id
        self.metric_every = metric_every
        self.experiment_id: str = client.get_run(run_id).info.experiment_id

    @classmethod
    def start(
        cls,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        *,
        tags: Mapping[str, str] | None = None,
        parent_run_id: str | None = None,
        artifact_location: str | None = None,
        metric_every: int = 1,
    ) -> MlflowTracker:
        """Open a run in ``experiment`` (created if missing, with ``artifact_location``)."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        experiment_id = _experiment_id(client, experiment, artifact_location, tracking_uri)
        run_tags = dict(tags or {})
        if parent_run_id:
            run_tags[TAG_PARENT] = parent_run_id
        run = client.create_run(experiment_id, run_name=run_name, tags=run_tags)
        return cls(client, run.info.run_id, metric_every)

    def child(self, run_name: str, tags: Mapping[str, str] | None = None) -> MlflowTracker:
        """A nested run under this one (a pipeline stage under the pipeline's parent run)."""
        run_tags = dict(tags or {})
        run_tags[TAG_PARENT] = self.run_id or ""
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=run_tags)
        return MlflowTracker(self.client, run.info.run_id, self.metric_every)

    def __enter__(self) -> MlflowTracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish("FAILED" if exc_type else "FINISHED")

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with an MLflow status (FINISHED, FAILED or KILLED)."""
        self.client.set_terminated(self.run_id, status=status)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log parameters; values longer than MLflow's limit are cut and marked."""
        from mlflow.entities import Param

        items = [Param(str(k), _param_text(v)) for k, v in params.items()]
        for start in range(0, len(items), BATCH_LIMIT):
            self.client.log_batch(self.run_id, params=items[start : start + BATCH_LIMIT])

    def log_config(self, config: BaseModel) -> None:
        """The flattened config as params and the resolved YAML as ``config.yaml``."""
        self.log_params(flatten(config))
        self.client.log_text(self.run_id, to_yaml(config), "config.yaml")

    def log_metrics(self, metrics: Mapping[str, float], step: int, force: bool = False) -> None:
        """Record metrics at ``step`` if it falls on the cadence (or ``force``)."""
        if not force and step % self.metric_every != 0:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a folder's contents, into the run's artifacts."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path)
        else:
            raise FileNotFoundError(f"artifact {path} does not exist")

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set run tags."""
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)


def _experiment_id(client: Any, name: str, artifact_location: str | None, uri: str) -> str:
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception as err:  # a concurrent stage may have created it first
        existing = client.get_experiment_by_name(name)
        if existing is None:
            raise RuntimeError(f"cannot create MLflow experiment {name!r} at {uri}: {err}") from err
        return existing.experiment_id


def _param_text(value: Any) -> str:
    text = str(value)
    if len(text) > PARAM_VALUE_LIMIT:
        marker = "...[cut]"
        return text[: PARAM_VALUE_LIMIT - len(marker)] + marker
    return text
