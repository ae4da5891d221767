"""Shared pieces of the reliability suite: a pickle that runs code, tiny configs, in-memory data."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dinoflow.config import PretrainConfig, load_config
from trainer.data.datasets import Sample

# A pretraining recipe small enough for a few CPU steps a second
TINY_OVERRIDES = [
    "model.patch_size=4", "model.embed_dim=16", "model.depth=1", "model.num_heads=1", "model.drop_path_rate=0.0",
    "heads.num_prototypes=32", "heads.hidden_dim=16", "heads.bottleneck_dim=8", "heads.num_layers=2",
    "crops.load_size=16", "crops.global_crop_size=16", "crops.local_crop_size=8", "crops.num_local_crops=2",
    "crops.blur_kernel_size=3", "crops.highres_global_crop_size=16", "crops.highres_local_crop_size=8",
    "optim.batch_size=4", "optim.epoch_length=4", "optim.epochs=2", "optim.warmup_epochs=0",
    "data.max_bad_fraction=1.0",
]


def tiny_config(out: str, *overrides: str) -> PretrainConfig:
    return load_config(PretrainConfig, None, [*TINY_OVERRIDES, f"out={out}", *overrides])


class RandomImages(torch.utils.data.Dataset):
    """``length`` random uint8 images ``(3, size, size)``, seeded by index."""

    def __init__(self, length: int = 16, size: int = 16) -> None:
        self.length, self.size = length, size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Sample:
        rng = np.random.default_rng(index)
        image = torch.from_numpy(rng.integers(0, 256, (3, self.size, self.size), dtype=np.uint8))
        return Sample(image=image, label=index % 2, key=f"mem#{index}")


class CodePayload:
    """Unpickling this runs ``open(marker, 'w').write('pwned')``: the shape of a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def malicious_checkpoint(marker: Path, wrap: str | None = None) -> bytes:
    """A torch checkpoint whose state dict holds real tensors and one code payload."""
    state = {"cls_token": torch.zeros(1, 1, 8), "payload": CodePayload(marker)}
    buffer = io.BytesIO()
    torch.save({wrap: state} if wrap else state, buffer)
    return buffer.getvalue()


def png_bytes(width: int = 20, height: int = 20, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), color=0).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(width: int = 20, height: int = 20) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def assert_not_run(marker: Path) -> None:
    assert not os.path.exists(marker), "the checkpoint's pickled code ran"
