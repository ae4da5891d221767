"""The DPT depth head: its pyramid's sizes and widths, its regressed depth, every part trained, a
batch it can fit, and the suite running it on four spaced blocks."""

from __future__ import annotations

import pytest
import torch

from evaluators.dense import HeadConfig, silog_loss
from evaluators.dpt import DPTDepthHead


@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
def test_the_head_maps_four_blocks_to_depths_of_at_least_min_depth(grid: tuple[int, int]) -> None:
    """Any patch grid, odd sides too (the 1/2x level rounds up and is resized back): depths of the
    asked size, none below ``min_depth``; the levels come out at 4x, 2x, 1x and 1/2x the grid."""
    torch.manual_seed(0)
    head = DPTDepthHead(4 * 16, features=16, min_depth=0.5).eval()
    patches, cls = torch.randn(2, 64, *grid), torch.randn(2, 64)
    sizes = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: sizes.append(tuple(out.shape[-2:])))
             for block in head.reassemble]
    with torch.no_grad():
        depth = head(patches, cls, (30, 41))
    for hook in hooks:
        hook.remove()
    h, w = grid
    assert sizes == [(4 * h, 4 * w), (2 * h, 2 * w), (h, w), ((h + 1) // 2, (w + 1) // 2)]
    assert depth.shape == (2, 30, 41) and float(depth.min()) >= 0.5
    with pytest.raises(ValueError, match="reads 4 blocks: in_channels 50 is not 4 x the width"):
        DPTDepthHead(50)
    with pytest.raises(ValueError, match="a width of 4 leaves none"):
        DPTDepthHead(16)


def test_the_reassemble_widths_are_the_originals_and_the_depth_is_regressed() -> None:
    """The original's ``post_process_channels`` (D/8, D/4, D/2, D of the backbone's width D) into
    256 fusion channels by default; one output channel, ``relu(x) + min_depth`` (the original's DPT
    head has no bins): where the last conv's output is negative the depth is ``min_depth``. A new
    head, whatever its seed, starts with every pixel above ``min_depth``: its ReLU passes gradients."""
    for seed in range(6):  # PyTorch's default init alone left about half of these dead everywhere
        torch.manual_seed(seed)
        with torch.no_grad():
            fresh = DPTDepthHead(4 * 16, features=16)(torch.randn(2, 64, 4, 4), torch.randn(2, 64), (8, 8))
        assert float(fresh.min()) > 0.5
    head = DPTDepthHead(4 * 384)
    assert [level[0].out_channels for level in head.reassemble] == [48, 96, 192, 384]
    assert [level[2].out_channels for level in head.reassemble] == [256] * 4
    assert head.project[0].kernel_size == (3, 3) and isinstance(head.project[1], torch.nn.ReLU)  # the fused map's
    assert not hasattr(head, "centres")
    small = DPTDepthHead(4 * 16, features=16, min_depth=0.25).eval()
    last = small.head[-1]
    assert last.out_channels == 1
    patches, cls = torch.randn(1, 64, 3, 3), torch.randn(1, 64)
    with torch.no_grad():
        last.weight.zero_()
        for bias, want in ((-1.0, 0.25), (2.0, 2.25)):
            last.bias.fill_(bias)
            torch.testing.assert_close(small(patches, cls, (9, 9)), torch.full((1, 9, 9), want))


def test_every_part_trains_and_a_batch_is_fitted() -> None:
    """The SiLog loss of one batch falls by more than half in 60 AdamW steps, and every parameter
    (readouts, reassembly, fusion, head) gets a gradient: no part is left out of the path."""
    torch.manual_seed(1)
    head = DPTDepthHead(4 * 8, features=16)
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
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_the_suite_runs_the_dpt_head_on_four_spaced_blocks_without_the_final_norm() -> None:
    from dinoflow.storage import Storage
    from evaluators.suite import SuiteConfig, _dense_tasks, run_suite
    from trainer.models.vit import build_vit

    torch.manual_seed(0)
    backbone = build_vit("vit_small", patch_size=7, embed_dim=16, depth=8, num_heads=2, img_size=28,
                         layerscale_init=1.0).eval()
    config = SuiteConfig(tasks=("depth",), train_scenes=6, test_scenes=2, depth_head_kind="dpt",
                         depth_head=HeadConfig(steps=3))
    depth = _dense_tasks(backbone, config, Storage())["depth"].train
    assert depth.layers == (1, 3, 5, 7) and not depth.norm
    metrics = run_suite(backbone, config)["metrics"]
    assert metrics["depth_rmse"] > 0 and 0 <= metrics["depth_delta1"] <= 1
    with pytest.raises(ValueError, match="unknown depth head 'unet'; allowed: linear, dpt"):
        SuiteConfig(tasks=("depth",), depth_head_kind="unet")
