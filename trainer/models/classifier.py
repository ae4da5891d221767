"""A backbone with a linear classifier: what fine-tuning trains, writes and the registry serves.

The classifier reads the final CLS token (``cls``), or it and the mean patch token
(``cls+avgpool``, the original's best linear input). It is saved apart from the backbone, as
``classifier.safetensors`` with its class names, input and evaluation transform in the metadata,
so the fine-tuned backbone stays a plain backbone that every command reads.

The evaluation transform (:data:`EVAL_TRANSFORMS`) is how the fine-tuning run's evaluation
prepared the images it scored, recorded so that serving prepares uploads alike: ``whole``
(Fashion-MNIST's 28 px images resized whole to ``image_size``) or ``centre_crop`` (class folders'
images decoded at ``image_size / 0.875``, the centre ``image_size`` square kept). A file saved
before the record existed has none (:func:`saved_eval_transform` returns None).
"""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor, nn

from dinoflow.storage import Storage
from trainer.models.hub import load_strict, read_safetensors, safetensors_metadata
from trainer.models.vit import DinoVisionTransformer

HEAD_INPUTS = ("cls", "cls+avgpool")
WHOLE, CENTRE_CROP = "whole", "centre_crop"
EVAL_TRANSFORMS = (WHOLE, CENTRE_CROP)
EVAL_TRANSFORM_KEY = "eval_transform"  # the record's name in the file's metadata and a package's config.json


class Classifier(nn.Module):
    """A backbone and a linear layer on its final CLS token (and mean patch token)."""

    def __init__(self, backbone: DinoVisionTransformer, num_classes: int, head_input: str) -> None:
        super().__init__()
        if head_input not in HEAD_INPUTS:
            raise ValueError(f"head_input {head_input!r} is not one of {', '.join(HEAD_INPUTS)}")
        self.backbone, self.head_input = backbone, head_input
        self.head = nn.Linear(backbone.embed_dim * (2 if head_input == "cls+avgpool" else 1), num_classes)
        # near-zero logits at first (MAE's init): the backbone's features are not pushed around by a random head
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: Tensor) -> Tensor:
        out = self.backbone.forward_features(images)
        return self.logits(out["x_norm_clstoken"], out["x_norm_patchtokens"].mean(dim=1))

    def logits(self, cls: Tensor, patch_mean: Tensor) -> Tensor:
        """The class logits of the backbone's final CLS token ``(B, D)`` and mean patch token ``(B, D)``
        (read per ``head_input``): for a caller that has run the backbone already."""
        return self.head(cls if self.head_input == "cls" else torch.cat([cls, patch_mean], dim=-1))


def checked_eval_transform(value: str, where: str) -> str:
    """``value`` if it is one of :data:`EVAL_TRANSFORMS`; else a ValueError naming ``where`` it came from."""
    if value not in EVAL_TRANSFORMS:
        raise ValueError(f"{where}: {EVAL_TRANSFORM_KEY} {value!r} is not one of {', '.join(EVAL_TRANSFORMS)}")
    return value


def save_classifier(model: Classifier, classes: tuple[str, ...], uri: str, storage: Storage, *,
                    eval_transform: str) -> None:
    """The linear layer as safetensors, its class names, input and ``eval_transform`` (how the
    evaluation that scored it prepared images: :data:`EVAL_TRANSFORMS`) in the metadata (atomic)."""
    tensors = {f"head.{name}": value.detach().cpu().contiguous() for name, value in model.head.state_dict().items()}
    metadata = {"classes": json.dumps(list(classes)), "head_input": model.head_input,
                EVAL_TRANSFORM_KEY: checked_eval_transform(eval_transform, uri)}
    storage.write_bytes(uri, save_safetensors_bytes(tensors, metadata=metadata))


def read_classifier(uri: str, storage: Storage) -> tuple[dict[str, Tensor], tuple[str, ...], str]:
    """A :func:`save_classifier` file: its tensors, class names and input."""
    data = storage.read_bytes(uri)
    metadata = safetensors_metadata(data, uri)
    if "classes" not in metadata:
        raise ValueError(f"{uri} is not a fine-tuned classifier (no class names in its metadata)")
    return read_safetensors(data, uri), tuple(json.loads(metadata["classes"])), metadata.get("head_input", "cls")


def load_classifier(backbone: DinoVisionTransformer, uri: str, storage: Storage) -> tuple[Classifier, tuple[str, ...]]:
    """``backbone`` with the classifier saved at ``uri`` (eval mode), and its class names."""
    tensors, classes, head_input = read_classifier(uri, storage)
    model = Classifier(backbone, len(classes), head_input)
    load_strict(model.head, {name.removeprefix("head."): value for name, value in tensors.items()})
    return model.eval(), classes


def saved_eval_transform(uri: str, storage: Storage) -> str | None:
    """The evaluation transform a :func:`save_classifier` file records (checked), or None for a
    file saved before the record existed (the caller infers it: :func:`serve.model.load_served_model`)."""
    value = safetensors_metadata(storage.read_bytes(uri), uri).get(EVAL_TRANSFORM_KEY)
    return None if value is None else checked_eval_transform(value, uri)


def class_probabilities(model: Classifier, images: np.ndarray | Tensor, patch_size: int,
                        batch_size: int = 256) -> np.ndarray:
    """Softmax class probabilities ``(N, C)`` float32 of uint8 images ``(N, H, W)`` or
    ``(N, 3, H, W)`` (sides multiples of the patch), prepared as the evaluation prepares them."""
    from evaluators.features import to_model_input

    pixels = torch.as_tensor(np.asarray(images))
    device = next(model.parameters()).device
    rows = []
    with torch.no_grad():
        for start in range(0, len(pixels), batch_size):
            inputs = to_model_input(pixels[start:start + batch_size], patch_size=patch_size).to(device)
            rows.append(model(inputs).float().softmax(dim=-1).cpu())
    return torch.cat(rows).numpy() if rows else np.zeros((0, model.head.out_features), dtype=np.float32)
