"""What `dinoflow serve` and `dinoflow index build` load as a model, and the pixels it is given."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from serve.model import load_served_model
from trainer.models.hf import export_hf
from trainer.models.hub import save_backbone
from trainer.models.vit import build_vit


def test_backbone_weights_are_served_in_every_layout(tmp_path: Path) -> None:
    """Meta's released .pth, a run folder and a Hugging Face folder serve the backbone a .safetensors
    file does (only .safetensors and MLflow models were taken)."""
    torch.manual_seed(0)  # one head of 64 channels, as a .pth implies
    model = build_vit("vit_small", patch_size=7, embed_dim=64, depth=2, num_heads=1, img_size=28,
                      layerscale_init=1.0).eval()
    torch.save(model.state_dict(), tmp_path / "released.pth")
    (tmp_path / "run").mkdir()
    save_backbone(model, str(tmp_path / "run" / "backbone.safetensors"))
    export_hf(model, tmp_path / "hf")
    images = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        expected = model(images)
        for name in ("released.pth", "run", "run/backbone.safetensors", "hf"):
            served = load_served_model(str(tmp_path / name))
            assert (served.image_size, served.patch_size) == (28, 7), name
            torch.testing.assert_close(served.backbone(images), expected, rtol=0, atol=1e-5, msg=name)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_served_model(str(tmp_path / "missing.pth"))


def test_uploads_are_prepared_as_the_evaluations_score_images(tmp_path: Path) -> None:
    """The service's input is the k-NN, linear and fine-tuned classifiers' evaluation input (the
    shorter side at 28 / 0.875 = 32, the centre 28 square), not the image's centre square at 28:
    a served classifier sees what its scores were measured on."""
    from PIL import Image

    from dinoflow.storage import Storage
    from evaluators.classification import labelled_images
    from evaluators.features import to_model_input
    from serve.model import decode_upload

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name, shape in (("cat", (40, 30, 3)), ("dog", (28, 50, 3)), ("eel", (64, 64, 3))):
            (tmp_path / split / name).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(tmp_path / split / name / "a.png")
    images = labelled_images(str(tmp_path), "auto", Storage(), image_size=28)
    ((scored, labels),) = list(images.test_batches(torch.device("cpu"), patch_size=7))
    files = [images.test.dataset.keys[i] for i in images.test.indices]
    served = torch.stack([decode_upload(Path(file).read_bytes(), 28, 10**6) for file in files])
    assert labels.tolist() == [0, 1, 2] and served.shape == (3, 3, 28, 28)
    torch.testing.assert_close(to_model_input(served, patch_size=7), scored, rtol=0, atol=0)
