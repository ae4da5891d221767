"""What feeds the pretraining loop: each step's crops and masks (:func:`make_batch`, a
:class:`CropBatch`), made from the loader's images in a resumable order, and made in the step
before's wait for its losses, on a second CUDA stream if asked.

Why apart from the step (:mod:`trainer.engine`): the step is a function of a batch; how the batch
is made, where its images come from and when is the loop's business, shared with distillation.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from dinoflow.config import PretrainConfig
from trainer.data.augment import MultiCrop
from trainer.data.datasets import BadImageTracker, Batch
from trainer.data.masking import masked_patch_bound, sample_crop_masks
from trainer.losses import masked_positions
from trainer.strategy import Strategy

_log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class CropBatch:
    """One micro-batch: crops ``(2, B, 3, G, G)`` / ``(L, B, 3, l, l)``, masks ``(2B, N)``, and
    ``mask_index`` ``(M,)``: the masked patches' positions in ``masks.flatten()``, in order, then
    (from :func:`make_batch`) an unmasked patch's position up to the recipe's fixed ``M``.

    Why the index: selecting the masked patches with it (``tokens.flatten(0, 1)[mask_index]``)
    has a size known on the host; a boolean mask's selection must wait for the GPU to count its
    ``True``s. Why padded: the same ``M`` every step (:func:`~trainer.data.masking.masked_patch_bound`)
    gives the iBOT heads and losses static shapes, so compiled code and CUDA graphs are built once,
    not again for each count; the padding rows (``masks.flatten()[mask_index]`` False) get no weight
    and no target mass. Built with the masks on the host it costs nothing; left out, it is derived
    here, unpadded.
    """

    global_crops: Tensor
    local_crops: Tensor
    masks: Tensor
    mask_index: Tensor | None = None

    def __post_init__(self) -> None:
        if self.mask_index is None:
            self.mask_index = masked_positions(self.masks)


def make_batch(images: Tensor, step: int, cfg: PretrainConfig, multi_crop: MultiCrop,
               strategy: Strategy | None = None, aspects: Tensor | None = None) -> CropBatch:
    """Crops and masks for uint8 images (``aspects``: their regions', :class:`MultiCrop`); the
    masks' random draws are seeded from ``(seed, step)``.

    The masks are drawn for the nominal global batch, ``cfg.optim.batch_size`` images on each of
    ``strategy``'s ranks (every rank draws the same), and this rank keeps its block's rows, the
    first ``len(images)``: fewer where bad images were dropped. So masking depends neither on how
    the batch is split nor on the images a rank could not decode (the ratios spread over the
    global batch as drawn), and the masked patches' index is padded to the same count every step
    (the most a rank's block can hold: static shapes, :class:`CropBatch`). A batch larger than
    ``cfg.optim.batch_size`` (a whole global batch made in one process) is its own nominal one.
    """
    strategy = strategy or Strategy()
    global_crops, local_crops = multi_crop(images, aspects)
    grid = global_crops.shape[-1] // cfg.model.patch_size
    rng = np.random.default_rng([cfg.seed, step])
    nominal = max(cfg.optim.batch_size, len(images))  # this rank's images before bad ones were dropped
    global_images = nominal * strategy.world_size
    ratios = (cfg.loss.mask_ratio_min, cfg.loss.mask_ratio_max)
    masks, _ = sample_crop_masks(2 * global_images, grid, grid, rng, cfg.loss.mask_probability, ratios)
    block = masks.view(2, global_images, -1)[:, strategy.rank_slice(global_images)]  # (2, nominal, N)
    masks = block[:, : len(images)].flatten(0, 1)  # (2B, N)
    rows = masked_patch_bound(2 * global_images, grid * grid, cfg.loss.mask_probability, ratios, kept=2 * nominal)
    index = masked_positions(masks, rows)  # on the host: no wait for the GPU
    return CropBatch(global_crops, local_crops, to_device_async(masks, images.device),
                     to_device_async(index, images.device))


@dataclass
class PreparedStep:
    """A step's micro-batches, its images on this rank, and the bad-image tally and the loader's
    next batch once they were read (:class:`BadImageTracker.summary`, :attr:`ImageStream.loader_batch`),
    which are what its checkpoint keeps: the loop reads the next step's images before this step's
    checkpoint is written."""

    micro_batches: list[CropBatch]
    images: int
    bad_images: dict[str, Any]
    loader_batch: int


def settle(future: Future[Any], make: Callable[[int], Any], step: int) -> None:
    """``make(step)``'s result or exception into ``future``: raised where the result is used, so
    that an error in preparing the next step (a data set with too many bad images) stops the run
    where a step-by-step loop would, after this step's checkpoint."""
    try:
        future.set_result(make(step))
    except Exception as error:  # noqa: BLE001 - handed over whole, raised by future.result()
        future.set_exception(error)


def streams_kept(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """A block after which torch's random streams (the CPU's, and ``device``'s on CUDA) are as
    they were before it. Why: the loop draws the next step's crops in the step's wait, before an
    evaluation runs, so one drawing random numbers would otherwise move the stream the next step's
    stochastic depth reads."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


class SideStream:
    """The next step's batch made on a second CUDA stream (``data.side_stream``).

    Why: the loop prepares the next batch in the step's wait (:func:`~trainer.engine.train_step`'s
    ``while_waiting``), but on the step's own stream its kernels (the augmentation: element-wise
    passes over every crop) queue behind the step and run after it, adding their time to every
    step. On a stream of their own they run beside the step's matrix products. :meth:`run` queues
    ``make()``'s device work on that stream; :meth:`hand_over` makes the current stream wait for it
    and tells the allocator that the batch's tensors are used there (so their memory is not reused
    while the step reads them). Off, or off CUDA, both are plain calls.
    """

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.stream = torch.cuda.Stream(device) if enabled and device.type == "cuda" else None

    def run(self, make: Callable[[], T]) -> T:
        if self.stream is None:
            return make()
        with torch.cuda.stream(self.stream):
            return make()

    def hand_over(self, batches: list[CropBatch]) -> None:
        if self.stream is None:
            return
        current = torch.cuda.current_stream(self.stream.device)
        current.wait_stream(self.stream)
        for batch in batches:
            for tensor in (batch.global_crops, batch.local_crops, batch.masks, batch.mask_index):
                if tensor is not None:
                    tensor.record_stream(current)


def to_device_async(tensor: Tensor, device: torch.device) -> Tensor:
    """A host tensor copied to ``device`` without waiting for the work queued there (pinned
    memory, non-blocking copy on CUDA; a plain ``to`` elsewhere)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class ResumableBatches:
    """Index batches over a data set of ``length`` images, forever: each data epoch is a
    permutation seeded by ``(seed, epoch)``, so batch ``b`` is known without replaying.

    With ``world_size`` ranks, global batch ``b`` is the next ``batch_size * world_size`` indices
    of the permutation and rank ``r`` reads its ``r``-th block of ``batch_size``: distinct images
    per rank, fixed by the seed and the world size."""

    def __init__(self, length: int, batch_size: int, seed: int, start: int = 0, rank: int = 0,
                 world_size: int = 1, resize_from: tuple[int, int] | None = None) -> None:
        global_size = batch_size * world_size
        if length < global_size:
            raise ValueError(f"data set of {length} images is smaller than one batch ({global_size})")
        self.length, self.batch_size, self.seed, self.start = length, batch_size, seed, start
        self.rank, self.world_size = rank, world_size
        self.per_epoch = length // global_size
        self.resize_from = resize_from

    def __iter__(self) -> Iterator[list[int] | list[tuple[int, int]]]:
        """Each batch's indices; from batch ``resize_from[0]`` on, ``(index, resize_from[1])`` pairs:
        read at that load size (:class:`SizedReads`)."""
        index = self.start
        global_size = self.batch_size * self.world_size
        made_for, order = -1, np.empty(0, dtype=np.int64)
        while True:
            epoch, offset = divmod(index, self.per_epoch)
            if epoch != made_for:  # once an epoch: ImageNet's permutation alone takes 70 ms on a CPU core
                made_for, order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.length)
            first = offset * global_size + self.rank * self.batch_size
            indices = order[first : first + self.batch_size].tolist()
            if self.resize_from is not None and index >= self.resize_from[0]:
                yield [(i, self.resize_from[1]) for i in indices]
            else:
                yield indices
            index += 1


class SizedReads(torch.utils.data.Dataset):
    """``dataset`` read by index, and by ``(index, load_size)``: the image decoded to that square by a
    copy of ``dataset`` with its ``load_size`` set (one copy a size, made at its first read).

    Why: the final high-resolution phase's 518 px crops want images decoded larger than the
    recipe's 256 px squares, or they are only upsampled; the size goes with the batch's number
    (:class:`ResumableBatches`), so a run resumed in either phase reads what it would have read."""

    def __init__(self, dataset: Any) -> None:
        if not hasattr(dataset, "load_size"):
            raise ValueError(f"crops.highres_load_size needs a data set that decodes its images to a load_size "
                             f"(image folders, shards, Fashion-MNIST); {type(dataset).__name__} has none: set "
                             "crops.highres_load_size=0")
        self.dataset = dataset
        self._sized: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int | tuple[int, int]) -> Any:
        if not isinstance(item, tuple):
            return self.dataset[item]
        index, size = item
        if size not in self._sized:
            self._sized[size] = copy.copy(self.dataset)
            self._sized[size].load_size = size
        return self._sized[size][index]


class ImageStream:
    """The next batch of decoded uint8 images on ``device`` at each call, from batch
    ``start_batch`` of :class:`ResumableBatches` on; undecodable images are tallied in
    ``bad_images`` (which stops the run above its fraction) and empty batches skipped.

    Why :attr:`loader_batch` (the index of the next batch it takes) is what a resumed run starts
    from, not ``step x micro-batches``: a skipped batch moves the stream one batch on, so a run
    resumed from the step would read a batch twice and stay a batch off the order (and the
    high-resolution phase's switch, ``resize_from``) of a run never stopped. Each rank's stream
    skips its own empty batches; a checkpoint keeps rank 0's position and every rank resumes from
    it, so a rank that skipped a different number of batches than rank 0 resumes that many batches
    off its own order (it re-reads or passes over some of its images; no rank waits for another).

    Why it clocks its waits (:meth:`take_wait`): the loop asks for the next step's images in the
    step's wait for its losses, so a loader whose workers keep up costs nothing, and one that does
    not adds its lag to every step, which a GPU run shows only as fewer images a second. The loops
    log the share of each step spent waiting (``data_wait_share``) and :class:`LoaderWatch` names
    the cause."""

    def __init__(self, dataset: Any, collate: Callable, start_batch: int, device: torch.device,
                 bad_images: BadImageTracker, *, batch_size: int, seed: int, num_workers: int, rank: int = 0,
                 world_size: int = 1, resize_from: tuple[int, int] | None = None) -> None:
        """``resize_from``: ``(batch, load_size)``, the images of that batch on decoded to that size."""
        batches = ResumableBatches(len(dataset), batch_size, seed, start_batch, rank, world_size, resize_from)
        loader = torch.utils.data.DataLoader(
            dataset if resize_from is None else SizedReads(dataset), batch_sampler=batches,
            collate_fn=collate, num_workers=num_workers, persistent_workers=num_workers > 0,
            pin_memory=device.type == "cuda",  # Batch.pin_memory: the copy below then waits for nothing
        )
        self.batches, self.device, self.bad_images = iter(loader), device, bad_images
        self.waited = 0.0
        self.loader_batch = start_batch

    def __call__(self) -> Batch:
        """The next batch (of at least one image), its tensors on the device."""
        while True:
            tick = time.perf_counter()
            batch = next(self.batches)
            self.waited += time.perf_counter() - tick
            self.loader_batch += 1
            self.bad_images.update(batch)
            self.bad_images.check()
            if len(batch.images):
                return batch.to(self.device)

    def take_wait(self) -> float:
        """Seconds spent waiting for the loader since the last call."""
        waited, self.waited = self.waited, 0.0
        return waited


LOADER_WAIT_WINDOW = 20  # consecutive steps LoaderWatch judges together


class LoaderWatch:
    """Warns once when the loop waited for the loader more than ``share`` of the time of
    ``window`` consecutive steps (default :data:`LOADER_WAIT_WINDOW`; the run's first step, which
    waits for the workers to start, not counted), naming ``data.num_workers``: the workers do not
    keep up with the steps."""

    def __init__(self, num_workers: int, window: int | None = None, share: float = 0.2) -> None:
        self.num_workers, self.share = num_workers, share
        self.steps: deque[tuple[float, float]] = deque(maxlen=window or LOADER_WAIT_WINDOW)
        self.first, self.warned = True, False

    def update(self, seconds: float, waited: float) -> None:
        """Count one step of ``seconds`` of which ``waited`` went into waiting for images."""
        if self.first:
            self.first = False
            return
        self.steps.append((seconds, waited))
        if self.warned or len(self.steps) < (self.steps.maxlen or 0):
            return
        share = sum(w for _, w in self.steps) / max(sum(s for s, _ in self.steps), 1e-9)
        if share > self.share:
            self.warned = True
            _log.warning("the last %d steps spent %.0f %% of their time waiting for images: the loader's %d "
                         "workers do not keep up (raise data.num_workers; benchmarks/decode.py gives a "
                         "worker's images a second)", len(self.steps), 100 * share, self.num_workers)
