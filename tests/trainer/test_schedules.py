"""Schedules as pure functions, checked against the original's array construction."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dinoflow.config import LossConfig, OptimConfig
from trainer.schedules import cosine, scaled_lr, schedule_values, total_steps, warmup_cosine


def original_schedule(base: float, final: float, total: int, warmup: int, start: float = 0.0) -> np.ndarray:
    """The original CosineScheduler's array: linspace warm-up, then a cosine over the rest."""
    steps = np.arange(total - warmup)
    return np.concatenate([
        np.linspace(start, base, warmup),
        final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / len(steps))),
    ])


def test_warmup_cosine_matches_the_original_arrays() -> None:
    expected = original_schedule(1e-3, 1e-6, 500, 50)
    ours = [warmup_cosine(i, 500, 50, 1e-3, 1e-6) for i in range(500)]
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=0)
    assert warmup_cosine(10_000, 500, 50, 1e-3, 1e-6) == 1e-6
    np.testing.assert_allclose([cosine(i, 300, 0.04, 0.4) for i in range(300)], original_schedule(0.04, 0.4, 300, 0))


def test_schedule_values_follow_the_recipe() -> None:
    optim = OptimConfig(epochs=10, epoch_length=100, batch_size=64, base_lr=4e-3, warmup_epochs=2,
                        freeze_last_layer_epochs=1, momentum_teacher=0.992)
    loss = LossConfig(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3)
    assert total_steps(optim) == 1000
    peak = 4e-3 * math.sqrt(64 * 4 / 1024)
    assert scaled_lr(4e-3, 256) == pytest.approx(peak)
    first, frozen_end, warm_end, last = (schedule_values(s, optim, loss, world_size=4) for s in (0, 99, 199, 999))
    assert first.lr == 0 and first.last_layer_lr == 0 and first.teacher_temp == pytest.approx(0.04)
    assert frozen_end.last_layer_lr == 0 and frozen_end.lr > 0
    assert schedule_values(100, optim, loss, 4).last_layer_lr == schedule_values(100, optim, loss, 4).lr
    assert warm_end.lr == pytest.approx(peak)
    assert schedule_values(299, optim, loss).teacher_temp == pytest.approx(0.07)
    assert schedule_values(500, optim, loss).teacher_temp == 0.07
    assert first.weight_decay == pytest.approx(0.04) and first.teacher_momentum == pytest.approx(0.992)
    assert last.weight_decay == pytest.approx(0.4, abs=1e-5) and last.teacher_momentum == pytest.approx(1.0, abs=1e-7)
    assert last.lr == pytest.approx(1e-6, rel=1e-2)
