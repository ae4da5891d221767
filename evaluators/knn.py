"""Weighted k-nearest-neighbour classification on frozen features (DINO's protocol).

For a query q and its k most similar training features x_i (cosine similarity s_i on
L2-normalised features), class c scores  sum_i exp(s_i / T) * [y_i = c]; the prediction is the
highest-scoring class. The original uses T = 0.07 and k in {10, 20, 100, 200}.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from evaluators.features import float32_on

MAX_SIMILARITIES = 2**27  # query x train similarities held at once (512 MiB in float32)


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
) -> dict[int, torch.Tensor]:
    """Predicted labels ``(Q,)`` (on the CPU) for every k in ``ks``, from one similarity pass: the
    largest k's neighbours come sorted, so each smaller k votes with their first k.

    The queries go in chunks of ``chunk_size`` (None: as many as keep a chunk's similarities to
    the train set under :data:`MAX_SIMILARITIES`, at most 1024: ImageNet's 1.28M train images
    take 104 queries a chunk, 0.5 GiB). ``device`` (default: the features') is where the
    similarities are computed: a GPU's, for a large train set.
    """
    if train_features.ndim != 2 or query_features.ndim != 2:
        raise ValueError(
            f"features must be (N, D): got train {tuple(train_features.shape)}, query {tuple(query_features.shape)}"
        )
    if train_features.shape[1] != query_features.shape[1]:
        raise ValueError(f"feature widths differ: {train_features.shape[1]} vs {query_features.shape[1]}")
    for k in ks:
        if not 1 <= k <= len(train_features):
            raise ValueError(f"k must be in [1, {len(train_features)}], got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    classes = num_classes or int(train_labels.max()) + 1
    device = torch.device(device) if device is not None else train_features.device
    bank = F.normalize(float32_on(train_features, device), dim=1)  # (N, D)
    train_labels = train_labels.to(device)
    chunk = chunk_size or max(1, min(1024, MAX_SIMILARITIES // len(bank)))
    predictions: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, len(query_features), chunk):
        queries = F.normalize(query_features[start : start + chunk].to(device, torch.float32), dim=1)  # (q, D)
        similarity, index = (queries @ bank.T).topk(max(ks), dim=1)  # (q, max k), most similar first
        weights = (similarity / temperature).exp()
        neighbours = train_labels[index]
        for k in ks:
            votes = torch.zeros(len(queries), classes, dtype=weights.dtype, device=device)
            votes.scatter_add_(1, neighbours[:, :k], weights[:, :k])  # (q, C)
            predictions[k].append(votes.argmax(dim=1).cpu())
    return {k: torch.cat(chunks) for k, chunks in predictions.items()}
