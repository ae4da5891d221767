"""The pipeline's parent MLflow run: its id, or a clear failure when the store does not create it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from components.pipeline_run import TAG_PIPELINE, open_pipeline_run
from components.stage import StageContext, error_uri
from dinoflow.storage import Storage
from tests.servers import free_port


def test_the_parent_run_is_opened_and_its_id_returned(tmp_path: Path) -> None:
    ctx = StageContext(str(tmp_path), f"sqlite:///{tmp_path / 'mlflow.db'}", pipeline_run_id="run-8")
    parent = open_pipeline_run(ctx, "full")
    assert MlflowClient(ctx.tracking_uri).get_run(parent).data.tags[TAG_PIPELINE] == "full"


def test_a_store_that_does_not_answer_fails_the_opener_naming_it(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """No parent id "None" handed to every stage: the task fails, its error recorded for the
    launcher, naming the store and what to check."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr("components.pipeline_run.PARENT_START_TIMEOUT_S", 1.0, raising=False)
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    ctx = StageContext(str(tmp_path), uri, pipeline_run_id="run-9")
    with pytest.raises(RuntimeError, match=rf"MLflow at {uri} did not create run 'full' within 1 s: check that the "
                                           "server is up"):
        open_pipeline_run(ctx, "full")
    record = json.loads(Storage().read_bytes(error_uri(ctx, "open_run")))
    assert record["stage"] == "open_run" and uri in record["error"]
