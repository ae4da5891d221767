"""Stage ``curate``: a raw image pool into deduplicated (and optionally balanced) training shards.

Calls :func:`curation.pipeline.run_curation` and hands the pretrain stage what to read:
``("shards", <out>/shards)``. An empty ``pool_uri`` skips curation: the stage passes the fallback
data on (the ingested Fashion-MNIST) with no MLflow run and no work, so a pipeline without a pool
costs one short task. Output folder: ``<run_root>/curated/<key>`` (``key``: a content hash of the
pool's listing, the settings and the code), holding ``shards/``, ``report.json`` (written last:
a folder holding it is complete and is reused) and the embedding parts, so a killed task rerun
with the same inputs resumes at the embedding part it reached.

Embedder: the backbone in ``embed_weights`` (path or URI: a ``.safetensors`` file, a run folder,
Meta's released ``.pth`` or a Hugging Face folder), else downsampled
pixels, which find near-copies but know nothing of semantics (fit for dedup, not for balancing
by concept).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING

from components.stage import StageContext, cache_key, mark_cached, recording_errors, stage_run, storage_from_env
from dinoflow.storage import Storage, join_uri

if TYPE_CHECKING:  # imported where used: a skipped curation (no pool) is a task that never loads torch
    from curation.embed import Embedder
    from curation.kmeans import LevelConfig

PIXEL_SIDE = 6  # the pixel embedder's grid, as the CLI's `dinoflow curate` without --weights


def balance_levels(clusters: list[int]) -> tuple[LevelConfig, ...]:
    """Hierarchical k-means levels, bottom to top, from clusters per level (e.g. ``[1000, 100]``):
    plain k-means at the bottom, resampling k-means (10 steps, 5 points per centroid) above."""
    from curation.kmeans import LevelConfig

    return tuple(LevelConfig(int(c), resampling_steps=0 if i == 0 else 10, sample_size=1 if i == 0 else 5)
                 for i, c in enumerate(clusters))


def make_embedder(embed_weights: str, storage: Storage) -> Embedder:
    """The backbone in ``embed_weights`` (any layout :func:`~trainer.models.hub.locate_weights` finds
    from the path, e.g. Meta's released ``.pth``), or pixels when it is empty."""
    from curation.embed import backbone_embedder, pixel_embedder

    if not embed_weights:
        return pixel_embedder(PIXEL_SIDE)
    from trainer.models.hub import load_backbone

    return backbone_embedder(load_backbone(embed_weights, "auto", storage))


def run_curate_stage(ctx: StageContext, pool_uri: str, eval_uris: list[str], dedup_threshold: float,
                     decontaminate_threshold: float, balance_target: int, balance_clusters: list[int],
                     embed_weights: str, fallback_kind: str, fallback_uri: str) -> tuple[str, str]:
    """Curate (or reuse a finished curation, or skip); returns ``(data kind, data URI)`` for pretrain."""
    if not pool_uri:
        if not fallback_uri:
            with recording_errors(ctx, storage_from_env(), "curate"):
                raise ValueError("no training images: give the pipeline pool_uri (images to curate) or "
                                 "data_source (Fashion-MNIST)")
        return fallback_kind, fallback_uri
    from curation.pipeline import CurationConfig, run_curation

    storage = storage_from_env()
    with recording_errors(ctx, storage, "curate"), stage_run(ctx, "curate") as tracker:
        config = CurationConfig(dedup_threshold=dedup_threshold, decontaminate_threshold=decontaminate_threshold,
                                balance_target=balance_target, balance_levels=balance_levels(balance_clusters))
        pool = sorted(storage.list(pool_uri, recursive=True))
        if not pool:
            raise FileNotFoundError(f"the image pool {pool_uri} is empty or missing")
        embedder = make_embedder(embed_weights, storage)
        # keyed by the weights themselves, not their path: a path (an alias's download, a file
        # overwritten in place) can hold other weights from one run to the next
        key = cache_key("curate", {"pool": pool, "config": asdict(config), "eval_uris": eval_uris,
                                   "embed_weights": getattr(embedder, "weights_sha256", None)})
        out = join_uri(ctx.run_root, "curated", key[:20])
        done = join_uri(out, "report.json")
        cached = ctx.use_cache and storage.exists(done)
        report = json.loads(storage.read_bytes(done)) if cached else run_curation(
            pool_uri, out, storage, embedder, config, tuple(eval_uris))
        tracker.log_params({"pool_uri": pool_uri, "out": out, "embedder": embed_weights or f"pixels{PIXEL_SIDE}",
                            "dedup_threshold": dedup_threshold, "decontaminate_threshold": decontaminate_threshold,
                            "balance_target": balance_target, "balance_clusters": balance_clusters})
        mark_cached(tracker, {"cached": cached})
        tracker.log_metrics({f"curation_{k}": float(v) for k, v in report["counts"].items()}, step=0, force=True)
    return "shards", join_uri(out, "shards")
