"""Copy detection: a k-NN similarity graph, its connected components, one image kept per component.

Why components rather than pairs: near-copies chain (A~B, B~C), and keeping one image per
component removes the whole chain. As in DINOv2 (about 0.6 within the pool, a looser 0.45
against evaluation images, on SSCD copy descriptors); the thresholds depend on the embedder, so
they are arguments. The representative of a component is its member with the highest summed
similarity to the other members (the most typical copy), ties broken by the lowest index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from curation.embed import l2_normalise
from curation.index import IndexConfig, build_index


def similar_pairs(vectors: np.ndarray, threshold: float, k: int = 16,
                  index_config: IndexConfig = IndexConfig()) -> tuple[np.ndarray, np.ndarray]:
    """Edges ``(i, j)`` with ``i < j`` and cosine ``>= threshold`` among each row's ``k`` nearest,
    as ``(pairs (E, 2) int64, similarities (E,) float32)``."""
    index = build_index(vectors, index_config)
    sims, neighbours = index.search(vectors, k + 1)  # (N, k+1): the row itself is usually first
    rows = np.repeat(np.arange(len(vectors)), neighbours.shape[1])
    cols, values = neighbours.ravel(), sims.ravel()
    mask = (cols >= 0) & (cols != rows) & (values >= threshold)
    pairs = np.stack([np.minimum(rows[mask], cols[mask]), np.maximum(rows[mask], cols[mask])], axis=1)
    pairs, first = np.unique(pairs, axis=0, return_index=True)
    return pairs.reshape(-1, 2).astype(np.int64), values[mask][first].astype(np.float32)


def connected_components(count: int, pairs: np.ndarray) -> np.ndarray:
    """Component label ``(count,)`` of each node of an undirected graph (union-find); labels are
    ``0..C-1`` in order of each component's smallest node."""
    parent = np.arange(count)

    def find(node: int) -> int:
        root = node
        while parent[root] != root:
            root = parent[root]
        while parent[node] != root:  # path compression
            parent[node], node = root, parent[node]
        return root

    for a, b in np.asarray(pairs, dtype=np.int64).reshape(-1, 2):
        root_a, root_b = find(int(a)), find(int(b))
        if root_a != root_b:
            parent[max(root_a, root_b)] = min(root_a, root_b)
    roots = np.array([find(i) for i in range(count)], dtype=np.int64)
    _, labels = np.unique(roots, return_inverse=True)  # roots are the smallest nodes: order kept
    return labels.astype(np.int64)


@dataclass(frozen=True)
class DedupResult:
    """``keep`` ``(N,)`` bool; ``component`` ``(N,)`` label; ``representative[c]`` = kept row of
    component ``c``; ``pairs``/``similarities``: the edges found."""

    keep: np.ndarray
    component: np.ndarray
    representative: np.ndarray
    pairs: np.ndarray
    similarities: np.ndarray

    def groups(self, min_size: int = 2) -> list[np.ndarray]:
        """Rows of each component with at least ``min_size`` members, largest first."""
        sizes = np.bincount(self.component)
        order = np.argsort(-sizes, kind="stable")
        return [np.flatnonzero(self.component == c) for c in order if sizes[c] >= min_size]


def deduplicate(vectors: np.ndarray, threshold: float = 0.6, k: int = 16,
                index_config: IndexConfig = IndexConfig()) -> DedupResult:
    """Keep one row per connected component of the ``>= threshold`` k-NN graph."""
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
    x = l2_normalise(vectors)
    pairs, sims = similar_pairs(x, threshold, k, index_config)
    component = connected_components(len(x), pairs)
    # typicality: summed similarity to the component's other members (edges only; cheap, exact on cliques)
    score = np.zeros(len(x))
    np.add.at(score, pairs[:, 0], sims)
    np.add.at(score, pairs[:, 1], sims)
    order = np.lexsort((np.arange(len(x)), -score, component))  # by component, best score, lowest row
    first = np.ones(len(order), dtype=bool)
    first[1:] = component[order][1:] != component[order][:-1]
    representative = order[first]  # indexed by component label (sorted)
    keep = np.zeros(len(x), dtype=bool)
    keep[representative] = True
    return DedupResult(keep, component, representative, pairs, sims)


def decontaminate(pool: np.ndarray, evaluation: np.ndarray, threshold: float = 0.45,
                  index_config: IndexConfig = IndexConfig()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pool rows that are near-copies of any evaluation image: ``(drop (N,) bool, best similarity
    (N,), index of the nearest evaluation image (N,))``."""
    if len(evaluation) == 0:
        return np.zeros(len(pool), bool), np.full(len(pool), -1.0, np.float32), np.full(len(pool), -1, np.int64)
    index = build_index(evaluation, index_config)
    sims, nearest = index.search(pool, 1)
    return sims[:, 0] >= threshold, sims[:, 0], nearest[:, 0].astype(np.int64)
