"""What feeds the pretraining loop (``trainer/batches.py``): the masked patches' fixed-size index
and the data order that resumes anywhere."""

from __future__ import annotations

import pytest
import torch

from pathlib import Path

import numpy as np
from PIL import Image

from dinoflow.storage import Storage
from tests.trainer.test_engine import config, images
from trainer.batches import ImageStream, ResumableBatches, make_batch
from trainer.data.augment import MultiCrop
from trainer.data.datasets import BadImageTracker, ImageFolderDataset, Sample, collate_samples
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


def test_each_epoch_is_its_seeded_permutation_made_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank r's batch b is its block of the epoch's permutation (seeded by (seed, epoch)); the
    permutation is made once an epoch, not for every batch (ImageNet's: 70 ms on a CPU core)."""
    made: list[list[int]] = []
    rng = np.random.default_rng
    monkeypatch.setattr(np.random, "default_rng", lambda seed: (made.append(list(seed)), rng(seed))[1])
    stream = iter(ResumableBatches(50, 4, seed=3, rank=1, world_size=2))  # 6 global batches of 8 an epoch
    batches = [next(stream) for _ in range(14)]
    assert made == [[3, 0], [3, 1], [3, 2]]
    for index, batch in enumerate(batches):
        epoch, offset = divmod(index, 6)
        order = rng([3, epoch]).permutation(50)
        assert batch == order[offset * 8 + 4 : offset * 8 + 8].tolist()


def test_batches_resume_anywhere() -> None:
    full = ResumableBatches(50, 8, seed=3)
    stream = iter(full)
    first = [next(stream) for _ in range(14)]  # crosses a data-epoch boundary (6 batches per epoch)
    resumed = iter(ResumableBatches(50, 8, seed=3, start=9))
    assert [next(resumed) for _ in range(5)] == first[9:]
    assert sorted(sum(first[:6], [])) == sorted(set(sum(first[:6], [])))  # no repeats in an epoch
    with pytest.raises(ValueError, match="smaller than one batch"):
        ResumableBatches(5, 8, seed=0)


def test_the_stream_hands_each_images_region_aspect_to_the_crops(tmp_path: Path) -> None:
    """Wide and tall images held whole (``crops.max_aspect``): the stream's batches carry their
    regions' aspects and ``make_batch`` draws the crops for them (as ``MultiCrop`` given them)."""
    rng = np.random.default_rng(0)
    for i, (width, height) in enumerate([(56, 28), (28, 42), (40, 40), (60, 30)]):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    cfg = config()
    cfg = cfg.model_copy(update={"crops": cfg.crops.model_copy(update={"max_aspect": 2.0})})
    dataset = ImageFolderDataset(Storage(), str(tmp_path), cfg.crops.load_size, max_aspect=cfg.crops.max_aspect)
    stream = ImageStream(dataset, collate_samples, 0, torch.device("cpu"), BadImageTracker(0.0), batch_size=4, seed=0,
                         num_workers=0)
    batch = stream()
    by_key = {key.rsplit("/", 1)[-1]: float(a) for key, a in zip(batch.keys, batch.aspects)}
    assert by_key == {"0.png": 2.0, "1.png": pytest.approx(2 / 3), "2.png": 1.0, "3.png": 2.0}
    multi_crop = MultiCrop(cfg.crops)
    torch.manual_seed(5)
    made = make_batch(batch.images, 0, cfg, multi_crop, aspects=batch.aspects)
    torch.manual_seed(5)
    want = multi_crop(batch.images, batch.aspects)
    torch.manual_seed(5)
    square = multi_crop(batch.images)
    assert torch.equal(made.global_crops, want[0]) and torch.equal(made.local_crops, want[1])
    assert not torch.equal(made.global_crops, square[0])


def test_the_high_resolution_phase_reads_its_batches_at_its_load_size(tmp_path: Path) -> None:
    """``resize_from=(batch, size)``: from that batch on, the images are decoded to ``size`` (by a copy
    of the data set), before it to the data set's own; resumed past it, the first batch is read at
    ``size`` too. A data set without a load size is refused, naming the setting."""
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    dataset = ImageFolderDataset(Storage(), str(tmp_path), 28)
    common = dict(batch_size=4, seed=0, num_workers=0, resize_from=(3, 42))
    stream = ImageStream(dataset, collate_samples, 0, torch.device("cpu"), BadImageTracker(0.0), **common)
    batches = [stream() for _ in range(5)]
    assert [b.images.shape[-1] for b in batches] == [28, 28, 28, 42, 42] and dataset.load_size == 28
    resumed = ImageStream(dataset, collate_samples, 4, torch.device("cpu"), BadImageTracker(0.0), **common)()
    assert resumed.keys == batches[4].keys and torch.equal(resumed.images, batches[4].images)
    assert list(ResumableBatches(8, 4, seed=0, start=1, resize_from=(2, 42)).__iter__().__next__()) == \
        next(iter(ResumableBatches(8, 4, seed=0, start=1)))  # before the phase: plain indices
    with pytest.raises(ValueError, match="crops.highres_load_size needs a data set that decodes its images to a "
                                         "load_size .* list has none"):
        ImageStream([1, 2, 3, 4], collate_samples, 0, torch.device("cpu"), BadImageTracker(0.0), **common)


class _KeyedImages(torch.utils.data.Dataset):
    """``count`` 4 x 4 images keyed by their index; those at ``bad`` undecodable."""

    def __init__(self, count: int, bad: set[int]) -> None:
        self.count, self.bad = count, bad

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Sample:
        return Sample(None if index in self.bad else torch.zeros(3, 4, 4, dtype=torch.uint8), -1, str(index))


def test_a_stream_resumed_at_its_loader_batch_goes_on_as_one_never_stopped() -> None:
    """10 images, batches of 2, the second batch all bad: the stream skips it, so its third batch is
    loader batch 3 and it moves on to 4. Started again there (not at 3, the batches it handed out)
    it hands out what the uninterrupted stream does next, without a batch twice."""
    order = iter(ResumableBatches(10, 2, seed=0))
    next(order)
    dataset = _KeyedImages(10, set(next(order)))
    common = dict(batch_size=2, seed=0, num_workers=0)

    def stream(start: int) -> ImageStream:
        return ImageStream(dataset, collate_samples, start, torch.device("cpu"), BadImageTracker(1.0), **common)

    whole = stream(0)
    uninterrupted = [whole().keys for _ in range(4)]
    first = stream(0)
    assert [first().keys for _ in range(3)] == uninterrupted[:3] and first.loader_batch == 4
    assert stream(first.loader_batch)().keys == uninterrupted[3]
    assert uninterrupted[3] not in uninterrupted[:3]
