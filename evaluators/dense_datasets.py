"""Dataset adapters of the dense benchmarks, reading each data set's own on-disk layout.

Every adapter returns images ``(N, 3, S, S)`` uint8 resized to ``size`` (bilinear) with their
labels resized the same way (nearest): class-index masks ``(N, S, S)`` uint8 (255 = ignore) or
depth maps ``(N, S, S)`` float32 in metres (0 = unknown). Square resizing keeps the code and the
heads simple; it distorts aspect ratios, which the benchmark accepts for every backbone alike.

* **ADE20K** (``ADEChallengeData2016``): ``images/{training,validation}/*.jpg`` and
  ``annotations/{training,validation}/*.png`` (same stem). Label 0 ("other") is ignored and the
  150 classes become 0..149, as the original evaluation does (``reduce_zero_label``).
* **Pascal VOC 2012**: ids in ``ImageSets/Segmentation/{train,val}.txt``, images
  ``JPEGImages/<id>.jpg``, masks ``SegmentationClass/<id>.png`` (palette indices 0..20, 255 on
  object boundaries, kept as ignore).
* **NYU-Depth v2** (this project's layout): ``{train,test}/*.npz``, each with ``image``
  ``(H, W, 3)`` uint8 and ``depth`` ``(H, W)`` float32 metres.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
from PIL import Image

from dinoflow.storage import Storage, join_uri


@dataclass(frozen=True)
class DenseSplit:
    """Images and their per-pixel labels (``masks`` or ``depths``), with the file names."""

    images: np.ndarray
    labels: np.ndarray
    names: list[str]


def _image(data: bytes, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR)).transpose(2, 0, 1)


def _mask(data: bytes, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        if image.mode not in ("L", "P"):
            raise ValueError(f"a mask must be a single-channel index PNG (mode L or P), got mode {image.mode}")
        return np.asarray(image.resize((size, size), Image.NEAREST), dtype=np.uint8)


def _stack(images: list[np.ndarray], labels: list[np.ndarray], names: list[str], what: str) -> DenseSplit:
    if not images:
        raise FileNotFoundError(f"no {what} found")
    return DenseSplit(np.stack(images), np.stack(labels), names)


def load_ade20k(storage: Storage, root: str, split: str, size: int, limit: int = 0) -> DenseSplit:
    """ADE20K images and masks (classes 0..149, 255 ignored) of ``split`` (training or validation)."""
    if split not in ("training", "validation"):
        raise ValueError(f"ADE20K split must be training or validation, got {split!r}")
    files = sorted(u for u in storage.list(join_uri(root, "images", split)) if u.endswith(".jpg"))
    files = files[:limit] if limit else files
    images, masks, names = [], [], []
    for uri in files:
        stem = PurePosixPath(uri).stem
        images.append(_image(storage.read_bytes(uri), size))
        raw = _mask(storage.read_bytes(join_uri(root, "annotations", split, f"{stem}.png")), size)
        masks.append(np.where(raw == 0, 255, raw - 1).astype(np.uint8))
        names.append(stem)
    return _stack(images, masks, names, f"ADE20K images under {join_uri(root, 'images', split)}")


def load_voc(storage: Storage, root: str, split: str, size: int, limit: int = 0) -> DenseSplit:
    """Pascal VOC 2012 segmentation images and masks (0..20, 255 ignored) of ``split`` (train or val)."""
    listing = join_uri(root, "ImageSets", "Segmentation", f"{split}.txt")
    if not storage.exists(listing):
        raise FileNotFoundError(f"VOC split list {listing} is missing (splits: train, val)")
    ids = [line.strip() for line in storage.read_bytes(listing).decode().splitlines() if line.strip()]
    ids = ids[:limit] if limit else ids
    images = [_image(storage.read_bytes(join_uri(root, "JPEGImages", f"{i}.jpg")), size) for i in ids]
    masks = [_mask(storage.read_bytes(join_uri(root, "SegmentationClass", f"{i}.png")), size) for i in ids]
    return _stack(images, masks, ids, f"VOC ids in {listing}")


def load_nyu(storage: Storage, root: str, split: str, size: int, limit: int = 0) -> DenseSplit:
    """NYU-Depth v2 images and depth maps (metres, 0 unknown) of ``split`` (train or test)."""
    files = sorted(u for u in storage.list(join_uri(root, split)) if u.endswith(".npz"))
    files = files[:limit] if limit else files
    images, depths, names = [], [], []
    for uri in files:
        with np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False) as data:
            if "image" not in data or "depth" not in data:
                raise ValueError(f"{uri}: an NYU sample needs arrays 'image' and 'depth', has {sorted(data)}")
            image, depth = data["image"], data["depth"].astype(np.float32)
        if image.ndim != 3 or image.shape[2] != 3 or depth.shape != image.shape[:2]:
            raise ValueError(f"{uri}: image {image.shape} must be (H, W, 3) and depth {depth.shape} (H, W)")
        images.append(np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR)).transpose(2, 0, 1))
        depths.append(np.asarray(Image.fromarray(depth, mode="F").resize((size, size), Image.NEAREST)))
        names.append(PurePosixPath(uri).stem)
    return _stack(images, depths, names, f"NYU samples under {join_uri(root, split)}")
