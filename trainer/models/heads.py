"""Projection heads of DINO and iBOT, in the original's parameter layout.

Why a weight-normalised last layer: the prototypes' directions are learned while their norm is
held by ``weight_g`` (initialised to 1), so on L2-normalised bottleneck features the logits are
cosine-like and bounded, which keeps the teacher's softmax and Sinkhorn-Knopp well conditioned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Fused = Callable[[Tensor, Tensor], Any] | None  # what a head computes from (features, prototypes) instead of logits


def normalized_rows(v: Tensor, g: Tensor) -> Tensor:
    """``W = g * v / ||v||`` per row of ``v`` ``(K, d)``, ``g`` ``(K, 1)``, with the backward written out.

    Why by hand: autograd's backward through ``g * v / v.norm(...)`` makes some ten element-wise
    passes over the ``(K, d)`` matrix (the division's, the norm's and the product's gradients, then
    their sum), for every call of the head: at 65536 x 256 prototypes each pass is 64 MiB of fp32.
    With ``u = v / ||v||`` and ``G = dL/dW``, per row

        dL/dg = G . u,        dL/dv = (g / ||v||) (G - (G . u) u),

    which is one product-and-sum and one fused multiply-add (3.3x faster on a CPU at that size,
    ``benchmarks/loss_tail.py``).
    """
    return _NormalizedRows.apply(v, g)


class _NormalizedRows(torch.autograd.Function):
    """:func:`normalized_rows`."""

    @staticmethod
    def forward(ctx: Any, v: Tensor, g: Tensor) -> Tensor:
        inverse = torch.linalg.vector_norm(v, dim=1, keepdim=True).reciprocal()  # (K, 1)
        ctx.save_for_backward(v, g, inverse)
        return v * (g * inverse)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        v, g, inverse = ctx.saved_tensors
        along = (grad * v).sum(dim=1, keepdim=True) * inverse  # G . u, (K, 1)
        return torch.addcmul(grad, v, along * inverse, value=-1).mul_(g * inverse), along


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with ``W = g * V / ||V||`` per output row.

    Parameters are named ``weight_g`` ``(out, 1)`` and ``weight_v`` ``(out, in)`` like
    ``torch.nn.utils.weight_norm`` made them, so the original's head checkpoints load.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        reference = nn.Linear(in_features, out_features, bias=False)  # PyTorch's default init
        self.weight_v = nn.Parameter(reference.weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))

    @property
    def weight(self) -> Tensor:
        return normalized_rows(self.weight_v, self.weight_g)

    def forward(self, x: Tensor | Sequence[Tensor], fused: Fused | Sequence[Fused] = None) -> Any:
        """``x W^T``; with ``fused``, ``fused(x, W)`` instead (what is computed from the logits without
        writing them, here, in the layer's own call, where a sharding strategy has gathered its
        parameters). A tuple of inputs with a tuple of ``fused`` (one callable or ``None`` each) gives
        a tuple of results from one ``W``, normalised once (and, in the backward, its gradient's one pass)."""
        if isinstance(x, Tensor):
            return self.forward((x,), (fused,))[0]
        weight = self.weight
        return tuple(F.linear(part, weight) if then is None else then(part, weight) for part, then in zip(x, fused))


class DINOHead(nn.Module):
    """MLP ``D -> hidden -> hidden -> bottleneck`` (GELU), L2-normalise, prototypes ``-> K``.

    Input ``(..., D)`` backbone tokens; output ``(..., K)`` logits. Keys: ``mlp.{0,2,4}.*``,
    ``last_layer.weight_{g,v}``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        widths = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for index, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(width_in, width_out))
            if index < num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)

    def forward(self, x: Tensor | Sequence[Tensor], fused: Fused | Sequence[Fused] = None) -> Any:
        """Logits ``(..., K)``; with ``fused``, ``fused(features, prototypes)`` of the normalised
        bottleneck features and the prototype matrix ``(K, bottleneck)`` instead, for what never
        writes the logits (the student's fused loss, :func:`trainer.losses.prototype_cross_entropy`;
        the teacher's targets, :class:`trainer.losses.Targets`).

        A tuple of ``(rows, D)`` inputs with a tuple of ``fused`` (a callable or ``None`` each) gives a
        tuple of results from one pass: the head shared by DINO and iBOT takes the CLS tokens and the
        masked patches together, as the original does, so each layer is one larger matrix product
        (and, under a sharding strategy, one gather) and the prototype matrix is made once."""
        if isinstance(x, Tensor):
            return self.forward((x,), (fused,))[0]
        if len(x) != len(fused):
            raise ValueError(f"DINOHead takes one fused callable (or None) per input, got {len(fused)} for {len(x)}")
        rows = torch.cat(tuple(x)) if len(x) > 1 else x[0]
        bottleneck = F.normalize(self.mlp(rows), dim=-1, eps=1e-6 if rows.dtype == torch.float16 else 1e-12)
        return self.last_layer(bottleneck.split([part.shape[0] for part in x]), fused)
