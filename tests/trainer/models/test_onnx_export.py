"""ONNX export: onnxruntime computes our features at the exported size."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from trainer.models.onnx_export import export_onnx
from trainer.models.vit import DinoVisionTransformer, build_vit

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

TOLERANCE = 1e-4


def tiny(registers: int) -> DinoVisionTransformer:
    """Every tensor random (LayerScale, biases, tokens too), so a dropped one shows."""
    model = build_vit("vit_small", num_register_tokens=registers, embed_dim=64, depth=2, num_heads=4, img_size=56)
    generator = torch.Generator().manual_seed(registers)
    with torch.no_grad():
        for param in model.parameters():
            scale = param[0].numel() ** -0.5 if param.ndim >= 2 and param.shape[0] > 1 else 0.5
            param.copy_(scale * torch.randn(param.shape, generator=generator))
    return model.eval()


# 42x70 differs from the 56 px table, so the export also carries a resized position table
@pytest.mark.parametrize("registers", [0, 4])
def test_onnxruntime_computes_our_features(tmp_path: Path, registers: int) -> None:
    model = tiny(registers)
    model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = export_onnx(model, tmp_path / "nested" / "model.onnx", height=42, width=70, batch_size=2)
    # torch 2.13's exporter deprecates its own pytree path: not a warning for `dinoflow export`'s user
    assert not [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert model.training  # the mode is restored
    model.eval()
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]  # one file, no staging left
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    names = [o.name for o in session.get_outputs()]
    assert names == ["cls_token", "patch_tokens"] + (["register_tokens"] if registers else [])

    images = torch.randn(2, 3, 42, 70, generator=torch.Generator().manual_seed(1))
    outputs = dict(zip(names, session.run(None, {"images": images.numpy()})))
    with torch.inference_mode():
        features = model.forward_features(images)
    assert outputs["patch_tokens"].shape == (2, 15, 64)
    expected = {"cls_token": features["x_norm_clstoken"], "patch_tokens": features["x_norm_patchtokens"]}
    if registers:
        expected["register_tokens"] = features["x_norm_regtokens"]
    for name, tensor in expected.items():
        torch.testing.assert_close(torch.from_numpy(outputs[name]), tensor, atol=TOLERANCE, rtol=0, msg=name)


@pytest.mark.parametrize(("height", "width"), [(50, 56), (56, 0)])
def test_sizes_off_the_patch_grid_are_refused(tmp_path: Path, height: int, width: int) -> None:
    with pytest.raises(ValueError, match="multiples of the patch size 14"):
        export_onnx(tiny(0), tmp_path / "model.onnx", height=height, width=width)
    assert not list(tmp_path.iterdir())
