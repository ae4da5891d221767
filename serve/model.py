"""A served backbone: loaded from an MLflow model URI or a weight file, and its features.

Why one decode path: the service, the index builder and the training data loaders must turn the
same bytes into the same pixels, so images are decoded exactly as
:func:`trainer.data.datasets.decode_image` does it (RGB, shorter side resized bicubic, centre
crop to ``image_size``), and the features are the library's: the CLS feature is
:func:`evaluators.features.extract_features` (``layers=1``) on :func:`to_model_input` of those
pixels. Unlike ``decode_image``, a bad image raises :class:`ImageError` with the reason, because
the reason goes back to the client.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import UnidentifiedImageError
from torch import Tensor

from dinoflow.storage import Storage
from evaluators.features import to_model_input
from trainer.data.datasets import (
    DECODE_ERRORS,
    DECODE_FORMATS,
    TooManyPixels,
    read_image,
)

FEATURE_KINDS = ("cls", "pooled", "patch")


class ImageError(ValueError):
    """An upload that is not a decodable image within the limits; the message says why."""


@dataclass
class ServedModel:
    """A backbone in eval mode with the facts the service needs.

    Attributes:
        backbone: a :class:`~trainer.models.vit.DinoVisionTransformer` (eval mode, CPU or GPU).
        patch_size: its patch side.
        image_size: the square side images are resized and cropped to (a multiple of patch_size).
        name: where it came from (URI), shown by ``/healthz``.
    """

    backbone: Any
    patch_size: int
    image_size: int
    name: str

    @property
    def embed_dim(self) -> int:
        return int(self.backbone.embed_dim)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def embed(self, pixels: Tensor) -> dict[str, Tensor]:
        """Features of uint8 images ``(B, 3, S, S)``: ``cls`` ``(B, D)``, ``pooled`` ``(B, D)`` (mean of the
        normalised patch tokens, registers excluded) and ``patch`` ``(B, h*w, D)``, float32 on the CPU.

        ``cls`` equals ``extract_features(backbone, to_model_input(pixels), layers=1)``; ``pooled`` is the
        ``with_patch_mean`` part of the same function.
        """
        device = next(self.backbone.parameters()).device
        inputs = to_model_input(pixels, patch_size=self.patch_size).to(device)  # (B, 3, S, S) float
        with torch.inference_mode():
            blocks = self.backbone.get_intermediate_layers(inputs, n=1, return_class_token=True)
        patch, cls = blocks[-1]  # (B, h*w, D), (B, D): the last block through the final norm
        return {"cls": cls.float().cpu(), "pooled": patch.mean(dim=1).float().cpu(), "patch": patch.float().cpu()}


def decode_upload(data: bytes, image_size: int, max_pixels: int) -> Tensor:
    """Encoded image bytes -> uint8 ``(3, image_size, image_size)``; :class:`ImageError` says why not."""
    if not data:
        raise ImageError("empty file: expected a JPEG, PNG, WebP, GIF or BMP image")
    try:
        return read_image(data, image_size, max_pixels)
    except TooManyPixels as err:
        raise ImageError(f"image is {err.width}x{err.height} = {err.width * err.height} pixels; "
                         f"the limit is {err.max_pixels}") from None
    except UnidentifiedImageError:
        raise ImageError(f"not an image ({len(data)} bytes): allowed formats are {', '.join(DECODE_FORMATS)}") from None
    except DECODE_ERRORS as err:
        raise ImageError(f"broken image ({type(err).__name__}: {err})") from None


def load_served_model(uri: str, image_size: int | None = None, device: str = "cpu",
                      storage: Storage | None = None) -> ServedModel:
    """Load ``models:/<name>@<alias>``, ``runs:/...``, an MLflow model folder, or a backbone
    ``.safetensors`` file (path or URI).

    MLflow models are loaded through ``mlflow.pyfunc.load_model`` (the tracking/registry URI comes
    from the environment, as MLflow reads it) and unwrapped to dinoflow's
    :class:`~trainer.models.packaging.BackbonePyfunc`. ``image_size`` defaults to the package's
    ``config.json`` ``image_size``, else the backbone's own ``img_size``. ``storage`` reads weight
    files (S3 settings); MLflow reads its artifacts itself.
    """
    from trainer.models.hub import load_backbone

    config: dict[str, Any] = {}
    if uri.endswith(".safetensors"):
        backbone = load_backbone(uri, "safetensors", storage)
        patch_size = backbone.patch_size
    elif uri.startswith(("models:/", "runs:/")) or (Path(uri) / "MLmodel").is_file():
        import mlflow.pyfunc

        package = mlflow.pyfunc.load_model(uri)
        wrapped = package.unwrap_python_model()
        if not hasattr(wrapped, "backbone"):
            raise ValueError(f"{uri}: not a dinoflow backbone package (found {type(wrapped).__name__})")
        backbone, patch_size = wrapped.backbone, wrapped.patch_size
        # the package's config.json (image_size); MLflow keeps the load context on its wrapper
        context = getattr(getattr(package, "_model_impl", None), "context", None)
        config_file = getattr(context, "artifacts", {}).get("config")
        if config_file and Path(config_file).is_file():
            config = json.loads(Path(config_file).read_text())
    else:
        raise ValueError(f"{uri}: expected models:/<name>@<alias>, runs:/<id>/<path>, an MLflow model folder "
                         "or a .safetensors backbone file")
    size = image_size or int(config.get("image_size") or backbone.arch_kwargs["img_size"])
    if size <= 0 or size % patch_size:
        raise ValueError(f"image_size {size} is not a positive multiple of the patch size {patch_size}")
    return ServedModel(backbone=backbone.to(device).eval(), patch_size=int(patch_size), image_size=size, name=uri)
