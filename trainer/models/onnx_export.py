"""ONNX export of a backbone's features at one fixed input size.

Why a fixed size: the position table is resized to the input's patch grid, and at a fixed size
that resize is a function of the weights alone, so the graph holds no shape logic and any ONNX
runtime computes exactly our features. Export another file for another size.

Why the dynamo exporter (``torch.onnx.export(dynamo=True)``, through onnxscript): torch's legacy
TorchScript exporter cannot translate the position resize, neither the bicubic resize with
antialiasing of register models nor the scale-factor resize of the others.

Outputs, named for serving: ``cls_token`` ``(B, D)``, ``patch_tokens`` ``(B, N, D)`` (row-major
patch grid), and ``register_tokens`` ``(B, R, D)`` for models with registers; the input is
``images`` ``(B, C, H, W)``, normalised as for our model.
"""

from __future__ import annotations

import os
import shutil
import uuid
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from trainer.models.vit import DinoVisionTransformer

OPSET = 18  # the first with Resize(antialias=...)


class FeatureOutputs(nn.Module):
    """The backbone's normalised tokens as a tuple, the form ONNX outputs take."""

    def __init__(self, backbone: DinoVisionTransformer) -> None:
        super().__init__()
        self.backbone = backbone

    @property
    def output_names(self) -> tuple[str, ...]:
        names = ("cls_token", "patch_tokens")
        return names + ("register_tokens",) if self.backbone.num_register_tokens else names

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        features = self.backbone.forward_features(images)
        outputs = (features["x_norm_clstoken"], features["x_norm_patchtokens"])
        return outputs + (features["x_norm_regtokens"],) if self.backbone.num_register_tokens else outputs


def export_onnx(
    model: DinoVisionTransformer, path: str | os.PathLike, height: int, width: int, batch_size: int = 1
) -> Path:
    """Write the model's features for ``(batch_size, C, height, width)`` inputs to ``path``.

    The graph is traced in eval mode (the modules' modes are restored afterwards). The file is
    written beside ``path`` and then renamed onto it; a model over 2 GB keeps its weights in
    ``<file name>.data`` next to it, moved before the graph.
    """
    patch = model.patch_size
    if height <= 0 or width <= 0 or height % patch or width % patch:
        raise ValueError(f"ONNX input size {height}x{width} must be positive multiples of the patch size {patch}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    path = Path(path)
    weight = model.patch_embed.proj.weight
    images = torch.zeros(batch_size, weight.shape[1], height, width, dtype=weight.dtype, device=weight.device)
    modes = {module: module.training for module in model.modules()}
    wrapper = FeatureOutputs(model).eval()
    try:
        with warnings.catch_warnings():
            # torch's exporter copies its own pytree specs through a path torch deprecates: a warning
            # about torch's code, not the model's, that a user exporting can do nothing about
            warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)", FutureWarning)
            program = torch.onnx.export(
                wrapper, (images,), dynamo=True, opset_version=OPSET, input_names=["images"],
                output_names=list(wrapper.output_names), verbose=False,
            )
    finally:
        for module, training in modes.items():
            module.training = training
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        program.save(staging / path.name)  # external data only above 2 GB, as <file name>.data
        for file in sorted(staging.iterdir(), key=lambda f: f.name == path.name):  # the graph last
            os.replace(file, path.parent / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
