"""The loop's clock of its waits for the data loader: ``data_wait_share`` per step, logged with
the step's metrics, and :class:`LoaderWatch`'s one warning when the workers do not keep up."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import pytest
import torch

from dinoflow.config import PretrainConfig, load_config
from dinoflow.storage import Storage
from dinoflow.tracking import NullTracker
from trainer.batches import LoaderWatch
from trainer.data.datasets import Sample, collate_samples
from trainer.engine import pretrain

SLEEP = 0.05  # seconds per image in the slow data set: a batch of 4 takes at least 0.2 s to load


class SlowImages(torch.utils.data.Dataset):
    """Random 28 px images, each taking ``delay`` seconds to 'decode'."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int) -> Sample:
        time.sleep(self.delay)
        image = (torch.rand(3, 28, 28, generator=torch.Generator().manual_seed(index)) * 255).to(torch.uint8)
        return Sample(image=image, label=-1, key=f"img{index}")


class Metrics(NullTracker):
    def __init__(self) -> None:
        self.steps: dict[int, dict[str, float]] = {}

    def log_metrics(self, metrics: Mapping[str, float], step: int, force: bool = False) -> None:
        self.steps.setdefault(step, {}).update(metrics)


def test_the_watch_warns_once_past_its_share_and_never_below(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="trainer.batches")
    watch = LoaderWatch(num_workers=2, window=3, share=0.2)
    watch.update(10.0, 9.0)  # the first step (the workers starting) is not counted
    for _ in range(3):
        watch.update(1.0, 0.15)  # 15 %: below
    assert not caplog.records
    for waited in (0.5, 0.5, 0.9, 0.9):  # the window: (0.15 + 0.15 + 0.5) / 3 = 27 %, warned; then more
        watch.update(1.0, waited)
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "27 %" in message and "loader's 2 workers" in message and "data.num_workers" in message


@pytest.mark.parametrize(("delay", "slow"), [(SLEEP, True), (0.0, False)])
def test_pretrain_logs_the_share_of_each_step_spent_waiting_for_images(
        tmp_path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, delay: float, slow: bool) -> None:
    """With a data set that takes ``4 x SLEEP`` seconds a batch (no workers: the loop loads in its
    own thread), every step waits at least that long, which the logged share shows, and the watch
    (its window shortened to 2 steps) warns; with an instant data set neither."""
    import trainer.batches as batches

    monkeypatch.setattr(batches, "LOADER_WAIT_WINDOW", 2)
    caplog.set_level(logging.WARNING, logger="trainer.batches")
    cfg = load_config(PretrainConfig, "tiny", [
        "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=7", "crops.local_crop_size=14",
        "heads.num_prototypes=64", "heads.hidden_dim=64", "heads.bottleneck_dim=16", "optim.batch_size=4",
        "max_steps=4", f"out={tmp_path / 'run'}", "tracking.metric_every=1"])
    tracker = Metrics()
    pretrain(cfg, SlowImages(delay), collate_samples, Storage(), tracker=tracker)
    shares = [tracker.steps[step]["data_wait_share"] for step in range(1, 5)]
    seconds = [4 / tracker.steps[step]["images_per_second"] for step in range(1, 5)]
    waits = [share * step for share, step in zip(shares, seconds)]
    assert all(0 <= share <= 1 for share in shares)
    warned = [r for r in caplog.records if "waiting for images" in r.getMessage()]
    if slow:
        assert all(wait >= 4 * SLEEP for wait in waits[:3]), waits  # steps 1-3 each load the next batch
        assert len(warned) == 1 and "loader's 0 workers" in warned[0].getMessage()
    else:
        assert max(waits) < 4 * SLEEP and not warned
