"""dinoflow.tracking against a sqlite store and a real ``mlflow server`` on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dinoflow.config import DemoConfig, load_config
from dinoflow.tracking import (
    TAG_GIT_COMMIT,
    TAG_PARENT,
    TAG_PIPELINE_RUN,
    TAG_STAGE,
    TAG_VERSION,
    MlflowTracker,
    NullTracker,
    default_tracking_uri,
    git_commit,
    standard_tags,
)
from tests.servers import MlflowServer


@pytest.fixture(params=["sqlite", "server"])
def tracking_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return default_tracking_uri(tmp_path / "run-root")
    server: MlflowServer = request.getfixturevalue("mlflow_server")
    return server.uri


def test_run_params_metrics_artifacts_read_back(tracking_uri: str, tmp_path: Path) -> None:
    config = load_config(DemoConfig, "demo", ["data.knn_k=7"])
    tags = standard_tags("pretrain", pipeline_run_id="pipeline-42")
    artifact_location = f"file://{tmp_path / 'artifacts'}" if tracking_uri.startswith("sqlite") else None
    with MlflowTracker.start(
        tracking_uri, "tests", "stage", tags=tags, artifact_location=artifact_location, metric_every=5
    ) as tracker:
        tracker.log_config(config)
        tracker.log_params({"long": "x" * 7000})
        for step in range(21):
            tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        tracker.log_metrics({"loss": 0.01}, step=22, force=True)
        report = tmp_path / "report.json"
        report.write_text(json.dumps({"knn_top1": 0.5}))
        tracker.log_artifact(report, "reports")
        run_id = tracker.run_id

    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.knn_k"] == "7"
    assert run.data.params["tracking.experiment"] == "dinoflow-demo"
    assert len(run.data.params["long"]) == 6000 and run.data.params["long"].endswith("[cut]")
    history = client.get_metric_history(run_id, "loss")
    assert [m.step for m in history] == [0, 5, 10, 15, 20, 22]
    assert history[1].value == pytest.approx(1 / 6)
    assert run.data.tags[TAG_STAGE] == "pretrain"
    assert run.data.tags[TAG_PIPELINE_RUN] == "pipeline-42"
    assert run.data.tags[TAG_VERSION].startswith("0.")
    assert run.data.tags.get(TAG_GIT_COMMIT) == git_commit()
    downloaded = Path(client.download_artifacts(run_id, "reports/report.json", str(tmp_path / "dl")))
    assert json.loads(downloaded.read_text()) == {"knn_top1": 0.5}
    config_yaml = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path / "dl")))
    assert "knn_k: 7" in config_yaml.read_text()


def test_nested_runs_and_failed_status(tracking_uri: str) -> None:
    parent = MlflowTracker.start(tracking_uri, "tests-nested", "pipeline")
    with pytest.raises(RuntimeError, match="stage broke"):
        with parent.child("pretrain") as child:
            child.log_metrics({"loss": 1.0}, step=0)
            raise RuntimeError("stage broke")
    with parent.child("evaluate") as second:
        second.log_metrics({"knn_top1": 0.7}, step=0)
    parent.finish()
    client = MlflowClient(tracking_uri=tracking_uri)
    children = client.search_runs(
        [parent.experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent.run_id}'"
    )
    statuses = {run.info.run_name: run.info.status for run in children}
    assert statuses == {"pretrain": "FAILED", "evaluate": "FINISHED"}
    assert client.get_run(parent.run_id).info.status == "FINISHED"


def test_missing_artifact_and_bad_cadence(tmp_path: Path) -> None:
    uri = default_tracking_uri(tmp_path)
    with MlflowTracker.start(uri, "tests", "x", artifact_location=f"file://{tmp_path / 'a'}") as tracker:
        with pytest.raises(FileNotFoundError, match="nothing-here"):
            tracker.log_artifact(tmp_path / "nothing-here.png")
    with pytest.raises(ValueError, match="metric_every"):
        MlflowTracker(MlflowClient(tracking_uri=uri), tracker.run_id or "", metric_every=0)


def test_default_store_is_sqlite_under_the_run_root(tmp_path: Path) -> None:
    assert default_tracking_uri(tmp_path / "r") == f"sqlite:///{tmp_path / 'r' / 'mlflow.db'}"
    assert default_tracking_uri(f"file://{tmp_path}/r2").endswith("/r2/mlflow.db")
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_URI"):
        default_tracking_uri("s3://bucket/run")


def test_null_tracker_accepts_everything(tmp_path: Path) -> None:
    tracker = NullTracker()
    tracker.log_config(load_config(DemoConfig, "demo"))
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.log_artifact(tmp_path / "missing")
    assert tracker.run_id is None
