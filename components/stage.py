"""What every stage does around its work: its MLflow run, its cache entry, its error record.

Why: KFP caches steps on a cluster, but ``kfp.local`` does not; a stage whose inputs, config and
code are unchanged must still not be recomputed, so each cached stage keys its outputs by a
content hash (parameters, input artifacts' bytes, the code bundle's digest) under
``<run_root>/cache/<stage>/<key>/`` and copies them back on a hit. An entry is complete or absent:
its ``result.json`` is written last. A failing stage writes its error to
``<run_root>/pipeline-runs/<pipeline run>/errors/<stage>.json`` before failing, so the launcher can
say which stage failed and why (KFP itself reports only the task name).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.bundle import REPO_ROOT, code_digest
from dinoflow.storage import S3Settings, Storage, join_uri
from dinoflow.tracking import MlflowTracker, NullTracker, Tracker, default_artifact_location, standard_tags

TAG_CACHED = "dinoflow.cached"
# what stages hand each other beside a run's files (dinoflow.run_files): here, so a stage reads another's
# output without importing its code
REPORT_FILE = "report.json"  # evaluate's output, register's input


@dataclass(frozen=True)
class StageContext:
    """Where a stage keeps its state and reports, shared by every stage of a pipeline run.

    Args:
        run_root: URI (``file://``, path or ``s3://``) for work folders, cache entries and errors.
        tracking_uri: MLflow store; empty means no tracking.
        experiment: MLflow experiment of the pipeline's runs.
        parent_run_id: the pipeline's parent MLflow run; stage runs nest under it.
        pipeline_run_id: KFP's run id, tagged on every stage run.
        use_cache: reuse a finished stage whose inputs are unchanged.
    """

    run_root: str
    tracking_uri: str = ""
    experiment: str = "dinoflow"
    parent_run_id: str = ""
    pipeline_run_id: str = ""
    use_cache: bool = True

    def __post_init__(self) -> None:
        if not self.run_root:
            raise ValueError("run_root is empty: give a folder or s3:// URI for the pipeline's state")


def storage_from_env() -> Storage:
    """Storage for a task: S3 endpoint and credentials from the environment (a Secret on a cluster)."""
    return Storage(S3Settings.from_env(os.environ))


def errors_uri(ctx: StageContext) -> str:
    """The folder where the failed stages of this pipeline run record their errors."""
    return join_uri(ctx.run_root, "pipeline-runs", ctx.pipeline_run_id or "unknown", "errors")


def error_uri(ctx: StageContext, stage: str) -> str:
    """Where a failed stage of this pipeline run records its error."""
    return join_uri(errors_uri(ctx), f"{stage}.json")


@contextmanager
def recording_errors(ctx: StageContext, storage: Storage, stage: str) -> Iterator[None]:
    """Run the body; on an exception write ``{stage, error, traceback}`` to :func:`error_uri`, re-raise."""
    try:
        yield
    except Exception as err:
        record = {"stage": stage, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(),
                  "time": time.time()}
        try:
            storage.write_bytes(error_uri(ctx, stage), json.dumps(record, indent=2).encode())
        finally:
            raise


@contextmanager
def stage_run(ctx: StageContext, stage: str) -> Iterator[Tracker]:
    """The stage's MLflow run, nested under the pipeline's parent; FAILED if the body raises."""
    if not ctx.tracking_uri:
        yield NullTracker()
        return
    tags = standard_tags(stage, ctx.pipeline_run_id or None)
    with MlflowTracker.start(ctx.tracking_uri, ctx.experiment, run_name=stage, tags=tags,
                             parent_run_id=ctx.parent_run_id or None,
                             artifact_location=default_artifact_location(ctx.tracking_uri, ctx.run_root)) as tracker:
        yield tracker


def file_digest(folder: str | Path) -> str:
    """SHA-256 over a local folder's relative file paths and bytes (or one file's bytes)."""
    root = Path(folder)
    digest = hashlib.sha256()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for path in files:
        digest.update(str(path.relative_to(root) if path != root else path.name).encode() + b"\0")
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def cache_key(stage: str, params: Mapping[str, Any], inputs: Mapping[str, str | Path] | None = None) -> str:
    """Content hash of a stage's parameters, input artifacts and code."""
    material = {
        "stage": stage,
        "params": params,
        "inputs": {name: file_digest(path) for name, path in sorted((inputs or {}).items())},
        "code": code_digest(REPO_ROOT),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()


def run_cached(ctx: StageContext, storage: Storage, stage: str, key: str, out_dir: str | Path,
               work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``work()`` (which fills ``out_dir`` and returns a JSON-able result), or its cached outputs.

    The result gains ``"cached": True`` on a hit (outputs copied into ``out_dir``), else False.
    """
    entry = join_uri(ctx.run_root, "cache", stage, key)
    done = join_uri(entry, "result.json")
    out = Path(out_dir)
    if ctx.use_cache and storage.exists(done):
        if storage.list(join_uri(entry, "outputs")):
            storage.download_dir(join_uri(entry, "outputs"), out)
        return {**json.loads(storage.read_bytes(done)), "cached": True}
    result = work()
    if ctx.use_cache:
        if out.is_dir() and any(out.iterdir()):
            storage.upload_dir(out, join_uri(entry, "outputs"))
        storage.write_bytes(done, json.dumps(result, indent=2, default=str).encode())
    return {**result, "cached": False}


def mark_cached(tracker: Tracker, result: Mapping[str, Any]) -> None:
    """Tag the stage run with whether its outputs came from the cache."""
    tracker.set_tags({TAG_CACHED: str(bool(result.get("cached"))).lower()})

