"""Block-wise masks for iBOT's masked-patch objective (BEiT-style), and their batch sampling.

Why blocks: masking random rectangles rather than scattered patches removes whole parts of
an object, so the student must infer them from context instead of copying a neighbour.

Per batch of ``C`` global crops (2 per image), ``int(C * mask_probability)`` crops are masked;
their masking ratios are stratified: ``[0.1, 0.5]`` is cut into that many equal bins, one ratio
drawn uniformly in each, so a batch always spans light to heavy masking. The list of masks is
then shuffled. All randomness comes from an explicit ``numpy.random.Generator`` so that a
resumed run draws exactly the masks an uninterrupted one would.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


UNIFORM_BATCH = 256  # uniforms drawn from the generator at a time (one call instead of one per number)


@dataclass(frozen=True)
class BlockMaskGenerator:
    """Masks on a ``rows x cols`` patch grid built from random rectangles.

    Each rectangle has an area in ``[min_patches, remaining budget]`` (capped at
    ``max_patches``) and a log-uniform aspect ratio in ``[min_aspect, 1 / min_aspect]``; up to 10
    placements are tried, and one counts only if it masks new patches without exceeding the
    budget. Rectangles are added until the target count is met or no placement helps.

    Why plain Python ints (a row of the grid is an int, one bit per column) and uniforms drawn
    in batches: the training loop draws a batch's masks on the host before each step, while the
    GPU waits; per-number generator calls and tiny numpy windows made that ~20 ms for a batch of
    128 images, bit operations on ints and one generator call per 256 numbers a fraction of it.
    """

    rows: int
    cols: int
    max_patches: int
    min_patches: int = 4
    min_aspect: float = 0.3

    def __call__(self, num_patches: int, rng: np.random.Generator) -> np.ndarray:
        """A ``(rows, cols)`` bool mask with about ``num_patches`` patches set (never more)."""
        return self.from_uniforms(num_patches, _uniforms(rng))

    def from_uniforms(self, num_patches: int, uniform: Callable[[], float]) -> np.ndarray:
        """The mask of :meth:`__call__`, its randomness read from ``uniform()`` (numbers in [0, 1)):
        per placement tried, the area, the aspect ratio, then (if it fits) the top and left rows."""
        grid = [0] * self.rows  # bit c of grid[r]: patch (r, c) is masked
        count = 0
        while count < num_patches:
            added = self._add_rectangle(grid, min(num_patches - count, self.max_patches), uniform)
            if added == 0:
                break
            count += added
        bits = np.array(grid, dtype=np.int64)[:, None] >> np.arange(self.cols)
        return (bits & 1).astype(bool)

    def _add_rectangle(self, grid: list[int], budget: int, uniform: Callable[[], float]) -> int:
        low, high = math.log(self.min_aspect), math.log(1 / self.min_aspect)
        for _ in range(10):
            # uniform between min_patches and the budget, which may be the smaller one
            area = self.min_patches + (budget - self.min_patches) * uniform()
            aspect = math.exp(low + (high - low) * uniform())
            height = int(round(math.sqrt(area * aspect)))
            width = int(round(math.sqrt(area / aspect)))
            if width >= self.cols or height >= self.rows:
                continue
            top = int(uniform() * (self.rows - height + 1))
            left = int(uniform() * (self.cols - width + 1))
            columns = ((1 << width) - 1) << left
            rows = range(top, top + height)
            new = height * width - sum((grid[r] & columns).bit_count() for r in rows)
            if 0 < new <= budget:
                for r in rows:
                    grid[r] |= columns
                return new
        return 0


def _uniforms(rng: np.random.Generator) -> Callable[[], float]:
    """Uniforms in [0, 1) from ``rng``, drawn ``UNIFORM_BATCH`` at a time."""
    pending: list[float] = []

    def uniform() -> float:
        if not pending:
            pending.extend(reversed(rng.random(UNIFORM_BATCH).tolist()))
        return pending.pop()

    return uniform


def _ratio_bins(num_crops: int, mask_probability: float, ratio_range: tuple[float, float]) -> np.ndarray:
    """The edges of the masked crops' ratio bins (``int(num_crops * mask_probability)`` of them),
    after checking the arguments."""
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}")
    low, high = ratio_range
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"ratio_range must satisfy 0 <= low <= high <= 1, got {ratio_range}")
    return np.linspace(low, high, int(num_crops * mask_probability) + 1)


def masked_patch_bound(num_crops: int, patches: int, mask_probability: float = 0.5,
                       ratio_range: tuple[float, float] = (0.1, 0.5), kept: int | None = None) -> int:
    """The most patches :func:`sample_crop_masks` (same arguments) can mask in any ``kept`` of its
    ``num_crops`` crops (all by default): the sum of the ``kept`` largest per-crop bounds
    ``int(patches x bin top)``, whichever crops the shuffle puts there.

    Why: it is a fixed row count for the masked patches of every step (static shapes for compiled
    and graph-captured code); with every crop kept it is the batch's total, about 1 % above what
    is drawn; a rank keeping its share of a global batch's crops gets a looser bound, as any of
    them may be the most masked."""
    bins = _ratio_bins(num_crops, mask_probability, ratio_range)
    per_crop = sorted((int(patches * top) for top in bins[1:]), reverse=True)
    return sum(per_crop[:num_crops if kept is None else kept])


def sample_crop_masks(
    num_crops: int,
    rows: int,
    cols: int,
    rng: np.random.Generator,
    mask_probability: float = 0.5,
    ratio_range: tuple[float, float] = (0.1, 0.5),
    max_ratio_per_block: float = 0.5,
) -> tuple[torch.Tensor, int]:
    """Masks for the global crops of a batch: ``(num_crops, rows * cols)`` bool, and the upper
    bound on the number of masked patches (:func:`masked_patch_bound`, for fixed-size buffers)."""
    bins = _ratio_bins(num_crops, mask_probability, ratio_range)
    patches = rows * cols
    generator = BlockMaskGenerator(rows, cols, max_patches=int(max_ratio_per_block * patches))
    masks = [generator(int(patches * rng.uniform(lo, hi)), rng) for lo, hi in zip(bins[:-1], bins[1:])]
    masks += [np.zeros((rows, cols), dtype=bool)] * (num_crops - len(masks))
    order = rng.permutation(num_crops)
    stacked = np.stack([masks[i] for i in order]).reshape(num_crops, patches)
    return torch.from_numpy(stacked), masked_patch_bound(num_crops, patches, mask_probability, ratio_range)
