"""A fine-tuned model served: ``/v1/classify`` ranks the classes as the classifier computes them,
from a run folder and from an MLflow package; a backbone without a classifier gets a 404."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import requests
import torch

from dinoflow.storage import Storage
from serve.app import create_app
from serve.model import load_served_model
from trainer.data.datasets import decode_image
from trainer.models.classifier import class_probabilities
from trainer.models.hub import load_backbone
from trainer.models.packaging import save_mlflow_model

from .conftest import CLASSES, IMAGE_SIZE, PATCH_SIZE, Running, start_server

def expected(folder: Path, paths: list[Path]) -> np.ndarray:
    """The classifier's probabilities of the files, decoded as the service decodes them."""
    from trainer.models.classifier import load_classifier

    model, _ = load_classifier(load_backbone(str(folder / "backbone.safetensors"), "safetensors"),
                               str(folder / "classifier.safetensors"), Storage())
    pixels = torch.stack([decode_image(p.read_bytes(), IMAGE_SIZE) for p in paths])
    return class_probabilities(model, pixels, PATCH_SIZE)


def test_classify_ranks_the_classes_as_the_classifier_does(finetuned: Path, image_folder: list[Path]) -> None:
    model = load_served_model(str(finetuned))  # a run folder: the classifier beside its backbone found
    assert model.classes == CLASSES and model.classifier is not None
    server, thread, url = start_server(create_app(model))
    try:
        files = [("images", (p.name, p.read_bytes(), "image/png")) for p in image_folder]
        response = requests.post(url + "/v1/classify", params={"k": 2}, files=files, timeout=30)
        assert response.status_code == 200, response.text
        body = response.json()
        probabilities = expected(finetuned, image_folder)
        assert body["k"] == 2 and len(body["results"]) == len(image_folder)
        for row, ranked in zip(probabilities, body["results"]):
            order = np.argsort(-row)[:2]
            assert [r["class"] for r in ranked] == [CLASSES[i] for i in order]
            np.testing.assert_allclose([r["probability"] for r in ranked], row[order], rtol=1e-4, atol=1e-6)
        assert np.ptp(probabilities, axis=0).max() > 1e-3  # the images get probabilities of their own
        assert requests.get(url + "/healthz", timeout=10).json()["classes"] == list(CLASSES)
        too_many = requests.post(url + "/v1/classify", params={"k": 5}, files=files[:1], timeout=10)
        assert too_many.status_code == 400 and "k must be in [1, 4], got 5" in too_many.text
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_a_packaged_fine_tuned_model_serves_the_same_classes(finetuned: Path, image_folder: list[Path],
                                                            tmp_path: Path) -> None:
    example = np.zeros((1, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    package = save_mlflow_model(finetuned / "backbone.safetensors",
                                {"patch_size": PATCH_SIZE, "image_size": IMAGE_SIZE}, tmp_path / "package" / "model",
                                example=example,
                                classifier=finetuned / "classifier.safetensors")
    model = load_served_model(str(package))
    assert model.classes == CLASSES
    pixels = torch.stack([decode_image(p.read_bytes(), IMAGE_SIZE) for p in image_folder])
    np.testing.assert_allclose(model.embed(pixels)["probabilities"].numpy(), expected(finetuned, image_folder),
                               rtol=1e-4, atol=1e-6)


def test_a_backbone_without_a_classifier_says_so(service: Running) -> None:
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in service.images[:1]]
    response = requests.post(service.url + "/v1/classify", files=files, timeout=10)
    assert response.status_code == 404 and "has no classifier" in response.text
    assert requests.get(service.url + "/healthz", timeout=10).json()["classes"] is None
