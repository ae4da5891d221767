"""The DINOv2 vision transformer, keeping the official state-dict layout.

Why the layout matters: Meta's released checkpoints (``dinov2_vit{s,b,l,g}14[_reg4]``) must
load with ``strict=True`` and behave exactly like the original, so parameter names, shapes,
the position-embedding interpolation and the token order follow it:

* tokens are ``[CLS, registers..., patches...]``; registers are inserted after the position
  embeddings are added, so they carry none;
* masked patch embeddings are replaced by the learned ``mask_token`` before CLS and positions;
* the learned position table (one CLS entry plus an M x M grid) is resized bicubically to the
  input's patch grid: non-register models scale by ``(n + 0.1) / M`` without antialiasing, register
  models resize to the target size with antialiasing (``interpolate_offset``,
  ``interpolate_antialias``; the factories choose the original's values, and they are logged).
"""

from __future__ import annotations

import math
from typing import Literal, TypedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.models.layers import Block, PatchEmbed, pack, unpack

FfnLayer = Literal["mlp", "swiglu"]


class Features(TypedDict):
    """Outputs of :meth:`DinoVisionTransformer.forward_features` (the original's keys)."""

    x_norm_clstoken: Tensor  # (B, D)
    x_norm_regtokens: Tensor  # (B, R, D)
    x_norm_patchtokens: Tensor  # (B, N, D)
    x_prenorm: Tensor  # (B, 1 + R + N, D)
    masks: Tensor | None  # (B, N) bool


class DinoVisionTransformer(nn.Module):
    """ViT backbone of DINOv2.

    Args:
        img_size: side of the square image the position table is sized for (518 for the
            released weights, the global crop size in training).
        patch_size: side of the square patches (14 for DINOv2).
        in_chans: image channels.
        embed_dim: token width D.
        depth: number of blocks.
        num_heads: attention heads (D / num_heads is the head width).
        mlp_ratio: FFN hidden width as a multiple of D (before SwiGLU's 2/3 rounding).
        ffn_layer: ``"mlp"`` (GELU, S/B/L) or ``"swiglu"`` (g).
        qkv_bias, proj_bias, ffn_bias: biases of the attention and FFN projections.
        layerscale_init: initial LayerScale ``gamma``; None or 0 disables LayerScale.
        drop_path_rate: stochastic-depth rate (of the last block when not uniform).
        drop_path_uniform: every block at ``drop_path_rate``, else linear from 0.
        num_register_tokens: extra learned tokens between CLS and the patches (0 or 4).
        interpolate_antialias: antialias when resizing the position table.
        interpolate_offset: resize by scale ``(n + offset) / M`` when non-zero, else to size n.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 14,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        ffn_layer: FfnLayer = "mlp",
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        layerscale_init: float | None = 1e-5,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = True,
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
    ) -> None:
        super().__init__()
        # constructor arguments, JSON-able: saved with checkpoints and exports to rebuild the model
        self.arch_kwargs = {
            "img_size": img_size, "patch_size": patch_size, "in_chans": in_chans,
            "embed_dim": embed_dim, "depth": depth, "num_heads": num_heads, "mlp_ratio": mlp_ratio,
            "ffn_layer": ffn_layer, "qkv_bias": qkv_bias, "proj_bias": proj_bias,
            "ffn_bias": ffn_bias, "layerscale_init": layerscale_init,
            "drop_path_rate": drop_path_rate, "drop_path_uniform": drop_path_uniform,
            "num_register_tokens": num_register_tokens,
            "interpolate_antialias": interpolate_antialias, "interpolate_offset": interpolate_offset,
        }
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        if num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {num_register_tokens}")
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        grid = img_size // patch_size

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        rates = (
            [drop_path_rate] * depth
            if drop_path_uniform
            else [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        )
        self.blocks = nn.ModuleList(
            Block(
                embed_dim, num_heads, mlp_ratio=mlp_ratio, ffn_layer=ffn_layer, qkv_bias=qkv_bias,
                proj_bias=proj_bias, ffn_bias=ffn_bias, layerscale_init=layerscale_init, drop_path=rate,
            )
            for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        init_weights(self)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def interpolate_pos_encoding(self, height: int, width: int, dtype: torch.dtype) -> Tensor:
        """The position table for an ``height x width`` image: ``(1, 1 + h*w, D)``."""
        table = resize_positions(self.pos_embed, height // self.patch_size, width // self.patch_size,
                                 self.interpolate_offset, self.interpolate_antialias)
        return table.to(dtype)

    def prepare_tokens(self, images: Tensor, masks: Tensor | None = None) -> Tensor:
        """``(B, C, H, W)`` (+ ``(B, N)`` bool masks) -> ``(B, 1 + R + N, D)`` input tokens.

        The tokens take the patch projection's dtype: under bf16 autocast the residual stream is bf16
        (half the memory traffic of its adds, as the original's training with half-precision
        parameters), where the original's evaluation keeps an fp32 stream (its CLS token promotes
        it): ViT-S/14 patch features taken under autocast differ from fp32 ones by 8e-3 relative, not 3e-3."""
        batch, _, height, width = images.shape
        tokens = self.patch_embed(images)  # (B, N, D)
        if masks is not None:
            if masks.shape != tokens.shape[:2]:
                raise ValueError(f"masks {tuple(masks.shape)} do not match the patch grid {tuple(tokens.shape[:2])}")
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1).to(tokens.dtype), tokens], dim=1)
        tokens = tokens + self.interpolate_pos_encoding(height, width, tokens.dtype)
        if self.register_tokens is not None:
            registers = self.register_tokens.expand(batch, -1, -1).to(tokens.dtype)
            tokens = torch.cat([tokens[:, :1], registers, tokens[:, 1:]], dim=1)
        return tokens

    def _features(self, prenorm: Tensor, masks: Tensor | None) -> Features:
        normed = self.norm(prenorm)
        first_patch = 1 + self.num_register_tokens
        return Features(
            x_norm_clstoken=normed[:, 0],
            x_norm_regtokens=normed[:, 1:first_patch],
            x_norm_patchtokens=normed[:, first_patch:],
            x_prenorm=prenorm,
            masks=masks,
        )

    def forward_features_list(
        self, images: list[Tensor], masks: list[Tensor | None] | None = None
    ) -> list[Features]:
        """Run crops of different sizes in one packed pass (block-diagonal attention)."""
        masks = masks if masks is not None else [None] * len(images)
        if len(masks) != len(images):
            raise ValueError(f"{len(images)} image groups but {len(masks)} mask groups")
        tokens, shapes = pack([self.prepare_tokens(x, m) for x, m in zip(images, masks)])
        for block in self.blocks:
            tokens = block(tokens, shapes)
        return [self._features(g, m) for g, m in zip(unpack(tokens, shapes), masks)]

    def forward_features(self, images: Tensor, masks: Tensor | None = None) -> Features:
        """Normalised CLS, register and patch tokens plus the pre-norm tokens."""
        return self.forward_features_list([images], [masks])[0]

    def forward(self, images: Tensor) -> Tensor:
        """The normalised CLS token ``(B, D)``: the image embedding."""
        return self.forward_features(images)["x_norm_clstoken"]

    def self_attention(self, images: Tensor, block: int = -1,
                       with_output: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Block ``block``'s attention probabilities ``(B, heads, T, T)`` over its input tokens
        ``[CLS, registers..., patches...]`` (``T = 1 + R + h*w``), as DINO's attention maps show
        them; ``block`` counts from 0, or from the end when negative (-1: the last block, whose
        maps DINO shows). With ``with_output`` also that block's output ``(B, T, D)`` from the same
        pass (for the last block ``forward_features``' ``x_prenorm``). The blocks after ``block``
        do not run. Call in eval mode (stochastic depth off). See :mod:`evaluators.attention`."""
        if not -self.depth <= block < self.depth:
            raise ValueError(f"block {block} out of range: this backbone has {self.depth} blocks "
                             f"(0..{self.depth - 1}, or -{self.depth}..-1 from the end)")
        chosen = self.blocks[block]
        tokens, shapes = pack([self.prepare_tokens(images)])
        for earlier in self.blocks[: block % self.depth]:
            tokens = earlier(tokens, shapes)
        attention = chosen.attn.weights(chosen.norm1(unpack(tokens, shapes)[0]))
        return (attention, unpack(chosen(tokens, shapes), shapes)[0]) if with_output else attention

    def get_intermediate_layers(
        self,
        images: Tensor,
        n: int | list[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Outputs of the last ``n`` blocks (or of the blocks listed in ``n``), like the original.

        Returns patch tokens ``(B, N, D)`` per block (``(B, D, h, w)`` when ``reshape``), paired
        with the block's CLS token ``(B, D)`` when ``return_class_token``.
        """
        wanted = set(range(self.depth - n, self.depth)) if isinstance(n, int) else set(n)
        if not wanted or min(wanted) < 0 or max(wanted) >= self.depth:
            raise ValueError(f"blocks {sorted(wanted)} out of range for depth {self.depth}")
        if not isinstance(n, int) and len(wanted) != len(n):  # one output a block: a repeat would misalign them
            raise ValueError(f"blocks {list(n)} name a block twice; give each block once")
        tokens, shapes = pack([self.prepare_tokens(images)])
        outputs = []
        for index, block in enumerate(self.blocks):
            tokens = block(tokens, shapes)
            if index in wanted:
                outputs.append(unpack(tokens, shapes)[0])
            if index == max(wanted):  # the blocks after it change none of the outputs
                break
        if norm:
            outputs = [self.norm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]
        patches = [out[:, 1 + self.num_register_tokens :] for out in outputs]
        if reshape:
            batch, _, height, width = images.shape
            rows, cols = height // self.patch_size, width // self.patch_size
            patches = [p.reshape(batch, rows, cols, -1).permute(0, 3, 1, 2).contiguous() for p in patches]
        if return_class_token:
            return tuple(zip(patches, class_tokens))
        return tuple(patches)


def resize_positions(table: Tensor, rows: int, cols: int, offset: float, antialias: bool) -> Tensor:
    """A square position table ``(1, 1 + M*M, D)`` (CLS first) for a ``rows x cols`` patch grid:
    the table itself if it has that grid, else its grid resized bicubically (in fp32) by the scale
    ``(n + offset) / M`` when ``offset`` is non-zero, as the original does, else to the size."""
    side = math.isqrt(table.shape[1] - 1)
    if rows == side and cols == side:
        return table
    table = table.float()
    grid = table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, D, M, M)
    if offset:
        resize = {"scale_factor": ((rows + offset) / side, (cols + offset) / side)}
    else:
        resize = {"size": (rows, cols)}
    grid = F.interpolate(grid, mode="bicubic", antialias=antialias, **resize)
    if grid.shape[-2:] != (rows, cols):
        raise RuntimeError(f"position grid resized to {tuple(grid.shape[-2:])}, wanted {(rows, cols)}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
    return torch.cat([table[:, :1], grid], dim=1)


def init_weights(model: DinoVisionTransformer) -> None:
    """The original's initialisation: trunc-normal(0.02) linears and positions, tiny CLS/registers."""
    nn.init.trunc_normal_(model.pos_embed, std=0.02)
    nn.init.normal_(model.cls_token, std=1e-6)
    if model.register_tokens is not None:
        nn.init.normal_(model.register_tokens, std=1e-6)
    nn.init.zeros_(model.mask_token)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


ARCHITECTURES: dict[str, dict] = {
    "vit_small": {"embed_dim": 384, "depth": 12, "num_heads": 6, "ffn_layer": "mlp"},
    "vit_base": {"embed_dim": 768, "depth": 12, "num_heads": 12, "ffn_layer": "mlp"},
    "vit_large": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "ffn_layer": "mlp"},
    "vit_giant2": {"embed_dim": 1536, "depth": 40, "num_heads": 24, "ffn_layer": "swiglu"},
}


def build_vit(arch: str, num_register_tokens: int = 0, **overrides: object) -> DinoVisionTransformer:
    """A ViT of a named architecture; position interpolation follows the original's choice
    (register models: antialias, no offset; others: offset 0.1, no antialias) unless overridden."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; allowed: {', '.join(ARCHITECTURES)}")
    kwargs: dict = dict(ARCHITECTURES[arch])
    kwargs["num_register_tokens"] = num_register_tokens
    kwargs["interpolate_antialias"] = num_register_tokens > 0
    kwargs["interpolate_offset"] = 0.0 if num_register_tokens > 0 else 0.1
    kwargs.update(overrides)
    return DinoVisionTransformer(**kwargs)


def vit_arch_kwargs(arch: str, num_register_tokens: int = 0, **overrides: object) -> dict:
    """The complete constructor arguments of :func:`build_vit` (built on the meta device: free)."""
    with torch.device("meta"):
        return build_vit(arch, num_register_tokens, **overrides).arch_kwargs


def vit_small(**kwargs: object) -> DinoVisionTransformer:
    """ViT-S: D=384, 12 blocks, 6 heads (21 M parameters at patch 14)."""
    return build_vit("vit_small", **kwargs)  # type: ignore[arg-type]


def vit_base(**kwargs: object) -> DinoVisionTransformer:
    """ViT-B: D=768, 12 blocks, 12 heads (86 M)."""
    return build_vit("vit_base", **kwargs)  # type: ignore[arg-type]


def vit_large(**kwargs: object) -> DinoVisionTransformer:
    """ViT-L: D=1024, 24 blocks, 16 heads (300 M)."""
    return build_vit("vit_large", **kwargs)  # type: ignore[arg-type]


def vit_giant2(**kwargs: object) -> DinoVisionTransformer:
    """ViT-g ("giant2"): D=1536, 40 blocks, 24 heads of 64, SwiGLU FFN (1.1 B)."""
    return build_vit("vit_giant2", **kwargs)  # type: ignore[arg-type]
