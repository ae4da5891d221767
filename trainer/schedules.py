"""Per-step schedules of pretraining, as pure functions of the step.

Why pure functions: a resumed run recomputes exactly the values an uninterrupted run would
use, with no scheduler state to save, and every value of step ``i`` is in one
:class:`ScheduleValues`. Epochs are ``epoch_length`` steps (the original's 1,250), whatever the
data size, so recipes keep their meaning on any data set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dinoflow.config import LossConfig, OptimConfig


def cosine(step: int, total: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (step ``total``), then ``end``."""
    if total <= 0 or step >= total:
        return end
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * step / total))


def warmup_cosine(step: int, total: int, warmup: int, peak: float, end: float, warmup_start: float = 0.0) -> float:
    """Linear warm-up from ``warmup_start`` to ``peak`` over ``warmup`` steps, then cosine to ``end``.

    Matches the original's schedule arrays: the warm-up reaches ``peak`` on its last step
    (``linspace(start, peak, warmup)``) and the cosine covers the remaining ``total - warmup``.
    """
    if step < warmup:
        return warmup_start if warmup == 1 else warmup_start + (peak - warmup_start) * step / (warmup - 1)
    return cosine(step - warmup, total - warmup, peak, end)


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """Square-root scaling of the learning rate from a global batch of 1024."""
    return base_lr * math.sqrt(global_batch / 1024)


@dataclass(frozen=True)
class ScheduleValues:
    """Everything that varies with the step."""

    lr: float
    last_layer_lr: float
    weight_decay: float
    teacher_momentum: float
    teacher_temp: float


def schedule_values(step: int, optim: OptimConfig, loss: LossConfig, world_size: int = 1) -> ScheduleValues:
    """The values of every schedule at ``step`` for a run of ``optim.epochs`` epochs."""
    total = total_steps(optim)
    warmup = int(optim.warmup_epochs * optim.epoch_length)
    peak = scaled_lr(optim.base_lr, optim.batch_size * world_size * optim.grad_accumulation)
    lr = warmup_cosine(step, total, warmup, peak, optim.min_lr)
    frozen = step < int(optim.freeze_last_layer_epochs * optim.epoch_length)
    temp_warmup = int(loss.warmup_teacher_temp_epochs * optim.epoch_length)
    teacher_temp = (
        loss.warmup_teacher_temp + (loss.teacher_temp - loss.warmup_teacher_temp) * step / max(temp_warmup - 1, 1)
        if step < temp_warmup
        else loss.teacher_temp
    )
    return ScheduleValues(
        lr=lr,
        last_layer_lr=0.0 if frozen else lr,
        weight_decay=cosine(step, total, optim.weight_decay, optim.weight_decay_end),
        teacher_momentum=cosine(step, total, optim.momentum_teacher, optim.final_momentum_teacher),
        teacher_temp=teacher_temp,
    )


def total_steps(optim: OptimConfig) -> int:
    """Optimiser steps in the schedule."""
    return max(int(optim.epochs * optim.epoch_length), 1)
