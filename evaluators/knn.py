"""Weighted k-nearest-neighbour classification on frozen features (DINO's protocol).

For a query q and its k most similar training features x_i (cosine similarity s_i on
L2-normalised features), class c scores  sum_i exp(s_i / T) * [y_i = c]; the prediction is the
highest-scoring class. The original uses T = 0.07 and k in {10, 20, 100, 200}.

**Memory.** The train features (the bank) stay where the caller holds them: they cross to the
device in chunks of :data:`DEVICE_CHUNK_BYTES` (1 GiB of float32 rows), each scored against every
query before the next comes, each query keeping its running top k merged with the chunk's. So the
device holds one chunk of the bank and the bank crosses once (ImageNet's 1.28M ViT-g/14 CLS
features, 7.9 GB, were held whole on the GPU; now 8 chunks cross one after the other). The
neighbours are the whole bank's: the top k of a union is the top k of its parts' top k. Two
caveats, both as before: a similarity may differ in its last bit with the chunking (BLAS picks its
kernel, so its order of sums, by the product's shape, as the query chunk's size did), and ties
(equal similarities at the k-th place, which float features meet only in duplicated train rows)
go as :func:`torch.topk` breaks them, unspecified.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from evaluators.features import float32_on

MAX_SIMILARITIES = 2**27  # query x train similarities held at once (512 MiB in float32)
DEVICE_CHUNK_BYTES = 2**30  # a chunk of the bank (or a group of queries and their top k) held on the device


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Predicted labels ``(Q,)`` for queries ``(Q, D)`` given a train set ``(N, D)``/``(N,)``."""
    return knn_predictions(train_features, train_labels, query_features, (k,), temperature, num_classes,
                           chunk_size, device)[k]


@torch.no_grad()
def knn_predictions(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    ks: Sequence[int],
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
    bank_chunk_size: int | None = None,
) -> dict[int, torch.Tensor]:
    """Predicted labels ``(Q,)`` (on the CPU) for every k in ``ks``, from one similarity pass: the
    largest k's neighbours come sorted, so each smaller k votes with their first k.

    ``device`` (default: the features') is where the similarities are computed: a GPU's, for a
    large train set. The queries go there in groups of :data:`DEVICE_CHUNK_BYTES` (their features
    and running top k; ImageNet's 50k validation images: one group), each meeting the whole bank
    as :func:`nearest_neighbours` streams it (``chunk_size`` queries by ``bank_chunk_size`` train
    rows of similarities at a time): the bank crosses once per group. The votes are cast
    ``MAX_SIMILARITIES // C`` queries at a time.
    """
    _check_features(train_features, query_features)
    for k in ks:
        _check_k(k, len(train_features))
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    classes = num_classes or int(train_labels.max()) + 1
    device = torch.device(device) if device is not None else train_features.device
    labels = train_labels.to(device)  # (N,): 10 MB for ImageNet's train set
    # a group's features and running top k (float32 similarities, int64 indices) in DEVICE_CHUNK_BYTES
    group = max(1, DEVICE_CHUNK_BYTES // (4 * query_features.shape[1] + 12 * max(ks)))
    vote_rows = max(1, MAX_SIMILARITIES // classes)  # queries whose votes (q, C) are held at once
    predictions: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, len(query_features), group):
        similarity, index = nearest_neighbours(train_features, query_features[start : start + group], max(ks),
                                               device, chunk_size, bank_chunk_size)  # (q, max k), most similar first
        weights, neighbours = (similarity / temperature).exp(), labels[index]
        for block in range(0, len(index), vote_rows):
            rows = slice(block, block + vote_rows)
            for k in ks:
                predictions[k].append(_vote(weights[rows, :k], neighbours[rows, :k], classes))
    return {k: torch.cat(chunks) for k, chunks in predictions.items()}


def _vote(weights: torch.Tensor, neighbours: torch.Tensor, classes: int) -> torch.Tensor:
    """Each query's class of most weight ``(q,)``, on the CPU, among its neighbours' labels ``(q, k)``
    weighted by ``weights`` ``(q, k)``."""
    votes = torch.zeros(len(weights), classes, dtype=weights.dtype, device=weights.device)
    votes.scatter_add_(1, neighbours, weights)  # (q, C)
    return votes.argmax(dim=1).cpu()


@torch.no_grad()
def nearest_neighbours(
    train_features: torch.Tensor,
    query_features: torch.Tensor,
    k: int,
    device: str | torch.device | None = None,
    chunk_size: int | None = None,
    bank_chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` train rows ``(N, D)`` most cosine-similar to each query ``(Q, D)``: their
    similarities ``(Q, k)``, most similar first, and their train indices ``(Q, k)``, on ``device``
    (default: the train features').

    The queries go to ``device`` at once. The train features stay where they are and cross in
    chunks of ``bank_chunk_size`` rows (None: :data:`DEVICE_CHUNK_BYTES` of float32 rows; ViT-g/14's
    1536 wide: 174,762), each met by every query, ``chunk_size`` at a time (None: as many as keep
    their similarities to a chunk under :data:`MAX_SIMILARITIES`, at most 1024), before the next
    chunk comes: the device holds one chunk, and the bank crosses once. Where the bank is on the
    device already, a chunk is a view of it (normalised, a chunk-sized copy).
    """
    _check_features(train_features, query_features)
    _check_k(k, len(train_features))
    for name, size in (("chunk_size", chunk_size), ("bank_chunk_size", bank_chunk_size)):
        if size is not None and size < 1:
            raise ValueError(f"{name} must be >= 1 or None, got {size}")
    device = torch.device(device) if device is not None else train_features.device
    bank_rows = bank_chunk_size or min(len(train_features), _rows_in(DEVICE_CHUNK_BYTES, train_features.shape[1]))
    query_rows = chunk_size or max(1, min(1024, MAX_SIMILARITIES // bank_rows))
    queries = _normalized_on(query_features, device)  # (Q, D)
    similarity = torch.full((len(queries), k), float("-inf"), device=device)  # (Q, k): each query's running top k
    index = torch.full((len(queries), k), -1, dtype=torch.long, device=device)
    for offset in range(0, len(train_features), bank_rows):
        _meet_chunk(similarity, index, queries, train_features[offset : offset + bank_rows], offset, query_rows)
    return similarity, index


def _meet_chunk(similarity: torch.Tensor, index: torch.Tensor, queries: torch.Tensor, chunk: torch.Tensor,
                offset: int, query_rows: int) -> None:
    """Merge into every query's running top k (``similarity`` and ``index``, ``(Q, k)``, updated in
    place) a chunk of the bank ``(n, D)`` whose first row is train row ``offset``, moved to the
    queries' device (normalised there) and met ``query_rows`` queries at a time. The chunk is
    freed on return, before the next one comes."""
    bank = _normalized_on(chunk, queries.device)  # (n, D): one chunk crosses
    for start in range(0, len(queries), query_rows):
        rows = slice(start, start + query_rows)
        similarity[rows], index[rows] = _merged(similarity[rows], index[rows], queries[rows] @ bank.T, offset)


def _merged(similarity: torch.Tensor, index: torch.Tensor, chunk_similarity: torch.Tensor,
            offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A block of queries' running top k ``(q, k)`` (similarities, train indices) merged with their
    similarities to a chunk ``(q, n)`` whose first row is train row ``offset``: the top k of the
    running list and of the chunk's top k, sorted (what the union's top k is, with no ``(q, n)``
    index built)."""
    k = similarity.shape[1]
    top, position = chunk_similarity.topk(min(k, chunk_similarity.shape[1]), dim=1)  # (q, <= k)
    merged, chosen = torch.cat([similarity, top], dim=1).topk(k, dim=1)  # (q, k), most similar first
    return merged, torch.cat([index, position + offset], dim=1).gather(1, chosen)


def _normalized_on(features: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``features``' rows L2-normalised (:func:`F.normalize`'s values) in float32 on ``device``; the
    copy :func:`float32_on` makes when it must is normalised in place, so a chunk of the bank takes
    its size on the device once, not twice."""
    moved = float32_on(features, device)
    if moved is features:  # the caller's tensor: left alone
        return F.normalize(moved, dim=1)
    return moved.div_(moved.norm(dim=1, keepdim=True).clamp_min(1e-12))  # F.normalize's eps


def _rows_in(size_bytes: int, width: int) -> int:
    """How many float32 rows ``width`` wide fit in ``size_bytes`` (at least one)."""
    return max(1, size_bytes // (4 * width))


def _check_features(train_features: torch.Tensor, query_features: torch.Tensor) -> None:
    if train_features.ndim != 2 or query_features.ndim != 2:
        raise ValueError(
            f"features must be (N, D): got train {tuple(train_features.shape)}, query {tuple(query_features.shape)}"
        )
    if train_features.shape[1] != query_features.shape[1]:
        raise ValueError(f"feature widths differ: {train_features.shape[1]} vs {query_features.shape[1]}")


def _check_k(k: int, train_rows: int) -> None:
    if not 1 <= k <= train_rows:
        raise ValueError(f"k must be in [1, {train_rows}], got {k}")
