"""Curation quality: near-copy dedup precision/recall, and how much balancing flattens a skewed pool.

Run: ``python benchmarks/curation_quality.py [--weights backbone.safetensors] [--threshold 0.85]``.

* Dedup: synthetic scenes (evaluators.synthetic) with injected near-copies (mild square crops
  keeping 94-98 %, resizes to 40-75 %, JPEG q25-60, per-channel colour gain/offset), decoded as a
  pool is; precision and recall of the removed set against the known copy groups. Embedder: a
  dinoflow backbone when ``--weights`` is given, else downsampled pixels (6x6, per-image
  standardised; no weights needed, fit for near-copies only). It is printed.
* Balance: 8 Gaussian "concepts" of sizes 3200..40 in 32-d; hierarchical k-means (2 levels,
  resampling on the top one), balanced sampling of 10 %; concept entropy of the pool, of a uniform
  random sample, and of the balanced sample (max = ln 8).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from curation.dedup import deduplicate
from curation.embed import backbone_embedder, embed_images, pixel_embedder
from curation.kmeans import LevelConfig, balanced_sample, entropy, hierarchical_kmeans
from curation.synthetic import make_copy_pool, removal_quality
from trainer.data.datasets import decode_image


def dedup_benchmark(weights: str | None, threshold: float, originals: int, copied: int) -> None:
    pool = make_copy_pool(originals, copied, copies_per_image=2, seed=0, size=64)
    images = torch.stack([decode_image(b, 64) for b in pool.encoded])  # type: ignore[misc]
    if weights:
        from trainer.models.hub import load_backbone

        embedder, name = backbone_embedder(load_backbone(weights, "safetensors"), size=56), f"backbone {weights}"
    else:
        embedder, name = pixel_embedder(6), "downsampled pixels 6x6 (per-image standardised), no weights"
    started = time.perf_counter()
    result = deduplicate(embed_images(images, embedder), threshold=threshold)
    quality = removal_quality(result.keep, pool.group, result.component)
    print(f"dedup: pool {len(pool.encoded)} images ({originals} originals, {copied} x 2 near-copies), "
          f"embedder: {name}, threshold {threshold}")
    print(f"  removed {quality['removed']} (ideal {quality['ideal_removed']}), "
          f"precision {quality['precision']:.3f}, recall {quality['recall']:.3f}  "
          f"[{time.perf_counter() - started:.1f}s]")
    print(f"  acceptance (recall >= 0.95 at precision >= 0.95): "
          f"{'PASS' if quality['recall'] >= 0.95 and quality['precision'] >= 0.95 else 'FAIL'}")


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
    parser.add_argument("--threshold", type=float, default=0.85, help="dedup cosine threshold")
    parser.add_argument("--originals", type=int, default=2000)
    parser.add_argument("--copied", type=int, default=600)
    args = parser.parse_args()
    dedup_benchmark(args.weights, args.threshold, args.originals, args.copied)
    balance_benchmark()


if __name__ == "__main__":
    main()
