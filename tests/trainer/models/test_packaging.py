"""A backbone as an MLflow model: registered, loaded by alias, and equal to the library's features."""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pytest
import torch

from dinoflow.registry import CHAMPION
from evaluators.features import extract_features, to_model_input
from tests.registry import promote_package
from trainer.models.hub import save_backbone
from trainer.models.packaging import save_mlflow_model
from trainer.models.vit import build_vit


@pytest.fixture
def weights(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(3)
    backbone = build_vit("vit_small", patch_size=7, embed_dim=32, depth=2, num_heads=2, img_size=28,
                         layerscale_init=0.1).eval()
    path = tmp_path / "backbone.safetensors"
    save_backbone(backbone, str(path))
    return path, backbone


def test_registered_model_loads_by_alias_and_embeds_like_the_library(
    weights: tuple[Path, torch.nn.Module], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, backbone = weights
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    folder = save_mlflow_model(path, {"patch_size": 7}, tmp_path / "package" / "backbone", example=images[:2])
    names = {p.name for p in folder.rglob("*") if p.is_file()}
    assert {"MLmodel", "requirements.txt", "backbone.safetensors", "config.json"} <= names
    assert not [n for n in names if n.endswith(".pkl")]  # from code: loading runs no pickled objects
    requirements = (folder / "requirements.txt").read_text()
    assert "torch==" in requirements and "+cpu" not in requirements

    monkeypatch.setenv("MLFLOW_TRACKING_URI", promote_package(folder, tmp_path))
    model = mlflow.pyfunc.load_model(f"models:/tiny@{CHAMPION}")
    features = model.predict(images)
    expected, _ = extract_features(backbone, to_model_input(torch.from_numpy(images), patch_size=7))
    np.testing.assert_allclose(features, expected.numpy(), rtol=1e-5, atol=1e-5)
    assert features.shape == (5, 32) and np.abs(features).max() > 0.1
    with pytest.raises(Exception, match="uint8"):
        model.predict(images.astype(np.float32))


def test_config_without_patch_size_is_refused(weights: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must hold patch_size"):
        save_mlflow_model(weights[0], {}, tmp_path / "x", example=np.zeros((1, 28, 28), np.uint8))


def test_a_fine_tuned_model_packaged_with_its_classifier_predicts_class_probabilities(
    weights: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    from dinoflow.storage import Storage
    from trainer.models.classifier import Classifier, save_classifier

    path, backbone = weights
    classifier = Classifier(backbone, 3, "cls+avgpool")
    torch.nn.init.normal_(classifier.head.weight, std=0.5)  # not the near-zero init: distinct probabilities
    save_classifier(classifier, ("cat", "dog", "fish"), str(tmp_path / "classifier.safetensors"), Storage(),
                    eval_transform="centre_crop")
    images = np.random.default_rng(1).integers(0, 256, (4, 3, 28, 28), dtype=np.uint8)
    folder = save_mlflow_model(path, {"patch_size": 7}, tmp_path / "package" / "model", example=images[:2],
                               classifier=tmp_path / "classifier.safetensors")
    config = next(folder.rglob("config.json")).read_text()
    assert '"classes"' in config and '"fish"' in config
    probabilities = mlflow.pyfunc.load_model(str(folder)).predict(images)
    with torch.no_grad():  # an independent computation: the head on the CLS token and mean patch token
        out = backbone.forward_features(to_model_input(torch.from_numpy(images), patch_size=7))
        logits = classifier.head(torch.cat([out["x_norm_clstoken"], out["x_norm_patchtokens"].mean(1)], dim=1))
    np.testing.assert_allclose(probabilities, logits.softmax(-1).numpy(), rtol=1e-5, atol=1e-6)
    assert probabilities.shape == (4, 3) and probabilities.std() > 0.01
