"""Linear heads on frozen patch features: semantic segmentation and monocular depth.

Why no mmseg: DINOv2's dense evaluations run through mmcv/mmseg, a heavy stack its users
struggle to install. The heads are small, so they are written here in plain PyTorch and train
on features extracted once:

* **Segmentation** (the original's "linear"): BatchNorm + 1x1 convolution over patch features
  (the last layer, or the last 4 concatenated), logits upsampled bilinearly to the mask size,
  cross-entropy with ignore index 255, each class weighted by
  ``(1 / pixel frequency) ** class_balance`` (0 gives the original's plain loss; the default 0.5
  keeps a dominant class, like the synthetic scenes' ground plane at 80 % of pixels, from
  drowning the rest: mIoU weighs every class alike). "+ms" testing averages the softmax over
  input scales and horizontal flips (features re-extracted per scale).
* **Depth** (the original's linear head): each patch feature concatenated with the CLS token,
  upsampled x4, BatchNorm + 1x1 convolution to ``B`` depth bins (uniform over
  ``[min_depth, max_depth]``); the depth is the softmax-weighted mean of the bin centres,
  upsampled to the target size. Trained with the scale-invariant log loss
  ``10 * sqrt(mean(g^2) - 0.85 mean(g)^2)``, ``g = log d - log d*`` over valid pixels.

Both are trained for a number of AdamW steps (the original counts iterations too) on seeded
mini-batches, on a given device (the backbone's: a GPU's for real data sets); the features stay
on the CPU and each batch goes over. They are scored (:mod:`evaluators.dense_metrics`) a few test
images at a time, the confusion matrix and the depth sums added up: a test set's per-pixel
outputs (ADE20K's 2000 validation images x 150 classes at 512 px: 300 GB) are never held at once.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinoflow.progress import progress
from evaluators.dense_metrics import (
    IGNORE_INDEX,
    depth_scores_of,
    depth_tally,
    segmentation_confusion,
    segmentation_scores,
)
from evaluators.features import under_autocast
from evaluators.linear import epoch_batches

EVAL_BATCH = 4  # test images scored at once


@torch.no_grad()
def dense_features(backbone: nn.Module, images: Tensor, layers: int = 1, batch_size: int = 64,
                   amp_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Patch features ``(N, L*D, h, w)`` and CLS tokens ``(N, L*D)`` of the last ``layers`` blocks
    for model input ``images`` ``(N, 3, H, W)``, float32 on the CPU (``amp_dtype``: the backbone
    under autocast)."""
    device = next(backbone.parameters()).device
    patches, classes = [], []
    for start in range(0, len(images), batch_size):
        with under_autocast(device, amp_dtype):
            out = backbone.get_intermediate_layers(images[start : start + batch_size].to(device), n=layers,
                                                   reshape=True, return_class_token=True)
        patches.append(torch.cat([p for p, _ in out], dim=1).float().cpu())
        classes.append(torch.cat([c for _, c in out], dim=1).float().cpu())
    return torch.cat(patches), torch.cat(classes)


@dataclass(frozen=True)
class HeadConfig:
    """Training of a dense head on frozen features: ``steps`` mini-batches of ``batch_size``
    (epochs of seeded shuffles, cut at ``steps``); ``class_balance`` is the segmentation loss's
    class-weight exponent (see the module docstring)."""

    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    class_balance: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or not 0 <= self.class_balance <= 1:
            raise ValueError(f"steps and batch_size must be >= 1, lr > 0 and class_balance in [0, 1], got {self}")


class LinearSegmentationHead(nn.Module):
    """BatchNorm + 1x1 conv: ``(B, F, h, w)`` features -> ``(B, C, H, W)`` logits."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.classifier = nn.Conv2d(in_channels, num_classes, 1)

    def forward(self, features: Tensor, size: tuple[int, int]) -> Tensor:
        return F.interpolate(self.classifier(self.norm(features)), size=size, mode="bilinear", align_corners=False)


class LinearDepthHead(nn.Module):
    """[patch, CLS] -> x4 upsampling -> BatchNorm + 1x1 conv to bins -> expected depth ``(B, H, W)``."""

    def __init__(self, in_channels: int, bins: int = 256, min_depth: float = 1e-3, max_depth: float = 10.0) -> None:
        super().__init__()
        if not 0 < min_depth < max_depth:
            raise ValueError(f"need 0 < min_depth < max_depth, got {min_depth}, {max_depth}")
        self.norm = nn.BatchNorm2d(2 * in_channels)
        self.classifier = nn.Conv2d(2 * in_channels, bins, 1)
        self.register_buffer("centres", torch.linspace(min_depth, max_depth, bins))

    def forward(self, patches: Tensor, cls: Tensor, size: tuple[int, int]) -> Tensor:
        # Bilinear upsampling and the per-pixel affine BatchNorm + 1x1 conv commute (interpolation
        # weights sum to 1), so the bins' logits are computed at patch resolution and upsampled x4:
        # the original's order gives the same logits at 16x the cost. The upsampling is written as
        # two small matrices that leave the bins last, where the softmax is cheapest on a CPU.
        x = torch.cat([patches, cls[:, :, None, None].expand_as(patches)], dim=1)
        rows, cols = (upsampling_matrix(n, 4).to(x) for n in patches.shape[-2:])
        logits = torch.einsum("bkhw,ih,jw->bijk", self.classifier(self.norm(x)), rows, cols)
        depth = logits.softmax(dim=-1) @ self.centres
        return F.interpolate(depth[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def upsampling_matrix(size: int, factor: int) -> Tensor:
    """``(factor * size, size)``: bilinear upsampling by ``factor`` along one axis (``align_corners=False``,
    as :func:`torch.nn.functional.interpolate`) as a matrix: the upsampled unit impulses."""
    return F.interpolate(torch.eye(size)[:, None], scale_factor=factor, mode="linear", align_corners=False)[:, 0].T


def silog_loss(prediction: Tensor, target: Tensor, variance_focus: float = 0.85) -> Tensor:
    """Scale-invariant log loss over pixels with ``target > 0``."""
    valid = target > 0
    g = torch.log(prediction[valid].clamp(min=1e-6)) - torch.log(target[valid])
    return 10 * torch.sqrt((g**2).mean() - variance_focus * g.mean() ** 2 + 1e-12)


def _batches(count: int, config: HeadConfig) -> list[Tensor]:
    # every epoch yields at least one batch, so ``steps`` epochs suffice; the generator stops early
    batches = epoch_batches(count, config.batch_size, config.steps, torch.Generator().manual_seed(config.seed))
    return list(itertools.islice(batches, config.steps))


def class_weights(masks: Tensor, num_classes: int, power: float) -> Tensor:
    """``(1 / frequency_c) ** power`` for the classes in ``masks`` (255 ignored), scaled to mean 1
    over them; classes absent from ``masks`` get 0 (no pixel of theirs is in the loss anyway)."""
    counts = torch.bincount(masks[masks != IGNORE_INDEX].long(), minlength=num_classes)[:num_classes].double()
    present = counts > 0
    weights = torch.where(present, (counts.sum() / counts.clamp(min=1)) ** power, torch.zeros_like(counts))
    return (weights / weights[present].mean()).float()


def train_segmentation_head(features: Tensor, masks: Tensor, num_classes: int, config: HeadConfig = HeadConfig(),
                            device: str | torch.device = "cpu") -> LinearSegmentationHead:
    """Fit the head on ``(N, F, h, w)`` features and ``(N, H, W)`` int masks (255 ignored), on ``device``."""
    torch.manual_seed(config.seed)
    head = LinearSegmentationHead(features.shape[1], num_classes).to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    size = tuple(masks.shape[-2:])
    weight = class_weights(masks, num_classes, config.class_balance).to(device)
    for index in progress(_batches(len(features), config), desc="segmentation head", unit="step"):
        loss = F.cross_entropy(head(features[index].to(device), size), masks[index].to(device).long(), weight=weight,
                               ignore_index=IGNORE_INDEX)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head.eval()


def row_batches(count: int, batch_size: int = EVAL_BATCH) -> Iterator[slice]:
    """Consecutive rows ``[start, start + batch_size)`` covering ``count``."""
    return (slice(start, start + batch_size) for start in range(0, count, batch_size))


def head_scores(head: nn.Module, features: Tensor, size: tuple[int, int]) -> Callable[[slice], Tensor]:
    """Rows of ``features`` -> the segmentation head's class scores at ``size``, on the head's device."""
    device = next(head.parameters()).device
    return lambda rows: head(features[rows].to(device), size)


@torch.no_grad()
def evaluate_segmentation(scores_of: Callable[[slice], Tensor], masks: Tensor, num_classes: int,
                          keep: int = 0) -> tuple[dict[str, float], Tensor]:
    """mIoU and pixel accuracy of the class maps ``scores_of(rows).argmax(1)`` (class scores or
    probabilities ``(b, C, H, W)`` of those test rows: :func:`head_scores`, or
    :func:`multiscale_probabilities` of the images), scored a few images at a time; also the first
    ``keep`` predicted class maps ``(keep, H, W)``, for pictures."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    kept: list[Tensor] = []
    for rows in row_batches(len(masks)):
        predicted = scores_of(rows).argmax(dim=1).cpu()
        confusion += segmentation_confusion(predicted, masks[rows], num_classes)
        kept.append(predicted[: max(0, keep - sum(len(k) for k in kept))])
    return segmentation_scores(confusion), torch.cat(kept)


@torch.no_grad()
def multiscale_probabilities(backbone: nn.Module, head: LinearSegmentationHead, images: Tensor, layers: int,
                             scales: Sequence[float] = (0.75, 1.0, 1.25), flip: bool = True,
                             amp_dtype: torch.dtype | None = None) -> Tensor:
    """Softmax averaged over input scales (sides rounded to the patch size) and flips, at input size
    (``amp_dtype``: the backbone under autocast)."""
    size = tuple(images.shape[-2:])
    patch = backbone.patch_size
    total = torch.zeros(0)
    for scale in scales:
        side = [max(patch, round(s * scale / patch) * patch) for s in size]
        scaled = F.interpolate(images, size=side, mode="bilinear", align_corners=False)
        for flipped in ([False, True] if flip else [False]):
            x = scaled.flip(-1) if flipped else scaled
            features = dense_features(backbone, x, layers, amp_dtype=amp_dtype)[0].to(next(head.parameters()).device)
            probabilities = head(features, size).softmax(dim=1)
            probabilities = probabilities.flip(-1) if flipped else probabilities
            total = probabilities if total.numel() == 0 else total + probabilities
    return total / (len(scales) * (2 if flip else 1))


def train_depth_head(patches: Tensor, cls: Tensor, depths: Tensor, config: HeadConfig = HeadConfig(),
                     bins: int = 256, min_depth: float = 1e-3, max_depth: float = 10.0,
                     device: str | torch.device = "cpu") -> LinearDepthHead:
    """Fit the head on features and ``(N, H, W)`` depth maps (0 = unknown) with the SiLog loss, on ``device``."""
    torch.manual_seed(config.seed)
    head = LinearDepthHead(patches.shape[1], bins, min_depth, max_depth).to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    size = tuple(depths.shape[-2:])
    for index in progress(_batches(len(patches), config), desc="depth head", unit="step"):
        loss = silog_loss(head(patches[index].to(device), cls[index].to(device), size), depths[index].to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head.eval()


@torch.no_grad()
def evaluate_depth(head: LinearDepthHead, patches: Tensor, cls: Tensor, depths: Tensor,
                   keep: int = 0) -> tuple[dict[str, float], Tensor]:
    """RMSE, AbsRel and delta1 of the head's depth against ``depths``, scored a few images at a
    time on the head's device; also the first ``keep`` predicted depth maps, for pictures."""
    device = next(head.parameters()).device
    tally = torch.zeros(4, dtype=torch.float64)
    kept: list[Tensor] = []
    for rows in row_batches(len(depths)):
        predicted = head(patches[rows].to(device), cls[rows].to(device), tuple(depths.shape[-2:])).cpu()
        tally += depth_tally(predicted, depths[rows])
        kept.append(predicted[: max(0, keep - sum(len(k) for k in kept))])
    return depth_scores_of(tally), torch.cat(kept)
