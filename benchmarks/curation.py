"""Curation throughput: deduplication and seed retrieval over N x D random embeddings (1M x 384).

Run: ``python benchmarks/curation.py [--n 1000000] [--dim 384] [--seeds 10000] [--threads 2]``.

The data: N unit Gaussian rows (seeded), of which ``--dups`` (default 1 % of N) are overwritten by
near-copies of other rows at cosine ``--dup-cosine`` (0.9), so the true duplicate pairs are known.
Seeds are near-copies (same cosine) of random rows, so each seed's source row is its known nearest.

It runs the library's own code paths, each timed: the index (IVF-PQ above ``--flat-max``: coarse
k-means, one assignment pass, fast-scan codes), deduplication (k-NN graph with exact re-ranking,
connected components, representatives), sample-based retrieval (``--per-seed`` nearest kept rows
per seed) and cluster-based retrieval (``--per-cluster`` kept rows of each seed's IVF list, the
index's coarse k-means). Printed: wall time per stage and in total, peak RSS
(``getrusage``), duplicate pairs found against injected, and how often a seed's source came first.
Goal: under 5 minutes on 2 cores at the default size.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from collections.abc import Sequence

import numpy as np

if sys.path[0] == os.path.dirname(os.path.abspath(__file__)):
    # run as a script: its own folder comes first on the path, and this file would shadow `curation`
    sys.path[0] = os.path.dirname(sys.path[0])

from curation.dedup import deduplicate
from curation.index import IndexConfig, build_index
from curation.retrieve import retrieve_cluster, retrieve_nearest


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def near_copies(sources: np.ndarray, cosine: float, rng: np.random.Generator) -> np.ndarray:
    """Unit rows at about ``cosine`` to the unit rows ``sources`` ``(n, D)``: Gaussian noise of
    variance ``(1/cosine^2 - 1) / D`` per dimension, then normalised."""
    sigma = np.sqrt((1.0 / cosine**2 - 1.0) / sources.shape[1])
    copies = sources + rng.standard_normal(sources.shape, dtype=np.float32) * np.float32(sigma)
    return copies / np.linalg.norm(copies, axis=1, keepdims=True)


def make_embeddings(n: int, dim: int, dups: int, seeds: int, cosine: float, seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(pool (n, dim) unit float32, injected pairs (dups, 2) sorted, seed vectors (seeds, dim),
    each seed's source row (seeds,))``; originals, copies and seed sources are disjoint rows."""
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal((n, dim), dtype=np.float32)
    pool /= np.sqrt(np.einsum("nf,nf->n", pool, pool))[:, None]  # in place: no second (n, dim) array
    rows = rng.choice(n, 2 * dups + seeds, replace=False)
    originals, copies, seed_sources = rows[:dups], rows[dups:2 * dups], rows[2 * dups:]
    pool[copies] = near_copies(pool[originals], cosine, rng)
    pairs = np.sort(np.stack([originals, copies], axis=1), axis=1)
    return pool, pairs, near_copies(pool[seed_sources], cosine, rng), seed_sources


def run(args: argparse.Namespace) -> dict[str, float]:
    """Generate, index, deduplicate, retrieve; print each stage; return the stage times (s)."""
    import faiss

    faiss.omp_set_num_threads(args.threads)
    dups = int(args.n * args.dup_fraction)
    print(f"curation benchmark: {args.n:,} x {args.dim} random unit embeddings, {dups:,} injected near-copies "
          f"(cosine {args.dup_cosine}), {args.seeds:,} seeds; faiss threads {args.threads}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    times: dict[str, float] = {}

    def stage(name: str, started: float, detail: str) -> None:
        times[name] = time.perf_counter() - started
        print(f"  {name:<20} {times[name]:7.1f} s   peak RSS {peak_rss_gib():5.2f} GiB   {detail}", flush=True)

    started = time.perf_counter()
    pool, injected, seeds, seed_sources = make_embeddings(args.n, args.dim, dups, args.seeds, args.dup_cosine)
    stage("generate (untimed)", started, f"{pool.nbytes / 2**30:.2f} GiB of float32")
    config = IndexConfig(flat_max=args.flat_max, nlist=args.nlist, nprobe=args.nprobe)

    started = time.perf_counter()
    index = build_index(pool, config)
    stage("index", started, str(index.describe()))

    started = time.perf_counter()
    result = deduplicate(index, threshold=args.threshold, k=args.k)
    found = {tuple(p) for p in result.pairs.tolist()}
    true = {tuple(p) for p in injected.tolist()}
    hits = len(found & true)
    stage("dedup", started, f"threshold {args.threshold}, k {args.k}: {len(found):,} pairs, {hits:,} of {len(true):,} "
                            f"injected (recall {hits / max(1, len(true)):.3f}), {len(found - true):,} others; "
                            f"kept {int(result.keep.sum()):,}, removed {int((~result.keep).sum()):,}")

    started = time.perf_counter()
    nearest = retrieve_nearest(index, seeds, args.per_seed, allowed=result.keep)
    rows = np.unique(np.concatenate(nearest))
    first = np.mean([len(r) > 0 and r[0] == s for r, s in zip(nearest, seed_sources)])
    stage("retrieve: sample", started, f"{args.per_seed} per seed -> {len(rows):,} rows; "
                                       f"seed's source first {first:.3f}")

    started = time.perf_counter()
    clusters = index.clusters() if index.kind == "ivfpq" else None
    if clusters is None:
        print("  retrieve: cluster    skipped: a flat index has no coarse clusters (lower --flat-max)")
    else:
        members = retrieve_cluster(index.vectors, clusters, seeds, args.per_cluster, allowed=result.keep)
        rows = np.unique(np.concatenate(members))
        inside = np.mean([s in set(r.tolist()) for r, s in zip(members, seed_sources)])
        stage("retrieve: cluster", started, f"{len(clusters.centroids):,} IVF lists as clusters, {args.per_cluster} "
                                            f"per seed -> {len(rows):,} rows; seed's source among them {inside:.3f}")
    total = sum(v for k, v in times.items() if k != "generate (untimed)")
    goal = (f"goal (under 300 s on 2 cores): {'met' if total < 300 else 'missed'}"
            if (args.n, args.dim) == (1_000_000, 384) else "the 300 s goal is for 1,000,000 x 384")
    print(f"  {'total':<20} {total:7.1f} s   peak RSS {peak_rss_gib():5.2f} GiB   {goal}")
    return times


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="pool embeddings")
    parser.add_argument("--dim", type=int, default=384, help="embedding dimension")
    parser.add_argument("--seeds", type=int, default=10_000, help="seed embeddings to retrieve around")
    parser.add_argument("--dup-fraction", type=float, default=0.01, help="share of rows that are injected copies")
    parser.add_argument("--dup-cosine", type=float, default=0.9, help="cosine of a copy (and a seed) to its source")
    parser.add_argument("--threshold", type=float, default=0.6, help="dedup cosine threshold")
    parser.add_argument("--k", type=int, default=16, help="neighbours per row in the k-NN graph")
    parser.add_argument("--per-seed", type=int, default=4, help="sample-based: nearest rows per seed")
    parser.add_argument("--per-cluster", type=int, default=100, help="cluster-based: rows per seed's cluster")
    parser.add_argument("--flat-max", type=int, default=IndexConfig.flat_max, help="largest pool searched exactly")
    parser.add_argument("--nlist", type=int, default=0, help="IVF lists (0: about sqrt(N))")
    parser.add_argument("--nprobe", type=int, default=IndexConfig.nprobe, help="IVF lists scanned per query")
    parser.add_argument("--threads", type=int, default=2, help="faiss (OpenMP) threads")
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
