"""``dinoflow pipeline run`` on this machine: where its run root and MLflow store come from when
the parameters name them too, and the summary of a pipeline named with hyphens."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from components.pipeline_run import TAG_FAILED_STAGES, TAG_PIPELINE, open_pipeline_run
from components.stage import StageContext, stage_run
from dinoflow.storage import Storage
from dinoflow.tracking import default_tracking_uri
from pipelines.cli import app
from pipelines.definitions import CLUSTER_RUN_ROOT, CLUSTER_TRACKING_URI
from pipelines.local import local_settings, run_locally

DEFAULTS = {"run_root": CLUSTER_RUN_ROOT, "tracking_uri": CLUSTER_TRACKING_URI, "seed": 0}
UNSET = {"run_root": None, "tracking_uri": None}


def test_the_clusters_defaults_are_left_out_and_other_values_stand_for_the_settings() -> None:
    assert local_settings({**DEFAULTS, "seed": 3}, DEFAULTS, UNSET) == (None, None, {"seed": 3})
    assert local_settings(DEFAULTS, DEFAULTS, {"run_root": "runs/x", "tracking_uri": "http://m:5000"}) == (
        "runs/x", "http://m:5000", {"seed": 0})
    given = {"run_root": "runs/y", "tracking_uri": "sqlite:///y.db"}
    assert local_settings(given, DEFAULTS, UNSET) == ("runs/y", "sqlite:///y.db", {})
    assert local_settings(given, DEFAULTS, given) == ("runs/y", "sqlite:///y.db", {})  # the same both ways
    with pytest.raises(ValueError, match="the parameter run_root='runs/y' and --run-root 'runs/x' disagree"):
        local_settings(given, DEFAULTS, {"run_root": "runs/x", "tracking_uri": None})
    with pytest.raises(ValueError, match="tracking_uri='sqlite:///y.db' and MLFLOW_TRACKING_URI 'http://m' disagree"):
        local_settings(given, DEFAULTS, {"run_root": None, "tracking_uri": "http://m"})


def test_a_parameter_file_of_the_defaults_runs_back_and_a_clash_is_refused(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's round trip, ``pipeline params promote > mine.yaml`` then ``pipeline run promote
    --params mine.yaml``: the file's cluster run root and store are left out and the run goes on to
    the promote stage, whose complaint about the empty version (the default) is the one reported."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runner = CliRunner()
    written = runner.invoke(app, ["pipeline", "params", "promote"])
    assert written.exit_code == 0, written.output
    (tmp_path / "mine.yaml").write_text(written.stdout)
    common = ["--params", str(tmp_path / "mine.yaml"), "--kfp-root", str(tmp_path / "kfp")]
    clash = runner.invoke(app, ["pipeline", "run", "promote", *common, f"run_root={tmp_path / 'a'}",
                                "--run-root", str(tmp_path / "b")])
    assert clash.exit_code == 2, clash.output
    assert f"error: the parameter run_root='{tmp_path / 'a'}' and --run-root '{tmp_path / 'b'}' disagree" in (
        clash.stderr)
    run = runner.invoke(app, ["pipeline", "run", "promote", *common, f"run_root={tmp_path / 'runs'}"])
    assert run.exit_code == 1, run.output
    assert "stage 'promote' failed: ValueError: promote needs model_name and version" in run.stderr, run.stderr
    client = MlflowClient(default_tracking_uri(tmp_path / "runs"))  # the run root the parameter named, its store
    [parent] = client.search_runs([client.get_experiment_by_name("dinoflow").experiment_id],
                                  f"tags.`{TAG_PIPELINE}` = 'promote'")
    assert parent.info.status == "FAILED" and parent.data.tags[TAG_FAILED_STAGES] == "promote"


def test_a_hyphenated_pipeline_name_finds_its_stage_runs(tmp_path: Path) -> None:
    """``dinoflow pipeline run evaluate-only``: the parent run is tagged ``evaluate_only``."""
    tracking_uri = default_tracking_uri(tmp_path)

    def evaluate_only(run_root: str, tracking_uri: str, **params: Any) -> None:  # its runs, as the DAG opens them
        ctx = StageContext(run_root, tracking_uri, pipeline_run_id="run-1")
        with stage_run(replace(ctx, parent_run_id=open_pipeline_run(ctx, "evaluate_only")), "evaluate"):
            pass

    stages = run_locally(evaluate_only, "evaluate-only", str(tmp_path), str(tmp_path / "kfp"), tracking_uri, {},
                         Storage())
    assert [(stage.stage, stage.status) for stage in stages] == [("evaluate", "FINISHED")]
