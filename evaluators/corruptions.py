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
features, by the chosen probe (its best view's classifier, :func:`~evaluators.linear.probe_accuracy`)
and by the logistic regression's refit (:func:`~evaluators.logreg.logreg_accuracy`), then dropped
before the next folder's are made: ImageNet-C is 3.75M images, 75 test sets of 50k, never held at
once. With a ``work_dir`` each folder's scores are saved as they are made, so a preempted task
passes only over the folders not yet scored (:mod:`evaluators.clean_probes`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from dinoflow.progress import progress
from dinoflow.storage import Storage, basename, join_uri
from evaluators.classification import FolderImages, LabelledFeatures
from evaluators.clean_probes import CLASSIFIERS, CleanClassifiers, saved_scores, score_test_set

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
        corruption = basename(corruption_uri)
        if corruption.startswith("."):
            continue
        for severity_uri in storage.list(corruption_uri):
            severity = basename(severity_uri)
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
                      folders: list[tuple[str, int, str]], classifiers: CleanClassifiers, device: torch.device,
                      amp_dtype: torch.dtype | None = None, test_limit: int = 0, seed: int = 0,
                      saves: str = "") -> dict:
    """Top-1 accuracies on each of ``folders`` (:func:`corruption_folders`') of ``classifiers``:
    ``{"knn_k", "view", "knn": {corruption: {severity: acc}}, "linear": {...}, "logreg": {...}}``,
    severities as strings (JSON's keys). ``test_limit`` keeps a seeded random subset of each
    folder, as of a test split. With ``saves`` (:func:`~evaluators.clean_probes.scores_uri`), each
    folder's scores are written there as ``<corruption>/<severity>.json`` once made, and a rerun (a
    preempted task) reads them back instead of passing over that folder's images again."""
    scored: dict[str, dict[str, dict[str, float]]] = {name: {} for name in CLASSIFIERS}
    for corruption, severity, uri in progress(folders, "ImageNet-C folders", unit="folder"):
        # ImageNet-C's images are 224 px centre crops already: its evaluation only crops them, where
        # val's resize to 256 first would zoom them by 8/7
        scores = saved_scores(storage, join_uri(saves, corruption, f"{severity}.json") if saves else "",
                              lambda: score_test_set(images.with_test(uri, storage, test_limit, seed,
                                                                      load=images.image_size),
                                                     trained, backbone, classifiers, device, amp_dtype))
        for name, accuracy in scores.items():
            scored[name].setdefault(corruption, {})[str(severity)] = accuracy
    section: dict = {"knn_k": classifiers.knn_k, "knn": scored["knn"]}
    if classifiers.linear is not None:
        section.update(view=classifiers.linear[0], linear=scored["linear"])
    if classifiers.logreg is not None:
        section["logreg"] = scored["logreg"]
    return section


def corruption_errors(section: Mapping) -> dict[str, dict[str, dict[str, float]]]:
    """:func:`score_corruptions`' accuracies as top-1 errors, ``classifier -> corruption -> severity
    -> 1 - accuracy``, for each classifier scored."""
    return {name: {c: {s: 1.0 - acc for s, acc in by_severity.items()} for c, by_severity in section[name].items()}
            for name in CLASSIFIERS if section.get(name)}


def corruption_metrics(section: Mapping) -> dict[str, float]:
    """Flat metrics of :func:`score_corruptions`' section, for each classifier scored (knn, linear,
    logreg): ``corruption_<name>_error`` (:func:`mean_error`, always) and ``corruption_<name>_mce``
    (:func:`mean_corruption_error`, with all 15 corruptions at 5 severities)."""
    metrics = {}
    for name, by_corruption in corruption_errors(section).items():
        errors = {c: {int(s): error for s, error in by_severity.items()} for c, by_severity in by_corruption.items()}
        metrics[f"corruption_{name}_error"] = mean_error(errors)
        mce = mean_corruption_error(errors)
        if mce is not None:
            metrics[f"corruption_{name}_mce"] = mce
    return metrics

