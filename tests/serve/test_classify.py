"""A fine-tuned model served: ``/v1/classify`` ranks the classes as the classifier computes them,
from a run folder and from an MLflow package, with the classes of the model that ran (a champion
swapped in while a request waits); a backbone without a classifier gets a 404."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from dinoflow.storage import Storage
from evaluators.classification import labelled_images
from serve.app import ServeSettings, create_app
from serve.index import build_index, load_index
from serve.model import PIXEL_TRANSFORM, WHOLE_TRANSFORM, ServedModel, load_served_model
from trainer.data.fashion_mnist import CLASSES as FASHION_MNIST_CLASSES
from trainer.models.classifier import Classifier, class_probabilities, save_classifier
from trainer.models.hub import load_backbone
from trainer.models.packaging import save_mlflow_model

from .conftest import (CLASSES, IMAGE_SIZE, PATCH_SIZE, Running, evaluation_pixels, png_bytes, start_server,
                       write_tiny_weights)

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def expected(folder: Path, paths: list[Path]) -> np.ndarray:
    """The classifier's probabilities of the files, prepared as the evaluations prepare them."""
    from trainer.models.classifier import load_classifier

    model, _ = load_classifier(load_backbone(str(folder / "backbone.safetensors"), "safetensors"),
                               str(folder / "classifier.safetensors"), Storage())
    pixels = torch.stack([evaluation_pixels(p.read_bytes()) for p in paths])
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
    pixels = torch.stack([evaluation_pixels(p.read_bytes()) for p in image_folder])
    np.testing.assert_allclose(model.embed(pixels)["probabilities"].numpy(), expected(finetuned, image_folder),
                               rtol=1e-4, atol=1e-6)


def test_a_backbone_without_a_classifier_says_so(service: Running) -> None:
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in service.images[:1]]
    response = requests.post(service.url + "/v1/classify", files=files, timeout=10)
    assert response.status_code == 404 and "has no classifier" in response.text
    assert requests.get(service.url + "/healthz", timeout=10).json()["classes"] is None


@dataclass
class HeldModel(ServedModel):
    """The served model whose forward passes wait for ``gate`` (``entered``: one is waiting)."""

    gate: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)

    def embed(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        self.entered.set()
        assert self.gate.wait(30)
        return super().embed(pixels)


def test_a_request_waiting_through_a_swap_answers_with_the_model_that_ran_it(finetuned: Path,
                                                                             image_folder: list[Path],
                                                                             tmp_path: Path) -> None:
    """A new champion swapped in while a request waits in the queue computes its features: the
    request's classes and version are that model's (not the names of the old one's classes over the
    new one's probabilities), and ``/v1/embed`` names the version that computed its vectors."""
    first = load_served_model(str(finetuned))
    held = HeldModel(first.backbone, first.patch_size, first.image_size, first.name, "1", first.classifier,
                     first.classes)
    backbone = load_backbone(str(write_tiny_weights(tmp_path / "second.safetensors", seed=4)), "safetensors")
    torch.manual_seed(1)
    classifier = Classifier(backbone, 5, "cls+avgpool")
    torch.nn.init.normal_(classifier.head.weight, std=1.0)
    second = ServedModel(backbone.eval(), PATCH_SIZE, IMAGE_SIZE, first.name, "2", classifier.eval(),
                         ("ant", "bee", "cow", "doe", "elk"))
    app = create_app(held, None, ServeSettings(max_batch_size=1, max_wait_ms=0))
    server, thread, url = start_server(app)
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in image_folder[:3]]
    try:
        with ThreadPoolExecutor(2) as pool:
            embedding = pool.submit(requests.post, url + "/v1/embed", files=files, timeout=60)
            assert held.entered.wait(30)  # version 1 computes the embedding, held there
            classifying = pool.submit(requests.post, url + "/v1/classify", params={"k": 4}, files=files, timeout=60)
            deadline = time.monotonic() + 30
            while app.state.batcher.queued < 1:  # the classification waits in the queue
                assert time.monotonic() < deadline, "the classification never reached the queue"
                time.sleep(0.01)
            app.state.slot.swap(second)
            held.gate.set()
            embedded, classified = embedding.result(), classifying.result()
        assert embedded.status_code == 200 and embedded.json()["model_version"] == "1"
        assert classified.status_code == 200, classified.text
        body = classified.json()
        assert body["model_version"] == "2"
        probabilities = class_probabilities(classifier, torch.stack([evaluation_pixels(p.read_bytes())
                                                                     for p in image_folder[:3]]), PATCH_SIZE)
        for row, ranked in zip(probabilities, body["results"]):
            order = np.argsort(-row)[:4]
            assert [r["class"] for r in ranked] == [second.classes[i] for i in order]
            np.testing.assert_allclose([r["probability"] for r in ranked], row[order], rtol=1e-4, atol=1e-6)
        npy = requests.post(url + "/v1/embed", params={"format": "npy"}, files=files, timeout=30)
        assert npy.headers["X-Model-Version"] == "2"
    finally:
        held.gate.set()
        server.should_exit = True
        thread.join(timeout=10)


def served_probabilities(model: ServedModel, uploads: list[tuple[str, bytes]]) -> np.ndarray:
    """The probabilities ``(N, C)`` of ``model``'s classes, in their order, that ``/v1/classify``
    answers for ``uploads`` (``(file name, PNG bytes)``) on a real server."""
    server, thread, url = start_server(create_app(model))
    try:
        files = [("images", (name, data, "image/png")) for name, data in uploads]
        response = requests.post(url + "/v1/classify", params={"k": len(model.classes)}, files=files, timeout=30)
        assert response.status_code == 200, response.text
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    return np.array([[{r["class"]: r["probability"] for r in ranked}[name] for name in model.classes]
                     for ranked in response.json()["results"]])


@pytest.mark.skipif(not Path(FASHION_MNIST).is_dir(), reason="Fashion-MNIST is not installed")
def test_a_fashion_mnist_classifier_is_served_the_whole_images_it_was_scored_on(tmp_path: Path) -> None:
    """Fine-tuning scores Fashion-MNIST's 28 px test images whole, resized to image_size (no centre
    crop): served, an uploaded test image gets the probabilities its evaluation computed, and an
    index holds the features of those pixels."""
    folder = tmp_path / "fashion"
    folder.mkdir()
    write_tiny_weights(folder / "backbone.safetensors", seed=3)
    torch.manual_seed(0)
    classifier = Classifier(load_backbone(str(folder / "backbone.safetensors"), "safetensors"),
                            len(FASHION_MNIST_CLASSES), "cls+avgpool").eval()
    torch.nn.init.normal_(classifier.head.weight, std=1.0)
    save_classifier(classifier, FASHION_MNIST_CLASSES, str(folder / "classifier.safetensors"), Storage(),
                    eval_transform="whole")
    images = labelled_images(FASHION_MNIST, "auto", Storage(), train_limit=1, test_limit=6, image_size=IMAGE_SIZE)
    ((inputs, _),) = list(images.test_batches(torch.device("cpu"), PATCH_SIZE, IMAGE_SIZE))  # trainer.finetune.score's
    with torch.no_grad():
        evaluated = classifier(inputs).softmax(dim=-1).numpy()

    model = load_served_model(str(folder))
    assert model.whole_images and model.transform == WHOLE_TRANSFORM
    package = save_mlflow_model(folder / "backbone.safetensors", {"patch_size": PATCH_SIZE, "image_size": IMAGE_SIZE},
                                tmp_path / "package" / "model", example=np.zeros((1, IMAGE_SIZE, IMAGE_SIZE), np.uint8),
                                classifier=folder / "classifier.safetensors")
    assert load_served_model(str(package)).whole_images  # as the finetune pipeline registers it
    uploads = [png_bytes(image.numpy()) for image in images.test]  # (28, 28) grayscale PNGs
    served = served_probabilities(model, [(f"{i}.png", data) for i, data in enumerate(uploads)])
    np.testing.assert_allclose(served, evaluated, rtol=1e-4, atol=1e-6)

    pool = tmp_path / "pool"
    pool.mkdir()
    for i, data in enumerate(uploads):
        (pool / f"{i}.png").write_bytes(data)
    build_index(model, str(pool), str(tmp_path / "index"))
    index = load_index(str(tmp_path / "index"), model)
    assert index.meta["transform"] == WHOLE_TRANSFORM
    nearest = index.search(model.embed(images.test)["cls"], k=1)  # the evaluation's pixels' features
    assert [Path(hits[0]["key"]).name for hits in nearest] == [f"{i}.png" for i in range(len(uploads))]
    np.testing.assert_allclose([hits[0]["score"] for hits in nearest], 1.0, atol=1e-5)


def classifier_folder(root: Path, classes: tuple[str, ...], metadata: dict[str, str] | None = None,
                      eval_transform: str = "") -> Path:
    """A fine-tuning run's folder whose classifier records ``eval_transform``; with ``metadata``
    instead, written as that file's metadata alone (a classifier saved before the record existed)."""
    from safetensors.torch import save_file

    root.mkdir()
    write_tiny_weights(root / "backbone.safetensors", seed=3)
    torch.manual_seed(0)
    classifier = Classifier(load_backbone(str(root / "backbone.safetensors"), "safetensors"), len(classes),
                            "cls+avgpool").eval()
    torch.nn.init.normal_(classifier.head.weight, std=1.0)
    if metadata is None:
        save_classifier(classifier, classes, str(root / "classifier.safetensors"), Storage(),
                        eval_transform=eval_transform)
    else:
        save_file({f"head.{k}": v.contiguous() for k, v in classifier.head.state_dict().items()},
                  str(root / "classifier.safetensors"), metadata=metadata)
    return root


def packaged(folder: Path) -> Path:
    """``folder``'s backbone and classifier as an MLflow package, as the register stage makes it."""
    return save_mlflow_model(folder / "backbone.safetensors", {"patch_size": PATCH_SIZE, "image_size": IMAGE_SIZE},
                             folder.parent / f"{folder.name}-package" / "model",
                             example=np.zeros((1, IMAGE_SIZE, IMAGE_SIZE), np.uint8),
                             classifier=folder / "classifier.safetensors")


def test_a_folder_classifier_named_as_fashion_mnist_is_served_the_centre_crops_it_was_scored_on(
        image_folder: list[Path], tmp_path: Path) -> None:
    """The recorded transform decides, not the class names: a classifier of Fashion-MNIST's class
    names whose evaluation scored centre crops is served centre crops (from its run folder and its
    package), its probabilities those of the evaluation's pixels; one of other names recorded
    ``whole`` is served whole."""
    folder = classifier_folder(tmp_path / "named", FASHION_MNIST_CLASSES, eval_transform="centre_crop")
    package = packaged(folder)
    assert json.loads(next(package.rglob("config.json")).read_text())["eval_transform"] == "centre_crop"
    for model in (load_served_model(str(folder)), load_served_model(str(package))):
        assert model.classes == FASHION_MNIST_CLASSES and not model.whole_images
        assert model.transform == PIXEL_TRANSFORM
    served = served_probabilities(load_served_model(str(folder)), [(p.name, p.read_bytes()) for p in image_folder])
    np.testing.assert_allclose(served, expected(folder, image_folder), rtol=1e-4, atol=1e-6)

    whole = classifier_folder(tmp_path / "whole", CLASSES, eval_transform="whole")
    for model in (load_served_model(str(whole)), load_served_model(str(packaged(whole)))):
        assert model.whole_images and model.transform == WHOLE_TRANSFORM


def test_a_classifier_saved_before_the_record_is_served_as_its_class_names_say(tmp_path: Path) -> None:
    """Legacy: a classifier file without ``eval_transform`` (and its package, whose config.json then
    has none) is served as before: Fashion-MNIST's class names whole, any other centre-cropped."""
    for classes, whole in ((FASHION_MNIST_CLASSES, True), (CLASSES, False)):
        folder = classifier_folder(tmp_path / f"legacy{len(classes)}", classes,
                                   metadata={"classes": json.dumps(list(classes)), "head_input": "cls+avgpool"})
        package = packaged(folder)
        assert "eval_transform" not in json.loads(next(package.rglob("config.json")).read_text())
        for model in (load_served_model(str(folder)), load_served_model(str(package))):
            assert model.classes == classes and model.whole_images is whole


def test_an_unknown_eval_transform_is_refused_naming_the_allowed_ones(tmp_path: Path) -> None:
    allowed = "is not one of whole, centre_crop"
    with pytest.raises(ValueError, match=f"eval_transform 'resize' {allowed}"):
        classifier_folder(tmp_path / "saved", CLASSES, eval_transform="resize")
    folder = classifier_folder(tmp_path / "bad", CLASSES, metadata={"classes": json.dumps(list(CLASSES)),
                                                                    "head_input": "cls+avgpool",
                                                                    "eval_transform": "resize"})
    with pytest.raises(ValueError, match=f"classifier.safetensors: eval_transform 'resize' {allowed}"):
        load_served_model(str(folder))
    package = packaged(classifier_folder(tmp_path / "good", CLASSES, eval_transform="whole"))
    config = next(package.rglob("config.json"))
    config.write_text(json.dumps({**json.loads(config.read_text()), "eval_transform": "crop"}))
    with pytest.raises(ValueError, match=f"config.json: eval_transform 'crop' {allowed}"):
        load_served_model(str(package))
