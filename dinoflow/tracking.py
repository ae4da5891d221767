"""A thin layer over MLflow: one run per stage, nested under a pipeline's parent run.

Why: library code reports through the small :class:`Tracker` protocol and never touches MLflow's
global "active run", so it can be tested with :class:`NullTracker`, run on non-zero ranks
silently, and pointed at any store by whoever builds the tracker. The store is a local
``sqlite:///`` file under the run root by default; a ``MLFLOW_TRACKING_URI`` (read by the CLI or
the component, never here) points it at a server.

A tracking server that is down, restarting or unreachable must not stop training: the
:class:`MlflowTracker` queues its records in memory (bounded) and sends them from a background
thread when the server answers; what it could not send by the end is logged and counted
(:meth:`MlflowTracker.delivery`).
"""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

from dinoflow.config_dump import flatten, to_yaml

PARAM_VALUE_LIMIT = 6000  # MLflow rejects longer parameter values
BATCH_LIMIT = 100  # parameters per log_batch call

TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_VERSION = "dinoflow.version"
TAG_PIPELINE_RUN = "dinoflow.pipeline_run_id"
TAG_STAGE = "dinoflow.stage"
TAG_HEALTH = "dinoflow.health"  # a pretraining run's collapse verdict (trainer.health.CollapseWatch): ok or what
TAG_PARENT = "mlflow.parentRunId"


class Tracker(Protocol):
    """What library code may do with a run."""

    run_id: str | None

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_config(self, config: BaseModel) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int, force: bool = False) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def flush(self, timeout_s: float | None = None) -> bool: ...

    def delivery(self) -> dict[str, int]: ...


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

    def flush(self, timeout_s: float | None = None) -> bool:
        """Nothing waits."""
        return True

    def delivery(self) -> dict[str, int]:
        """Nothing was sent or lost."""
        return {}


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

    **An unreachable store never stops the caller.** Every record (run start, params, tags,
    metrics, texts, artifacts, run end) goes into one ordered in-memory queue that a background
    thread sends. While the store does not answer, records wait and the thread retries with
    backoff (0.5 s doubling to 10 s); once it answers they go in order, consecutive metrics
    merged into batches of up to 1000. The queue is bounded: above ``max_pending_values`` queued
    values (metric values, params, tags) the oldest metric batches are dropped and counted. The
    time is bounded: only :meth:`start` (up to ``start_timeout_s``, for the run id),
    :meth:`log_artifact` (up to ``flush_timeout_s``, only while the store answers) and
    :meth:`finish` (up to ``flush_timeout_s``) wait for the store; :meth:`upload_artifact`, for
    files that something points at as soon as it returns (a registered model version), bypasses
    the queue: it uploads in the caller's thread and raises when it could not. What was never
    recorded is logged as a warning at :meth:`finish` and counted in :meth:`delivery`; a tracker
    never finished (a run left open for a later task) is flushed at interpreter exit.

    A record the store refuses (a 4xx answer, or another 5xx than 502-504 three times) is
    dropped, counted as rejected and logged, so it does not hold up the records behind it.
    MLflow's own HTTP retries (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, default 7 with backoff up to
    2 minutes, and ``MLFLOW_HTTP_REQUEST_TIMEOUT``) run inside each send: they delay the
    background thread, never the caller.
    """

    def __init__(
        self,
        client: Any,
        run_id: str | None = None,
        metric_every: int = 1,
        *,
        tracking_uri: str = "",
        flush_timeout_s: float = 60.0,
        max_pending_values: int = 100_000,
    ) -> None:
        if metric_every < 1:
            raise ValueError(f"metric_every must be >= 1, got {metric_every}")
        self.client = client
        self.run_id: str | None = run_id
        self.metric_every = metric_every
        self.tracking_uri = tracking_uri
        self.flush_timeout_s = flush_timeout_s
        self.max_pending_values = max_pending_values
        self.experiment_id: str | None = client.get_run(run_id).info.experiment_id if run_id else None
        self._counts = dict.fromkeys(("sent", "dropped", "rejected", "failed_attempts"), 0)
        self._queue: list[_Record] = []  # waiting records, oldest first
        self._busy = 0  # how many of the first records are being sent
        self._values = 0  # metric values, params and tags in the queue
        self._cond = threading.Condition()
        self._closed = self._nudged = False
        self._down_since: float | None = None  # monotonic time of the first failed send of an outage
        self._refusal = ""  # why the store refused to start the run
        threading.Thread(target=self._send_loop, daemon=True).start()
        _LIVE.add(self)  # held until finished, so that its records are sent (at exit at the latest)

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
        start_timeout_s: float = 10.0,
        flush_timeout_s: float = 60.0,
        max_pending_values: int = 100_000,
        require_run: bool = False,
    ) -> MlflowTracker:
        """Open a run in ``experiment`` (created if missing, with ``artifact_location``).

        Waits up to ``start_timeout_s`` for the store to create the run; if it has not answered by
        then, returns with ``run_id`` None and a warning, and the run is created when it does; with
        ``require_run`` it raises instead, naming the store: for a run whose id is handed on at once
        (a pipeline's parent run, which every stage run names as its parent). A refusal (e.g. an
        experiment in the deleted state) raises here.
        """
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        tracker = cls(client, None, metric_every, tracking_uri=tracking_uri, flush_timeout_s=flush_timeout_s,
                      max_pending_values=max_pending_values)
        run_tags = {**(tags or {}), **({TAG_PARENT: parent_run_id} if parent_run_id else {})}
        tracker._open(lambda: _experiment_id(client, experiment, artifact_location, tracking_uri), run_name,
                      run_tags, start_timeout_s, require_run)
        return tracker

    def child(self, run_name: str, tags: Mapping[str, str] | None = None,
              start_timeout_s: float = 10.0) -> MlflowTracker:
        """A nested run under this one (a pipeline stage under the pipeline's parent run); if this
        run is not created yet, waits for it up to ``start_timeout_s``."""
        self.flush(start_timeout_s)
        child = MlflowTracker(self.client, None, self.metric_every, tracking_uri=self.tracking_uri,
                              flush_timeout_s=self.flush_timeout_s, max_pending_values=self.max_pending_values)
        child._open(lambda: self.experiment_id, run_name, {**(tags or {}), TAG_PARENT: self.run_id or ""},
                    start_timeout_s)
        return child

    def _open(self, experiment_id: Callable[[], str | None], run_name: str, tags: dict[str, str],
              timeout_s: float, require_run: bool = False) -> None:
        """Queue the run's creation (in ``experiment_id()``) and wait up to ``timeout_s`` for it
        (``require_run``: raise when it is not created by then, rather than create it later)."""

        def create() -> None:
            self.experiment_id = experiment_id()
            self.run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id

        self._put("create", create, 0)
        self._wait(timeout_s)
        if self._refusal:
            self._close()
            raise RuntimeError(f"MLflow at {self.tracking_uri} refused to start run {run_name!r}: {self._refusal}")
        if self.run_id is None and require_run:
            self._close()
            raise RuntimeError(f"MLflow at {self.tracking_uri} did not create run {run_name!r} within {timeout_s:g} s: "
                               "check that the server is up and that this address (MLFLOW_TRACKING_URI, the "
                               "pipeline's tracking_uri) reaches it from here")
        if self.run_id is None:
            _log.warning("MLflow at %s did not answer within %.0f s; run %r starts when it does",
                         self.tracking_uri, timeout_s, run_name)

    def __enter__(self) -> MlflowTracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish("FAILED" if exc_type else "FINISHED")

    def finish(self, status: str = "FINISHED") -> dict[str, int]:
        """End the run with an MLflow status (FINISHED, FAILED or KILLED), waiting up to
        ``flush_timeout_s`` for every queued record; returns :meth:`delivery`. Records still
        unsent then are given up and, like dropped and refused ones, reported in a warning."""
        if not self._closed:
            self._put("terminate", status, 0)
            self.flush()
            self._close()
            report = self.delivery()
            lost = ", ".join(f"{report[k]} {k}" for k in ("pending", "unsent_records", "dropped", "rejected")
                             if report[k])
            if lost:
                _log.warning("MLflow run %s at %s: not recorded: %s", self.run_id, self.tracking_uri, lost)
        return self.delivery()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait up to ``timeout_s`` (default ``flush_timeout_s``) for the queued records to be
        sent, retrying at once if the sender is backing off; True if they all were."""
        with self._cond:
            self._nudged = True
            self._cond.notify_all()
        return self._wait(self.flush_timeout_s if timeout_s is None else timeout_s)

    def delivery(self) -> dict[str, int]:
        """What reached the store so far: ``sent`` metric values; ``pending`` metric values still
        queued (lost once the run has finished); ``unsent_records`` other records (params, tags,
        texts, artifacts, run start/end) still queued; ``dropped`` metric values discarded from a
        full queue; ``rejected`` records the store refused; ``failed_attempts`` failed sends."""
        with self._cond:
            pending = sum(r.values for r in self._queue if r.kind == "metrics")
            unsent = sum(r.kind != "metrics" for r in self._queue)
            return {"sent": self._counts["sent"], "pending": pending, "unsent_records": unsent, **self._counts}

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log parameters; values longer than MLflow's limit are cut and marked."""
        from mlflow.entities import Param

        items = [Param(str(k), _param_text(v)) for k, v in params.items()]
        for start in range(0, len(items), BATCH_LIMIT):
            self._put("params", items[start : start + BATCH_LIMIT])

    def log_config(self, config: BaseModel) -> None:
        """The flattened config as params and the resolved YAML as ``config.yaml``."""
        self.log_params(flatten(config))
        self._put("text", (to_yaml(config), "config.yaml"), 1)

    def log_metrics(self, metrics: Mapping[str, float], step: int, force: bool = False) -> None:
        """Record metrics at ``step`` if it falls on the cadence (or ``force``)."""
        if not force and step % self.metric_every != 0:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        if metrics:
            self._put("metrics", [Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a folder's contents, into the run's artifacts.

        While the store answers, waits (up to ``flush_timeout_s``) until it is uploaded, so that
        what follows may rely on it; while it is unreachable the upload is queued like the rest
        (the file must then still exist when the store answers again).
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"artifact {path} does not exist")
        self._put("artifact", (path, artifact_path), 1)
        if self._down_since is None:
            self._wait(self.flush_timeout_s)

    def upload_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a folder's contents, into the run's artifacts now, in the caller's
        thread; raises when it was not uploaded.

        For what is pointed at as soon as this returns (a registered model version's
        ``runs:/<id>/<path>``): :meth:`log_artifact` gives up waiting after ``flush_timeout_s``, and
        a caller that then deletes the file or registers it would point at nothing. Waits up to
        ``flush_timeout_s`` for the run to be created when it is not yet; MLflow's own HTTP retries
        run inside the upload.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"artifact {path} does not exist")
        if self.run_id is None:
            self.flush()
        if self.run_id is None:
            raise RuntimeError(f"MLflow at {self.tracking_uri} has not created the run within "
                               f"{self.flush_timeout_s:g} s: {path} was not uploaded")
        upload = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
        upload(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set run tags."""
        from mlflow.entities import RunTag

        items = [RunTag(str(k), str(v)) for k, v in tags.items()]
        for start in range(0, len(items), BATCH_LIMIT):
            self._put("tags", items[start : start + BATCH_LIMIT])

    # -- the queue and its sender -------------------------------------------------------------

    def _put(self, kind: str, payload: Any, values: int | None = None) -> None:
        """Queue a record; past the bound, drop the oldest metric records not being sent."""
        with self._cond:
            if self._closed:
                return
            self._queue.append(_Record(kind, payload, len(payload) if values is None else values))
            self._values += self._queue[-1].values
            for record in self._queue[self._busy :]:
                if self._values <= self.max_pending_values:
                    break
                if record.kind == "metrics":
                    self._queue.remove(record)
                    self._values -= record.values
                    self._counts["dropped"] += record.values
            self._cond.notify_all()

    def _close(self) -> None:
        """Stop the sender; whatever is still queued is given up."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        _LIVE.discard(self)

    def _wait(self, timeout_s: float) -> bool:
        """Wait until the queue is empty (True), or ``timeout_s`` passed (False)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._queue and not self._closed and time.monotonic() < deadline:
                self._cond.wait(min(deadline - time.monotonic(), 0.2))
            return not self._queue

    def _send_loop(self) -> None:
        """Send the queue's head (one record, or up to 1000 consecutive metric values); on a
        transient failure keep it and back off, on a refusal drop it."""
        delay = 0.5
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                batch = self._queue[:1]
                for record in self._queue[1:]:
                    if batch[0].kind != "metrics" or record.kind != "metrics" or \
                            sum(r.values for r in batch) + record.values > METRICS_PER_BATCH:
                        break
                    batch.append(record)
                self._busy = len(batch)
            try:
                self._send(batch)
                error = None
            except Exception as err:  # noqa: BLE001 - retried, or counted as refused
                error = err
            with self._cond:
                self._busy = 0
                if error:
                    self._counts["failed_attempts"] += 1
                if error is None or _refused(error, batch):
                    del self._queue[: len(batch)]
                    self._values -= sum(r.values for r in batch)
                    if error:
                        self._counts["rejected"] += len(batch)
                        self._refusal = f"{type(error).__name__}: {error}" if batch[0].kind == "create" else ""
                        _log.warning("MLflow at %s refused a %s record: %.300s", self.tracking_uri, batch[0].kind,
                                     error)
                    else:
                        self._counts["sent"] += sum(r.values for r in batch if r.kind == "metrics")
                        if self._down_since is not None:
                            _log.warning("MLflow at %s answers again", self.tracking_uri)
                        self._down_since, delay = None, 0.5
                    self._cond.notify_all()
                    continue
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    _log.warning("MLflow at %s unreachable, records wait in memory: %.200s", self.tracking_uri,
                                 error)
                self._cond.notify_all()
                self._nudged = False
                deadline = time.monotonic() + delay
                while not (self._closed or self._nudged) and time.monotonic() < deadline:
                    self._cond.wait(deadline - time.monotonic())
                delay = min(2 * delay, 10.0)

    def _send(self, batch: list[_Record]) -> None:
        """Write one record, or consecutive metric records, to the store; raises on failure."""
        kind, payload = batch[0].kind, batch[0].payload
        if kind == "create":
            payload()
        elif kind == "metrics":
            self.client.log_batch(self.run_id, metrics=[m for r in batch for m in r.payload])
        elif kind in ("params", "tags"):
            self.client.log_batch(self.run_id, **{kind: payload})
        elif kind == "text":
            self.client.log_text(self.run_id, *payload)
        elif kind == "artifact":
            path, artifact_path = payload
            (self.client.log_artifacts if path.is_dir() else self.client.log_artifact)(
                self.run_id, str(path), artifact_path)
        else:
            self.client.set_terminated(self.run_id, status=payload)


_log = logging.getLogger(__name__)
_LIVE: set[MlflowTracker] = set()
METRICS_PER_BATCH = 1000  # MLflow's log_batch limit


@dataclass(eq=False)
class _Record:
    kind: str  # create | params | tags | metrics | text | artifact | terminate
    payload: Any
    values: int  # metric values, params or tags it holds (1 for a text or artifact, 0 run start/end)
    attempts: int = 0


def _refused(err: BaseException, batch: list[_Record]) -> bool:
    """True when the store said no, so sending the same records again cannot help. From a server:
    a 4xx at once (408 and 429 on the third try), a 5xx on the third try unless it is 502-504 (a
    proxy in front of a restarting server). From MLflow's client or a local store: an error with a
    4xx code. A missing local file, and any error that is neither an MLflow one nor an OSError.
    Counts the attempt."""
    batch[0].attempts += 1
    code = int(err.get_http_status_code()) if hasattr(err, "get_http_status_code") else 0
    if type(err).__name__ == "RestException":  # the server answered
        return code < 500 and code not in (408, 429) or code not in (502, 503, 504) and batch[0].attempts > 2
    if code:  # e.g. a connection error (500: retried) or a local store's INVALID_PARAMETER_VALUE (400)
        return code < 500
    return isinstance(err, (FileNotFoundError, PermissionError)) or not isinstance(err, OSError)


@atexit.register
def _flush_at_exit() -> None:
    """Send what unfinished trackers still hold (a run left open for a later task to close)."""
    for tracker in list(_LIVE):
        tracker.flush()


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
