"""Attention maps and high-norm tokens, checked against torch's own attention and by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from evaluators.attention import attention_summary, cls_attention_maps, high_norm_tokens, patch_norms
from evaluators.visualize import save_attention_maps
from trainer.models.layers import Attention
from trainer.models.vit import build_vit


def test_weights_are_those_torchs_multihead_attention_returns_and_give_forwards_output() -> None:
    torch.manual_seed(0)
    dim, heads = 24, 3
    attention = Attention(dim, heads)
    tokens = torch.randn(2, 9, dim)
    weights = attention.weights(tokens)  # (2, 3, 9, 9)
    reference = nn.MultiheadAttention(dim, heads, batch_first=True)
    with torch.no_grad():
        reference.in_proj_weight.copy_(attention.qkv.weight)
        reference.in_proj_bias.copy_(attention.qkv.bias)
        reference.out_proj.weight.copy_(attention.proj.weight)
        reference.out_proj.bias.copy_(attention.proj.bias)
    output, expected = reference(tokens, tokens, tokens, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(weights, expected)
    # the same weights applied to the values give the fused forward's output
    _, _, v = attention.qkv(tokens).view(2, 9, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    by_hand = F.linear((weights @ v).transpose(1, 2).reshape(2, 9, dim), attention.proj.weight, attention.proj.bias)
    packed = attention(tokens.reshape(18, dim), [(2, 9)]).view(2, 9, dim)
    torch.testing.assert_close(by_hand, packed, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output, packed, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("registers", [0, 4])
def test_cls_maps_are_the_last_blocks_cls_row_over_the_patches(registers: int) -> None:
    torch.manual_seed(1)
    model = build_vit("vit_small", patch_size=7, embed_dim=32, depth=3, num_heads=4, img_size=28,
                      num_register_tokens=registers, layerscale_init=1.0).eval()
    images = torch.randn(2, 3, 21, 35)  # a 3 x 5 patch grid
    maps = cls_attention_maps(model, images)
    assert maps.shape == (2, 4, 3, 5)
    # by hand: the tokens entering the last block, its first norm, softmax(q k^T / sqrt(d))
    last = model.blocks[-1]
    with torch.no_grad():
        full = model.prepare_tokens(images)
        for block in model.blocks[:-1]:
            full = block(full.flatten(0, 1), [tuple(full.shape[:2])]).view(full.shape)
        q, k, _ = last.attn.qkv(last.norm1(full)).view(2, full.shape[1], 3, 4, 8).permute(2, 0, 3, 1, 4)
        expected = (q @ k.transpose(-2, -1) / 8**0.5).softmax(-1)[:, :, 0, 1 + registers:]
    torch.testing.assert_close(maps, expected.reshape(2, 4, 3, 5))
    # the CLS row is a distribution over every token; what the patches do not get goes to CLS and registers
    rest = model.last_self_attention(images)[:, :, 0, :1 + registers].sum(-1)
    torch.testing.assert_close(maps.sum((-2, -1)) + rest, torch.ones(2, 4))


def test_patch_norms_and_high_norm_tokens() -> None:
    torch.manual_seed(2)
    model = build_vit("vit_small", patch_size=7, embed_dim=16, depth=2, num_heads=2, img_size=28,
                      num_register_tokens=4).eval()
    images = torch.randn(3, 3, 28, 28)
    norms = patch_norms(model, images)
    prenorm = model.forward_features(images)["x_prenorm"][:, 5:]
    torch.testing.assert_close(norms, prenorm.norm(dim=-1).view(3, 4, 4).detach())
    image = torch.tensor([[1.0, 1.1, 0.9, 1.0], [1.2, 3.3, 0.8, 9.0]])  # (h, w): median 1.0
    flagged = [[False] * 4, [False, True, False, True]]
    assert high_norm_tokens(image).tolist() == flagged
    assert high_norm_tokens(torch.stack([image, 10 * image])).tolist() == [flagged, flagged]  # each its own median
    assert high_norm_tokens(image, factor=5.0).sum() == 1
    with pytest.raises(ValueError, match="factor must be > 1"):
        high_norm_tokens(image, factor=1.0)


def test_summary_figures_and_picture(tmp_path) -> None:
    torch.manual_seed(3)
    model = build_vit("vit_small", patch_size=7, embed_dim=16, depth=2, num_heads=2, img_size=28).eval()
    images = torch.randn(4, 3, 28, 28)
    summary = attention_summary(model, images)
    torch.testing.assert_close(summary["maps"], cls_attention_maps(model, images))  # one pass gives what two do
    torch.testing.assert_close(summary["norms"], patch_norms(model, images))
    metrics = summary["metrics"]
    assert metrics["high_norm_token_share"] == pytest.approx(summary["high_norm"].float().mean().item())
    assert 0 < metrics["cls_attention_on_patches"] < 1  # the CLS token keeps some attention on itself
    torch.testing.assert_close(summary["on_patches"], summary["maps"].sum((-2, -1)).mean(1))
    high = summary["high_norm"].numpy().copy()
    high[0, 1, 2] = True
    pixels = np.random.default_rng(0).integers(0, 255, (4, 3, 28, 28), dtype=np.uint8)
    path = save_attention_maps(pixels, summary["maps"].numpy(), high, tmp_path / "attention.png")
    heads = save_attention_maps(pixels, summary["maps"].numpy(), high, tmp_path / "heads.png", per_head=True)
    height, taller = Image.open(path).size[1], Image.open(heads).size[1]
    assert taller / height == pytest.approx((2 + 2) / 3, rel=0.02)  # 2 heads: a row each instead of their mean


def test_attention_colours_stretch_each_maps_head_mean() -> None:
    import matplotlib

    from evaluators.visualize import attention_rgb

    rng = np.random.default_rng(4)
    maps = rng.random((2, 3, 4, 5))
    colours = attention_rgb(maps)
    assert colours.shape == (2, 4, 5, 3)
    inferno = matplotlib.colormaps["inferno"]
    for image, mean in zip(colours, maps.mean(axis=1)):
        np.testing.assert_allclose(image[np.unravel_index(mean.argmin(), mean.shape)], inferno(0.0)[:3])
        np.testing.assert_allclose(image[np.unravel_index(mean.argmax(), mean.shape)], inferno(1.0)[:3])
    np.testing.assert_allclose(attention_rgb(0.01 * maps + 0.2), colours)  # a flat-ish map shows the same
