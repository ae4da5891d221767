"""The demo job end to end through the CLI: local run root with sqlite, and S3 + MLflow server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from dinoflow.storage import Storage
from pipelines.cli import app
from tests.conftest import TEST_BUCKET, s3_settings
from tests.servers import MlflowServer, SeaweedS3


SHORT_PRETRAINING = [
    "pretrain_minutes=0.15",
    "pretrain_overrides=[optim.batch_size=32, eval.train_limit=1000, eval.test_limit=200, checkpoint_every=5]",
]


def _check_run(tracking_uri: str, run_id: str, top1: float) -> None:
    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["knn_top1"] == pytest.approx(top1)
    assert 0 < run.data.metrics["pretrained_knn_top1_k20"] <= 1
    assert run.data.params["data.knn_k"] == "20"
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"samples.png", "confusion_knn.png", "summary.json", "config.yaml"} <= names
    children = client.search_runs([run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'")
    assert [c.info.run_name for c in children] == ["pretrain"]
    assert children[0].data.metrics["loss_total"] > 0 and "linear_top1" in children[0].data.metrics


def _check_pretrained(summary: dict) -> None:
    pretrained = summary["pretrained"]
    assert pretrained["recipe"] == "tiny" and pretrained["steps"] >= 1
    assert 0 < pretrained["knn_top1_k20"] <= 1 and 0 < pretrained["linear_top1"] <= 1


def test_demo_on_local_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["demo", f"out={out}", *SHORT_PRETRAINING])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "demo" / "summary.json").read_text())
    # raw pixels, k=20, T=0.07: 84.6 % on the test split (reference measured independently)
    assert summary["knn"]["top1"] == pytest.approx(0.846, abs=0.003)
    assert summary["train_images"] == 60000 and summary["test_images"] == 10000
    assert (out / "demo" / "confusion_knn.png").read_bytes()[:4] == b"\x89PNG"
    _check_pretrained(summary)
    assert (out / "pretrain" / "backbone.safetensors").exists()
    _check_run(f"sqlite:///{out / 'mlflow.db'}", summary["mlflow_run_id"], summary["knn"]["top1"])


def test_demo_on_s3_with_an_mlflow_server(
    s3_server: SeaweedS3, mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    out = f"s3://{TEST_BUCKET}/demo-run"
    result = CliRunner().invoke(app, ["demo", f"out={out}", "tracking.experiment=demo-s3", *SHORT_PRETRAINING])
    assert result.exit_code == 0, result.output
    storage = Storage(s3_settings(s3_server))
    summary = json.loads(storage.read_bytes(f"{out}/demo/summary.json"))
    assert summary["data_uri"] == f"{out}/data/fashion-mnist"
    assert len(storage.list(summary["data_uri"])) == 4
    _check_pretrained(summary)
    assert storage.exists(f"{out}/pretrain/backbone.safetensors")
    assert storage.exists(f"{out}/pretrain/checkpoints/latest.json")
    _check_run(mlflow_server.uri, summary["mlflow_run_id"], summary["knn"]["top1"])


def test_demo_rejects_a_bad_override(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "data.knn_k=-3"])
    assert result.exit_code == 2
    assert "data.knn_k = '-3'" in result.stderr
    recipe = CliRunner().invoke(app, ["demo", f"out={tmp_path / 'x'}", "pretrain_overrides=[optim.lr=1]"])
    assert recipe.exit_code != 0
    assert "unknown key 'optim.lr'" in str(recipe.exception) + recipe.output
    assert not (tmp_path / "x" / "data").exists()  # failed before copying anything
