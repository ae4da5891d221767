"""The pretraining engine: models, one training step, the loop, and exact checkpoints.

Why this shape: the step is a plain function of (networks, objective, batch, schedule values,
optimiser); setup builds those once; the loop only orders things (nanoGPT's order: schedule ->
evaluate/checkpoint -> micro-steps -> clip -> step -> EMA -> log). Randomness of step ``i``
(augmentation, masks, stochastic depth) is seeded from ``(seed, i)``, so a run resumed at step
``i`` draws exactly what an uninterrupted run draws, and the checkpoint needs no RNG state
beyond the step.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinoflow.config import PretrainConfig, to_yaml
from dinoflow.progress import progress
from dinoflow.storage import Storage, join_uri
from dinoflow.tracking import TAG_HEALTH, NullTracker, Tracker
from trainer.data.augment import MultiCrop
from trainer.data.datasets import BadImageTracker
from trainer.data.masking import masked_patch_bound, sample_crop_masks
from trainer.health import CollapseWatch, target_health
from trainer.losses import (
    AllReduce,
    DINOLoss,
    IBOTPatchLoss,
    KoLeoLoss,
    SoftmaxCentering,
    Targets,
    masked_positions,
    no_reduce,
    sinkhorn_knopp,
)
from trainer.models.compile import compile_blocks, compiled_now, maybe_compiled
from trainer.models.heads import DINOHead, Fused
from trainer.models.hub import load_strict, read_weights, save_backbone
from trainer.models.vit import DinoVisionTransformer, build_vit
from trainer.schedules import ScheduleValues, schedule_values, total_steps
from trainer.strategy import Strategy, build_strategy, local_tensor

_log = logging.getLogger(__name__)
CURVE_POINTS = 1000  # rows of step metrics a run keeps for its training curves (TrainState.record)
CURVES_FILE = "training_curves.png"
T = TypeVar("T")


class SSLNetwork(nn.Module):
    """A backbone with its DINO head and iBOT head (the same module when shared)."""

    def __init__(self, backbone: DinoVisionTransformer, dino_head: DINOHead, ibot_head: DINOHead | None) -> None:
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        self.ibot_head = ibot_head  # None: iBOT uses dino_head

    def heads(self, cls: Tensor, patches: Tensor, cls_fused: Fused = None,
              patch_fused: Fused = None) -> tuple[Any, Any]:
        """The DINO head on ``cls`` tokens and the iBOT head on ``patches`` (``(rows, D)`` each), each
        result ``fused`` as :meth:`DINOHead.forward` says. A shared head takes both in one call (one
        pass of its MLP over all rows, the prototype matrix made once); without patches (no masked
        patch this step) it runs on ``cls`` only and the patch result is ``None``."""
        if not len(patches):
            return self.dino_head(cls, cls_fused), None
        if self.ibot_head is None:
            return self.dino_head((cls, patches), (cls_fused, patch_fused))
        return self.dino_head(cls, cls_fused), self.ibot_head(patches, patch_fused)


def build_backbone(cfg: PretrainConfig, drop_path: bool = True) -> DinoVisionTransformer:
    """The backbone of a recipe; the position table is sized for the global crop."""
    m = cfg.model
    overrides = {k: v for k, v in (("embed_dim", m.embed_dim), ("depth", m.depth),
                                   ("num_heads", m.num_heads), ("ffn_layer", m.ffn_layer)) if v is not None}
    return build_vit(
        m.arch, num_register_tokens=m.num_register_tokens, img_size=cfg.crops.global_crop_size,
        patch_size=m.patch_size, layerscale_init=m.layerscale_init,
        drop_path_rate=m.drop_path_rate if drop_path else 0.0, drop_path_uniform=m.drop_path_uniform,
        **overrides,
    )


def build_networks(cfg: PretrainConfig) -> tuple[SSLNetwork, SSLNetwork]:
    """Student (with stochastic depth) and teacher (without; starts as a copy, never trained);
    with ``model.compile_blocks`` the blocks of each are compiled (:func:`compile_blocks`, lazily:
    at their first call, wherever the networks are moved or sharded to before it)."""
    h = cfg.heads

    def network(drop_path: bool) -> SSLNetwork:
        backbone = build_backbone(cfg, drop_path)
        dino = DINOHead(backbone.embed_dim, h.num_prototypes, h.hidden_dim, h.bottleneck_dim, h.num_layers)
        ibot = (DINOHead(backbone.embed_dim, h.ibot_num_prototypes, h.hidden_dim, h.ibot_bottleneck_dim, h.num_layers)
                if h.ibot_separate_head else None)
        return SSLNetwork(backbone, dino, ibot)

    student = network(drop_path=True)
    teacher = network(drop_path=False)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    if cfg.model.compile_blocks:
        for network in (student, teacher):  # a group each: a deep copy of one never reaches the other
            compile_blocks(network.backbone.blocks, mode=cfg.model.compile_mode)
    return student, teacher.eval()


class Objective(nn.Module):
    """The DINOv2 loss terms and the teacher-target normalisation state (centres).

    ``all_reduce`` (a sum over ranks) makes Sinkhorn-Knopp and the centre see every rank's rows.
    """

    def __init__(self, cfg: PretrainConfig, all_reduce: AllReduce = no_reduce) -> None:
        super().__init__()
        self.cfg = cfg.loss
        self.all_reduce = all_reduce
        compiled = cfg.loss.compile
        self.dino = DINOLoss(cfg.loss.student_temp, compiled)
        self.ibot = IBOTPatchLoss(cfg.loss.student_temp, compiled)
        self.koleo = KoLeoLoss()
        ibot_prototypes = cfg.heads.ibot_num_prototypes if cfg.heads.ibot_separate_head else cfg.heads.num_prototypes
        self.dino_center = SoftmaxCentering(cfg.heads.num_prototypes, compiled=compiled)
        self.ibot_center = SoftmaxCentering(ibot_prototypes, compiled=compiled)
        self.sinkhorn_knopp = maybe_compiled(sinkhorn_knopp, compiled)

    def tails_compiled(self) -> bool:
        """Whether every loss tail compiled by ``loss.compile`` still runs compiled (no fallback)."""
        tails = (self.dino.tail, self.ibot.tail, self.dino_center.softmax, self.ibot_center.softmax,
                 self.sinkhorn_knopp)
        return all(compiled_now(tail) for tail in tails)

    def targets(self, logits: Tensor, center: SoftmaxCentering, temp: float) -> Tensor:
        """Teacher probabilities: Sinkhorn-Knopp, or softmax centering (then the centre moves)."""
        if self.cfg.centering == "sinkhorn_knopp":
            return self.sinkhorn_knopp(logits, temp, all_reduce=self.all_reduce)
        probs = center(logits, temp)
        center.update(logits, self.all_reduce)
        return probs

    def patch_targets(self, features: Tensor, prototypes: Tensor, temp: float, valid: Tensor | None = None) -> Targets:
        """The iBOT teacher targets of the teacher head's bottleneck ``features`` ``(M, d)`` and
        ``prototypes`` ``(K, d)`` (the head calls this: ``DINOHead.forward(x, fused=...)``):
        Sinkhorn-Knopp's probabilities, or for softmax centring the features, prototypes and the
        centre before this step's update, their logits and softmax left to the fused loss; the centre
        moves by the logits' column sums, ``(sum_r f_r) W^T``, without writing the logits. Only the
        ``valid`` ``(M,)`` rows (all by default) count: the others pad the masked patches to a fixed
        count (:func:`masked_positions`) and carry no weight in the loss."""
        if self.cfg.centering == "sinkhorn_knopp":
            logits = F.linear(features, prototypes)  # under the step's autocast, as the head's own product
            return Targets(self.sinkhorn_knopp(logits, temp, all_reduce=self.all_reduce, valid=valid))
        targets = Targets(features, prototypes, self.ibot_center.center.clone(), temp)
        with torch.autocast(features.device.type, enabled=False):
            kept = features.float() if valid is None else torch.where(valid.unsqueeze(1), features.float(), 0.0)
            total = kept.sum(dim=0, keepdim=True) @ prototypes.float().T  # (1, K)
        self.ibot_center.update_with_sum(total, features.shape[0] if valid is None else valid.sum(), self.all_reduce)
        return targets


@dataclass
class CropBatch:
    """One micro-batch: crops ``(2, B, 3, G, G)`` / ``(L, B, 3, l, l)``, masks ``(2B, N)``, and
    ``mask_index`` ``(M,)``: the masked patches' positions in ``masks.flatten()``, in order, then
    (from :func:`make_batch`) an unmasked patch's position up to the recipe's fixed ``M``.

    Why the index: selecting the masked patches with it (``tokens.flatten(0, 1)[mask_index]``)
    has a size known on the host; a boolean mask's selection must wait for the GPU to count its
    ``True``s. Why padded: the same ``M`` every step (:func:`~trainer.data.masking.masked_patch_bound`)
    gives the iBOT heads and losses static shapes, so compiled code and CUDA graphs are built once,
    not again for each count; the padding rows (``masks.flatten()[mask_index]`` False) get no weight
    and no target mass. Built with the masks on the host it costs nothing; left out, it is derived
    here, unpadded.
    """

    global_crops: Tensor
    local_crops: Tensor
    masks: Tensor
    mask_index: Tensor | None = None

    def __post_init__(self) -> None:
        if self.mask_index is None:
            self.mask_index = masked_positions(self.masks)


def train_step(
    student: SSLNetwork,
    teacher: SSLNetwork,
    objective: Objective,
    micro_batches: list[CropBatch],
    sched: ScheduleValues,
    optimizer: torch.optim.Optimizer,
    clip_grad: float,
    autocast_dtype: torch.dtype | None = None,
    strategy: Strategy | None = None,
    while_waiting: Callable[[], None] | None = None,
) -> dict[str, float]:
    """One optimiser step over ``micro_batches`` (gradient accumulation), then the EMA update.

    Returns the loss terms and ``total``, and the ``health_*`` figures (:func:`loss_terms`),
    averaged over micro-batches (and over ranks under ``strategy``), for logging.
    ``while_waiting`` is called once, after the step's device work is queued and before the host
    waits for it (reading the losses): the loop prepares the next step's batch there, so
    that the host's share of it (loading, launching the augmentation, drawing the block masks)
    runs while the device computes this step instead of leaving the device idle between steps.
    Nothing after the call draws random numbers, so the streams are those of a step-by-step loop.
    """
    strategy = strategy or Strategy()
    begin_step(optimizer, sched)
    weights = objective.cfg
    device_type = micro_batches[0].global_crops.device.type
    values = []  # per micro-batch: the terms and the total, read on the host once, below
    for batch in micro_batches:
        with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            terms = loss_terms(student, teacher, objective, batch, sched.teacher_temp)
        loss = (weights.dino_weight * terms["dino"] + weights.ibot_weight * terms["ibot"]
                + weights.koleo_weight * terms["koleo"])
        strategy.backward(loss / len(micro_batches))
        values.append(torch.stack([value.detach().float() for value in (*terms.values(), loss)]))
    losses = torch.stack(values)  # (micro-batches, terms + total)
    modules = [m for m in (student.backbone, student.dino_head, student.ibot_head) if m is not None]
    ema = functools.partial(ema_update, teacher, student, sched.teacher_momentum)
    return strategy.mean(finish_step(losses, [*terms, "total"], optimizer, modules, clip_grad, ema, strategy,
                                     while_waiting))


def finish_step(losses: Tensor, names: list[str], optimizer: torch.optim.Optimizer, modules: list[nn.Module],
                clip_grad: float, ema: Callable[[], None], strategy: Strategy,
                while_waiting: Callable[[], None] | None = None) -> dict[str, float]:
    """The end of a training step once its backward is queued: each of ``modules``' gradients
    clipped to norm ``clip_grad`` (if positive), the optimiser step, ``ema()``, and the loss terms
    ``(micro-batches, names)`` averaged and read on the host, ``while_waiting()`` just before.

    Why one read, and where: it is the step's one wait for the GPU. A fused AdamW in one process
    skips a non-finite step on the device (its ``found_inf``), so there the read comes after the
    update and the EMA are queued, and the lead the host built during the backward covers their
    launches; elsewhere it comes before the weights change. Either way a non-finite loss raises
    ``FloatingPointError`` with every weight as it was."""
    skip_on_device = type(strategy) is Strategy and bool(optimizer.param_groups[0].get("fused"))
    if not skip_on_device:
        totals = _read_losses(losses, names, while_waiting)
    if clip_grad > 0:
        for module in modules:
            strategy.clip_grad_norm_(module.parameters(), clip_grad)
    if skip_on_device:
        optimizer.found_inf = (~losses.isfinite().all()).float()  # 1: the fused kernel leaves every weight as it is
    strategy.step(optimizer)
    ema()
    if skip_on_device:
        totals = _read_losses(losses, names, while_waiting)  # a non-finite step raises here, the student unchanged
    return totals


def begin_step(optimizer: torch.optim.Optimizer, sched: ScheduleValues) -> None:
    """Start an optimiser step: this step's learning rates and weight decays into ``optimizer``'s
    groups (:func:`param_groups`), and a new iteration for compiled blocks' CUDA graphs
    (``model.compile_mode``), whose next replays may then reuse the memory of the last step's outputs."""
    torch.compiler.cudagraph_mark_step_begin()
    for group in optimizer.param_groups:
        group["lr"] = (sched.last_layer_lr if group["is_last_layer"] else sched.lr) * group["lr_multiplier"]
        group["weight_decay"] = sched.weight_decay * group["wd_multiplier"]


def _read_losses(losses: Tensor, names: list[str], first: Callable[[], None] | None = None) -> dict[str, float]:
    """The micro-batches' loss terms ``(micro-batches, terms)`` averaged, read on the host after
    calling ``first`` (the host's work to do before it waits); raises ``FloatingPointError`` naming
    the terms if any is not finite."""
    if first is not None:
        first()
    rows = losses.tolist()
    for row in rows:
        if not all(math.isfinite(value) for value in row):
            raise FloatingPointError(f"loss is {row[-1]} ({dict(zip(names[:-1], row[:-1]))})")
    return {name: sum(row[i] for row in rows) / len(rows) for i, name in enumerate(names)}


def crop_outputs(backbone: nn.Module, batch: CropBatch, masked: bool = True) -> list[dict[str, Tensor]]:
    """``backbone``'s outputs on the global crops (masked by ``batch.masks`` if ``masked``) and, if
    there are any, the local crops: both groups in one packed pass, each group crop-major."""
    groups = [batch.global_crops.flatten(0, 1)]  # (2B, 3, G, G)
    if len(batch.local_crops):
        groups.append(batch.local_crops.flatten(0, 1))  # (LB, 3, l, l)
    masks = [batch.masks if masked else None] + [None] * (len(groups) - 1)
    return backbone.forward_features_list(groups, masks)


def loss_terms(student: SSLNetwork, teacher: SSLNetwork, objective: Objective, batch: CropBatch,
               teacher_temp: float) -> dict[str, Tensor]:
    """One micro-batch's unweighted DINO, iBOT and KoLeo terms: the teacher's targets (no grad) from
    the global crops, the student's forward on all crops, each head fused with its loss; and, as
    ``health_*`` entries that are no loss (no gradient, no weight), :func:`~trainer.health.target_health`'s
    figures of the teacher's CLS targets and embeddings, read on the host with the losses."""
    globals_ = batch.global_crops.flatten(0, 1)  # (2B, 3, G, G), crop-major
    masks, index = batch.masks, batch.mask_index  # (2B, N), (M,)
    valid = masks.flatten()[index]  # (M,): False on the rows padding the index to a fixed count
    num_images = batch.global_crops.shape[1]
    with torch.no_grad():
        seen = teacher.backbone.forward_features(globals_)
        cls_logits, teacher_patch = teacher.heads(  # (2B, K), targets of the masked patches (M, K)
            seen["x_norm_clstoken"], seen["x_norm_patchtokens"].flatten(0, 1)[index],
            patch_fused=functools.partial(objective.patch_targets, temp=teacher_temp, valid=valid))
        teacher_cls = objective.targets(cls_logits, objective.dino_center, teacher_temp)  # (2B, K)
    outputs = crop_outputs(student.backbone, batch)
    global_cls = outputs[0]["x_norm_clstoken"]  # (2B, D)
    every_cls = torch.cat([output["x_norm_clstoken"] for output in outputs])  # (CB, D), crop-major
    # both heads' prototype layers fused with their losses: no (rows, K) student logits are kept
    dino, ibot = student.heads(
        every_cls, outputs[0]["x_norm_patchtokens"].flatten(0, 1)[index],
        cls_fused=functools.partial(objective.dino, teacher_probs=teacher_cls.view(2, num_images, -1)),
        patch_fused=functools.partial(objective.ibot, targets=teacher_patch, masks=masks, mask_index=index))
    return {
        "dino": dino,
        "ibot": ibot if ibot is not None else global_cls.sum() * 0,
        "koleo": sum(objective.koleo(crop) for crop in global_cls.view(2, num_images, -1)),
        **{f"health_{name}": value for name, value in target_health(teacher_cls, seen["x_norm_clstoken"]).items()},
    }


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher <- m * teacher + (1 - m) * student`` for every parameter; on sharded networks,
    on this rank's shards only (student and teacher are sharded alike)."""
    teacher_params = [local_tensor(p) for p in teacher.parameters()]
    student_params = [local_tensor(p) for p in student.parameters()]
    torch._foreach_lerp_(teacher_params, student_params, 1 - momentum)  # one pass: t + (1 - m)(s - t)


def param_groups(student: SSLNetwork, cfg: PretrainConfig) -> list[dict[str, Any]]:
    """AdamW groups by (lr multiplier, weight-decay multiplier, last layer).

    Layer-wise decay ``r^(depth + 1 - layer)`` (embeddings are layer 0, heads and the final
    norm ``depth + 1``), patch embedding x ``patch_embed_lr_mult``; no weight decay on biases,
    norms and LayerScale gammas; the heads' prototype layers follow the last-layer schedule.
    """
    depth = student.backbone.depth
    groups: dict[tuple[float, float, bool], list[nn.Parameter]] = {}
    for name, parameter in student.named_parameters():
        if not parameter.requires_grad:
            continue
        layer = depth + 1
        if name.startswith("backbone."):
            inner = name.removeprefix("backbone.")
            if inner.startswith(("cls_token", "pos_embed", "mask_token", "register_tokens", "patch_embed")):
                layer = 0
            elif inner.startswith("blocks."):
                layer = int(inner.split(".")[1]) + 1
        lr_mult = cfg.optim.layerwise_decay ** (depth + 1 - layer)
        if "patch_embed" in name:
            lr_mult *= cfg.optim.patch_embed_lr_mult
        wd_mult = 0.0 if name.endswith(".bias") or "norm" in name or "gamma" in name else 1.0
        groups.setdefault((lr_mult, wd_mult, "last_layer" in name), []).append(parameter)
    return [{"params": params, "lr_multiplier": lr, "wd_multiplier": wd, "is_last_layer": last}
            for (lr, wd, last), params in groups.items()]


def training_autocast(device: torch.device) -> torch.dtype | None:
    """The autocast dtype training runs under on ``device``: bf16 on CUDA (Sinkhorn-Knopp and the
    softmaxes stay fp32 in the losses), none (fp32) on CPU, where bf16 matmuls are slow."""
    return torch.bfloat16 if device.type == "cuda" else None


def use_fused_adamw(cfg: PretrainConfig, device: torch.device) -> bool:
    """Whether AdamW runs torch's fused kernel (``optim.fused_adamw``) on parameters on ``device``.

    ``auto`` fuses on CUDA, where one kernel per device and dtype does the whole update that
    torch's default foreach path spreads over several launches, and keeps torch's default elsewhere.
    Under ``distributed.strategy=deepspeed`` ``auto`` does not fuse: ZeRO-3 steps the optimizer on
    its own flat fp32 partitions, and that combination has been checked on CPU only (2 ranks train
    like one fused process; see ``DeepSpeedStrategy.load_optimizer_state`` for where fused keeps its
    ``step``), not on GPUs; ``on`` asks for it explicitly.
    """
    if cfg.optim.fused_adamw == "auto":
        return device.type == "cuda" and cfg.distributed.strategy != "deepspeed"
    return cfg.optim.fused_adamw == "on"


def build_adamw(student: nn.Module, cfg: PretrainConfig, device: torch.device) -> torch.optim.AdamW:
    """The training AdamW: :func:`param_groups` of ``student`` (parameters on ``device``), the
    recipe's betas, fused per :func:`use_fused_adamw` (the choice is logged). "Not fused" passes
    ``fused=None``, torch's default (foreach where it applies), never ``False``, which would force
    the slow per-tensor loop."""
    fused = use_fused_adamw(cfg, device)
    _log.info("AdamW on %s: %s (optim.fused_adamw=%s)", device, "fused" if fused else "torch default",
              cfg.optim.fused_adamw)
    return torch.optim.AdamW(param_groups(student, cfg), betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2),
                             fused=True if fused else None)


def with_kernel_choice(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A checkpoint's optimizer ``state`` carrying ``optimizer``'s kernel choice (``fused``,
    ``foreach``) in its param groups, to load into ``optimizer``.

    Why: torch's ``load_state_dict`` takes every group setting from the checkpoint, so a run
    resumed with another ``optim.fused_adamw`` or on another device (or from a checkpoint written
    before the option existed) would silently keep the writer's kernel, and torch places each
    ``step`` counter by the flag it loads (fused: on the parameter's device; else on the CPU)."""
    choice = {key: optimizer.param_groups[0][key] for key in ("fused", "foreach")}
    return {**state, "param_groups": [{**group, **choice} for group in state["param_groups"]]}


def make_batch(images: Tensor, step: int, cfg: PretrainConfig, multi_crop: MultiCrop,
               strategy: Strategy | None = None) -> CropBatch:
    """Crops and masks for uint8 images; random draws are seeded from ``(seed, step)``.

    Under ``strategy`` the masks are drawn for the global batch (every rank draws the same) and
    this rank keeps its images' rows, so masking does not depend on how the batch is split. The
    masked patches' index is padded to the most this rank's crops can hold (:class:`CropBatch`).
    """
    strategy = strategy or Strategy()
    global_crops, local_crops = multi_crop(images)
    grid = global_crops.shape[-1] // cfg.model.patch_size
    rng = np.random.default_rng([cfg.seed, step])
    global_images = len(images) * strategy.world_size
    ratios = (cfg.loss.mask_ratio_min, cfg.loss.mask_ratio_max)
    masks, _ = sample_crop_masks(2 * global_images, grid, grid, rng, cfg.loss.mask_probability, ratios)
    masks = masks.view(2, global_images, -1)[:, strategy.rank_slice(global_images)].flatten(0, 1)  # (2B, N)
    rows = masked_patch_bound(2 * global_images, grid * grid, cfg.loss.mask_probability, ratios, kept=len(masks))
    index = masked_positions(masks, rows)  # on the host: no wait for the GPU
    return CropBatch(global_crops, local_crops, to_device_async(masks, images.device),
                     to_device_async(index, images.device))


@dataclass
class PreparedStep:
    """A step's micro-batches, its images on this rank, and the bad-image tally once they were read
    (:class:`BadImageTracker.summary`), which is the one its checkpoint keeps: the loop reads the
    next step's images before this step's checkpoint is written."""

    micro_batches: list[CropBatch]
    images: int
    bad_images: dict[str, Any]


def settle(future: Future[Any], make: Callable[[int], Any], step: int) -> None:
    """``make(step)``'s result or exception into ``future``: raised where the result is used, so
    that an error in preparing the next step (a data set with too many bad images) stops the run
    where a step-by-step loop would, after this step's checkpoint."""
    try:
        future.set_result(make(step))
    except Exception as error:  # noqa: BLE001 - handed over whole, raised by future.result()
        future.set_exception(error)


def streams_kept(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """A block after which torch's random streams (the CPU's, and ``device``'s on CUDA) are as
    they were before it. Why: the loop draws the next step's crops in the step's wait, before an
    evaluation runs, so one drawing random numbers would otherwise move the stream the next step's
    stochastic depth reads."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


class SideStream:
    """The next step's batch made on a second CUDA stream (``data.side_stream``).

    Why: the loop prepares the next batch in the step's wait (:func:`train_step`'s
    ``while_waiting``), but on the step's own stream its kernels (the augmentation: element-wise
    passes over every crop) queue behind the step and run after it, adding their time to every
    step. On a stream of their own they run beside the step's matrix products. :meth:`run` queues
    ``make()``'s device work on that stream; :meth:`hand_over` makes the current stream wait for it
    and tells the allocator that the batch's tensors are used there (so their memory is not reused
    while the step reads them). Off, or off CUDA, both are plain calls.
    """

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.stream = torch.cuda.Stream(device) if enabled and device.type == "cuda" else None

    def run(self, make: Callable[[], T]) -> T:
        if self.stream is None:
            return make()
        with torch.cuda.stream(self.stream):
            return make()

    def hand_over(self, batches: list[CropBatch]) -> None:
        if self.stream is None:
            return
        current = torch.cuda.current_stream(self.stream.device)
        current.wait_stream(self.stream)
        for batch in batches:
            for tensor in (batch.global_crops, batch.local_crops, batch.masks, batch.mask_index):
                if tensor is not None:
                    tensor.record_stream(current)


def to_device_async(tensor: Tensor, device: torch.device) -> Tensor:
    """A host tensor copied to ``device`` without waiting for the work queued there (pinned
    memory, non-blocking copy on CUDA; a plain ``to`` elsewhere)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class ResumableBatches:
    """Index batches over a data set of ``length`` images, forever: each data epoch is a
    permutation seeded by ``(seed, epoch)``, so batch ``b`` is known without replaying.

    With ``world_size`` ranks, global batch ``b`` is the next ``batch_size * world_size`` indices
    of the permutation and rank ``r`` reads its ``r``-th block of ``batch_size``: distinct images
    per rank, fixed by the seed and the world size."""

    def __init__(self, length: int, batch_size: int, seed: int, start: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        global_size = batch_size * world_size
        if length < global_size:
            raise ValueError(f"data set of {length} images is smaller than one batch ({global_size})")
        self.length, self.batch_size, self.seed, self.start = length, batch_size, seed, start
        self.rank, self.world_size = rank, world_size
        self.per_epoch = length // global_size

    def __iter__(self) -> Iterator[list[int]]:
        index = self.start
        global_size = self.batch_size * self.world_size
        while True:
            epoch, offset = divmod(index, self.per_epoch)
            order = np.random.default_rng([self.seed, epoch]).permutation(self.length)
            first = offset * global_size + self.rank * self.batch_size
            yield order[first : first + self.batch_size].tolist()
            index += 1


@dataclass
class TrainState:
    """What a checkpoint restores."""

    step: int = 0
    images_seen: int = 0
    train_seconds: float = 0.0  # wall time spent training, evaluations excluded, over all resumes
    history: list[dict[str, float]] = field(default_factory=list)
    bad_images: dict[str, Any] = field(default_factory=dict)  # BadImageTracker.summary() at the save
    curves: list[dict[str, float]] = field(default_factory=list)  # step metrics every curve_every steps
    curve_every: int = 0  # 0 until the first record

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any]) -> TrainState:
        return cls(checkpoint["step"], checkpoint["images_seen"], checkpoint["train_seconds"],
                   json.loads(checkpoint["history"]), json.loads(checkpoint.get("bad_images", "{}")),
                   json.loads(checkpoint.get("curves", "[]")), int(checkpoint.get("curve_every", 0)))

    def record(self, step: int, metrics: dict[str, float], every: int) -> None:
        """Keep step ``step``'s ``metrics`` for the training curves when it falls on the stride
        (``every`` steps at first); past :data:`CURVE_POINTS` rows the stride doubles and every other
        row goes, so a run of any length keeps a bounded, evenly spaced record in its checkpoints."""
        self.curve_every = self.curve_every or every
        if step % self.curve_every:
            return
        self.curves.append({"step": step, **metrics})
        if len(self.curves) > CURVE_POINTS:
            self.curve_every *= 2
            self.curves = [row for row in self.curves if row["step"] % self.curve_every == 0]


def write_training_curves(state: TrainState, storage: Storage, out: str, tracker: Tracker) -> None:
    """``<out>/training_curves.png`` (:func:`evaluators.visualize.save_training_curves` of the
    recorded steps and evaluations), also logged to ``tracker``; nothing when no step was recorded.
    The local copy it logs is left in place: an upload queued while the store is down reads it later."""
    import tempfile
    from pathlib import Path

    from evaluators.visualize import save_training_curves

    if not state.curves:
        return
    picture = save_training_curves(state.curves, state.history, Path(tempfile.mkdtemp()) / CURVES_FILE)
    storage.write_bytes(join_uri(out, CURVES_FILE), picture.read_bytes())
    tracker.log_artifact(picture)


def checkpoint_bytes(student: SSLNetwork, teacher: SSLNetwork, objective: Objective,
                     optimizer: torch.optim.Optimizer, state: TrainState, cfg: PretrainConfig,
                     strategy: Strategy | None = None) -> bytes:
    """The whole run state (gathered from every rank under ``strategy``: all ranks call this)."""
    strategy = strategy or Strategy()
    buffer = io.BytesIO()
    torch.save({
        "student": strategy.full_state_dict(student), "teacher": strategy.full_state_dict(teacher),
        "objective": objective.state_dict(), "optimizer": strategy.optimizer_state(student, optimizer),
        "step": state.step, "images_seen": state.images_seen, "train_seconds": state.train_seconds,
        "config": to_yaml(cfg),
        "history": json.dumps(state.history),
        "bad_images": json.dumps(state.bad_images),
        "curves": json.dumps(state.curves), "curve_every": state.curve_every,
    }, buffer)
    return buffer.getvalue()


def save_checkpoint(storage: Storage, out: str, data: bytes, step: int, keep: int = 2) -> str:
    """Write ``checkpoints/step_N.pt`` then point ``checkpoints/latest.json`` at it (both atomic);
    a checkpoint is only ever found through the pointer, so a half-written one is never read."""
    folder = join_uri(out, "checkpoints")
    uri = join_uri(folder, f"step_{step:09d}.pt")
    storage.write_bytes(uri, data)
    storage.write_bytes(join_uri(folder, "latest.json"), json.dumps({"step": step, "uri": uri}).encode())
    old = [u for u in storage.list(folder) if u.endswith(".pt") and u != uri]
    for stale in old[: max(len(old) - (keep - 1), 0)]:
        storage.delete(stale)
    return uri


def load_latest_checkpoint(storage: Storage, out: str) -> dict[str, Any] | None:
    """The checkpoint ``latest.json`` points at, or None for a fresh run."""
    pointer = join_uri(out, "checkpoints", "latest.json")
    if not storage.exists(pointer):
        return None
    uri = json.loads(storage.read_bytes(pointer))["uri"]
    return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)


class ImageStream:
    """The next batch of decoded uint8 images on ``device`` at each call, from batch
    ``start_batch`` of :class:`ResumableBatches` on; undecodable images are tallied in
    ``bad_images`` (which stops the run above its fraction) and empty batches skipped.

    Why it clocks its waits (:meth:`take_wait`): the loop asks for the next step's images in the
    step's wait for its losses, so a loader whose workers keep up costs nothing, and one that does
    not adds its lag to every step, which a GPU run shows only as fewer images a second. The loops
    log the share of each step spent waiting (``data_wait_share``) and :class:`LoaderWatch` names
    the cause."""

    def __init__(self, dataset: Any, collate: Callable, cfg: PretrainConfig, start_batch: int, device: torch.device,
                 bad_images: BadImageTracker, rank: int = 0, world_size: int = 1) -> None:
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=ResumableBatches(len(dataset), cfg.optim.batch_size, cfg.seed, start_batch,
                                                    rank, world_size),
            collate_fn=collate, num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0,
            pin_memory=device.type == "cuda",  # Batch.pin_memory: the copy below then waits for nothing
        )
        self.batches, self.device, self.bad_images = iter(loader), device, bad_images
        self.waited = 0.0

    def __call__(self) -> Tensor:
        while True:
            tick = time.perf_counter()
            batch = next(self.batches)
            self.waited += time.perf_counter() - tick
            self.bad_images.update(batch)
            self.bad_images.check()
            if len(batch.images):
                return batch.images.to(self.device, non_blocking=True)

    def take_wait(self) -> float:
        """Seconds spent waiting for the loader since the last call."""
        waited, self.waited = self.waited, 0.0
        return waited


LOADER_WAIT_WINDOW = 20  # consecutive steps LoaderWatch judges together


class LoaderWatch:
    """Warns once when the loop waited for the loader more than ``share`` of the time of
    ``window`` consecutive steps (default :data:`LOADER_WAIT_WINDOW`; the run's first step, which
    waits for the workers to start, not counted), naming ``data.num_workers``: the workers do not
    keep up with the steps."""

    def __init__(self, num_workers: int, window: int | None = None, share: float = 0.2) -> None:
        self.num_workers, self.share = num_workers, share
        self.steps: deque[tuple[float, float]] = deque(maxlen=window or LOADER_WAIT_WINDOW)
        self.first, self.warned = True, False

    def update(self, seconds: float, waited: float) -> None:
        """Count one step of ``seconds`` of which ``waited`` went into waiting for images."""
        if self.first:
            self.first = False
            return
        self.steps.append((seconds, waited))
        if self.warned or len(self.steps) < (self.steps.maxlen or 0):
            return
        share = sum(w for _, w in self.steps) / max(sum(s for s, _ in self.steps), 1e-9)
        if share > self.share:
            self.warned = True
            _log.warning("the last %d steps spent %.0f %% of their time waiting for images: the loader's %d "
                         "workers do not keep up (raise data.num_workers; benchmarks/decode.py gives a "
                         "worker's images a second)", len(self.steps), 100 * share, self.num_workers)


EvalFn = Callable[[DinoVisionTransformer, int], dict[str, float]]


def pretrain(
    cfg: PretrainConfig,
    dataset: Any,
    collate: Callable,
    storage: Storage,
    tracker: Tracker | None = None,
    evaluate: EvalFn | None = None,
    final_evaluate: EvalFn | None = None,
) -> dict[str, Any]:
    """Train (or resume) a run in ``cfg.out``; returns the summary written to ``summary.json``.

    ``dataset[i]`` gives samples that ``collate`` turns into a batch with ``images`` (uint8
    ``(B, 3, S, S)``) and the ``keys``/``bad_keys`` of decoded and undecodable images;
    ``evaluate(teacher_backbone, step)`` gives metrics every ``cfg.eval.every_steps`` steps and
    ``final_evaluate`` (default ``evaluate``) at the end.

    Under a distributed ``cfg.distributed.strategy`` every rank runs this (started by torchrun):
    each reads its slice of every global batch, and only rank 0 logs, evaluates and writes.
    """
    device = torch.device(cfg.device)
    strategy = build_strategy(cfg.distributed, device)
    finished = False
    try:
        summary = _pretrain(cfg, dataset, collate, storage, tracker if strategy.is_main else NullTracker(),
                            evaluate, final_evaluate, strategy)
        finished = True
        return summary
    finally:
        strategy.close(finished)


def _pretrain(cfg: PretrainConfig, dataset: Any, collate: Callable, storage: Storage, tracker: Tracker | None,
              evaluate: EvalFn | None, final_evaluate: EvalFn | None, strategy: Strategy) -> dict[str, Any]:
    tracker = tracker or NullTracker()
    device = torch.device(cfg.device)
    autocast_dtype = training_autocast(device)
    torch.manual_seed(cfg.seed)
    student, teacher = build_networks(cfg)
    objective = Objective(cfg, strategy.all_reduce)
    student, teacher, objective = student.to(device), teacher.to(device), objective.to(device)
    state = TrainState()
    checkpoint = load_latest_checkpoint(storage, cfg.out)
    if checkpoint is None and cfg.init_weights:
        weights, _ = read_weights(cfg.init_weights, "safetensors", storage)
        for network in (student, teacher):
            load_strict(network.backbone, weights)
    if checkpoint is not None:
        student.load_state_dict(checkpoint["student"])
        teacher.load_state_dict(checkpoint["teacher"])
        objective.load_state_dict(checkpoint["objective"])
    student, teacher = strategy.wrap(student, teacher)  # shards what was loaded
    optimizer = strategy.prepare_optimizer(student, build_adamw(student, cfg, device))
    if checkpoint is not None:
        strategy.load_optimizer_state(student, optimizer, with_kernel_choice(checkpoint["optimizer"], optimizer))
        state = TrainState.from_checkpoint(checkpoint)
    tracker.log_config(cfg)
    multi_crop = MultiCrop(cfg.crops).to(device)
    # the final adaptation phase: the last highres_steps of the schedule use larger crops
    highres_from = total_steps(cfg.optim) - cfg.crops.highres_steps if cfg.crops.highres_steps else None
    highres_crop = MultiCrop(cfg.crops.model_copy(update={
        "global_crop_size": cfg.crops.highres_global_crop_size,
        "local_crop_size": cfg.crops.highres_local_crop_size,
    })).to(device) if highres_from is not None else None
    micro = cfg.optim.grad_accumulation
    last_step = total_steps(cfg.optim) if cfg.max_steps == 0 else min(cfg.max_steps, total_steps(cfg.optim))
    bad_images = BadImageTracker(cfg.data.max_bad_fraction)
    bad_images.restore(state.bad_images)
    next_images = ImageStream(dataset, collate, cfg, state.step * micro, device, bad_images,
                              strategy.rank, strategy.world_size)
    loader_watch = LoaderWatch(cfg.data.num_workers)

    marks = sorted(m for m in cfg.eval.at_minutes if m > state.train_seconds / 60)
    # collapse is judged once the teacher's temperature has warmed up (on resume the count starts again)
    watch = CollapseWatch(start=int(cfg.loss.warmup_teacher_temp_epochs * cfg.optim.epoch_length))

    def teacher_backbone() -> nn.Module:
        return build_backbone(cfg, drop_path=False)

    side = SideStream(device, cfg.data.side_stream)

    def prepare(step: int) -> PreparedStep:
        # augmentation and stochastic depth: a stream per (step, rank); masks: per step (make_batch)
        torch.manual_seed((cfg.seed * 1_000_003 + step) * strategy.world_size + strategy.rank)
        crop = highres_crop if highres_from is not None and step >= highres_from else multi_crop

        def make() -> PreparedStep:
            images = [next_images() for _ in range(micro)]
            micro_batches = [make_batch(x, step * micro + i, cfg, crop, strategy) for i, x in enumerate(images)]
            return PreparedStep(micro_batches, sum(len(x) for x in images), bad_images.summary())

        return side.run(make)

    bar = progress(range(state.step, last_step), desc=f"pretrain {cfg.name}", total=last_step - state.step,
                   unit="step")
    stopped_early = False
    metrics: dict[str, float] = {}
    upcoming: Future[PreparedStep] | None = None  # the step's batch, prepared during the last step
    for step in bar:
        if cfg.max_minutes and state.train_seconds > 60 * cfg.max_minutes:
            stopped_early = True
            break
        sched = schedule_values(step, cfg.optim, cfg.loss, strategy.world_size)  # lr scales with the global batch
        tick = time.perf_counter()
        prepared = upcoming.result() if upcoming is not None else prepare(step)
        side.hand_over(prepared.micro_batches)
        upcoming = Future() if step + 1 < last_step else None
        student.train()
        losses = train_step(student, teacher, objective, prepared.micro_batches, sched, optimizer, cfg.optim.clip_grad,
                            autocast_dtype, strategy,
                            while_waiting=functools.partial(settle, upcoming, prepare, step + 1) if upcoming else None)
        count = prepared.images * strategy.world_size
        # one clock for all ranks, so that time-based stops and evaluations happen on all at once
        clock = strategy.mean({"seconds": time.perf_counter() - tick, "waited": next_images.take_wait()})
        seconds = clock["seconds"]
        loader_watch.update(seconds, clock["waited"])
        state.step, state.images_seen = step + 1, state.images_seen + count
        state.train_seconds += seconds
        health = {k.removeprefix("health_"): v for k, v in losses.items() if k.startswith("health_")}
        metrics = {**{(k if k.startswith("health_") else f"loss_{k}"): v for k, v in losses.items()}, "lr": sched.lr,
                   "weight_decay": sched.weight_decay, "teacher_momentum": sched.teacher_momentum,
                   "teacher_temp": sched.teacher_temp, "images_per_second": count / seconds,
                   "data_wait_share": clock["waited"] / seconds}
        tracker.log_metrics(metrics, step=state.step)
        state.record(state.step, metrics, cfg.tracking.metric_every)
        if watch.update(state.step, health):
            tracker.set_tags({TAG_HEALTH: watch.verdict()})
        bar.set_postfix(loss=f"{losses['total']:.3f}", img_s=f"{metrics['images_per_second']:.0f}")
        due = bool(cfg.eval.every_steps) and state.step % cfg.eval.every_steps == 0
        while marks and state.train_seconds >= 60 * marks[0]:
            marks.pop(0)
            due = True
        if evaluate is not None and due:
            with streams_kept(device):  # the next step's draws began (and a sharded teacher's gather builds a network)
                whole = strategy.whole(teacher.backbone, teacher_backbone)
                results = evaluate(whole, state.step) if strategy.is_main else {}
            tracker.log_metrics(results, step=state.step, force=True)
            state.history.append({"step": state.step, "train_minutes": round(state.train_seconds / 60, 3),
                                  "images_seen": state.images_seen, **results})
        state.bad_images = prepared.bad_images
        if state.step % cfg.checkpoint_every == 0 or state.step == last_step:
            data = checkpoint_bytes(student, teacher, objective, optimizer, state, cfg, strategy)
            if strategy.is_main:
                save_checkpoint(storage, cfg.out, data, state.step)
    if stopped_early or state.step % cfg.checkpoint_every:
        data = checkpoint_bytes(student, teacher, objective, optimizer, state, cfg, strategy)
        if strategy.is_main:
            save_checkpoint(storage, cfg.out, data, state.step)
    if metrics:  # the last step's values, whatever the cadence
        tracker.log_metrics(metrics, step=state.step, force=True)
    tracker.set_tags({TAG_HEALTH: watch.verdict()})
    bad_images.restore(state.bad_images)  # a batch prepared for a step not run (a time limit) does not count
    bad_images.check(final=True)
    final: dict[str, float] = {}
    closing = final_evaluate or evaluate
    backbone = strategy.whole(teacher.backbone, teacher_backbone)
    if closing is not None and strategy.is_main:
        final = closing(backbone, state.step)
        tracker.log_metrics(final, step=state.step, force=True)
    if strategy.is_main:
        save_backbone(backbone.cpu(), join_uri(cfg.out, "backbone.safetensors"), storage)
        write_training_curves(state, storage, cfg.out, tracker)
    summary = {"name": cfg.name, "steps": state.step, "images_seen": state.images_seen,
               "train_minutes": round(state.train_seconds / 60, 3), "stopped_early": stopped_early,
               "backbone": join_uri(cfg.out, "backbone.safetensors"), "final": final,
               "bad_images": bad_images.summary(), "health": watch.verdict(),
               "history": state.history, "mlflow_run_id": tracker.run_id,
               "tracking": tracker.delivery()}  # metrics sent, still queued or lost (an unreachable store)
    if strategy.is_main:
        storage.write_bytes(join_uri(cfg.out, "summary.json"), json.dumps(summary, indent=2).encode())
    return summary

