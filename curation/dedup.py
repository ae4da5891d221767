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

from curation.index import IndexConfig, SearchIndex, build_index


def similar_pairs(index: SearchIndex, threshold: float, k: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Edges ``(i, j)`` with ``i < j`` and cosine ``>= threshold`` among each indexed row's ``k``
    nearest, as ``(pairs (E, 2) int64, similarities (E,) float32)``."""
    sims, neighbours = index.neighbours(k + 1)  # (N, k+1): the row itself is usually first
    rows = np.repeat(np.arange(index.size), neighbours.shape[1])
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
    while True:  # pointer jumping: every node straight to its root, without a Python call per node
        grandparent = parent[parent]
        if np.array_equal(grandparent, parent):
            break
        parent = grandparent
    _, labels = np.unique(parent, return_inverse=True)  # roots are the smallest nodes: order kept
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
        """Rows of each component with at least ``min_size`` members, largest first (ties: lowest
        label first); one sort, so a million-row pool with many groups stays cheap."""
        sizes = np.bincount(self.component)
        by_component = np.argsort(self.component, kind="stable")  # rows grouped by label, ascending
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        order = np.argsort(-sizes, kind="stable")
        return [by_component[bounds[c]:bounds[c + 1]] for c in order if sizes[c] >= min_size]


def deduplicate(pool: np.ndarray | SearchIndex, threshold: float = 0.6, k: int = 16,
                index_config: IndexConfig | None = None) -> DedupResult:
    """Keep one row per connected component of the ``>= threshold`` k-NN graph.

    ``pool``: embeddings ``(N, F)`` (an index is built with ``index_config``), or an index already
    built over them, to share it with retrieval.
    """
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
    index = pool if isinstance(pool, SearchIndex) else build_index(pool, index_config or IndexConfig())
    pairs, sims = similar_pairs(index, threshold, k)
    count = index.size
    component = connected_components(count, pairs)
    # typicality: summed similarity to the component's other members (edges only; cheap, exact on cliques)
    score = np.zeros(count)
    np.add.at(score, pairs[:, 0], sims)
    np.add.at(score, pairs[:, 1], sims)
    order = np.lexsort((np.arange(count), -score, component))  # by component, best score, lowest row
    first = np.ones(len(order), dtype=bool)
    first[1:] = component[order][1:] != component[order][:-1]
    representative = order[first]  # indexed by component label (sorted)
    keep = np.zeros(count, dtype=bool)
    keep[representative] = True
    return DedupResult(keep, component, representative, pairs, sims)


def decontaminate(pool: np.ndarray, evaluation: np.ndarray, threshold: float = 0.45,
                  index_config: IndexConfig | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pool rows that are near-copies of any evaluation image: ``(drop (N,) bool, best similarity
    (N,), index of the nearest evaluation image (N,))``."""
    if len(evaluation) == 0:
        return np.zeros(len(pool), bool), np.full(len(pool), -1.0, np.float32), np.full(len(pool), -1, np.int64)
    index = build_index(evaluation, index_config or IndexConfig())
    sims, nearest = index.search(pool, 1)
    return sims[:, 0] >= threshold, sims[:, 0], nearest[:, 0].astype(np.int64)
