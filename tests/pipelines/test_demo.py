"""The demo command end to end: the full pipeline on local defaults, and on S3 + an MLflow server."""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from components.pipeline_run import TAG_PIPELINE
from dinoflow.storage import Storage
from pipelines.cli import app
from tests.servers import TEST_BUCKET, MlflowServer, SeaweedS3, s3_settings

SHORT = [
    "pretrain_minutes=0.05",
    "pretrain_overrides=[optim.batch_size=32, model.depth=2, checkpoint_every=5, tracking.metric_every=1]",
    "eval_train_limit=2000", "eval_test_limit=500",
]


def _check_mlflow(tracking_uri: str, experiment: str, monkeypatch: pytest.MonkeyPatch) -> None:
    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    parent = client.search_runs([found.experiment_id], f"tags.`{TAG_PIPELINE}` = 'full'")[0]
    assert parent.info.status == "FINISHED"
    children = client.search_runs([found.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                  order_by=["start_time ASC"])
    assert [c.info.run_name for c in children] == ["ingest", "pretrain", "evaluate", "register"]
    pretrain, evaluate = children[1], children[2]
    assert pretrain.data.metrics["loss_total"] > 0 and "lr" in pretrain.data.metrics
    assert 0 < pretrain.data.metrics["health_target_entropy"] < 1 and pretrain.data.tags["dinoflow.health"] == "ok"
    assert {"config.yaml", "training_curves.png"} <= {a.path for a in client.list_artifacts(pretrain.info.run_id)}
    assert {"report.json", "confusion_knn.png"} <= {a.path for a in client.list_artifacts(evaluate.info.run_id)}
    version = client.get_model_version_by_alias("dinoflow-tiny", "champion")
    assert version.tags["metric.knn_top1_k20"] == repr(evaluate.data.metrics["knn_top1_k20"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    features = mlflow.pyfunc.load_model("models:/dinoflow-tiny@champion").predict(np.zeros((3, 28, 28), np.uint8))
    assert features.shape == (3, 128)


def test_demo_on_local_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["demo", f"out={out}", *SHORT])
    assert result.exit_code == 0, result.output
    for line in ("ingest", "pretrain", "evaluate", "register", "promoted (no champion yet)", "health ok",
                 f"mlflow ui --backend-store-uri sqlite:///{out / 'mlflow.db'}", "models:/dinoflow-tiny@champion"):
        assert line in result.output
    assert len(list((out / "data" / "fashion-mnist").iterdir())) == 4
    assert list(out.glob("kfp/full-*/pretrain/backbone/backbone.safetensors"))
    _check_mlflow(f"sqlite:///{out / 'mlflow.db'}", "dinoflow-demo", monkeypatch)


def test_demo_on_s3_with_an_mlflow_server(
    s3_server: SeaweedS3, mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.chdir(tmp_path)  # KFP's local task outputs go to ./runs/kfp for a remote run root
    out = f"s3://{TEST_BUCKET}/demo-run"
    result = CliRunner().invoke(app, ["demo", f"out={out}", "tracking.experiment=demo-s3", *SHORT])
    assert result.exit_code == 0, result.output
    storage = Storage(s3_settings(s3_server))
    assert len(storage.list(f"{out}/data/fashion-mnist")) == 4
    checkpoints = [u for u in storage.list(f"{out}/work/pretrain", recursive=True) if u.endswith("latest.json")]
    assert len(checkpoints) == 1
    assert [u for u in storage.list(f"{out}/cache", recursive=True) if u.endswith("result.json")]
    _check_mlflow(mlflow_server.uri, "demo-s3", monkeypatch)


def test_demo_rejects_a_bad_override(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "data.knn_k=-3"])
    assert result.exit_code == 2
    assert "data.knn_k = '-3'" in result.stderr
    recipe = CliRunner().invoke(app, ["demo", f"out={tmp_path / 'x'}", "pretrain_overrides=[optim.lr=1]"])
    assert recipe.exit_code == 2
    assert "unknown key 'optim.lr'" in recipe.stderr
    assert not (tmp_path / "x").exists()  # failed before anything was written
