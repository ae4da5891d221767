"""Picking up a new ``@champion`` without a restart: a real sqlite MLflow registry, the service on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from dinoflow.registry import register_version
from evaluators.features import labelled_features
from pipelines.cli import app as cli
from serve.app import ServeSettings, create_app
from serve.index import load_index
from serve.model import ServedModel, load_served_model
from serve.reload import ChampionWatcher, ModelSlot
from trainer.models.packaging import save_mlflow_model

from .conftest import evaluation_pixels, start_server, write_tiny_weights


def _wait_for(url: str, condition, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        health = requests.get(url + "/healthz", timeout=10).json()
        if condition(health):
            return health
        assert time.monotonic() < deadline, f"not reached in {timeout_s} s: {health}"
        time.sleep(0.1)


def test_a_new_champion_is_served_without_a_restart(image_folder: list[Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("serve", artifact_location=f"file://{tmp_path / 'artifacts'}")

    def register(seed: int, image_size: int) -> str:
        weights = write_tiny_weights(tmp_path / f"seed{seed}.safetensors", seed)
        folder = save_mlflow_model(weights, {"patch_size": 7, "image_size": image_size}, tmp_path / f"pkg{seed}" / "b",
                                   example=np.zeros((1, 3, image_size, image_size), np.uint8))
        run = client.create_run(experiment)
        client.log_artifacts(run.info.run_id, str(folder), "backbone")
        return register_version(client, "tiny", run.info.run_id, "backbone", {"knn_top1_k20": 0.5})

    first, second, wrong_size = register(0, 14), register(1, 14), register(2, 28)
    client.set_registered_model_alias("tiny", "champion", first)
    served = load_served_model("models:/tiny@champion")
    assert served.version == first and served.image_size == 14
    server, thread, url = start_server(create_app(served, None, ServeSettings(reload_every_s=0.2)))
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in image_folder[:3]]
    pixels = torch.stack([evaluation_pixels(p.read_bytes(), 14) for p in image_folder[:3]])
    try:
        health = requests.get(url + "/healthz", timeout=10).json()
        assert health["model"] == "models:/tiny@champion" and health["model_version"] == first
        assert health["reload"]["every_s"] == 0.2 and health["reload"]["swaps"] == 0

        client.set_registered_model_alias("tiny", "champion", second)
        health = _wait_for(url, lambda h: h["model_version"] == second)
        assert health["reload"]["swaps"] == 1 and health["reload"]["last_error"] is None
        new = load_served_model(f"models:/tiny/{second}")
        embedded = requests.post(url + "/v1/embed", files=files, timeout=30).json()
        np.testing.assert_allclose(np.array(embedded["features"]["cls"]),
                                   labelled_features(new.backbone, pixels, 7).numpy(), rtol=1e-5, atol=1e-5)
        assert not np.allclose(np.array(embedded["features"]["cls"]),
                               labelled_features(served.backbone, pixels, 7).numpy(), atol=1e-3)

        client.set_registered_model_alias("tiny", "champion", wrong_size)  # 28 px: refused, v2 keeps serving
        health = _wait_for(url, lambda h: h["reload"]["last_error"] is not None)
        assert f"version {wrong_size} not served" in health["reload"]["last_error"]
        assert "image_size 28" in health["reload"]["last_error"] and health["model_version"] == second
        assert requests.post(url + "/v1/embed", files=files, timeout=30).status_code == 200
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _model(version: str, image_size: int = 28) -> ServedModel:
    return ServedModel(backbone=None, patch_size=7, image_size=image_size, name="models:/m@champion", version=version)


def test_the_watcher_swaps_only_a_new_fitting_version_and_survives_registry_errors() -> None:
    slot = ModelSlot(_model("1"))
    aliased = {"version": "1"}
    loaded: list[str] = []

    def resolve(name: str, alias: str) -> str:
        assert (name, alias) == ("m", "champion")
        if aliased["version"] == "down":
            raise ConnectionError("registry unreachable")
        return aliased["version"]

    def load(uri: str) -> ServedModel:
        loaded.append(uri)
        return _model("?", image_size=14 if uri.endswith("/3") else 28)

    watcher = ChampionWatcher(slot, "models:/m@champion", 60, load, resolve)
    assert not watcher.poll() and loaded == []  # unchanged: nothing loaded
    aliased["version"] = "2"
    assert watcher.poll() and slot.current.version == "2" and slot.current.name == "models:/m@champion"
    aliased["version"] = "3"  # another image size: refused once, not reloaded on every poll
    assert not watcher.poll() and not watcher.poll()
    assert loaded == ["models:/m/2", "models:/m/3"] and slot.current.version == "2"
    assert "image_size 14" in watcher.status.last_error
    aliased["version"] = "down"
    assert not watcher.poll() and "registry unreachable" in watcher.status.last_error
    aliased["version"] = "4"
    assert watcher.poll() and slot.current.version == "4" and watcher.status.last_error is None
    assert watcher.status.swaps == 2 and watcher.status.polls == 6


def test_a_version_prepared_otherwise_is_not_swapped_in() -> None:
    """An upload is decoded for the model current when it arrives and run by the one current at its batch:
    a swap between the two must not change how images are prepared (a Fashion-MNIST classifier's whole
    images against class folders' centre crop)."""
    slot = ModelSlot(_model("1"))
    whole = dataclasses.replace(_model("2"), whole_images=True)
    with pytest.raises(ValueError, match="its images are prepared as 'upright"):
        slot.swap(whole)
    assert slot.current.version == "1"
    slot.swap(_model("3"))
    assert slot.current.version == "3"


def test_reloading_needs_an_alias_and_no_index(served_model: ServedModel, index_uri: str,
                                               tiny_weights: Path) -> None:
    with pytest.raises(ValueError, match=r"needs a registry alias URI models:/<name>@<alias>"):
        create_app(served_model, None, ServeSettings(reload_every_s=1))
    with pytest.raises(ValueError, match="cannot be combined with an index"):
        create_app(served_model, load_index(index_uri, served_model), ServeSettings(reload_every_s=1))
    result = CliRunner().invoke(cli, ["serve", "--model", str(tiny_weights), "--reload-every-s", "1"])
    assert result.exit_code == 2 and "needs a registry alias URI" in result.stderr


def test_a_champion_whose_classifier_recorded_another_preparation_is_not_swapped_in(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Classifiers of the same class names, registered through a real registry: one whose
    evaluation scored whole images (its package's config.json records ``whole``) is refused by the
    watcher of a centre-cropped champion; another centre-cropped one is swapped in."""
    from dinoflow.storage import Storage
    from trainer.models.classifier import Classifier, save_classifier
    from trainer.models.hub import load_backbone

    from .conftest import CLASSES

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("serve", artifact_location=f"file://{tmp_path / 'artifacts'}")

    def register(seed: int, eval_transform: str) -> str:
        folder = tmp_path / f"run{seed}"
        folder.mkdir()
        weights = write_tiny_weights(folder / "backbone.safetensors", seed)
        classifier = Classifier(load_backbone(str(weights), "safetensors"), len(CLASSES), "cls")
        save_classifier(classifier, CLASSES, str(folder / "classifier.safetensors"), Storage(),
                        eval_transform=eval_transform)
        package = save_mlflow_model(weights, {"patch_size": 7, "image_size": 28}, tmp_path / f"pkg{seed}" / "b",
                                    example=np.zeros((1, 3, 28, 28), np.uint8),
                                    classifier=folder / "classifier.safetensors")
        run = client.create_run(experiment)
        client.log_artifacts(run.info.run_id, str(package), "backbone")
        return register_version(client, "tiny", run.info.run_id, "backbone", {"knn_top1_k20": 0.5})

    first, whole, cropped = register(0, "centre_crop"), register(1, "whole"), register(2, "centre_crop")
    client.set_registered_model_alias("tiny", "champion", first)
    slot = ModelSlot(load_served_model("models:/tiny@champion"))
    watcher = ChampionWatcher(slot, "models:/tiny@champion", 60, load_served_model)
    client.set_registered_model_alias("tiny", "champion", whole)
    assert not watcher.poll() and slot.current.version == first
    assert f"version {whole} not served" in watcher.status.last_error
    assert "its images are prepared as 'upright (EXIF), shorter side to image_size," in watcher.status.last_error
    client.set_registered_model_alias("tiny", "champion", cropped)
    assert watcher.poll() and slot.current.version == cropped and not slot.current.whole_images
