"""Supervised fine-tuning of a pretrained backbone with a linear classifier, on labelled images.

Why: users of the original ask how to fine-tune its backbones and for fine-tuned weights (its
issues #162, #154, #462); the paper reports about +2 points on ImageNet-1k over the linear probe.
The whole backbone trains with the recipe that fine-tunes self-supervised ViTs (BEiT, MAE,
DeiT III): AdamW with layer-wise learning-rate decay (block ``i`` of ``L`` at
``decay^(L - i)`` of the head's rate, so the early blocks, whose features are the most general,
move least), a linear warm-up then a cosine, stochastic depth rising linearly with depth,
RandAugment and random erasing (kornia's), mixup or cutmix of the batch with itself reversed,
and label smoothing. The loss is the cross-entropy with soft targets,
``-mean_i sum_c t_ic log softmax(z_i)_c``, which for one-hot targets smoothed by ``eps``
(``t = (1 - eps) onehot + eps / C``) is torch's ``cross_entropy(label_smoothing=eps)``.

An epoch here is a pass over the training images (fine-tuning's unit, unlike pretraining's
fixed-length epochs). A run resumes exactly from its checkpoints (each step's draws seeded by
the step, the batches in a seeded order) and writes the fine-tuned ``backbone.safetensors`` (the
official layout: every command that reads a backbone reads it) with ``classifier.safetensors``
(the linear layer, its class names, input and evaluation transform in the metadata: how
:func:`score` prepared the images, the images' ``eval_transform``, so that serving prepares uploads alike)
beside it.

With ``ema_decay`` a moving average of the weights trains beside them (DeiT's model EMA, on each
rank's shards under FSDP2) and is scored at each evaluation; with ``ema_warmup`` its decay after
step ``t`` (1 after the first) is ``min(ema_decay, (1 + t) / (10 + t))`` (TensorFlow's
``ExponentialMovingAverage`` with ``num_updates``), so the start's weights (2/11 of the average
after the first step) fade within some ten steps, not the ``1 / (1 - d)`` of a fixed decay
(:func:`ema_decay_at`). The weights written are those of the last step or, with ``keep: best``,
of the evaluation that scored highest, the EMA's where they beat the weights (:func:`pick_weights`).

The pick is on ``data.val_fraction`` of the train images, held out of training (each class's
share, seeded: :func:`held_out_rows`) and scored at each evaluation beside the test split
(``val_top1``), which is still reported. Without it the pick is on the test split, and its score
optimistic, as the best epoch that MAE and DeiT report is; ``summary.json``'s ``released`` says
which split picked (``picked_on``).
"""

from __future__ import annotations

import copy
import io
import json
import math
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from kornia import augmentation as K
from kornia.augmentation.auto import RandAugment
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from dinoflow.config import FinetuneAugmentConfig, FinetuneConfig
from dinoflow.config_dump import to_yaml
from dinoflow.progress import progress
from dinoflow.run_files import BACKBONE_FILE, CLASSIFIER_FILE, SUMMARY_FILE
from dinoflow.storage import Storage, join_uri
from dinoflow.tracking import NullTracker, Tracker
from evaluators.classification import FolderImages, LabelledImages, labelled_images
from evaluators.visualize import MAX_CONFUSION_CLASSES, confusion_matrix, save_confusion_matrix
from trainer.batches import ImageStream, LoaderWatch
from trainer.checkpoints import (TrainState, check_same_run, load_latest_checkpoint, restore_optimizer,
                                 save_checkpoint, write_training_curves)
from trainer.data.augment import crop_boxes, resized_crops
from trainer.data.datasets import BadImageTracker, FashionMnistDataset, collate_samples
from trainer.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from trainer.devices import available_device
from trainer.engine import ema_update, training_autocast
from trainer.models.classifier import Classifier, load_classifier, save_classifier
from trainer.models.hub import (infer_arch_kwargs, load_backbone, load_strict, read_weights, save_backbone,
                                saved_arch_kwargs, with_positions_for)
from trainer.models.vit import DinoVisionTransformer
from trainer.optim import fused_adamw_on, layer_groups
from trainer.schedules import warmup_cosine
from trainer.strategy import Strategy, build_strategy

BEST_FOLDER = "best"  # <out>/best/step_<N>/: the best evaluation's weights so far (keep = best)
CONFUSION_FILE = "confusion_matrix.png"
LR_BATCH = 256  # base_lr is the rate of a batch of this size, scaled linearly (the MAE/BEiT recipes')
RESUME_SETTINGS = ("weights", "image_size", "head_input", "data.uri", "data.val_fraction")  # a resumed run keeps these
EMA_WARMUP_STEPS = 10  # ema_warmup's (1 + t) / (10 + t): TensorFlow's ExponentialMovingAverage num_updates rule
Split = Literal["test", "val"]


def load_for_finetuning(cfg: FinetuneConfig, storage: Storage, strategy: Strategy | None = None,
                        checkpoint: dict[str, Any] | None = None) -> DinoVisionTransformer:
    """The backbone at ``cfg.weights``, its architecture as saved (or inferred from Meta's files),
    its position table sized for ``image_size`` crops (as the weights' own model resizes it),
    stochastic depth rising linearly to ``drop_path_rate`` over the blocks and its mask token frozen.

    Under a ``strategy`` of several ranks (every rank calls this) only the main rank reads the
    weights: the others get their architecture from it and their tensors through
    :meth:`~trainer.strategy.Strategy.load_whole` (every rank reading them held a whole copy each).
    Resuming ``checkpoint`` (:func:`~trainer.checkpoints.shared_checkpoint`'s), whose tensors replace
    them, the backbone is only built: its architecture read without the weights' tensors
    (:func:`resumed_architecture`)."""
    if not cfg.weights:
        raise ValueError("weights is empty: give the backbone to fine-tune (a run folder, a .safetensors, Meta's "
                         ".pth, a Hugging Face folder, models:/<name>@<alias>)")
    strategy = strategy or Strategy()
    read: dict[str, Tensor] = {}  # the weights' tensors, on the main rank of a fresh run

    def architecture() -> dict[str, Any]:
        if checkpoint is not None:
            return resumed_architecture(cfg, storage, checkpoint["model"])
        state_dict, found = read_weights(cfg.weights, cfg.weights_source, storage)
        read.update(state_dict)
        return found or infer_arch_kwargs(state_dict)

    theirs = strategy.read_on_main(architecture, f"read the weights {cfg.weights}")
    if cfg.image_size % theirs["patch_size"]:
        raise ValueError(f"image_size = {cfg.image_size} is not a multiple of the backbone's patch size "
                         f"{theirs['patch_size']} ({cfg.weights})")
    backbone = DinoVisionTransformer(**{**theirs, "img_size": cfg.image_size, "drop_path_rate": cfg.drop_path_rate,
                                        "drop_path_uniform": False})
    backbone.mask_token.requires_grad_(False)  # no masking here: it stays as pretraining left it
    if checkpoint is None:
        strategy.read_on_main(lambda: load_strict(backbone, with_positions_for(backbone, read, theirs)),
                              f"load the weights {cfg.weights}")
        if strategy.world_size > 1:
            strategy.load_whole(backbone, backbone.state_dict() if strategy.is_main else None)
    return backbone


def resumed_architecture(cfg: FinetuneConfig, storage: Storage, model: dict[str, Tensor]) -> dict[str, Any]:
    """The architecture of ``cfg.weights`` for a run resuming a checkpoint whose ``model`` (a
    ``Classifier``'s state) holds the fine-tuned backbone, without reading the weights' tensors: as
    they save it (:func:`~trainer.models.hub.saved_arch_kwargs`), else inferred from the backbone's
    tensors in ``model``, the weights' own shapes (what a fresh run infers from the weights)."""
    saved = saved_arch_kwargs(cfg.weights, cfg.weights_source, storage)
    return saved or infer_arch_kwargs({key.removeprefix("backbone."): value for key, value in model.items()
                                       if key.startswith("backbone.")})


def train_labels(images: LabelledImages) -> np.ndarray:
    """The train split's labels ``(N,)``, in its order (class folders: from the listing, none decoded)."""
    if isinstance(images, FolderImages):
        return images.train.dataset.labels[images.train.indices]  # type: ignore[attr-defined]
    return images.train_y.numpy()


def held_out_rows(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The rows (positions in ``labels``, sorted) held out of training for selection: of each
    class's ``n_c`` rows, ``round(fraction * n_c)`` (so its share is within half an image of
    ``fraction``), the first of them in one permutation of all rows drawn from ``seed``.

    Why stratified: a plain random share of a small or unbalanced train split can leave a class
    out of the selection scores altogether."""
    order = np.random.default_rng(seed).permutation(len(labels))
    by_class = order[np.argsort(labels[order], kind="stable")]  # each class's rows together, in that order
    counts = np.unique(labels, return_counts=True)[1]
    taken = [by_class[start:start + round(fraction * count)]  # one sort, not a pass over all rows per class
             for start, count in zip(np.cumsum(counts) - counts, counts)]
    return np.sort(np.concatenate([np.zeros(0, dtype=np.int64), *taken]))


def training_images(images: LabelledImages, cfg: FinetuneConfig, storage: Storage,
                    held_out: np.ndarray) -> Dataset:
    """The train split but its ``held_out`` rows (:func:`held_out_rows`) as a data set of decoded
    samples with labels: Fashion-MNIST's 28 px images (of its first ``train_limit``), or the class
    folders' seeded subset decoded at the evaluation's ``image_size / 0.875`` squares holding each
    image's region of aspect up to ``data.max_aspect``, which the random resized crops are cut from."""
    rows = np.setdiff1d(np.arange(len(images.train)), held_out)
    if isinstance(images, FolderImages):
        folder = copy.copy(images.train.dataset)  # the files listed once; decoded here to training's region
        folder.max_aspect = cfg.data.max_aspect  # type: ignore[attr-defined]
        return Subset(folder, [images.train.indices[row] for row in rows])
    dataset = FashionMnistDataset(storage, cfg.data.uri, "train", 28)
    return Subset(dataset, rows.tolist()) if len(rows) < len(dataset) else dataset


def validation_images(images: LabelledImages, held_out: np.ndarray) -> LabelledImages:
    """``images`` whose test split is the train split's ``held_out`` rows, centre-cropped as the test
    images are: what :func:`score` scores for the pick."""
    if isinstance(images, FolderImages):
        rows = [images.train.indices[row] for row in held_out]
        return replace(images, test=Subset(images.train.dataset, rows), remap=torch.arange(len(images.classes)),
                       restricted=False)
    rows_tensor = torch.from_numpy(held_out)
    return replace(images, test=images.train[rows_tensor], test_y=images.train_y[rows_tensor])


def random_resized_crops(pixels: Tensor, aspects: Tensor, size: int, scale: tuple[float, float]) -> Tensor:
    """One random resized crop of each image ``(B, 3, S, S)`` in [0, 1] to ``size`` (bicubic), its box
    drawn in the pixels of the region the square holds (``aspects``: width / height), as the
    pretraining crops are (:func:`~trainer.data.augment.crop_boxes`)."""
    boxes = crop_boxes(len(pixels), scale, pixels.device, aspects)
    return resized_crops(pixels, boxes[None], torch.ones(1, len(pixels), device=pixels.device), size)[0]


def train_augment(cfg: FinetuneConfig) -> nn.Sequential:
    """kornia's per-image augmentation of the crops (:func:`random_resized_crops`): a horizontal
    flip, RandAugment, the ImageNet normalisation, random erasing (each per the config)."""
    augment = cfg.augment
    parts: list[nn.Module] = []
    if augment.horizontal_flip:
        parts.append(K.RandomHorizontalFlip())
    if augment.rand_augment_ops:
        parts.append(RandAugment(n=augment.rand_augment_ops, m=augment.rand_augment_magnitude))
    parts.append(K.Normalize(mean=torch.tensor(IMAGENET_MEAN), std=torch.tensor(IMAGENET_STD)))
    if augment.random_erasing:
        parts.append(K.RandomErasing(p=augment.random_erasing))
    return nn.Sequential(*parts)


def soft_targets(labels: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """One-hot rows smoothed: ``(1 - smoothing) onehot + smoothing / C``."""
    return F.one_hot(labels, num_classes).float() * (1 - smoothing) + smoothing / num_classes


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """``-mean_i sum_c t_ic log softmax(z_i)_c`` in fp32."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


def mix(images: Tensor, targets: Tensor, augment: FinetuneAugmentConfig) -> tuple[Tensor, Tensor]:
    """Mixup or cutmix of a batch with itself reversed, with ``mix_probability`` (cutmix for a
    ``cutmix_share`` of them when both are on), the weight ``lam ~ Beta(a, a)`` drawn per batch as
    the DeiT recipe does. Mixup: ``lam x + (1 - lam) x_rev``; cutmix pastes ``x_rev``'s box of
    ``(1 - lam)`` of the area (centre uniform, clipped at the border) and ``lam`` becomes the share
    of pixels kept. Targets mix with the same ``lam``. Draws come from torch's global generator.

    Why by hand: kornia's mixup and cutmix draw a uniform weight per image and return labels as
    index pairs; the recipe mixes soft (smoothed) targets with one Beta-drawn weight a batch."""
    mixup, cutmix = augment.mixup_alpha > 0, augment.cutmix_alpha > 0
    if not (mixup or cutmix) or float(torch.rand(())) >= augment.mix_probability:
        return images, targets
    cut = cutmix and (not mixup or float(torch.rand(())) < augment.cutmix_share)
    alpha = augment.cutmix_alpha if cut else augment.mixup_alpha
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    partner = images.flip(0)
    if cut:
        height, width = images.shape[-2:]
        side = math.sqrt(1 - lam)
        box_h, box_w = int(height * side), int(width * side)
        cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
        y0, y1 = max(cy - box_h // 2, 0), min(cy + box_h // 2, height)
        x0, x1 = max(cx - box_w // 2, 0), min(cx + box_w // 2, width)
        mixed = images.clone()
        mixed[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (height * width)
    else:
        mixed = images * lam + partner * (1 - lam)
    return mixed, targets * lam + targets.flip(0) * (1 - lam)


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """The EMA's decay in the update after step ``step`` (1 after the first): ``decay``, or with
    ``warmup`` ``min(decay, (1 + step) / (10 + step))``: TensorFlow's ``num_updates`` rule with its
    global step, which the optimizer has advanced when the average is applied. A pure function of
    the step, so a resumed run goes on with the decays of a straight one."""
    return min(decay, (1 + step) / (EMA_WARMUP_STEPS + step)) if warmup else decay


def finetune_step(model: nn.Module, micro_batches: Iterable[tuple[Tensor, Tensor]], count: int,
                  optimizer: torch.optim.Optimizer, lr: float, weight_decay: float, clip_grad: float,
                  autocast_dtype: torch.dtype | None, strategy: Strategy | None = None) -> float:
    """One optimiser step over ``count`` micro-batches of model input and soft targets, each made
    as the step reaches it (so one is on the device at a time) and its gradients accumulated with
    weight ``1 / count``; returns their mean loss over the micro-batches and ranks. A non-finite
    loss (on any rank: each micro-batch's loss is averaged over the ranks before its backward, so
    all of them stop together) raises before any weight moves."""
    strategy = strategy or Strategy()
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_multiplier"]
        group["weight_decay"] = weight_decay * group["wd_multiplier"]
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for images, targets in micro_batches:
        with torch.autocast(images.device.type, dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            logits = model(images)
        loss = soft_cross_entropy(logits, targets)
        value = strategy.mean({"loss": float(loss.detach())})["loss"]
        if not math.isfinite(value):
            optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"the fine-tuning loss is {value}: the weights are kept as before this step; "
                                     "lower optim.base_lr or set optim.clip_grad")
        strategy.backward(loss / count)
        total += value
    if clip_grad:
        strategy.clip_grad_norm_(model.parameters(), clip_grad)
    strategy.step(optimizer)
    return total / count


@torch.no_grad()
def score(model: Classifier, images: LabelledImages, image_size: int, device: torch.device,
          autocast_dtype: torch.dtype | None) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Top-1 (and top-5 with more than 5 classes) accuracy of ``model`` on the test split's centre
    crops (:func:`validation_images`' for the held-out images), over the classes the test split
    holds when it is a separate set of fewer (as the probe scores ImageNet-A and -R); also the
    labels and top-1 predictions, in train's class indices."""
    was_training = model.training
    model.eval()
    allowed = None
    if images.test_classes is not None:
        allowed = torch.zeros(model.head.out_features, dtype=torch.bool, device=device)
        allowed[images.test_classes.to(device)] = True
    labels, ranked = [], []
    for inputs, truth in images.test_batches(device, model.backbone.patch_size, image_size):
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            logits = model(inputs).float()
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        ranked.append(logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu())
        labels.append(truth.cpu())
    model.train(was_training)
    truth, top = torch.cat(labels), torch.cat(ranked)
    metrics = {"top1": float((top[:, 0] == truth).float().mean())}
    if model.head.out_features > 5:
        metrics["top5"] = float((top == truth[:, None]).any(dim=1).float().mean())
    return metrics, truth.numpy(), top[:, 0].numpy()


def classifier_report(model: Classifier, classes: tuple[str, ...], images: LabelledImages, image_size: int,
                      device: torch.device, autocast_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """A fine-tuned ``model`` (trained on ``classes``) scored on the test split of ``images``
    (:func:`score`; a separate test set of fewer classes over its own, as ImageNet-A and -R are):
    ``{"metrics": {"classify_top1", "classify_top5"}, "classes", "test_images"}`` and, up to
    :data:`~evaluators.visualize.MAX_CONFUSION_CLASSES` classes, ``"confusion"`` (rows: true
    classes). The data's classes must be the classifier's, in its order: its outputs are indices
    into them."""
    if tuple(images.classes) != tuple(classes):
        raise ValueError(f"the data's {len(images.classes)} classes ({', '.join(images.classes[:4])}, ...) are not "
                         f"the classifier's {len(classes)} ({', '.join(classes[:4])}, ...): score it on class folders "
                         "named as those it was fine-tuned on")
    metrics, truth, predicted = score(model.to(device), images, image_size, device, autocast_dtype)
    report = {"metrics": {f"classify_{name}": value for name, value in metrics.items()}, "classes": list(classes),
              "test_images": len(truth)}
    if len(classes) <= MAX_CONFUSION_CLASSES:
        report["confusion"] = confusion_matrix(truth, predicted, len(classes)).tolist()
    return report


def pick_weights(rows: Iterable[dict[str, Any]], on: Split) -> tuple[int, str, dict[str, float]]:
    """The evaluation with the highest top-1 on split ``on`` (``"test"``: ``top1``; ``"val"``: the
    held-out train images', ``val_top1``) among history ``rows``: its step, which weights
    (``"weights"``, or ``"ema"`` for the moving average's scores, kept under ``ema_``) and their
    scores on both splits; the earlier wins a tie, and the weights win over their EMA."""
    key = "val_top1" if on == "val" else "top1"
    best: tuple[int, str, dict[str, float]] | None = None
    for row in rows:
        for kind, prefix in (("weights", ""), ("ema", "ema_")):
            scores = {name: row[prefix + name] for name in ("top1", "top5", "val_top1", "val_top5")
                      if prefix + name in row}
            if key in scores and (best is None or scores[key] > best[2][key]):
                best = (row["step"], kind, scores)
    if best is None:
        raise ValueError(f"no evaluation holds a {key} to pick weights by")
    return best


def best_folder(out: str, step: int) -> str:
    """Where ``keep: best`` holds the weights of the evaluation at ``step``."""
    return join_uri(out, BEST_FOLDER, f"step_{step:08d}")


def write_weights(model: Classifier, images: LabelledImages, folder: str, storage: Storage) -> None:
    """``backbone.safetensors`` and ``classifier.safetensors`` of ``model`` (whole), trained on
    ``images`` (their classes and ``eval_transform``, how :func:`score` prepared them, recorded), into ``folder``."""
    save_backbone(model.backbone, join_uri(folder, BACKBONE_FILE), storage)
    save_classifier(model, images.classes, join_uri(folder, CLASSIFIER_FILE), storage,
                    eval_transform=images.eval_transform)


def read_written(folder: str, storage: Storage) -> Classifier:
    """The classifier :func:`write_weights` wrote into ``folder``."""
    return load_classifier(load_backbone(join_uri(folder, BACKBONE_FILE), "safetensors", storage),
                           join_uri(folder, CLASSIFIER_FILE), storage)[0]


def prune_best(out: str, step: int, storage: Storage) -> None:
    """Delete the held weights of every evaluation but ``step``'s. Called when a checkpoint has
    recorded ``step`` as the best, so a run resumed from it never looks for what was deleted."""
    keep = best_folder(out, step)
    for folder in storage.list(join_uri(out, BEST_FOLDER)):
        if folder.rstrip("/") != keep:
            storage.delete(folder, recursive=True)


def _checkpoint_bytes(model: Classifier, ema: Classifier | None, optimizer: torch.optim.Optimizer,
                      state: TrainState, cfg: FinetuneConfig, strategy: Strategy) -> bytes | None:
    """The run state on the main rank, which writes it: whole tensors gathered from every rank (all
    ranks call this), the optimizer's keyed by parameter name, so a run resumes at any world size;
    None on the other ranks, which hold no copy (:meth:`Strategy.full_state_dict_on_main`)."""
    model_state = strategy.full_state_dict_on_main(model)
    optimizer_state = strategy.optimizer_state(model, optimizer)
    ema_state = strategy.full_state_dict_on_main(ema) if ema is not None else None
    if not strategy.is_main:
        return None
    buffer = io.BytesIO()
    torch.save({"model": model_state, "optimizer": optimizer_state,
                **({"ema": ema_state} if ema_state is not None else {}),
                "config": to_yaml(cfg), **state.to_checkpoint()}, buffer)
    return buffer.getvalue()


def finetune(cfg: FinetuneConfig, storage: Storage, tracker: Tracker | None = None) -> dict[str, Any]:
    """Fine-tune (or resume fine-tuning) into ``cfg.out``; returns the summary written to
    ``summary.json``: the final top-1/top-5 on the test split (and ``val_*`` on the held-out
    images), the best evaluation, the weights released and the split that picked them, every
    evaluation, where the weights went. The scores are logged every ``eval_every_epochs``.

    Under ``distributed.strategy=fsdp2`` every rank runs this (started by torchrun: ``dinoflow
    finetune --nproc N``): the backbone and classifier are sharded over the ranks, each reads its
    share of every step's images, and rank 0 alone scores, logs and writes."""
    if not cfg.data.uri:
        raise ValueError("data.uri is empty: give Fashion-MNIST's folder or class folders train/<class>/, val/<class>/")
    strategy = build_strategy(cfg.distributed, available_device(cfg.device))
    finished = False
    try:
        summary = _finetune(cfg, storage, (tracker or NullTracker()) if strategy.is_main else NullTracker(), strategy)
        finished = True
        return summary
    finally:
        strategy.close(finished)


def _finetune(cfg: FinetuneConfig, storage: Storage, tracker: Tracker, strategy: Strategy) -> dict[str, Any]:
    device = torch.device(cfg.device)
    autocast_dtype = training_autocast(device)
    images = labelled_images(cfg.data.uri, cfg.data.kind, storage, cfg.data.train_limit, cfg.data.test_limit,
                             cfg.image_size, cfg.seed, cfg.data.num_workers, cfg.data.test_uri)
    held_out = held_out_rows(train_labels(images), cfg.data.val_fraction, cfg.seed)
    if cfg.data.val_fraction and not len(held_out):
        raise ValueError(f"data.val_fraction = {cfg.data.val_fraction} holds out none of the {len(images.train)} "
                         "train images: raise it or use more images")
    validation = validation_images(images, held_out) if cfg.data.val_fraction else None
    picked_on: Split = "val" if validation is not None else "test"
    train = training_images(images, cfg, storage, held_out)
    checkpoint = load_latest_checkpoint(storage, cfg.out, strategy)  # the whole tensors on the main rank alone
    if checkpoint is not None:
        check_same_run(cfg, checkpoint["config"], RESUME_SETTINGS, "fine-tuning", cfg.out)
    torch.manual_seed(cfg.seed)
    backbone = load_for_finetuning(cfg, storage, strategy, checkpoint)  # read by the main rank alone
    arch, classes = dict(backbone.arch_kwargs), len(images.classes)
    model = Classifier(backbone, classes, cfg.head_input)
    state = TrainState()
    if checkpoint is not None:
        strategy.load_whole(model, checkpoint["model"])
        state = TrainState.from_checkpoint(checkpoint)
    ema = None
    if cfg.ema_decay:  # from the weights at the start, or at the resume of a run that had none
        ema = copy.deepcopy(model).requires_grad_(False)
        if checkpoint is not None and "ema" in checkpoint:
            strategy.load_whole(ema, checkpoint["ema"])
        ema = strategy.wrap_one(ema.to(device))  # sharded as the weights are: updated shard by shard
    model = strategy.wrap_one(model.to(device))  # shards what was loaded
    optim = cfg.optim
    adamw = torch.optim.AdamW(layer_groups(model, optim.layerwise_decay, optim.patch_embed_lr_mult),
                              betas=(optim.adamw_beta1, optim.adamw_beta2),
                              fused=True if fused_adamw_on(optim.fused_adamw, device) else None)
    optimizer = strategy.prepare_optimizer(model, adamw)  # DeepSpeed's engine is made around it
    if checkpoint is not None:
        restore_optimizer(strategy, model, optimizer, checkpoint["optimizer"])
    tracker.log_config(cfg)

    def whole(network: Classifier) -> Classifier:
        """``network`` (the model or its EMA) with whole parameters (gathered under sharding: every
        rank calls this)."""
        return strategy.whole(network, lambda: Classifier(DinoVisionTransformer(**arch), classes, cfg.head_input))

    micro = optim.grad_accumulation
    step_images = optim.batch_size * micro * strategy.world_size
    per_epoch = len(train) // step_images
    if per_epoch == 0:
        raise ValueError(f"the train split holds {len(train)} images, fewer than one step's {step_images} "
                         f"(optim.batch_size = {optim.batch_size} x optim.grad_accumulation = {micro}"
                         f"{f' x {strategy.world_size} ranks' if strategy.world_size > 1 else ''})")
    total = max(round(optim.epochs * per_epoch), 1)
    warmup = int(optim.warmup_epochs * per_epoch)
    peak = optim.base_lr * step_images / LR_BATCH
    last_step = min(cfg.max_steps, total) if cfg.max_steps else total
    eval_every = max(round(cfg.eval_every_epochs * per_epoch), 1) if cfg.eval_every_epochs else 0
    bad_images = BadImageTracker(cfg.data.max_bad_fraction)
    bad_images.restore(state.bad_images)
    stream = ImageStream(train, collate_samples, state.start_batch(micro), device, bad_images,
                         batch_size=optim.batch_size, seed=cfg.seed, num_workers=cfg.data.num_workers,
                         rank=strategy.rank, world_size=strategy.world_size)
    loader_watch = LoaderWatch(cfg.data.num_workers)
    augment = train_augment(cfg).to(device)
    seen = 0  # images in the step's micro-batches

    def micro_batches() -> Iterator[tuple[Tensor, Tensor]]:
        nonlocal seen
        for _ in range(micro):
            batch = stream()
            seen += len(batch.labels)
            crops = random_resized_crops(batch.images.float() / 255, batch.aspects, cfg.image_size,
                                         cfg.augment.crop_scale)
            yield mix(augment(crops), soft_targets(batch.labels, classes, cfg.augment.label_smoothing), cfg.augment)

    Scored = tuple[dict[str, float], np.ndarray | None, np.ndarray | None, Classifier]

    def evaluate() -> tuple[dict[str, Scored], dict[str, Any]]:
        """For the weights and their EMA (``"weights"``, ``"ema"``): the test scores with the
        held-out images' as ``val_*`` (rank 0's; {} on the others), the test labels and
        predictions, and the whole network; and the history's row of the scores (the EMA's as
        ``ema_*``). With ``keep: best``, a new best's weights go to its folder."""
        scored: dict[str, Scored] = {}
        row: dict[str, Any] = {"step": state.step, "train_minutes": round(state.train_seconds / 60, 3),
                               "images_seen": state.images_seen}
        networks = {kind: whole(network) for kind, network in (("weights", model), ("ema", ema))
                    if network is not None}  # gathered by every rank before rank 0 alone scores

        def score_all() -> dict[str, tuple[dict[str, float], np.ndarray, np.ndarray]]:
            scores = {}
            for kind, gathered in networks.items():
                metrics, truth, predicted = score(gathered, images, cfg.image_size, device, autocast_dtype)
                if validation is not None:
                    held = score(gathered, validation, cfg.image_size, device, autocast_dtype)[0]
                    metrics.update({f"val_{name}": value for name, value in held.items()})
                scores[kind] = (metrics, truth, predicted)
            return scores

        scores = strategy.on_main(score_all) or {kind: ({}, None, None) for kind in networks}
        for kind, gathered in networks.items():
            metrics, truth, predicted = scores[kind]
            scored[kind] = (metrics, truth, predicted, gathered)
            row.update({(f"{kind}_" if kind == "ema" else "") + name: value for name, value in metrics.items()})
        tracker.log_metrics({k: v for k, v in row.items() if k not in ("step", "train_minutes", "images_seen")},
                            step=state.step, force=True)
        if state.history and state.history[-1]["step"] == state.step:  # stopped by time right after one
            return scored, row
        state.history.append(row)
        if cfg.keep == "best" and strategy.is_main and pick_weights(state.history, picked_on)[0] == state.step:
            write_weights(scored[pick_weights([row], picked_on)[1]][3], images, best_folder(cfg.out, state.step),
                          storage)
        return scored, row

    saved_at = state.step  # the step of the last checkpoint written (or loaded)

    def save() -> None:
        nonlocal saved_at
        data = _checkpoint_bytes(model, ema, optimizer, state, cfg, strategy)
        if strategy.is_main:
            save_checkpoint(storage, cfg.out, data, state.step)
            if cfg.keep == "best" and any("top1" in row for row in state.history):  # rank 0 scored one
                prune_best(cfg.out, pick_weights(state.history, picked_on)[0], storage)
        saved_at = state.step

    bar = progress(range(state.step, last_step), desc=f"finetune {cfg.name}", total=last_step - state.step,
                   unit="step")
    stopped_early = False
    model.train()
    for step in bar:
        if cfg.max_minutes and state.train_seconds > 60 * cfg.max_minutes:
            stopped_early = True
            break
        tick = time.perf_counter()
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # the step's augmentation, mixing and drop path
        seen = 0
        lr = warmup_cosine(step, total, warmup, peak, optim.min_lr)
        loss = finetune_step(model, micro_batches(), micro, optimizer, lr, optim.weight_decay, optim.clip_grad,
                             autocast_dtype, strategy)
        if ema is not None:
            ema_update(ema, model, ema_decay_at(step + 1, cfg.ema_decay, cfg.ema_warmup))
        # one clock for all ranks, so that a time limit stops them at the same step
        clock = strategy.mean({"seconds": time.perf_counter() - tick, "waited": stream.take_wait(), "seen": seen})
        seconds, waited, stepped = clock["seconds"], clock["waited"], round(clock["seen"] * strategy.world_size)
        loader_watch.update(seconds, waited)
        state.step, state.images_seen, state.train_seconds = step + 1, state.images_seen + stepped, \
            state.train_seconds + seconds
        state.bad_images, state.loader_batch = bad_images.summary(), stream.loader_batch
        metrics = {"loss_train": loss, "lr": lr, "images_per_second": stepped / seconds,
                   "data_wait_share": waited / seconds}
        tracker.log_metrics(metrics, step=state.step)
        state.record(state.step, {"loss_train": loss, "lr": lr}, cfg.tracking.metric_every)
        bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{metrics['images_per_second']:.0f}")
        if eval_every and state.step % eval_every == 0 and state.step != last_step:
            evaluate()
        if state.step % cfg.checkpoint_every == 0 or state.step == last_step:
            save()
    if state.step != saved_at:  # stopped by the time limit between checkpoints
        save()
    if state.step >= per_epoch:  # every training image read: their fraction is the data's
        bad_images.check(final=True)
    else:  # a sample of them: a short run is held to the allowance
        bad_images.check_run_end()
    scored, final_row = evaluate()

    def release() -> tuple[dict[str, Any], dict[str, Any]]:
        """The weights released and the best evaluation (rank 0's work: no collective in it)."""
        best_step, best_kind, best_scores = pick_weights(state.history, picked_on)
        step, kind, metrics = (pick_weights([final_row], picked_on) if cfg.keep == "last"
                               else (best_step, best_kind, best_scores))
        if step == state.step:
            _, truth, predicted, released = scored[kind]
        else:  # an earlier evaluation's, held in its folder: scored again for the confusion matrix
            released = read_written(best_folder(cfg.out, step), storage).to(device)
            _, truth, predicted = score(released, images, cfg.image_size, device, autocast_dtype)
        summary_released = {"step": step, "weights": kind, "picked_on": picked_on, **metrics}
        if classes <= MAX_CONFUSION_CLASSES:  # ImageNet's 1,000: none drawn
            picture = save_confusion_matrix(confusion_matrix(truth, predicted, classes), images.classes,
                                            Path(tempfile.mkdtemp()) / CONFUSION_FILE,
                                            f"{cfg.name}: top-1 {100 * metrics['top1']:.1f} %")
            storage.write_bytes(join_uri(cfg.out, CONFUSION_FILE), picture.read_bytes())
            tracker.log_artifact(picture)
        write_weights(released.cpu(), images, cfg.out, storage)
        if cfg.keep == "best":  # the best's folder stays: a finished run started again releases it again
            prune_best(cfg.out, best_step, storage)
        write_training_curves(state, storage, cfg.out, tracker)
        return ({"step": best_step, "weights": best_kind, "picked_on": picked_on, **best_scores},
                summary_released)

    best, summary_released = strategy.on_main(release) or ({}, {})
    summary = {"name": cfg.name, "weights": cfg.weights, "steps": state.step,
               "epochs": round(state.step / per_epoch, 3),
               "images_seen": state.images_seen, "train_minutes": round(state.train_seconds / 60, 3),
               "stopped_early": stopped_early, "classes": list(images.classes),
               "eval_transform": images.eval_transform,
               "final": scored["weights"][0], **({"final_ema": scored["ema"][0]} if ema is not None else {}),
               "best": best,
               "released": summary_released,
               "backbone": join_uri(cfg.out, BACKBONE_FILE), "classifier": join_uri(cfg.out, CLASSIFIER_FILE),
               "bad_images": bad_images.summary(), "history": state.history, "mlflow_run_id": tracker.run_id,
               "tracking": tracker.delivery()}
    if strategy.is_main:
        storage.write_bytes(join_uri(cfg.out, SUMMARY_FILE), json.dumps(summary, indent=2).encode())
    return summary
