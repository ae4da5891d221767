"""Weighted k-nearest-neighbour classification on frozen features (DINO's protocol).

For a query q and its k most similar training features x_i (cosine similarity s_i on
L2-normalised features), class c scores  sum_i exp(s_i / T) * [y_i = c]; the prediction is the
highest-scoring class. The original uses T = 0.07 and k in {10, 20, 100, 200}.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Predicted labels ``(Q,)`` for queries ``(Q, D)`` given a train set ``(N, D)``/``(N,)``."""
    return knn_predictions(train_features, train_labels, query_features, (k,), temperature, num_classes,
                           chunk_size)[k]


@torch.no_grad()
def knn_predictions(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    ks: Sequence[int],
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> dict[int, torch.Tensor]:
    """Predicted labels ``(Q,)`` for every k in ``ks``, from one similarity pass: the largest k's
    neighbours come sorted, so each smaller k votes with their first k."""
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
    bank = F.normalize(train_features.float(), dim=1)  # (N, D)
    predictions: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, len(query_features), chunk_size):
        queries = F.normalize(query_features[start : start + chunk_size].float(), dim=1)  # (q, D)
        similarity, index = (queries @ bank.T).topk(max(ks), dim=1)  # (q, max k), most similar first
        weights = (similarity / temperature).exp()
        neighbours = train_labels[index]
        for k in ks:
            votes = torch.zeros(len(queries), classes, dtype=weights.dtype)
            votes.scatter_add_(1, neighbours[:, :k], weights[:, :k])  # (q, C)
            predictions[k].append(votes.argmax(dim=1))
    return {k: torch.cat(chunks) for k, chunks in predictions.items()}
