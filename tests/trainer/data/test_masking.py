"""Block masks and their stratified sampling per batch."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage

from trainer.data.masking import BlockMaskGenerator, masked_patch_bound, sample_crop_masks


def test_masks_reach_the_target_without_exceeding_it() -> None:
    rng = np.random.default_rng(0)
    generator = BlockMaskGenerator(16, 16, max_patches=128)
    reached = []
    for target in rng.integers(25, 128, 200):
        mask = generator(int(target), rng)
        assert mask.shape == (16, 16) and mask.sum() <= target
        reached.append(mask.sum() / target)
    assert np.mean(reached) > 0.9


def reference_mask(generator: BlockMaskGenerator, num_patches: int, uniforms: list[float]) -> np.ndarray:
    """The rectangle rule written plainly on a numpy grid, reading the same numbers in the same order."""
    numbers = iter(uniforms)
    mask = np.zeros((generator.rows, generator.cols), dtype=bool)
    count = 0
    while count < num_patches:
        budget, added = min(num_patches - count, generator.max_patches), 0
        for _ in range(10):
            area = generator.min_patches + (budget - generator.min_patches) * next(numbers)
            aspect = np.exp(np.log(generator.min_aspect) * (1 - 2 * next(numbers)))  # log-uniform, symmetric
            height, width = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
            if width >= generator.cols or height >= generator.rows:
                continue
            top = int(next(numbers) * (generator.rows - height + 1))
            left = int(next(numbers) * (generator.cols - width + 1))
            window = mask[top : top + height, left : left + width]
            if 0 < height * width - window.sum() <= budget:
                added = height * width - int(window.sum())
                window[...] = True
                break
        if added == 0:
            break
        count += added
    return mask


def test_bit_grid_masks_equal_a_plain_numpy_reference() -> None:
    rng = np.random.default_rng(3)
    for rows, cols, target in ((16, 16, 80), (37, 37, 600), (5, 7, 12), (16, 16, 3)):
        generator = BlockMaskGenerator(rows, cols, max_patches=rows * cols // 2)
        uniforms = rng.random(20_000).tolist()
        want = reference_mask(generator, target, uniforms)
        numbers = iter(uniforms)
        got = generator.from_uniforms(target, lambda: next(numbers))
        assert got.dtype == bool and (got == want).all() and 0 < got.sum() <= target


def test_masks_are_made_of_blocks() -> None:
    rng = np.random.default_rng(1)
    generator = BlockMaskGenerator(16, 16, max_patches=128)
    pieces = []
    for _ in range(100):
        mask = generator(64, rng)
        _, count = ndimage.label(mask)
        pieces.append(mask.sum() / count)
    # scattered masking would give ~1-2 patches per connected piece; rectangles give many
    assert np.mean(pieces) > 10


def test_batch_masks_are_stratified_and_shuffled() -> None:
    rng = np.random.default_rng(2)
    masks, upper_bound = sample_crop_masks(64, 16, 16, rng)
    counts = masks.sum(dim=1).numpy()
    assert masks.shape == (64, 256) and str(masks.dtype) == "torch.bool"
    assert (counts > 0).sum() == 32  # mask probability 0.5
    assert counts.sum() <= upper_bound
    masked = np.sort(counts[counts > 0])
    bins = np.linspace(0.1, 0.5, 33)
    assert (masked <= (256 * bins[1:]).astype(int)).all()  # the i-th smallest stays in bin i or below
    assert masked[-1] > 0.4 * 256 * 0.9 and masked[0] < 0.15 * 256
    assert not (counts[:32] > 0).all()  # shuffled, not masked-first


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_masked_patch_bound_holds_for_any_rank_share(ranks: int) -> None:
    """The bound for ``kept`` crops is the most any ``kept`` of the batch's crops can hold (brute
    force over the per-crop bounds), every rank's share of drawn masks stays within it, and with
    every crop kept it is the batch's bound, which drawn batches of a real recipe come close to."""
    images, grid = 2, 6  # per rank
    crops = 2 * images * ranks
    tops = np.linspace(0.1, 0.5, crops // 2 + 1)[1:]
    per_crop = [int(grid * grid * top) for top in tops] + [0] * (crops - len(tops))
    share = masked_patch_bound(crops, grid * grid, kept=2 * images)
    assert share == max(sum(chosen) for chosen in itertools.combinations(per_crop, 2 * images))
    whole = masked_patch_bound(crops, grid * grid)
    assert whole == sum(per_crop) and (ranks > 1 or share == whole)
    rng = np.random.default_rng(ranks)
    totals = []
    for _ in range(50):
        masks, bound = sample_crop_masks(crops, grid, grid, rng)
        assert bound == whole
        totals.append(int(masks.sum()))
        for rank in range(ranks):  # make_batch's split: each rank its images' two crops
            mine = masks.view(2, images * ranks, -1)[:, rank * images:(rank + 1) * images]
            assert int(mine.sum()) <= share
    assert max(totals) <= whole
    # a ViT-S/14 batch of 128 on one rank: narrow bins, so the padding is about 1 % of the rows
    drawn = [int(sample_crop_masks(256, 16, 16, rng)[0].sum()) for _ in range(5)]
    assert min(drawn) > 0.98 * masked_patch_bound(256, 256)


def test_masks_are_deterministic_given_the_generator() -> None:
    first, _ = sample_crop_masks(8, 5, 7, np.random.default_rng(7))
    second, _ = sample_crop_masks(8, 5, 7, np.random.default_rng(7))
    assert (first == second).all() and first.shape == (8, 35)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mask_probability"):
        sample_crop_masks(4, 4, 4, np.random.default_rng(), mask_probability=1.5)
    with pytest.raises(ValueError, match="ratio_range"):
        sample_crop_masks(4, 4, 4, np.random.default_rng(), ratio_range=(0.6, 0.2))
