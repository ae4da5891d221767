"""The pretraining engine: the networks, the objective, one training step and the loop. Beside
it: what feeds the loop (:mod:`trainer.batches`), its AdamW (:mod:`trainer.optim`) and its exact
checkpoints (:mod:`trainer.checkpoints`).

Why this shape: the step is a plain function of (networks, objective, batch, schedule values,
optimiser); setup builds those once; the loop only orders things (nanoGPT's order: schedule ->
evaluate/checkpoint -> micro-steps -> clip -> step -> EMA -> log), and reads a step's losses while
the next one runs where it can (:class:`LossReads`). Randomness of step ``i``
(augmentation, masks, stochastic depth) is seeded from ``(seed, i)``, so a run resumed at step
``i`` draws exactly what an uninterrupted run draws, and the checkpoint needs no RNG state
beyond the step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinoflow.config import HeadsConfig, PretrainConfig
from dinoflow.progress import progress
from dinoflow.run_files import BACKBONE_FILE, HEADS_FILE, SUMMARY_FILE
from dinoflow.storage import Storage, join_uri
from dinoflow.tracking import TAG_HEALTH, NullTracker, Tracker
from trainer.batches import (
    CropBatch,
    ImageStream,
    LoaderWatch,
    PreparedStep,
    SideStream,
    make_batch,
    settle,
    streams_kept,
)
from trainer.checkpoints import (
    TrainState,
    check_resumed,
    checkpoint_bytes,
    load_latest_checkpoint,
    restore_optimizer,
    save_checkpoint,
    write_training_curves,
)
from trainer.data.augment import MultiCrop
from trainer.data.datasets import BadImageTracker
from trainer.devices import available_device
from trainer.health import CollapseWatch, target_health
from trainer.losses import (
    AllReduce,
    DINOLoss,
    IBOTPatchLoss,
    KoLeoLoss,
    SoftmaxCentering,
    Targets,
    no_reduce,
    sinkhorn_knopp,
)
from trainer.models.compile import compile_blocks, compiled_now, maybe_compiled
from trainer.models.head_weights import find_heads, heads_of, network_heads, save_heads
from trainer.models.heads import DINOHead, Fused
from trainer.models.hub import init_backbone, load_strict, locate_weights, read_torch_checkpoint, save_backbone
from trainer.models.vit import DinoVisionTransformer, build_vit
from trainer.optim import build_adamw
from trainer.schedules import ScheduleValues, schedule_values, total_steps
from trainer.strategy import Strategy, build_strategy, local_tensor


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


def start_from_weights(cfg: PretrainConfig, network: nn.Module, objective: Objective | None, storage: Storage,
                       strategy: Strategy | None = None) -> str:
    """A fresh run's ``network`` (an ``SSLNetwork``, or any module with a ``backbone``) loaded from
    ``cfg.init_weights`` (its layout ``init_weights_source``, by default from the path): the backbone
    (:func:`~trainer.models.hub.init_backbone`) and, with ``init_heads=auto``, the DINO/iBOT heads
    trained with those weights where there are (:func:`~trainer.models.head_weights.find_heads`), with
    their centres into ``objective`` when given and saved. Returns where the heads came from (``""``:
    they stay as built). Heads that do not fit the recipe fail naming each ``heads.*`` setting. A
    training dump, which holds both, is read once (ViT-g's: several GB, maybe from object storage).

    Under a ``strategy`` of several ranks (every rank calls this, each with the same ``network``
    built) only the main rank reads the weights: the others receive what it loaded
    (:meth:`~trainer.strategy.Strategy.load_whole`), and its error, if any
    (:meth:`~trainer.strategy.Strategy.read_on_main`). Why: every rank read and unpickled the file,
    a ViT-g training dump's several GB of host memory on each of a node's 8 ranks."""
    strategy = strategy or Strategy()
    heads_from = strategy.read_on_main(lambda: _load_weights(cfg, network, objective, storage),
                                       f"start from init_weights {cfg.init_weights}")
    if strategy.world_size > 1:
        loaded = [network.backbone, *([heads_of(network), objective] if heads_from else [])]
        for module in (m for m in loaded if m is not None):
            strategy.load_whole(module, module.state_dict() if strategy.is_main else None)
    return heads_from


def _load_weights(cfg: PretrainConfig, network: nn.Module, objective: Objective | None, storage: Storage) -> str:
    """:func:`start_from_weights` in one process: ``network`` (and ``objective``) loaded from
    ``cfg.init_weights``; where the heads came from (``""``: none)."""
    uri, source = cfg.init_weights, cfg.init_weights_source
    if source == "auto":
        uri, source = locate_weights(uri, storage)
    dump = read_torch_checkpoint(storage.read_bytes(uri), uri) if source == "training" else None
    init_backbone(network.backbone, uri, source, storage, dump)
    heads = heads_of(network)
    if cfg.init_heads == "fresh" or not len(heads):
        return ""
    saved = find_heads(uri, source, storage, dump)
    if saved is None:
        return ""
    differ = saved.mismatches(cfg.heads, network.backbone.embed_dim)
    if differ:
        raise ValueError(f"init heads {saved.uri} do not fit the recipe's heads: {'; '.join(differ)}; set these to "
                         "the heads' values, or init_heads=fresh for new heads")
    load_strict(heads, saved.heads)
    if objective is not None and saved.centres:
        load_strict(objective, saved.centres)
    return saved.uri


def build_heads(embed_dim: int, heads: HeadsConfig) -> tuple[DINOHead, DINOHead | None]:
    """The DINO head and, when ``heads.ibot_separate_head``, the iBOT head (else ``None``: shared)."""
    dino = DINOHead(embed_dim, heads.num_prototypes, heads.hidden_dim, heads.bottleneck_dim, heads.num_layers)
    ibot = (DINOHead(embed_dim, heads.ibot_num_prototypes, heads.hidden_dim, heads.ibot_bottleneck_dim,
                     heads.num_layers) if heads.ibot_separate_head else None)
    return dino, ibot


def build_networks(cfg: PretrainConfig) -> tuple[SSLNetwork, SSLNetwork]:
    """Student (with stochastic depth) and teacher (without; starts as a copy, never trained);
    with ``model.compile_blocks`` the blocks of each are compiled (:func:`compile_blocks`, lazily:
    at their first call, wherever the networks are moved or sharded to before it)."""

    def network(drop_path: bool) -> SSLNetwork:
        backbone = build_backbone(cfg, drop_path)
        return SSLNetwork(backbone, *build_heads(backbone.embed_dim, cfg.heads))

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

    @contextlib.contextmanager
    def one_step(self) -> Iterator[None]:
        """Within it, the centres move once, by the mean of all the teacher rows their updates saw
        (a step's micro-batches: their union's, as one batch's); an error drops the updates."""
        centres = (self.dino_center, self.ibot_center)
        for centre in centres:
            centre.hold()
        try:
            yield
        except BaseException:
            for centre in centres:
                centre.release(apply=False)
            raise
        for centre in centres:
            centre.release(self.all_reduce)

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
    averaged over micro-batches (and over ranks under ``strategy``), for logging: the step queued
    (:func:`queue_step`) and its losses read at once. The loop reads them during the next step."""
    strategy = strategy or Strategy()
    return strategy.mean(queue_step(student, teacher, objective, micro_batches, sched, optimizer, clip_grad,
                                    autocast_dtype, strategy, while_waiting).read())


def queue_step(
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
    after: StepLosses | None = None,
) -> StepLosses:
    """:func:`train_step`'s work queued on the device, its losses not yet read where they need not be
    (:func:`finish_step`): the loop reads them during the next step (``after``).

    ``while_waiting`` is called once, after the step's device work is queued and before the host
    waits for it (reading the losses): the loop prepares the next step's batch there, so
    that the host's share of it (loading, launching the augmentation, drawing the block masks)
    runs while the device computes this step instead of leaving the device idle between steps.
    Nothing after the call draws random numbers, so the streams are those of a step-by-step loop.
    """
    strategy = strategy or Strategy()
    begin_step(optimizer, sched)
    weights = objective.cfg

    def loss_of(batch: CropBatch) -> tuple[Tensor, dict[str, Tensor]]:
        terms = loss_terms(student, teacher, objective, batch, sched.teacher_temp)
        return (weights.dino_weight * terms["dino"] + weights.ibot_weight * terms["ibot"]
                + weights.koleo_weight * terms["koleo"]), terms

    with objective.one_step():
        losses, names = accumulate(micro_batches, autocast_dtype, loss_of, strategy.backward)
    modules = [m for m in (student.backbone, student.dino_head, student.ibot_head) if m is not None]
    ema = functools.partial(ema_update, teacher, student, sched.teacher_momentum)
    return finish_step(losses, names, optimizer, modules, clip_grad, ema, strategy, while_waiting, after)


def accumulate(micro_batches: list[CropBatch], autocast_dtype: torch.dtype | None,
               loss_of: Callable[[CropBatch], tuple[Tensor, dict[str, Tensor]]],
               backward: Callable[[Tensor], None]) -> tuple[Tensor, list[str]]:
    """Gradient accumulation, for pretraining's and distillation's steps: each micro-batch's loss
    and terms (``loss_of``, under autocast to ``autocast_dtype`` if given), its ``backward`` scaled
    by the micro-batch count. Returns the terms and the total ``(micro-batches, names)``, read on
    the host once (:func:`finish_step`), and their names."""
    device_type = micro_batches[0].global_crops.device.type
    values = []
    for batch in micro_batches:
        with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss, terms = loss_of(batch)
        backward(loss / len(micro_batches))
        values.append(torch.stack([value.detach().float() for value in (*terms.values(), loss)]))
    return torch.stack(values), [*terms, "total"]


@dataclasses.dataclass
class StepLosses:
    """A step's loss terms ``(micro-batches, names)`` on the device, read on the host once (:meth:`read`),
    and with fused AdamW in one process the step's skip flag (its ``found_inf``: 1 where a non-finite
    loss left every student weight and the optimiser's state as they were), which a step queued before
    this one is read carries on."""

    losses: Tensor
    names: list[str]
    skipped: Tensor | None = None
    values: dict[str, float] | None = None  # once read

    def read(self) -> dict[str, float]:
        """The terms averaged over micro-batches, read once (the host waits for the step here);
        raises ``FloatingPointError`` naming the terms if any is not finite."""
        if self.values is None:
            rows = self.losses.tolist()
            for row in rows:
                if not all(math.isfinite(value) for value in row):
                    raise FloatingPointError(f"loss is {row[-1]} ({dict(zip(self.names[:-1], row[:-1]))})")
            self.values = {name: sum(row[i] for row in rows) / len(rows) for i, name in enumerate(self.names)}
        return self.values


@dataclasses.dataclass
class QueuedStep:
    """A step the loop has queued: its index, schedule values, images (on all ranks) and losses."""

    step: int
    sched: ScheduleValues
    images: int
    losses: StepLosses


class LossReads:
    """When a training loop reads its steps' losses (its one wait for the device a step), and its
    training clock, which runs from one read to the next.

    With ``lagged`` (``optim.lagged_loss_read``) a step's losses are read once the next step is
    queued: the device then goes from one step to the next without waiting for the host to read,
    log and launch. A step is read at once where it cannot wait: read in the step already (not
    fused AdamW in one process: :func:`finish_step`), or its weights about to be evaluated or saved.
    ``report(step, losses, seconds)`` counts and logs a step once read, ``seconds`` its share of the
    clock; a non-finite loss raises ``FloatingPointError`` naming its step."""

    def __init__(self, lagged: bool, report: Callable[[QueuedStep, dict[str, float], float], None]) -> None:
        self.lagged, self.report = lagged, report
        self.unread: QueuedStep | None = None
        self.restart_clock()

    @property
    def after(self) -> StepLosses | None:
        """The unread step's losses, which the next step is queued after (:func:`finish_step`)."""
        return None if self.unread is None else self.unread.losses

    def restart_clock(self) -> None:
        """The clock from now on: evaluations and checkpoints are not training time."""
        self.clock_start = time.perf_counter()

    def queued(self, step: QueuedStep, now: Callable[[], bool]) -> bool:
        """``step`` was just queued: the step before read if it waited, then ``step`` unless it can
        wait (``now()``, asked after that read: its weights are evaluated or saved next); whether it was."""
        self.flush()
        if self.lagged and step.losses.values is None and not now():
            self.unread = step
            return False
        self._read(step)
        return True

    def flush(self) -> None:
        """The unread step read, if there is one (the loop stops)."""
        if self.unread is not None:
            step, self.unread = self.unread, None
            self._read(step)

    @contextlib.contextmanager
    def flushed_on_error(self) -> Iterator[None]:
        """A block that, if it raises (the next batch's images break the bad-image limit), first reads
        the unread step, so that it is counted and logged as a step-by-step loop would have."""
        try:
            yield
        except Exception:
            self.flush()
            raise

    def _read(self, step: QueuedStep) -> None:
        try:
            losses = step.losses.read()
        except FloatingPointError as error:
            raise FloatingPointError(f"step {step.step + 1}: {error}") from error
        self.report(step, losses, time.perf_counter() - self.clock_start)
        self.restart_clock()


def finish_step(losses: Tensor, names: list[str], optimizer: torch.optim.Optimizer, modules: list[nn.Module],
                clip_grad: float, ema: Callable[[], None], strategy: Strategy,
                while_waiting: Callable[[], None] | None = None, after: StepLosses | None = None) -> StepLosses:
    """The end of a training step once its backward is queued: each of ``modules``' gradients
    clipped to norm ``clip_grad`` (if positive), the optimiser step, ``ema()``, ``while_waiting()``
    and the loss terms ``(micro-batches, names)``, read where they must be.

    Why the read is where it is: it is the step's one wait for the GPU. A fused AdamW in one process
    skips a non-finite step on the device (its ``found_inf``), so there nothing waits: the losses
    are returned unread, and the loop reads them once the next step is queued, so that the GPU goes
    from one step to the next without waiting for the host. That next step (queued ``after`` this
    one) is skipped on the device too if this one was, so a non-finite loss raises on its read with
    every student weight and the optimiser's state as they were before it. ``ema()`` and the centres
    still move on a skipped step (towards the unchanged student), unread: the read raises before the
    loop evaluates or saves anything, and skipping them on the device would cost a teacher-sized
    temporary or a kernel a parameter (no foreach lerp takes a device-side weight). Elsewhere the
    losses are read before the weights change."""
    skip_on_device = type(strategy) is Strategy and bool(optimizer.param_groups[0].get("fused"))
    queued = StepLosses(losses, names)
    if not skip_on_device:
        if while_waiting is not None:
            while_waiting()
        queued.read()
    if clip_grad > 0:
        for module in modules:
            strategy.clip_grad_norm_(module.parameters(), clip_grad)
    if skip_on_device:
        queued.skipped = (~losses.isfinite().all()).float()  # 1: the fused kernel leaves every weight as it is
        if after is not None and after.skipped is not None and after.values is None:
            queued.skipped = torch.maximum(queued.skipped, after.skipped)
        optimizer.found_inf = queued.skipped
    strategy.step(optimizer)
    ema()
    if skip_on_device and while_waiting is not None:
        while_waiting()
    return queued


def begin_step(optimizer: torch.optim.Optimizer, sched: ScheduleValues) -> None:
    """Start an optimiser step: this step's learning rates and weight decays into ``optimizer``'s
    groups (:func:`~trainer.optim.param_groups`), and a new iteration for compiled blocks' CUDA graphs
    (``model.compile_mode``), whose next replays may then reuse the memory of the last step's outputs."""
    torch.compiler.cudagraph_mark_step_begin()
    for group in optimizer.param_groups:
        group["lr"] = (sched.last_layer_lr if group["is_last_layer"] else sched.lr) * group["lr_multiplier"]
        group["weight_decay"] = sched.weight_decay * group["wd_multiplier"]


def highres_start(cfg: PretrainConfig) -> int:
    """The first step of the final high-resolution phase (the last ``crops.highres_steps`` of the
    schedule, as the original ends)."""
    return total_steps(cfg.optim) - cfg.crops.highres_steps


def highres_reads(cfg: PretrainConfig, micro_batches: int) -> tuple[int, int] | None:
    """``(first batch, load size)`` of the high-resolution phase's images for
    :class:`~trainer.batches.ImageStream` (``micro_batches`` batches a step): decoded to
    ``crops.highres_load_size``; None where the phase keeps ``crops.load_size``."""
    if not (cfg.crops.highres_steps and cfg.crops.highres_load_size):
        return None
    return highres_start(cfg) * micro_batches, cfg.crops.highres_load_size


def step_crops(cfg: PretrainConfig, device: torch.device) -> Callable[[int], MultiCrop]:
    """The multi-crop of each step: the recipe's crops, and in the final high-resolution phase
    (:func:`highres_start`) the high-resolution ones."""
    multi_crop = MultiCrop(cfg.crops).to(device)
    if not cfg.crops.highres_steps:
        return lambda step: multi_crop
    highres_from = highres_start(cfg)
    highres = MultiCrop(cfg.crops.model_copy(update={
        "global_crop_size": cfg.crops.highres_global_crop_size,
        "local_crop_size": cfg.crops.highres_local_crop_size,
    })).to(device)
    return lambda step: highres if step >= highres_from else multi_crop


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


def training_autocast(device: torch.device) -> torch.dtype | None:
    """The autocast dtype training runs under on ``device``: bf16 on CUDA (Sinkhorn-Knopp and the
    softmaxes stay fp32 in the losses), none (fp32) on CPU, where bf16 matmuls are slow."""
    return torch.bfloat16 if device.type == "cuda" else None


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
    device = available_device(cfg.device)
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
    checkpoint = load_latest_checkpoint(storage, cfg.out, strategy)  # the whole tensors on the main rank alone
    if checkpoint is None and cfg.init_weights:
        heads_from = start_from_weights(cfg, student, objective, storage, strategy)  # read by the main rank alone
        teacher.load_state_dict(student.state_dict())
        tracker.set_tags({"init_heads": heads_from or "fresh"})
    if checkpoint is not None:
        check_resumed(cfg, checkpoint, "pretraining", strategy.world_size)
        strategy.load_whole(student, checkpoint["student"])
        strategy.load_whole(teacher, checkpoint["teacher"])
        objective.load_state_dict(checkpoint["objective"])
    student, teacher = strategy.wrap(student, teacher)  # shards what was loaded
    optimizer = strategy.prepare_optimizer(student, build_adamw(student, cfg, device))
    if checkpoint is not None:
        restore_optimizer(strategy, student, optimizer, checkpoint["optimizer"])
        state = TrainState.from_checkpoint(checkpoint)
    tracker.log_config(cfg)
    crop_of = step_crops(cfg, device)
    micro = cfg.optim.grad_accumulation
    last_step = total_steps(cfg.optim) if cfg.max_steps == 0 else min(cfg.max_steps, total_steps(cfg.optim))
    bad_images = BadImageTracker(cfg.data.max_bad_fraction)
    bad_images.restore(state.bad_images)
    next_images = ImageStream(dataset, collate, state.start_batch(micro), device, bad_images,
                              batch_size=cfg.optim.batch_size, seed=cfg.seed, num_workers=cfg.data.num_workers,
                              rank=strategy.rank, world_size=strategy.world_size,
                              resize_from=highres_reads(cfg, micro))
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
        crop = crop_of(step)

        def make() -> PreparedStep:
            images = [next_images() for _ in range(micro)]
            micro_batches = [make_batch(x.images, step * micro + i, cfg, crop, strategy, x.aspects)
                             for i, x in enumerate(images)]
            return PreparedStep(micro_batches, sum(len(x.images) for x in images), bad_images.summary(),
                                next_images.loader_batch)

        return side.run(make)

    bar = progress(range(state.step, last_step), desc=f"pretrain {cfg.name}", total=last_step - state.step,
                   unit="step")
    stopped_early = False
    metrics: dict[str, float] = {}
    upcoming: Future[PreparedStep] | None = None  # the step's batch, prepared during the last step
    saved_at = state.step  # the step of the last checkpoint written (or loaded)

    def report(queued: QueuedStep, losses: dict[str, float], seconds: float) -> None:
        nonlocal metrics
        losses = strategy.mean(losses)
        # one clock for all ranks, so that time-based stops and evaluations happen on all at once
        clock = strategy.mean({"seconds": seconds, "waited": next_images.take_wait()})
        seconds = clock["seconds"]
        loader_watch.update(seconds, clock["waited"])
        state.step, state.images_seen = queued.step + 1, state.images_seen + queued.images
        state.train_seconds += seconds
        health = {k.removeprefix("health_"): v for k, v in losses.items() if k.startswith("health_")}
        sched = queued.sched
        metrics = {**{(k if k.startswith("health_") else f"loss_{k}"): v for k, v in losses.items()}, "lr": sched.lr,
                   "weight_decay": sched.weight_decay, "teacher_momentum": sched.teacher_momentum,
                   "teacher_temp": sched.teacher_temp, "images_per_second": queued.images / seconds,
                   "data_wait_share": clock["waited"] / seconds}
        tracker.log_metrics(metrics, step=state.step)
        state.record(state.step, metrics, cfg.tracking.metric_every)
        if watch.update(state.step, health):
            tracker.set_tags({TAG_HEALTH: watch.verdict()})
        bar.set_postfix(loss=f"{losses['total']:.3f}", img_s=f"{metrics['images_per_second']:.0f}")

    def eval_due(count: int) -> bool:
        return bool(cfg.eval.every_steps) and count % cfg.eval.every_steps == 0

    reads = LossReads(cfg.optim.lagged_loss_read, report)
    for step in bar:
        if cfg.max_minutes and state.train_seconds > 60 * cfg.max_minutes:  # the steps read so far
            stopped_early = True
            break
        sched = schedule_values(step, cfg.optim, cfg.loss, strategy.world_size)  # lr scales with the global batch
        with reads.flushed_on_error():
            prepared = upcoming.result() if upcoming is not None else prepare(step)
        side.hand_over(prepared.micro_batches)
        upcoming = Future() if step + 1 < last_step else None
        student.train()
        losses = queue_step(student, teacher, objective, prepared.micro_batches, sched, optimizer, cfg.optim.clip_grad,
                            autocast_dtype, strategy,
                            while_waiting=functools.partial(settle, upcoming, prepare, step + 1) if upcoming else None,
                            after=reads.after)
        state.bad_images, state.loader_batch = prepared.bad_images, prepared.loader_batch
        save = (step + 1) % cfg.checkpoint_every == 0 or step + 1 == last_step
        # read at once if this step's weights are evaluated or saved next
        if not reads.queued(QueuedStep(step, sched, prepared.images * strategy.world_size, losses), now=lambda: (
                save or eval_due(step + 1) or bool(marks) and state.train_seconds >= 60 * marks[0])):
            continue
        due = eval_due(state.step)
        while marks and state.train_seconds >= 60 * marks[0]:
            marks.pop(0)
            due = True
        if evaluate is not None and due:
            with streams_kept(device):  # the next step's draws began (and a sharded teacher's gather builds a network)
                whole = strategy.whole(teacher.backbone, teacher_backbone)
                results = strategy.on_main(lambda: evaluate(whole, state.step)) or {}
            tracker.log_metrics(results, step=state.step, force=True)
            state.history.append({"step": state.step, "train_minutes": round(state.train_seconds / 60, 3),
                                  "images_seen": state.images_seen, **results})
        if save:
            data = checkpoint_bytes(student, teacher, objective, optimizer, state, cfg, strategy)
            if strategy.is_main:
                save_checkpoint(storage, cfg.out, data, state.step)
            saved_at = state.step
        reads.restart_clock()
    reads.flush()  # stopped by the time limit with the last step unread
    if state.step != saved_at:  # stopped by the time limit between checkpoints
        data = checkpoint_bytes(student, teacher, objective, optimizer, state, cfg, strategy)
        if strategy.is_main:
            save_checkpoint(storage, cfg.out, data, state.step)
    if metrics:  # the last step's values, whatever the cadence
        tracker.log_metrics(metrics, step=state.step, force=True)
    tracker.set_tags({TAG_HEALTH: watch.verdict()})
    bad_images.restore(state.bad_images)  # a batch prepared for a step not run (a time limit) does not count
    bad_images.check_run_end()  # a sample of the data: a short run is held to the allowance
    final: dict[str, float] = {}
    closing = final_evaluate or evaluate
    backbone = strategy.whole(teacher.backbone, teacher_backbone)
    heads = network_heads(teacher, strategy.full_state_dict)  # the released backbone's: to continue from
    if closing is not None:  # (every collective made before: the other ranks only wait)
        final = strategy.on_main(lambda: closing(backbone, state.step)) or {}
        tracker.log_metrics(final, step=state.step, force=True)
    if strategy.is_main:
        save_backbone(backbone.cpu(), join_uri(cfg.out, BACKBONE_FILE), storage)
        save_heads(heads, objective.state_dict(), join_uri(cfg.out, HEADS_FILE), storage)
        write_training_curves(state, storage, cfg.out, tracker)
    summary = {"name": cfg.name, "steps": state.step, "images_seen": state.images_seen,
               "train_minutes": round(state.train_seconds / 60, 3), "stopped_early": stopped_early,
               "backbone": join_uri(cfg.out, BACKBONE_FILE), "heads": join_uri(cfg.out, HEADS_FILE), "final": final,
               "bad_images": bad_images.summary(), "health": watch.verdict(),
               "history": state.history, "mlflow_run_id": tracker.run_id,
               "tracking": tracker.delivery()}  # metrics sent, still queued or lost (an unreachable store)
    if strategy.is_main:
        storage.write_bytes(join_uri(cfg.out, SUMMARY_FILE), json.dumps(summary, indent=2).encode())
    return summary

