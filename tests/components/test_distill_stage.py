"""The distill stage takes its teacher artifact in every layout the pipeline imports (``teacher_uri``):
a folder holding ``backbone.safetensors`` (a pretrain stage's, the registry's), a single
``.safetensors`` file or Meta's released ``.pth``; its cache key hashes the artifact's bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from components.distill import run_distill_stage
from components.stage import StageContext
from trainer.models.hub import save_backbone
from trainer.models.vit import build_vit

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
STUDENT = ["model.embed_dim=16", "model.depth=1", "model.num_heads=2", "optim.batch_size=8",
           "crops.num_local_crops=2", "max_steps=1", "checkpoint_every=1", "eval.every_steps=0"]

pytestmark = pytest.mark.skipif(not Path(FASHION_MNIST).is_dir(), reason="Fashion-MNIST is not installed")


def write_teacher(path: Path, seed: int) -> None:
    """A tiny backbone (tiny's 28-pixel crops, patch 7) at ``path``: a .safetensors, or a .pth of
    the official layout (a state dict, as Meta releases them)."""
    torch.manual_seed(seed)
    backbone = build_vit("vit_small", patch_size=7, embed_dim=32, depth=1, num_heads=2, img_size=28)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".pth":
        torch.save(backbone.state_dict(), path)
    else:
        save_backbone(backbone, str(path))


@pytest.mark.parametrize("layout", ["folder/backbone.safetensors", "teacher.safetensors", "released.pth"])
def test_the_teacher_is_read_in_each_layout_and_keyed_by_its_bytes(tmp_path: Path, layout: str) -> None:
    weights = tmp_path / "teacher" / layout
    write_teacher(weights, seed=0)
    teacher = weights.parent if layout.startswith("folder/") else weights  # what the stage is handed
    ctx = StageContext(str(tmp_path / "root"))

    def distil(out: str) -> dict:
        return run_distill_stage(ctx, tmp_path / out, teacher, "distill-tiny", STUDENT, "fashion_mnist",
                                 FASHION_MNIST, max_minutes=1.0, seed=0)

    first = distil("first")
    assert first["steps"] == 1 and not first["cached"]
    assert (tmp_path / "first" / "backbone.safetensors").is_file()
    assert distil("again")["cached"]  # the same teacher: reused
    write_teacher(weights, seed=1)
    assert not distil("other")["cached"]  # other weights at the same path: distilled again
