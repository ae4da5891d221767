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
passes only over the folders not yet scored (:func:`scores_uri`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dinoflow.progress import progress
from dinoflow.storage import Storage, join_uri
from evaluators.classification import FolderImages, LabelledFeatures, view
from evaluators.feature_parts import tensors_digest
from evaluators.linear import LinearProbeResult, probe_accuracy
from evaluators.logreg import LogRegResult, logreg_accuracy
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
CLASSIFIERS = ("knn", "linear", "logreg")  # each scored on every folder when the suite ran it
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


@dataclass(frozen=True)
class CleanClassifiers:
    """What ImageNet-C's folders are scored by, all trained on the clean train split: the k-NN at
    ``knn_k`` over its features (None: not scored), the linear probe (the view it trained on and
    its result; None: not run) and the logistic regression (None: not run)."""

    knn_k: int | None
    temperature: float
    linear: tuple[str, LinearProbeResult] | None = None
    logreg: LogRegResult | None = None

    def digest(self) -> str:
        """sha256 of the settings and every tensor of the classifiers: a folder's scores saved for
        these classifiers are these classifiers' (a probe retrained to other weights scores anew)."""
        tensors: dict[str, Tensor] = {}
        if self.linear is not None:
            probe = self.linear[1]
            if probe.classifier is not None:
                tensors.update({"linear.weight": probe.classifier.weight, "linear.bias": probe.classifier.bias})
            if probe.scaling is not None:
                tensors.update({f"linear.scaling.{i}": part for i, part in enumerate(probe.scaling)})
        if self.logreg is not None and self.logreg.weight is not None and self.logreg.bias is not None:
            tensors.update({"logreg.weight": self.logreg.weight, "logreg.bias": self.logreg.bias})
        settings = json.dumps([self.knn_k, self.temperature, self.linear and self.linear[0]]).encode()
        return tensors_digest(tensors, settings)


def scores_uri(work_dir: str, identity: Mapping[str, Any], classifiers: CleanClassifiers) -> str:
    """``<work_dir>/corruptions/<digest>``: where :func:`score_corruptions` keeps each folder's
    scores, a folder of its own for each ``identity`` (the train features': backbone, data,
    preparation) and ``classifiers``, so that scores of other features or classifiers are never
    taken for these (they are left beside, not refused: a probe retrained on another GPU may
    differ in its last bits)."""
    key = json.dumps({"features": identity, "classifiers": classifiers.digest()}, sort_keys=True, default=str)
    return join_uri(work_dir, "corruptions", hashlib.sha256(key.encode()).hexdigest()[:16])


def score_corruptions(images: FolderImages, trained: LabelledFeatures, backbone: nn.Module, storage: Storage,
                      folders: list[tuple[str, int, str]], classifiers: CleanClassifiers, device: torch.device,
                      amp_dtype: torch.dtype | None = None, test_limit: int = 0, seed: int = 0,
                      saves: str = "") -> dict:
    """Top-1 accuracies on each of ``folders`` (:func:`corruption_folders`') of ``classifiers``:
    ``{"knn_k", "view", "knn": {corruption: {severity: acc}}, "linear": {...}, "logreg": {...}}``,
    severities as strings (JSON's keys). ``test_limit`` keeps a seeded random subset of each
    folder, as of a test split. With ``saves`` (:func:`scores_uri`), each folder's scores are
    written there as ``<corruption>/<severity>.json`` once made, and a rerun (a preempted task)
    reads them back instead of passing over that folder's images again."""
    scored: dict[str, dict[str, dict[str, float]]] = {name: {} for name in CLASSIFIERS}
    for corruption, severity, uri in progress(folders, "ImageNet-C folders", unit="folder"):
        saved = join_uri(saves, corruption, f"{severity}.json") if saves else ""
        if saved and storage.exists(saved):
            scores = json.loads(storage.read_bytes(saved))
        else:
            # ImageNet-C's images are 224 px centre crops already: its evaluation only crops them, where
            # val's resize to 256 first would zoom them by 8/7
            folder = images.with_test(uri, storage, test_limit, seed, load=images.image_size)
            scores = _score_folder(folder, trained, backbone, classifiers, device, amp_dtype)
            if saved:
                storage.write_bytes(saved, json.dumps(scores).encode())
        for name, accuracy in scores.items():
            scored[name].setdefault(corruption, {})[str(severity)] = accuracy
    section: dict = {"knn_k": classifiers.knn_k, "knn": scored["knn"]}
    if classifiers.linear is not None:
        section.update(view=classifiers.linear[0], linear=scored["linear"])
    if classifiers.logreg is not None:
        section["logreg"] = scored["logreg"]
    return section


def _score_folder(folder: FolderImages, trained: LabelledFeatures, backbone: nn.Module,
                  classifiers: CleanClassifiers, device: torch.device,
                  amp_dtype: torch.dtype | None) -> dict[str, float]:
    """One folder's accuracies; its features live only in here, so each folder's are freed before
    the next folder's are made."""
    data = folder.test_features(trained, backbone, amp_dtype=amp_dtype)
    scores = {}
    if classifiers.knn_k is not None:
        k = classifiers.knn_k
        bank = knn_bank(data)  # restricted to the folder's classes when it holds fewer, as a test set's
        accuracy = knn_accuracies(*bank, data.test_x, data.test_y, (k,), classifiers.temperature, len(data.classes),
                                  device)
        if accuracy:
            scores["knn"] = accuracy[f"k{k}"]
    if classifiers.linear is not None:
        assert data.views is not None  # trained with views: the probe's
        name, result = classifiers.linear
        scores["linear"] = probe_accuracy(result, view(data.views[1], name, data.train_x.shape[1]), data.test_y,
                                          data.test_classes)
    if classifiers.logreg is not None:
        scores["logreg"] = logreg_accuracy(classifiers.logreg, data.test_x, data.test_y, data.test_classes)
    return scores


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

