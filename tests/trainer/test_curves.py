"""Training curves: a bounded, evenly spaced record of step metrics that survives resumes, drawn
as one PNG at the end of a run."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from dinoflow.storage import Storage
from evaluators.visualize import save_training_curves
from tests.reliability.helpers import RandomImages
from tests.trainer.test_engine import config
from trainer import checkpoints
from trainer.checkpoints import TrainState, load_latest_checkpoint
from trainer.data.datasets import collate_samples
from trainer.engine import pretrain


def test_the_record_keeps_every_strides_step_and_doubles_the_stride_when_full(monkeypatch) -> None:
    monkeypatch.setattr(checkpoints, "CURVE_POINTS", 10)
    state = TrainState()
    for step in range(1, 101):
        state.record(step, {"loss_total": 1.0 / step}, every=2)
        assert len(state.curves) <= 10
        assert [row["step"] for row in state.curves] == list(range(state.curve_every, step + 1, state.curve_every))
    assert state.curve_every == 16  # 2 -> 4 (past 10 rows at step 22) -> 8 (at 44) -> 16 (at 88)
    assert state.curves[-1] == {"step": 96, "loss_total": 1.0 / 96}


def test_a_resumed_run_draws_the_curves_of_all_its_steps(tmp_path) -> None:
    out = tmp_path / "run"
    common = [f"out={out}", "tracking.metric_every=1", "checkpoint_every=2", "loss.warmup_teacher_temp_epochs=0"]
    pretrain(config(*common, "max_steps=3"), RandomImages(32, 28), collate_samples, Storage())
    first = (out / "training_curves.png").read_bytes()
    pretrain(config(*common, "max_steps=5"), RandomImages(32, 28), collate_samples, Storage())
    curves = json.loads(load_latest_checkpoint(Storage(), str(out))["curves"])
    assert [row["step"] for row in curves] == [1, 2, 3, 4, 5]  # steps 1-3 came back from the checkpoint
    assert {"loss_dino", "loss_total", "health_target_entropy", "lr"} <= set(curves[0])
    assert all(row["loss_total"] > 0 for row in curves)
    assert (out / "training_curves.png").read_bytes() != first  # drawn again, with the new steps


def test_panels_follow_what_was_recorded(tmp_path) -> None:
    rows = [{"step": s, "loss_total": 5 - s / 10, "loss_dino": 4.0, "lr": 1e-3 * s,
             "health_target_entropy": 0.7, "health_feature_spread": 0.9, "health_prototypes_used": 12.0}
            for s in range(1, 11)]
    distilled = [{k: v for k, v in row.items() if not k.startswith("health_")} for row in rows]
    evaluations = [{"step": 5, "train_minutes": 0.1, "images_seen": 40, "knn_top1_k20": 0.6},
                   {"step": 10, "train_minutes": 0.2, "images_seen": 80, "knn_top1_k20": 0.7}]
    widths = {}
    for name, recorded, scored in (("all", rows, evaluations), ("no_eval", rows, []), ("distil", distilled, [])):
        path = save_training_curves(recorded, scored, tmp_path / f"{name}.png")
        assert path.read_bytes()[:4] == b"\x89PNG"
        widths[name] = Image.open(path).size[0]
    # a panel each: losses, teacher, lr, evaluations / losses, teacher, lr / losses, lr
    assert widths["all"] / widths["no_eval"] == pytest.approx(4 / 3, rel=0.02)
    assert widths["no_eval"] / widths["distil"] == pytest.approx(3 / 2, rel=0.02)
