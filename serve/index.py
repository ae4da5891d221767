"""A faiss index of a folder of images or of tar shards, for ``/v1/neighbours``.

Why CLS features, L2-normalised, in an exact ``IndexFlatIP``: the inner product is then the
cosine, as in :mod:`evaluators.retrieval`, and an exact index needs no training and no tuning
for the collections this serves (up to a few million images fit in memory). Images are decoded by
the datasets of :mod:`trainer.data.datasets` and cropped as :func:`~serve.model.decode_upload`
prepares an upload, so an indexed image and the same file uploaded to the service give the same
pixels and the same feature.

On storage an index is a folder: ``index.faiss`` (faiss' own serialisation) and ``index.json``
(the keys, i.e. each vector's image URI, in order, plus the model, the fingerprint of its weights,
the image size and pixel transform it was built with, and the images that could not be decoded).
Why the fingerprint and the transform: another model of the same width, or the same model on
pixels prepared otherwise, would answer with neighbours that mean nothing, and nothing would say
so; :func:`load_index` refuses such an index, naming what differs and how to rebuild it.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from dinoflow.progress import progress
from dinoflow.storage import Storage, join_uri
from serve.model import ServedModel, centre_crop, load_size

SourceKind = Literal["folder", "shards"]
INDEX_FILE = "index.faiss"
META_FILE = "index.json"


def build_index(model: ServedModel, source_uri: str, out_uri: str, kind: SourceKind = "folder",
                storage: Storage | None = None, batch_size: int = 64, num_workers: int = 0) -> dict[str, Any]:
    """Embed every image of ``source_uri`` and write the index folder at ``out_uri``; returns its metadata.

    Args:
        model: the served model (the index is only valid with the same model).
        source_uri: a folder of images (recursively) or a folder of ``*.tar`` shards (webdataset layout).
        out_uri: the index folder to write.
        kind: ``folder`` or ``shards``: how to read ``source_uri``.
        batch_size: images per forward pass (on the model's device).
        num_workers: image decoding processes.
    """
    import faiss
    from torch.utils.data import DataLoader

    from trainer.data.datasets import ImageFolderDataset, collate_samples
    from trainer.data.shards import ShardDataset

    storage = storage or Storage()
    side = load_size(model.image_size, model.whole_images)
    if kind == "folder":
        dataset: Any = ImageFolderDataset(storage, source_uri, load_size=side)
    elif kind == "shards":
        dataset = ShardDataset(storage, source_uri, load_size=side)
    else:
        raise ValueError(f"unknown source kind {kind!r}; allowed: folder, shards")
    keys: list[str] = []
    skipped: list[str] = []
    index = None  # each batch's vectors added as they come: no second copy of the pool's beside the index
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_samples)
    for batch in progress(loader, desc="index", total=len(loader), unit="batch"):
        skipped += batch.bad_keys
        if not batch.keys:
            continue
        features = model.embed(centre_crop(batch.images, model.image_size))["cls"]  # (B, D)
        vectors = np.ascontiguousarray(F.normalize(features, dim=-1).numpy(), dtype=np.float32)
        if index is None:
            index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        keys += batch.keys
    if index is None:
        raise ValueError(f"no decodable image under {source_uri} ({len(skipped)} bad)")
    meta = {"model": model.name, **index_fields(model), "metric": "cosine", "source": source_uri, "kind": kind,
            "count": len(keys), "keys": keys, "skipped": skipped}
    storage.write_bytes(join_uri(out_uri, INDEX_FILE), faiss.serialize_index(index).tobytes())
    storage.write_bytes(join_uri(out_uri, META_FILE), json.dumps(meta, indent=1).encode())
    return meta


@dataclass
class NeighbourIndex:
    """A loaded index: the faiss index, the image keys and the build metadata."""

    index: Any
    keys: list[str]
    meta: dict[str, Any]
    storage: Storage

    def __len__(self) -> int:
        return len(self.keys)

    def search(self, features: torch.Tensor, k: int) -> list[list[dict[str, Any]]]:
        """Top-``k`` neighbours (``rank``, ``id``, ``key``, ``score`` = cosine) of each feature row ``(Q, D)``."""
        queries = np.ascontiguousarray(F.normalize(features.float(), dim=-1).numpy(), dtype=np.float32)
        scores, ids = self.index.search(queries, min(k, len(self.keys)))
        return [[{"rank": rank, "id": int(i), "key": self.keys[int(i)], "score": float(s)}
                 for rank, (i, s) in enumerate(zip(row_ids, row_scores)) if i >= 0]
                for row_ids, row_scores in zip(ids, scores)]

    def image_bytes(self, item: int) -> bytes:
        """The encoded image of entry ``item`` (a file, or a member of a tar shard)."""
        key = self.keys[item]
        if "#" in key and self.meta.get("kind") == "shards":
            shard, member = key.split("#", 1)
            with tarfile.open(fileobj=io.BytesIO(self.storage.read_bytes(shard))) as tar:
                handle = tar.extractfile(member)
                if handle is None:
                    raise FileNotFoundError(f"{member} is not a file in {shard}")
                return handle.read()
        return self.storage.read_bytes(key)


def index_fields(model: ServedModel) -> dict[str, Any]:
    """What an index's vectors depend on: the feature width, the image size, the pixel transform and
    the weights (their SHA-256, :func:`trainer.distill.fingerprint`: a pass over every weight, a few
    seconds for ViT-g, once when an index is built or loaded)."""
    from trainer.distill import fingerprint

    return {"dim": model.embed_dim, "image_size": model.image_size, "transform": model.transform,
            "backbone_sha256": fingerprint(model.backbone)}


def load_index(uri: str, model: ServedModel | None = None, storage: Storage | None = None) -> NeighbourIndex:
    """Read an index folder; with ``model``, refuse it unless it was built with the same weights,
    feature size, image size and pixel transform (:func:`index_fields`; an index from before one of
    them was recorded is refused too), naming each difference and the command that rebuilds it."""
    import faiss

    storage = storage or Storage()
    meta = json.loads(storage.read_bytes(join_uri(uri, META_FILE)))
    index = faiss.deserialize_index(np.frombuffer(storage.read_bytes(join_uri(uri, INDEX_FILE)), dtype=np.uint8))
    if index.ntotal != len(meta["keys"]):
        raise ValueError(f"{uri}: the faiss index holds {index.ntotal} vectors but index.json {len(meta['keys'])} keys")
    if model is not None:
        served = index_fields(model)
        differ = [f"{name}={meta.get(name, '(not recorded: built by an older dinoflow)')} (served: {value})"
                  for name, value in served.items() if meta.get(name) != value]
        if differ:
            raise ValueError(f"{uri}: its vectors are not the served model's features: {'; '.join(differ)} (built "
                             f"with model {meta['model']}); rebuild it for {model.name}: dinoflow index build "
                             f"--model {model.name} --image-size {model.image_size} --images {meta['source']} "
                             f"--kind {meta['kind']} --out {uri}")
    return NeighbourIndex(index=index, keys=list(meta["keys"]), meta=meta, storage=storage)
