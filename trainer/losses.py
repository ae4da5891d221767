"""The DINOv2 objective: DINO (CLS), iBOT (masked patches), KoLeo, and teacher normalisation;
plus the cosine losses of feature distillation (student features pulled to a frozen teacher's).

Notation: ``K`` prototypes, ``B`` images per rank, ``tau_s`` student temperature (0.1),
``tau_t`` teacher temperature (0.04 -> 0.07). A teacher *target* is a probability vector over
prototypes; each loss is a cross-entropy ``H(t, s) = -sum_k t_k log softmax(s / tau_s)_k``.

Cross-rank sums go through an injected ``all_reduce`` (a sum over ranks; the identity on one
process), so the maths here does not know how it is distributed.

Why the iBOT loss is fused with the head's prototype layer (:func:`prototype_cross_entropy`): its
logits are ``(masked patches, K)``, ~9,300 x 65,536 for a ViT-S/14 batch of 128, 1.2 GB in bf16
and 2.5 GB as fp32 targets, and autograd would keep the student's logits, the targets and the
logits' gradient alive into the backward, where the backbone's activations peak (5 GB of a 26 GB
step on an H100). Fused, a block of rows at a time goes from the bottleneck features to the
logits, the teacher's targets (under softmax centring made in the block from the teacher's own
bottleneck features and prototypes, so its logits are never written whole either), the loss and
the gradient of the features and of the prototypes, during the forward; only those two gradients
are kept. The matrix products are
the ones autograd would run. The DINO loss goes the same way for the CLS tokens of every crop
(``(2 + L) B`` rows, 1280 x 65,536 for ViT-S/14: 168 MB of bf16 logits, and the fp32 tail's
intermediates, no longer kept for the backward).

Why ``compiled``: the element-wise tails over those ``(rows, K)`` blocks (cast, temperature,
(log-)softmax, product, sum, gradient; the teacher's centred softmax; Sinkhorn-Knopp's three
iterations over its full matrix) pass over them many times eagerly. Compiled
(:func:`~trainer.models.compile.compile_function`, eager fallback), each becomes one or a few
fused kernels that read the logits once or twice: the same maths.

References: DINO (Caron et al. 2021), iBOT (Zhou et al. 2022), DINOv2 (Oquab et al. 2023),
KoLeo (Sablayrolles et al. 2019), SwAV's Sinkhorn-Knopp (Caron et al. 2020).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.models.compile import maybe_compiled

AllReduce = Callable[[Tensor], Tensor]


def no_reduce(tensor: Tensor) -> Tensor:
    """The all-reduce of a single process."""
    return tensor


def masked_positions(masks: Tensor, rows: int | None = None) -> Tensor:
    """``(M,)`` positions of the ``True`` entries of ``masks`` in ``masks.flatten()``, in order
    (``x.flatten(0, 1)[positions]`` selects what ``x[masks]`` selects); with ``rows``, padded to
    that many with the position of an unmasked patch, so that ``masks.flatten()[positions]`` is
    False exactly on the padding (the losses give those rows no weight and no target mass)."""
    flat = masks.flatten()
    positions = flat.nonzero().squeeze(1)
    if rows is None or rows == len(positions):
        return positions
    if rows < len(positions) or len(positions) == len(flat):
        raise ValueError(f"cannot pad the {len(positions)} masked of {len(flat)} patches to {rows} rows: allowed "
                         f"are at least as many as are masked, with an unmasked patch to pad with")
    unmasked = flat.to(torch.uint8).argmin()  # the first unmasked patch
    return torch.cat([positions, unmasked.expand(rows - len(positions))])


def centered_softmax(teacher_logits: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    """``softmax((t - c) / tau_t)`` per row, in fp32; ``(..., K)`` logits, ``(1, K)`` centre."""
    return F.softmax((teacher_logits.float() - center) / teacher_temp, dim=-1)


class DINOLoss(nn.Module):
    """Image-level loss on the CLS tokens with DINO's crop pairing, fused with the DINO head's
    prototype layer (:func:`prototype_cross_entropy`: the ``(crops x B, K)`` student logits are
    never written; the head calls this with its bottleneck features and prototypes,
    ``DINOHead.forward(x, fused=...)``).

    Every local crop is scored against both teacher global targets, and each student global crop
    against the teacher target of the *other* global crop (never its own view):

        L = [ sum_{l, g} mean_b H(t_g, s_l) + sum_{g != g'} mean_b H(t_g', s_g) ] / (2 L + 2)

    As ``H`` is linear in its target, a local crop's two terms are one, ``H(t_0 + t_1, s_l)``: each
    student row has one target row and weight ``1 / (B (2 L + 2))``.

    Shapes: features ``(C B, d)`` for ``C = 2 + L`` crops, crop-major, the two global crops first;
    prototypes ``(K, d)``; teacher targets ``(2, B, K)``. Returns a scalar. ``compiled``: see the
    module docstring.
    """

    def __init__(self, student_temp: float = 0.1, compiled: bool = False) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.tail = maybe_compiled(prototype_cross_entropy_tail, compiled)

    def forward(self, features: Tensor, prototypes: Tensor, teacher_probs: Tensor) -> Tensor:
        two, batch, width = teacher_probs.shape if teacher_probs.dim() == 3 else (0, 1, 0)
        crops, extra = divmod(features.shape[0], batch)
        if two != 2 or width != prototypes.shape[0] or extra or crops < 2:
            raise ValueError(
                f"expected teacher targets (2, B, K) for {prototypes.shape[0]} prototypes and student features "
                f"(C B, d) of C >= 2 crops, got {tuple(teacher_probs.shape)} and {tuple(features.shape)}"
            )
        # target rows: the other global crop's for each global crop, both globals' sum for the locals
        values = torch.cat([teacher_probs[1], teacher_probs[0], teacher_probs.sum(dim=0)])  # (3B, K)
        image = torch.arange(batch, device=features.device)
        index = torch.cat([image, image + batch, *(image + 2 * batch,) * (crops - 2)])  # (C B,)
        weights = features.new_full((features.shape[0],), 1.0 / (batch * 2 * (crops - 1)), dtype=torch.float32)
        return prototype_cross_entropy(features, prototypes, Targets(values, index=index), weights,
                                       self.student_temp, self.tail)


@dataclass
class Targets:
    """Teacher targets over ``K`` prototypes, one row per student row: probabilities ``values``
    ``(rows, K)`` (Sinkhorn-Knopp's, the centred softmax's), or, when ``prototypes`` ``(K, d)`` is
    set, the teacher's bottleneck features ``values`` ``(rows, d)``, whose targets
    ``softmax((f W^T - center) / temp)`` are left to be computed where they are used, a block of
    rows at a time (:func:`prototype_cross_entropy`): neither the teacher's logits nor fp32 targets
    of size ``(rows, K)`` are ever written whole. With ``index`` ``(rows,)``, student row ``r``'s
    target is made of ``values[index[r]]`` (DINO's crops sharing a teacher row), not copied per row."""

    values: Tensor
    prototypes: Tensor | None = None
    center: Tensor | None = None
    temp: float = 1.0
    index: Tensor | None = None

    def __post_init__(self) -> None:
        if (self.prototypes is None) != (self.center is None):
            raise ValueError("Targets takes probabilities alone, or features with both prototypes and a centre")

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, K)``."""
        width = self.values.shape[1] if self.prototypes is None else self.prototypes.shape[0]
        return (self.values if self.index is None else self.index).shape[0], width

    def cast(self, dtype: torch.dtype) -> Targets:
        """These targets with features and prototypes in ``dtype`` (cast once, not per block)."""
        if self.prototypes is None:
            return self
        return replace(self, values=self.values.to(dtype), prototypes=self.prototypes.to(dtype))

    def block(self, rows: slice) -> Tensor:
        """Rows ``rows`` of the probabilities, or of the teacher's logits (a product in the features'
        dtype: :meth:`cast` them first)."""
        values = self.values[rows] if self.index is None else self.values[self.index[rows]]
        return values if self.prototypes is None else values @ self.prototypes.T

    def tail_inputs(self, rows: slice) -> tuple[Tensor, Tensor | None]:
        """``(teacher, index)`` for :func:`prototype_cross_entropy_tail` on rows ``rows``: the
        probabilities shared by several rows stay whole with the rows' ``index`` into them (the tail
        gathers them as it reads, not into a ``(rows, K)`` copy first); else :meth:`block`."""
        if self.prototypes is None and self.index is not None:
            return self.values, self.index[rows]
        return self.block(rows), None

    def probs(self) -> Tensor:
        """The targets as one fp32 ``(rows, K)`` tensor."""
        if self.prototypes is None:
            return self.block(slice(None)).float()
        return centered_softmax(self.cast(self.values.dtype).block(slice(None)), self.center, self.temp)


def prototype_cross_entropy_tail(student_logits: Tensor, teacher: Tensor, center: Tensor | None, row_weights: Tensor,
                                 student_temp: float, teacher_temp: float,
                                 index: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """For a block of rows: ``sum_r w_r H(t_r, s_r)`` and its gradient with respect to the logits,

        H(t_r, s_r) = sum_k t_rk (lse_r - s_rk / tau_s),   lse_r = log sum_k exp(s_rk / tau_s),
        dL/ds_r = w_r (exp(s_r / tau_s - lse_r) m_r - t_r) / tau_s   (in the logits' dtype),

    with ``t = teacher`` (probabilities; rows ``teacher[index]`` given ``index``), target mass
    ``m_r = sum_k t_rk``, or, given ``center``, ``t = softmax((teacher - center) / tau_t)`` (``m_r = 1``).

    Why row statistics (``lse`` and the teacher's) rather than softmax and log-softmax tensors: every
    ``(rows, K)`` quantity is then an element-wise function of the inputs and per-row scalars, so
    compiled code recomputes it in its last pass over the row rather than writing fp32 targets and
    log-probabilities out and reading them back (inductor's code for centred targets: five passes
    over a row writing only the gradient, where the softmax form made six writing two fp32 buffers
    besides; ``benchmarks/loss_tail.py`` times it)."""
    s = student_logits.float() / student_temp
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    rows = teacher if index is None else teacher[index]
    grad = (s - lse).exp_()  # the student's softmax, made the gradient in place (eagerly: fewer passes)
    if center is None:
        targets = rows.float()
        grad.mul_(targets.sum(dim=-1, keepdim=True))
    else:
        logits = (rows.float() - center) / teacher_temp
        targets = logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True)).exp_()
    loss = (targets * (lse - s)).sum(dim=-1)
    grad.sub_(targets).mul_((row_weights.float() / student_temp).unsqueeze(1))
    return (loss * row_weights).sum(), grad.to(student_logits.dtype)


PATCH_LOSS_BLOCK_ELEMENTS = 2**26  # logits per block of rows in prototype_cross_entropy: 128 MB in bf16


def prototype_cross_entropy(features: Tensor, prototypes: Tensor, targets: Targets, row_weights: Tensor,
                            student_temp: float, tail: Callable[..., tuple[Tensor, Tensor]] = prototype_cross_entropy_tail,
                            block_rows: int | None = None) -> Tensor:
    """``sum_r w_r H(t_r, softmax(f_r W^T / tau_s))`` for features ``f`` ``(M, d)``, prototypes
    ``W`` ``(K, d)``, targets ``(M, K)`` and row weights ``w`` ``(M,)``, fused (module docstring):
    the logits exist one block of ``block_rows`` rows at a time (default: ``2**26 / K`` of them), and
    the gradients of ``f`` and ``W`` are computed with the loss. Under autocast the products run in
    its dtype, as ``F.linear`` would; ``tail`` computes a block's loss and logit gradient
    (:func:`prototype_cross_entropy_tail`, or its compiled version)."""
    if targets.shape != (features.shape[0], prototypes.shape[0]) or row_weights.shape != features.shape[:1]:
        raise ValueError(f"features {tuple(features.shape)} and prototypes {tuple(prototypes.shape)} need targets "
                         f"(rows, prototypes) and one weight per row, got {targets.shape} and "
                         f"{tuple(row_weights.shape)}")
    rows = block_rows or max(1, PATCH_LOSS_BLOCK_ELEMENTS // prototypes.shape[0])
    return _PrototypeCrossEntropy.apply(features, prototypes, targets, row_weights, student_temp, tail, rows)


class _PrototypeCrossEntropy(torch.autograd.Function):
    """:func:`prototype_cross_entropy`: the gradients are made in the forward and scaled in the backward."""

    @staticmethod
    def forward(ctx: Any, features: Tensor, prototypes: Tensor, targets: Targets, row_weights: Tensor,
                student_temp: float, tail: Callable[..., tuple[Tensor, Tensor]], block_rows: int) -> Tensor:
        device = features.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else features.dtype
        f, w, teacher = features.to(dtype), prototypes.to(dtype), targets.cast(dtype)
        total = features.new_zeros((), dtype=torch.float32)
        grad_features = torch.empty_like(features)
        grad_prototypes = torch.zeros_like(prototypes, dtype=torch.float32)
        for start in range(0, features.shape[0], block_rows):
            block = slice(start, start + block_rows)
            rows, index = teacher.tail_inputs(block)
            loss, grad_logits = tail(f[block] @ w.T, rows, targets.center, row_weights[block], student_temp,
                                     targets.temp, index)
            total += loss
            grad_features[block] = grad_logits @ w
            grad_prototypes += grad_logits.T @ f[block]
        ctx.save_for_backward(grad_features, grad_prototypes.to(prototypes.dtype))
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        grad_features, grad_prototypes = ctx.saved_tensors
        return grad_features * grad_output, grad_prototypes * grad_output, None, None, None, None, None


class IBOTPatchLoss(nn.Module):
    """Masked-patch loss: each masked patch of a student crop learns the teacher's target for
    the same (unmasked) patch. Patches are weighted ``1 / #masked`` within their crop, and the
    sum is divided by the number of crops, masked or not:

        L = -(1 / C) sum_c (1 / M_c) sum_{p masked in c} sum_k t_{c,p,k} log softmax(s_{c,p} / tau_s)_k

    with the student logits ``s = f W^T`` of the head's bottleneck features ``f`` ``(M, d)`` and
    prototypes ``W`` ``(K, d)``, computed fused (:func:`prototype_cross_entropy`): the head calls
    this with ``f`` and ``W`` (``DINOHead.forward(x, fused=...)``). Targets ``(M, K)`` for the
    ``M = masks.sum()`` masked patches in ``masks[masks]`` order; ``masks`` ``(C, N)`` bool;
    ``mask_index`` ``(M,)`` their positions in ``masks.flatten()`` (given, nothing waits for the GPU
    to count the masks; else derived). ``compiled``: see the module docstring.
    """

    def __init__(self, student_temp: float = 0.1, compiled: bool = False) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.tail = maybe_compiled(prototype_cross_entropy_tail, compiled)

    def forward(self, features: Tensor, prototypes: Tensor, targets: Targets, masks: Tensor,
                mask_index: Tensor | None = None) -> Tensor:
        index = masked_positions(masks) if mask_index is None else mask_index
        if features.shape[0] != len(index) or targets.shape != (len(index), prototypes.shape[0]):
            raise ValueError(
                f"{len(index)} masked patches but student features {tuple(features.shape)} and teacher targets "
                f"{targets.shape} for {prototypes.shape[0]} prototypes"
            )
        per_crop = masks.sum(dim=1).clamp(min=1)  # (C,)
        valid = masks.flatten()[index]  # (M,): False on rows padding the index (masked_positions' rows)
        weights = valid / per_crop[index // masks.shape[1]] / masks.shape[0]  # (M,): 1 / (C x masked in its crop)
        return prototype_cross_entropy(features, prototypes, targets, weights, self.student_temp, self.tail)


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy estimator: spreads features over the sphere.

        L = -(1 / B) sum_i log( || x_i - x_{nn(i)} || + eps ),   x L2-normalised,

    where ``nn(i)`` is the most similar other vector of the batch. Computed in fp32. Input
    ``(B, D)`` (one crop's CLS tokens on one rank); returns a scalar.
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, features: Tensor) -> Tensor:
        if features.shape[0] < 2:
            raise ValueError(f"KoLeo needs at least 2 vectors, got {features.shape[0]}")
        with torch.autocast(features.device.type, enabled=False):
            x = F.normalize(features.float(), dim=-1, eps=self.eps)
            similarity = x @ x.T  # (B, B)
            similarity.fill_diagonal_(-2.0)  # a vector is never its own neighbour
            neighbour = similarity.argmax(dim=1)
            distance = (x - x[neighbour]).norm(dim=-1)
            return -torch.log(distance + self.eps).mean()


class SoftmaxCentering(nn.Module):
    """Teacher targets ``softmax((t - c) / tau_t)`` with a running centre ``c``.

    ``c`` is an EMA (momentum 0.9) of the mean teacher logits over all ranks; it is updated
    only by an explicit :meth:`update` call after the targets of a step are computed, or, between
    :meth:`hold` and :meth:`release`, once for all the updates made in between: a step's
    micro-batches (gradient accumulation) then move it once, by their union's mean, as one batch
    would, where a move each would take the momentum to ``0.9 ** micro-batches`` a step.
    ``compiled``: see the module docstring.
    """

    def __init__(self, num_prototypes: int, momentum: float = 0.9, compiled: bool = False) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, num_prototypes))
        self.softmax = maybe_compiled(centered_softmax, compiled)
        self._held: list[tuple[Tensor, int | Tensor]] | None = None  # (column sums, rows) while held

    def hold(self) -> None:
        """Keep the updates from now on, to apply them as one at :meth:`release`."""
        self._held = []

    @torch.no_grad()
    def release(self, all_reduce: AllReduce = no_reduce, apply: bool = True) -> None:
        """Move the centre once by every update kept since :meth:`hold` (``apply=False``: drop them)."""
        held, self._held = self._held, None
        if apply and held:
            totals, rows = zip(*held)
            self.update_with_sum(torch.stack(totals).sum(dim=0), sum(rows), all_reduce)

    def forward(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        return self.softmax(teacher_logits, self.center, teacher_temp)

    @torch.no_grad()
    def update(self, teacher_logits: Tensor, all_reduce: AllReduce = no_reduce) -> None:
        """``c <- m c + (1 - m) mean(t)`` with the mean over every rank's rows."""
        flat = teacher_logits.reshape(-1, teacher_logits.shape[-1])
        self.update_with_sum(flat.sum(dim=0, keepdim=True, dtype=torch.float32), flat.shape[0], all_reduce)  # no fp32 copy

    @torch.no_grad()
    def update_with_sum(self, total: Tensor, rows: int | Tensor, all_reduce: AllReduce = no_reduce) -> None:
        """:meth:`update` from this rank's column sums ``(1, K)`` of its ``rows`` teacher logits (for
        logits never written whole: ``sum_r f_r W^T = (sum_r f_r) W^T``; ``rows`` a device scalar when
        only the device knows it). No rows on any rank (a step with no masked patch) leave the centre
        as it is, decided on the device."""
        if self._held is not None:
            self._held.append((total.float(), rows))
            return
        count = all_reduce(rows.float() if isinstance(rows, Tensor)
                           else torch.full((), float(rows), device=total.device))  # a fill, not a copy
        moved = self.center * self.momentum + all_reduce(total.float()) / count.clamp(min=1) * (1 - self.momentum)
        self.center.copy_(torch.where(count > 0, moved, self.center))


def cosine_distance(student: Tensor, teacher: Tensor, eps: float = 1e-8) -> Tensor:
    """``1 - cos(s, t)`` per row, in fp32; shapes ``(..., D) -> (...)``."""
    with torch.autocast(student.device.type, enabled=False):
        s = F.normalize(student.float(), dim=-1, eps=eps)
        t = F.normalize(teacher.float(), dim=-1, eps=eps)
        return 1.0 - (s * t).sum(dim=-1)


class CLSFeatureLoss(nn.Module):
    """Feature distillation on the image embedding: every student crop's (projected) CLS token is
    pulled, in cosine, to the frozen teacher's CLS token of the global crops.

    A global crop learns the teacher's view of the *same* crop (no swap as in DINO: the target is
    a fixed function of those pixels, so the same crop is the exact target). A local crop is not
    seen by the teacher (running it on the L locals would cost L more teacher passes, and a small
    part is meant to predict the whole image's embedding, DINO's local-to-global pairing); it lies
    anywhere in the image, in both, one or neither global crop, so neither view is *its* target
    and it learns the average over both views (DINO's pairing of each local with both globals,
    with half the noise of picking one). Each student crop counts once:

        L = [ sum_g mean_b (1 - cos(s_gb, t_gb)) + sum_l mean_b (1/2) sum_g (1 - cos(s_lb, t_gb)) ] / (2 + L)

    Shapes: student globals ``(2, B, D)``, student locals ``(L, B, D)`` (L may be 0), teacher
    ``(2, B, D)``, with ``D`` the teacher's width (the student's CLS projected to it). Returns a
    scalar in ``[0, 2]``. Reference: FitNets (Romero et al. 2015) regress a teacher's features
    through a learned projection of the student's; here the regression is in cosine.
    """

    def forward(self, student_global: Tensor, student_local: Tensor | None, teacher: Tensor) -> Tensor:
        if student_global.shape[0] != 2 or teacher.shape != student_global.shape:
            raise ValueError(f"expected 2 global crops for student {tuple(student_global.shape)} and teacher "
                             f"{tuple(teacher.shape)} with equal shapes (2, B, D)")
        total = cosine_distance(student_global, teacher).mean(dim=1).sum()  # same crop, no swap
        crops = 2
        if student_local is not None and len(student_local):
            # (L, 1, B, D) x (1, 2, B, D): every local crop against both teacher global crops
            local = cosine_distance(student_local.unsqueeze(1), teacher.unsqueeze(0))  # (L, 2, B)
            total = total + local.mean(dim=(1, 2)).sum()
            crops += len(student_local)
        return total / crops


class PatchFeatureLoss(nn.Module):
    """Feature distillation on patch tokens: each student patch (projected) is pulled, in cosine,
    to the teacher's token of the same patch of the same crop, every patch weighted alike:

        L = (1 / (C N)) sum_{c, p} (1 - cos(s_cp, t_cp))

    Shapes: student and teacher ``(C, N, D)`` (C crops of N patches, the teacher's width D).
    Returns a scalar in ``[0, 2]``.
    """

    def forward(self, student_patches: Tensor, teacher_patches: Tensor) -> Tensor:
        if student_patches.shape != teacher_patches.shape or student_patches.dim() != 3:
            raise ValueError(f"student patches {tuple(student_patches.shape)} and teacher patches "
                             f"{tuple(teacher_patches.shape)} must have equal shapes (C, N, D)")
        return cosine_distance(student_patches, teacher_patches).mean()


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: Tensor, teacher_temp: float, iterations: int = 3, all_reduce: AllReduce = no_reduce,
    valid: Tensor | None = None,
) -> Tensor:
    """Teacher targets by Sinkhorn-Knopp: an (approximately) equipartitioned soft assignment.

    ``Q = exp(t / tau_t)^T`` (K x B_total, fp32) is scaled alternately so that each prototype row
    sums to ``1/K`` and each sample column to ``1/B_total``; after the final column step each
    sample's column is rescaled to sum 1. ``B_total`` counts rows on all ranks (for iBOT, the
    masked patches). The logits are assumed bounded (weight-normalised head), as in the original.
    Input ``(B, K)``; output ``(B, K)`` with rows summing to 1. ``valid`` ``(B,)`` bool: only those
    rows take part (the rows padding the masked patches to a fixed count are left out of every sum
    and get zero targets), so the result on the valid rows is that of the valid rows alone.
    """
    q = torch.exp(teacher_logits.float() / teacher_temp).T  # (K, B)
    num_prototypes = q.shape[0]
    if valid is None:
        num_samples = all_reduce(torch.full((), float(q.shape[1]), device=q.device))  # a fill, not a copy
    else:
        q = torch.where(valid, q, 0.0)
        num_samples = all_reduce(valid.sum().float())
    tiny = torch.finfo(torch.float32).tiny  # 0 / tiny = 0 where there are no rows (padding, a rank without any)
    q = q / all_reduce(q.sum()).clamp(min=tiny)
    for _ in range(iterations):
        q = q / all_reduce(q.sum(dim=1, keepdim=True)).clamp(min=tiny) / num_prototypes  # rows -> 1/K
        q = q / q.sum(dim=0, keepdim=True).clamp(min=tiny) / num_samples.clamp(min=1)  # columns -> 1/B_total
    return (q * num_samples).T
