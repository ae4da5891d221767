"""A synthetic pool with injected near-copies of known images, for dedup tests and benchmarks.

Originals are :func:`evaluators.synthetic.make_scenes` images (deterministic per seed). Each copy
is one of: ``crop`` (a square crop keeping 94-98 % of the side, resized back), ``resize`` (down to
40-75 % and stored small), ``jpeg`` (re-encoded at quality 25-60), ``colour`` (per-channel gain
0.75-1.25 and offset +-30). Everything is encoded (PNG, or JPEG for ``jpeg``) as a real pool is.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from evaluators.synthetic import SceneConfig, make_scenes

COPY_KINDS = ("crop", "resize", "jpeg", "colour")


@dataclass(frozen=True)
class CopyPool:
    """``encoded[i]`` image bytes with name ``names[i]``; ``group[i]`` the original it derives from
    (originals and their copies share it); ``kind[i]`` 'original' or a copy kind."""

    encoded: list[bytes]
    names: list[str]
    group: np.ndarray
    kind: list[str]


def _encode(image: Image.Image, fmt: str = "PNG", quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=quality) if fmt == "JPEG" else image.save(buffer, format=fmt)
    return buffer.getvalue()


def near_copy(image: np.ndarray, kind: str, rng: np.random.Generator) -> bytes:
    """One encoded near-copy of a ``(3, S, S)`` uint8 image."""
    pil = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)))
    side = pil.size[0]
    if kind == "crop":
        keep = int(side * rng.uniform(0.94, 0.98))
        left, top = rng.integers(0, side - keep + 1, 2)
        return _encode(pil.crop((left, top, left + keep, top + keep)).resize((side, side), Image.Resampling.BICUBIC))
    if kind == "resize":
        small = max(8, int(side * rng.uniform(0.40, 0.75)))
        return _encode(pil.resize((small, small), Image.Resampling.BILINEAR))
    if kind == "jpeg":
        return _encode(pil, "JPEG", int(rng.integers(25, 61)))
    if kind == "colour":
        gain, offset = rng.uniform(0.75, 1.25, 3), rng.uniform(-30, 30, 3)
        shifted = np.clip(image.astype(np.float64) * gain[:, None, None] + offset[:, None, None], 0, 255)
        return _encode(Image.fromarray(shifted.astype(np.uint8).transpose(1, 2, 0)))
    raise ValueError(f"unknown copy kind {kind!r}; allowed: {', '.join(COPY_KINDS)}")


def make_copy_pool(originals: int, copied: int, copies_per_image: int = 2, seed: int = 0,
                   size: int = 64) -> CopyPool:
    """``originals`` distinct scenes; ``copied`` of them get ``copies_per_image`` near-copies of
    random kinds. The pool order is shuffled (deterministically)."""
    if copied > originals:
        raise ValueError(f"copied ({copied}) must be <= originals ({originals})")
    scenes = make_scenes(originals, seed, SceneConfig(size=size)).images  # (N, 3, S, S)
    rng = np.random.default_rng(seed)
    encoded, group, kind = [], [], []
    for i, image in enumerate(scenes):
        encoded.append(_encode(Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)))))
        group.append(i)
        kind.append("original")
    for i in rng.choice(originals, copied, replace=False):
        for _ in range(copies_per_image):
            copy_kind = COPY_KINDS[int(rng.integers(len(COPY_KINDS)))]
            encoded.append(near_copy(scenes[i], copy_kind, rng))
            group.append(int(i))
            kind.append(copy_kind)
    order = rng.permutation(len(encoded))
    names = [f"img{j:06d}.{'jpg' if kind[o] == 'jpeg' else 'png'}" for j, o in enumerate(order)]
    return CopyPool([encoded[o] for o in order], names, np.asarray(group)[order], [kind[o] for o in order])


def removal_quality(keep: np.ndarray, group: np.ndarray, component: np.ndarray) -> dict[str, float]:
    """Precision and recall of the removed set against the true copy groups.

    A removed image is correct when its component's kept image comes from the same original
    (it was removed as a copy of a true relative). Recall: correct removals over the ideal number
    ``sum(group size - 1)``."""
    keep, group, component = np.asarray(keep, bool), np.asarray(group), np.asarray(component)
    kept_group = {int(c): int(g) for c, g, k in zip(component, group, keep) if k}
    removed = np.flatnonzero(~keep)
    correct = sum(kept_group.get(int(component[i])) == int(group[i]) for i in removed)
    ideal = int(len(group) - len(np.unique(group)))
    return {
        "removed": len(removed),
        "ideal_removed": ideal,
        "correct_removed": int(correct),
        "precision": float(correct / len(removed)) if len(removed) else 1.0,
        "recall": float(correct / ideal) if ideal else 1.0,
    }
