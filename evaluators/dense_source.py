"""Where a dense head's features come from: held in memory, or made from each batch's images.

Why two ways: the heads train for a number of steps on random batches of patch features. On a
small split (the synthetic scenes, a limited data set) the features are computed once and held:
each step is then a lookup. On a real one they do not fit: ADE20K's 20k training images at 512 px
are 2 MB of ViT-S/14 patch features each (40 GB in all; 107 GB for ViT-L/14), so the frozen
backbone runs on every batch's images instead, as the original's dense evaluations do, the
images decoded by a DataLoader's workers. Both give the head the same batches (the same rows in
the same order, features from the same backbone in eval mode, equal up to rounding), so the
choice is one of memory and time, not of results: :func:`feature_sources` holds the features when
they fit under a budget.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dinoflow.progress import progress
from evaluators.dense import Layers, class_counts, layer_count, patch_tokens, row_batches
from evaluators.feature_parts import join_rows
from evaluators.features import to_model_input

HOLD_BATCH = 64  # images per batch of the pass that makes held features
Rows = Sequence[int] | Tensor


@dataclass(frozen=True)
class FeatureSource:
    """A dense split (items: uint8 image ``(3, S, S)``, labels ``(S, S)``) seen through a frozen
    backbone's last ``layers`` blocks (or the blocks it lists), through its final LayerNorm or not
    (``norm``: segmentation's features are, depth's are not; :func:`~evaluators.dense.patch_tokens`):
    ``held`` (patch features, CLS tokens, labels of every item, on the CPU) or None for features
    made per batch."""

    split: Dataset[tuple[Tensor, Tensor]]
    backbone: nn.Module
    layers: Layers = 1
    amp_dtype: torch.dtype | None = None
    num_workers: int = 0
    norm: bool = True
    held: tuple[Tensor, Tensor, Tensor] | None = None

    def __len__(self) -> int:
        return len(self.split)  # type: ignore[arg-type]

    @property
    def channels(self) -> int:
        """The patch features' channels, ``layers * D``: a head's input."""
        return layer_count(self.layers) * int(self.backbone.embed_dim)

    def inputs(self, rows: Iterable[Rows]) -> Iterator[tuple[Tensor, Tensor]]:
        """(model input on the backbone's device, labels) of each group of rows, decoded by the
        split's loader; the uint8 images moved to the device, then normalised there
        (:func:`~evaluators.features.to_model_input`)."""
        device = next(self.backbone.parameters()).device
        loader = DataLoader(self.split, batch_sampler=[[int(i) for i in r] for r in rows],
                            num_workers=self.num_workers, pin_memory=device.type == "cuda")
        for images, labels in loader:
            yield to_model_input(images.to(device, non_blocking=True), patch_size=int(self.backbone.patch_size)), labels

    def whole_images(self) -> Iterator[tuple[Tensor, Tensor]]:
        """(uint8 image ``(3, H, W)`` on the backbone's device, labels) of every item in order, one
        at a time (whole images differ in size: :class:`~evaluators.dense_datasets.Fit` ``whole``),
        decoded by the split's loader."""
        device = next(self.backbone.parameters()).device
        loader = DataLoader(self.split, batch_size=None, num_workers=self.num_workers, pin_memory=device.type == "cuda")
        for image, labels in progress(loader, desc="test images", total=len(self), unit="image"):
            yield image.to(device, non_blocking=True), labels

    def batches(self, rows: Iterable[Rows]) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """(patch features, CLS tokens, labels) of each group of rows, in order: looked up when
        held, else the backbone's on the rows' images (on its device)."""
        if self.held is not None:  # the rows of keys (:func:`~evaluators.dense.head_batches`): key % len
            for r in rows:
                index = torch.as_tensor(r) % len(self)
                yield tuple(t[index] for t in self.held)  # type: ignore[misc]
            return
        for images, labels in self.inputs(rows):
            yield (*patch_tokens(self.backbone, images, self.layers, self.amp_dtype, self.norm), labels)

    def class_counts(self, num_classes: int) -> Tensor:
        """Pixels of each class in the split's masks (:func:`~evaluators.dense.class_counts`), from
        the held labels or a pass that decodes only the masks."""
        if self.held is not None:
            return class_counts(self.held[2], num_classes)
        loader = DataLoader(_Labels(self.split), batch_size=HOLD_BATCH, num_workers=self.num_workers)
        total = torch.zeros(num_classes, dtype=torch.long)
        for masks in progress(loader, desc="class counts", unit="batch"):
            total += class_counts(masks, num_classes)
        return total


class _Labels(Dataset[Tensor]):
    """A split's labels alone (its ``label(i)``): no image decoded."""

    def __init__(self, split: Dataset[tuple[Tensor, Tensor]]) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Tensor:
        return self.split.label(index)  # type: ignore[attr-defined]


def feature_bytes(backbone: nn.Module, count: int, side: int, layers: Layers) -> int:
    """Bytes of float32 patch features and CLS tokens of ``count`` images ``side`` pixels square."""
    patches = (side // int(backbone.patch_size)) ** 2
    return 4 * count * layer_count(layers) * int(backbone.embed_dim) * (patches + 1)


def hold(source: FeatureSource) -> FeatureSource:
    """``source`` with every item's features computed once, in order, and held on the CPU (each
    batch copied in as it comes: the budget's bytes once, not twice)."""
    rows = row_batches(len(source), HOLD_BATCH)
    batches = progress(source.batches(rows), desc="dense features", total=len(rows), unit="batch")
    held = join_rows(({"patches": p.cpu(), "cls": c.cpu(), "labels": y} for p, c, y in batches), len(source))
    return replace(source, held=(held["patches"], held["cls"], held["labels"]))


def feature_sources(backbone: nn.Module, splits: Sequence[Dataset[tuple[Tensor, Tensor]]], layers: Layers,
                    amp_dtype: torch.dtype | None, num_workers: int, budget_bytes: float,
                    read: Sequence[bool] | None = None, norm: bool = True) -> list[FeatureSource]:
    """One source per split (features through the final LayerNorm or not: ``norm``); the splits
    whose features are ``read`` (default: all; +ms scores its test split from the images at other
    scales, never from these features) all held when their features fit in ``budget_bytes``
    together, else all made per batch (a split's side is read from its first item)."""
    sources = [FeatureSource(split, backbone, layers, amp_dtype, num_workers, norm) for split in splits]
    read = [True] * len(sources) if read is None else list(read)
    needed = sum(feature_bytes(backbone, len(s), int(s.split[0][0].shape[-1]), layers)
                 for s, wanted in zip(sources, read, strict=True) if wanted)
    if needed > budget_bytes:
        return sources
    return [hold(s) if wanted else s for s, wanted in zip(sources, read, strict=True)]
