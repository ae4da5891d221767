"""Instance retrieval on frozen features: global descriptors, faiss search, revisited Oxford/Paris
mAP, AmsterTime's mAP.

Descriptors are the CLS token or GeM over the patch tokens (``(mean x^p)^(1/p)`` per channel of
the ReLU-clamped tokens, p = 3), optionally both concatenated, L2-normalised so that the inner
product of faiss' exact ``IndexFlatIP`` is the cosine. The whole database is ranked for every
query, as the protocol requires, and scored by :func:`evaluators.dense_metrics.retrieval_map`.

The ground truth of revisited Oxford/Paris ships as a pickle (``gnd_roxford5k.pkl``); it is read
with an unpickler that admits no class or function but numpy's arrays (plain dicts, lists,
strings, numbers and arrays: :mod:`evaluators.pickles`), so a crafted file cannot run code. A JSON
file with the same structure works too. Its images (``<root>/jpg/<name>.jpg``) keep their aspect
ratio: the longer side is resized to the evaluation's size and each side rounded to a multiple of
the patch size, the queries first cropped to their box, as the protocol asks; they are decoded by a
DataLoader's workers and go through the backbone in batches of one shape (:func:`file_descriptors`).

AmsterTime (the original's other landmark benchmark) pairs an archival photograph of an Amsterdam
place (``<root>/old/<stem>.jpg``) with a street-level one of it today (``<root>/new/<stem>.png``),
the two under one file stem: a query's only positive is its pair, and :func:`pair_retrieval`
scores the ranks of the pairs (mAP: the mean of one over the pair's rank, within the first 128 as
AmsterTime's evaluation reads them), the old querying the new and the new the old, as its
evaluation's "All" does.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dinoflow.progress import progress
from dinoflow.storage import Storage, basename, join_uri
from evaluators.dense_metrics import QueryTruth
from evaluators.features import patch_sides, to_model_input, under_autocast
from evaluators.pickles import load_data_pickle
from trainer.data.datasets import IMAGE_EXTENSIONS, ProcessLocalStorage

Pooling = Literal["cls", "gem", "cls+gem"]


@torch.no_grad()
def global_descriptors(backbone: nn.Module, images: Tensor, pooling: Pooling = "cls", gem_p: float = 3.0,
                       batch_size: int = 64, amp_dtype: torch.dtype | None = None) -> Tensor:
    """L2-normalised descriptors ``(N, D)`` (``2D`` for ``cls+gem``) of model input ``(N, 3, H, W)``
    (``amp_dtype``: the backbone under autocast)."""
    if pooling not in ("cls", "gem", "cls+gem"):
        raise ValueError(f"unknown pooling {pooling!r}; allowed: cls, gem, cls+gem")
    device = next(backbone.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        with under_autocast(device, amp_dtype):
            features = backbone.forward_features(images[start : start + batch_size].to(device))
        parts = []
        if pooling in ("cls", "cls+gem"):
            parts.append(F.normalize(features["x_norm_clstoken"].float(), dim=-1))
        if pooling in ("gem", "cls+gem"):
            tokens = features["x_norm_patchtokens"].float().clamp(min=1e-6)
            parts.append(F.normalize(tokens.pow(gem_p).mean(dim=1).pow(1 / gem_p), dim=-1))
        out.append(F.normalize(torch.cat(parts, dim=-1), dim=-1).cpu())
    return torch.cat(out)


def rank_database(queries: Tensor, database: Tensor, k: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Every database index per query (or its ``k`` nearest: a large database's whole ranking would
    not fit), most similar first, with the similarities (faiss, exact)."""
    import faiss

    index = faiss.IndexFlatIP(database.shape[1])
    index.add(np.ascontiguousarray(database.numpy(), dtype=np.float32))
    similarity, ranking = index.search(np.ascontiguousarray(queries.numpy(), dtype=np.float32),
                                       min(k, len(database)) if k else len(database))
    return ranking, similarity


@dataclass(frozen=True)
class RevisitedDataset:
    """A retrieval set on disk: database and query image names and files, the ground truth, and
    the queries' boxes (revisited Oxford/Paris; None: whole queries)."""

    name: str
    images: list[str]
    queries: list[str]
    truths: list[QueryTruth]
    query_boxes: list[tuple[float, float, float, float]] | None
    image_files: list[str]
    query_files: list[str]


def load_revisited(storage: Storage, root: str, name: str) -> RevisitedDataset:
    """Read ``<root>/gnd_<name>.pkl`` (or ``.json``): keys ``imlist``, ``qimlist`` and ``gnd`` (one
    dict per query with ``easy``, ``hard``, ``junk`` and ``bbx``); images are ``<root>/jpg/<id>.jpg``."""
    pkl, js = join_uri(root, f"gnd_{name}.pkl"), join_uri(root, f"gnd_{name}.json")
    if storage.exists(pkl):
        raw = load_data_pickle(storage.read_bytes(pkl))
    elif storage.exists(js):
        raw = json.loads(storage.read_bytes(js))
    else:
        raise FileNotFoundError(f"no ground truth for {name!r}: expected {pkl} or {js}")
    try:
        images, queries, gnd = [str(n) for n in raw["imlist"]], [str(n) for n in raw["qimlist"]], list(raw["gnd"])
        truths = [QueryTruth(*([int(i) for i in g[kind]] for kind in ("easy", "hard", "junk"))) for g in gnd]
        boxes = [tuple(float(v) for v in g["bbx"]) for g in gnd]
    except (KeyError, TypeError) as err:
        raise ValueError(f"{pkl}: not a revisited Oxford/Paris ground truth ({err!r})") from None
    if len(truths) != len(queries):
        raise ValueError(f"{name}: {len(queries)} queries but {len(truths)} ground-truth entries")
    for q, truth in enumerate(truths):
        indices = [*truth.easy, *truth.hard, *truth.junk]
        if indices and (min(indices) < 0 or max(indices) >= len(images)):
            raise ValueError(f"{name}: query {q} points outside the {len(images)} database images")
    files = [[join_uri(root, "jpg", f"{image}.jpg") for image in names] for names in (images, queries)]
    return RevisitedDataset(name, images, queries, truths, boxes, *files)  # type: ignore[arg-type]


def load_amstertime(storage: Storage, root: str) -> RevisitedDataset:
    """AmsterTime's pairs as released: an archival photo ``<root>/old/<stem>.jpg`` and today's
    street view ``<root>/new/<stem>.png``, paired by file stem (any image extension); the old are
    the queries and the new the database, in stem order, a query's only positive its pair (the
    ``easy`` list, no hard or junk)."""
    stems: dict[str, dict[str, str]] = {}
    for side in ("old", "new"):
        found: dict[str, str] = {}
        for uri in storage.list(join_uri(root, side)):
            name = basename(uri)
            if name.lower().endswith(IMAGE_EXTENSIONS):
                stem = name.rsplit(".", 1)[0]
                if stem in found:
                    raise ValueError(f"AmsterTime at {root}: {side}/ holds two images of stem {stem!r} "
                                     f"({found[stem]}, {name}): a pair is one image on each side")
                found[stem] = name
        stems[side] = found
    if not stems["old"]:
        raise FileNotFoundError(f"no AmsterTime queries: expected images in {join_uri(root, 'old')} "
                                f"({', '.join(IMAGE_EXTENSIONS)}), their pairs under the same stems in new/")
    unpaired = sorted(set(stems["old"]).symmetric_difference(stems["new"]))
    if unpaired:
        raise ValueError(f"AmsterTime at {root}: {len(unpaired)} images without a pair of the same stem in the other "
                         f"of old/ and new/ (first stems: {', '.join(unpaired[:3])})")
    order = sorted(stems["old"])
    queries, images = ([stems[side][stem] for stem in order] for side in ("old", "new"))
    return RevisitedDataset("amstertime", images, queries, [QueryTruth([i], [], []) for i in range(len(order))], None,
                            [join_uri(root, "new", name) for name in images],
                            [join_uri(root, "old", name) for name in queries])


AMSTERTIME_CUTOFF = 128  # the ranks AmsterTime's evaluation reads (its published figures' ``--k 128``)


def pair_retrieval(rankings: np.ndarray, cutoff: int = 0) -> dict[str, float]:
    """Scores of rankings ``(Q, N)`` where query ``i``'s only positive is database image ``i % N``
    (both directions of a paired set stacked: ``N`` queries one way, then ``N`` the other): mAP
    (with one positive, a query's AP is one over the positive's 1-based rank; 0 past ``cutoff``
    ranks where one is given, as AmsterTime's evaluation reads only its first ``k``) and recall at
    1 and 5 (the share of queries whose pair is among the first k)."""
    pairs = np.arange(len(rankings)) % rankings.shape[1]
    ranks = np.argmax(rankings == pairs[:, None], axis=1)  # 0-based
    precision = np.where(ranks < cutoff, 1.0 / (ranks + 1), 0.0) if cutoff else 1.0 / (ranks + 1)
    return {"map": float(np.mean(precision)), "recall_at_1": float(np.mean(ranks < 1)),
            "recall_at_5": float(np.mean(ranks < 5))}


Box = tuple[float, float, float, float]


class RevisitedImages(Dataset[Tensor]):
    """Images at ``uris`` as uint8 ``(3, H, W)``: cropped to ``boxes[i]`` (``x1, y1, x2, y2``
    pixels) when given, the longer side resized to ``size`` (bicubic), each side rounded to a
    multiple of ``patch`` (at least one patch)."""

    def __init__(self, storage: Storage, uris: list[str], size: int, patch: int,
                 boxes: list[Box] | None = None) -> None:
        if size < patch:
            raise ValueError(f"image size {size} is below the patch size {patch}")
        self._storage = ProcessLocalStorage(storage)
        self.uris, self.size, self.patch, self.boxes = uris, size, patch, boxes

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, index: int) -> Tensor:
        with Image.open(io.BytesIO(self._storage.get().read_bytes(self.uris[index]))) as image:
            image = image.convert("RGB")
            if self.boxes is not None:
                x1, y1, x2, y2 = self.boxes[index]
                image = image.crop((max(0, round(x1)), max(0, round(y1)), min(image.width, round(x2)),
                                    min(image.height, round(y2))))
            scale = self.size / max(image.size)
            width, height = patch_sides((side * scale for side in image.size), self.patch)
            pixels = np.array(image.resize((width, height), Image.BICUBIC))
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


SHAPE_BATCH = 32  # images of one shape described together
MAX_HELD = 128  # images held waiting for others of their shape; beyond it the fullest shape goes through


def file_descriptors(backbone: nn.Module, storage: Storage, files: list[str], size: int, what: str,
                     boxes: list[Box] | None = None, pooling: Pooling = "cls", amp_dtype: torch.dtype | None = None,
                     num_workers: int = 0, batch_size: int = SHAPE_BATCH, max_held: int = MAX_HELD) -> Tensor:
    """:func:`global_descriptors` ``(N, D)`` of the images at ``files`` (:class:`RevisitedImages` at
    ``size``, cropped to ``boxes`` when given), in their order. Their shapes vary, so each is held
    until ``batch_size`` images of its shape have come and they go through the backbone together (at
    most ``max_held`` held, the most numerous shape's going through beyond it; the rest at the end): a
    GPU describes the Met's 400k images in batches, not one by one."""
    patch = int(backbone.patch_size)
    device = next(backbone.parameters()).device
    loader = DataLoader(RevisitedImages(storage, files, size, patch, boxes), batch_size=1, num_workers=num_workers)
    held: dict[tuple[int, ...], list[tuple[int, Tensor]]] = {}
    described: dict[int, Tensor] = {}

    def describe(shape: tuple[int, ...]) -> None:
        indices, images = zip(*held.pop(shape))
        out = global_descriptors(backbone, to_model_input(torch.stack(images).to(device), patch_size=patch), pooling,
                                 batch_size=batch_size, amp_dtype=amp_dtype)
        for index, descriptor in zip(indices, out):
            described[index] = descriptor

    for index, image in enumerate(progress(loader, what, unit="image")):
        shape = tuple(image.shape[-2:])
        held.setdefault(shape, []).append((index, image[0]))
        if len(held[shape]) == batch_size:
            describe(shape)
        elif sum(len(images) for images in held.values()) > max_held:
            describe(max(held, key=lambda kept: len(held[kept])))
    for shape in list(held):
        describe(shape)
    return torch.stack([described[index] for index in range(len(files))])


def revisited_descriptors(backbone: nn.Module, data: RevisitedDataset, storage: Storage, size: int,
                          pooling: Pooling = "cls", amp_dtype: torch.dtype | None = None,
                          num_workers: int = 0) -> tuple[Tensor, Tensor]:
    """:func:`file_descriptors` of the queries (cropped to their boxes) and of the database images
    of ``data``: ``(queries, database)``."""
    return (file_descriptors(backbone, storage, data.query_files, size, f"{data.name} queries", data.query_boxes,
                             pooling, amp_dtype, num_workers),
            file_descriptors(backbone, storage, data.image_files, size, f"{data.name} database", None, pooling,
                             amp_dtype, num_workers))
