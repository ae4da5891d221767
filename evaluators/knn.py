"""Weighted k-nearest-neighbour classification on frozen features (DINO's protocol).

For a query q and its k most similar training features x_i (cosine similarity s_i on
L2-normalised features), class c scores  sum_i exp(s_i / T) * [y_i = c]; the prediction is the
highest-scoring class. The original uses T = 0.07 and k in {10, 20, 100, 200}.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
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
    if train_features.ndim != 2 or query_features.ndim != 2:
        raise ValueError(
            f"features must be (N, D): got train {tuple(train_features.shape)}, query {tuple(query_features.shape)}"
        )
    if train_features.shape[1] != query_features.shape[1]:
        raise ValueError(f"feature widths differ: {train_features.shape[1]} vs {query_features.shape[1]}")
    if not 1 <= k <= len(train_features):
        raise ValueError(f"k must be in [1, {len(train_features)}], got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    classes = num_classes or int(train_labels.max()) + 1
    bank = F.normalize(train_features.float(), dim=1)  # (N, D)
    predictions = []
    for start in range(0, len(query_features), chunk_size):
        queries = F.normalize(query_features[start : start + chunk_size].float(), dim=1)  # (q, D)
        similarity, index = (queries @ bank.T).topk(k, dim=1)  # (q, k)
        weights = (similarity / temperature).exp()  # (q, k)
        votes = torch.zeros(len(queries), classes, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[index], weights)  # (q, C)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)
