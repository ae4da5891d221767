"""Embed an image pool with any callable ``uint8 images -> features``, batched and resumable.

Why pluggable: curation quality hinges on the descriptor. The normal path is a dinoflow backbone
(:func:`backbone_embedder`); :func:`pixel_embedder` (downsampled, per-image standardised pixels)
needs no weights and finds near-copies (crops, resizes, re-encodes, colour shifts) well, but it
knows nothing of semantics, so it suits dedup tests and benchmarks, not retrieval.

Layout under ``out_uri`` (each object written atomically)::

    meta.json                     what the parts are of: checked on resume (:func:`embed_dataset`)
    part-00000.npy                (n, F) float16/float32, rows in dataset order, bad images left out
    part-00000.json               {"ids": [...], "bad": [...]}: written last, marks the part done
    index.json                    {"parts", "count", "dim", "dtype", "bad"}: written when all are done

Part ``p`` covers dataset indices ``[p * part_size, (p + 1) * part_size)``; a rerun skips every
part whose ``.json`` exists, so an interrupted job resumes at part granularity.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from dinoflow.progress import progress
from dinoflow.storage import Storage, claim, join_uri
from trainer.data.datasets import (BadImageTracker, FashionMnistDataset, ImageListDataset, Sample, collate_samples,
                                   keys_sha256)
from trainer.data.shards import ShardDataset

Embedder = Callable[[Tensor], Tensor | np.ndarray]
"""uint8 images ``(B, 3, S, S)`` -> features ``(B, F)``. One with weights carries their sha256 as
``weights_sha256`` (:func:`backbone_embedder`'s do): its name alone does not say which weights."""

EmbeddingDtype = Literal["float16", "float32"]


def pixel_embedder(side: int = 16) -> Embedder:
    """Pixels downsampled to ``side x side`` (area average), each channel standardised per image.

    Why standardised per image and channel: a brightness, contrast or colour-balance shift is an
    affine map per channel, which the standardisation undoes; the area average washes out JPEG
    artefacts and resampling differences, and a mild crop moves each cell only a little.
    """

    def embed(images: Tensor) -> Tensor:
        x = images.float()  # (B, 3, S, S)
        x = F.adaptive_avg_pool2d(x, side)  # (B, 3, side, side)
        x = x - x.mean(dim=(2, 3), keepdim=True)
        x = x / (x.std(dim=(2, 3), keepdim=True) + 1e-3)
        return x.flatten(1)  # (B, 3 * side * side)

    embed.__name__ = f"pixels{side}"
    return embed


def backbone_embedder(model: nn.Module, size: int = 224, patch_size: int | None = None,
                      device: str | torch.device | None = None, amp_dtype: torch.dtype | None = None
                      ) -> Embedder:
    """The final normalised CLS token of a dinoflow backbone, on images resized to ``size``; it
    carries the backbone's digest (``weights_sha256``), so a resumed pass never mixes two backbones."""
    from evaluators.feature_parts import backbone_digest
    from evaluators.features import extract_features, to_model_input

    patch = patch_size or int(getattr(model, "patch_size", 14))
    target = torch.device(device) if device is not None else next(model.parameters()).device

    def embed(images: Tensor) -> Tensor:
        inputs = to_model_input(torch.as_tensor(images).to(target), size=size, patch_size=patch)  # resized there
        features, _ = extract_features(model, inputs, batch_size=len(inputs), device=target, amp_dtype=amp_dtype)
        return features

    embed.__name__ = f"backbone{size}"
    embed.weights_sha256 = backbone_digest(model)  # type: ignore[attr-defined]
    return embed


@dataclass(frozen=True)
class Embeddings:
    """Row ``i`` of ``vectors`` ``(N, F)`` is the image ``ids[i]``; ``bad`` lists undecodable ids."""

    ids: list[str]
    vectors: np.ndarray
    bad: list[str]


def embed_images(images: Tensor | np.ndarray, embedder: Embedder, batch_size: int = 256) -> np.ndarray:
    """In-memory uint8 images ``(N, 3, S, S)`` -> float32 features ``(N, F)``."""
    pixels = torch.as_tensor(images)
    parts = [np.asarray(torch.as_tensor(embedder(chunk)).float().cpu()) for chunk in pixels.split(batch_size)]
    return np.concatenate(parts).astype(np.float32)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def pool_identity(dataset: Dataset[Sample]) -> dict[str, Any]:
    """Which images a pass over ``dataset`` embeds, known without decoding any: every image's key in
    order (sha256) and the size each is loaded at.

    Why keys: two pools of one size are otherwise alike, and a resumed pass would hand back the
    other pool's embeddings. A shard set's images are named by their shard and byte range (what
    :meth:`~trainer.data.shards.ShardDataset.location` tells; its member names are not public).
    Raises TypeError for another kind of dataset, whose keys cannot be known without decoding."""
    if isinstance(dataset, ImageListDataset):
        keys: Iterable[str] = (str(key) for key in dataset.keys)
    elif isinstance(dataset, ShardDataset):
        keys = (f"{shard}@{offset}+{size}" for shard, offset, size in map(dataset.location, range(len(dataset))))
    elif isinstance(dataset, FashionMnistDataset):
        keys = (f"{dataset.root_uri}#{dataset.split}/{index}" for index in range(len(dataset)))  # its Sample.key
    else:
        raise TypeError(f"cannot tell which images a {type(dataset).__name__} holds without decoding them; "
                        "embed an ImageListDataset (or ImageFolderDataset), ShardDataset or FashionMnistDataset")
    return {"load_size": dataset.load_size, "keys_sha256": keys_sha256(keys)}


def embed_dataset(
    dataset: Dataset[Sample],
    embedder: Embedder,
    out_uri: str,
    storage: Storage,
    batch_size: int = 64,
    part_size: int = 4096,
    dtype: EmbeddingDtype = "float16",
    num_workers: int = 0,
    max_bad_fraction: float = 0.05,
    embedder_name: str | None = None,
) -> Embeddings:
    """Embed every image of ``dataset`` into parts under ``out_uri``; resumes finished parts.

    ``meta.json`` records what the parts are of: the images (:func:`pool_identity`), the embedder's
    name and weights (``weights_sha256``, when it carries one), the part size and dtype. Raises
    ValueError when ``out_uri`` holds parts of anything else (:func:`~dinoflow.storage.claim`, naming
    where they differ: nothing is mixed in, nothing deleted), or when more than ``max_bad_fraction``
    images cannot be decoded.
    """
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
    if part_size < 1 or batch_size < 1:
        raise ValueError(f"part_size and batch_size must be >= 1, got {part_size}, {batch_size}")
    count = len(dataset)  # type: ignore[arg-type]
    meta = {"count": count, "part_size": part_size, "dtype": dtype,
            "embedder": embedder_name or getattr(embedder, "__name__", type(embedder).__name__),
            "weights_sha256": getattr(embedder, "weights_sha256", None), **pool_identity(dataset)}
    claim(storage, out_uri, meta, "embeddings of another run", file="meta.json")
    parts = -(-count // part_size)
    tracker = BadImageTracker(max_bad_fraction)
    for part in progress(range(parts), desc="embed", total=parts, unit="part"):
        done_uri = join_uri(out_uri, f"part-{part:05d}.json")
        if storage.exists(done_uri):  # finished: its bad images still count towards the limit
            listing = json.loads(storage.read_bytes(done_uri))
            tracker.add(len(listing["ids"]), listing["bad"])
            continue
        indices = range(part * part_size, min(count, (part + 1) * part_size))
        loader = DataLoader(Subset(dataset, list(indices)), batch_size=batch_size, num_workers=num_workers,
                            collate_fn=collate_samples)
        ids: list[str] = []
        bad: list[str] = []
        vectors: list[np.ndarray] = []
        for batch in loader:
            tracker.update(batch)
            tracker.check()
            bad.extend(batch.bad_keys)
            if not batch.keys:
                continue
            vectors.append(np.asarray(torch.as_tensor(embedder(batch.images)).float().cpu()))
            ids.extend(batch.keys)
        array = np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float32)
        storage.write_bytes(join_uri(out_uri, f"part-{part:05d}.npy"), _npy_bytes(array.astype(dtype)))
        storage.write_bytes(done_uri, json.dumps({"ids": ids, "bad": bad}).encode())
    tracker.check(final=True)
    embeddings = load_embeddings(out_uri, storage, parts)
    storage.write_bytes(join_uri(out_uri, "index.json"), json.dumps({
        "parts": parts, "count": len(embeddings.ids), "dim": int(embeddings.vectors.shape[1]),
        "dtype": dtype, "bad": embeddings.bad}).encode())
    return embeddings


def load_embeddings(out_uri: str, storage: Storage, parts: int | None = None) -> Embeddings:
    """Read the parts written by :func:`embed_dataset` (all of them, per ``index.json``), each
    copied into one float32 array as it is read: the parts are never all held beside it (a pool of
    10M images: 15 GB of float32, where gathering the float16 parts, concatenating and converting
    them took 31)."""
    if parts is None:
        parts = int(json.loads(storage.read_bytes(join_uri(out_uri, "index.json")))["parts"])
    listings = [json.loads(storage.read_bytes(join_uri(out_uri, f"part-{part:05d}.json"))) for part in range(parts)]
    ids = [key for listing in listings for key in listing["ids"]]
    bad = [key for listing in listings for key in listing["bad"]]
    if not ids:
        raise ValueError(f"no embeddings under {out_uri}: every image was bad")
    vectors: np.ndarray | None = None
    start = 0
    for part, listing in enumerate(progress(listings, desc="load embeddings", unit="part")):
        if not listing["ids"]:
            continue
        block = np.load(io.BytesIO(storage.read_bytes(join_uri(out_uri, f"part-{part:05d}.npy"))))
        if len(block) != len(listing["ids"]):
            raise ValueError(f"{join_uri(out_uri, f'part-{part:05d}.npy')} holds {len(block)} vectors for "
                             f"{len(listing['ids'])} images: the part is damaged, delete it and its .json to redo it")
        if vectors is None:
            vectors = np.empty((len(ids), block.shape[1]), np.float32)
        vectors[start : start + len(block)] = block
        start += len(block)
    assert vectors is not None
    return Embeddings(ids=ids, vectors=vectors, bad=bad)


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32, contiguous, as faiss wants them).

    Already-unit float32 rows come back as the same array, not a copy: at a million 384-d rows
    every copy is 1.5 GB, and the index, dedup and retrieval each normalise their input.
    """
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.sqrt(np.einsum("nf,nf->n", x, x))[:, None]  # (N, 1), without an (N, F) temporary
    if x is vectors and np.allclose(norms, 1.0, rtol=0, atol=1e-5):
        return x
    return x / np.maximum(norms, 1e-12)


def select(embeddings: Embeddings, keep: Sequence[int]) -> Embeddings:
    """The rows ``keep`` of an embedding (same order)."""
    rows = np.asarray(keep, dtype=np.int64)
    return Embeddings(ids=[embeddings.ids[i] for i in rows], vectors=embeddings.vectors[rows], bad=embeddings.bad)
