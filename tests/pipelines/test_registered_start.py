"""`dinoflow pretrain` and `dinoflow distill` take a registered model (``models:/...``) as their
starting weights or teacher: its backbone and the heads registered with it, fetched from a real
sqlite MLflow registry the register stage filled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from components.register import run_register_stage
from components.stage import REPORT_FILE, StageContext
from dinoflow.storage import Storage
from pipelines.cli import app
from trainer.models.head_weights import find_heads

DATA = "/usr/share/datasets/fashion-mnist"
SMALL = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "heads.num_prototypes=64",
         "heads.hidden_dim=64", "heads.bottleneck_dim=16", "optim.batch_size=8", "crops.num_local_crops=2",
         "eval.every_steps=0", "eval.train_limit=200", "eval.test_limit=100", f"data.uri={DATA}"]

pytestmark = pytest.mark.skipif(not Path(DATA).is_dir(), reason="Fashion-MNIST is not installed")


def test_a_registered_model_starts_a_pretraining_and_teaches_a_distillation(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    runner = CliRunner()
    first = runner.invoke(app, ["pretrain", "--config", "tiny", *SMALL, "max_steps=2", f"out={tmp_path / 'first'}"])
    assert first.exit_code == 0, first.output
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / REPORT_FILE).write_text(json.dumps({"metrics": {"knn_top1_k20": 0.5}}))
    run_register_stage(StageContext(str(tmp_path / "root"), uri), tmp_path / "first", tmp_path / "report",
                       tmp_path / "decision", "tiny")
    trained = find_heads(str(tmp_path / "first"), "auto", Storage())

    started = runner.invoke(app, ["pretrain", "--config", "tiny", *SMALL, "max_steps=1", f"out={tmp_path / 'next'}",
                                  "init_weights=models:/tiny@champion"])
    assert started.exit_code == 0, started.output
    assert "models:/tiny@champion: version 1 of tiny" in started.stderr
    client = MlflowClient(uri)
    (run,) = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
              if r.data.tags.get("init_heads")]
    assert run.data.tags["init_heads"].endswith("heads.safetensors")  # the registered heads, fetched
    continued = find_heads(str(tmp_path / "next"), "auto", Storage())
    assert continued.heads.keys() == trained.heads.keys()

    distilled = runner.invoke(app, ["distill", "--teacher", "models:/tiny/1", *SMALL, "distill.objective=heads",
                                    "max_steps=1", f"out={tmp_path / 'student'}"])
    assert distilled.exit_code == 0, distilled.output
    assert "models:/tiny/1: version 1 of tiny" in distilled.stderr
    # the registered heads are the teacher's: a student of other prototypes is refused naming them
    refused = runner.invoke(app, ["distill", "--teacher", "models:/tiny", *SMALL, "distill.objective=heads",
                                  "heads.num_prototypes=32", "max_steps=1", f"out={tmp_path / 'other'}"])
    assert refused.exit_code == 2
    assert "heads.num_prototypes = 32 but the teacher's heads have 64" in refused.stderr
    missing = runner.invoke(app, ["pretrain", "--config", "tiny", *SMALL, f"out={tmp_path / 'none'}",
                                  "init_weights=models:/tiny@nope"])
    assert missing.exit_code == 2 and "error: registered model 'tiny' has no alias 'nope'" in missing.stderr
