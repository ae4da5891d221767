"""Stage ``ingest``: copy Fashion-MNIST into the pipeline's storage.

Fashion-MNIST's four IDX files go from ``source`` to ``<run_root>/data/fashion-mnist`` (atomic
puts; files already there with the same size are kept), so every later stage reads the
pipeline's own copy, on a laptop or in a bucket. An empty ``source`` skips it (no MLflow run, no
work): a pipeline that trains on a pool of its own (``pool_uri``) and evaluates on its own labels
(``eval_data_uri``) needs no Fashion-MNIST.
"""

from __future__ import annotations

from components.stage import StageContext, recording_errors, stage_run, storage_from_env
from dinoflow.storage import join_uri
from trainer.data.fashion_mnist import copy_fashion_mnist


def run_ingest(ctx: StageContext, source: str) -> str:
    """Returns the URI of the stored copy ("" when ``source`` is empty)."""
    if not source:
        return ""
    storage = storage_from_env()
    with recording_errors(ctx, storage, "ingest"), stage_run(ctx, "ingest") as tracker:
        destination = join_uri(ctx.run_root, "data", "fashion-mnist")
        storage.make_bucket(destination)
        written = copy_fashion_mnist(storage, source, destination)
        tracker.log_params({"source": source, "destination": destination, "files": len(written)})
    return destination
