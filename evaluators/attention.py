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

How well a map outlines the object is measured as in DINO (Caron et al. 2021, the Jaccard of its
attention masks on PASCAL VOC12): each map keeps its largest weights holding ``mass`` (60 %) of its
total, and that mask's Jaccard with the image's foreground (here the synthetic scenes' shapes, or
a Fashion-MNIST garment's silhouette, :func:`garment_foreground`) is taken at the model input's
pixels; for the mean of the heads, and for the head that does it best.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

HIGH_NORM_FACTOR = 3.0  # a patch token above 3x the median norm counts as high-norm (module docstring)
MASK_MASS = 0.6  # an attention mask keeps the largest weights that hold 60 % of the map (DINO's figures)
ATTENTION_IMAGES = 128  # test images an evaluation's attention figures are measured on
# Fashion-MNIST's garments lie on black: a pixel above 10 of 255 is the garment (measured on 1,000 test
# images: 91 % are then one connected silhouette, and the largest part holds 99.5 % of the pixels)
GARMENT_THRESHOLD = 10


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
def cls_attention_maps(backbone: Any, images: Tensor, block: int = -1) -> Tensor:
    """Block ``block``'s (the last by default) attention of the CLS token over the patches, per
    head: ``(B, heads, h, w)``.

    The weights are those of the softmax over all tokens (CLS and registers included), not
    renormalised over the patches, so a map's sum is the share of the CLS token's attention that
    goes to the image's patches."""
    return _cls_rows(backbone.self_attention(images, block), _grid(backbone, images))


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


def attention_masks(maps: Tensor, mass: float = MASK_MASS) -> Tensor:
    """The smallest set of each map's largest weights that holds ``mass`` of its total: ``maps``
    ``(..., h, w)`` to bool masks of the same shape (the weights are sorted in decreasing order and
    kept while the mass before them is under ``mass``; equal weights are taken in the sort's order)."""
    if not 0 < mass < 1:
        raise ValueError(f"mass must be in (0, 1) (the share of each map's attention a mask keeps), got {mass}")
    flat = maps.flatten(-2).float()
    ordered, order = flat.sort(dim=-1, descending=True, stable=True)
    before = (ordered.cumsum(dim=-1) - ordered) / flat.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    return torch.zeros_like(flat, dtype=torch.bool).scatter(-1, order, before < mass).view(maps.shape)


def jaccard(masks: Tensor, truth: Tensor) -> Tensor:
    """Intersection over union of bool ``masks`` and ``truth`` over their last two dimensions,
    broadcast against each other: ``(...,)``; 1 where both are empty (they agree)."""
    both = (masks & truth).flatten(-2).sum(-1).float()
    either = (masks | truth).flatten(-2).sum(-1).float()
    return torch.where(either > 0, both / either.clamp_min(1), torch.ones_like(either))


def garment_foreground(images: Tensor) -> Tensor:
    """The silhouettes of Fashion-MNIST garments ``(..., H, W)`` uint8: pixels above
    :data:`GARMENT_THRESHOLD` (module docstring)."""
    return images > GARMENT_THRESHOLD


def foreground_jaccard(maps: Tensor, foreground: Tensor, mass: float = MASK_MASS) -> dict[str, Any]:
    """How well CLS attention ``maps`` ``(B, heads, h, w)`` outline the ``foreground`` ``(B, H, W)``
    bool at the model input's pixels (``H, W`` multiples of ``h, w``: each patch's verdict covers its
    pixels): ``attention_jaccard``, the mean over images of the Jaccard of the head-mean map's
    :func:`attention_masks` with the foreground, and ``attention_jaccard_best_head``, that of the
    head best on these images (``best_head``; chosen on the images it is scored on, as DINO's
    per-head figures are: an upper figure); ``per_image`` ``(B,)`` the head mean's."""
    batch, heads, rows, cols = maps.shape
    height, width = foreground.shape[-2:]
    if foreground.shape[0] != batch or height % rows or width % cols:
        raise ValueError(f"foreground {tuple(foreground.shape)} does not fit maps {tuple(maps.shape)}: give "
                         "(B, H, W) with H and W multiples of the patch grid")
    mean_and_heads = torch.cat([maps.mean(dim=1, keepdim=True), maps], dim=1)  # (B, 1 + heads, h, w)
    masks = attention_masks(mean_and_heads, mass)
    pixels = masks.repeat_interleave(height // rows, dim=-2).repeat_interleave(width // cols, dim=-1)
    scores = jaccard(pixels, foreground.bool()[:, None])  # (B, 1 + heads)
    per_head = scores[:, 1:].mean(dim=0)
    best = int(per_head.argmax())
    return {"attention_jaccard": scores[:, 0].mean().item(), "attention_jaccard_best_head": per_head[best].item(),
            "best_head": best, "per_image": scores[:, 0]}


def attention_summary(backbone: Any, images: Tensor, factor: float = HIGH_NORM_FACTOR, block: int = -1,
                      foreground: Tensor | None = None, mass: float = MASK_MASS) -> dict[str, Any]:
    """Maps and figures of ``backbone`` (eval mode, on any device) on model inputs ``images``
    ``(B, 3, H, W)`` from one forward pass up to block ``block`` (the last by default), the tensors
    on the CPU (float32; masks bool): ``maps`` (:func:`cls_attention_maps`), ``norms`` (the patch
    tokens' norms at that block's output: :func:`patch_norms` for the last), ``high_norm``
    (:func:`high_norm_tokens`), ``masks`` (the head-mean map's :func:`attention_masks` holding
    ``mass``), ``on_patches`` ``(B,)`` (the CLS token's attention mass on the patches, averaged over
    heads; the rest goes to itself and the registers) and ``metrics``: ``high_norm_token_share`` (of
    all patch tokens) and ``cls_attention_on_patches`` (``on_patches``' mean); given the
    ``foreground`` ``(B, H, W)``, also :func:`foreground_jaccard`'s two figures in ``metrics``, and
    its ``best_head``."""
    images = images.to(next(backbone.parameters()).device)
    grid = _grid(backbone, images)
    with torch.no_grad():  # one pass for both: the blocks before the chosen one run once
        attention, output = backbone.self_attention(images, block, with_output=True)
    maps = _cls_rows(attention, grid).float().cpu()
    norms = _patch_norms_of(output, grid).cpu()
    high = high_norm_tokens(norms, factor)
    on_patches = maps.sum(dim=(-2, -1)).mean(dim=1)
    metrics = {"high_norm_token_share": high.float().mean().item(),
               "cls_attention_on_patches": on_patches.mean().item()}
    summary = {"maps": maps, "norms": norms, "high_norm": high, "masks": attention_masks(maps.mean(dim=1), mass),
               "on_patches": on_patches, "metrics": metrics}
    if foreground is not None:
        scored = foreground_jaccard(maps, foreground.cpu(), mass)
        metrics.update({k: scored[k] for k in ("attention_jaccard", "attention_jaccard_best_head")})
        summary["best_head"] = scored["best_head"]
    return summary
