"""Collapse figures against numpy/scipy on random inputs, the watch's verdicts, and a real run
made to collapse (a teacher temperature so high its targets are uniform) flagged in MLflow."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from scipy.stats import entropy

from dinoflow.storage import Storage
from dinoflow.tracking import TAG_HEALTH, MlflowTracker
from tests.reliability.helpers import RandomImages
from tests.trainer.test_engine import config
from trainer.data.datasets import collate_samples
from trainer.engine import pretrain
from trainer.health import CollapseWatch, target_health


def test_figures_equal_numpy_and_scipy_on_random_targets() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(48, 200)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    features = rng.normal(size=(48, 32)) * rng.random(32)  # dimensions of unequal spread
    got = {k: v.item() for k, v in target_health(torch.from_numpy(probs), torch.from_numpy(features)).items()}
    assert got["target_entropy"] == pytest.approx(entropy(probs, axis=1).mean() / np.log(200), rel=1e-5)
    assert got["prototypes_used"] == len(np.unique(probs.argmax(axis=1)))
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    assert got["feature_spread"] == pytest.approx(unit.std(axis=0).mean() * np.sqrt(32), rel=1e-5)


def test_figures_at_the_collapses_and_for_a_healthy_batch() -> None:
    rng = np.random.default_rng(1)
    uniform = torch.full((16, 64), 1 / 64)
    one_hot = torch.zeros(16, 64)
    one_hot[:, 7] = 1
    same = torch.from_numpy(np.tile(rng.normal(size=(1, 128)), (16, 1)))
    spread = torch.from_numpy(rng.normal(size=(4096, 128)))  # even over the sphere
    assert target_health(uniform, spread)["target_entropy"].item() == pytest.approx(1.0)
    picked = target_health(one_hot, same)
    assert picked["target_entropy"].item() == pytest.approx(0.0, abs=1e-6) and picked["prototypes_used"].item() == 1
    assert picked["feature_spread"].item() == pytest.approx(0.0, abs=1e-6)
    assert target_health(uniform[:1].expand(4096, -1), spread)["feature_spread"].item() == pytest.approx(1.0, abs=0.02)


def test_the_watch_reports_a_condition_held_for_patience_steps_once_and_not_before_its_start() -> None:
    healthy = {"target_entropy": 0.8, "prototypes_used": 30.0, "feature_spread": 0.9}
    uniform = {**healthy, "target_entropy": 0.995}
    watch = CollapseWatch(start=10, patience=3)
    assert [watch.update(step, uniform) for step in range(10)] == [[]] * 10  # the warm-up: not judged
    assert watch.update(10, uniform) == [] and watch.update(11, uniform) == []
    assert watch.update(12, healthy) == []  # interrupted: counting starts again
    assert [watch.update(step, uniform) for step in (13, 14)] == [[], []]
    (reported,) = watch.update(15, uniform)
    assert reported.startswith("uniform teacher targets (entropy 0.995")
    assert watch.update(16, uniform) == [] and watch.verdict() == "uniform teacher targets at step 15"
    both = {"target_entropy": 0.1, "prototypes_used": 1.0, "feature_spread": 0.001}
    for step in range(17, 19):
        assert watch.update(step, both) == []
    assert len(watch.update(19, both)) == 2  # one prototype, and the embeddings on one point
    assert watch.verdict() == ("uniform teacher targets at step 15; every teacher target picks one prototype at "
                               "step 19; image embeddings collapsed to one point at step 19")
    assert CollapseWatch().verdict() == "ok"


@pytest.mark.parametrize(("overrides", "verdict"), [
    ([], "ok"),
    (["loss.teacher_temp=5.0", "loss.warmup_teacher_temp=5.0"], "uniform teacher targets at step 20"),
])
def test_a_run_whose_targets_go_uniform_is_tagged_and_a_healthy_one_is_not(tmp_path, overrides: list[str],
                                                                          verdict: str) -> None:
    """``loss.warmup_teacher_temp_epochs=0``: judged from the first step, so the 20 steps of
    patience end at step 20 of 22."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker.start(uri, "health", "run")
    cfg = config(f"out={tmp_path / 'run'}", "max_steps=22", "loss.warmup_teacher_temp_epochs=0", *overrides)
    summary = pretrain(cfg, RandomImages(64, 28), collate_samples, Storage(), tracker)
    tracker.finish()
    assert summary["health"] == verdict
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["health"] == verdict
    run = MlflowClient(uri).get_run(tracker.run_id)
    assert run.data.tags[TAG_HEALTH] == verdict
    assert {"health_target_entropy", "health_prototypes_used", "health_feature_spread"} <= set(run.data.metrics)
    assert not any(name.startswith("loss_health") for name in run.data.metrics)
    assert "training_curves.png" in {a.path for a in MlflowClient(uri).list_artifacts(tracker.run_id)}
