"""A champion in a real sqlite MLflow registry, for tests that load ``models:/NAME@champion``."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from dinoflow.registry import gate, register_version


def promote_package(folder: Path, root: Path, name: str = "tiny") -> str:
    """Log the MLflow model ``folder`` as a run's ``backbone`` artifact in a sqlite store under
    ``root``, register it as ``name`` and promote it through the gate (asserted); returns the
    store's tracking URI."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment(name, artifact_location=f"file://{root / 'artifacts'}")
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(folder), "backbone")
    version = register_version(client, name, run.info.run_id, "backbone", {"knn_top1_k20": 0.5})
    assert gate(client, name, version, "knn_top1_k20").promoted
    return uri
