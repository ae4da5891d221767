"""One curation run: embed -> deduplicate -> decontaminate -> retrieve -> balance -> shards + report.

Outputs under ``out_uri``::

    embeddings/pool/, embeddings/eval-<i>/, embeddings/seeds-<i>/   resumable parts (curation.embed)
    shards/shard-*.tar, shards/manifest.jsonl
    report.json                          counts per step, seconds per step, thresholds, the index built,
                                         entropies
    grids/kept.png, grids/removed.png, grids/duplicate_groups.png, grids/retrieved.png (with seeds)

Manifest records: ``id`` (the pool key), ``source`` (its URI), ``rule`` (why it was kept:
``dedup-representative``, ``retrieved-sample``, ``retrieved-cluster`` or ``balanced``),
``component`` (its duplicate component), ``clusters`` (its hierarchical k-means cluster per level,
bottom to top; [] when not balanced).

Retrieval runs when seed sets are given: the deduplicated, decontaminated pool is narrowed to the
images near the seeds (the seeds themselves are not copied into the shards). Balancing, when
asked for, then samples from what is left.

Tracking: counts and seconds per step go to the injected tracker as ``curation_*`` metrics, the
config as ``curation.*`` params, and ``report.json``, ``manifest.jsonl`` and the grids as
artifacts (staged through a local folder, so ``out_uri`` may be remote).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, get_args

import numpy as np
from torch.utils.data import Dataset

from curation.dedup import decontaminate, deduplicate
from curation.embed import Embedder, EmbeddingDtype, Embeddings, embed_dataset, l2_normalise
from curation.index import IndexConfig, SearchIndex, build_index
from curation.kmeans import LevelConfig, balanced_sample, entropy, hierarchical_kmeans
from curation.report import image_grid_png
from curation.retrieve import kmeans_clusters, retrieve_cluster, retrieve_nearest
from curation.shards import ImageBytesReader, source_uri, write_shards
from dinoflow.config_dump import flatten
from dinoflow.storage import Storage, join_uri
from dinoflow.tracking import NullTracker, Tracker
from trainer.data.datasets import ImageFolderDataset, Sample, decode_image
from trainer.data.shards import ShardDataset

RETRIEVE_MODES = ("sample", "cluster")


@dataclass(frozen=True)
class CurationConfig:
    """What to run; thresholds are cosine similarities of the embedder used.

    Retrieval (only with seed sets): ``retrieve_mode`` ``sample`` keeps the
    ``retrieve_per_seed`` nearest kept pool images of each seed image; ``cluster`` runs k-means
    with ``retrieve_clusters`` clusters (0: about ``sqrt(kept)``) over the kept pool and keeps up
    to ``retrieve_per_seed`` images of each seed's cluster, those nearest the seed.
    """

    # the pixel embedder's (no weights) near-copies: on planted copies its removals score precision 1.00 / recall
    # 0.995 at 0.9, 0.51 / 0.73 at 0.6 (tests/curation/test_pipeline.py's pool); 0.6 is SSCD's, not shipped here
    dedup_threshold: float = 0.9
    dedup_k: int = 16
    decontaminate_threshold: float = 0.45
    retrieve_mode: str = "sample"
    retrieve_per_seed: int = 4
    retrieve_clusters: int = 0
    balance_target: int = 0  # 0: no balancing
    balance_levels: tuple[LevelConfig, ...] = ()
    balance_leaf: str = "closest"
    index: IndexConfig = field(default_factory=IndexConfig)
    load_size: int = 64
    batch_size: int = 64
    num_workers: int = 0  # decoding processes of the embedding pass
    part_size: int = 4096
    dtype: EmbeddingDtype = "float16"
    shard_size: int = 1000
    grid_examples: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("dedup_threshold", "decontaminate_threshold"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a cosine similarity in [-1, 1], got {getattr(self, name)}")
        if self.retrieve_mode not in RETRIEVE_MODES:
            raise ValueError(f"retrieve_mode must be one of {', '.join(RETRIEVE_MODES)}, got {self.retrieve_mode!r}")
        if self.retrieve_per_seed < 1 or self.retrieve_clusters < 0:
            raise ValueError(f"retrieve_per_seed must be >= 1 and retrieve_clusters >= 0, got "
                             f"{self.retrieve_per_seed}, {self.retrieve_clusters}")
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {self.batch_size}, {self.num_workers}")
        for name in ("dedup_k", "load_size", "part_size", "shard_size"):  # refused now, not after the embedding pass
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.grid_examples < 0:
            raise ValueError(f"grid_examples must be >= 0 (0: empty grids), got {self.grid_examples}")
        if self.dtype not in get_args(EmbeddingDtype):
            raise ValueError(f"dtype must be one of {', '.join(get_args(EmbeddingDtype))}, got {self.dtype!r}")
        if self.balance_target < 0:
            raise ValueError(f"balance_target must be >= 0, got {self.balance_target}")
        if self.balance_target and not self.balance_levels:
            raise ValueError("balance_target > 0 needs balance_levels (e.g. clusters per level)")
        if self.balance_leaf not in ("closest", "random"):
            raise ValueError(f"balance_leaf must be 'closest' or 'random', got {self.balance_leaf!r}")


def open_pool(storage: Storage, uri: str, load_size: int) -> Dataset[Sample]:
    """A folder of images, or a folder of ``*.tar`` shards (webdataset layout) when it holds any."""
    if any(u.lower().endswith(".tar") for u in storage.list(uri, recursive=True)):
        return ShardDataset(storage, uri, load_size)
    return ImageFolderDataset(storage, uri, load_size)


def _embed(storage: Storage, uri: str, out_uri: str, embedder: Embedder, config: CurationConfig) -> Embeddings:
    return embed_dataset(open_pool(storage, uri, config.load_size), embedder, out_uri, storage,
                         config.batch_size, config.part_size, config.dtype, config.num_workers)


def _concat(sets: list[Embeddings]) -> Embeddings:
    return Embeddings(ids=[i for s in sets for i in s.ids], vectors=np.concatenate([s.vectors for s in sets]),
                      bad=[b for s in sets for b in s.bad])


def retrieve_around_seeds(index: SearchIndex, keep: np.ndarray, seeds: np.ndarray, config: CurationConfig
                          ) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Pool rows retrieved per seed (kept rows only, as ``config`` says) and what was done."""
    if config.retrieve_mode == "sample":
        per_seed = retrieve_nearest(index, seeds, config.retrieve_per_seed, allowed=keep)
        return per_seed, {"mode": "sample", "per_seed": config.retrieve_per_seed, "index": index.kind}
    kept = np.flatnonzero(keep)
    count = config.retrieve_clusters or max(1, round(np.sqrt(len(kept))))
    clusters = kmeans_clusters(index.vectors[kept], count, seed=config.seed)
    per_seed = retrieve_cluster(index.vectors[kept], clusters, seeds, config.retrieve_per_seed, seed=config.seed)
    return [kept[r] for r in per_seed], {"mode": "cluster", "per_seed": config.retrieve_per_seed, "clusters": count}


def run_curation(pool_uri: str, out_uri: str, storage: Storage, embedder: Embedder,
                 config: CurationConfig | None = None, eval_uris: tuple[str, ...] = (),
                 seed_uris: tuple[str, ...] = (), tracker: Tracker | None = None) -> dict[str, Any]:
    """Curate the pool at ``pool_uri`` into ``out_uri``; returns the report (also written).

    ``eval_uris``: evaluation sets whose near-copies leave the pool; ``seed_uris``: seed sets to
    retrieve around (none: keep the whole deduplicated pool); ``tracker``: where counts, params
    and artifacts go (default: nowhere).
    """
    config = config or CurationConfig()
    tracker = tracker or NullTracker()
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[step] = round(now - clock, 3)
        clock = now

    emb = _embed(storage, pool_uri, join_uri(out_uri, "embeddings", "pool"), embedder, config)
    report: dict[str, Any] = {"pool_uri": pool_uri, "eval_uris": list(eval_uris), "seed_uris": list(seed_uris),
                              "config": asdict(config), "seconds": seconds,
                              "counts": {"pool": len(emb.ids) + len(emb.bad), "bad_images": len(emb.bad),
                                         "embedded": len(emb.ids)}}
    counts = report["counts"]
    lap("embed")
    # 1. deduplicate within the pool (the index is kept for retrieval)
    index = build_index(emb.vectors, config.index)
    report["index"] = index.describe()
    dedup = deduplicate(index, config.dedup_threshold, config.dedup_k)
    keep = dedup.keep.copy()
    groups = dedup.groups()
    counts["after_dedup"] = int(keep.sum())
    report["duplicate_groups"] = len(groups)
    lap("dedup")
    # 2. decontaminate against evaluation sets
    contaminated = np.zeros(len(keep), bool)
    for i, uri in enumerate(eval_uris):
        evaluation = _embed(storage, uri, join_uri(out_uri, "embeddings", f"eval-{i}"), embedder, config)
        drop, _, _ = decontaminate(index.vectors, evaluation.vectors, config.decontaminate_threshold, config.index)
        contaminated |= drop
    keep &= ~contaminated
    counts["decontaminated"] = int((dedup.keep & contaminated).sum())
    counts["after_decontamination"] = int(keep.sum())
    lap("decontaminate")
    # 3. retrieve around seed sets
    rows = np.flatnonzero(keep)
    rule = "dedup-representative"
    seeds, per_seed = None, []
    if seed_uris:
        seeds = _concat([_embed(storage, uri, join_uri(out_uri, "embeddings", f"seeds-{i}"), embedder, config)
                         for i, uri in enumerate(seed_uris)])
        per_seed, report["retrieve"] = retrieve_around_seeds(index, keep, seeds.vectors, config)
        rows = np.unique(np.concatenate(per_seed)).astype(np.int64)
        rule = f"retrieved-{config.retrieve_mode}"
        counts["seeds"] = len(seeds.ids)
        counts["retrieved"] = len(rows)
        lap("retrieve")
    # 4. balance with hierarchical k-means
    clusters = np.zeros((len(emb.ids), 0), np.int64)
    if config.balance_target:
        hierarchy = hierarchical_kmeans(l2_normalise(emb.vectors[rows]), list(config.balance_levels), seed=config.seed)
        chosen = balanced_sample(hierarchy, config.balance_target, config.balance_leaf, config.seed)  # type: ignore[arg-type]
        paths = hierarchy.point_clusters()
        top = paths[:, -1]
        report["balance"] = {"top_cluster_entropy_before": entropy(top), "top_cluster_entropy_after": entropy(top[chosen]),
                             "top_clusters": int(top.max() + 1)}
        clusters = np.zeros((len(emb.ids), paths.shape[1]), np.int64)
        clusters[rows] = paths
        rows = rows[chosen]
        rule = "balanced"
        lap("balance")
    counts["curated"] = len(rows)
    # 5. write shards + manifest
    keys = [emb.ids[r] for r in rows]
    records = [{"id": emb.ids[r], "source": source_uri(emb.ids[r]), "rule": rule,
                "component": int(dedup.component[r]), "clusters": clusters[r].tolist()} for r in rows]
    storage.delete(join_uri(out_uri, "report.json"))  # an earlier run's: it must not outlive its shards in a crash
    report["shards"] = write_shards(keys, records, join_uri(out_uri, "shards"), storage, config.shard_size)
    lap("shards")
    # 6. grids
    reader = ImageBytesReader(storage)

    def image(key: str) -> np.ndarray:
        return decode_image(reader.read(key), config.load_size).numpy()  # type: ignore[union-attr]

    n = config.grid_examples
    removed = np.flatnonzero(~np.isin(np.arange(len(emb.ids)), rows))
    grids = {"kept": [[image(emb.ids[r]) for r in rows[:n]]], "removed": [[image(emb.ids[r]) for r in removed[:n]]],
             "duplicate_groups": [[image(emb.ids[r]) for r in g[:n]] for g in groups[:n]]}
    if seeds is not None:  # each row: a seed, then what it retrieved
        grids["retrieved"] = [[image(seeds.ids[s]), *(image(emb.ids[r]) for r in per_seed[s][:n - 1])]
                              for s in range(min(n, len(seeds.ids)))]
    pngs = {f"grids/{name}.png": image_grid_png([r for r in images if r]) for name, images in grids.items()}
    for name, png in pngs.items():
        storage.write_bytes(join_uri(out_uri, name), png)
    lap("grids")
    report_json = json.dumps(report, indent=2).encode()
    storage.write_bytes(join_uri(out_uri, "report.json"), report_json)
    _track(tracker, config, report, {**pngs, "report.json": report_json},
           join_uri(out_uri, "shards", "manifest.jsonl"), storage)
    return report


def _track(tracker: Tracker, config: CurationConfig, report: dict[str, Any], files: dict[str, bytes],
           manifest_uri: str, storage: Storage) -> None:
    """Counts and seconds as metrics, the config as params, the report files and manifest as
    artifacts. The artifacts are staged in a temporary folder (``out_uri`` may be remote) that
    lives until the tracker has sent them or its flush timed out (a store down that long loses
    them, and the tracker counts the loss); a NullTracker records nothing, so nothing is staged."""
    tracker.log_params({**flatten(asdict(config), "curation."),
                        **{f"curation.index.built.{k}": v for k, v in report["index"].items()}})
    metrics = {f"curation_{k}": float(v) for k, v in report["counts"].items()}
    metrics.update({f"curation_seconds_{k}": float(v) for k, v in report["seconds"].items()})
    metrics.update({f"curation_{k}": float(v) for k, v in report.get("balance", {}).items()})
    tracker.log_metrics(metrics, step=0, force=True)
    if isinstance(tracker, NullTracker):
        return
    with tempfile.TemporaryDirectory() as scratch:
        staged = Path(scratch)
        for name, data in {**files, "manifest.jsonl": storage.read_bytes(manifest_uri)}.items():
            (staged / name).parent.mkdir(parents=True, exist_ok=True)
            (staged / name).write_bytes(data)
        tracker.log_artifact(staged)
        tracker.flush()
