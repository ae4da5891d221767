"""The benchmark suite: every frozen-feature task on one backbone, one JSON report.

Tasks:

* ``knn``, ``linear``, ``logreg``: classification (k-NN at ``ks`` with temperature ``T``; the one-pass
  linear probe; the logistic regression swept over ``C``, :mod:`evaluators.logreg`; each only when in
  ``tasks``) on Fashion-MNIST, with knn next to the raw-pixel k-NN baseline (``pixels_knn_top1_k*``), or on
  folders of class folders, e.g. ImageNet, its test set from ``val/`` or from ``test_uri`` (ImageNet-A, -R,
  -Sketch, -C: scored over their own classes when fewer) (:mod:`evaluators.classification`), with
  ``test_sets`` the same classifiers on further test sets, several in one run (:mod:`evaluators.clean_probes`),
  and with ``corruption_uri`` the same classifiers on each of ImageNet-C's corruption/severity folders (mCE,
  :mod:`evaluators.corruptions`);
* ``seg``: the linear segmentation head on synthetic scenes, or on ADE20K or Pascal VOC
  (``seg_data``) (mIoU, pixel accuracy);
* ``depth``: the linear depth head (or DPT's decoder, ``depth_head_kind="dpt"``) on the same scenes,
  or on NYU-Depth v2 or KITTI (``depth_data``), or trained on one and tested on another (NYU ->
  SUN RGB-D, the original's transfer) (RMSE, AbsRel, delta1);
* ``retrieval``: CLS descriptors on synthetic retrieval sets, or on revisited Oxford or Paris
  (``retrieval_data``) (mAP easy/medium/hard), AmsterTime (mAP, recall at 1 and 5) or the Met
  (GAP of the k-NN recogniser, :mod:`evaluators.met`; ``met_whiten``: PCA whitening learned on its
  database);
* ``video``: the linear probe on ``video_frames`` frames' CLS tokens, averaged or concatenated
  (``video_pool``; ``auto``: each source's protocol, concatenated on SSv2 alone), on synthetic clips
  or on UCF-101, Kinetics-400 or Something-Something v2 as released, or class folders of videos
  (``video_data``) (:mod:`evaluators.video`; top-1);
* ``finegrained``: the logistic regression on each of ``finegrained_data``'s sets (class folders, or
  releases as extracted, :mod:`evaluators.released_sets`), the paper's fine-grained benchmarks
  (Food-101, Cars, Aircraft, ...) in one run (:mod:`evaluators.finegrained`;
  top-1 and mean per-class accuracy), and a binary one per class on a Pascal VOC release among them
  (VOC 2007's protocol, :mod:`evaluators.multilabel`; 11-point mAP);

and with any of the first four, on the test images (scenes, else Fashion-MNIST), the share of
high-norm patch tokens and the CLS token's attention on the patches (:mod:`evaluators.attention`).

The synthetic scenes (:mod:`evaluators.synthetic`) make the dense and retrieval tasks run
anywhere with exact ground truth; the adapters of :mod:`evaluators.dense_datasets` feed the same
heads with the real data sets (``seg_data="ade20k:<root>"``, ``"voc:<root>"`` or ``"cityscapes:<root>"``,
``depth_data="nyu:<root>"`` or ``"kitti:<root>"``, ``"nyu:<root>->sunrgbd:<root>"`` the head trained on
the first and tested on the second's test split; images at ``image_size`` (``dense_image_size``
when given, as ``retrieval_image_size`` for retrieval: one run scores each task at its size), ``train_limit`` /
``test_limit`` of each; on a real data set the head trained on square crops (NYU's and KITTI's of the
depth toolbox's shapes) of the aspect-kept images,
drawn anew at each step, flipped, their colours jittered, resized (seg) or turned (depth) (:func:`train_fit`,
``dense_augment``; the backbone then runs
on every head batch), and tested on whole images through sliding windows at the labels' own
resolution, as the original scores segmentation), and
:func:`~evaluators.retrieval.load_revisited` the retrieval task (``retrieval_data="roxford5k:<root>"``
or ``"rparis6k:<root>"``; :func:`~evaluators.retrieval.load_amstertime`, ``"amstertime:<root>"``;
:func:`~evaluators.met.load_met`, ``"met:<root>"``; the longer side at ``image_size``).

The report is ``{"metrics": {flat name: value}, "tasks": {...}, "config": {...}}`` (plus the
classification ``features`` ``[train_x, train_y, test_x, test_y]`` for plots, not for JSON);
``metrics`` is what MLflow logs and the promotion gate reads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, get_type_hints

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dinoflow.storage import Storage, join_uri
from evaluators.attention import ATTENTION_IMAGES, attention_summary
from evaluators.classification import (DATA_KINDS, DataKind, FolderImages, LabelledFeatures, LabelledImages,
                                       labelled_images, release_images, view)
from evaluators.clean_probes import (CleanClassifiers, score_test_sets, scores_uri, test_set_folders,
                                     test_set_metrics)
from evaluators.corruptions import corruption_errors, corruption_folders, corruption_metrics, score_corruptions
from evaluators.data_settings import TRANSFER, named_roots, named_sets
from evaluators.dense import (
    DEPTH_HEADS,
    MS_SCALES,
    HeadConfig,
    HeadSaves,
    Layers,
    class_weights,
    evaluate_depth,
    evaluate_segmentation,
    multiscale_probabilities,
    patch_tokens,
    row_batches,
    spaced_blocks,
    slid_average,
    slid_logits,
    train_depth_head,
    train_segmentation_head,
)
from evaluators.dense_datasets import (JITTER_BRIGHTNESS, KITTI_MAX_DEPTH, NYU_MAX_DEPTH, SUN_MAX_DEPTH, ArraySplit,
                                       Fit, load_ade20k, load_cityscapes, load_kitti, load_nyu, load_sunrgbd, load_voc)
from evaluators.dense_metrics import retrieval_map
from evaluators.dense_source import FeatureSource, feature_sources
from evaluators.feature_parts import FeatureParts, backbone_digest
from evaluators.features import patch_sides, to_model_input
from evaluators.finegrained import finegrained_metrics, finegrained_scores, protocol_figure
from evaluators.knn import knn_predict
from evaluators.linear import LinearProbeConfig, LinearProbeResult, probe_predictions
from evaluators.logreg import LogRegConfig
from evaluators.met import load_met, met_recognition
from evaluators.multilabel import is_voc, voc_images, voc_scores
from evaluators.real_labels import load_real, real_accuracy
from evaluators.reference import paper_comparison, save_comparison
from evaluators.released_sets import release_at
from evaluators.report import (classification_report, knn_accuracies, knn_bank, linear_report, logreg_fit,
                               report_metrics)
from evaluators.retrieval import (AMSTERTIME_CUTOFF, global_descriptors, load_amstertime, load_revisited,
                                  pair_retrieval, rank_database, revisited_descriptors)
from evaluators.synthetic import CLASS_NAMES, SceneConfig, Scenes, make_retrieval_set, make_scenes
from evaluators.video import POOL_CHOICES, VideoConfig, video_probe
from evaluators.visualize import (
    MAX_CONFUSION_CLASSES,
    confusion_matrix,
    save_attention_maps,
    save_confusion_matrix,
    save_corruption_errors,
    save_dense_predictions,
    save_pca_maps,
    save_sweeps,
)
from trainer.data.datasets import keys_sha256

TASKS = ("knn", "linear", "logreg", "seg", "depth", "retrieval", "video", "finegrained")
CLASSIFICATION_TASKS = ("knn", "linear", "logreg")  # on labelled images (data_uri)
DEFAULT_TASKS = ("knn", "linear")  # what the suite runs when no task is named
RETRIEVAL_SETS = ("roxford5k", "rparis6k", "amstertime", "met")  # retrieval_data's data sets
SEG_SETS, DEPTH_SETS = ("ade20k", "voc", "cityscapes"), ("nyu", "kitti", "sunrgbd")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # the feature pass's autocast dtype


def metric_task(metric: str) -> str | None:
    """The task of :data:`TASKS` whose run reports ``metric`` (a gate's), None where its name names
    none: a classification task anywhere in it (``knn_top1_k20``, ``pixels_knn_top1_k20``,
    ``test_v2_linear_top1``, ``corruption_knn_mce``), else its first word (``seg_miou``,
    ``depth_rmse``). Why: a gate on a metric of a task the run leaves out fails only at the
    register stage, after the training it was to judge."""
    words = metric.split("_")
    return next((task for task in CLASSIFICATION_TASKS if task in words),
                words[0] if words[0] in TASKS else None)


@dataclass(frozen=True)
class SuiteConfig:
    """What the suite runs and on how much data."""

    tasks: tuple[str, ...] = DEFAULT_TASKS
    data_uri: str = ""  # knn, linear, logreg: Fashion-MNIST's files, or train/ and val/ class folders
    test_uri: str = ""  # knn, linear, logreg: a test set's class folders instead of val/ (ImageNet-A/R/Sketch/C)
    test_sets: str = ""  # knn, linear, logreg: comma-separated further test sets of class folders (ImageNet-V2, -A,
    # -R, -Sketch), each scored by the same trained classifiers (test_<set>_<task>_top1, :mod:`evaluators.clean_probes`)
    real_labels: str = ""  # linear on ImageNet: ReaL's real.json, the probe also scored by it (linear_real_top1,
    # :mod:`evaluators.real_labels`)
    corruption_uri: str = ""  # ImageNet-C's root, <corruption>/<severity>/<class>/<image>: the classification
    # tasks run also scored on each folder, a folder's features at a time (corruption_*_mce,
    # :mod:`evaluators.corruptions`)
    data_kind: DataKind = "auto"
    image_size: int = 224  # class folders: the centre crop's side; dense sets: the side (real ones: of the training
    # crops and the test windows, the images' shorter side at it); Oxford/Paris: the longer
    dense_image_size: int = 0  # seg and depth's image_size when they want another (the original: 512-ish), 0: the same
    retrieval_image_size: int = 0  # retrieval's image_size, 0: the same
    num_workers: int = 0  # decoding processes of class folders and the real dense and retrieval sets
    precision: str = "fp32"  # every feature pass: fp32, or the backbone under autocast (bf16, fp16: 2-3x on a GPU)
    train_limit: int = 0
    test_limit: int = 0
    ks: tuple[int, ...] = (10, 20)
    temperature: float = 0.07
    train_scenes: int = 1024
    test_scenes: int = 128
    scene_size: int = 56
    layers: int = 1  # 4: seg's "+ms" protocol's last four blocks, depth's "lin.4" the original's four (spaced_blocks)
    multiscale: bool = False  # segmentation trained at resize ratios 1-3, tested over scales 1-3 (1, 1.32, 1.73,
    # 2.28, 3) and flips, windows half a window apart ("+ms": the original's "ms" configs); where the head
    # trains at one scale (the scenes, no dense_augment), tested over 0.75, 1, 1.25 and flips
    seg_data: str = ""  # "": the scenes; ade20k:<root>, voc:<root> or cityscapes:<root>
    depth_data: str = ""  # "": the scenes; nyu:<root> or kitti:<root>; nyu:<root>->sunrgbd:<root>: a transfer
    seg_head: HeadConfig = field(default_factory=HeadConfig)
    depth_head: HeadConfig = field(default_factory=lambda: HeadConfig(steps=1000))  # ~10x a seg step's cost
    depth_head_kind: str = "linear"  # or "dpt": the DPT decoder on the same four blocks (evaluators/dpt.py)
    dense_cache_gib: float = 4.0  # seg, depth: features held when both splits' fit, else made per batch
    dense_augment: bool = True  # real seg/depth sets: a crop drawn anew each step, flipped, jittered, scaled/turned
    work_dir: str = ""  # save the long work here (feature pass in parts, dense heads' training); a rerun resumes it
    retrieval_scenes: int = 40
    retrieval_data: str = ""  # "": synthetic; roxford5k:<root>, rparis6k:<root>, amstertime:<root> or met:<root>
    met_whiten: bool = False  # the Met: descriptors PCA-whitened as learned on its database (the paper's baselines)
    met_whiten_dim: int = 0  # the components whitening keeps; 0: all the database allows (min(D, N - 1))
    video_data: str = ""  # "": synthetic clips (at scene_size); else a release's root or <root>/train/<class>/<video>
    video_frames: int = 8  # frames of each video through the backbone
    video_pool: str = "auto"  # mean (CLS tokens averaged) or concat; auto: the protocol's, concat on SSv2 alone
    finegrained_data: str = ""  # finegrained: comma-separated roots of sets (class folders, releases, VOC2007)
    seed: int = 0

    def sized_for(self, tasks: str) -> SuiteConfig:
        """The config ``tasks`` ("dense": seg and depth; "retrieval") run with: ``image_size`` their
        own when given, so one evaluation scores classification at 224 and segmentation at 518."""
        own = self.dense_image_size if tasks == "dense" else self.retrieval_image_size
        return replace(self, image_size=own) if own else self

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype of every feature pass (:data:`PRECISIONS`)."""
        return PRECISIONS[self.precision]

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"unknown tasks {unknown or '(none)'}; allowed: {', '.join(TASKS)}")
        if set(CLASSIFICATION_TASKS) & set(self.tasks) and not self.data_uri:
            raise ValueError("knn, linear and logreg need data_uri (Fashion-MNIST's folder, or one of class folders)")
        # (the task without finegrained_data is refused when the suite runs: an option may set them after the tasks)
        if self.finegrained_data:
            named_roots(self.finegrained_data, "finegrained_data")
            if "finegrained" not in self.tasks:
                raise ValueError(f"finegrained_data {self.finegrained_data!r} is scored by the finegrained task: "
                                 f"add it to tasks {list(self.tasks)}")
        if self.corruption_uri and (not set(CLASSIFICATION_TASKS) & set(self.tasks)
                                    or self.data_kind == "fashion_mnist"):
            raise ValueError(f"corruption_uri {self.corruption_uri!r} scores the classification probes on ImageNet-C: "
                             f"it needs knn, linear or logreg on a data_uri of class folders (train/<class>/)")
        if self.test_sets:
            named_roots(self.test_sets, "test_sets")
            if not set(CLASSIFICATION_TASKS) & set(self.tasks) or self.data_kind == "fashion_mnist":
                raise ValueError(f"test_sets {self.test_sets!r} are scored by the classification probes: they need "
                                 f"knn, linear or logreg on a data_uri of class folders (train/<class>/)")
        if self.real_labels and ("linear" not in self.tasks or self.data_kind == "fashion_mnist" or self.test_uri):
            raise ValueError(f"real_labels {self.real_labels!r} scores the linear probe on ImageNet's validation "
                             "images: it needs the linear task on a data_uri of class folders, without test_uri")
        if self.depth_head_kind not in DEPTH_HEADS:
            raise ValueError(f"unknown depth head {self.depth_head_kind!r}; allowed: {', '.join(DEPTH_HEADS)}")
        if self.image_size < 1 or min(self.dense_image_size, self.retrieval_image_size) < 0:
            raise ValueError(f"image_size must be >= 1 and dense_image_size, retrieval_image_size >= 0 (0: "
                             f"image_size), got {self.image_size}, {self.dense_image_size}, "
                             f"{self.retrieval_image_size}")
        if self.dense_cache_gib < 0:
            raise ValueError(f"dense_cache_gib must be >= 0 (0: features made per batch), got {self.dense_cache_gib}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; allowed: {', '.join(PRECISIONS)}")
        if self.video_pool not in POOL_CHOICES:
            raise ValueError(f"unknown video pool {self.video_pool!r}; allowed: {', '.join(POOL_CHOICES)}")
        if self.met_whiten_dim < 0 or (self.met_whiten_dim and not self.met_whiten):
            raise ValueError(f"met_whiten_dim = {self.met_whiten_dim}: must be >= 0 (0: all), and is set only with "
                             f"met_whiten")
        if self.video_frames < 1:
            raise ValueError(f"video_frames must be >= 1, got {self.video_frames}")
        if self.layers < 1:  # (spaced_blocks read 0 or less as 1: depth ran lin.1 under layers = 0)
            raise ValueError(f"layers must be >= 1 (1: the last block; 4: the +ms and lin.4 protocols), got "
                             f"{self.layers}")
        if not self.ks or min(self.ks) < 1 or self.temperature <= 0:
            raise ValueError(f"ks must hold k-NN's neighbour counts, each >= 1, and temperature be > 0; got ks = "
                             f"{list(self.ks)}, temperature = {self.temperature}")
        if self.data_kind not in DATA_KINDS:
            raise ValueError(f"unknown data kind {self.data_kind!r}; allowed: {', '.join(DATA_KINDS)}")
        if self.depth_data.count(TRANSFER) > 1 or TRANSFER in self.seg_data + self.retrieval_data:
            raise ValueError(f"depth_data = {self.depth_data!r}, seg_data = {self.seg_data!r}, retrieval_data = "
                             f"{self.retrieval_data!r}: a transfer, "
                             f"<train set>:<root>{TRANSFER}<test set>:<root>, is depth's alone and one at most")
        for name, given, allowed in (("seg_data", self.seg_data, SEG_SETS), ("depth_data", self.depth_data, DEPTH_SETS),
                                     ("retrieval_data", self.retrieval_data, RETRIEVAL_SETS)):
            if any(kind not in allowed or not root for kind, root in named_sets(given)):
                raise ValueError(f"{name} = {given!r}; give <data set>:<root> with the data set one of "
                                 f"{', '.join(allowed)}, e.g. {allowed[0]}:/data/{allowed[0]}")


OPTION_TYPES = (bool, int, float, str)  # what a settable field holds; tuples and literals keep their own inputs
OPTION_HEADS = ("seg_head", "depth_head")  # the nested configs whose fields are set as <head>.<field>


def settable_options(config: SuiteConfig) -> dict[str, type]:
    """Every setting :func:`with_options` takes: the config's fields of one plain value, its heads'
    as ``seg_head.<field>`` and ``depth_head.<field>``, each with its type."""
    found: dict[str, type] = {}
    for prefix, obj in (("", config), *((f"{head}.", getattr(config, head)) for head in OPTION_HEADS)):
        for name, kind in get_type_hints(type(obj)).items():
            if kind in OPTION_TYPES:
                found[prefix + name] = kind
    return found


def option_values(config: SuiteConfig) -> dict[str, Any]:
    """The value of each of :func:`settable_options` in ``config``, by the same names."""
    return {name: getattr(getattr(config, name.partition(".")[0]), name.partition(".")[2]) if "." in name
            else getattr(config, name) for name in settable_options(config)}


def with_options(config: SuiteConfig, options: Mapping[str, Any], taken: Mapping[str, str] | None = None
                 ) -> SuiteConfig:
    """``config`` with ``options`` set by name (``video_frames``, ``layers``, ``seg_head.lr``, ...):
    one mapping for the settings a caller has no input of its own for, so a pipeline takes a new
    setting of the suite without a new parameter. ``taken`` names the settings the caller sets
    through inputs of its own (setting: input), refused here so each has one way in. A value
    must have the field's type (an int passes for a float, a whole float for an int: a pipeline's
    mapping holds JSON numbers); the config then checks its range."""
    known = settable_options(config)
    taken = taken or {}
    heads: dict[str, dict[str, Any]] = {head: {} for head in OPTION_HEADS}
    flat: dict[str, Any] = {}
    for name, value in options.items():
        if name in taken:
            raise ValueError(f"eval option {name!r} has an input of its own: set it by {taken[name]}")
        if name not in known:
            allowed = ", ".join(sorted(set(known) - set(taken)))
            raise ValueError(f"unknown eval option {name!r}; allowed: {allowed}")
        kind = known[name]
        if kind is float and type(value) is int:
            value = float(value)
        elif kind is int and type(value) is float and value.is_integer():  # a KFP Struct's numbers come as floats
            value = int(value)
        if type(value) is not kind:
            article = "an" if kind is int else "a"
            raise ValueError(f"eval option {name} takes {article} {kind.__name__}, got {type(value).__name__} "
                             f"{value!r}")
        head, dot, field_name = name.partition(".")
        if dot:
            heads[head][field_name] = value
        else:
            flat[name] = value
    return replace(config, **flat, **{head: replace(getattr(config, head), **given)
                                      for head, given in heads.items() if given})


def _real_scores(images: LabelledImages, data: LabelledFeatures, view_name: str, result: LinearProbeResult,
                 config: SuiteConfig, storage: Storage) -> dict[str, float]:
    """The chosen linear probe scored by ImageNet-ReaL's labels of the validation images
    (:mod:`evaluators.real_labels`): ``real_accuracy`` and the images it is over (``real_images``)."""
    if not isinstance(images, FolderImages) or not hasattr(images.test.dataset, "keys"):
        raise ValueError(f"real_labels {config.real_labels!r}: ReaL scores ImageNet's validation images; "
                         f"{config.data_uri} holds no class folders")
    if data.bad["test"]:
        raise ValueError(f"real_labels: ReaL matches every validation image to its row; {data.bad['test']} of "
                         "them could not be decoded")
    keys = [str(key) for key in images.test.dataset.keys[images.test.indices]]
    features = view(data.views[1], view_name, data.train_x.shape[1])  # the probe's view (linear_report needs views)
    accuracy, count = real_accuracy(probe_predictions(result, features), keys,
                                    load_real(storage, config.real_labels))
    return {"real_accuracy": accuracy, "real_images": count}


def _listing(images: LabelledImages) -> list[str | int]:
    """What the train and test splits hold, for the identity of their saved feature parts: class
    folders' image keys (:func:`~trainer.data.datasets.keys_sha256`; folders whose files changed
    between a preempted pass and its resume would mix rows of two listings), else their sizes."""
    if not isinstance(images, FolderImages):
        return [len(images.train), len(images.test)]
    return [keys_sha256(split.dataset.keys[split.indices]) if hasattr(split.dataset, "keys") else len(split)
            for split in (images.train, images.test)]


def _classification(backbone: nn.Module, config: SuiteConfig, storage: Storage, device: torch.device,
                    pictures: str | Path | None, digest: str) -> dict[str, Any]:
    linear = LinearProbeConfig() if "linear" in config.tasks else None
    logreg = LogRegConfig() if "logreg" in config.tasks else None
    images = labelled_images(config.data_uri, config.data_kind, storage, config.train_limit, config.test_limit,
                             config.image_size, config.seed, config.num_workers, config.test_uri)
    for setting in ("corruption_uri", "test_sets"):
        if getattr(config, setting) and not isinstance(images, FolderImages):
            raise ValueError(f"{setting} {getattr(config, setting)}: further test sets are scored by probes trained "
                             f"on class folders, train/<class>/<image>; {config.data_uri} holds Fashion-MNIST")
    # ImageNet-C's folders and the further test sets found (or refused) before the long train pass
    corrupted = corruption_folders(storage, config.corruption_uri) if config.corruption_uri else []
    further = test_set_folders(images, storage, config.test_sets, config.test_limit,
                               config.seed) if config.test_sets else []
    parts, identity = None, {}
    if config.work_dir:
        identity = {"backbone_sha256": digest, "views": linear is not None, "images": _listing(images),
                    **{name: getattr(config, name) for name in ("data_uri", "test_uri", "data_kind", "train_limit",
                                                                 "test_limit", "image_size", "precision", "seed")}}
        parts = FeatureParts(storage, join_uri(config.work_dir, "classification"), identity)
    data = images.features(backbone, views=linear is not None, amp_dtype=config.amp_dtype, parts=parts)
    splits = [data.train_x, data.train_y, data.test_x, data.test_y]
    classes = len(data.classes)
    knn = "knn" in config.tasks  # k-NN (test set, further ones, ImageNet-C, raw pixels) only when asked
    report = classification_report(data, config.ks, config.temperature, None, device, knn=knn)
    probe = None  # the chosen view's probe, its classifier kept for the further test sets and ImageNet-C
    if linear is not None:
        report["linear"], result = linear_report(data, linear, device)
        probe = report["linear"]["view"], result
        if config.real_labels:
            report["linear"].update(_real_scores(images, data, report["linear"]["view"], result, config, storage))
    fit = None  # the logistic regression's refit, kept for them too
    if logreg is not None:
        fit = logreg_fit(data, logreg, device)
        report["logreg"] = fit.to_dict()
    report.update(classes=list(data.classes), bad_images=data.bad)
    metrics = report_metrics(report)
    usable = [k for k in config.ks if f"k{k}" in report.get("knn", {})]  # (ks above the train set's size: skipped)
    k = (20 if 20 in usable else usable[-1]) if usable else None  # the confusion matrix's k, the test sets' too
    clean = CleanClassifiers(k, config.temperature, probe, fit)
    if further:
        saves = scores_uri(config.work_dir, "test-sets", {**identity, "test_sets": config.test_sets},
                           clean) if config.work_dir else ""
        report["test_sets"] = score_test_sets(further, data, backbone, storage, clean, device, config.amp_dtype,
                                              saves)
        metrics.update(test_set_metrics(report["test_sets"]))
    if corrupted:
        assert isinstance(images, FolderImages)
        saves = scores_uri(config.work_dir, "corruptions", {**identity, "corruption_uri": config.corruption_uri},
                           clean) if config.work_dir else ""
        report["corruptions"] = score_corruptions(images, data, backbone, storage, corrupted, clean, device,
                                                  config.amp_dtype, config.test_limit, config.seed, saves)
        metrics.update(corruption_metrics(report["corruptions"]))
        if pictures is not None:
            save_corruption_errors(corruption_errors(report["corruptions"]), Path(pictures) / "corruption_errors.png")
    if pictures is not None and classes <= MAX_CONFUSION_CLASSES and k is not None:
        predictions = knn_predict(*knn_bank(data), data.test_x, k=k, temperature=config.temperature,
                                  num_classes=classes, device=device).numpy()
        save_confusion_matrix(confusion_matrix(data.test_y.numpy(), predictions, classes), data.classes,
                              Path(pictures) / "confusion_knn.png",
                              title=f"k-NN (k={k}) on frozen CLS features: {100 * report['knn'][f'k{k}']:.1f}%")
    sweeps = {}  # each probe's held-out accuracy over its hyper-parameter
    if "linear" in report:
        chosen = report["linear"]
        sweeps[f"linear probe ({chosen['view']})"] = ("learning rate", chosen["learning_rates"],
                                                      chosen["val_accuracies"], "top-1")
    if "logreg" in report:
        sweeps["logistic regression"] = ("C", report["logreg"]["c_values"], report["logreg"]["val_accuracies"], "top-1")
    if pictures is not None and sweeps:
        save_sweeps(sweeps, Path(pictures) / "probe_sweeps.png")
    if knn and data.pixels is not None:
        report["pixels_knn"] = knn_accuracies(data.pixels[0], data.train_y, data.pixels[1], data.test_y, ks=config.ks,
                                              temperature=config.temperature, num_classes=classes, device=device)
        metrics.update({f"pixels_knn_top1_{k}": v for k, v in report["pixels_knn"].items()})
    return {"metrics": metrics, "report": report, "features": splits, "looked_at": (data.test_images, data.foreground)}


def _finegrained(backbone: nn.Module, config: SuiteConfig, storage: Storage, device: torch.device, digest: str,
                 pictures: str | Path | None) -> dict[str, dict]:
    """Each set of ``finegrained_data`` (:mod:`evaluators.finegrained`; ``train_limit``, ``test_limit``
    and ``image_size`` as the classification's) scored by the logistic regression (a Pascal VOC
    release by one per class, :mod:`evaluators.multilabel`; a set's release read as it is laid out,
    :mod:`evaluators.released_sets`, else class folders), one set's features held at a time, its
    feature pass saved under ``<work_dir>/finegrained/<name>``; with ``pictures``, each set's sweep
    over C in ``finegrained_sweeps.png``."""
    report = {}
    for name, root in named_roots(config.finegrained_data, "finegrained_data"):
        sizes = (config.train_limit, config.test_limit, config.image_size, config.seed, config.num_workers)
        voc = voc_images(root, storage, *sizes) if is_voc(root, storage) else None
        release = None if voc else release_at(root, storage)
        if voc:
            images = voc.images
        elif release:
            images = release_images(release, root, storage, *sizes)
        else:
            images = labelled_images(root, "folder", storage, *sizes)
        parts = None
        if config.work_dir:
            identity = {"backbone_sha256": digest, "data_uri": root,
                        **{key: getattr(config, key) for key in ("train_limit", "test_limit", "image_size",
                                                                 "precision", "seed")}}
            parts = FeatureParts(storage, join_uri(config.work_dir, "finegrained", name), identity)
        data = images.features(backbone, amp_dtype=config.amp_dtype, parts=parts)
        report[name] = {**(voc_scores(voc, data, device) if voc else finegrained_scores(data, device)), "root": root,
                        "release": "Pascal VOC" if voc else release or "class folders"}
        report[name]["protocol"] = protocol_figure(report[name])[0]
    if pictures is not None:
        sweeps = {}
        for name, scores in report.items():
            held_out = (scores["val_maps"], "mAP") if "val_maps" in scores else (scores["val_accuracies"], "top-1")
            sweeps[f"logistic regression ({name})"] = ("C", scores["c_values"], *held_out)
        save_sweeps(sweeps, Path(pictures) / "finegrained_sweeps.png")
    return report


# a real dense data set: its loader, (train split, test split), and its classes (seg) or
# largest depth in metres (depth), the heads' label range (a depth set's predictions capped there when tested)
DENSE_SETS = {"ade20k": (load_ade20k, ("training", "validation"), 150), "voc": (load_voc, ("train", "val"), 21),
              "cityscapes": (load_cityscapes, ("train", "val"), 19),
              "nyu": (load_nyu, ("train", "test"), NYU_MAX_DEPTH),
              "kitti": (load_kitti, ("train", "test"), KITTI_MAX_DEPTH),
              "sunrgbd": (load_sunrgbd, ("train", "val"), SUN_MAX_DEPTH)}


SEG_SCALES, DEPTH_ROTATION = (0.5, 2.0), 2.5  # the original's heads' resize ratios (mmseg), rotation (the toolbox)
SEG_SCALES_MS = (1.0, 3.0)  # +ms: its "ms" configs' resize ratios, the range its test scales span (MS_SCALES)
# +ms where the head trained at its images' own scale alone (the scenes, real sets without dense_augment): the
# scales near it, not the original's 1-3, at which it never trained
MS_NEAR_SCALES = (0.75, 1.0, 1.25)
SEG_MAX_CLASS_SHARE = 0.75  # mmseg's cat_max_ratio: a crop placed again while one class holds this much of it


# the training crops' (rows, columns) / the images' shorter side: the depth toolbox's NYU crops (416 x 544 of the
# 427 x 565 its NYUCrop leaves of a 480 x 640 frame) and KITTI's, mmseg's Cityscapes crop (512 x 1024 of
# 1024 x 2048 frames); the other sets' crops are image_size squares
TRAIN_CROPS = {"nyu": (416 / 427, 544 / 427), "kitti": (1.0, 2.0), "cityscapes": (0.5, 1.0)}
DEPTH_BRIGHTNESS = {"kitti": (0.9, 1.1)}  # the toolbox's jitter of KITTI's outdoor frames; others: JITTER_BRIGHTNESS


def train_fit(task: str, config: SuiteConfig, patch: int) -> Fit:
    """The training crops of a real dense set: ``image_size`` squares (NYU's and KITTI's of the
    depth toolbox's shape, 416 x 544 of 427 x 565 and 352 x 704 of 352 x 1216, Cityscapes' of
    mmseg's, 512 x 1024 of 1024 x 2048, at ``image_size`` for the shorter side, each side a
    multiple of ``patch``), drawn anew at each step with
    ``dense_augment`` (flipped, colours jittered, KITTI's brightness by 0.9-1.1, the others' by
    0.75-1.25; for segmentation resized by a ratio of 0.5-2 (+ms: 1-3, its test scales' range) and
    placed again while one class holds 3/4 of the crop, for depth turned by up to 2.5 degrees, as
    the original's heads train), else one per image."""
    trained_on = named_sets(getattr(config, f"{task}_data"))[0][0]
    shape = TRAIN_CROPS.get(trained_on)
    crop = (0, 0)
    if shape:
        rows, cols = patch_sides((config.image_size * shape[0], config.image_size * shape[1]), patch)
        crop = (rows, cols)
    if not config.dense_augment:
        return Fit("crop", config.image_size, config.seed, crop=crop)
    return Fit("crop", config.image_size, config.seed, augment=True, crop=crop,
               **({"scales": SEG_SCALES_MS if config.multiscale else SEG_SCALES,
                   "max_class_share": SEG_MAX_CLASS_SHARE} if task == "seg"
                  else {"rotation": DEPTH_ROTATION, "brightness": DEPTH_BRIGHTNESS.get(trained_on, JITTER_BRIGHTNESS)}))


@dataclass(frozen=True)
class _DenseTask:
    """One dense task's train and test splits (:class:`~evaluators.dense_source.FeatureSource`),
    its classes (seg) or largest depth (depth), and the scenes' shapes (class > 0) in the test
    images (None for real data)."""

    train: FeatureSource
    test: FeatureSource
    label_range: float
    foreground: np.ndarray | None
    windowed: bool = False  # real data: the test images whole, aspect kept, scored through sliding windows
    test_range: float = 0.0  # depth on real data: the predictions capped at the test set's largest depth
    fit: Fit | None = None  # real data: how the training crops are drawn (:func:`train_fit`); None: the scenes


def _dense_tasks(backbone: nn.Module, config: SuiteConfig, storage: Storage) -> dict[str, _DenseTask]:
    """The data of each dense task asked for: a real data set when named, else the scenes (made
    once for seg and depth; each task's features its own, the blocks read differing: :func:`task_norm`)."""
    made: dict[str, _DenseTask] = {}
    scenes: tuple[Scenes, Scenes] | None = None  # the training and test scenes, when made

    def sources(splits: list, test_read: bool, layers: Layers, norm: bool) -> list[FeatureSource]:
        return feature_sources(backbone, splits, layers, config.amp_dtype, config.num_workers,
                               config.dense_cache_gib * 2**30, read=(True, test_read), norm=norm)

    for task, given in (("seg", config.seg_data), ("depth", config.depth_data)):
        if task not in config.tasks:
            continue
        layers, norm = task_layers(task, config, len(backbone.blocks)), task_norm(task)
        if given:
            parts = named_sets(given)  # a transfer: trained on the first
            (name, root), (test_name, test_root) = parts[0], parts[-1]
            load, (train_split, _), label_range = DENSE_SETS[name]
            test_load, (_, test_split), test_range = DENSE_SETS[test_name]
            fits = (train_fit(task, config, int(backbone.patch_size)), Fit("whole", config.image_size))
            splits = [load(storage, root, train_split, fits[0], config.train_limit),
                      test_load(storage, test_root, test_split, fits[1], config.test_limit)]
            if config.dense_augment:  # each step's crops drawn anew: the backbone runs on every head batch
                train, test = (FeatureSource(split, backbone, layers, config.amp_dtype, config.num_workers, norm)
                               for split in splits)
            else:  # tested on whole images, by windows
                train, test = sources(splits, test_read=False, layers=layers, norm=norm)
            made[task] = _DenseTask(train, test, float(label_range), None, windowed=True, test_range=float(test_range),
                                    fit=fits[0])
            continue
        scene = SceneConfig(size=config.scene_size)
        if scenes is None:
            scenes = (make_scenes(config.train_scenes, config.seed, scene),
                      make_scenes(config.test_scenes, config.seed + 1, scene))
        train_scenes, test_scenes = scenes
        labels = [(s.masks if task == "seg" else s.depths) for s in scenes]
        train, test = sources([ArraySplit(train_scenes.images, labels[0]), ArraySplit(test_scenes.images, labels[1])],
                              test_read=task == "depth" or not config.multiscale, layers=layers, norm=norm)
        made[task] = _DenseTask(train, test, float(len(CLASS_NAMES)) if task == "seg" else float(scene.far),
                                test_scenes.masks != 0)
    return made


def task_layers(task: str, config: SuiteConfig, depth: int) -> Layers:
    """The blocks a dense head reads: one, the last; with 4 (``config.layers``), segmentation's
    "+ms" the last four, depth's "lin.4" four spread over the backbone (the original's table for
    the released depths, else evenly spaced: :func:`~evaluators.dense.spaced_blocks`), as the
    original's heads do; the DPT depth head those four, always."""
    if task != "depth":
        return config.layers
    if config.depth_head_kind == "dpt" and depth < 4:
        raise ValueError(f"the DPT depth head reads 4 blocks; this backbone has {depth}: use depth_head linear")
    return spaced_blocks(depth, 4 if config.depth_head_kind == "dpt" else config.layers)


def task_norm(task: str) -> bool:
    """Whether a dense head reads its blocks through the backbone's final LayerNorm: segmentation's
    does, depth's (linear or DPT) does not, as the original's depth backbones call
    ``get_intermediate_layers(..., norm=False)`` and its segmentation ones the default."""
    return task != "depth"


def _head_saves(task: str, config: SuiteConfig, storage: Storage, digest: str, dense: _DenseTask) -> HeadSaves | None:
    """Where the ``task`` head's training saves its state under ``config.work_dir`` (None: no
    work_dir), named by what it is of: the backbone, the blocks it reads (and whether through the
    final LayerNorm), the training data and its crops (``dense``'s) and the head's settings."""
    if not config.work_dir:
        return None
    given = getattr(config, f"{task}_data")  # a transfer's test set is not the head's: its training set alone
    data = ":".join(named_sets(given)[0]) if given else {"train_scenes": config.train_scenes,
                                                          "scene_size": config.scene_size}
    settings = ("image_size", "train_limit", "precision", "seed")
    head = asdict(getattr(config, f"{task}_head"))
    if task == "depth" and config.depth_head_kind != "linear":  # (a linear head's saves named as before)
        head["kind"] = config.depth_head_kind
    identity = {"backbone_sha256": digest, "data": data, "head": head,
                "samples": asdict(dense.fit) if dense.fit else "squares", "layers": dense.train.layers,
                **{name: getattr(config, name) for name in settings}}
    if not dense.train.norm:  # depth's blocks read unnormed: saves from before (normed blocks, softmax or DPT bins)
        # are refused, not resumed
        identity["norm"] = False
    if getattr(dense.train.split, "layout", "") == "trainaug":  # VOC's SBD-augmented set: train.txt's saves refused
        identity["layout"] = "trainaug"
    return HeadSaves(storage, join_uri(config.work_dir, f"{task}-head"), identity)


def _ms_scales(data: _DenseTask) -> tuple[float, ...]:
    """+ms's test scales: the original's (:data:`~evaluators.dense.MS_SCALES`, 1-3) for a head
    trained at their range of resize ratios (:data:`SEG_SCALES_MS`), else :data:`MS_NEAR_SCALES`."""
    return MS_SCALES if data.fit is not None and data.fit.scales == SEG_SCALES_MS else MS_NEAR_SCALES


def _segmentation(backbone: nn.Module, data: _DenseTask, config: SuiteConfig, saves: HeadSaves | None,
                  keep: int) -> tuple[dict[str, float], torch.Tensor]:
    """The segmentation head trained on ``data.train`` (classes weighted by their pixels) and its
    scores on ``data.test`` (+ms: over scales and flips), with its first ``keep`` class maps."""
    device = next(backbone.parameters()).device
    classes = int(data.label_range)
    weight = class_weights(data.train.class_counts(classes), config.seg_head.class_balance)
    source = data.train
    head = train_segmentation_head(lambda rows: ((patches, masks) for patches, _, masks in source.batches(rows)),
                                   len(source), source.channels, classes, weight, config.seg_head, device, saves)
    if data.windowed:
        def scores(x: torch.Tensor) -> torch.Tensor:  # +ms: probabilities; else the windows' mean logits, as mmseg's
            return (multiscale_probabilities(backbone, head, x, config.layers, _ms_scales(data),
                                             amp_dtype=config.amp_dtype, window=config.image_size)
                    if config.multiscale else
                    slid_logits(backbone, head, x, config.image_size, config.layers, config.amp_dtype))

        return evaluate_segmentation(_windowed(scores, data.test, config), classes, keep=keep,
                                     kept_side=config.image_size)
    tests = row_batches(len(data.test))
    scored = (((multiscale_probabilities(backbone, head, images, config.layers, _ms_scales(data),
                                         amp_dtype=config.amp_dtype), masks)
               for images, masks in data.test.inputs(tests)) if config.multiscale else
              ((head(patches.to(device), tuple(masks.shape[-2:])), masks)
               for patches, _, masks in data.test.batches(tests)))
    return evaluate_segmentation(scored, classes, keep=keep)


def _windowed(predict: Callable[[torch.Tensor], torch.Tensor], test: FeatureSource,
              config: SuiteConfig) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(prediction, labels ``(1, H, W)``) of each whole test image at its labels' own resolution:
    ``predict`` (class logits or probabilities ``(1, C, h, w)``, or depths ``(1, h, w)``, through
    sliding windows of ``image_size``) on the image with its shorter side at ``image_size`` (its longer one rounded
    to the patch), resized bilinearly to the labels."""
    patch = int(test.backbone.patch_size)
    for image, labels in test.whole_images():
        side = patch_sides(image.shape[-2:], patch)
        predicted = predict(to_model_input(image[None], size=side, patch_size=patch))  # on the device
        flat = predicted.ndim == 3  # depths: no channel dimension
        resized = F.interpolate(predicted[:, None] if flat else predicted, size=tuple(labels.shape), mode="bilinear",
                                align_corners=False)
        yield (resized[:, 0] if flat else resized), labels[None]


def _depth(data: _DenseTask, config: SuiteConfig, device: torch.device, saves: HeadSaves | None,
           keep: int) -> tuple[dict[str, float], torch.Tensor]:
    """The depth head trained on ``data.train`` and its scores on ``data.test``, with its first
    ``keep`` depth maps."""
    head = train_depth_head(data.train.batches, len(data.train), data.train.channels, config.depth_head,
                            max_depth=data.label_range, device=device, saves=saves, kind=config.depth_head_kind)
    if data.windowed:
        backbone = data.test.backbone

        def depths(x: torch.Tensor) -> torch.Tensor:  # capped at the test set's range (SUN RGB-D's 8 m after NYU)
            return slid_average(backbone, lambda patches, cls, size: head(patches.to(device), cls.to(device), size),
                                x, config.image_size, data.test.layers, config.amp_dtype,
                                norm=data.test.norm).clamp(max=data.test_range)

        return evaluate_depth(_windowed(depths, data.test, config), keep=keep, kept_side=config.image_size)
    return evaluate_depth(((head(patches.to(device), cls.to(device), tuple(depths.shape[-2:])), depths)
                           for patches, cls, depths in data.test.batches(row_batches(len(data.test)))), keep=keep)


def _retrieval(backbone: nn.Module, config: SuiteConfig, storage: Storage) -> dict[str, float]:
    """mAP (easy, medium, hard) of CLS descriptors on revisited Oxford or Paris, else on synthetic
    sets; on AmsterTime its mAP and recalls at 1 and 5, both ways (archival photos querying today's
    and today's the archival, as its evaluation scores them; :func:`~evaluators.retrieval.pair_retrieval`);
    on the Met its GAP (:func:`~evaluators.met.met_recognition`)."""
    if config.retrieval_data:
        [(name, root)] = named_sets(config.retrieval_data)
        if name == "met":
            return met_recognition(backbone, load_met(storage, root), storage, config.image_size,
                                   amp_dtype=config.amp_dtype, num_workers=config.num_workers,
                                   whiten=config.met_whiten, whiten_dim=config.met_whiten_dim or None)
        revisited = load_amstertime(storage, root) if name == "amstertime" else load_revisited(storage, root, name)
        queries, database = revisited_descriptors(backbone, revisited, storage, config.image_size,
                                                  amp_dtype=config.amp_dtype, num_workers=config.num_workers)
        if name == "amstertime":  # AmsterTime's "All": the old queried on the new and the new on the old
            return pair_retrieval(np.concatenate([rank_database(queries, database)[0],
                                                  rank_database(database, queries)[0]]), AMSTERTIME_CUTOFF)
        truths = revisited.truths
    else:
        synthetic = make_retrieval_set(config.retrieval_scenes, seed=config.seed + 2,
                                       config=SceneConfig(size=config.scene_size))
        queries, database = (global_descriptors(backbone, to_model_input(x, patch_size=backbone.patch_size),
                                                amp_dtype=config.amp_dtype)
                             for x in (synthetic.queries, synthetic.database))
        truths = synthetic.truths
    ranking, _ = rank_database(queries, database)
    return dict(retrieval_map(ranking, truths))


def _dense_pictures(dense: dict[str, _DenseTask], predicted: dict[str, np.ndarray], folder: Path, shown: int,
                    side: int) -> None:
    """``pca_features.png`` of the first task's first ``shown`` test images, and their predictions
    beside the truth: ``dense_predictions.png`` when seg and depth score the same scenes, else
    ``seg_predictions.png`` and ``depth_predictions.png`` (ADE20K's masks, NYU's depths). Whole
    test images (windowed) are drawn as ``side`` squares, as their kept predictions are."""

    def first(data: _DenseTask) -> tuple[torch.Tensor, np.ndarray]:
        items = [data.test.split[i] for i in range(min(shown, len(data.test)))]
        if data.windowed:
            items = [(F.interpolate(image[None].float(), size=(side, side), mode="bilinear", align_corners=False)
                      .round().clamp(0, 255).to(torch.uint8)[0],
                      F.interpolate(label[None, None].float(), size=(side, side), mode="nearest")[0, 0].to(label.dtype))
                     for image, label in items]
        return torch.stack([image for image, _ in items]), torch.stack([label for _, label in items]).numpy()

    truths = {task: first(data) for task, data in dense.items()}  # each task's first images decoded once
    lead = next(iter(dense))
    source, images = dense[lead].test, truths[lead][0]
    model_input = to_model_input(images.to(next(source.backbone.parameters()).device),
                                 patch_size=int(source.backbone.patch_size))
    patches = patch_tokens(source.backbone, model_input, source.layers, source.amp_dtype, source.norm)[0]
    save_pca_maps(images.numpy(), patches.cpu().numpy(), folder / "pca_features.png")
    seg = {"masks": truths["seg"][1], "predicted_masks": predicted["seg"], "num_classes": int(dense["seg"].label_range)
           } if "seg" in dense else {}
    depth = {"depths": truths["depth"][1], "predicted_depths": predicted["depth"]} if "depth" in dense else {}
    if seg and depth and all(data.foreground is not None for data in dense.values()):  # the same scenes
        save_dense_predictions(images.numpy(), folder / "dense_predictions.png", **seg, **depth)
        return
    for task, drawn in (("seg", seg), ("depth", depth)):
        if drawn:
            save_dense_predictions(truths[task][0].numpy(), folder / f"{task}_predictions.png", **drawn)


def run_suite(backbone: nn.Module, config: SuiteConfig, storage: Storage | None = None,
              pictures: str | Path | None = None) -> dict[str, Any]:
    """Run ``config.tasks`` on ``backbone`` (in eval mode, not moved); returns the report.

    With ``pictures`` (a local folder) and knn, it saves ``confusion_knn.png`` (k-NN's
    confusion matrix, up to 30 classes) and with linear or logreg ``probe_sweeps.png`` (the held-out
    accuracy over the learning rates or C); with the dense tasks, ``pca_features.png``
    (test scenes and their patch features' first three principal components as RGB) and
    ``dense_predictions.png`` (masks and depth maps, true and predicted; on real data sets
    ``seg_predictions.png`` and ``depth_predictions.png``); with either the dense
    or the classification tasks, ``attention_maps.png`` (:func:`attention_figures`); with video,
    ``video_frames.png`` (the first test videos' frames as the backbone sees them); with
    ``corruption_uri``, ``corruption_errors.png`` (each classifier's error over the severities);
    with finegrained, ``finegrained_sweeps.png``; where a benchmark ran as the original's on a
    backbone of a released model's shape, ``paper_comparison.md`` (:mod:`evaluators.reference`; the
    report's ``tasks["paper"]``).
    """
    if "finegrained" in config.tasks and not config.finegrained_data:
        raise ValueError("the finegrained task needs finegrained_data: comma-separated roots of class folders "
                         "(train/<class>/, val/<class>/), of sets as released (Food-101, CUB_200_2011, ...) or of "
                         "Pascal VOC 2007, e.g. s3://d/food101,s3://d/cars")
    backbone.eval()
    storage = storage or Storage()
    metrics: dict[str, float] = {}
    tasks: dict[str, Any] = {}
    features = None
    looked_at = None  # (uint8 test images, their foreground or None) for the attention maps: the scenes' first
    device = next(backbone.parameters()).device
    digest = backbone_digest(backbone) if config.work_dir else ""  # names the saved work
    if set(CLASSIFICATION_TASKS) & set(config.tasks):
        result = _classification(backbone, config, storage, device, pictures, digest)
        metrics.update(result["metrics"])
        tasks["classification"] = result["report"]
        features = result["features"]
        looked_at = result["looked_at"]  # Fashion-MNIST's with the garments' silhouettes, or class folders'

    sized = config.sized_for("dense")  # seg and depth at their image size
    dense = _dense_tasks(backbone, sized, storage) if {"seg", "depth"} & set(config.tasks) else {}
    shown = slice(0, 6)
    predicted: dict[str, np.ndarray] = {}  # the first test images' predictions, for the pictures
    if "seg" in dense:
        saves = _head_saves("seg", sized, storage, digest, dense["seg"])
        seg, maps = _segmentation(backbone, dense["seg"], sized, saves, keep=shown.stop)
        predicted["seg"] = maps.numpy().astype(np.uint8)
        tasks["seg"] = seg
        metrics.update({"seg_miou": seg["miou"], "seg_pixel_accuracy": seg["pixel_accuracy"]})
    if "depth" in dense:
        saves = _head_saves("depth", sized, storage, digest, dense["depth"])
        depth, maps = _depth(dense["depth"], sized, device, saves, keep=shown.stop)
        predicted["depth"] = maps.numpy()
        tasks["depth"] = depth
        metrics.update({f"depth_{k}": v for k, v in depth.items()})
    scenes = [data for data in dense.values() if data.foreground is not None]
    if scenes:  # the scenes' shapes, not their plane, are the attention's foreground
        looked_at = scenes[0].test.split.images[:ATTENTION_IMAGES], scenes[0].foreground[:ATTENTION_IMAGES]
    if pictures is not None and dense:
        _dense_pictures(dense, predicted, Path(pictures), shown.stop, sized.image_size)
    if looked_at is not None and hasattr(backbone, "self_attention"):
        tasks["attention"] = attention_figures(backbone, *looked_at, pictures)
        metrics.update(tasks["attention"])
    if "retrieval" in config.tasks:
        tasks["retrieval"] = _retrieval(backbone, config.sized_for("retrieval"), storage)
        metrics.update({f"retrieval_{k}": v for k, v in tasks["retrieval"].items()})
    if "finegrained" in config.tasks:
        tasks["finegrained"] = _finegrained(backbone, config, storage, device, digest, pictures)
        metrics.update(finegrained_metrics(tasks["finegrained"]))
    if "video" in config.tasks:
        video = VideoConfig(frames=config.video_frames, pool=config.video_pool,  # type: ignore[arg-type]
                            image_size=config.image_size if config.video_data else config.scene_size,
                            num_workers=config.num_workers)
        tasks["video"] = video_probe(backbone, config.video_data, video, storage, device, config.amp_dtype,
                                     config.seed + 3, Path(pictures) if pictures is not None else None)
        metrics.update({"video_top1": tasks["video"]["test_accuracy"], "video_val_top1": tasks["video"]["val_accuracy"],
                        "video_best_lr": tasks["video"]["best_lr"]})
    classes = len(tasks["classification"]["classes"]) if "classification" in tasks else None
    compared = paper_comparison(metrics, config, backbone, classes)
    if compared:
        tasks["paper"] = compared
        metrics.update({f"paper_gap_{row['key']}": row["gap"] for row in compared})
        if pictures is not None:
            save_comparison(compared, Path(pictures) / "paper_comparison.md")
    return {"metrics": metrics, "tasks": tasks, "config": _jsonable(asdict(config)), "features": features}


def attention_figures(backbone: nn.Module, images: np.ndarray | torch.Tensor,
                      foreground: np.ndarray | torch.Tensor | None, pictures: str | Path | None = None
                      ) -> dict[str, float]:
    """:func:`~evaluators.attention.attention_summary`'s metrics on uint8 test ``images`` and their
    ``foreground`` (bool, same size; None: no Jaccard), each resized to at least 8 patches a side
    (Fashion-MNIST's 28 px is 4 patches of 7; the foreground nearest), and with ``pictures`` the
    first 8 in ``attention_maps.png``, the head-mean maps' 60 % masks tinted and outlined."""
    pixels = torch.as_tensor(images)
    patch = backbone.patch_size
    side = patch * max(8, -(-max(pixels.shape[-2:]) // patch))
    resized = None if foreground is None else F.interpolate(
        torch.as_tensor(foreground)[:, None].float(), size=(side, side), mode="nearest")[:, 0] > 0
    summary = attention_summary(backbone, to_model_input(pixels, size=side, patch_size=patch), foreground=resized)
    if pictures is not None:
        shown = to_model_input(pixels[:8], size=side, patch_size=patch, mean=(0.0,) * 3, std=(1 / 255,) * 3)
        save_attention_maps(shown.round().to(torch.uint8).numpy(), summary["maps"][:8].numpy(),
                            summary["high_norm"][:8].numpy(), Path(pictures) / "attention_maps.png",
                            masks=summary["masks"][:8].numpy())
    return summary["metrics"]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_jsonable(v) for v in value]
    return value
