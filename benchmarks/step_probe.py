"""The ceiling probe of issue 11: a plain eager ViT training step doing one DINOv2 step's work per image.

Why it exists: dinoflow's real step (losses, masking, Sinkhorn, EMA) must beat what a straightforward
implementation gets from the same card. The probe is that straightforward implementation: pre-norm
ViT blocks with SDPA attention, a CLS-token prototype head, and nothing else -- no losses, no data,
no stochastic depth. Per image it does a student forward+backward on 2 global + N local crops, a
teacher forward (no grad) on the 2 global crops, and the prototype-head matmuls on every crop.

:func:`probe_flops_per_image` counts the matmul FLOPs of that work by hand (norms, activations and
the optimizer are left out, as ``torch.utils.flop_counter.FlopCounterMode`` leaves them out), so a
step's achieved TFLOP/s is ``images/s x flops_per_image / 1e12``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from dinoflow.config import PretrainConfig


@dataclass(frozen=True)
class ProbeShape:
    """The sizes one DINOv2 step works at: backbone, crops and prototype head."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    global_crop_size: int
    local_crop_size: int
    num_local_crops: int
    bottleneck_dim: int
    num_prototypes: int
    mlp_ratio: float = 4.0

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


def probe_shape(cfg: PretrainConfig) -> ProbeShape:
    """The probe's sizes for a dinoflow recipe: its backbone's width, depth and heads (built on the
    meta device: no memory), crops and the DINO head's bottleneck and prototypes."""
    from trainer.engine import build_networks

    with torch.device("meta"):
        backbone = build_networks(cfg)[0].backbone
    crops = cfg.crops
    return ProbeShape(backbone.embed_dim, len(backbone.blocks), backbone.blocks[0].attn.num_heads,
                      cfg.model.patch_size, crops.global_crop_size, crops.local_crop_size, crops.num_local_crops,
                      cfg.heads.bottleneck_dim, cfg.heads.num_prototypes)


class ProbeBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, mlp_dim), nn.Linear(mlp_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape  # (batch, tokens, dim)
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (batch, heads, tokens, head_dim)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(attended)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ProbeViT(nn.Module):
    """Patch embedding -> CLS + positions -> blocks -> norm -> CLS -> bottleneck -> K prototype logits."""

    def __init__(self, shape: ProbeShape) -> None:
        super().__init__()
        d = shape.embed_dim
        self.patch_embed = nn.Conv2d(3, d, shape.patch_size, stride=shape.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        max_tokens = (shape.global_crop_size // shape.patch_size) ** 2 + 1
        self.pos_embed = nn.Parameter(torch.zeros(1, max_tokens, d))
        self.blocks = nn.ModuleList(ProbeBlock(d, shape.num_heads, shape.mlp_dim) for _ in range(shape.depth))
        self.norm = nn.LayerNorm(d)
        self.bottleneck = nn.Linear(d, shape.bottleneck_dim)
        self.prototypes = nn.Linear(shape.bottleneck_dim, shape.num_prototypes, bias=False)

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (batch, patches, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed[:, : x.shape[1]]  # local crops take the first positions: work, not accuracy
        for block in self.blocks:
            x = block(x)
        return self.prototypes(self.bottleneck(self.norm(x[:, 0])))  # (batch, num_prototypes)


def probe_step(student: ProbeViT, teacher: ProbeViT, global_crops: Tensor, local_crops: Tensor,
               optimizer: torch.optim.Optimizer, autocast_dtype: torch.dtype | None) -> None:
    """One probe step: teacher forward on the global crops, student forward+backward on all crops,
    optimizer step. The "loss" is the logits' mean: it makes backward do the full work and nothing more.

    ``global_crops`` is ``(2 * batch, 3, G, G)``, ``local_crops`` ``(N * batch, 3, L, L)``.
    """
    device_type = global_crops.device.type
    with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        with torch.no_grad():
            teacher(global_crops)
        loss = student(global_crops).float().mean()
        if local_crops.numel():
            loss = loss + student(local_crops).float().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def forward_flops(shape: ProbeShape, crop_size: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of one forward of one crop through :class:`ProbeViT`."""
    d, patches = shape.embed_dim, (crop_size // shape.patch_size) ** 2
    tokens = patches + 1
    patch_embed = 2 * patches * 3 * shape.patch_size ** 2 * d
    linears = 2 * tokens * (3 * d * d + d * d + 2 * d * shape.mlp_dim)  # qkv, proj, fc1, fc2
    attention = 2 * 2 * tokens * tokens * d  # q @ k^T and weights @ v, all heads together
    head = 2 * (d * shape.bottleneck_dim + shape.bottleneck_dim * shape.num_prototypes)  # CLS token only
    return patch_embed + shape.depth * (linears + attention) + head


def probe_flops_per_image(shape: ProbeShape) -> int:
    """FLOPs of one DINOv2 step per image: the student's forward + backward (backward = 2x forward)
    on 2 global and N local crops, and the teacher's forward on the 2 global crops."""
    global_forward, local_forward = forward_flops(shape, shape.global_crop_size), forward_flops(shape, shape.local_crop_size)
    student = 3 * (2 * global_forward + shape.num_local_crops * local_forward)
    return student + 2 * global_forward
