"""Where a backbone looks, and its high-norm tokens: CLS attention maps and patch-token norms.

Why: the last block's attention of the CLS token over the patches outlines objects without any
label, the picture users of DINO models ask for (facebookresearch/dinov2 #90, #285). And ViTs
trained without registers write global information into a few low-information patches, whose
output tokens then have several times the norm of the others and make spikes in the attention
maps (Darcet et al., "Vision Transformers Need Registers"; dinov2 #293, #475): the share of such
tokens says whether a backbone has these artefacts, and registers should bring it down.

A patch token is *high-norm* when its norm at the last block's output (before the final norm)
exceeds ``factor`` times the median patch-token norm of its image: a relative rule, so that it
holds at any width and depth (the paper's absolute threshold was read off one model's
histogram), and per image, so that an image's verdicts do not depend on the others looked at
with it (a service batches requests together).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

HIGH_NORM_FACTOR = 3.0  # a patch token above 3x the median norm counts as high-norm (module docstring)


def _grid(backbone: Any, images: Tensor) -> tuple[int, int, int]:
    """(first patch token's index, patch rows, patch columns) of ``images`` ``(B, 3, H, W)``."""
    rows, cols = (side // backbone.patch_size for side in images.shape[-2:])
    return 1 + backbone.num_register_tokens, rows, cols


def _cls_rows(attention: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """The CLS token's row over the patches of attention ``(B, heads, T, T)``: ``(B, heads, h, w)``."""
    first, rows, cols = grid
    return attention[:, :, 0, first:].reshape(*attention.shape[:2], rows, cols)


def _patch_norms_of(output: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """The patch tokens' L2 norms of the last block's output ``(B, T, D)``: ``(B, h, w)``."""
    first, rows, cols = grid
    return output[:, first:].float().norm(dim=-1).reshape(len(output), rows, cols)


@torch.no_grad()
def cls_attention_maps(backbone: Any, images: Tensor) -> Tensor:
    """The last block's attention of the CLS token over the patches, per head: ``(B, heads, h, w)``.

    The weights are those of the softmax over all tokens (CLS and registers included), not
    renormalised over the patches, so a map's sum is the share of the CLS token's attention that
    goes to the image's patches."""
    return _cls_rows(backbone.last_self_attention(images), _grid(backbone, images))


@torch.no_grad()
def patch_norms(backbone: Any, images: Tensor) -> Tensor:
    """The L2 norm of each patch token at the last block's output (before the final norm): ``(B, h, w)``."""
    return _patch_norms_of(backbone.forward_features(images)["x_prenorm"], _grid(backbone, images))


def high_norm_tokens(norms: Tensor, factor: float = HIGH_NORM_FACTOR) -> Tensor:
    """Which patch tokens of ``norms`` ``(..., h, w)`` (:func:`patch_norms`) are high-norm: above
    ``factor`` times the median of their image's ``h x w`` (module docstring); same shape, bool."""
    if not factor > 1:
        raise ValueError(f"factor must be > 1 (a multiple of the median norm), got {factor}")
    medians = norms.flatten(-2).median(dim=-1).values  # (...,)
    return norms > factor * medians[..., None, None]


def attention_summary(backbone: Any, images: Tensor, factor: float = HIGH_NORM_FACTOR) -> dict[str, Any]:
    """Maps and figures of ``backbone`` (eval mode, on any device) on model inputs ``images``
    ``(B, 3, H, W)`` from one forward pass, the tensors on the CPU (float32; ``high_norm`` bool):
    ``maps`` (:func:`cls_attention_maps`), ``norms`` (:func:`patch_norms`), ``high_norm``
    (:func:`high_norm_tokens`), ``on_patches`` ``(B,)`` (the CLS token's attention mass on the
    patches, averaged over heads; the rest goes to itself and the registers) and ``metrics``:
    ``high_norm_token_share`` (of all patch tokens) and ``cls_attention_on_patches`` (``on_patches``'
    mean)."""
    images = images.to(next(backbone.parameters()).device)
    grid = _grid(backbone, images)
    with torch.no_grad():  # one pass for both: the blocks before the last run once
        attention, output = backbone.last_self_attention(images, with_output=True)
    maps = _cls_rows(attention, grid).float().cpu()
    norms = _patch_norms_of(output, grid).cpu()
    high = high_norm_tokens(norms, factor)
    on_patches = maps.sum(dim=(-2, -1)).mean(dim=1)
    metrics = {"high_norm_token_share": high.float().mean().item(),
               "cls_attention_on_patches": on_patches.mean().item()}
    return {"maps": maps, "norms": norms, "high_norm": high, "on_patches": on_patches, "metrics": metrics}
