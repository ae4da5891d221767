"""Dense adapters read small fixtures written in each data set's own on-disk format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinoflow.storage import Storage
from evaluators.dense_datasets import load_ade20k, load_nyu, load_voc


def _jpg(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _png(path: Path, labels: np.ndarray, palette: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(labels.astype(np.uint8), mode="L")
    if palette:
        image = image.convert("P")
        image.putpalette([v for i in range(256) for v in (i, (i * 7) % 256, (i * 13) % 256)])
    image.save(path)


def test_ade20k_layout_and_reduced_labels(tmp_path: Path) -> None:
    for i in range(3):
        _jpg(tmp_path / "images" / "validation" / f"ADE_val_{i:08d}.jpg", i)
        labels = np.zeros((30, 40), np.uint8)
        labels[:, 20:] = 150
        labels[10:20, :10] = 1
        _png(tmp_path / "annotations" / "validation" / f"ADE_val_{i:08d}.png", labels, palette=False)
    split = load_ade20k(Storage(), str(tmp_path), "validation", size=16, limit=2)
    assert split.images.shape == (2, 3, 16, 16) and split.labels.shape == (2, 16, 16)
    assert set(np.unique(split.labels)) == {0, 149, 255}  # 1 -> 0, 150 -> 149, "other" -> ignore
    assert split.names == ["ADE_val_00000000", "ADE_val_00000001"]
    with pytest.raises(ValueError, match="training or validation"):
        load_ade20k(Storage(), str(tmp_path), "val", 16)


def test_voc_layout_keeps_boundaries_ignored(tmp_path: Path) -> None:
    ids = ["2007_000032", "2007_000039"]
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    for i, name in enumerate(ids):
        _jpg(tmp_path / "JPEGImages" / f"{name}.jpg", i)
        labels = np.full((30, 40), 15, np.uint8)
        labels[:, :5] = 255
        labels[:, 35:] = 0
        _png(tmp_path / "SegmentationClass" / f"{name}.png", labels, palette=True)
    split = load_voc(Storage(), str(tmp_path), "val", size=20)
    assert split.names == ids and set(np.unique(split.labels)) == {0, 15, 255}
    with pytest.raises(FileNotFoundError, match="splits: train, val"):
        load_voc(Storage(), str(tmp_path), "train", 20)


def test_nyu_npz_layout(tmp_path: Path) -> None:
    (tmp_path / "test").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        depth = rng.uniform(0.5, 9.5, (24, 32)).astype(np.float32)
        depth[0] = 0
        np.savez(tmp_path / "test" / f"{i:05d}.npz", image=rng.integers(0, 255, (24, 32, 3), dtype=np.uint8),
                 depth=depth)
    split = load_nyu(Storage(), str(tmp_path), "test", size=16)
    assert split.images.shape == (2, 3, 16, 16) and split.labels.dtype == np.float32
    assert split.labels.max() <= 9.5 and (split.labels == 0).any() and split.labels.max() > 5
    np.savez(tmp_path / "test" / "bad.npz", image=np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="needs arrays 'image' and 'depth'"):
        load_nyu(Storage(), str(tmp_path), "test", 16)
