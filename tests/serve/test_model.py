"""What `dinoflow serve` and `dinoflow index build` load as a model."""

from __future__ import annotations

from pathlib import Path

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
