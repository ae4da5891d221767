"""One curation run: embed -> deduplicate -> decontaminate -> balance -> shards + manifest + report.

Outputs under ``out_uri``::

    embeddings/pool/, embeddings/eval/   resumable embedding parts (see curation.embed)
    shards/shard-*.tar, shards/manifest.jsonl
    report.json                          counts per step, thresholds, index kinds, entropies
    grids/kept.png, grids/removed.png, grids/duplicate_groups.png

Manifest records: ``id`` (the pool key), ``source`` (its URI), ``rule`` (why it was kept:
``dedup-representative`` or ``balanced``), ``component`` (its duplicate component),
``clusters`` (its hierarchical k-means cluster per level, bottom to top; [] when not balanced).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from curation.dedup import decontaminate, deduplicate
from curation.embed import Embedder, EmbeddingDtype, embed_dataset, l2_normalise
from curation.kmeans import LevelConfig, balanced_sample, entropy, hierarchical_kmeans
from curation.report import image_grid_png
from curation.shards import ImageBytesReader, write_shards
from dinoflow.storage import Storage, join_uri
from trainer.data.datasets import ImageFolderDataset, Sample, ShardDataset, decode_image


@dataclass(frozen=True)
class CurationConfig:
    """What to run; thresholds are cosine similarities of the embedder used."""

    dedup_threshold: float = 0.6
    dedup_k: int = 16
    decontaminate_threshold: float = 0.45
    balance_target: int = 0  # 0: no balancing
    balance_levels: tuple[LevelConfig, ...] = ()
    balance_leaf: str = "closest"
    load_size: int = 64
    batch_size: int = 64
    part_size: int = 4096
    dtype: EmbeddingDtype = "float16"
    shard_size: int = 1000
    grid_examples: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("dedup_threshold", "decontaminate_threshold"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a cosine similarity in [-1, 1], got {getattr(self, name)}")
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


def run_curation(pool_uri: str, out_uri: str, storage: Storage, embedder: Embedder,
                 config: CurationConfig = CurationConfig(), eval_uris: tuple[str, ...] = ()) -> dict[str, Any]:
    """Curate the pool at ``pool_uri`` into ``out_uri``; returns the report (also written)."""
    pool = open_pool(storage, pool_uri, config.load_size)
    emb = embed_dataset(pool, embedder, join_uri(out_uri, "embeddings", "pool"), storage,
                        config.batch_size, config.part_size, config.dtype)
    report: dict[str, Any] = {"pool_uri": pool_uri, "config": asdict(config),
                              "counts": {"pool": len(pool), "bad_images": len(emb.bad), "embedded": len(emb.ids)}}
    # 1. deduplicate within the pool
    dedup = deduplicate(emb.vectors, config.dedup_threshold, config.dedup_k)
    keep = dedup.keep.copy()
    report["counts"]["after_dedup"] = int(keep.sum())
    report["duplicate_groups"] = len(dedup.groups())
    # 2. decontaminate against evaluation sets
    contaminated = np.zeros(len(keep), bool)
    for i, uri in enumerate(eval_uris):
        evaluation = embed_dataset(open_pool(storage, uri, config.load_size), embedder,
                                   join_uri(out_uri, "embeddings", f"eval-{i}"), storage,
                                   config.batch_size, config.part_size, config.dtype)
        drop, _, _ = decontaminate(emb.vectors, evaluation.vectors, config.decontaminate_threshold)
        contaminated |= drop
    keep &= ~contaminated
    report["counts"]["decontaminated"] = int((dedup.keep & contaminated).sum())
    report["counts"]["after_decontamination"] = int(keep.sum())
    # 3. balance with hierarchical k-means
    rows = np.flatnonzero(keep)
    rule = "dedup-representative"
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
    report["counts"]["curated"] = int(len(rows))
    # 4. write shards + manifest
    keys = [emb.ids[r] for r in rows]
    records = [{"id": emb.ids[r], "source": emb.ids[r].split("#", 1)[0], "rule": rule,
                "component": int(dedup.component[r]), "clusters": clusters[r].tolist()} for r in rows]
    report["shards"] = write_shards(keys, records, join_uri(out_uri, "shards"), storage, config.shard_size)
    # 5. grids
    n = config.grid_examples
    removed = np.flatnonzero(~np.isin(np.arange(len(emb.ids)), rows))
    grids = {"kept": [rows[:n]], "removed": [removed[:n]],
             "duplicate_groups": [g[:n] for g in dedup.groups()[:n]]}
    reader = ImageBytesReader(storage)
    for name, groups in grids.items():
        images = [[decode_image(reader.read(emb.ids[r]), config.load_size).numpy() for r in g]  # type: ignore[union-attr]
                  for g in groups if len(g)]
        storage.write_bytes(join_uri(out_uri, "grids", f"{name}.png"), image_grid_png(images))
    storage.write_bytes(join_uri(out_uri, "report.json"), json.dumps(report, indent=2).encode())
    return report
