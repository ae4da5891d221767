"""Attention maps, their masks and high-norm tokens, checked against torch's own attention, a
brute-force search and by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from evaluators.attention import (
    attention_masks,
    attention_summary,
    cls_attention_maps,
    foreground_jaccard,
    garment_foreground,
    high_norm_tokens,
    jaccard,
    patch_norms,
)
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
    rest = model.self_attention(images)[:, :, 0, :1 + registers].sum(-1)
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
    gray = pixels[:, 0]  # no cyan anywhere but in the masks' outlines
    masks = np.zeros((4, 4, 4), dtype=bool)
    masks[:, 1:3, 1:3] = True
    plain, outlined = (np.asarray(Image.open(save_attention_maps(gray, summary["maps"].numpy(), high, tmp_path / name,
                                                                 masks=shown)).convert("RGB")).astype(int)
                       for name, shown in (("plain.png", None), ("outlined.png", masks)))

    def cyan(picture: np.ndarray) -> int:
        return int(((picture[..., 0] < 80) & (picture[..., 1] > 180) & (picture[..., 2] > 180)).sum())

    assert cyan(plain) == 0 and cyan(outlined) > 4 * 20  # four outlines of a 2 x 2 patch square


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


def _smallest_top_set(weights: np.ndarray, mass: float) -> set[int]:
    """Brute force: among the sets of each size, smallest first, the first whose mass reaches
    ``mass`` of the total; of equal sets the one of the largest weights (ties: lowest index)."""
    order = sorted(range(len(weights)), key=lambda i: (-weights[i], i))
    for size in range(1, len(weights) + 1):
        if weights[order[:size]].sum() >= mass * weights.sum() * (1 - 1e-9):
            return set(order[:size])
    raise AssertionError("unreachable: the whole map holds all of its mass")


@pytest.mark.parametrize("mass", [0.1, 0.6, 0.9])
def test_masks_keep_the_fewest_largest_weights_that_hold_the_mass(mass: float) -> None:
    rng = np.random.default_rng(5)
    maps = rng.random((3, 2, 4, 5)) ** 4  # peaked, as attention is
    maps[2, 1] = np.round(maps[2, 1], 1)  # ties
    masks = attention_masks(torch.from_numpy(maps), mass)
    assert masks.shape == maps.shape and masks.dtype == torch.bool
    for image in range(3):
        for head in range(2):
            weights = maps[image, head].ravel()
            assert set(np.flatnonzero(masks[image, head].numpy().ravel())) == _smallest_top_set(weights, mass)
    assert attention_masks(torch.from_numpy(7 * maps), mass).equal(masks)  # a share of each map: scale-free
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="mass must be in"):
            attention_masks(torch.from_numpy(maps), bad)


def test_jaccard_and_foreground_jaccard_against_sets() -> None:
    rng = np.random.default_rng(6)
    a, b = rng.random((2, 3, 6, 6)) > 0.5
    expected = [(x & y).sum() / (x | y).sum() for x, y in zip(a, b)]
    np.testing.assert_allclose(jaccard(torch.from_numpy(a), torch.from_numpy(b)).numpy(), expected, rtol=1e-6)
    empty = torch.zeros(1, 2, 2, dtype=torch.bool)
    assert jaccard(empty, empty).tolist() == [1.0]
    # 2 images, 3 heads, a 2 x 3 patch grid of 4-pixel patches: the object is patch (0, 1) and (1, 1)
    maps = torch.full((2, 3, 2, 3), 0.01)
    maps[:, 0, :, 1] = 3.0  # head 0 looks at the object
    maps[:, 1, 0, 0] = 1.0  # head 1 at one background patch
    foreground = torch.zeros(2, 8, 12, dtype=torch.bool)
    foreground[:, :, 4:8] = True
    scored = foreground_jaccard(maps, foreground)
    assert scored["best_head"] == 0 and scored["attention_jaccard_best_head"] == pytest.approx(1.0)
    # the heads' mean: 1.007 on each of the object's patches, 0.34 at (0, 0), 0.01 elsewhere: the
    # first object patch holds 42 % of the mass (under 60 %), both 84 %: the mask is the object
    assert scored["attention_jaccard"] == pytest.approx(1.0)
    torch.testing.assert_close(scored["per_image"], torch.ones(2))
    maps[1, :, 0, 0] = 5.0  # image 1: every head (and their mean) now mostly on patch (0, 0)
    scored = foreground_jaccard(maps, foreground)
    assert scored["attention_jaccard"] == pytest.approx(0.5) and scored["per_image"].tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="does not fit maps"):
        foreground_jaccard(maps, foreground[:, :, :10])
    garment = torch.tensor([[0, 10, 11, 255]], dtype=torch.uint8)
    assert garment_foreground(garment).tolist() == [[False, False, True, True]]


def test_summary_of_another_block_and_its_jaccard() -> None:
    torch.manual_seed(7)
    model = build_vit("vit_small", patch_size=7, embed_dim=16, depth=3, num_heads=2, img_size=28).eval()
    images = torch.randn(3, 3, 28, 28)
    foreground = torch.rand(3, 28, 28) > 0.5
    first = attention_summary(model, images, block=0, foreground=foreground, mass=0.5)
    torch.testing.assert_close(first["maps"], cls_attention_maps(model, images, block=0))
    assert not first["maps"].allclose(cls_attention_maps(model, images))  # not the last block's
    with torch.no_grad():  # the norms: of the tokens block 0 writes
        tokens = model.prepare_tokens(images)
        written = model.blocks[0](tokens.flatten(0, 1), [tuple(tokens.shape[:2])]).view(tokens.shape)
    torch.testing.assert_close(first["norms"], written[:, 1:].norm(dim=-1).view(3, 4, 4))
    torch.testing.assert_close(first["masks"], attention_masks(first["maps"].mean(1), 0.5))
    scored = foreground_jaccard(first["maps"], foreground, 0.5)
    assert first["metrics"]["attention_jaccard"] == pytest.approx(scored["attention_jaccard"])
    assert first["best_head"] == scored["best_head"]
    assert "attention_jaccard" not in attention_summary(model, images)["metrics"]  # no foreground, no score
