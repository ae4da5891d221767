"""Labelled images for the k-NN and linear benchmarks: Fashion-MNIST, or folders of class folders.

Why: a backbone pretrained on one's own images is judged on one's own labels (or on ImageNet),
not only on Fashion-MNIST. A folder source uses the layout torchvision's ``ImageFolder`` and the
original's evaluation read, ``<uri>/train/<class>/<image>`` and ``<uri>/val/<class>/<image>``
(``test/`` when there is no ``val/``); the classes are the train split's subfolders, sorted.
Its images are prepared as the original's evaluation prepares them: the shorter side resized to
``image_size / 0.875`` (256 px for 224), the centre ``image_size`` square kept. They stream
through the backbone in batches, so only the features are held (ImageNet's 1.28M train images
are 2 GB of ViT-S/14 features, 190 GB of pixels). Undecodable images are skipped and counted; more
than ``MAX_BAD_FRACTION`` of a split stops the benchmark naming some.

With a limit, a split keeps a seeded random subset (a folder lists its images class by class,
so its first N would hold the first classes only); Fashion-MNIST keeps its first N, as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from dinoflow.storage import Storage, join_uri
from evaluators.features import extract_features, labelled_features, to_model_input
from trainer.data.datasets import BadImageTracker, ImageFolderDataset, collate_samples
from trainer.data.fashion_mnist import CLASSES as FASHION_MNIST_CLASSES
from trainer.data.fashion_mnist import FILES, load_split

DataKind = Literal["auto", "fashion_mnist", "folder"]
DATA_KINDS = ("auto", "fashion_mnist", "folder")
CROP_RATIO = 0.875  # the original's evaluation: resize to 256, centre crop 224
MAX_BAD_FRACTION = 0.05


@dataclass(frozen=True)
class LabelledFeatures:
    """Frozen features of both splits and what the report shows beside them."""

    train_x: Tensor  # (N, F)
    train_y: Tensor  # (N,) int64
    test_x: Tensor  # (M, F)
    test_y: Tensor  # (M,)
    classes: tuple[str, ...]
    test_images: Tensor | None  # Fashion-MNIST's test images (N, 28, 28) uint8, for the attention figures
    pixels: tuple[Tensor, Tensor] | None  # Fashion-MNIST's raw-pixel train and test features: the baseline
    bad: dict[str, int]  # undecodable images skipped per split


def data_kind(uri: str, storage: Storage) -> Literal["fashion_mnist", "folder"]:
    """The kind of labelled data at ``uri``: Fashion-MNIST's files, else ``train/`` class folders."""
    if storage.exists(join_uri(uri, FILES["train"][0])):
        return "fashion_mnist"
    if storage.list(join_uri(uri, "train")):
        return "folder"
    raise ValueError(f"{uri} holds neither Fashion-MNIST ({', '.join(FILES['train'] + FILES['test'])}) nor "
                     "train/<class>/ image folders (with val/<class>/ or test/<class>/ beside)")


def labelled_features_of(backbone: nn.Module, uri: str, kind: DataKind, storage: Storage, train_limit: int = 0,
                         test_limit: int = 0, image_size: int = 224, batch_size: int = 128, num_workers: int = 0,
                         seed: int = 0) -> LabelledFeatures:
    """Features of the train and test splits at ``uri`` (``kind`` auto: :func:`data_kind`)."""
    resolved = data_kind(uri, storage) if kind == "auto" else kind
    if resolved == "fashion_mnist":
        return _fashion_mnist(backbone, uri, storage, train_limit, test_limit)
    patch = int(getattr(backbone, "patch_size", 14))
    if image_size <= 0 or image_size % patch:
        raise ValueError(f"image_size {image_size} is not a positive multiple of the patch size {patch}")
    train = ImageFolderDataset(storage, join_uri(uri, "train"), round(image_size / CROP_RATIO))
    if not train.classes:
        raise ValueError(f"{join_uri(uri, 'train')}: every image must lie in a class folder, train/<class>/<image>")
    test_uri = join_uri(uri, "val") if storage.list(join_uri(uri, "val")) else join_uri(uri, "test")
    test = ImageFolderDataset(storage, test_uri, round(image_size / CROP_RATIO))
    unknown = sorted(set(test.classes) - set(train.classes))
    if unknown or not test.classes:
        raise ValueError(f"{test_uri}: classes {unknown or '(none: images outside class folders)'} are not "
                         f"among train's {len(train.classes)} class folders")
    remap = torch.tensor([train.classes.index(name) for name in test.classes])
    split_batches = {}
    for split, dataset, limit in (("train", train, train_limit), ("test", test, test_limit)):
        rows = np.arange(len(dataset))
        if limit and limit < len(rows):
            rows = np.sort(np.random.default_rng(seed).permutation(len(rows))[:limit])
        loader = DataLoader(Subset(dataset, rows.tolist()), batch_size=batch_size, num_workers=num_workers,
                            collate_fn=collate_samples)
        split_batches[split] = _ModelInput(loader, image_size, patch, remap if split == "test" else None)
    device = next(backbone.parameters()).device
    train_x, train_y = extract_features(backbone, split_batches["train"], device=device)
    test_x, test_y = extract_features(backbone, split_batches["test"], device=device)
    assert train_y is not None and test_y is not None
    return LabelledFeatures(train_x, train_y, test_x, test_y, train.classes, None, None,
                            {split: batches.bad for split, batches in split_batches.items()})


@dataclass
class _ModelInput:
    """A split's batches as centre-cropped model input with labels (``remap``: into train's class
    indices), its undecodable images counted in ``bad``; sized, so the feature bar shows its end."""

    loader: DataLoader
    image_size: int
    patch: int
    remap: Tensor | None
    bad: int = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        tracker = BadImageTracker(MAX_BAD_FRACTION)
        for batch in self.loader:
            tracker.update(batch)
            tracker.check()
            if not batch.keys:
                continue
            offset = (batch.images.shape[-1] - self.image_size) // 2
            pixels = batch.images[..., offset:offset + self.image_size, offset:offset + self.image_size]
            labels = batch.labels if self.remap is None else self.remap[batch.labels]
            yield to_model_input(pixels, patch_size=self.patch), labels
        tracker.check(final=True)
        self.bad = tracker.bad


def _fashion_mnist(backbone: nn.Module, uri: str, storage: Storage, train_limit: int,
                   test_limit: int) -> LabelledFeatures:
    parts = {}
    for split, limit in (("train", train_limit), ("test", test_limit)):
        data = load_split(storage, uri, split)  # type: ignore[arg-type]
        images = torch.from_numpy(data.images[: limit or len(data.images)])
        parts[split] = images, torch.from_numpy(data.labels[: len(images)])
    (train, train_y), (test, test_y) = parts["train"], parts["test"]
    patch = int(backbone.patch_size)
    train_x, test_x = labelled_features(backbone, train, patch), labelled_features(backbone, test, patch)
    return LabelledFeatures(train_x, train_y, test_x, test_y, FASHION_MNIST_CLASSES, test,
                            (train.flatten(1).float(), test.flatten(1).float()), {"train": 0, "test": 0})
