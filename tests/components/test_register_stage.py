"""The registry stages (register, champion, promote) against a real sqlite MLflow store: a version
is made only once the model it points at is uploaded, and a bad parameter is recorded for the
pipeline's parent run like any other failure."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient

from components.stage import REPORT_FILE, StageContext, error_uri
from dinoflow.registry import champion_version
from dinoflow.storage import Storage
from dinoflow.tracking import MlflowTracker
from trainer.models.hub import save_backbone
from trainer.models.vit import build_vit


class QuickFlushTracker(MlflowTracker):
    """The stages' tracker with a flush budget of half a second, so that an upload slower than it
    is one of two seconds (it is 60 s in a task)."""

    @classmethod
    def start(cls, *args: Any, **kwargs: Any) -> MlflowTracker:
        return super().start(*args, **{**kwargs, "flush_timeout_s": 0.5})


@pytest.fixture
def stage(tmp_path: Path) -> tuple[StageContext, Path, Path]:
    """A context on a sqlite store, a tiny backbone's folder and an evaluate report for it."""
    torch.manual_seed(0)
    backbone = tmp_path / "backbone"
    backbone.mkdir()
    save_backbone(build_vit("vit_small", patch_size=7, embed_dim=32, depth=1, num_heads=2, img_size=28),
                  str(backbone / "backbone.safetensors"))
    (backbone / "config.yaml").write_text("image_size: 28\n")
    report = tmp_path / "report"
    report.mkdir()
    (report / REPORT_FILE).write_text(json.dumps({"metrics": {"knn_top1_k20": 0.5}}))
    ctx = StageContext(str(tmp_path / "root"), f"sqlite:///{tmp_path / 'mlflow.db'}", pipeline_run_id="run-1")
    return ctx, backbone, report


def test_the_model_is_uploaded_before_its_version_is_registered(stage: tuple[StageContext, Path, Path],
                                                                 tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """An upload slower than the tracker's flush budget: the stage waits for it (the model was
    saved in a folder it deletes next), so the champion's ``runs:/`` URI holds the model."""
    from components.register import run_register_stage

    ctx, backbone, report = stage
    upload = MlflowClient.log_artifacts

    def slow(self: MlflowClient, *args: Any, **kwargs: Any) -> None:
        time.sleep(2)
        upload(self, *args, **kwargs)

    monkeypatch.setattr("components.stage.MlflowTracker", QuickFlushTracker)
    monkeypatch.setattr(MlflowClient, "log_artifacts", slow)
    decision = run_register_stage(ctx, backbone, report, tmp_path / "decision", "tiny")
    assert decision["promoted"]
    client = MlflowClient(ctx.tracking_uri)
    found = client.get_model_version("tiny", champion_version(client, "tiny"))
    held = {item.path for item in client.list_artifacts(found.run_id, "backbone")}
    assert "backbone/MLmodel" in held and "backbone/artifacts" in held, held


def test_an_upload_that_fails_fails_the_stage_and_registers_nothing(stage: tuple[StageContext, Path, Path],
                                                                    tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from components.register import run_register_stage

    ctx, backbone, report = stage

    def refused(self: MlflowClient, *args: Any, **kwargs: Any) -> None:
        raise OSError("the artifact store is down")

    monkeypatch.setattr("components.stage.MlflowTracker", QuickFlushTracker)
    monkeypatch.setattr(MlflowClient, "log_artifacts", refused)
    with pytest.raises(OSError, match="the artifact store is down"):
        run_register_stage(ctx, backbone, report, tmp_path / "decision", "tiny")
    assert MlflowClient(ctx.tracking_uri).search_registered_models() == []
    record = json.loads(Storage().read_bytes(error_uri(ctx, "register")))
    assert record["error"] == "OSError: the artifact store is down"


@pytest.mark.parametrize("case", ["gate metric", "no store", "champion: no store", "promote: no version",
                                  "promote: no store"])
def test_a_bad_parameter_is_recorded_for_the_parent_run(stage: tuple[StageContext, Path, Path], tmp_path: Path,
                                                        case: str) -> None:
    """Checks that ran before the error record: the launcher (and the parent run, through the exit
    handler) said only that the task failed."""
    from components.promote import run_promote_stage
    from components.register import run_champion_stage, run_register_stage

    ctx, backbone, report = stage
    untracked = StageContext(ctx.run_root, pipeline_run_id=ctx.pipeline_run_id)
    calls = {
        "gate metric": ("register", "gate metric 'linear_top1' is not in the evaluate report; it has: knn_top1_k20",
                        lambda: run_register_stage(ctx, backbone, report, tmp_path / "d", "tiny", "linear_top1")),
        "no store": ("register", "register needs an MLflow tracking URI",
                     lambda: run_register_stage(untracked, backbone, report, tmp_path / "d", "tiny")),
        "champion: no store": ("champion", "champion needs an MLflow tracking URI",
                               lambda: run_champion_stage(untracked, "tiny", tmp_path / "d")),
        "promote: no version": ("promote", "promote needs model_name and version",  # the pipeline's default
                                lambda: run_promote_stage(ctx, "tiny", "")),
        "promote: no store": ("promote", "promote needs an MLflow tracking URI",
                              lambda: run_promote_stage(untracked, "tiny", "2")),
    }
    name, said, call = calls[case]
    with pytest.raises(ValueError, match=said):
        call()
    record = json.loads(Storage().read_bytes(error_uri(ctx, name)))
    assert record["stage"] == name and record["error"].startswith(f"ValueError: {said}")
