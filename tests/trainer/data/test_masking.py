"""Block masks and their stratified sampling per batch."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from trainer.data.masking import BlockMaskGenerator, sample_crop_masks


def test_masks_reach_the_target_without_exceeding_it() -> None:
    rng = np.random.default_rng(0)
    generator = BlockMaskGenerator(16, 16, max_patches=128)
    reached = []
    for target in rng.integers(25, 128, 200):
        mask = generator(int(target), rng)
        assert mask.shape == (16, 16) and mask.sum() <= target
        reached.append(mask.sum() / target)
    assert np.mean(reached) > 0.9


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


def test_masks_are_deterministic_given_the_generator() -> None:
    first, _ = sample_crop_masks(8, 5, 7, np.random.default_rng(7))
    second, _ = sample_crop_masks(8, 5, 7, np.random.default_rng(7))
    assert (first == second).all() and first.shape == (8, 35)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mask_probability"):
        sample_crop_masks(4, 4, 4, np.random.default_rng(), mask_probability=1.5)
    with pytest.raises(ValueError, match="ratio_range"):
        sample_crop_masks(4, 4, 4, np.random.default_rng(), ratio_range=(0.6, 0.2))
