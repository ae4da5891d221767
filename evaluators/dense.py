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
  input scales and horizontal flips (features re-extracted per scale): the original's ADE20K and VOC
  "ms" configs' (:data:`MS_SCALES`, the test images' shorter side at the crop's times 1 to 3, their
  windows half a crop apart). Its features are the blocks' outputs through the backbone's final
  LayerNorm, as the original's segmentation reads them.
* **Depth** (the original's linear head): each patch feature concatenated with the CLS token,
  upsampled x4, BatchNorm + 1x1 convolution to ``B`` depth bins (uniform over
  ``[min_depth, max_depth]``); the bins' weights are normalised linearly, as the original's
  default: ``p_k = relu(logit_k) + 0.1``, divided by their sum over the bins, and the depth is
  ``sum_k p_k * centre_k``, upsampled to the target size. Trained with the scale-invariant log loss
  ``10 * sqrt(mean(g^2) - 0.85 mean(g)^2)``, ``g = log d - log d*`` over valid pixels. Its
  features (and the DPT head's, :mod:`evaluators.dpt`) are the blocks' outputs without the final
  LayerNorm: the original's depth backbones call ``get_intermediate_layers`` with ``norm=False``.

Both are trained for a number of AdamW steps (the original counts iterations too) on seeded
mini-batches of (features, labels) (:func:`head_batches` picks the rows of each step; where the
features come from, held or computed per batch, is :mod:`evaluators.dense_source`'s business), on
a given device (the backbone's: a GPU's for real data sets). With :class:`HeadSaves` the training
saves its state every minute or so and a rerun goes on from the last save, asking only for the
batches it has not trained on (ADE20K's head, the backbone run on every batch, takes the better
part of an hour on a GPU): the resumed head is the head an unbroken run makes. They are scored
(:mod:`evaluators.dense_metrics`) a few test images at a time, the confusion matrix and the per-image
depth scores added up: a test set's per-pixel outputs (ADE20K's 2000 validation images x 150 classes at
512 px: 300 GB) are never held at once.
"""

from __future__ import annotations

import io
import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinoflow.progress import progress
from dinoflow.storage import Storage, claim, join_uri
from evaluators.dense_metrics import (
    IGNORE_INDEX,
    depth_scores_of,
    depth_tally,
    segmentation_confusion,
    segmentation_scores,
)
from evaluators.dpt import DPTDepthHead
from evaluators.features import patch_sides, under_autocast
from evaluators.linear import epoch_batches

EVAL_BATCH = 4  # test images scored at once
SAVE_EVERY_S = 60.0  # a head's training state saved at most this often (and at its end)
BIN_FLOOR = 0.1  # added to each depth bin's ReLU'd logit before they are normalised (the original's eps)
HEAD_STATE_FILE = "head_state.pt"
# +ms: the ratios of a test image's shorter side to the crop's (mmseg's img_ratios of the original's ADE20K and VOC
# "ms" configs, 640 px crops), each also flipped; its sliding windows half a window apart (their stride 320 of 640)
MS_SCALES = (1.0, 1.32, 1.73, 2.28, 3.0)


Layers = int | tuple[int, ...]  # the last n blocks, or these blocks


def layer_count(layers: Layers) -> int:
    """How many blocks ``layers`` names."""
    return layers if isinstance(layers, int) else len(layers)


# the blocks (0-based) the original's 4-layer depth heads read, by the released backbones' depths: ViT-S/B, L, g
ORIGINAL_DEPTH_BLOCKS = {12: (2, 5, 8, 11), 24: (4, 11, 17, 23), 40: (9, 19, 29, 39)}


def spaced_blocks(depth: int, count: int) -> Layers:
    """The ``count`` blocks a multi-layer depth head reads of a backbone of ``depth``: 4 of a
    released model's depth (12, 24 or 40), the original's table (:data:`ORIGINAL_DEPTH_BLOCKS`: it
    is written out, not a formula: ViT-L's 4, 11, 17, 23 are not evenly spaced), so its heads
    compare with the paper's; else ``count`` evenly spaced, ending with the last (the tiny test
    backbones); one block: the last, as an int."""
    if count <= 1:
        return 1
    if count > depth:
        raise ValueError(f"{count} blocks asked of a backbone of {depth}")
    if count == 4 and depth in ORIGINAL_DEPTH_BLOCKS:
        return ORIGINAL_DEPTH_BLOCKS[depth]
    return tuple(round((i + 1) * depth / count) - 1 for i in range(count))


@torch.no_grad()
def patch_tokens(backbone: nn.Module, images: Tensor, layers: Layers = 1,
                 amp_dtype: torch.dtype | None = None, norm: bool = True) -> tuple[Tensor, Tensor]:
    """Patch features ``(B, L*D, h, w)`` and CLS tokens ``(B, L*D)`` of the last ``layers`` blocks (or
    the blocks it lists) for one batch of model input, float32 on the backbone's device
    (``amp_dtype``: under autocast); ``norm``: through the backbone's final LayerNorm (segmentation's
    features), else the blocks' raw outputs (depth's, as the original's depth heads read them)."""
    device = next(backbone.parameters()).device
    wanted = layers if isinstance(layers, int) else list(layers)
    with under_autocast(device, amp_dtype):
        out = backbone.get_intermediate_layers(images.to(device), n=wanted, reshape=True, return_class_token=True,
                                               norm=norm)
    return torch.cat([p for p, _ in out], dim=1).float(), torch.cat([c for _, c in out], dim=1).float()


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
    """[patch, CLS] -> x4 upsampling -> BatchNorm + 1x1 conv to bins -> their centres weighted by the
    linearly normalised bins (see the module docstring) -> depth ``(B, H, W)``."""

    def __init__(self, in_channels: int, bins: int = 256, min_depth: float = 1e-3, max_depth: float = 10.0) -> None:
        super().__init__()
        if not 0 < min_depth < max_depth:
            raise ValueError(f"need 0 < min_depth < max_depth, got {min_depth}, {max_depth}")
        self.norm = nn.BatchNorm2d(2 * in_channels)
        self.classifier = nn.Conv2d(2 * in_channels, bins, 1)
        self.register_buffer("centres", torch.linspace(min_depth, max_depth, bins))

    def forward(self, patches: Tensor, cls: Tensor, size: tuple[int, int]) -> Tensor:
        # The bins' logits are computed at patch resolution and upsampled x4, the original's order
        # reversed at 1/16 the cost. In eval mode the two give the same logits: BatchNorm with its
        # running statistics and the 1x1 conv are one per-pixel affine map, which commutes with
        # bilinear upsampling (interpolation weights sum to 1). In training they do not: BatchNorm
        # normalises by the batch's statistics, and the upsampled map's (the original's) differ from
        # the patch grid's (interpolation smooths, lowering the variance), so the head trained here is
        # not quite the original's. The upsampling is written as two small matrices that leave the
        # bins last, where their normalisation is cheapest on a CPU.
        x = torch.cat([patches, cls[:, :, None, None].expand_as(patches)], dim=1)
        rows, cols = (upsampling_matrix(n, 4).to(x) for n in patches.shape[-2:])
        logits = torch.einsum("bkhw,ih,jw->bijk", self.classifier(self.norm(x)), rows, cols)
        weights = logits.relu() + BIN_FLOOR  # the original's "linear" normalisation, not a softmax
        depth = (weights @ self.centres) / weights.sum(dim=-1)
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


def head_batches(count: int, config: HeadConfig) -> list[Tensor]:
    """The sample keys of each of the ``config.steps`` training batches: epochs of seeded shuffles
    of ``count`` rows, cut into ``config.batch_size``, row ``r`` of step ``s`` keyed ``r + s *
    count``: the row is ``key % count`` and ``key // count`` its draw, so an augmented split
    (:class:`~evaluators.dense_datasets.Fit`) crops it anew at every step, alike in a resumed
    training; held features and splits without augmentation read row ``key % count``."""
    # every epoch yields at least one batch, so ``steps`` epochs suffice; the generator stops early
    batches = epoch_batches(count, config.batch_size, config.steps, torch.Generator().manual_seed(config.seed))
    return [rows + step * count for step, rows in enumerate(itertools.islice(batches, config.steps))]


def class_counts(masks: Tensor, num_classes: int) -> Tensor:
    """``(C,)`` int64 pixels of each class in ``masks`` (255 ignored): summed over batches, the
    input of :func:`class_weights`."""
    return torch.bincount(masks[masks != IGNORE_INDEX].long(), minlength=num_classes)[:num_classes]


def class_weights(counts: Tensor, power: float) -> Tensor:
    """``(1 / frequency_c) ** power`` from pixel ``counts`` per class, scaled to mean 1 over the
    classes present; absent classes get 0 (no pixel of theirs is in the loss anyway)."""
    counts = counts.double()
    present = counts > 0
    weights = torch.where(present, (counts.sum() / counts.clamp(min=1)) ** power, torch.zeros_like(counts))
    return (weights / weights[present].mean()).float()


@dataclass(frozen=True)
class HeadSaves:
    """Where a head's training saves its state (``uri``: the head, its optimizer and the steps
    done, in ``head_state.pt``), what the training is of (``identity``, JSON-able: a folder saved by
    another training is refused) and how often: at most every ``every_s`` seconds, and at the end."""

    storage: Storage
    uri: str
    identity: dict[str, Any]
    every_s: float = SAVE_EVERY_S

    def restore(self, head: nn.Module, optimizer: torch.optim.Optimizer) -> int:
        """Load the last saved state into ``head`` and ``optimizer``; the steps it had done (0: none saved)."""
        claim(self.storage, self.uri, self.identity, "another head's training")
        path = join_uri(self.uri, HEAD_STATE_FILE)
        if not self.storage.exists(path):
            return 0
        state = torch.load(io.BytesIO(self.storage.read_bytes(path)), map_location="cpu", weights_only=True)
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        return int(state["step"])

    def save(self, step: int, head: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        buffer = io.BytesIO()
        torch.save({"step": step, "head": head.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
        self.storage.write_bytes(join_uri(self.uri, HEAD_STATE_FILE), buffer.getvalue())


Batches = Callable[[Sequence[Tensor]], Iterable[tuple[Tensor, ...]]]  # the rows of each step -> its batches


def _fit(head: nn.Module, loss_of: Callable[[nn.Module, tuple[Tensor, ...]], Tensor], batches: Batches,
         count: int, config: HeadConfig, saves: HeadSaves | None, desc: str) -> None:
    """Train ``head`` with AdamW for ``config.steps`` steps, step ``i`` on ``batches`` of the rows
    :func:`head_batches` gives it, and leave it in eval mode; with ``saves``, from the last saved
    step on (see :class:`HeadSaves`)."""
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    rows = head_batches(count, config)
    done = saves.restore(head, optimizer) if saves is not None else 0
    saved = time.monotonic()
    steps = progress(batches(rows[done:]), desc=desc, total=len(rows) - done, unit="step")
    for step, batch in enumerate(steps, start=done + 1):
        loss = loss_of(head, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if saves is not None and (step == len(rows) or time.monotonic() - saved >= saves.every_s):
            saves.save(step, head, optimizer)
            saved = time.monotonic()
    head.eval()


def train_segmentation_head(batches: Batches, count: int, in_channels: int, num_classes: int,
                            weight: Tensor | None = None, config: HeadConfig = HeadConfig(),
                            device: str | torch.device = "cpu", saves: HeadSaves | None = None
                            ) -> LinearSegmentationHead:
    """Fit the head on ``config.steps`` batches, of ``count`` training rows, of features
    ``(b, F, h, w)`` and int masks ``(b, H, W)`` (255 ignored), the loss's classes weighted by
    ``weight`` (:func:`class_weights`), on ``device``; ``batches`` maps the steps' rows to them."""
    torch.manual_seed(config.seed)
    head = LinearSegmentationHead(in_channels, num_classes).to(device)
    weight = None if weight is None else weight.to(device)

    def loss_of(head: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
        features, masks = batch
        masks = masks.to(device).long()
        return F.cross_entropy(head(features.to(device), tuple(masks.shape[-2:])), masks, weight=weight,
                               ignore_index=IGNORE_INDEX)

    _fit(head, loss_of, batches, count, config, saves, "segmentation head")
    return head


def row_batches(count: int, batch_size: int = EVAL_BATCH) -> list[range]:
    """Consecutive rows ``[start, start + batch_size)`` covering ``count``."""
    return [range(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]


def held_batches(tensors: Sequence[Tensor], rows: Iterable[Sequence[int] | Tensor]) -> Iterable[tuple[Tensor, ...]]:
    """The given ``rows`` of every tensor in ``tensors``, one tuple per group of rows (a row given
    as a key of :func:`head_batches`, the row ``key % len``)."""
    return (tuple(t[torch.as_tensor(r) % len(t)] for t in tensors) for r in rows)


def _tally(scored: Iterable[tuple[Tensor, Tensor]], add: Callable[[Tensor, Tensor], Tensor],
           keep: int, kept_side: int = 0) -> tuple[Tensor, Tensor]:
    """``add(predicted, truth)`` summed over batches (on the CPU), and the first ``keep`` predictions
    (``kept_side``: resized to squares of that side, nearest: whole images' maps differ in size)."""
    total: Tensor | None = None
    kept: list[Tensor] = []
    for predicted, truth in scored:
        predicted = predicted.cpu()
        part = add(predicted, truth.cpu())
        total = part if total is None else total + part
        first = predicted[: max(0, keep - sum(len(k) for k in kept))]
        if kept_side and len(first):
            first = F.interpolate(first[:, None].float(), size=(kept_side, kept_side), mode="nearest")[:, 0]
            first = first.to(predicted.dtype)
        kept.append(first)
    if total is None:
        raise ValueError("no test images to score")
    return total, torch.cat(kept)


@torch.no_grad()
def evaluate_segmentation(scored: Iterable[tuple[Tensor, Tensor]], num_classes: int,
                          keep: int = 0, kept_side: int = 0) -> tuple[dict[str, float], Tensor]:
    """mIoU and pixel accuracy of batches of (class scores or probabilities ``(b, C, H, W)``, true
    masks ``(b, H, W)``; each batch of its own size), the confusion matrix added up batch by batch;
    also the first ``keep`` predicted class maps ``(keep, H, W)`` (``kept_side``: resized to
    ``kept_side`` squares), for pictures."""
    confusion, maps = _tally(((scores.argmax(dim=1), masks) for scores, masks in scored),
                             lambda predicted, masks: segmentation_confusion(predicted, masks, num_classes), keep,
                             kept_side)
    return segmentation_scores(confusion), maps


@torch.no_grad()
def multiscale_probabilities(backbone: nn.Module, head: LinearSegmentationHead, images: Tensor, layers: int,
                             scales: Sequence[float] = MS_SCALES, flip: bool = True,
                             amp_dtype: torch.dtype | None = None, window: int = 0, stride: int = 0) -> Tensor:
    """Softmax averaged over input scales (sides rounded to the patch size) and flips, at input size
    (``amp_dtype``: the backbone under autocast); ``window``: each scale seen through sliding
    windows of that side ``stride`` apart (default half a window, the original's "ms" configs'
    320 of 640; :func:`slid_logits`, the softmax of their average logits), else whole. The default
    scales are the original's (:data:`MS_SCALES`): with ``images`` at the crops' scale (the shorter
    side at ``window``), its test images' shorter side at 1 to 3 crops."""
    size = tuple(images.shape[-2:])
    patch = backbone.patch_size
    total = torch.zeros(0)
    for scale in scales:
        side = patch_sides((s * scale for s in size), patch)
        scaled = F.interpolate(images, size=side, mode="bilinear", align_corners=False)
        for flipped in ([False, True] if flip else [False]):
            x = scaled.flip(-1) if flipped else scaled
            if window:
                logits = slid_logits(backbone, head, x, window, layers, amp_dtype, stride or max(1, round(window / 2)))
                probabilities = F.interpolate(logits, size=size, mode="bilinear", align_corners=False).softmax(dim=1)
            else:
                features = patch_tokens(backbone, x, layers, amp_dtype)[0].to(next(head.parameters()).device)
                probabilities = head(features, size).softmax(dim=1)
            probabilities = probabilities.flip(-1) if flipped else probabilities
            total = probabilities if total.numel() == 0 else total + probabilities
    return total / (len(scales) * (2 if flip else 1))


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Where windows of ``window`` pixels start to cover ``length``, ``stride`` apart, the last one
    flush with the end (one window, from 0, when ``length <= window``)."""
    if length <= window:
        return [0]
    return [min(i * stride, length - window) for i in range(-(-(length - window) // stride) + 1)]


@torch.no_grad()
def slid_average(backbone: nn.Module, predict: Callable[[Tensor, Tensor, tuple[int, int]], Tensor], images: Tensor,
                 window: int, layers: Layers = 1, amp_dtype: torch.dtype | None = None, stride: int = 0,
                 windows_per_pass: int = 16, norm: bool = True) -> Tensor:
    """A dense prediction ``(1, ..., H, W)`` of one image of any size (model input ``(1, 3, H, W)``,
    each side a multiple of the patch): ``predict(patch features, CLS tokens, (h, w))`` (a head's
    ``(n, ..., h, w)``; the features normed or not as :func:`patch_tokens`'s ``norm``) on
    ``window``-square windows ``stride`` apart (default two thirds of a window, the original's 341
    of 512), averaged where windows overlap; a side shorter than ``window`` is one window of its own
    length. Why: the original scores its dense benchmarks so, at the images' own aspect ratios,
    with the heads' training crops' scale; ``windows_per_pass`` bounds the backbone's batch."""
    height, width = images.shape[-2:]
    tall, wide = min(window, height), min(window, width)
    step = stride or max(1, round(2 * window / 3))
    places = [(top, left) for top in window_starts(height, tall, step) for left in window_starts(width, wide, step)]
    total = torch.zeros(0)
    covered = torch.zeros(height, width)
    for first in range(0, len(places), windows_per_pass):
        group = places[first : first + windows_per_pass]
        crops = torch.cat([images[..., top : top + tall, left : left + wide] for top, left in group])
        predicted = predict(*patch_tokens(backbone, crops, layers, amp_dtype, norm), (tall, wide))
        if not total.numel():
            total = predicted.new_zeros((1, *predicted.shape[1:-2], height, width))
            covered = covered.to(predicted.device)
        for (top, left), part in zip(group, predicted):
            total[0, ..., top : top + tall, left : left + wide] += part
            covered[top : top + tall, left : left + wide] += 1
    return total / covered


def slid_logits(backbone: nn.Module, head: LinearSegmentationHead, images: Tensor, window: int,
                layers: Layers = 1, amp_dtype: torch.dtype | None = None, stride: int = 0,
                windows_per_pass: int = 16) -> Tensor:
    """Class logits ``(1, C, H, W)`` of one image through sliding windows (:func:`slid_average` of
    the segmentation head's logits). The windows' logits are averaged, not their softmax: mmseg's
    slide inference, which the original scores with, averages logits and takes the softmax (or the
    argmax) of the average."""
    device = next(head.parameters()).device
    return slid_average(backbone, lambda patches, _, size: head(patches.to(device), size), images, window, layers,
                        amp_dtype, stride, windows_per_pass)


DEPTH_HEADS = ("linear", "dpt")


def train_depth_head(batches: Batches, count: int, in_channels: int, config: HeadConfig = HeadConfig(),
                     bins: int = 256, min_depth: float = 1e-3, max_depth: float = 10.0,
                     device: str | torch.device = "cpu", saves: HeadSaves | None = None,
                     kind: str = "linear") -> nn.Module:
    """Fit the ``kind`` head (:data:`DEPTH_HEADS`: :class:`LinearDepthHead` over ``bins`` bins up to
    ``max_depth``, or :class:`~evaluators.dpt.DPTDepthHead` on four blocks, regressing the depth as
    the original's does) on ``config.steps`` batches, of ``count`` training rows, of (patch features,
    CLS tokens, depth maps ``(b, H, W)``, 0 = unknown) with the SiLog loss, on ``device``;
    ``batches`` maps the steps' rows to them."""
    if kind not in DEPTH_HEADS:
        raise ValueError(f"unknown depth head {kind!r}; allowed: {', '.join(DEPTH_HEADS)}")
    torch.manual_seed(config.seed)
    head = (DPTDepthHead(in_channels, min_depth=min_depth) if kind == "dpt"
            else LinearDepthHead(in_channels, bins, min_depth, max_depth)).to(device)

    def loss_of(head: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
        patches, cls, depths = batch
        depths = depths.to(device)
        return silog_loss(head(patches.to(device), cls.to(device), tuple(depths.shape[-2:])), depths)

    _fit(head, loss_of, batches, count, config, saves, "depth head")
    return head


@torch.no_grad()
def evaluate_depth(scored: Iterable[tuple[Tensor, Tensor]], keep: int = 0,
                   kept_side: int = 0) -> tuple[dict[str, float], Tensor]:
    """RMSE, AbsRel and delta1 of batches of (predicted, true depth maps ``(b, H, W)``; each batch of
    its own size), each image's scores added up batch by batch and averaged over the images
    (:func:`~evaluators.dense_metrics.depth_tally`); also the first ``keep`` predicted depth maps
    (``kept_side``: resized to ``kept_side`` squares), for pictures."""
    tally, maps = _tally(scored, depth_tally, keep, kept_side)
    return depth_scores_of(tally), maps
