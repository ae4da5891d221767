"""DINOv2 multi-crop augmentation, batched on the training device.

Per image: 2 global crops and N local crops, each a random resized crop (bicubic) with a
horizontal flip (p 0.5), colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1;
p 0.8), grayscale (p 0.2) and Gaussian blur (sigma in [0.1, 2]); the second global crop is also
solarised (p 0.2). Blur probabilities are global 1 / global 2 / local = 1.0 / 0.1 / 0.5 nominally;
the original applied them inverted (0.0 / 0.9 / 0.5), and its released models were trained so:
``original_blur_probabilities`` chooses, and the choice is part of the logged config.

Why it is built this way: the training loop prepares the next step's batch while the GPU computes
the current step, which only pays if preparing a batch never waits for the GPU. kornia's
augmentation containers draw their parameters on the host, decide per call which samples to
touch and copy the parameters to the device; each such copy waits for all the work queued before
it (the whole step), so the preparation could not run ahead (runs 7-8 in benchmarks/RESULTS.md:
2,035 img/s against 7,711 now at ViT-S/14's sizes on an H200). Here every random draw is one
tensor on the images' device (:func:`draw_params`), every operation runs on all crops with the
unselected ones given the neutral value or kept by ``torch.where`` (:func:`augment_crops`), and
all crops of a kind come from one ``grid_sample`` call: a fixed, short list of kernels queued
without reading anything back. The colour, grayscale and blur maths are kornia's functions.
Randomness comes from torch's generators (the device's for the draws, the host's for the jitter
order), which the engine seeds per step and checkpoints restore.

Why the pixel stages compile (``crops.compile``, on in the GPU recipes): eagerly, kornia's colour
and blur maths and the selections are some hundred element-wise kernels per call, each a pass over
all crops in memory; compiled, each jitter step and the rest (clamp, grayscale, blur, solarisation,
normalisation) fuse into a few passes (:class:`Stages`; ``benchmarks/batch_preparation.py``
times both). The draws stay eager, so a seed gives the same parameters either way, and so does
the bicubic crop: inductor's decomposition of ``grid_sample`` is slower than the library's kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kornia.color import rgb_to_grayscale
from kornia.enhance import (adjust_brightness_accumulative, adjust_contrast_with_mean_subtraction, adjust_hue,
                            adjust_saturation_with_gray_subtraction)
from kornia.filters import filter2d_separable, get_gaussian_kernel1d
from torch import Tensor, nn

from dinoflow.config import CropsConfig
from trainer.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from trainer.models.compile import compile_function

SOLARIZE_THRESHOLD = 128 / 255
ASPECT_RATIOS = (3 / 4, 4 / 3)  # of the random resized crop, as torchvision's
CROP_TRIES = 10  # boxes drawn per crop; the first that fits is kept, else the whole image
FLIP_P = 0.5
JITTER_P = 0.8
JITTER = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation: factor 1 +- x; hue: +- x turns
GRAYSCALE_P = 0.2
BLUR_SIGMA = (0.1, 2.0)


def blur_probabilities(original: bool) -> tuple[float, float, float]:
    """Blur probability of (global crop 1, global crop 2, local crops)."""
    return (0.0, 0.9, 0.5) if original else (1.0, 0.1, 0.5)


@dataclass
class AugmentParams:
    """One draw for ``n`` crops, all ``(n,)`` tensors on the device (``boxes`` ``(n, 4)``):
    the crop box ``(x0, y0, width, height)`` as fractions of the image's width and height, a flip
    sign (+1 or -1), the colour-jitter factors (neutral where jitter was not drawn: 1, 1, 1, 0),
    whether each crop turns gray, its blur sigma (0: not blurred) and whether it is solarised."""

    boxes: Tensor
    flips: Tensor
    brightness: Tensor
    contrast: Tensor
    saturation: Tensor
    hue: Tensor
    grayscale: Tensor
    sigma: Tensor
    solarize: Tensor


def crop_boxes(count: int, scale: tuple[float, float], device: torch.device, aspects: Tensor | None = None) -> Tensor:
    """``(count, 4)`` random resized crop boxes ``(x0, y0, w, h)`` in fractions of each image's
    width and height; ``aspects`` ``(count,)``: each image's width / height in pixels (None: square).

    torchvision's rule, batched: an area share uniform in ``scale`` and a log-uniform aspect ratio
    ``r`` (of the box in the image's pixels) in :data:`ASPECT_RATIOS`, drawn :data:`CROP_TRIES`
    times, so ``w h = area`` and ``(w a) / h = r``: ``w = sqrt(area r / a)``, ``h = sqrt(area a / r)``;
    the first box inside the image is kept, at a uniform position. If none is, the centred box of
    the image's ratio clamped to :data:`ASPECT_RATIOS` (the whole image when the ratio lies within).
    Positions and sizes are continuous: the bicubic sampling needs no pixel grid. Why the image's
    aspect: a non-square image is held squeezed to a square (:mod:`trainer.data.datasets`), and
    the boxes must be drawn in its own pixels for the crops to show it unsqueezed.
    """
    area = torch.empty(count, CROP_TRIES, device=device).uniform_(*scale)
    log_ratio = torch.empty(count, CROP_TRIES, device=device).uniform_(*(math.log(r) for r in ASPECT_RATIOS))
    ratio = log_ratio.exp() if aspects is None else log_ratio.exp() / aspects[:, None]  # the box's w / h in fractions
    widths, heights = (area * ratio).sqrt(), (area / ratio).sqrt()
    fits = (widths <= 1) & (heights <= 1)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first fitting try (0 if none fits)
    found = fits.any(dim=1)
    if aspects is None:
        whole_width = whole_height = torch.ones((), device=device)
    else:  # the fallback: the image's ratio clamped to the allowed range
        clamped = aspects.clamp(*ASPECT_RATIOS)
        whole_width, whole_height = (clamped / aspects).clamp(max=1), (aspects / clamped).clamp(max=1)
    width = torch.where(found, widths.gather(1, first).squeeze(1), whole_width)
    height = torch.where(found, heights.gather(1, first).squeeze(1), whole_height)
    room = torch.stack([1 - width, 1 - height], dim=1)
    corner = torch.where(found[:, None], torch.rand(count, 2, device=device) * room, room / 2)
    return torch.cat([corner, width[:, None], height[:, None]], dim=1)


def draw_params(count: int, scale: tuple[float, float], blur_p: Tensor, solarize_p: Tensor,
                aspects: Tensor | None = None) -> AugmentParams:
    """The random parameters of ``count`` crops on ``blur_p``'s device; ``blur_p`` and
    ``solarize_p`` are each crop's probabilities ``(count,)``, ``aspects`` its image's width / height
    (:func:`crop_boxes`)."""
    device = blur_p.device

    def chosen(p: float | Tensor) -> Tensor:
        return torch.rand(count, device=device) < p

    def around_one(spread: float) -> Tensor:
        return torch.empty(count, device=device).uniform_(1 - spread, 1 + spread)

    boxes = crop_boxes(count, scale, device, aspects)
    flips = torch.where(chosen(FLIP_P), -1.0, 1.0)
    jitter = chosen(JITTER_P)
    spread_b, spread_c, spread_s, spread_h = JITTER
    brightness = torch.where(jitter, around_one(spread_b), 1.0)
    contrast = torch.where(jitter, around_one(spread_c), 1.0)
    saturation = torch.where(jitter, around_one(spread_s), 1.0)
    hue = torch.where(jitter, torch.empty(count, device=device).uniform_(-spread_h, spread_h), 0.0)
    grayscale = chosen(GRAYSCALE_P)
    sigma = torch.where(chosen(blur_p), torch.empty(count, device=device).uniform_(*BLUR_SIGMA), 0.0)
    return AugmentParams(boxes, flips, brightness, contrast, saturation, hue, grayscale, sigma, chosen(solarize_p))


def resized_crops(pixels: Tensor, boxes: Tensor, flips: Tensor, size: int) -> Tensor:
    """``L`` crops of each image: ``pixels`` ``(B, 3, S, S)`` in [0, 1], ``boxes`` ``(L, B, 4)``
    and ``flips`` ``(L, B)`` -> ``(L, B, 3, size, size)``, bicubic, clamped to [0, 1].

    One ``grid_sample`` for all: the ``L`` crops of an image are stacked as one tall sampling grid,
    so the images are read once, not copied ``L`` times. An output pixel at ``u`` in [-1, 1] reads
    the input at ``x0 + w (flip u + 1) / 2`` (as a fraction of the side), which is an affine grid.
    """
    crops, batch = boxes.shape[:2]
    x0, y0, w, h = boxes.unbind(-1)
    theta = torch.zeros(crops, batch, 2, 3, dtype=pixels.dtype, device=pixels.device)
    theta[..., 0, 0] = w * flips
    theta[..., 0, 2] = 2 * x0 + w - 1
    theta[..., 1, 1] = h
    theta[..., 1, 2] = 2 * y0 + h - 1
    grid = F.affine_grid(theta.flatten(0, 1), [crops * batch, 3, size, size], align_corners=False)
    grid = grid.view(crops, batch, size, size, 2).transpose(0, 1).reshape(batch, crops * size, size, 2)
    out = F.grid_sample(pixels, grid, mode="bicubic", padding_mode="border", align_corners=False)
    return out.view(batch, 3, crops, size, size).permute(2, 0, 1, 3, 4).clamp(0, 1)


def adjust_hue_turns(crops: Tensor, turns: Tensor) -> Tensor:
    """Colour jitter's hue step: each crop's hue shifted by its share ``(n,)`` of a turn."""
    return adjust_hue(crops, turns * 2 * math.pi)


def gray_blur_solarize(crops: Tensor, grayscale: Tensor, sigma: Tensor, solarize: Tensor, blur_kernel: int,
                       mean: Tensor | None = None, std: Tensor | None = None) -> Tensor:
    """After the colour jitter: clamp to [0, 1], grayscale, Gaussian blur (``sigma`` 0: none) and
    solarisation of the crops chosen for each (``(n,)`` each), then with ``mean`` and ``std``
    ``(3, 1, 1)`` normalised (in the same pass once compiled). A crop not chosen keeps its pixels
    (``torch.where``)."""
    crops = crops.clamp(0, 1)

    def where(chosen: Tensor, changed: Tensor, kept: Tensor) -> Tensor:
        return torch.where(chosen[:, None, None, None], changed, kept)

    crops = where(grayscale, rgb_to_grayscale(crops).expand_as(crops), crops)
    kernel = blur_kernel if blur_kernel % 2 else blur_kernel + 1
    taps = get_gaussian_kernel1d(kernel, sigma.clamp(min=BLUR_SIGMA[0])[:, None])
    crops = where(sigma > 0, filter2d_separable(crops, taps, taps, "reflect"), crops)
    crops = where(solarize, torch.where(crops < SOLARIZE_THRESHOLD, crops, 1 - crops), crops)
    return crops if mean is None or std is None else (crops - mean) / std


@dataclass(frozen=True)
class Stages:
    """The augmentation's pixel work after the crops, in its stages: the four jitter steps
    (kornia's brightness, contrast, saturation and hue: ``(crops, factor per crop) -> crops``)
    and :func:`gray_blur_solarize`. :meth:`compiled` has each stage compiled on its own, so the random
    order of the jitter steps picks among four graphs rather than compiling each of 24 orders."""

    jitter: tuple[Callable[[Tensor, Tensor], Tensor], ...] = (
        adjust_brightness_accumulative, adjust_contrast_with_mean_subtraction, adjust_saturation_with_gray_subtraction,
        adjust_hue_turns)
    finish: Callable[..., Tensor] = gray_blur_solarize

    @classmethod
    def compiled(cls) -> Stages:
        """Each stage compiled with static shapes (one graph per crop size), eager from its first
        failure on (:func:`~trainer.models.compile.compile_function`)."""
        eager = cls()
        return cls(tuple(compile_function(step, dynamic=False) for step in eager.jitter),
                   compile_function(eager.finish, dynamic=False))


def augment_crops(crops: Tensor, params: AugmentParams, blur_kernel: int, jitter_order: list[int],
                  stages: Stages = Stages(), mean: Tensor | None = None, std: Tensor | None = None) -> Tensor:
    """Colour jitter (its four steps in ``jitter_order``: 0 brightness, 1 contrast, 2 saturation,
    3 hue), grayscale, Gaussian blur and solarisation of ``crops`` ``(n, 3, s, s)`` in [0, 1]
    (normalised with ``mean`` and ``std`` if given). A crop not drawn for a step gets its neutral
    factor or keeps its pixels."""
    factors = (params.brightness, params.contrast, params.saturation, params.hue)
    for index in jitter_order:
        crops = stages.jitter[index](crops, factors[index])
    return stages.finish(crops, params.grayscale, params.sigma, params.solarize, blur_kernel, mean, std)


class MultiCrop(nn.Module):
    """uint8 images ``(B, 3, S, S)`` (and their regions' aspects) -> global crops ``(2, B, 3, G, G)`` and local crops
    ``(L, B, 3, l, l)``, normalised with ImageNet statistics, computed where the images are."""

    def __init__(self, crops: CropsConfig) -> None:
        super().__init__()
        blur_1, blur_2, blur_local = blur_probabilities(crops.original_blur_probabilities)
        self.crops = crops
        self.stages = Stages.compiled() if crops.compile else Stages()
        self.register_buffer("global_blur_p", torch.tensor([blur_1, blur_2]), persistent=False)
        self.register_buffer("global_solarize_p", torch.tensor([0.0, 0.2]), persistent=False)
        self.register_buffer("local_blur_p", torch.tensor([blur_local]), persistent=False)
        self.register_buffer("local_solarize_p", torch.tensor([0.0]), persistent=False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(3, 1, 1), persistent=False)

    def _kind(self, pixels: Tensor, aspects: Tensor | None, count: int, size: int, scale: tuple[float, float],
              blur_p: Tensor, solarize_p: Tensor) -> Tensor:
        """``count`` crops of each image, ``(count, B, 3, size, size)``; ``blur_p`` and
        ``solarize_p`` per crop index ``(count,)``."""
        batch = len(pixels)
        params = draw_params(count * batch, scale, blur_p.repeat_interleave(batch),
                             solarize_p.repeat_interleave(batch), None if aspects is None else aspects.repeat(count))
        crops = resized_crops(pixels, params.boxes.view(count, batch, 4), params.flips.view(count, batch), size)
        order = torch.randperm(4).tolist()  # one jitter order per call, from the host's generator: no device read
        crops = augment_crops(crops.flatten(0, 1), params, self.crops.blur_kernel_size, order, self.stages,
                              self.mean, self.std)
        return crops.view(count, batch, 3, size, size)

    @torch.no_grad()
    def forward(self, images: Tensor, aspects: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Crops of ``images``; ``aspects`` ``(B,)``: the width / height of the region each square
        holds (:class:`~trainer.data.datasets.Batch`; None: square images)."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (B, 3, S, S), got {images.dtype} {tuple(images.shape)}")
        pixels = images.float() / 255
        cfg = self.crops
        globals_ = self._kind(pixels, aspects, 2, cfg.global_crop_size, cfg.global_crop_scale, self.global_blur_p,
                              self.global_solarize_p)
        if cfg.num_local_crops == 0:
            return globals_, pixels.new_zeros((0, len(images), 3, 1, 1))
        locals_ = self._kind(pixels, aspects, cfg.num_local_crops, cfg.local_crop_size, cfg.local_crop_scale,
                             self.local_blur_p.expand(cfg.num_local_crops),
                             self.local_solarize_p.expand(cfg.num_local_crops))
        return globals_, locals_
