"""Transformer building blocks of the DINOv2 ViT, in the official parameter layout.

Why packed tokens: training runs 2 global crops (e.g. 224 px, 257 tokens) and several local
crops (98 px, 50 tokens) through the student. Groups of crops ``[(B_i, N_i, D), ...]`` are packed
once into one token matrix ``(T, D)`` that every block takes with the group ``shapes``; the
norms and the FFN run once over all tokens (each FFN product one large matrix product), and
attention with its projections runs per group, so each image attends only to its own tokens:
block-diagonal attention, with no mask ever materialised. One group is the ordinary case, and
there the packing is a free reshape.

Why the subset trick for stochastic depth: above a drop rate r of 0.1 a residual branch is
computed only for a random subset of ``k = int(B (1 - r))`` samples of each group and added back
scaled by ``B / k`` (expectation unchanged; the dropped samples' compute and activations are
saved), as the original does, provided that whole-sample rounding keeps the configured share:
``k / B`` within ``SUBSET_KEEP_TOLERANCE`` of ``1 - r`` in every group (a ViT-L batch of 64, 128
global crops at r = 0.4, keeps 76: 0.594). Otherwise a per-sample Bernoulli mask scaled by
``1 / (1 - r)`` keeps the rate exact at full compute: for small batches (4 samples at r = 0.4 would
keep 2, dropping 50 %), where the original would over-drop, and at r <= 0.1. There the subset's
rows in and out cost more than the tenth of the branch they skip when they were the original's
gather and ``index_add``, a scatter forward and backward (atomic adds on a GPU): with compiled
blocks ViT-S/14's step was no faster on an H100, with 1 GB more memory, and 0.91x the mask form's
img/s on an H200 (``benchmarks/RESULTS.md``, run 7). They are now gathers both ways
(:class:`PickRows`), which inductor fuses into the layer norm that reads the rows and the
residual add that takes them back; the threshold stays until a GPU measures that form at
ViT-S/14's rate (``benchmarks/train_step.py --subset-drop-above``, ``benchmarks/drop_path.py``).
Eval mode is the identity either way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Shapes = list[tuple[int, int]]  # (samples, tokens) of each packed group
SUBSET_DROP_ABOVE = 0.1  # the subset trick only above this drop rate (module docstring)
SUBSET_KEEP_TOLERANCE = 0.01  # largest |k / B - (1 - r)| of the subset trick


def pack(groups: Sequence[Tensor]) -> tuple[Tensor, Shapes]:
    """Concatenate groups ``(B_i, N_i, D)`` into one token matrix ``(sum B_i N_i, D)``."""
    shapes = [(g.shape[0], g.shape[1]) for g in groups]
    if len(groups) == 1:
        return groups[0].reshape(-1, groups[0].shape[-1]), shapes
    return torch.cat([g.reshape(-1, g.shape[-1]) for g in groups]), shapes


def unpack(tokens: Tensor, shapes: Shapes) -> list[Tensor]:
    """Inverse of :func:`pack`."""
    sizes = [b * n for b, n in shapes]
    return [part.view(b, n, -1) for part, (b, n) in zip(tokens.split(sizes), shapes)]


class PatchProjection(nn.Conv2d):
    """A ``kernel = stride = patch_size`` conv's parameters (the original's layout and names),
    applied as one matrix product over the unfolded patches: ``(B, C, H, W) -> (B, H/p * W/p, D)``.

    Why not the conv: with the stride equal to the kernel it is a matrix product, and cuDNN ran
    this one as an implicit GEMM at 1.3 ms a call on an H100 (ViT-S/14, 256 crops of 224 px,
    ~30 GFLOP: under 5 % of the card's rate); a reshape and a plain GEMM do the same sums. Why a
    ``Conv2d`` subclass: sharded training (ZeRO-3) gathers a module's parameters when its own
    ``forward`` runs, so the product must be computed here, not by the parent reading them.
    """

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int) -> None:
        super().__init__(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:
        batch, channels, height, width = images.shape
        p = self.kernel_size[0]
        rows, cols = height // p, width // p
        # (B, C, rows, p, cols, p) -> (B, rows * cols, C * p * p), each patch flattened as the weight is
        patches = images.reshape(batch, channels, rows, p, cols, p).permute(0, 2, 4, 1, 3, 5)
        return F.linear(patches.reshape(batch, rows * cols, channels * p * p), self.weight.flatten(1), self.bias)


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` patches projected to ``embed_dim`` (:class:`PatchProjection`)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = PatchProjection(in_chans, embed_dim, patch_size)

    def forward(self, images: Tensor) -> Tensor:
        """``(B, C, H, W)`` -> ``(B, H/p * W/p, D)``; H and W must be multiples of p."""
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size {self.patch_size}"
            )
        return self.proj(images)


class Attention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention``, per packed group."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, tokens: Tensor, shapes: Shapes, scale: Tensor | None = None) -> Tensor:
        """``(T, D)`` packed tokens -> ``(T, D)``; tokens attend within their own image only; the
        output times ``scale`` ``(D,)`` if given (folded into the projection: :func:`scaled_linear`)."""
        dim = tokens.shape[-1]
        weight, bias = scaled_linear(self.proj, scale)
        outputs = []
        for part, (batch, length) in zip(tokens.split([b * n for b, n in shapes]), shapes):
            # q/k/v projected per group, as the probe projects per crop: with one product over all
            # groups, the backward concatenated the groups' permuted q/k/v gradients into one (T, 3D)
            # gradient in a kernel of its own, then reduced the bias's gradient in another (5.8 ms of
            # a ViT-S/14 step on an H200, run 8); the probe's per-crop backward fused both into the
            # permutation's (2.7 ms)
            # (b, n, 3, heads, d) -> 3 x (b, heads, n, d)
            qkv = self.qkv(part).view(batch, length, 3, self.num_heads, dim // self.num_heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            attended = F.scaled_dot_product_attention(q, k, v)  # (b, heads, n, d)
            # projected per group: the projection's saved input is the attention's own output (kept
            # for its backward anyway), not a concatenated copy of it
            outputs.append(F.linear(attended.transpose(1, 2).reshape(batch * length, dim), weight, bias))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def weights(self, tokens: Tensor) -> Tensor:
        """The attention probabilities ``(B, heads, N, N)`` of tokens ``(B, N, D)``:
        ``softmax(q k^T / sqrt(d))``, the weights :meth:`forward`'s fused attention applies to the
        values without ever writing them; written out here for attention maps."""
        batch, length, dim = tokens.shape
        head_dim = dim // self.num_heads
        q, k, _ = self.qkv(tokens).view(batch, length, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        return (q @ k.transpose(-2, -1) * head_dim**-0.5).softmax(dim=-1)


class Mlp(nn.Module):
    """``fc2(gelu(fc1(x)))``: the FFN of ViT-S/B/L."""

    def __init__(self, dim: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor, scale: Tensor | None = None) -> Tensor:
        """The FFN, times ``scale`` ``(D,)`` if given (folded into ``fc2``: :func:`scaled_linear`)."""
        return F.linear(F.gelu(self.fc1(x)), *scaled_linear(self.fc2, scale))


class SwiGLUFFN(nn.Module):
    """``w3(silu(a) * b)`` with ``[a, b] = w12(x)``: the FFN of ViT-g.

    The nominal hidden width is scaled by 2/3 and rounded up to a multiple of 8
    (4 * 1536 -> 4096), so the parameter count stays close to a GELU MLP's.
    """

    def __init__(self, dim: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        hidden = swiglu_hidden(hidden)
        self.w12 = nn.Linear(dim, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor, scale: Tensor | None = None) -> Tensor:
        """The FFN, times ``scale`` ``(D,)`` if given (folded into ``w3``: :func:`scaled_linear`)."""
        gate, value = self.w12(x).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * value, *scaled_linear(self.w3, scale))


def swiglu_hidden(nominal: int) -> int:
    """The SwiGLU hidden width for a nominal MLP width."""
    return (int(nominal * 2 / 3) + 7) // 8 * 8


def scaled_linear(linear: nn.Linear, scale: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``linear``'s weight and bias with a per-output-channel ``scale`` folded in, for
    ``linear(x) * scale = x (s W)^T + s b``.

    Why: multiplying the output keeps it alive until the backward, for ``scale``'s gradient
    (a ``(tokens, D)`` tensor per branch and block: about 2 GB of a ViT-S/14 step at batch 128); folded,
    that gradient comes from the weight's, ``dL/ds_d = sum_j dL/dW'_dj W_dj + dL/db'_d b_d``, from
    what the product keeps anyway (its input), and no separate multiply or reduction runs.
    """
    if scale is None:
        return linear.weight, linear.bias
    bias = None if linear.bias is None else linear.bias * scale
    return linear.weight * scale.unsqueeze(1), bias


class LayerScale(nn.Module):
    """Per-channel scale ``gamma`` of a residual branch (initialised small, 1e-5 in training); the
    block folds it into the branch's output projection (:func:`scaled_linear`)."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x += ls1(attn(norm1(x)))``; ``x += ls2(ffn(norm2(x)))``, each
    layer scale folded into its branch's output projection (:func:`scaled_linear`)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        ffn_layer: Literal["mlp", "swiglu"] = "mlp",
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        layerscale_init: float | None = 1e-5,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        ffn = {"mlp": Mlp, "swiglu": SwiGLUFFN}[ffn_layer]
        self.mlp = ffn(dim, hidden, bias=ffn_bias)
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.drop_path = drop_path

    def _attention_branch(self, tokens: Tensor, shapes: Shapes) -> Tensor:
        return self.attn(self.norm1(tokens), shapes, _gamma(self.ls1))

    def _ffn_branch(self, tokens: Tensor, shapes: Shapes) -> Tensor:
        return self.mlp(self.norm2(tokens), _gamma(self.ls2))

    def forward(self, tokens: Tensor, shapes: Shapes) -> Tensor:
        """Apply the block to packed tokens ``(T, D)`` of groups ``shapes``."""
        rate = self.drop_path if self.training else 0.0
        tokens = residual(tokens, shapes, self._attention_branch, rate)
        return residual(tokens, shapes, self._ffn_branch, rate)


def _gamma(layer_scale: nn.Module) -> Tensor | None:
    return layer_scale.gamma if isinstance(layer_scale, LayerScale) else None


def external_parameters(block: Block) -> list[tuple[nn.Module, nn.Parameter]]:
    """``(module, parameter)``: the parameters ``block``'s forward reads in a module other than
    their own (the output projections' weights, read by their branch to fold layer scale in; the
    gammas, read by the block), for sharding schemes that gather a module's parameters around its
    own call (DeepSpeed ZeRO-3's external parameters)."""
    pairs: list[tuple[nn.Module, nn.Parameter]] = []
    output = {Mlp: "fc2", SwiGLUFFN: "w3"}
    for layer_scale, branch, projection in ((block.ls1, block.attn, block.attn.proj),
                                            (block.ls2, block.mlp, getattr(block.mlp, output[type(block.mlp)]))):
        pairs += [(branch, parameter) for parameter in projection.parameters()]
        if isinstance(layer_scale, LayerScale):
            pairs.append((block, layer_scale.gamma))
    return pairs


def subset_sizes(shapes: Shapes, drop_rate: float) -> list[int] | None:
    """Samples the subset trick keeps of each group at ``drop_rate``, ``int(B (1 - r))``, or None
    at rates up to ``SUBSET_DROP_ABOVE`` or where it would not keep ``1 - r`` of some group within
    ``SUBSET_KEEP_TOLERANCE`` (module docstring)."""
    if drop_rate <= SUBSET_DROP_ABOVE:
        return None
    keeps = [int(batch * (1 - drop_rate)) for batch, _ in shapes]
    fits = all(keep >= 1 and abs(keep / batch - (1 - drop_rate)) <= SUBSET_KEEP_TOLERANCE
               for keep, (batch, _) in zip(keeps, shapes))
    return keeps if fits else None


def residual(
    tokens: Tensor, shapes: Shapes, branch: Callable[[Tensor, Shapes], Tensor], drop_rate: float
) -> Tensor:
    """``x + branch(x)`` per sample on packed tokens ``(T, D)``, with stochastic depth at
    ``drop_rate`` (see the module docstring)."""
    if drop_rate == 0.0:
        return tokens + branch(tokens, shapes)
    keeps = subset_sizes(shapes, drop_rate)
    if keeps is None:
        # each sample's draw over its n tokens, (T,): static shapes, so torch.compile traces it whole
        # (a repeat_interleave by a tensor of counts has a data-dependent size: a graph break and a sync)
        per_token = torch.cat([torch.empty(b, 1, device=tokens.device).bernoulli_(1 - drop_rate).expand(b, n)
                               .reshape(-1) for b, n in shapes])
        return tokens + branch(tokens, shapes) * (per_token / (1 - drop_rate)).unsqueeze(1).to(tokens.dtype)
    index, inverse, picked, scales, kept_shapes = _subset_rows(shapes, keeps, tokens)
    update = branch(PickRows.apply(tokens, index, None, inverse, picked), kept_shapes)
    # the scales take the stream's dtype, so the sum keeps it: bf16 under autocast (prepare_tokens casts the
    # stream to the patch projection's dtype), fp32 without; as on the mask path
    return tokens + PickRows.apply(update * scales.unsqueeze(1), inverse, picked, index, None)


class PickRows(torch.autograd.Function):
    """``source[index]``, the rows where ``picked`` is False zeroed (``picked=None``: none), for an
    ``index`` that picks each source row at most once; ``inverse`` says where: source row ``i`` went
    to output row ``inverse[i]`` if ``inverse_picked[i]`` (``None``: every source row was picked).

    Why a function of its own: autograd's gradient of a row gather is a scatter into zeros (atomic
    adds on a GPU), and so is ``index_add``'s forward. Knowing the inverse, the gradient is a gather
    too, ``grad[inverse]`` (zero where not picked), and the subset stochastic depth's way in (the
    kept samples' tokens) and way out (their branch back into the residual stream) are four gathers
    that inductor fuses into the layer norms and residual adds around them: no scatter, no atomics,
    no extra pass over the tokens."""

    @staticmethod
    def forward(ctx: Any, source: Tensor, index: Tensor, picked: Tensor | None, inverse: Tensor,
                inverse_picked: Tensor | None) -> Tensor:
        ctx.save_for_backward(inverse, inverse_picked)
        return _gather_rows(source, index, picked)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
        inverse, inverse_picked = ctx.saved_tensors
        return _gather_rows(grad, inverse, inverse_picked), None, None, None, None


def _gather_rows(source: Tensor, index: Tensor, picked: Tensor | None) -> Tensor:
    rows = source[index]
    return rows if picked is None else torch.where(picked.unsqueeze(1), rows, 0)


def _subset_rows(shapes: Shapes, keeps: list[int], tokens: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Shapes]:
    """The subset trick's rows for packed ``tokens`` of groups ``shapes``, ``keeps[g]`` random
    samples of group ``g`` kept (one ``randperm`` a group): the kept tokens' rows ``(K,)``,
    sample-major in the order drawn; for every token ``(T,)`` its row among them and whether it is
    kept; each kept token's scale ``B / k`` ``(K,)`` in the tokens' dtype; and the kept groups' shapes."""
    device = tokens.device
    index, inverse, picked, scales = [], [], [], []
    offset = kept_offset = 0
    for (batch, length), keep in zip(shapes, keeps):
        order = torch.randperm(batch, device=device)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(batch, device=device)  # where each sample went in the draw
        positions = torch.arange(length, device=device)
        index.append((offset + order[:keep].unsqueeze(1) * length + positions).flatten())
        kept = (rank < keep).unsqueeze(1).expand(batch, length).flatten()
        inverse.append(torch.where(kept, kept_offset + (rank.unsqueeze(1) * length + positions).flatten(), 0))
        picked.append(kept)
        scales.append(torch.full((keep * length,), batch / keep, dtype=tokens.dtype, device=device))
        offset += batch * length
        kept_offset += keep * length
    kept_shapes = [(keep, length) for keep, (_, length) in zip(keeps, shapes)]
    return torch.cat(index), torch.cat(inverse), torch.cat(picked), torch.cat(scales), kept_shapes
