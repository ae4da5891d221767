"""faiss indexes over L2-normalised embeddings, chosen by size; inner product = cosine similarity.

Why two kinds: an exact ``IndexFlatIP`` scans every vector for every query, and deduplication
queries the whole pool against itself: ``N^2 F`` multiply-adds, seconds on 2 cores at 20 000 x 384
but hours at a million. Above ``flat_max`` an IVF-PQ index (inverted lists over a coarse k-means,
product-quantised residuals; as DINOv2 used for LVD-142M) scans only the ``nprobe`` lists nearest
each query, through 4-bit fast-scan codes (``pq_m / 2`` bytes a vector).

Why exact re-ranking: 4-bit PQ scores are rough (on isotropic 384-d data a vector's estimated
similarity to itself can be 0.4), so thresholds on them would mean nothing. The IVF-PQ index only
proposes ``rerank * k`` candidates; their exact cosines are computed from the vectors, which the
index keeps by reference (no copy). Every similarity this module returns is exact.

Why the coarse assignment is kept: the pool is both the indexed set and, for deduplication, the
query set. Assigning it to its ``nprobe`` nearest lists once serves both the add and
:meth:`SearchIndex.neighbours`, which saves one of the two ``N x nlist`` passes of dot products,
and the lists double as a k-means clustering of the pool (:meth:`SearchIndex.clusters`).
Which kind was built is in :attr:`SearchIndex.kind`, so callers can log it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from curation.embed import l2_normalise
from dinoflow.progress import progress


@dataclass(frozen=True)
class IndexConfig:
    """``flat_max``: largest pool searched exactly. Above it: IVF with ``nlist`` lists (0: about
    ``sqrt(N)``) trained on ``train_per_list`` vectors a list, ``pq_m`` 4-bit sub-quantisers (0: one
    per 8 dimensions, or the divisor of F nearest that), ``nprobe`` lists scanned per query and
    ``rerank * k`` candidates re-scored exactly. Queries go ``query_batch`` at a time.

    Why ``sqrt(N)`` lists and 8 probes: at a million vectors the costs balance there on 2 cores
    (assigning every vector to its lists grows with ``nlist``, scanning with ``nprobe / nlist``),
    and on isotropic random data, the worst case for IVF, 95 % of near-copies at cosine 0.9 are
    still found (``benchmarks/curation.py``); real embeddings cluster, and copies sit closer.
    """

    flat_max: int = 20_000
    nlist: int = 0
    pq_m: int = 0
    nprobe: int = 8
    rerank: int = 2
    train_per_list: int = 32
    query_batch: int = 16_384
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("nprobe", "rerank", "train_per_list", "query_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.flat_max < 0 or self.nlist < 0 or self.pq_m < 0:
            raise ValueError("flat_max, nlist and pq_m must be >= 0 (0: automatic nlist and pq_m)")


@dataclass(frozen=True)
class Clusters:
    """A partition of the pool: ``centroids`` ``(C, F)``, ``labels`` ``(N,)`` cluster of each row."""

    centroids: np.ndarray
    labels: np.ndarray


def pq_subquantisers(dim: int, requested: int = 0) -> int:
    """``requested``, checked to divide ``dim``; 0: the divisor of ``dim`` nearest ``dim / 8``."""
    if requested:
        if dim % requested:
            raise ValueError(f"pq_m={requested} must divide the embedding dimension {dim}")
        return requested
    divisors = [m for m in range(1, dim + 1) if dim % m == 0]
    return min(divisors, key=lambda m: (abs(m - dim / 8), m))


@dataclass
class SearchIndex:
    """A searchable pool. ``vectors`` ``(N, F)``: the L2-normalised rows (exact re-ranking);
    ``probes``/``probe_sims`` ``(N, nprobe)``: each row's nearest coarse lists (IVF only)."""

    kind: str  # "flat" or "ivfpq"
    index: Any
    vectors: np.ndarray
    config: IndexConfig
    probes: np.ndarray | None = None
    probe_sims: np.ndarray | None = None

    @property
    def size(self) -> int:
        return len(self.vectors)

    def describe(self) -> dict[str, Any]:
        """What was built, for reports and trackers."""
        info: dict[str, Any] = {"kind": self.kind, "size": self.size, "dim": int(self.vectors.shape[1])}
        if self.kind == "ivfpq":
            info.update(nlist=int(self.index.nlist), nprobe=int(self.index.nprobe), pq_m=int(self.index.pq.M),
                        pq_bits=4, rerank=self.config.rerank)
        return info

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` ``(similarities, rows)``, each ``(Q, k)``, best first, exact cosines; a missing
        neighbour has row -1."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        return self._batched(len(q), k, lambda s, e, kk: self._search_rows(l2_normalise(q[s:e]), kk), "search")

    def neighbours(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` of every indexed row against the index (each row usually finds itself
        first), exact cosines; IVF reuses the stored coarse assignment instead of computing it
        again."""
        if self.kind == "flat":
            return self._batched(self.size, k, lambda s, e, kk: self.index.search(self.vectors[s:e], kk), "k-NN graph")

        def batch(start: int, end: int, kk: int) -> tuple[np.ndarray, np.ndarray]:
            assert self.probes is not None and self.probe_sims is not None
            x = self.vectors[start:end]
            _, candidates = self.index.search_preassigned(x, self._candidates(kk), self.probes[start:end],
                                                          self.probe_sims[start:end])
            return self._rerank(x, candidates, kk)

        return self._batched(self.size, k, batch, "k-NN graph")

    def clusters(self) -> Clusters:
        """The IVF lists as a clustering of the pool (the coarse k-means): a free partition for
        cluster-based retrieval. Flat indexes have none."""
        if self.kind != "ivfpq" or self.probes is None:
            raise ValueError(f"a {self.kind} index has no coarse clusters; run curation.retrieve.kmeans_clusters")
        quantizer = self.index.quantizer
        return Clusters(quantizer.reconstruct_n(0, quantizer.ntotal), self.probes[:, 0].copy())

    def _candidates(self, k: int) -> int:
        return min(self.size, k * self.config.rerank)

    def _search_rows(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.kind == "flat":
            return self.index.search(x, k)
        _, candidates = self.index.search(x, self._candidates(k))
        return self._rerank(x, candidates, k)

    def _rerank(self, x: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` of ``candidates`` ``(Q, C)`` (rows, -1 = none) for queries ``x`` ``(Q, F)``."""
        import faiss

        # faiss stops at a row's first -1; searches put the missing (-1) candidates last
        candidates = np.ascontiguousarray(candidates, dtype=np.int64)
        sims = np.empty((len(x), k), np.float32)
        rows = np.empty((len(x), k), np.int64)
        faiss.knn_inner_products_by_idx(
            faiss.swig_ptr(x), faiss.swig_ptr(self.vectors), faiss.swig_ptr(candidates), x.shape[1], len(x),
            self.size, candidates.shape[1], k, faiss.swig_ptr(sims), faiss.swig_ptr(rows), candidates.shape[1])
        return sims, rows

    def _batched(self, count: int, k: int, run: Any, desc: str) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.size)
        sims = np.empty((count, k), np.float32)
        rows = np.empty((count, k), np.int64)
        step = self.config.query_batch
        for start in progress(range(0, count, step), desc=desc, total=-(-count // step), unit="batch"):
            end = min(count, start + step)
            sims[start:end], rows[start:end] = run(start, end, k)
        return sims, rows


def build_index(vectors: np.ndarray, config: IndexConfig | None = None) -> SearchIndex:
    """An index over the L2-normalised rows of ``vectors`` ``(N, F)``: flat up to
    ``config.flat_max`` rows, IVF-PQ (fast-scan, exact re-ranking) above."""
    import faiss

    config = config or IndexConfig()
    x = l2_normalise(vectors)
    count, dim = x.shape
    if count <= config.flat_max:
        index = faiss.IndexFlatIP(dim)
        index.add(x)
        return SearchIndex("flat", index, x, config)
    nlist = config.nlist or max(1, round(math.sqrt(count)))
    if nlist > count:
        raise ValueError(f"nlist={nlist} is more than the {count} vectors indexed")
    quantizer = faiss.IndexFlatIP(dim)
    ivf = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_subquantisers(dim, config.pq_m), 4, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(config.seed)
    # at least 4096: what faiss trains each 16-centroid PQ sub-quantiser on
    train = x[np.sort(rng.choice(count, min(count, max(4096, config.train_per_list * nlist)), replace=False))]
    ivf.cp.seed = ivf.pq.cp.seed = config.seed
    ivf.cp.min_points_per_centroid = min(ivf.cp.min_points_per_centroid, config.train_per_list)  # no warning
    ivf.train(train)
    del train
    nprobe = min(config.nprobe, nlist)
    probe_sims = np.empty((count, nprobe), np.float32)
    probes = np.empty((count, nprobe), np.int64)
    step = config.query_batch
    for start in progress(range(0, count, step), desc="index: assign", total=-(-count // step), unit="batch"):
        end = min(count, start + step)
        probe_sims[start:end], probes[start:end] = quantizer.search(x[start:end], nprobe)
        nearest = np.ascontiguousarray(probes[start:end, 0])  # kept alive through the call
        ivf.add_core(end - start, faiss.swig_ptr(x[start:end]), None, faiss.swig_ptr(nearest))
    index = faiss.IndexIVFPQFastScan(ivf)  # the same lists and codes, packed for SIMD scanning
    index.referenced_objects = [quantizer]  # shared, not copied: keep it alive with the index
    index.nprobe = nprobe
    return SearchIndex("ivfpq", index, x, config, probes, probe_sims)
