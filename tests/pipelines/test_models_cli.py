"""`dinoflow models list|promote` against a real sqlite MLflow registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from dinoflow.registry import champion_version, gate
from pipelines.cli import app
from tests.dinoflow.test_registry import _version


def test_list_then_roll_the_champion_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    first = _version(client, "tiny", tmp_path, {"knn_top1_k20": 0.70, "linear_top1": 0.72})
    gate(client, "tiny", first, "knn_top1_k20")
    second = _version(client, "tiny", tmp_path, {"knn_top1_k20": 0.75}, heads="heads/heads.safetensors")
    gate(client, "tiny", second, "knn_top1_k20")
    runner = CliRunner()

    listed = runner.invoke(app, ["models", "list", "--tracking-uri", uri])
    assert listed.exit_code == 0, listed.output
    header, newest, oldest = listed.output.splitlines()
    assert header.split()[:6] == ["model", "version", "aliases", "knn_top1_k20", "linear_top1", "heads"]
    assert newest.split()[:6] == ["tiny", "2", "champion", "0.7500", "-", "yes"] and "gate: 0.7500 > 0.7000" in newest
    assert oldest.split()[:6] == ["tiny", "1", "-", "0.7000", "0.7200", "-"] and "gate: no champion yet" in oldest

    moved = runner.invoke(app, ["models", "promote", "tiny", "1", "--reason", "v2 drifts", "--tracking-uri", uri])
    assert moved.exit_code == 0, moved.output
    assert moved.output.strip() == "models:/tiny@champion: version 2 -> 1"
    assert champion_version(client, "tiny") == first

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the store from the environment, as every command reads it
    rows = json.loads(runner.invoke(app, ["models", "list", "tiny", "--json"]).output)
    assert [(row["version"], row["aliases"], row["heads"]) for row in rows] == [
        ("2", [], "heads/heads.safetensors"), ("1", ["champion"], "")]
    assert rows[1]["alias_moves"]["champion"].endswith("by hand: v2 drifts")

    missing = runner.invoke(app, ["models", "promote", "tiny", "7"])
    assert missing.exit_code == 2 and "error: model 'tiny' has no version '7'; its versions: 1, 2" in missing.output
    unknown = runner.invoke(app, ["models", "list", "small"])
    assert unknown.exit_code == 2 and "no registered model 'small'; the registry holds: tiny" in unknown.output
    assert champion_version(client, "tiny") == first


def test_without_a_store_the_demos_is_read_and_its_absence_named(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["models", "list"])
    assert result.exit_code == 2 and "the demo's (sqlite:///" in result.output and "run `make demo`" in result.output
    assert not (tmp_path / "runs" / "demo" / "mlflow.db").exists()  # no empty store made
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'demo' / 'mlflow.db'}")
    _version(client, "dinoflow-tiny", tmp_path, {"knn_top1_k20": 0.7})
    result = CliRunner().invoke(app, ["models", "list"])
    assert result.exit_code == 0 and result.output.splitlines()[1].split()[:3] == ["dinoflow-tiny", "1", "-"]
