"""Frozen features for the k-NN and linear benchmarks, as the original's linear evaluation builds them.

Why: every benchmark on a frozen backbone starts from the same ``(N, F)`` matrix, so it is built
once, in one place, with the original's recipe (``dinov2/eval/linear.py``, ``create_linear_input``):

* ``layers=1``: the final normalised CLS token ``(D,)``;
* ``layers=4``: the CLS tokens of the last 4 blocks, each through the final LayerNorm, concatenated
  in block order ``(4 D,)``;
* ``with_patch_mean``: the mean of the last block's normalised patch tokens ``(D,)`` appended
  (registers excluded), giving ``(layers + 1) D`` features: the input of the released ``_lc`` heads.

The backbone runs in eval mode under ``torch.inference_mode``; its previous train/eval mode is
restored afterwards. Images must already be model input (float, normalised, sides a multiple of
the patch size); :func:`to_model_input` makes that from uint8 pixels.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinoflow.progress import progress
from trainer.data.normalization import IMAGENET_MEAN, IMAGENET_STD


Batch = Tensor | tuple[Tensor, Tensor] | list[Tensor]


def patch_sides(sides: Iterable[float], patch: int) -> tuple[int, ...]:
    """Each side rounded to the nearest multiple of ``patch``, at least one patch: a size the
    backbone's patch grid tiles, closest to the one asked for."""
    return tuple(max(patch, round(side / patch) * patch) for side in sides)


def to_model_input(
    images: Tensor | np.ndarray,
    size: int | tuple[int, int] | None = None,
    patch_size: int = 14,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Tensor:
    """uint8 pixels -> float model input ``(N, 3, H', W')``: ``(x / 255 - mean) / std`` per channel.

    Args:
        images: uint8 ``(N, 3, H, W)`` RGB, ``(N, 1, H, W)`` or ``(N, H, W)`` grayscale (repeated
            to 3 channels).
        size: output side (or ``(height, width)``), each a multiple of ``patch_size``; None keeps
            the input size, which must then be a multiple of ``patch_size``.
        patch_size: the backbone's patch side.
        mean, std: per-channel normalisation of ``[0, 1]`` pixels (ImageNet's by default).

    Resizing is bicubic with antialiasing (``F.interpolate``) on ``[0, 1]`` floats, clamped back to
    ``[0, 1]`` as a uint8 resize would be, before normalisation. It runs where ``images`` are: uint8
    pixels moved to a GPU first cross the bus at a quarter of the float input's bytes, and the GPU
    does in microseconds what took the host tens of milliseconds a batch.
    """
    pixels = torch.as_tensor(images)
    if pixels.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 pixels, got {pixels.dtype}")
    if pixels.ndim == 3:
        pixels = pixels.unsqueeze(1)  # (N, 1, H, W)
    if pixels.ndim != 4 or pixels.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 3, H, W), (N, 1, H, W) or (N, H, W), got {tuple(pixels.shape)}")
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    target = (size, size) if isinstance(size, int) else tuple(size) if size is not None else tuple(pixels.shape[-2:])
    if any(side <= 0 or side % patch_size for side in target):
        raise ValueError(f"image size {target} is not a positive multiple of patch_size {patch_size}")
    x = pixels.float() / 255.0  # (N, 3, H, W) in [0, 1]
    if target != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=target, mode="bicubic", antialias=True, align_corners=False).clamp_(0.0, 1.0)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def linear_features(model: nn.Module, images: Tensor, layers: int = 1, with_patch_mean: bool = False) -> Tensor:
    """One batch ``(B, 3, H, W)`` -> features ``(B, F)``, ``F = (layers + with_patch_mean) * D``.

    Runs the model as it is (no mode change, no grad handling): :func:`extract_features` wraps it.
    """
    blocks = model.get_intermediate_layers(images, n=layers, return_class_token=True)
    # blocks: tuple of ``layers`` pairs (patch tokens (B, N, D), class token (B, D)), in block order
    parts = [class_token for _, class_token in blocks]
    if with_patch_mean:
        parts.append(blocks[-1][0].mean(dim=1))  # (B, D) mean of the last block's patch tokens
    return torch.cat(parts, dim=-1).float()


def extract_features(
    model: nn.Module,
    images_or_loader: Tensor | Iterable[Batch],
    batch_size: int = 256,
    device: str | torch.device | None = None,
    layers: int = 1,
    with_patch_mean: bool = False,
    amp_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Frozen features ``(N, F)`` float32 on the CPU, and labels ``(N,)`` int64 when the input has them.

    Args:
        model: a backbone with the original's ``get_intermediate_layers`` (our
            :class:`~trainer.models.vit.DinoVisionTransformer`). It is not moved: it must already
            be on ``device``.
        images_or_loader: either a float tensor of model input ``(N, 3, H, W)``, cut into batches
            of ``batch_size`` here, or an iterable of batches, each ``(images, labels)`` or
            ``images`` alone (all batches alike).
        batch_size: batch size for a tensor input (ignored for an iterable).
        device: where the images go; None means the model's device.
        layers: how many last blocks' CLS tokens to concatenate (1 or 4 in the original).
        with_patch_mean: append the mean of the last block's patch tokens.
        amp_dtype: run under ``torch.autocast`` in this dtype (e.g. ``torch.bfloat16`` on a GPU);
            None runs in the model's own precision. Features are returned in float32 either way.

    Returns:
        ``(features, labels)``: labels is None for a tensor input or label-less batches.
    """
    depth = len(model.blocks) if hasattr(model, "blocks") else None
    if layers < 1 or (depth is not None and layers > depth):
        raise ValueError(f"layers must be in [1, {depth}], got {layers}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model_device = next(model.parameters()).device
    device = torch.device(device) if device is not None else model_device
    if device.type != model_device.type or (device.index is not None and device != model_device):
        raise ValueError(f"model is on {model_device} but features were asked for on {device}: move the model first")

    if isinstance(images_or_loader, Tensor):
        if images_or_loader.ndim != 4:
            raise ValueError(f"images must be (N, 3, H, W), got {tuple(images_or_loader.shape)}")
        batches: Iterable[Batch] = images_or_loader.split(batch_size)
        total: int | None = -(-len(images_or_loader) // batch_size)
    else:
        batches = images_or_loader
        total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]

    was_training = model.training
    model.eval()
    try:
        features, labels = _run_batches(model, batches, total, device, layers, with_patch_mean, amp_dtype)
    finally:
        model.train(was_training)
    if not features:
        raise ValueError("no images to extract features from")
    # concatenated outside inference mode: ordinary tensors, usable to train a probe with autograd
    return torch.cat(features), (torch.cat(labels) if labels else None)


@torch.inference_mode()
def _run_batches(
    model: nn.Module,
    batches: Iterable[Batch],
    total: int | None,
    device: torch.device,
    layers: int,
    with_patch_mean: bool,
    amp_dtype: torch.dtype | None,
) -> tuple[list[Tensor], list[Tensor]]:
    features: list[Tensor] = []
    labels: list[Tensor] = []
    has_labels: bool | None = None  # decided by the first batch
    for batch in progress(batches, desc=f"features (layers={layers})", total=total, unit="batch"):
        images, batch_labels = _split_batch(batch)
        if has_labels is None:
            has_labels = batch_labels is not None
        elif has_labels != (batch_labels is not None):
            raise ValueError("some batches carry labels and others do not")
        if not images.is_floating_point():
            raise ValueError(f"images must be float model input, got {images.dtype}: see to_model_input")
        images = images.to(device, non_blocking=True)
        with under_autocast(device, amp_dtype):
            batch_features = linear_features(model, images, layers, with_patch_mean)  # (B, F)
        features.append(batch_features.float().cpu())
        if batch_labels is not None:
            labels.append(torch.as_tensor(batch_labels).long().cpu())
    return features, labels


def float32_on(x: Tensor, device: str | torch.device, chunk_rows: int = 16384) -> Tensor:
    """``x`` as float32 on ``device``: ``x`` itself when it is already, else copied ``chunk_rows``
    rows at a time. A probe view is a column slice of the features (not contiguous); copied whole to
    a GPU, torch would first make a contiguous copy of it in host memory (ViT-L/14's ``last4`` view
    of ImageNet: 21 GB beside the 26 GB of features)."""
    device = torch.device(device)
    if x.dtype == torch.float32 and x.device.type == device.type and device.index in (None, x.device.index):
        return x
    out = torch.empty(x.shape, dtype=torch.float32, device=device)
    for start in range(0, len(x), chunk_rows):
        out[start : start + chunk_rows] = x[start : start + chunk_rows]
    return out


def under_autocast(device: torch.device, amp_dtype: torch.dtype | None) -> torch.autocast:
    """The context every feature pass runs its backbone in: autocast in ``amp_dtype`` on
    ``device``'s type, off when None (the backbone's own precision)."""
    return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


def _split_batch(batch: Batch) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError(f"a batch must be images or (images, labels), got {type(batch).__name__}")


def labelled_features(
    backbone: nn.Module, images: torch.Tensor, patch_size: int, batch_size: int = 512, layers: int = 1
) -> torch.Tensor:
    """Normalised CLS features of uint8 images ``(N, H, W)`` or ``(N, 3, H, W)``: the final one, or
    the last ``layers`` blocks' concatenated (see :func:`linear_features`)."""
    device = next(backbone.parameters()).device
    inputs = to_model_input(images, patch_size=patch_size).to(device)
    features, _ = extract_features(backbone, inputs, batch_size=batch_size, layers=layers)
    return features
