"""The ceiling probe of issue 11: a plain eager ViT training step doing one DINOv2 step's work per image.

Why it exists: dinoflow's real step (losses, masking, Sinkhorn, EMA) must beat what a straightforward
implementation gets from the same card. The probe is that straightforward implementation: pre-norm
ViT blocks with SDPA attention, a DINO-shaped head (MLP, bottleneck, prototypes), and nothing else --
no losses, no data, no stochastic depth. Per image it does a student forward+backward on 2 global +
N local crops, a teacher forward (no grad) on the 2 global crops, and the head's matmuls where a
DINOv2 step runs them: on every crop's CLS token and on the global crops' masked patches (iBOT), as
many rows as dinoflow's step pads them to (:func:`~trainer.data.masking.masked_patch_bound`).

Why the masked patches: issue 11's own figures count them. Its ViT-L/14 probe ran at 345 TFLOP/s at
169 img/s and 415 at 203, that is 2041-2045 GFLOP per image (within their rounding); this probe
counts 2044.9 at the ViT-L/14 recipe's sizes, and without the masked patches' head (the CLS-only
probe of benchmarks runs 1-6) 2029.9, outside that range.

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
    """The sizes one DINOv2 step works at: backbone, crops, head, batch and masked patches."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    global_crop_size: int
    local_crop_size: int
    num_local_crops: int
    hidden_dim: int  # the head's MLP
    head_layers: int  # its linear layers up to the bottleneck (1: straight to it)
    bottleneck_dim: int
    num_prototypes: int
    batch_size: int  # images per step
    masked_rows: int  # masked patches per step, over the batch's global crops
    patch_head: tuple[int, int] | None = None  # a separate iBOT head's (bottleneck, prototypes), else the DINO head
    mlp_ratio: float = 4.0

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


def probe_shape(cfg: PretrainConfig) -> ProbeShape:
    """The probe's sizes for a dinoflow recipe: its backbone's width, depth and heads (built on the
    meta device: no memory), crops, the DINO head's sizes (and the iBOT head's when separate), and
    the masked patches a step of its batch is padded to."""
    from trainer.data.masking import masked_patch_bound
    from trainer.engine import build_networks

    with torch.device("meta"):
        backbone = build_networks(cfg)[0].backbone
    crops, heads, loss = cfg.crops, cfg.heads, cfg.loss
    batch = cfg.optim.batch_size
    patches = (crops.global_crop_size // cfg.model.patch_size) ** 2
    masked = masked_patch_bound(2 * batch, patches, loss.mask_probability, (loss.mask_ratio_min, loss.mask_ratio_max))
    return ProbeShape(backbone.embed_dim, len(backbone.blocks), backbone.blocks[0].attn.num_heads,
                      cfg.model.patch_size, crops.global_crop_size, crops.local_crop_size, crops.num_local_crops,
                      heads.hidden_dim, heads.num_layers, heads.bottleneck_dim, heads.num_prototypes, batch, masked,
                      (heads.ibot_bottleneck_dim, heads.ibot_num_prototypes) if heads.ibot_separate_head else None)


def _head_widths(shape: ProbeShape, patches: bool = False) -> list[int]:
    """Widths from the token to the logits: ``d, hidden, ..., hidden, bottleneck, prototypes``, of
    the DINO head or (``patches``) the head of the masked patches."""
    bottleneck, prototypes = (shape.patch_head if patches and shape.patch_head else
                              (shape.bottleneck_dim, shape.num_prototypes))
    return [shape.embed_dim, *[shape.hidden_dim] * (shape.head_layers - 1), bottleneck, prototypes]


def _head(widths: list[int]) -> nn.Sequential:
    """The MLP to the bottleneck (GELU between its layers), then the prototypes (no bias)."""
    layers: list[nn.Module] = []
    for width_in, width_out in zip(widths[:-2], widths[1:-1]):
        layers += [nn.Linear(width_in, width_out), nn.GELU()]
    return nn.Sequential(*layers[:-1], nn.Linear(widths[-2], widths[-1], bias=False))


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
    """Patch embedding -> CLS + positions -> blocks -> norm -> head (MLP, bottleneck, K prototypes)
    on the CLS tokens and, given their positions, on patch tokens (a second head of the iBOT head's
    sizes when the recipe's is separate)."""

    def __init__(self, shape: ProbeShape) -> None:
        super().__init__()
        d = shape.embed_dim
        self.patch_embed = nn.Conv2d(3, d, shape.patch_size, stride=shape.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        max_tokens = (shape.global_crop_size // shape.patch_size) ** 2 + 1
        self.pos_embed = nn.Parameter(torch.zeros(1, max_tokens, d))
        self.blocks = nn.ModuleList(ProbeBlock(d, shape.num_heads, shape.mlp_dim) for _ in range(shape.depth))
        self.norm = nn.LayerNorm(d)
        self.head = _head(_head_widths(shape))
        self.patch_head = self.head if shape.patch_head is None else _head(_head_widths(shape, patches=True))

    def forward(self, images: Tensor, patch_index: Tensor | None = None) -> list[Tensor]:
        """Logits: ``(batch, prototypes)`` of the CLS tokens, then, given ``patch_index`` (``M``
        positions in the ``(batch x patches)`` patch tokens), ``(M, prototypes)`` of those patches."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (batch, patches, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed[:, : x.shape[1]]  # local crops take the first positions: work, not accuracy
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if patch_index is None:
            return [self.head(x[:, 0])]
        patches = x.shape[1] - 1  # the p-th patch token is row p + p // patches + 1 of the flattened tokens
        return [self.head(x[:, 0]), self.patch_head(x.flatten(0, 1)[patch_index + patch_index // patches + 1])]


def probe_step(student: ProbeViT, teacher: ProbeViT, global_crops: Tensor, local_crops: Tensor,
               masked_index: Tensor, optimizer: torch.optim.Optimizer, autocast_dtype: torch.dtype | None) -> None:
    """One probe step: teacher forward on the global crops, student forward+backward on all crops,
    the head also on the global crops' patches at ``masked_index`` for both, optimizer step. The
    "loss" is the logits' mean (accumulated in fp32): it makes backward do the full work and nothing more.

    ``global_crops`` is ``(2 * batch, 3, G, G)``, ``local_crops`` ``(N * batch, 3, L, L)``.
    """
    device_type = global_crops.device.type
    with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        with torch.no_grad():
            teacher(global_crops, masked_index)
        logits = student(global_crops, masked_index) + (student(local_crops) if local_crops.numel() else [])
        loss = sum(part.mean(dtype=torch.float32) for part in logits)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def head_flops(shape: ProbeShape, patches: bool = False) -> int:
    """Matmul FLOPs (2 per multiply-add) of the DINO head's (``patches``: the masked patches' head's)
    forward on one token."""
    widths = _head_widths(shape, patches)
    return 2 * sum(a * b for a, b in zip(widths, widths[1:]))


def forward_flops(shape: ProbeShape, crop_size: int) -> int:
    """Matmul FLOPs of one forward of one crop through :class:`ProbeViT`, the head on its CLS token."""
    d, patches = shape.embed_dim, (crop_size // shape.patch_size) ** 2
    tokens = patches + 1
    patch_embed = 2 * patches * 3 * shape.patch_size ** 2 * d
    linears = 2 * tokens * (3 * d * d + d * d + 2 * d * shape.mlp_dim)  # qkv, proj, fc1, fc2
    attention = 2 * 2 * tokens * tokens * d  # q @ k^T and weights @ v, all heads together
    return patch_embed + shape.depth * (linears + attention) + head_flops(shape)


def probe_flops_per_image(shape: ProbeShape) -> float:
    """FLOPs of one DINOv2 step per image: the student's forward + backward (backward = 2x forward)
    on 2 global and N local crops and the teacher's forward on the 2 global crops, then the head
    on the step's masked patches (student 3 passes, teacher 1), shared by the batch's images."""
    global_forward = forward_flops(shape, shape.global_crop_size)
    local_forward = forward_flops(shape, shape.local_crop_size)
    student = 3 * (2 * global_forward + shape.num_local_crops * local_forward)
    masked = (3 + 1) * shape.masked_rows * head_flops(shape, patches=True)
    return student + 2 * global_forward + masked / shape.batch_size
