"""Stage ``pretrain``: an ``init_weights`` override reaches the trainer (the released weights a
user names in the Kubeflow UI's ``overrides``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from components.pretrain import pretrain_config, run_pretrain_stage
from components.stage import StageContext
from dinoflow.storage import Storage
from trainer.engine import build_networks
from trainer.models.hub import init_backbone, load_backbone
from trainer.models.vit import build_vit

DATA = "/usr/share/datasets/fashion-mnist"
SMALL = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "heads.num_prototypes=64",
         "heads.hidden_dim=64", "heads.bottleneck_dim=16", "optim.batch_size=8", "crops.num_local_crops=2",
         "max_steps=1", "eval.every_steps=0"]

pytestmark = pytest.mark.skipif(not Path(DATA).is_dir(), reason="Fashion-MNIST is not installed")


def test_an_init_weights_override_starts_the_stage_from_them(tmp_path: Path) -> None:
    torch.manual_seed(0)
    released = build_vit("vit_small", embed_dim=32, depth=2, num_heads=2, patch_size=7, img_size=70)  # 10 x 10
    with torch.no_grad():
        for parameter in released.parameters():
            parameter.copy_(0.1 * torch.randn_like(parameter))
    weights = tmp_path / "released.pth"
    torch.save(released.state_dict(), weights)
    overrides = [*SMALL, f"init_weights={weights}"]
    result = run_pretrain_stage(StageContext(run_root=str(tmp_path / "root")), tmp_path / "out", "tiny", overrides,
                                "fashion_mnist", DATA, 0.0, 0)
    assert result["steps"] == 1 and not result["cached"]
    cfg = pretrain_config("tiny", overrides, "fashion_mnist", DATA, 0.0, 0)
    start = build_networks(cfg)[0].backbone
    init_backbone(start, str(weights), "official", Storage())
    random_init = build_networks(cfg)[1].backbone
    trained = load_backbone(str(tmp_path / "out" / "backbone.safetensors"), "safetensors")
    moved = max((v - start.state_dict()[k]).abs().max().item() for k, v in trained.state_dict().items())
    apart = max((v - random_init.state_dict()[k]).abs().max().item() for k, v in trained.state_dict().items())
    assert moved < 0.01 * apart, (moved, apart)  # one EMA step from the released weights
