"""ImageNet-C in the frozen-feature suite: the clean probes scored on corrupted images (mCE).

Why: DINOv2 reports robustness as the linear probe trained on ImageNet's clean train split and
tested on ImageNet-C (Hendrycks & Dietterich, ICLR 2019): 15 corruptions at 5 severities, the
validation images each time. Its summary is the mean corruption error, normalised by AlexNet's so
that corruptions of unlike difficulty weigh alike: for each corruption c,
``CE_c = sum_s err_{s,c} / sum_s err^AlexNet_{s,c}``, and ``mCE = mean_c CE_c`` (lower is better;
an error is 1 - top-1 accuracy).

The root holds ``<corruption>/<severity 1-5>/<class>/<image>``. Each of its folders is a test set
of its own (:meth:`~evaluators.classification.FolderImages.with_test`: classes among train's,
remapped; decoded at ``image_size`` and centre-cropped, as its own evaluation crops its 224 px
images, not resized to 256 first as val's), its features made, scored by the k-NN on the train
features and by the chosen probe (its best view's classifier, :func:`~evaluators.linear.probe_accuracy`),
then dropped before the next folder's are made: ImageNet-C is 3.75M images, 75 test sets of 50k, never held at once.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from dinoflow.progress import progress
from dinoflow.storage import Storage
from evaluators.classification import FolderImages, LabelledFeatures, view
from evaluators.linear import LinearProbeResult, probe_accuracy
from evaluators.report import knn_accuracies, knn_bank

CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
               "jpeg_compression")  # the 15 the mCE averages over (ImageNet-C's 4 extra ones are left out)
SEVERITIES = (1, 2, 3, 4, 5)
# AlexNet's top-1 error on each corruption, averaged over the 5 severities, the mCE's normaliser: as the
# ImageNet-C authors published them (github.com/hendrycks/robustness), listed as ALEXNET_ERR beside the
# corruptions in google-research/augmix's imagenet.py (and in the paper's table). A mean over the same
# 5 severities, so sum_s err / sum_s err^AlexNet = mean_s err / ALEXNET_ERRORS[c].
ALEXNET_ERRORS = dict(zip(CORRUPTIONS, (0.886428, 0.894468, 0.922640, 0.819880, 0.826268, 0.785948, 0.798360,
                                        0.866816, 0.826572, 0.819324, 0.564592, 0.853204, 0.646056, 0.717840,
                                        0.606500)))
LAYOUT = "<corruption>/<severity 1-5>/<class>/<image> (ImageNet-C's, e.g. gaussian_noise/3/n01440764/x.JPEG)"

Errors = Mapping[str, Mapping[int, float]]  # corruption -> severity -> top-1 error


def corruption_folders(storage: Storage, root: str) -> list[tuple[str, int, str]]:
    """``(corruption, severity, uri)`` of every ``<corruption>/<severity>/`` folder under ``root``,
    sorted; refused, naming ``root`` and the layout, when there is none."""
    found = []
    for corruption_uri in storage.list(root):
        corruption = corruption_uri.rstrip("/").rsplit("/", 1)[-1]
        if corruption.startswith("."):
            continue
        for severity_uri in storage.list(corruption_uri):
            severity = severity_uri.rstrip("/").rsplit("/", 1)[-1]
            if severity.isdigit() and int(severity) in SEVERITIES:
                found.append((corruption, int(severity), severity_uri.rstrip("/")))
    if not found:
        raise ValueError(f"corruption_uri {root}: no <corruption>/<severity>/ folders; expected {LAYOUT}")
    return sorted(found)


def mean_error(errors: Errors) -> float:
    """The mean over corruptions of each one's mean error over its severities: the mCE unnormalised,
    for any corruptions (a subset of ImageNet-C's, or others)."""
    return sum(sum(by_severity.values()) / len(by_severity) for by_severity in errors.values()) / len(errors)


def mean_corruption_error(errors: Errors) -> float | None:
    """The mCE, ``mean_c (sum_s err_{s,c} / sum_s err^AlexNet_{s,c})`` over the 15 corruptions of
    :data:`CORRUPTIONS` (others ignored); None unless each is there at all 5 severities (AlexNet's
    errors are their 5 severities' mean, a fraction of them would not compare)."""
    if any(set(errors.get(c, {})) != set(SEVERITIES) for c in CORRUPTIONS):
        return None
    return sum(sum(errors[c].values()) / (len(SEVERITIES) * ALEXNET_ERRORS[c]) for c in CORRUPTIONS) / len(CORRUPTIONS)


def score_corruptions(images: FolderImages, trained: LabelledFeatures, backbone: nn.Module, storage: Storage,
                      folders: list[tuple[str, int, str]], knn_k: int | None, temperature: float,
                      probe: tuple[str, LinearProbeResult] | None, device: torch.device,
                      amp_dtype: torch.dtype | None = None, test_limit: int = 0, seed: int = 0) -> dict:
    """Top-1 accuracies on each of ``folders`` (:func:`corruption_folders`') of the k-NN at
    ``knn_k`` (None: not scored) over ``trained``'s train features and of ``probe`` (the view it
    trained on and its result; None: not scored): ``{"knn_k", "view", "knn": {corruption:
    {severity: acc}}, "linear": {...}}``, severities as strings (JSON's keys). ``test_limit`` keeps
    a seeded random subset of each folder, as of a test split."""
    knn: dict[str, dict[str, float]] = {}
    linear: dict[str, dict[str, float]] = {}
    for corruption, severity, uri in progress(folders, "ImageNet-C folders", unit="folder"):
        # ImageNet-C's images are 224 px centre crops already: its evaluation only crops them, where
        # val's resize to 256 first would zoom them by 8/7
        folder = images.with_test(uri, storage, test_limit, seed, load=images.image_size)
        scores = _score_folder(folder, trained, backbone, knn_k, temperature, probe, device, amp_dtype)
        for name, scored in (("knn", knn), ("linear", linear)):
            if name in scores:
                scored.setdefault(corruption, {})[str(severity)] = scores[name]
    section: dict = {"knn_k": knn_k, "knn": knn}
    if probe is not None:
        section.update(view=probe[0], linear=linear)
    return section


def _score_folder(folder: FolderImages, trained: LabelledFeatures, backbone: nn.Module, knn_k: int | None,
                  temperature: float, probe: tuple[str, LinearProbeResult] | None, device: torch.device,
                  amp_dtype: torch.dtype | None) -> dict[str, float]:
    """One folder's accuracies; its features live only in here, so each folder's are freed before
    the next folder's are made."""
    data = folder.test_features(trained, backbone, amp_dtype=amp_dtype)
    scores = {}
    if knn_k is not None:
        bank = knn_bank(data)  # restricted to the folder's classes when it holds fewer, as a test set's
        accuracy = knn_accuracies(*bank, data.test_x, data.test_y, (knn_k,), temperature, len(data.classes), device)
        if accuracy:
            scores["knn"] = accuracy[f"k{knn_k}"]
    if probe is not None:
        assert data.views is not None  # trained with views: the probe's
        name, result = probe
        scores["linear"] = probe_accuracy(result, view(data.views[1], name, data.train_x.shape[1]), data.test_y,
                                          data.test_classes)
    return scores


def corruption_metrics(section: Mapping) -> dict[str, float]:
    """Flat metrics of :func:`score_corruptions`' section: ``corruption_knn_error`` and
    ``corruption_linear_error`` (:func:`mean_error`, always), ``corruption_knn_mce`` and
    ``corruption_linear_mce`` (:func:`mean_corruption_error`, with all 15 corruptions at 5 severities)."""
    metrics = {}
    for name in ("knn", "linear"):
        accuracies = section.get(name)
        if not accuracies:
            continue
        errors = {c: {int(s): 1.0 - acc for s, acc in by_severity.items()} for c, by_severity in accuracies.items()}
        metrics[f"corruption_{name}_error"] = mean_error(errors)
        mce = mean_corruption_error(errors)
        if mce is not None:
            metrics[f"corruption_{name}_mce"] = mce
    return metrics

