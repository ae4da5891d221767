"""dinoflow.tracking against a sqlite store and a real ``mlflow server`` on 127.0.0.1."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

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
from tests.servers import MlflowServer, free_port


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


def test_an_upload_something_points_at_lands_before_it_returns_or_raises(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """``upload_artifact`` (a registered model's files): an upload slower than the flush budget is
    waited for, so the file may go at once; a failed one raises to the caller."""
    uri = default_tracking_uri(tmp_path)
    upload = MlflowClient.log_artifact

    def slow(self: MlflowClient, *args: Any, **kwargs: Any) -> None:
        time.sleep(1.5)
        upload(self, *args, **kwargs)

    def refused(self: MlflowClient, *args: Any, **kwargs: Any) -> None:
        raise OSError("store down")

    model = tmp_path / "model.bin"
    model.write_bytes(b"weights")
    with MlflowTracker.start(uri, "tests", "upload", artifact_location=f"file://{tmp_path / 'a'}",
                             flush_timeout_s=0.2) as tracker:
        monkeypatch.setattr(MlflowClient, "log_artifact", slow)
        tracker.upload_artifact(model, "backbone")
        model.unlink()  # as the register stage's scratch folder goes
        monkeypatch.setattr(MlflowClient, "log_artifact", refused)
        (tmp_path / "heads.bin").write_bytes(b"heads")
        with pytest.raises(OSError, match="store down"):
            tracker.upload_artifact(tmp_path / "heads.bin", "heads")
    client = MlflowClient(tracking_uri=uri)
    assert [item.path for item in client.list_artifacts(tracker.run_id, "backbone")] == ["backbone/model.bin"]


def test_a_run_that_must_start_fails_naming_the_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """``require_run`` (a pipeline's parent run, whose id every stage names): no run id, no run
    created later, an error naming the store; a required upload to a run never created raises."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(RuntimeError, match=rf"MLflow at {uri} did not create run 'full' within 1 s: check that"):
        MlflowTracker.start(uri, "tests", "full", start_timeout_s=1, require_run=True)
    tracker = MlflowTracker.start(uri, "tests", "stage", start_timeout_s=0.5, flush_timeout_s=0.5)
    with pytest.raises(RuntimeError, match=rf"MLflow at {uri} has not created the run within 0.5 s: .* not uploaded"):
        tracker.upload_artifact(Path(__file__))
    tracker.finish()


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
