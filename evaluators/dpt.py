"""The DPT depth decoder on frozen features: the paper's strongest depth protocol after the linear heads.

DPT (Ranftl et al., 2021) reads four blocks of a ViT and builds an image-like pyramid from them:

* **Reassemble.** Each block's patch tokens take its CLS token in (the "project" readout: the
  concatenation ``[patch, CLS]`` through a linear layer and GELU), go to ``channels[i]`` by a 1x1
  convolution (the original's widths by default: ``D/8, D/4, D/2, D`` of the backbone's width
  ``D``) and are resampled to 4x, 2x, 1x and 1/2x the patch grid (transposed convolutions up, a
  stride-2 convolution down), then to ``features`` (256) channels by a 3x3 convolution.
* **Fuse.** From the coarsest level down, each fusion block adds a residual-refined level to the
  path coming from above (resized to it), refines the sum and projects it (1x1); the finest comes
  out at 8x the patch grid, where a 3x3 convolution and ReLU project it once more.
* **Head.** A 3x3 convolution halves the channels, a 2x upsampling reaches 16x the grid (about
  the image's size for patch 14), then 3x3 to 32 channels, ReLU and 1x1 to one channel.

Unlike the linear head (:class:`~evaluators.dense.LinearDepthHead`, the original's bins), it
regresses the depth, as the original's DPT head does (no bins: its ``classify`` is off):
``relu(output) + min_depth``, resized bilinearly to the labels (the last convolution's bias
starts at 1, so that no pixel starts below the ReLU's 0); it trains with the same scale-invariant
log loss. The four blocks are the original's DPT heads' (its table for the released depths, else
evenly spaced: :func:`~evaluators.dense.spaced_blocks`), read without the backbone's final
LayerNorm as the linear depth head's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LEVELS = 4  # blocks read, one per pyramid level
INITIAL_OUTPUT = 1.0  # the last convolution's initial bias: every pixel's output starts above the ReLU's 0
SCALES = (4.0, 2.0, 1.0, 0.5)  # each level's size over the patch grid


class ResidualConvUnit(nn.Module):
    """``x + conv(relu(conv(relu(x))))``, 3x3 convolutions keeping the channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.first = nn.Conv2d(channels, channels, 3, padding=1)
        self.second = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.second(F.relu(self.first(F.relu(x))))


class FusionBlock(nn.Module):
    """The path from the coarser levels, resized to this level and added to its refined features
    (the coarsest level has no path: its features go on as they are), refined again and projected
    by a 1x1 convolution."""

    def __init__(self, features: int, coarsest: bool = False) -> None:
        super().__init__()
        self.skip = None if coarsest else ResidualConvUnit(features)
        self.refine = ResidualConvUnit(features)
        self.project = nn.Conv2d(features, features, 1)

    def forward(self, level: Tensor, path: Tensor | None = None) -> Tensor:
        if self.skip is not None:
            if path is None:
                raise ValueError("a fusion block below the coarsest level needs the path from above")
            level = self.skip(level) + F.interpolate(path, size=level.shape[-2:], mode="bilinear", align_corners=True)
        return self.project(self.refine(level))


def _resample(channels: int, scale: float) -> nn.Module:
    if scale > 1:
        return nn.ConvTranspose2d(channels, channels, int(scale), stride=int(scale))
    if scale < 1:
        return nn.Conv2d(channels, channels, 3, stride=int(1 / scale), padding=1)
    return nn.Identity()


class DPTDepthHead(nn.Module):
    """Four blocks' patch features ``(B, 4D, h, w)`` and CLS tokens ``(B, 4D)`` (the blocks
    concatenated, as :func:`~evaluators.dense.patch_tokens` gives them) -> depth ``(B, H, W)``."""

    def __init__(self, in_channels: int, features: int = 256, channels: tuple[int, ...] | None = None,
                 min_depth: float = 1e-3) -> None:
        super().__init__()
        if in_channels % LEVELS:
            raise ValueError(f"the DPT head reads {LEVELS} blocks: in_channels {in_channels} is not 4 x the width")
        if min_depth <= 0:
            raise ValueError(f"need min_depth > 0, got {min_depth}")
        width = in_channels // LEVELS
        if channels is None and width < 2 ** (LEVELS - 1):
            raise ValueError(f"the default reassemble widths are D/8 ... D: a width of {width} leaves none; "
                             "give channels")
        channels = channels or tuple(width // 2 ** (LEVELS - 1 - level) for level in range(LEVELS))
        self.min_depth = min_depth
        self.readout = nn.ModuleList(nn.Sequential(nn.Linear(2 * width, width), nn.GELU()) for _ in range(LEVELS))
        self.reassemble = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, out, 1), _resample(out, scale), nn.Conv2d(out, features, 3, padding=1,
                                                                                      bias=False))
            for out, scale in zip(channels, SCALES))
        self.fusion = nn.ModuleList(FusionBlock(features, coarsest=level == LEVELS - 1) for level in range(LEVELS))
        self.project = nn.Sequential(nn.Conv2d(features, features, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(features, features // 2, 3, padding=1), nn.Upsample(
            scale_factor=2, mode="bilinear", align_corners=True), nn.Conv2d(features // 2, 32, 3, padding=1),
            nn.ReLU(), nn.Conv2d(32, 1, 1))
        # The original's released code is for inference and fixes no initialisation. PyTorch's default
        # leaves this convolution's output nearly constant over the image (about +-0.05), so for about
        # half the seeds it is negative everywhere: the ReLU then passes no gradient and the head never
        # trains. Starting its bias at 1 puts every pixel on the ReLU's live side.
        nn.init.constant_(self.head[-1].bias, INITIAL_OUTPUT)

    def forward(self, patches: Tensor, cls: Tensor, size: tuple[int, int]) -> Tensor:
        levels = []
        for level, (tokens, token) in enumerate(zip(patches.chunk(LEVELS, dim=1), cls.chunk(LEVELS, dim=1))):
            joined = torch.cat([tokens, token[:, :, None, None].expand_as(tokens)], dim=1)
            read = self.readout[level](joined.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            levels.append(self.reassemble[level](read))
        path = None
        for level in reversed(range(LEVELS)):  # the coarsest first
            path = self.fusion[level](levels[level], path)
        assert path is not None
        path = F.interpolate(path, scale_factor=2, mode="bilinear", align_corners=True)  # 8x the patch grid
        depth = F.relu(self.head(self.project(path))) + self.min_depth
        return F.interpolate(depth, size=size, mode="bilinear", align_corners=False)[:, 0]
