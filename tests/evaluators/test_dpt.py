"""The DPT depth head: its pyramid's sizes, every part trained, a batch it can fit, and the suite
running it on four evenly spaced blocks."""

from __future__ import annotations

import pytest
import torch

from evaluators.dense import HeadConfig, silog_loss
from evaluators.dpt import DPTDepthHead


@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
def test_the_head_maps_four_blocks_to_depths_within_its_bins(grid: tuple[int, int]) -> None:
    """Any patch grid, odd sides too (the 1/2x level rounds up and is resized back): depths of the
    asked size between the bins' ends; the levels come out at 4x, 2x, 1x and 1/2x the grid."""
    torch.manual_seed(0)
    head = DPTDepthHead(4 * 12, features=16, bins=8, max_depth=80.0).eval()
    patches, cls = torch.randn(2, 48, *grid), torch.randn(2, 48)
    sizes = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: sizes.append(tuple(out.shape[-2:])))
             for block in head.reassemble]
    depth = head(patches, cls, (30, 41))
    for hook in hooks:
        hook.remove()
    h, w = grid
    assert sizes == [(4 * h, 4 * w), (2 * h, 2 * w), (h, w), ((h + 1) // 2, (w + 1) // 2)]
    assert depth.shape == (2, 30, 41) and float(depth.min()) >= 1e-3 and float(depth.max()) <= 80.0
    with pytest.raises(ValueError, match="reads 4 blocks: in_channels 50 is not 4 x the width"):
        DPTDepthHead(50)


def test_every_part_trains_and_a_batch_is_fitted() -> None:
    """The SiLog loss of one batch falls by more than half in 60 AdamW steps, and every parameter
    (readouts, reassembly, fusion, head) gets a gradient: no part is left out of the path."""
    torch.manual_seed(1)
    head = DPTDepthHead(4 * 8, features=16, bins=16, max_depth=10.0)
    patches, cls = torch.randn(4, 32, 4, 4), torch.randn(4, 32)
    rows = torch.linspace(1.0, 9.0, 56)[None, :, None].expand(4, 56, 56)
    target = rows * (1 + 0.2 * patches[:, :1].mean(dim=(2, 3), keepdim=True)[:, 0])  # per image, per row
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = silog_loss(head(patches, cls, (56, 56)), target)
        optimizer.zero_grad()
        loss.backward()
        if not losses:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


def test_the_suite_runs_the_dpt_head_on_four_spaced_blocks() -> None:
    from dinoflow.storage import Storage
    from evaluators.suite import SuiteConfig, _dense_tasks, run_suite
    from trainer.models.vit import build_vit

    torch.manual_seed(0)
    backbone = build_vit("vit_small", patch_size=7, embed_dim=16, depth=8, num_heads=2, img_size=28,
                         layerscale_init=1.0).eval()
    config = SuiteConfig(tasks=("depth",), train_scenes=6, test_scenes=2, depth_head_kind="dpt",
                         depth_head=HeadConfig(steps=3))
    assert _dense_tasks(backbone, config, Storage())["depth"].train.layers == (1, 3, 5, 7)
    metrics = run_suite(backbone, config)["metrics"]
    assert metrics["depth_rmse"] > 0 and 0 <= metrics["depth_delta1"] <= 1
    with pytest.raises(ValueError, match="unknown depth head 'unet'; allowed: linear, dpt"):
        SuiteConfig(tasks=("depth",), depth_head_kind="unet")
