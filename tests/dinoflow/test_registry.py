"""Registry gate against real MLflow stores (sqlite file and an `mlflow server` over HTTP)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dinoflow.registry import champion_version, gate, register_version, version_metric
from tests.servers import MlflowServer


@pytest.fixture(params=["sqlite", "server"])
def client(request: pytest.FixtureRequest, tmp_path: Path) -> MlflowClient:
    if request.param == "sqlite":
        return MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    server: MlflowServer = request.getfixturevalue("mlflow_server")
    return MlflowClient(tracking_uri=server.uri)


def _version(client: MlflowClient, name: str, tmp_path: Path, metrics: dict[str, float]) -> str:
    experiment = client.get_experiment_by_name("registry-tests")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(
        "registry-tests", artifact_location=f"file://{tmp_path / 'artifacts'}")
    run = client.create_run(experiment_id)
    (tmp_path / "model.txt").write_text(str(metrics))
    client.log_artifact(run.info.run_id, str(tmp_path / "model.txt"), "backbone")
    return register_version(client, name, run.info.run_id, "backbone", metrics)


def test_the_alias_moves_only_for_a_better_version(client: MlflowClient, tmp_path: Path) -> None:
    name = f"gate-{uuid.uuid4().hex[:8]}"
    first = _version(client, name, tmp_path, {"knn_top1_k20": 0.70, "linear_top1": 0.72})
    assert version_metric(client, name, first, "knn_top1_k20") == pytest.approx(0.70)
    decision = gate(client, name, first, "knn_top1_k20")
    assert decision.promoted and decision.reason == "no champion yet" and champion_version(client, name) == first

    worse = _version(client, name, tmp_path, {"knn_top1_k20": 0.65})
    decision = gate(client, name, worse, "knn_top1_k20")
    assert not decision.promoted and champion_version(client, name) == first
    assert (decision.champion_version, decision.champion_value, decision.value) == (first, pytest.approx(0.70),
                                                                                     pytest.approx(0.65))

    within_margin = _version(client, name, tmp_path, {"knn_top1_k20": 0.705})
    assert not gate(client, name, within_margin, "knn_top1_k20", margin=0.01).promoted
    assert champion_version(client, name) == first

    better = _version(client, name, tmp_path, {"knn_top1_k20": 0.75})
    decision = gate(client, name, better, "knn_top1_k20", margin=0.01)
    assert decision.promoted and "0.7500 > 0.7000 + margin 0.01" == decision.reason
    assert champion_version(client, name) == better
    assert [v.version for v in client.search_model_versions(f"name='{name}'")].__len__() == 4


def test_a_version_without_the_metric_cannot_pass(client: MlflowClient, tmp_path: Path) -> None:
    name = f"gate-{uuid.uuid4().hex[:8]}"
    version = _version(client, name, tmp_path, {"linear_top1": 0.8})
    with pytest.raises(ValueError, match="has no finite 'knn_top1_k20' to gate on"):
        gate(client, name, version, "knn_top1_k20")
    assert champion_version(client, name) is None
