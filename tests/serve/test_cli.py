"""`dinoflow index build` and `dinoflow serve` on the registry's champion, the service in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from typer.testing import CliRunner

from evaluators.features import labelled_features
from pipelines.cli import app
from serve.model import load_served_model
from tests.registry import promote_package
from tests.servers import free_port
from trainer.models.packaging import save_mlflow_model

from .conftest import evaluation_pixels


@pytest.fixture
def champion(tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """``models:/tiny@champion`` in a sqlite registry (MLFLOW_TRACKING_URI set); its config says 14 px."""
    example = np.zeros((1, 3, 14, 14), np.uint8)
    folder = save_mlflow_model(tiny_weights, {"patch_size": 7, "image_size": 14}, tmp_path / "pkg" / "backbone",
                               example=example)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", promote_package(folder, tmp_path))
    return "models:/tiny@champion"


def test_index_build_and_serve_the_champion(champion: str, image_folder: list[Path], tmp_path: Path) -> None:
    model = load_served_model(champion)
    assert model.image_size == 14 and model.patch_size == 7  # the package's config.json

    out = tmp_path / "index"
    built = CliRunner().invoke(app, ["index", "build", "--model", champion, "--images", str(image_folder[0].parent),
                                     "--out", str(out)])
    assert built.exit_code == 0, built.output
    assert json.loads(built.stdout)["count"] == 8
    bad = CliRunner().invoke(app, ["index", "build", "--model", champion, "--images", "x", "--out", "y",
                                   "--kind", "zip"])
    assert bad.exit_code == 2 and "allowed: folder, shards" in bad.stderr
    if not torch.cuda.is_available():
        bad = CliRunner().invoke(app, ["index", "build", "--model", champion, "--images", "x", "--out", "y",
                                       "--device", "cuda"])
        assert bad.exit_code == 2 and "no CUDA device" in bad.stderr

    port = free_port()
    with open(tmp_path / "serve.log", "wb") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", "serve", "--model", champion, "--index", str(out),
             "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 45
        while True:
            try:
                if requests.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "service did not come up"
            time.sleep(0.2)
        health = requests.get(url + "/healthz", timeout=5).json()
        assert health["model"] == champion and health["image_size"] == 14 and health["index_size"] == 8
        files = [("images", (p.name, p.read_bytes(), "image/png")) for p in image_folder[:3]]
        embedded = requests.post(url + "/v1/embed", files=files, timeout=30).json()
        pixels = torch.stack([evaluation_pixels(p.read_bytes(), 14) for p in image_folder[:3]])
        expected = labelled_features(model.backbone, pixels, 7).numpy()
        np.testing.assert_allclose(np.array(embedded["features"]["cls"]), expected, rtol=1e-5, atol=1e-5)
        found = requests.post(url + "/v1/neighbours", params={"k": 1}, files=files, timeout=30).json()["results"]
        assert [hits[0]["key"].rsplit("/", 1)[-1] for hits in found] == [p.name for p in image_folder[:3]]
        wrong = requests.post(url + "/v1/embed", files=[("file", ("a", b"x", "image/png"))], timeout=10)
        assert wrong.status_code == 400 and "'images'" in wrong.json()["detail"]
        assert "dinoflow_serve_requests_total" in requests.get(url + "/metrics", timeout=5).text
    finally:
        process.terminate()
        process.wait(timeout=15)


def test_commands_take_a_registered_model(champion: str, tiny_weights: Path, tmp_path: Path) -> None:
    """eval and export pick a model from the registry as serve does (they took weight files only)."""
    from tests.evaluators.test_classification import CLASSES, write_folders
    from trainer.models.hub import load_backbone

    exported = CliRunner().invoke(app, ["export", "--weights", champion, "--format", "safetensors",
                                        "--out", str(tmp_path / "export")])
    assert exported.exit_code == 0, exported.output
    ours, theirs = (load_backbone(str(path), "safetensors").state_dict()
                    for path in (tmp_path / "export" / "backbone.safetensors", tiny_weights))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    write_folders(tmp_path / "data", {"cat": (6, 2), "dog": (6, 2), "fish": (6, 2)})
    scored = CliRunner().invoke(app, ["eval", "knn", "--weights", champion, "--data-uri", str(tmp_path / "data"),
                                      "--image-size", "14", "--k", "3"])
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.stdout)["tasks"]["classification"]["classes"] == list(CLASSES)
    missing = CliRunner().invoke(app, ["eval", "knn", "--weights", "models:/nope@champion"])
    assert missing.exit_code == 2, missing.output
    assert missing.stderr.strip().splitlines()[-1] == ("error: models:/nope@champion: Registered Model with "
                                                       "name=nope not found")


def test_a_registered_model_is_found_in_the_demos_store_as_every_command_finds_it(
        tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without MLFLOW_TRACKING_URI, export (as eval, serve, index build, attention, curate) reads the
    demo's store, as `models list` and `pretrain init_weights=` do; MLflow's own default would make
    an empty ./mlflow.db and not find the model."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    folder = save_mlflow_model(tiny_weights, {"patch_size": 7, "image_size": 14}, tmp_path / "pkg" / "backbone",
                               example=np.zeros((1, 3, 14, 14), np.uint8))
    absent = CliRunner().invoke(app, ["export", "--weights", "models:/tiny@champion", "--format", "safetensors",
                                      "--out", str(tmp_path / "none")])
    assert absent.exit_code == 2 and "the demo's (sqlite:///" in absent.stderr, absent.output
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    promote_package(folder, tmp_path / "runs" / "demo")
    for model in ("models:/tiny@champion", "models:/tiny"):  # (models:/<name>: its champion, as for pretrain)
        out = tmp_path / "export" / model.replace(":/", "-").replace("@", "-")
        exported = CliRunner().invoke(app, ["export", "--weights", model, "--format", "safetensors",
                                            "--out", str(out)])
        assert exported.exit_code == 0, exported.output
        assert (out / "backbone.safetensors").is_file()
    listed = CliRunner().invoke(app, ["models", "list"])
    assert listed.exit_code == 0 and listed.stdout.splitlines()[1].split()[:3] == ["tiny", "1", "champion"]
    assert not (tmp_path / "mlflow.db").exists()  # no stray store in the current folder
