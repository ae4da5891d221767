"""Distillation: a large frozen teacher trains a small student with the pretraining loop.

What changes from :mod:`trainer.engine` (DINOv2 paper, section on distillation; maintainers in
dinov2 #96, #176): the teacher is any dinoflow network, loaded once and frozen (never the EMA
target); the student is another size, with fresh heads, no stochastic depth and no masking; the
DINO loss is on CLS tokens as in pretraining and the patch loss is on *all* patch tokens of the
two global crops; KoLeo as in pretraining; an EMA of the student (momentum schedule
``optim.momentum_teacher``) does not feed back into training and is the released model.

``distill.objective`` picks what the student learns:

* ``heads`` (the paper's): the loss above, against the teacher's DINO/iBOT head outputs.
* ``features``: the student's final-norm CLS of every crop and its patch tokens of the global
  crops go through linear projectors (student width -> teacher width; trained, not released)
  and are pulled, in cosine, to the teacher backbone's CLS and patch tokens
  (:class:`trainer.losses.CLSFeatureLoss`, :class:`trainer.losses.PatchFeatureLoss`), plus
  KoLeo. No head is built or run, on either side. Use it when the teacher's heads carry less
  than its backbone: a collapsed DINO head gives uniform targets that teach nothing.

Teacher targets (``heads``): normalised per ``distill.centering``, distillation's own choice, not
the student recipe's ``loss.centering`` (a pretrain preset may be the recipe). Sinkhorn-Knopp by
default: the original distils in the ViT-g recipe's training loop, which uses it (DINOv3 distils
with it too). ``softmax`` starts its running centres from the teacher's where they are stored. The
temperature follows ``loss.teacher_temp`` and its warm-up, as in pretraining.

Everything else is the engine's: the objective, parameter groups, schedules, the per-step
seeding, the resumable batch order and the checkpoint files.
A distillation checkpoint stores the student EMA under ``teacher`` (the original's convention
for the released network; with ``features`` the EMA is of the backbone only, keys ``backbone.*``),
so a distilled run can itself be a teacher or be read with ``source="training"``; the frozen
teacher is not stored, it is re-read from ``teacher.uri``.

Teacher heads: the teacher's trained DINO/iBOT heads, from a run folder's checkpoint or the
``heads.safetensors`` written beside its ``backbone.safetensors`` (a pipeline's pretrain output),
so the student's heads must have the same prototype counts. A backbone without heads (Meta's
released files) gets heads built from ``heads`` with a seeded random initialisation, frozen (a
fixed random projection: it still transfers the teacher's geometry, but trained heads do better).
The run writes its student EMA's heads beside its backbone (:mod:`trainer.models.head_weights`).

Single process only (no ``distributed.strategy`` other than ``single``).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from dinoflow.config import DistillConfig, HeadsConfig, PretrainConfig, validate
from dinoflow.progress import progress
from dinoflow.run_files import BACKBONE_FILE, HEADS_FILE, SUMMARY_FILE
from dinoflow.storage import Storage, join_uri
from dinoflow.tracking import NullTracker, Tracker
from trainer.batches import CropBatch, ImageStream, LoaderWatch, PreparedStep, SideStream, settle, streams_kept
from trainer.checkpoints import (
    RESUME_SETTINGS,
    TrainState,
    check_resumed,
    checkpoint_bytes,
    load_latest_checkpoint,
    pointer_uri,
    save_checkpoint,
    write_training_curves,
)
from trainer.data.datasets import BadImageTracker
from trainer.engine import (
    EvalFn,
    LossReads,
    Objective,
    QueuedStep,
    SSLNetwork,
    StepLosses,
    accumulate,
    begin_step,
    build_backbone,
    build_heads,
    crop_outputs,
    ema_update,
    finish_step,
    highres_reads,
    start_from_weights,
    step_crops,
    training_autocast,
)
from trainer.devices import available_device
from trainer.losses import CLSFeatureLoss, PatchFeatureLoss
from trainer.models.compile import compile_blocks
from trainer.models.head_weights import find_heads, heads_of, network_heads, save_heads
from trainer.models.hub import load_backbone, load_strict, read_torch_checkpoint, save_backbone
from trainer.models.vit import DinoVisionTransformer
from trainer.optim import build_adamw, with_kernel_choice
from trainer.schedules import ScheduleValues, schedule_values, total_steps
from trainer.strategy import Strategy

# -- networks ------------------------------------------------------------------------------

class HeadlessNetwork(nn.Module):
    """A backbone alone, under an :class:`SSLNetwork`'s state-dict keys (``backbone.*``): the
    teacher and the released student EMA of ``distill.objective=features``."""

    def __init__(self, backbone: DinoVisionTransformer) -> None:
        super().__init__()
        self.backbone = backbone


class FeatureStudent(nn.Module):
    """The student of ``distill.objective=features``: its backbone and two linear projectors from
    its width to the teacher's, one for the CLS token and one for patch tokens (the two play
    different roles in the teacher and sit in different parts of its feature space). The
    projectors only serve the loss; the released network is the backbone."""

    def __init__(self, backbone: DinoVisionTransformer, teacher_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.cls_projector = nn.Linear(backbone.embed_dim, teacher_dim)
        self.patch_projector = nn.Linear(backbone.embed_dim, teacher_dim)


Teacher = SSLNetwork | HeadlessNetwork
Student = SSLNetwork | FeatureStudent


def checkpoint_config(text: str) -> PretrainConfig:
    """The recipe saved in a pretrain or distill checkpoint."""
    data = yaml.safe_load(text)
    return validate(DistillConfig if "teacher" in data else PretrainConfig, data)


def load_teacher(cfg: DistillConfig, storage: Storage) -> tuple[Teacher, dict[str, Tensor] | None]:
    """The frozen teacher network (eval mode, no gradients) and, from a checkpoint, its
    objective state (the running centres), which the student's objective starts from.

    With ``distill.objective=features`` the teacher is its backbone alone (no heads, no centres).
    """
    source = cfg.teacher
    features = cfg.distill.objective == "features"
    if not source.uri:
        raise ValueError("teacher.uri is empty: give a pretrain run folder or backbone weights (a .safetensors, "
                         "Meta's released .pth, a Hugging Face folder)")
    objective_state = None
    network: Teacher
    kind = source.source
    if kind == "auto":
        kind = "checkpoint" if storage.exists(pointer_uri(source.uri)) else "backbone"
    if kind == "checkpoint":
        checkpoint = load_latest_checkpoint(storage, source.uri)
        if checkpoint is None:
            raise ValueError(f"teacher.uri = {source.uri!r} holds no checkpoints/latest.json "
                             "(for backbone weights, a .safetensors or Meta's released .pth, use "
                             "teacher.source=backbone)")
        teacher_cfg = checkpoint_config(checkpoint["config"])
        if features:
            backbone = build_backbone(teacher_cfg, drop_path=False)
            network = HeadlessNetwork(backbone)
            network.load_state_dict({k: v for k, v in checkpoint["teacher"].items() if k.startswith("backbone.")})
            return _frozen(network, cfg), None
        if isinstance(teacher_cfg, DistillConfig) and teacher_cfg.distill.objective == "features":
            raise ValueError(f"teacher.uri = {source.uri!r} was distilled with distill.objective=features and has "
                             "no DINO/iBOT heads: distil from it with distill.objective=features")
        _check_prototypes(teacher_cfg.heads, cfg.heads)
        backbone = build_backbone(teacher_cfg, drop_path=False)
        network = SSLNetwork(backbone, *build_heads(backbone.embed_dim, teacher_cfg.heads))
        network.load_state_dict(checkpoint["teacher"])
        # a distillation's centres followed its own teacher's outputs, not those of its student EMA (the
        # network here): none, as its heads.safetensors has none
        objective_state = None if isinstance(teacher_cfg, DistillConfig) else checkpoint["objective"]
    else:
        layout = "training" if kind == "training" else "auto"  # a training dump is named, never guessed
        dump = read_torch_checkpoint(storage.read_bytes(source.uri), source.uri) if layout == "training" else None
        backbone = load_backbone(source.uri, layout, storage, dump=dump)
        if features:
            return _frozen(HeadlessNetwork(backbone), cfg), None
        saved = find_heads(source.uri, layout, storage, dump)
        if saved is not None:  # the heads trained with this backbone (a pipeline's pretrain output)
            found = saved.settings()
            if found["in_dim"] != backbone.embed_dim:
                raise ValueError(f"{saved.uri} holds heads for a backbone of width {found['in_dim']}, not the "
                                 f"teacher's {backbone.embed_dim}")
            teacher_heads = HeadsConfig(**{k: v for k, v in found.items() if k != "in_dim"})
            _check_prototypes(teacher_heads, cfg.heads)
            network = SSLNetwork(backbone, *build_heads(backbone.embed_dim, teacher_heads))
            load_strict(heads_of(network), saved.heads)
            objective_state = saved.centres or None
        else:
            generator_state = torch.random.get_rng_state()
            torch.manual_seed(cfg.seed + 1)  # the frozen random heads are fixed by the seed
            network = SSLNetwork(backbone, *build_heads(backbone.embed_dim, cfg.heads))
            torch.random.set_rng_state(generator_state)
    return _frozen(network, cfg), objective_state


def _check_prototypes(teacher: HeadsConfig, student: HeadsConfig) -> None:
    """The student's heads must give targets over the teacher's prototypes: same counts, same split."""
    for field in ("num_prototypes", "ibot_separate_head", "ibot_num_prototypes"):
        theirs, ours = getattr(teacher, field), getattr(student, field)
        if theirs != ours and (field != "ibot_num_prototypes" or teacher.ibot_separate_head):
            raise ValueError(f"heads.{field} = {ours} but the teacher's heads have {theirs}: the student's "
                             f"heads must match the teacher's frozen heads")


def _frozen(network: Teacher, cfg: DistillConfig) -> Teacher:
    if network.backbone.patch_size != cfg.model.patch_size:
        raise ValueError(f"model.patch_size = {cfg.model.patch_size} but the teacher's is "
                         f"{network.backbone.patch_size}: the patch loss pairs patches one to one")
    network.requires_grad_(False)
    return network.eval()


def build_student(cfg: DistillConfig, teacher_dim: int | None = None) -> tuple[Student, Teacher]:
    """Student (no stochastic depth) and its EMA (a copy, never trained): with ``heads``, fresh
    heads and an EMA of everything; with ``features``, projectors to ``teacher_dim`` (the teacher
    backbone's width) and an EMA of the backbone only (the projectors are not released).

    ``model.compile_blocks`` compiles the student's blocks (after the copy: the EMA, only
    evaluated, stays eager), as :func:`trainer.engine.build_networks` does."""
    backbone = build_backbone(cfg, drop_path=False)
    if cfg.distill.objective == "features":
        if teacher_dim is None:
            raise ValueError("distill.objective = 'features' needs the teacher's width (teacher_dim)")
        student_ema: Teacher = HeadlessNetwork(copy.deepcopy(backbone))
        student: Student = FeatureStudent(backbone, teacher_dim)
    else:
        student = SSLNetwork(backbone, *build_heads(backbone.embed_dim, cfg.heads))
        student_ema = copy.deepcopy(student)
    if cfg.model.compile_blocks:
        compile_blocks(backbone.blocks, mode=cfg.model.compile_mode)
    return student, student_ema.requires_grad_(False).eval()


def distill_objective(cfg: DistillConfig) -> Objective:
    """The engine's objective with the teacher's targets normalised per ``distill.centering``: the
    choice is distillation's, declared in its config, never the student recipe's ``loss.centering``."""
    loss = cfg.loss.model_copy(update={"centering": cfg.distill.centering})
    return Objective(cfg.model_copy(update={"loss": loss}))


def _centering_before_its_setting(cfg: DistillConfig, saved_config: str) -> dict[str, tuple[str, str]]:
    """For a run saved before ``distill.centering`` existed (its targets normalised per the recipe's
    ``loss.centering``), the centering it resumes with against the one it trained with: a resume
    must not switch how the targets are normalised midway (its stored centres would go unread)."""
    saved = yaml.safe_load(saved_config)
    if cfg.distill.objective != "heads" or "centering" in saved.get("distill", {}):
        return {}
    return {"distill.centering": (cfg.distill.centering, saved.get("loss", {}).get("centering", "softmax"))}


def fingerprint(module: nn.Module) -> str:
    """SHA-256 of every tensor of a module's state (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# -- one step ------------------------------------------------------------------------------

def distill_loss_terms(student: SSLNetwork, teacher: SSLNetwork, objective: Objective, batch: CropBatch,
                       teacher_temp: float) -> dict[str, Tensor]:
    """DINO on CLS (the engine's crop pairing), the patch loss on every global-crop patch, KoLeo.

    Crops ``(2, B, 3, G, G)`` / ``(L, B, 3, l, l)``; ``batch.masks`` is ignored (no masking).
    """
    globals_ = batch.global_crops.flatten(0, 1)  # (2B, 3, G, G), crop-major
    num_images = batch.global_crops.shape[1]
    with torch.no_grad():
        seen = teacher.backbone.forward_features(globals_)
        teacher_patches = seen["x_norm_patchtokens"]  # (2B, N, D_teacher)
        cls_logits, teacher_patch = teacher.heads(  # (2B, K), targets of every patch (2BN, K)
            seen["x_norm_clstoken"], teacher_patches.flatten(0, 1),
            patch_fused=functools.partial(objective.patch_targets, temp=teacher_temp))
        teacher_cls = objective.targets(cls_logits, objective.dino_center, teacher_temp)  # (2B, K)
    outputs = crop_outputs(student.backbone, batch, masked=False)
    global_cls = outputs[0]["x_norm_clstoken"]  # (2B, D)
    every_cls = torch.cat([output["x_norm_clstoken"] for output in outputs])  # (CB, D), crop-major
    student_patches = outputs[0]["x_norm_patchtokens"]  # (2B, N, D)
    if student_patches.shape[1] != teacher_patches.shape[1]:
        raise ValueError(f"student has {student_patches.shape[1]} patches per crop, teacher "
                         f"{teacher_patches.shape[1]}")
    every_patch = torch.ones(student_patches.shape[:2], dtype=torch.bool, device=student_patches.device)  # (2B, N)
    # both heads' prototype layers fused with their losses: no (rows, K) student logits are kept
    dino, ibot = student.heads(
        every_cls, student_patches.flatten(0, 1),
        cls_fused=functools.partial(objective.dino, teacher_probs=teacher_cls.view(2, num_images, -1)),
        patch_fused=functools.partial(objective.ibot, targets=teacher_patch, masks=every_patch,
                                      mask_index=torch.arange(every_patch.numel(), device=every_patch.device)))
    return {
        "dino": dino,
        "ibot": ibot,
        "koleo": sum(objective.koleo(crop) for crop in global_cls.view(2, num_images, -1)),
    }


def feature_loss_terms(student: FeatureStudent, teacher: Teacher, objective: Objective,
                       batch: CropBatch) -> dict[str, Tensor]:
    """Cosine losses of the projected student CLS (every crop) and global-crop patch tokens to
    the teacher backbone's final-norm tokens, KoLeo on the student's global-crop CLS.

    Crops ``(2, B, 3, G, G)`` / ``(L, B, 3, l, l)``; ``batch.masks`` is ignored (no masking). The
    teacher sees the global crops only; no head runs. ``objective`` lends its KoLeo.
    """
    globals_ = batch.global_crops.flatten(0, 1)  # (2B, 3, G, G), crop-major
    num_images = batch.global_crops.shape[1]
    with torch.no_grad():
        seen = teacher.backbone.forward_features(globals_)
        teacher_cls = seen["x_norm_clstoken"].view(2, num_images, -1)  # (2, B, D_teacher)
        teacher_patches = seen["x_norm_patchtokens"]  # (2B, N, D_teacher)
    outputs = crop_outputs(student.backbone, batch, masked=False)
    global_cls = outputs[0]["x_norm_clstoken"]  # (2B, D)
    student_global = student.cls_projector(global_cls).view(2, num_images, -1)  # (2, B, D_teacher)
    student_local = (student.cls_projector(outputs[1]["x_norm_clstoken"]).view(-1, num_images,
                                                                              student_global.shape[-1])
                     if len(outputs) > 1 else None)  # (L, B, D_teacher)
    student_patches = outputs[0]["x_norm_patchtokens"]  # (2B, N, D)
    if student_patches.shape[1] != teacher_patches.shape[1]:
        raise ValueError(f"student has {student_patches.shape[1]} patches per crop, teacher "
                         f"{teacher_patches.shape[1]}")
    return {
        "cls": CLSFeatureLoss()(student_global, student_local, teacher_cls),
        "patch": PatchFeatureLoss()(student.patch_projector(student_patches), teacher_patches),
        "koleo": sum(objective.koleo(crop) for crop in global_cls.view(2, num_images, -1)),
    }


def distill_loss(student: Student, teacher: Teacher, objective: Objective, batch: CropBatch,
                 cfg: DistillConfig, teacher_temp: float) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss of ``cfg.distill.objective`` (its weighted sum) and its unweighted terms.

    ``heads``: ``dino_weight * dino + ibot_weight * ibot + koleo_weight * koleo`` (``loss.*``);
    ``features``: ``cls + distill.patch_weight * patch + loss.koleo_weight * koleo``.
    """
    if cfg.distill.objective == "features":
        if not isinstance(student, FeatureStudent):
            raise TypeError(f"distill.objective = 'features' needs a FeatureStudent, not {type(student).__name__}")
        terms = feature_loss_terms(student, teacher, objective, batch)
        weights = {"cls": 1.0, "patch": cfg.distill.patch_weight, "koleo": cfg.loss.koleo_weight}
    else:
        if not (isinstance(student, SSLNetwork) and isinstance(teacher, SSLNetwork)):
            raise TypeError(f"distill.objective = 'heads' needs a student and a teacher with heads, not "
                            f"{type(student).__name__} and {type(teacher).__name__}")
        terms = distill_loss_terms(student, teacher, objective, batch, teacher_temp)
        weights = {"dino": cfg.loss.dino_weight, "ibot": cfg.loss.ibot_weight, "koleo": cfg.loss.koleo_weight}
    loss = sum(weights[name] * term for name, term in terms.items())
    return loss, terms


def distill_step(student: Student, student_ema: Teacher, teacher: Teacher, objective: Objective,
                 micro_batches: list[CropBatch], sched: ScheduleValues, optimizer: torch.optim.Optimizer,
                 cfg: DistillConfig, autocast_dtype: torch.dtype | None = None,
                 while_waiting: Callable[[], None] | None = None, after: StepLosses | None = None) -> StepLosses:
    """One optimiser step of the student over ``micro_batches`` (gradient accumulation), then the
    EMA update of ``student_ema``; the teacher is only read. Returns the loss terms for logging, read
    or to be read (:meth:`StepLosses.read`): it ends as pretraining's step does
    (:func:`trainer.engine.finish_step`, queued ``after`` the step before if that one is unread)."""
    begin_step(optimizer, sched)
    with objective.one_step():
        losses, names = accumulate(
            micro_batches, autocast_dtype,
            lambda batch: distill_loss(student, teacher, objective, batch, cfg, sched.teacher_temp), Tensor.backward)
    if isinstance(student_ema, HeadlessNetwork):  # projectors: not released
        ema = functools.partial(ema_update, student_ema.backbone, student.backbone, sched.teacher_momentum)
    else:
        ema = functools.partial(ema_update, student_ema, student, sched.teacher_momentum)
    # backbone, then heads or projectors: clipped one by one
    return finish_step(losses, names, optimizer, list(student.children()), cfg.optim.clip_grad, ema,
                       Strategy(), while_waiting, after)


# -- the loop ------------------------------------------------------------------------------

def distill(
    cfg: DistillConfig,
    dataset: Any,
    collate: Callable,
    storage: Storage,
    tracker: Tracker | None = None,
    evaluate: EvalFn | None = None,
    final_evaluate: EvalFn | None = None,
    teacher: tuple[Teacher, dict[str, Tensor] | None] | None = None,
) -> dict[str, Any]:
    """Distil (or resume distilling) into ``cfg.out``; returns the summary written to ``summary.json``.

    Arguments as :func:`trainer.engine.pretrain`; ``evaluate`` scores the student EMA's backbone.
    ``teacher`` (from :func:`load_teacher`) saves re-reading it when several students share one.
    The student EMA's backbone is written to ``backbone.safetensors`` (:func:`save_backbone`).
    """
    if cfg.distributed.strategy != "single":
        raise ValueError(f"distributed.strategy = {cfg.distributed.strategy!r}: distillation runs single-process")
    tracker = tracker or NullTracker()
    device = available_device(cfg.device)
    autocast_dtype = training_autocast(device)
    teacher_network, teacher_objective = teacher or load_teacher(cfg, storage)
    teacher_network = teacher_network.to(device)
    teacher_hash = fingerprint(teacher_network)
    torch.manual_seed(cfg.seed)
    student, student_ema = build_student(cfg, teacher_network.backbone.embed_dim)
    objective = distill_objective(cfg)  # with ``features``, only its KoLeo is used (the centres stay as built)
    state = TrainState()
    checkpoint = load_latest_checkpoint(storage, cfg.out)
    if checkpoint is not None:
        check_resumed(cfg, checkpoint, "distillation", 1, ("distill.objective", "distill.centering", *RESUME_SETTINGS),
                      _centering_before_its_setting(cfg, checkpoint["config"]))
    _check_same_teacher(storage, cfg, teacher_hash, resuming=checkpoint is not None)
    if checkpoint is not None:
        student.load_state_dict(checkpoint["student"])
        student_ema.load_state_dict(checkpoint["teacher"])
        objective.load_state_dict(checkpoint["objective"])
    else:
        if cfg.init_weights:  # the student (and so its EMA) starts from given weights (init_heads=auto: heads too)
            start_from_weights(cfg, student, None, storage)
            student_ema.backbone.load_state_dict(student.backbone.state_dict())
            heads_of(student_ema).load_state_dict(heads_of(student).state_dict())
        if teacher_objective is not None and cfg.distill.centering == "softmax" and cfg.distill.objective == "heads":
            objective.load_state_dict(teacher_objective)  # the teacher's running centres
    student, student_ema, objective = student.to(device), student_ema.to(device), objective.to(device)
    optimizer = build_adamw(student, cfg, device)
    if checkpoint is not None:
        optimizer.load_state_dict(with_kernel_choice(checkpoint["optimizer"], optimizer))
        state = TrainState.from_checkpoint(checkpoint)
    tracker.log_config(cfg)
    crop_of = step_crops(cfg, device)
    side = SideStream(device, cfg.data.side_stream)  # the next batch made beside the step on CUDA (as pretrain)
    micro = cfg.optim.grad_accumulation
    last_step = total_steps(cfg.optim) if cfg.max_steps == 0 else min(cfg.max_steps, total_steps(cfg.optim))
    bad_images = BadImageTracker(cfg.data.max_bad_fraction)
    bad_images.restore(state.bad_images)
    next_images = ImageStream(dataset, collate, state.start_batch(micro), device, bad_images,
                              batch_size=cfg.optim.batch_size, seed=cfg.seed, num_workers=cfg.data.num_workers,
                              resize_from=highres_reads(cfg, micro))
    loader_watch = LoaderWatch(cfg.data.num_workers)

    marks = sorted(m for m in cfg.eval.at_minutes if m > state.train_seconds / 60)
    bar = progress(range(state.step, last_step), desc=f"distill {cfg.name}", total=last_step - state.step,
                   unit="step")
    stopped_early = False
    metrics: dict[str, float] = {}

    def prepare(step: int) -> PreparedStep:
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # the engine's per-step stream (augmentation)
        crop = crop_of(step)

        def make() -> PreparedStep:
            images = [next_images() for _ in range(micro)]
            batches = [CropBatch(*crop(x.images, x.aspects), torch.zeros(0, dtype=torch.bool, device=device),
                                 torch.zeros(0, dtype=torch.long, device=device)) for x in images]  # no masking
            return PreparedStep(batches, sum(len(x.images) for x in images), bad_images.summary(),
                                next_images.loader_batch)

        return side.run(make)

    saved_at = state.step  # the step of the last checkpoint written (or loaded)

    def report(queued: QueuedStep, losses: dict[str, float], seconds: float) -> None:
        nonlocal metrics
        waited = next_images.take_wait()
        loader_watch.update(seconds, waited)
        state.step, state.images_seen = queued.step + 1, state.images_seen + queued.images
        state.train_seconds += seconds
        sched = queued.sched
        metrics = {**{f"loss_{k}": v for k, v in losses.items()}, "lr": sched.lr, "weight_decay": sched.weight_decay,
                   "ema_momentum": sched.teacher_momentum, "teacher_temp": sched.teacher_temp,
                   "images_per_second": queued.images / seconds, "data_wait_share": waited / seconds}
        tracker.log_metrics(metrics, step=state.step)
        state.record(state.step, metrics, cfg.tracking.metric_every)
        bar.set_postfix(loss=f"{losses['total']:.3f}", img_s=f"{metrics['images_per_second']:.0f}")

    upcoming: Future[PreparedStep] | None = None  # the step's batch, prepared during the last step (as pretrain)
    reads = LossReads(cfg.optim.lagged_loss_read, report)  # losses read while the next step runs (as pretrain)
    for step in bar:
        if cfg.max_minutes and state.train_seconds > 60 * cfg.max_minutes:
            stopped_early = True
            break
        sched = schedule_values(step, cfg.optim, cfg.loss)
        with reads.flushed_on_error():
            prepared = upcoming.result() if upcoming is not None else prepare(step)
        side.hand_over(prepared.micro_batches)
        upcoming = Future() if step + 1 < last_step else None
        student.train()
        losses = distill_step(student, student_ema, teacher_network, objective, prepared.micro_batches, sched,
                              optimizer, cfg, autocast_dtype,
                              functools.partial(settle, upcoming, prepare, step + 1) if upcoming else None, reads.after)
        state.bad_images, state.loader_batch = prepared.bad_images, prepared.loader_batch
        save = (step + 1) % cfg.checkpoint_every == 0 or step + 1 == last_step
        due = bool(cfg.eval.every_steps) and (step + 1) % cfg.eval.every_steps == 0
        if not reads.queued(QueuedStep(step, sched, prepared.images, losses), now=lambda: (
                save or due or bool(marks) and state.train_seconds >= 60 * marks[0])):
            continue
        while marks and state.train_seconds >= 60 * marks[0]:
            marks.pop(0)
            due = True
        if evaluate is not None and due:
            with streams_kept(device):  # the next step's draws began (as pretrain)
                results = evaluate(student_ema.backbone, state.step)
            tracker.log_metrics(results, step=state.step, force=True)
            state.history.append({"step": state.step, "train_minutes": round(state.train_seconds / 60, 3),
                                  "images_seen": state.images_seen, **results})
        if save:
            save_checkpoint(storage, cfg.out, checkpoint_bytes(student, student_ema, objective, optimizer, state, cfg),
                            state.step)
            saved_at = state.step
        reads.restart_clock()
    reads.flush()  # stopped by the time limit with the last step unread
    if state.step != saved_at:  # stopped by the time limit between checkpoints
        save_checkpoint(storage, cfg.out, checkpoint_bytes(student, student_ema, objective, optimizer, state, cfg),
                        state.step)
    if metrics:
        tracker.log_metrics(metrics, step=state.step, force=True)
    bad_images.restore(state.bad_images)  # a batch prepared for a step not run (a time limit) does not count
    bad_images.check_run_end()  # a sample of the data: a short run is held to the allowance
    if fingerprint(teacher_network) != teacher_hash:
        raise RuntimeError("the frozen teacher changed during distillation")
    final: dict[str, float] = {}
    closing = final_evaluate or evaluate
    backbone: DinoVisionTransformer = student_ema.backbone
    if closing is not None:
        final = closing(backbone, state.step)
        tracker.log_metrics(final, step=state.step, force=True)
    save_backbone(backbone.cpu(), join_uri(cfg.out, BACKBONE_FILE), storage)
    heads = network_heads(student_ema)  # the EMA's (objective heads); no centres: the teacher's were used
    written = {"heads": join_uri(cfg.out, HEADS_FILE)} if heads else {}
    if heads:
        save_heads(heads, None, written["heads"], storage)
    write_training_curves(state, storage, cfg.out, tracker)
    summary = {"name": cfg.name, "steps": state.step, "images_seen": state.images_seen,
               "train_minutes": round(state.train_seconds / 60, 3), "stopped_early": stopped_early,
               "teacher": cfg.teacher.uri, "teacher_sha256": teacher_hash, "objective": cfg.distill.objective,
               "backbone": join_uri(cfg.out, BACKBONE_FILE), **written, "final": final,
               "bad_images": bad_images.summary(), "history": state.history, "mlflow_run_id": tracker.run_id,
               "tracking": tracker.delivery()}  # metrics sent, still queued or lost (an unreachable store)
    storage.write_bytes(join_uri(cfg.out, SUMMARY_FILE), json.dumps(summary, indent=2).encode())
    return summary


def _check_same_teacher(storage: Storage, cfg: DistillConfig, teacher_hash: str, resuming: bool) -> None:
    """Record the teacher's fingerprint in ``teacher.json`` on a fresh run; on a resume, refuse a
    teacher that differs from the one the run started with (the teacher is not checkpointed)."""
    record = join_uri(cfg.out, "teacher.json")
    if resuming and storage.exists(record):
        started_with = json.loads(storage.read_bytes(record))
        if started_with["sha256"] != teacher_hash:
            raise ValueError(f"{cfg.out} was distilled from another teacher ({started_with['uri']}, sha256 "
                             f"{started_with['sha256'][:12]}...) than {cfg.teacher.uri} now holds (sha256 "
                             f"{teacher_hash[:12]}...)")
        return
    storage.write_bytes(record, json.dumps({"uri": cfg.teacher.uri, "source": cfg.teacher.source,
                                            "sha256": teacher_hash}).encode())


def run_distill(cfg: DistillConfig, storage: Storage, tracker: Tracker, evaluate: bool = True) -> dict[str, Any]:
    """Distil per ``cfg`` (resuming from ``cfg.out``), scoring the student EMA on labelled images
    (k-NN periodically, k-NN + linear probe at the end; :func:`trainer.run.labelled_evaluators`)."""
    from trainer.data.datasets import collate_samples
    from trainer.run import build_dataset, labelled_evaluators

    dataset = build_dataset(cfg.data, cfg.crops, storage)
    periodic, final = labelled_evaluators(cfg, storage) if evaluate else (None, None)
    return distill(cfg, dataset, collate_samples, storage, tracker, evaluate=periodic, final_evaluate=final)
