"""Curation quality: near-copy dedup precision/recall, decontamination, and how much balancing
flattens a skewed pool.

Run: ``python benchmarks/curation_quality.py [--weights backbone.safetensors] [--threshold 0.9]``.

* Dedup: synthetic scenes (evaluators.synthetic) with injected near-copies (mild square crops
  keeping 94-98 %, resizes to 40-75 %, JPEG q25-60, per-channel colour gain/offset), decoded as a
  pool is; precision and recall of the removed set against the known copy groups. Embedder: a
  dinoflow backbone when ``--weights`` is given, else downsampled pixels (6x6, per-image
  standardised; no weights needed, fit for near-copies only). It is printed.
* Decontamination: an "evaluation set" of fresh near-copies (each kind in turn) of 100 originals
  that have near-copies in the pool; how many of those originals' pool images are removed (all,
  for the acceptance) and how many unrelated pool images go with them, at ``--eval-threshold``.
* Balance: 8 Gaussian "concepts" of sizes 3200..40 in 32-d; hierarchical k-means (2 levels,
  resampling on the top one), balanced sampling of 10 %; concept entropy of the pool, of a uniform
  random sample, and of the balanced sample (max = ln 8).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

if sys.path[0] == os.path.dirname(os.path.abspath(__file__)):
    # run as a script: its folder comes first on the path, and benchmarks/curation.py would shadow `curation`
    sys.path[0] = os.path.dirname(sys.path[0])

from curation.dedup import decontaminate, deduplicate
from curation.embed import Embedder, backbone_embedder, embed_images, pixel_embedder
from curation.kmeans import LevelConfig, balanced_sample, entropy, hierarchical_kmeans
from curation.synthetic import COPY_KINDS, make_copy_pool, near_copy, removal_quality
from evaluators.synthetic import SceneConfig, make_scenes
from trainer.data.datasets import decode_image


def make_embedder(weights: str | None) -> tuple[Embedder, str]:
    """A backbone when ``weights`` is given, else downsampled pixels; and its description."""
    if weights:
        from trainer.models.hub import load_backbone

        return backbone_embedder(load_backbone(weights, "safetensors"), size=56), f"backbone {weights}"
    return pixel_embedder(6), "downsampled pixels 6x6 (per-image standardised), no weights"


def _embed(encoded: list[bytes], embedder: Embedder) -> np.ndarray:
    return embed_images(torch.stack([decode_image(b, 64) for b in encoded]), embedder)  # type: ignore[misc]


def dedup_benchmark(weights: str | None, threshold: float, originals: int, copied: int) -> None:
    pool = make_copy_pool(originals, copied, copies_per_image=2, seed=0, size=64)
    embedder, name = make_embedder(weights)
    started = time.perf_counter()
    result = deduplicate(_embed(pool.encoded, embedder), threshold=threshold)
    quality = removal_quality(result.keep, pool.group, result.component)
    print(f"dedup: pool {len(pool.encoded)} images ({originals} originals, {copied} x 2 near-copies), "
          f"embedder: {name}, threshold {threshold}")
    print(f"  removed {quality['removed']} (ideal {quality['ideal_removed']}), "
          f"precision {quality['precision']:.3f}, recall {quality['recall']:.3f}  "
          f"[{time.perf_counter() - started:.1f}s]")
    print(f"  acceptance (recall >= 0.95 at precision >= 0.95): "
          f"{'PASS' if quality['recall'] >= 0.95 and quality['precision'] >= 0.95 else 'FAIL'}")


def decontamination_benchmark(weights: str | None, threshold: float, originals: int, copied: int) -> None:
    pool = make_copy_pool(originals, copied, copies_per_image=2, seed=0, size=64)
    scenes = make_scenes(originals, 0, SceneConfig(size=64)).images
    counts = np.bincount(pool.group)
    contaminated = np.flatnonzero(counts == 3)[:100]  # originals with 2 near-copies in the pool
    rng = np.random.default_rng(1)
    evaluation = [near_copy(scenes[g], COPY_KINDS[i % len(COPY_KINDS)], rng) for i, g in enumerate(contaminated)]
    embedder, name = make_embedder(weights)
    drop, _, _ = decontaminate(_embed(pool.encoded, embedder), _embed(evaluation, embedder), threshold)
    related = np.isin(pool.group, contaminated)
    print(f"decontamination: {len(evaluation)} eval images (fresh near-copies of pool originals), embedder: {name}, "
          f"threshold {threshold}")
    print(f"  removed {int((drop & related).sum())} of the {int(related.sum())} related pool images, "
          f"and {int((drop & ~related).sum())} of {int((~related).sum())} unrelated ones; acceptance (every related "
          f"one removed): {'PASS' if (drop | ~related).all() else 'FAIL'}")


def balance_benchmark() -> None:
    rng = np.random.default_rng(0)
    sizes = [3200, 1600, 800, 400, 200, 100, 60, 40]
    centres = rng.normal(0, 1, (len(sizes), 32))
    x = np.concatenate([c + 0.2 * rng.normal(size=(s, 32)) for c, s in zip(centres, sizes)])
    concept = np.repeat(np.arange(len(sizes)), sizes)
    target = len(x) // 10
    hierarchy = hierarchical_kmeans(x, [LevelConfig(100), LevelConfig(10, resampling_steps=10, sample_size=3)])
    chosen = balanced_sample(hierarchy, target, leaf="closest")
    uniform = rng.choice(len(x), target, replace=False)
    print(f"balance: {len(x)} points, 8 concepts sized {sizes}, sample {target}; entropy in nats (max {np.log(8):.3f})")
    print(f"  pool {entropy(concept):.3f}  uniform sample {entropy(concept[uniform]):.3f}  "
          f"balanced sample {entropy(concept[chosen]):.3f}")
    print(f"  concept counts in the balanced sample: {np.bincount(concept[chosen], minlength=8).tolist()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=None, help="dinoflow backbone (safetensors); default: pixels")
    parser.add_argument("--threshold", type=float, default=0.9,
                        help="dedup cosine threshold (0.9: the pixel embedder's best on these scenes)")
    parser.add_argument("--eval-threshold", type=float, default=0.75, help="decontamination cosine threshold")
    parser.add_argument("--originals", type=int, default=2000)
    parser.add_argument("--copied", type=int, default=600)
    args = parser.parse_args()
    dedup_benchmark(args.weights, args.threshold, args.originals, args.copied)
    decontamination_benchmark(args.weights, args.eval_threshold, args.originals, args.copied)
    balance_benchmark()


if __name__ == "__main__":
    main()
