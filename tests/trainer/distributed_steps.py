"""Run N training steps on a fixed stream of global batches and save what they produced.

Started by ``test_distributed.py`` twice: under ``torchrun`` (W ranks, ``distributed.strategy=
fsdp2``) and as one plain process (``single``). Every rank augments the whole global batch with
the ``(seed, step)`` generator and keeps its block of images, so each image's crops and masks
are the same however the batch is split; the runs differ only by how the work is distributed.

Usage: ``python distributed_steps.py OUT GLOBAL_BATCH STEPS [--micro=K] [--save-at=K:PATH]
[--resume=PATH] [section.field=value ...]``. Writes (from rank 0) ``{"losses": [per-step dict],
"student": sd, "teacher": sd, "objective": sd}``. ``--micro=K`` splits each step's global batch
into K global micro-batches (gradient accumulation, as in the engine: micro-batch ``i`` of step
``s`` is global batch ``s * K + i``, each rank keeping its block of it); ``--save-at`` also
writes the engine's checkpoint after step K (``checkpoint_bytes``), and ``--resume`` starts from
such a checkpoint (written by any world size) at its step, so ``losses`` holds only the steps run
here.
"""

from __future__ import annotations

import sys

import torch

from dinoflow.config import PretrainConfig, load_config
from trainer.batches import CropBatch, make_batch
from trainer.checkpoints import TrainState, checkpoint_bytes, restore_optimizer, shared_checkpoint
from trainer.data.augment import MultiCrop
from trainer.data.masking import masked_patch_bound
from trainer.engine import Objective, build_networks, train_step
from trainer.losses import masked_positions
from trainer.optim import build_adamw
from trainer.schedules import ScheduleValues
from trainer.strategy import build_strategy, leave_rank


def global_images(step: int, count: int) -> torch.Tensor:
    """The ``count`` uint8 images of global batch ``step``, ``(count, 3, 28, 28)``."""
    generator = torch.Generator().manual_seed(10_000 + step)
    return (torch.rand(count, 3, 28, 28, generator=generator) * 255).to(torch.uint8)


def main(out: str, global_batch: int, steps: int, args: list[str]) -> None:
    options = dict(a.removeprefix("--").split("=", 1) for a in args if a.startswith("--"))
    overrides = [a for a in args if not a.startswith("--")]
    save_step, save_path = options["save-at"].split(":", 1) if "save-at" in options else (-1, "")
    micro = int(options.get("micro", "1"))
    torch.set_num_threads(1)
    cfg = load_config(PretrainConfig, "tiny", overrides)
    strategy = build_strategy(cfg.distributed, torch.device("cpu"))
    torch.manual_seed(cfg.seed)
    student, teacher = build_networks(cfg)
    objective = Objective(cfg, strategy.all_reduce)
    checkpoint = None
    if "resume" in options:  # as the engine restores: read by the main rank, whole tensors before sharding
        checkpoint = shared_checkpoint(strategy, lambda: torch.load(options["resume"], weights_only=True))
        strategy.load_whole(student, checkpoint["student"])
        strategy.load_whole(teacher, checkpoint["teacher"])
        objective.load_state_dict(checkpoint["objective"])
    student, teacher = strategy.wrap(student, teacher)
    optimizer = strategy.prepare_optimizer(student, build_adamw(student, cfg, torch.device("cpu")))
    if checkpoint is not None:
        restore_optimizer(strategy, student, optimizer, checkpoint["optimizer"])
    multi_crop = MultiCrop(cfg.crops)
    mine = strategy.rank_slice(global_batch // micro)
    # the masks drawn for the whole micro-batch made here (make_batch's nominal batch: all its images)
    whole = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"batch_size": global_batch // micro})})
    history = []
    for step in range(checkpoint["step"] if checkpoint is not None else 0, steps):
        sched = ScheduleValues(lr=1e-3, last_layer_lr=1e-3 if step >= 2 else 0.0, weight_decay=0.04,
                               teacher_momentum=0.9, teacher_temp=0.04 + 0.001 * step)
        torch.manual_seed(cfg.seed * 1_000_003 + step)
        batches = []
        for index in range(step * micro, (step + 1) * micro):
            full = make_batch(global_images(index, global_batch // micro), index, whole, multi_crop)
            masks = full.masks.view(2, global_batch // micro, -1)[:, mine].flatten(0, 1)
            # padded as make_batch pads a rank's share: the most its crops can hold, padding left out
            rows = masked_patch_bound(len(full.masks), masks.shape[1], cfg.loss.mask_probability,
                                      (cfg.loss.mask_ratio_min, cfg.loss.mask_ratio_max), kept=len(masks))
            batches.append(CropBatch(full.global_crops[:, mine], full.local_crops[:, mine], masks,
                                     masked_positions(masks, rows)))
        student.train()
        history.append(train_step(student, teacher, objective, batches, sched, optimizer, cfg.optim.clip_grad,
                                  strategy=strategy))
        if step + 1 == int(save_step):
            data = checkpoint_bytes(student, teacher, objective, optimizer, TrainState(step + 1), cfg, strategy)
            if strategy.is_main:
                with open(save_path, "wb") as file:
                    file.write(data)
    result = {"losses": history, "student": strategy.full_state_dict(student),
              "teacher": strategy.full_state_dict(teacher), "objective": objective.state_dict(),
              "world_size": strategy.world_size}
    if strategy.is_main:
        torch.save(result, out)
    strategy.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
    leave_rank()
