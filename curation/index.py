"""faiss indexes over L2-normalised embeddings, chosen by size; inner product = cosine similarity.

Why two kinds: an exact ``IndexFlatIP`` costs ``N x F`` floats and a full scan per query, fine up
to a few hundred thousand vectors; above ``flat_max`` an ``IndexIVFPQ`` (inverted lists over a
coarse k-means, product-quantised residuals; as DINOv2 used for LVD-142M) keeps memory at
``pq_m`` bytes a vector and scans ``nprobe`` lists per query. Which one was built is returned in
:attr:`SearchIndex.kind`, so callers can log it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from curation.embed import l2_normalise


@dataclass(frozen=True)
class IndexConfig:
    """``flat_max``: largest pool searched exactly; above it IVF-PQ with ``nlist`` lists (0: about
    ``4 sqrt(N)``), ``pq_m`` sub-quantisers of ``pq_bits`` bits, ``nprobe`` lists per query."""

    flat_max: int = 200_000
    nlist: int = 0
    pq_m: int = 16
    pq_bits: int = 8
    nprobe: int = 32
    train_size: int = 100_000
    seed: int = 0


@dataclass
class SearchIndex:
    kind: str  # "flat" or "ivfpq"
    index: Any
    size: int

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` ``(similarities, indices)``, each ``(Q, k)``, best first; missing = index -1."""
        k = min(k, self.size)
        return self.index.search(l2_normalise(queries), k)


def build_index(vectors: np.ndarray, config: IndexConfig = IndexConfig()) -> SearchIndex:
    """An index over the L2-normalised rows of ``vectors`` ``(N, F)``."""
    import faiss

    x = l2_normalise(vectors)
    count, dim = x.shape
    if count <= config.flat_max:
        index = faiss.IndexFlatIP(dim)
        index.add(x)
        return SearchIndex("flat", index, count)
    if dim % config.pq_m:
        raise ValueError(f"pq_m={config.pq_m} must divide the embedding dimension {dim}")
    nlist = config.nlist or max(1, int(4 * np.sqrt(count)))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, nlist, config.pq_m, config.pq_bits, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(config.seed)
    train = x[rng.choice(count, min(count, config.train_size), replace=False)]
    index.train(train)
    index.add(x)
    index.nprobe = min(config.nprobe, nlist)
    return SearchIndex("ivfpq", index, count)
