"""What feeds the pretraining loop (``trainer/batches.py``): the masked patches' fixed-size index
and the data order that resumes anywhere."""

from __future__ import annotations

import pytest
import torch

from tests.trainer.test_engine import config, images
from trainer.batches import ResumableBatches, make_batch
from trainer.data.augment import MultiCrop
from trainer.data.masking import masked_patch_bound


def test_a_batch_indexes_its_masked_patches_in_mask_order_padded_to_a_fixed_count() -> None:
    """``CropBatch.mask_index`` (built on the host) selects what the boolean masks select, then
    pads to the same length every step: the recipe's bound on the masked patches."""
    cfg = config()
    grid = cfg.crops.global_crop_size // cfg.model.patch_size
    bound = masked_patch_bound(16, grid * grid, cfg.loss.mask_probability,
                               (cfg.loss.mask_ratio_min, cfg.loss.mask_ratio_max))
    for step in range(4):
        batch = make_batch(images(), step, cfg, MultiCrop(cfg.crops))
        tokens = torch.randn(*batch.masks.shape, 5)
        masked = int(batch.masks.sum())
        assert 0 < masked <= len(batch.mask_index) == bound
        assert torch.equal(tokens.flatten(0, 1)[batch.mask_index[:masked]], tokens[batch.masks])
        assert not batch.masks.flatten()[batch.mask_index[masked:]].any()


def test_batches_resume_anywhere() -> None:
    full = ResumableBatches(50, 8, seed=3)
    stream = iter(full)
    first = [next(stream) for _ in range(14)]  # crosses a data-epoch boundary (6 batches per epoch)
    resumed = iter(ResumableBatches(50, 8, seed=3, start=9))
    assert [next(resumed) for _ in range(5)] == first[9:]
    assert sorted(sum(first[:6], [])) == sorted(set(sum(first[:6], [])))  # no repeats in an epoch
    with pytest.raises(ValueError, match="smaller than one batch"):
        ResumableBatches(5, 8, seed=0)
