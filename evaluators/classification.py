"""Labelled images for the k-NN and linear benchmarks: Fashion-MNIST, folders of class folders, or a released set.

Why: a backbone pretrained on one's own images is judged on one's own labels (or on ImageNet),
not only on Fashion-MNIST. A folder source uses the layout torchvision's ``ImageFolder`` and the
original's evaluation read, ``<uri>/train/<class>/<image>`` and ``<uri>/val/<class>/<image>``
(``test/`` when there is no ``val/``); the classes are the train split's subfolders, sorted. A
set as released (iNaturalist, Food-101, CIFAR, ...: :mod:`evaluators.released_sets`) is read by
its own split lists instead. Its images are prepared as the original's evaluation prepares them: the shorter side resized to
``image_size / 0.875`` (256 px for 224), the centre ``image_size`` square kept. They stream
through the backbone in batches, so only the features are held (ImageNet's 1.28M train images
are 2 GB of ViT-S/14 features, 190 GB of pixels). Undecodable images are skipped and counted; more
than ``MAX_BAD_FRACTION`` of a split stops the benchmark naming some.

With a limit, a split keeps a seeded random subset (a folder lists its images class by class,
so its first N would hold the first classes only); Fashion-MNIST keeps its first N, as before.

Scoring (:func:`evaluators.report.classification_report`) follows the original: k-NN on the final
CLS token; the linear probe on each of its four views of the frozen backbone (the last block's CLS
token or the last 4 blocks' concatenated, each with or without the mean of the last block's patch
tokens), the view whose probe wins on the held-out split reported.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from dinoflow.storage import Storage, join_uri
from evaluators.attention import ATTENTION_IMAGES, garment_foreground
from evaluators.feature_parts import FeatureParts, in_parts, join_rows, text_of, text_tensor
from evaluators.features import extract_features, to_model_input
from evaluators.imagenet_val import flat_val_images, flat_val_labels
from evaluators.released_sets import release_at, release_datasets
from trainer.data.datasets import BadImageTracker, ImageFolderDataset, ImageListDataset, collate_samples
from trainer.data.fashion_mnist import CLASSES as FASHION_MNIST_CLASSES
from trainer.data.fashion_mnist import FILES, load_split
from trainer.models.classifier import CENTRE_CROP, WHOLE

DataKind = Literal["auto", "fashion_mnist", "folder", "release"]
DATA_KINDS = ("auto", "fashion_mnist", "folder")
CROP_RATIO = 0.875  # the original's evaluation: resize to 256, centre crop 224
MAX_BAD_FRACTION = 0.05
PROBE_VIEWS = ("last1", "last1+avgpool", "last4", "last4+avgpool")  # the original's linear inputs


def eval_load_size(image_size: int) -> int:
    """The side images are decoded at before their centre ``image_size`` square is kept: the
    original's evaluation transform (256 for 224, :data:`CROP_RATIO`)."""
    return round(image_size / CROP_RATIO)


@dataclass(frozen=True)
class LabelledFeatures:
    """Frozen features of both splits and what the report shows beside them."""

    train_x: Tensor  # (N, D): the final CLS token
    train_y: Tensor  # (N,) int64
    test_x: Tensor  # (M, D)
    test_y: Tensor  # (M,)
    classes: tuple[str, ...]
    views: tuple[Tensor, Tensor] | None  # with views: (N, (b + 1) D) and (M, ...), :func:`view`'s input
    test_images: Tensor  # the first ATTENTION_IMAGES test images, uint8 as the backbone saw them
    foreground: Tensor | None  # their foreground where known (Fashion-MNIST: the garments' silhouettes)
    pixels: tuple[Tensor, Tensor] | None  # Fashion-MNIST's raw-pixel train and test features: the baseline
    bad: dict[str, int]  # undecodable images skipped per split
    test_classes: Tensor | None = None  # the train classes a separate test set holds, its scores restricted to them


def data_kind(uri: str, storage: Storage) -> Literal["fashion_mnist", "folder", "release"]:
    """The kind of labelled data at ``uri``: Fashion-MNIST's files, a data set as released
    (:func:`~evaluators.released_sets.release_at`), else ``train/`` class folders."""
    return _found_data(uri, storage)[0]


def _found_data(uri: str, storage: Storage) -> tuple[Literal["fashion_mnist", "folder", "release"], str | None]:
    """:func:`data_kind` with the release's name when it is one, found by one look at ``uri``."""
    if storage.exists(join_uri(uri, FILES["train"][0])):
        return "fashion_mnist", None
    if name := release_at(uri, storage):
        return "release", name
    if storage.list(join_uri(uri, "train")):
        return "folder", None
    raise ValueError(f"{uri} holds neither Fashion-MNIST ({', '.join(FILES['train'] + FILES['test'])}), nor a "
                     "released set evaluators/released_sets.py reads (iNaturalist, Food-101, CIFAR, ...), nor "
                     "train/<class>/ image folders (with val/<class>/ or test/<class>/ beside)")


def view(features: Tensor, name: str, dim: int) -> Tensor:
    """One of :data:`PROBE_VIEWS` of ``features`` ``(N, (b + 1) D)``: the CLS tokens of the last
    ``b`` blocks (in block order, the last one last), then the last block's mean patch token. Each
    view is a run of adjacent columns (the last CLS sits next to the mean), so it is a slice of
    ``features``, never a copy (ImageNet's with ViT-L/14: up to 26 GB)."""
    blocks = features.shape[1] // dim - 1
    start = (blocks - 1) * dim if name.startswith("last1") else 0
    return features[:, start : features.shape[1] if name.endswith("+avgpool") else blocks * dim]


def labelled_images(uri: str, kind: DataKind, storage: Storage, train_limit: int = 0, test_limit: int = 0,
                    image_size: int = 224, seed: int = 0, num_workers: int = 0, test_uri: str = "") -> LabelledImages:
    """Both splits of the labelled data at ``uri`` (``kind`` auto: :func:`data_kind`), found and
    checked once: training scores the same images at every evaluation, so it reads Fashion-MNIST's
    files and lists a folder's images once, not at each pass (class folders: decoded by
    ``num_workers`` processes at each pass).

    ``test_uri``: a test set of class folders of its own instead of ``<uri>/val`` (ImageNet-A, -R,
    -Sketch, -C beside ImageNet's train split), its classes among train's; holding fewer, it is
    scored over its own classes only (:attr:`LabelledFeatures.test_classes`), as ImageNet-A and -R
    are over their 200."""
    resolved, name = _found_data(uri, storage) if kind == "auto" else (kind, None)
    if test_uri and resolved != "folder":
        holds = "Fashion-MNIST" if resolved == "fashion_mnist" else "a released set"
        raise ValueError(f"test_uri {test_uri!r} is a test set of class folders, for a train split of class "
                         f"folders; {uri} holds {holds}, whose test split is its own")
    if resolved == "release":
        name = name or release_at(uri, storage)
        if name is None:
            raise ValueError(f"{uri} holds no released set evaluators/released_sets.py reads")
        return release_images(name, uri, storage, train_limit, test_limit, image_size, seed, num_workers)
    if resolved == "fashion_mnist":
        splits = [load_split(storage, uri, split) for split in ("train", "test")]  # type: ignore[arg-type]
        (train, train_y), (test, test_y) = ((torch.from_numpy(data.images[: limit or len(data.images)]),
                                             torch.from_numpy(data.labels[: limit or len(data.labels)]))
                                            for data, limit in zip(splits, (train_limit, test_limit)))
        return FashionMnistImages(train, train_y, test, test_y)
    train = ImageFolderDataset(storage, join_uri(uri, "train"), eval_load_size(image_size))
    if not train.classes:
        raise ValueError(f"{join_uri(uri, 'train')}: every image must lie in a class folder, train/<class>/<image>")
    separate = bool(test_uri)
    test_uri = test_uri or (join_uri(uri, "val") if storage.list(join_uri(uri, "val")) else join_uri(uri, "test"))
    test, remap = _test_split(test_uri, train.classes, storage, image_size, test_limit, seed)
    restricted = separate and len(remap) < len(train.classes)
    return FolderImages(limited(train, train_limit, seed), test, train.classes, remap, image_size, num_workers,
                        restricted)


def release_images(name: str, root: str, storage: Storage, train_limit: int = 0, test_limit: int = 0,
                   image_size: int = 224, seed: int = 0, num_workers: int = 0) -> FolderImages:
    """Release ``name`` at ``root`` (:mod:`evaluators.released_sets`) listed for the feature pass as
    class folders are: a limit keeps a seeded random subset, images prepared as the folders' are."""
    classes, train, test = release_datasets(name, root, storage, eval_load_size(image_size), seed)
    return FolderImages(limited(train, train_limit, seed), limited(test, test_limit, seed), classes, None,
                        image_size, num_workers)


def limited(dataset: Dataset, limit: int, seed: int) -> Subset:
    """All of ``dataset``, or with a limit below its size a seeded random subset, in listing order."""
    rows = np.arange(len(dataset))
    if limit and limit < len(rows):
        rows = np.sort(np.random.default_rng(seed).permutation(len(rows))[:limit])
    return Subset(dataset, rows.tolist())


def _test_split(test_uri: str, classes: tuple[str, ...], storage: Storage, image_size: int, limit: int,
                seed: int, load: int = 0) -> tuple[Subset, Tensor]:
    """A test split's class folders (limited as :func:`limited`; decoded with the shorter side at
    ``load``, 0: ``image_size / 0.875``), refused unless its classes are among train's ``classes``,
    and the map of its class indices into train's. Folders named by class index instead (``0`` to
    ``999``: ImageNet-V2's release, its indices those of the sorted class names) are read as
    train's class of that index; ImageNet's validation images as released, flat, by the list beside
    them (:mod:`evaluators.imagenet_val`)."""
    load = load or eval_load_size(image_size)
    if flat := flat_val_images(storage, test_uri):
        labels = flat_val_labels(storage, test_uri, flat, classes)
        return limited(ImageListDataset(storage, flat, labels, load), limit, seed), torch.arange(len(classes))
    test = ImageFolderDataset(storage, test_uri, load)
    unknown = sorted(set(test.classes) - set(classes))
    if unknown and all(name.isdecimal() and int(name) < len(classes) for name in test.classes):
        return limited(test, limit, seed), torch.tensor([int(name) for name in test.classes])
    if unknown or not test.classes:
        raise ValueError(f"{test_uri}: classes {unknown or '(none: images outside class folders)'} are not "
                         f"among train's {len(classes)} class folders")
    return limited(test, limit, seed), torch.tensor([classes.index(name) for name in test.classes])


@dataclass(frozen=True)
class FashionMnistImages:
    """Fashion-MNIST's splits in memory (a limit keeps the first N, as the original files order them)."""

    train: Tensor  # (N, 28, 28) uint8
    train_y: Tensor
    test: Tensor
    test_y: Tensor
    classes: tuple[str, ...] = FASHION_MNIST_CLASSES
    test_classes = None  # the test split holds every class
    eval_transform = WHOLE  # as test_batches prepares images, recorded with a classifier (served alike)

    def features(self, backbone: nn.Module, views: bool = False, batch_size: int = 512,
                 amp_dtype: torch.dtype | None = None, parts: FeatureParts | None = None) -> LabelledFeatures:
        """The frozen features of both splits (with ``views``, also the linear probe's inputs,
        :func:`view`; ``amp_dtype``: the backbone under autocast; ``parts``: as
        :meth:`FolderImages.features`), the raw pixels as the baseline's features, the garments'
        silhouettes."""
        blocks = min(4, len(backbone.blocks)) if views else 1
        patch = int(backbone.patch_size)

        def split_features(split: str, images: Tensor) -> Tensor:
            def part(rows: list[int]) -> dict[str, Tensor]:
                inputs = to_model_input(images[rows], patch_size=patch)
                return {"features": extract_features(backbone, inputs, batch_size=batch_size, layers=blocks,
                                                     with_patch_mean=views, amp_dtype=amp_dtype)[0]}

            return join_rows(in_parts(split, len(images), parts, part), len(images))["features"]

        if parts is not None:
            parts.claim()
        train_f, test_f = split_features("train", self.train), split_features("test", self.test)
        shown = self.test[:ATTENTION_IMAGES]
        return _labelled(train_f, self.train_y, test_f, self.test_y, self.classes, backbone, views, shown,
                         garment_foreground(shown), (self.train.flatten(1).float(), self.test.flatten(1).float()),
                         {"train": 0, "test": 0})

    def test_batches(self, device: torch.device, patch_size: int, size: int | None = None,
                     batch_size: int = 256) -> Iterator[tuple[Tensor, Tensor]]:
        """The test split as model input on ``device`` (resized to ``size``, None: 28) with its
        labels, a batch at a time: what a trained classifier is scored on."""
        for start in range(0, len(self.test), batch_size):
            rows = slice(start, start + batch_size)
            yield to_model_input(self.test[rows].to(device), size, patch_size), self.test_y[rows]


@dataclass(frozen=True)
class FolderImages:
    """Class folders' image lists (a limit keeps a seeded random subset), decoded as each feature
    pass streams them; ``remap`` maps the test split's class indices into train's (None: they are
    train's, as in released sets' lists and Pascal VOC's, :mod:`evaluators.released_sets`,
    :mod:`evaluators.multilabel`)."""

    train: Subset
    test: Subset
    classes: tuple[str, ...]
    remap: Tensor | None
    image_size: int
    eval_transform = CENTRE_CROP  # as test_batches prepares images, recorded with a classifier (served alike)
    num_workers: int = 0  # decoding processes
    restricted: bool = False  # a separate test set of fewer classes: scored over its classes only

    def features(self, backbone: nn.Module, views: bool = False, batch_size: int = 128,
                 amp_dtype: torch.dtype | None = None, parts: FeatureParts | None = None) -> LabelledFeatures:
        """The frozen features of both splits' centre crops (with ``views``, also the linear probe's
        inputs, :func:`view`; ``amp_dtype``: the backbone under autocast), the undecodable images of
        each counted; with ``parts``, made and saved a part at a time, the parts saved there by an
        earlier pass of the same features loaded instead (:mod:`evaluators.feature_parts`)."""
        if parts is not None:
            parts.claim()
        train, train_bad = self._split_rows("train", self.train, None, 0, backbone, views, batch_size, amp_dtype,
                                            parts)
        test, test_bad = self._split_rows("test", self.test, self.remap, ATTENTION_IMAGES, backbone, views,
                                          batch_size, amp_dtype, parts)
        return _labelled(train["features"], train["labels"], test["features"], test["labels"], self.classes,
                         backbone, views, test["kept"], None, None, {"train": train_bad, "test": test_bad},
                         self.test_classes)

    def with_test(self, test_uri: str, storage: Storage, test_limit: int = 0, seed: int = 0,
                  load: int = 0) -> FolderImages:
        """The same train split with ``test_uri``'s class folders as its test split (checked, remapped
        and, holding fewer classes, restricted as :func:`labelled_images`' ``test_uri``): a further
        test set, an ImageNet-C folder, without listing the train split again. ``load``: the shorter
        side its images are decoded at before the centre crop (0: ``image_size / 0.875``, as val's)."""
        test, remap = _test_split(test_uri, self.classes, storage, self.image_size, test_limit, seed, load)
        return replace(self, test=test, remap=remap, restricted=len(remap) < len(self.classes))

    def test_features(self, trained: LabelledFeatures, backbone: nn.Module, batch_size: int = 128,
                      amp_dtype: torch.dtype | None = None) -> LabelledFeatures:
        """``trained`` (both splits' features, :meth:`features`'s) with this test split's features in
        place of its test split's, taken as trained's were (with views when it has them): classifiers
        trained once on the train split score a further test set, its features alone made here."""
        views = trained.views is not None
        test, bad = self._split_rows("test", self.test, self.remap, 0, backbone, views, batch_size, amp_dtype, None)
        train_f = trained.views[0] if trained.views is not None else trained.train_x
        return _labelled(train_f, trained.train_y, test["features"], test["labels"], self.classes, backbone, views,
                         test["kept"], None, None, {"train": trained.bad.get("train", 0), "test": bad},
                         self.test_classes)

    def _split_rows(self, split: str, subset: Subset, remap: Tensor | None, keep: int, backbone: nn.Module,
                    views: bool, batch_size: int, amp_dtype: torch.dtype | None,
                    parts: FeatureParts | None) -> tuple[dict[str, Tensor], int]:
        """The split's features and labels and its first ``keep`` images' pixels (``kept``), and how
        many of its images were undecodable: counted against the limit for the split (not for each
        part)."""
        blocks = min(4, len(backbone.blocks)) if views else 1
        patch = int(getattr(backbone, "patch_size", 14))
        if self.image_size <= 0 or self.image_size % patch:
            raise ValueError(f"image_size {self.image_size} is not a positive multiple of the patch size {patch}")
        tracker = BadImageTracker(MAX_BAD_FRACTION)
        kept: list[Tensor] = []

        def part(rows: list[int]) -> dict[str, Tensor]:
            loader = DataLoader(Subset(subset.dataset, [subset.indices[r] for r in rows]), batch_size=batch_size,
                                num_workers=self.num_workers, collate_fn=collate_samples)
            shown = keep - sum(len(k) for k in kept)  # the first test images' pixels still wanted
            batches = _ModelInput(loader, self.image_size, patch, remap, next(backbone.parameters()).device,
                                  keep=shown)
            return self._part(batches, backbone, blocks, views, amp_dtype)

        def tallied(pieces: Iterator[dict[str, Tensor]]) -> Iterator[dict[str, Tensor]]:
            for piece in pieces:
                tracker.add(len(piece["labels"]), text_of(piece.pop("bad_keys")).splitlines())
                kept.append(piece.pop("kept"))
                yield piece

        joined = join_rows(tallied(in_parts(split, len(subset), parts, part)), len(subset))
        tracker.check(final=True)
        return {**joined, "kept": torch.cat(kept)}, tracker.bad

    @property
    def test_classes(self) -> Tensor | None:
        """The train classes a separate test set of fewer holds, its scores restricted to them; else None."""
        return self.remap.sort().values if self.restricted else None

    def test_batches(self, device: torch.device, patch_size: int, size: int | None = None,
                     batch_size: int = 128) -> Iterator[tuple[Tensor, Tensor]]:
        """The test split's centre crops as model input on ``device`` with their labels in train's
        class indices, a batch at a time (decoded by ``num_workers`` processes; more than
        ``MAX_BAD_FRACTION`` undecodable stops it); ``size``, when given, must be ``image_size``."""
        if size is not None and size != self.image_size:
            raise ValueError(f"the test images were listed for {self.image_size} px centre crops, not {size}")
        loader = DataLoader(self.test, batch_size=batch_size, num_workers=self.num_workers, collate_fn=collate_samples)
        yield from _ModelInput(loader, self.image_size, patch_size, self.remap, device)

    def _part(self, batches: _ModelInput, backbone: nn.Module, blocks: int, views: bool,
              amp_dtype: torch.dtype | None) -> dict[str, Tensor]:
        """One part's features, labels, undecodable images' keys and first ``batches.keep`` pixels."""
        features, labels = extract_features(backbone, batches, layers=blocks, with_patch_mean=views,
                                            amp_dtype=amp_dtype)
        assert labels is not None
        side = self.image_size
        kept = torch.cat(batches.kept) if batches.kept else torch.empty(0, 3, side, side, dtype=torch.uint8)
        return {"features": features, "labels": labels, "bad_keys": text_tensor("\n".join(batches.bad_keys)),
                "kept": kept[: batches.keep]}


LabelledImages = FashionMnistImages | FolderImages


def _labelled(train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor, classes: tuple[str, ...],
              backbone: nn.Module, views: bool, test_images: Tensor, foreground: Tensor | None,
              pixels: tuple[Tensor, Tensor] | None, bad: dict[str, int],
              test_classes: Tensor | None = None) -> LabelledFeatures:
    """The features as extracted (with views: every block's CLS and the patch mean) sorted out."""
    dim = int(backbone.embed_dim)
    final = (view(train_f, "last1", dim), view(test_f, "last1", dim)) if views else (train_f, test_f)
    return LabelledFeatures(final[0], train_y, final[1], test_y, classes, (train_f, test_f) if views else None,
                            test_images, foreground, pixels, bad, test_classes)


@dataclass
class _ModelInput:
    """A split's batches as centre-cropped model input with labels (``remap``: into train's class
    indices), its undecodable images' keys in ``bad_keys`` (a pass stops when more than
    ``MAX_BAD_FRACTION`` of them are); sized, so the feature bar shows its end."""

    loader: DataLoader
    image_size: int
    patch: int
    remap: Tensor | None
    device: torch.device  # the backbone's: the pixels go there as uint8 and are normalised there
    keep: int = 0  # how many of the first images' pixels to keep in ``kept``
    kept: list[Tensor] = field(default_factory=list)
    bad_keys: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        tracker = BadImageTracker(MAX_BAD_FRACTION)
        for batch in self.loader:
            tracker.update(batch)
            tracker.check()
            self.bad_keys.extend(batch.bad_keys)
            if not batch.keys:
                continue
            offset = (batch.images.shape[-1] - self.image_size) // 2
            pixels = batch.images[..., offset:offset + self.image_size, offset:offset + self.image_size]
            labels = batch.labels if self.remap is None else self.remap[batch.labels]
            if sum(len(k) for k in self.kept) < self.keep:
                self.kept.append(pixels)
            yield to_model_input(pixels.to(self.device), patch_size=self.patch), labels
