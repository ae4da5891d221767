"""Dataset adapters of the dense benchmarks, reading each data set's own on-disk layout.

Every split is a :class:`~torch.utils.data.Dataset` whose item ``i`` is an image ``(3, S, S)``
uint8 resized to ``size`` (bilinear) and its labels resized the same way (nearest): a class-index
mask ``(S, S)`` uint8 (255 = ignore) or a depth map ``(S, S)`` float32 in metres (0 = unknown).
A split lists its files when made (a missing split fails there) and decodes a sample when asked,
so a DataLoader's workers decode in parallel and nothing holds a whole split: ADE20K's 20k
training images are 16 GB of pixels at 512 px. Square resizing keeps the code and the heads
simple; it distorts aspect ratios, which the benchmark accepts for every backbone alike.

* **ADE20K** (``ADEChallengeData2016``): ``images/{training,validation}/*.jpg`` and
  ``annotations/{training,validation}/*.png`` (same stem). Label 0 ("other") is ignored and the
  150 classes become 0..149, as the original evaluation does (``reduce_zero_label``).
* **Pascal VOC 2012**: ids in ``ImageSets/Segmentation/{train,val}.txt``, images
  ``JPEGImages/<id>.jpg``, masks ``SegmentationClass/<id>.png`` (palette indices 0..20, 255 on
  object boundaries, kept as ignore).
* **Cityscapes** (``leftImg8bit_trainvaltest`` and ``gtFine_trainvaltest`` unpacked side by side):
  ``leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png`` and
  ``gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png``; the 34 label ids become the 19
  evaluated classes 0..18 (:data:`CITYSCAPES_TRAIN_IDS`, the data set's own ``trainId`` column),
  every other id ignored.
* **NYU-Depth v2** (this project's layout): ``{train,test}/*.npz``, each with ``image``
  ``(H, W, 3)`` uint8 and ``depth`` ``(H, W)`` float32 metres.

:class:`ArraySplit` serves arrays already in memory (the synthetic scenes) the same way.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import PurePosixPath

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from dinoflow.storage import Storage, join_uri
from trainer.data.datasets import ProcessLocalStorage

# Cityscapes' label id -> train id of its 19 evaluated classes (road, sidewalk, building, wall, fence, pole,
# traffic light, traffic sign, vegetation, terrain, sky, person, rider, car, truck, bus, train, motorcycle,
# bicycle); every other id is ignored
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                        26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
_CITYSCAPES_LOOKUP = np.full(256, 255, dtype=np.uint8)
_CITYSCAPES_LOOKUP[list(CITYSCAPES_TRAIN_IDS)] = list(CITYSCAPES_TRAIN_IDS.values())

# (read a file's bytes, the sample's files, side, decode the image too) -> (image or None, labels)
Decoder = Callable[[Callable[[str], bytes], tuple[str, ...], int, bool], tuple[np.ndarray | None, np.ndarray]]


class DenseSplit(Dataset[tuple[Tensor, Tensor]]):
    """One split of a data set on storage: per sample its files (``files[i]``, the image's first)
    and a decoder; :meth:`label` decodes the labels alone (the loss's class counts need no pixels)."""

    def __init__(self, storage: Storage, files: list[tuple[str, ...]], names: list[str], decode: Decoder,
                 size: int, what: str) -> None:
        if not files:
            raise FileNotFoundError(f"no {what} found")
        self._storage = ProcessLocalStorage(storage)
        self._files = files
        self._decode = decode
        self.names = names
        self.size = size

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, labels = self._decode(self._storage.get().read_bytes, self._files[index], self.size, True)
        return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(labels)

    def label(self, index: int) -> Tensor:
        return torch.from_numpy(self._decode(self._storage.get().read_bytes, self._files[index], self.size, False)[1])


class ArraySplit(Dataset[tuple[Tensor, Tensor]]):
    """Images ``(N, 3, S, S)`` uint8 and their labels ``(N, S, S)`` already in memory, served as a
    :class:`DenseSplit` serves files."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        if len(images) != len(labels) or not len(images):
            raise ValueError(f"need as many labels as images, at least one: got {len(images)} and {len(labels)}")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return torch.from_numpy(self.images[index]), torch.from_numpy(self.labels[index])

    def label(self, index: int) -> Tensor:
        return torch.from_numpy(self.labels[index])


def _image(data: bytes, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.array(image.convert("RGB").resize((size, size), Image.BILINEAR)).transpose(2, 0, 1)


def _mask(data: bytes, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        if image.mode not in ("L", "P"):
            raise ValueError(f"a mask must be a single-channel index PNG (mode L or P), got mode {image.mode}")
        return np.array(image.resize((size, size), Image.NEAREST), dtype=np.uint8)


def _ade20k_sample(read: Callable[[str], bytes], files: tuple[str, ...], size: int,
                   with_image: bool) -> tuple[np.ndarray | None, np.ndarray]:
    raw = _mask(read(files[1]), size)
    return (_image(read(files[0]), size) if with_image else None), np.where(raw == 0, 255, raw - 1).astype(np.uint8)


def _voc_sample(read: Callable[[str], bytes], files: tuple[str, ...], size: int,
                with_image: bool) -> tuple[np.ndarray | None, np.ndarray]:
    return (_image(read(files[0]), size) if with_image else None), _mask(read(files[1]), size)


def _cityscapes_sample(read: Callable[[str], bytes], files: tuple[str, ...], size: int,
                       with_image: bool) -> tuple[np.ndarray | None, np.ndarray]:
    return (_image(read(files[0]), size) if with_image else None), _CITYSCAPES_LOOKUP[_mask(read(files[1]), size)]


def _nyu_sample(read: Callable[[str], bytes], files: tuple[str, ...], size: int,
                with_image: bool) -> tuple[np.ndarray | None, np.ndarray]:
    uri = files[0]
    with np.load(io.BytesIO(read(uri)), allow_pickle=False) as data:
        if "image" not in data or "depth" not in data:
            raise ValueError(f"{uri}: an NYU sample needs arrays 'image' and 'depth', has {sorted(data)}")
        image, depth = data["image"], data["depth"].astype(np.float32)
    if image.ndim != 3 or image.shape[2] != 3 or depth.shape != image.shape[:2]:
        raise ValueError(f"{uri}: image {image.shape} must be (H, W, 3) and depth {depth.shape} (H, W)")
    resized = np.array(Image.fromarray(depth, mode="F").resize((size, size), Image.NEAREST))
    if not with_image:
        return None, resized
    return np.array(Image.fromarray(image).resize((size, size), Image.BILINEAR)).transpose(2, 0, 1), resized


def load_ade20k(storage: Storage, root: str, split: str, size: int, limit: int = 0) -> DenseSplit:
    """ADE20K images and masks (classes 0..149, 255 ignored) of ``split`` (training or validation)."""
    if split not in ("training", "validation"):
        raise ValueError(f"ADE20K split must be training or validation, got {split!r}")
    images = sorted(u for u in storage.list(join_uri(root, "images", split)) if u.endswith(".jpg"))
    images = images[:limit] if limit else images
    names = [PurePosixPath(uri).stem for uri in images]
    files = [(uri, join_uri(root, "annotations", split, f"{stem}.png")) for uri, stem in zip(images, names)]
    return DenseSplit(storage, files, names, _ade20k_sample, size,
                      f"ADE20K images under {join_uri(root, 'images', split)}")


def load_voc(storage: Storage, root: str, split: str, size: int, limit: int = 0) -> DenseSplit:
    """Pascal VOC 2012 segmentation images and masks (0..20, 255 ignored) of ``split`` (train or val)."""
    listing = join_uri(root, "ImageSets", "Segmentation", f"{split}.txt")
    if not storage.exists(listing):
        raise FileNotFoundError(f"VOC split list {listing} is missing (splits: train, val)")
    ids = [line.strip() for line in storage.read_bytes(listing).decode().splitlines() if line.strip()]
    ids = ids[:limit] if limit else ids
    files = [(join_uri(root, "JPEGImages", f"{i}.jpg"), join_uri(root, "SegmentationClass", f"{i}.png")) for i in ids]
    return DenseSplit(storage, files, ids, _voc_sample, size, f"VOC ids in {listing}")


def load_cityscapes(storage: Storage, root: str, split: str, size: int, limit: int = 0) -> DenseSplit:
    """Cityscapes images and fine masks (train ids 0..18, 255 ignored) of ``split`` (train or val)."""
    if split not in ("train", "val"):
        raise ValueError(f"Cityscapes split must be train or val (test's masks are withheld), got {split!r}")
    suffix = "_leftImg8bit.png"
    images = sorted(u for u in storage.list(join_uri(root, "leftImg8bit", split), recursive=True) if u.endswith(suffix))
    images = images[:limit] if limit else images
    names = [PurePosixPath(uri).name.removesuffix(suffix) for uri in images]
    files = [(uri, join_uri(root, "gtFine", split, PurePosixPath(uri).parent.name, f"{name}_gtFine_labelIds.png"))
             for uri, name in zip(images, names)]
    return DenseSplit(storage, files, names, _cityscapes_sample, size,
                      f"Cityscapes images (*{suffix}) under {join_uri(root, 'leftImg8bit', split)}")


def load_nyu(storage: Storage, root: str, split: str, size: int, limit: int = 0) -> DenseSplit:
    """NYU-Depth v2 images and depth maps (metres, 0 unknown) of ``split`` (train or test)."""
    samples = sorted(u for u in storage.list(join_uri(root, split)) if u.endswith(".npz"))
    samples = samples[:limit] if limit else samples
    return DenseSplit(storage, [(uri,) for uri in samples], [PurePosixPath(uri).stem for uri in samples], _nyu_sample,
                      size, f"NYU samples under {join_uri(root, split)}")
