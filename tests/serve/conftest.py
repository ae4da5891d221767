"""A tiny random backbone, a folder of images, its index, and the real service on 127.0.0.1."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image

from serve.app import ServeSettings, create_app
from serve.index import build_index, load_index
from serve.model import ServedModel, load_served_model
from tests.servers import free_port
from dinoflow.storage import Storage
from trainer.data.datasets import read_image
from trainer.models.classifier import Classifier, save_classifier
from trainer.models.hub import load_backbone, save_backbone
from trainer.models.vit import build_vit

IMAGE_SIZE = 28
PATCH_SIZE = 7
CLASSES = ("cat", "dog", "fish", "bird")  # the fine-tuned model's


@dataclass
class Running:
    url: str
    model: ServedModel
    images: list[Path]


def png_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def evaluation_pixels(data: bytes, size: int = IMAGE_SIZE) -> torch.Tensor:
    """``(3, size, size)`` uint8 as the evaluations prepare an image, written out: decoded with the
    shorter side at ``size / 0.875`` (32 px for 28), the centre ``size`` square kept."""
    load = round(size / 0.875)
    offset = (load - size) // 2
    return read_image(data, load)[:, offset:offset + size, offset:offset + size]


def write_tiny_weights(path: Path, seed: int = 0) -> Path:
    """A tiny ViT (patch 7, dim 16, depth 2) with random weights of ``seed``, saved as ``.safetensors``."""
    model = build_vit("vit_small", patch_size=PATCH_SIZE, embed_dim=16, depth=2, num_heads=2, img_size=IMAGE_SIZE)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # distinct features per image (a fresh init maps noise images to nearly one point)
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim >= 2 and "token" not in name and "pos" not in name:
                param.copy_(noise / param[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.2 * noise)
            else:
                param.copy_(0.5 * noise)
    save_backbone(model, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_weights(tmp_path_factory.mktemp("weights") / "backbone.safetensors")


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Eight random RGB images, 28x28 except the last (40x30, so it is resized and cropped)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(8):
        shape = (IMAGE_SIZE, IMAGE_SIZE, 3) if i < 7 else (30, 40, 3)
        path = folder / f"img{i}.png"
        path.write_bytes(png_bytes(rng.integers(0, 256, shape, dtype=np.uint8)))
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def finetuned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fine-tuning run's folder: a backbone and the classifier beside it (cls+avgpool, 4 classes)."""
    folder = tmp_path_factory.mktemp("finetuned")
    write_tiny_weights(folder / "backbone.safetensors", seed=3)
    torch.manual_seed(0)
    classifier = Classifier(load_backbone(str(folder / "backbone.safetensors"), "safetensors"), len(CLASSES),
                            "cls+avgpool")
    torch.nn.init.normal_(classifier.head.weight, std=1.0)  # distinct probabilities, not the near-zero init
    save_classifier(classifier, CLASSES, str(folder / "classifier.safetensors"), Storage(),
                    eval_transform="centre_crop")
    return folder


@pytest.fixture(scope="session")
def served_model(tiny_weights: Path) -> ServedModel:
    return load_served_model(str(tiny_weights))


@pytest.fixture(scope="session")
def index_uri(served_model: ServedModel, image_folder: list[Path], tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("index") / "idx")
    build_index(served_model, str(image_folder[0].parent), out, batch_size=3)
    return out


def start_server(app: object) -> tuple[uvicorn.Server, threading.Thread, str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def service(served_model: ServedModel, index_uri: str, image_folder: list[Path]) -> Iterator[Running]:
    settings = ServeSettings(max_body_bytes=200_000, max_images=8, max_pixels=200 * 200, max_batch_size=16,
                             max_wait_ms=20)
    app = create_app(served_model, load_index(index_uri, served_model), settings)
    server, thread, url = start_server(app)
    yield Running(url, served_model, image_folder)
    server.should_exit = True
    thread.join(timeout=10)
