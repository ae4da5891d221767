"""The classifiers trained once on a clean train split, scored on further test sets.

Why: robustness and distribution-shift benchmarks (ImageNet-V2, -A, -R, -Sketch; ImageNet-C's 75
folders, :mod:`evaluators.corruptions`) test the k-NN, the linear probe and the logistic
regression trained on ImageNet's train split, not new ones: on ImageNet the probe alone takes
hours, so one evaluation trains them once and scores every further test set with them
(``test_sets``: comma-separated roots of class folders, each named by its last part). A set of
fewer classes (ImageNet-A and -R's 200) is scored over its own classes. One test set's features
are held at a time and dropped before the next one's are made.

With a ``work_dir``, each test set's scores are saved as they are made
(``<work_dir>/<what>/<digest>/...json``, :func:`scores_uri`), so a preempted task passes only over
the sets not yet scored; the digest covers the train features and every weight of the
classifiers, so scores made by other classifiers are never taken for these.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dinoflow.progress import progress
from dinoflow.storage import Storage, join_uri
from evaluators.classification import FolderImages, LabelledFeatures, view
from evaluators.data_settings import named_roots
from evaluators.feature_parts import tensors_digest
from evaluators.linear import LinearProbeResult, probe_accuracy
from evaluators.logreg import LogRegResult, logreg_accuracy
from evaluators.report import knn_accuracies, knn_bank

CLASSIFIERS = ("knn", "linear", "logreg")  # each scored on every test set when the suite ran it


@dataclass(frozen=True)
class CleanClassifiers:
    """What further test sets are scored by, all trained on the clean train split: the k-NN at
    ``knn_k`` over its features (None: not scored), the linear probe (the view it trained on and
    its result; None: not run) and the logistic regression (None: not run)."""

    knn_k: int | None
    temperature: float
    linear: tuple[str, LinearProbeResult] | None = None
    logreg: LogRegResult | None = None

    def digest(self) -> str:
        """sha256 of the settings and every tensor of the classifiers: a test set's scores saved for
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


def scores_uri(work_dir: str, what: str, identity: Mapping[str, Any], classifiers: CleanClassifiers) -> str:
    """``<work_dir>/<what>/<digest>``: where the scores of ``what`` (``corruptions``, ``test-sets``)
    are kept, a folder of its own for each ``identity`` (the train features': backbone, data,
    preparation) and ``classifiers``, so that scores of other features or classifiers are never
    taken for these (they are left beside, not refused: a probe retrained on another GPU may
    differ in its last bits)."""
    key = json.dumps({"features": identity, "classifiers": classifiers.digest()}, sort_keys=True, default=str)
    return join_uri(work_dir, what, hashlib.sha256(key.encode()).hexdigest()[:16])


def saved_scores(storage: Storage, path: str, make: Callable[[], dict[str, float]]) -> dict[str, float]:
    """The scores saved at ``path`` by an earlier pass, else ``make()``'s, saved there (atomically)
    when ``path`` is given ("": not saved)."""
    if path and storage.exists(path):
        return json.loads(storage.read_bytes(path))
    scores = make()
    if path:
        storage.write_bytes(path, json.dumps(scores).encode())
    return scores


def score_test_set(folder: FolderImages, trained: LabelledFeatures, backbone: nn.Module,
                   classifiers: CleanClassifiers, device: torch.device,
                   amp_dtype: torch.dtype | None) -> dict[str, float]:
    """``folder``'s test split's top-1 accuracy under each of ``classifiers`` (``{"knn": ...,
    "linear": ..., "logreg": ...}``, those run); its features live only in here, so each test
    set's are freed before the next one's are made."""
    data = folder.test_features(trained, backbone, amp_dtype=amp_dtype)
    scores = {}
    if classifiers.knn_k is not None:
        k = classifiers.knn_k
        bank = knn_bank(data)  # restricted to the test set's classes when it holds fewer
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


def test_set_folders(images: FolderImages, storage: Storage, given: str, test_limit: int = 0,
                     seed: int = 0) -> list[tuple[str, str, FolderImages]]:
    """``(name, uri, images with it as their test split)`` for each test set of ``given``
    (``test_sets``: comma-separated roots of class folders, read as val's: resized, centre-cropped;
    ``test_limit``: a seeded random subset of each): listed and checked against train's classes
    before any feature is made, so a wrong set is refused before the long train pass."""
    return [(name, uri, images.with_test(uri, storage, test_limit, seed))
            for name, uri in named_roots(given, "test_sets")]


def score_test_sets(folders: list[tuple[str, str, FolderImages]], trained: LabelledFeatures, backbone: nn.Module,
                    storage: Storage, classifiers: CleanClassifiers, device: torch.device,
                    amp_dtype: torch.dtype | None = None, saves: str = "") -> dict[str, dict[str, Any]]:
    """Each of :func:`test_set_folders`' test sets scored by ``classifiers``: ``{name: {"uri",
    "classes", "knn", "linear", "logreg"}}`` (``classes``: the set's, scored over them when fewer
    than train's); ``saves``: :func:`scores_uri`'s, each set's scores kept as ``<name>.json``."""
    report = {}
    for name, uri, folder in progress(folders, "test sets", unit="set"):
        scores = saved_scores(storage, join_uri(saves, f"{name}.json") if saves else "",
                              lambda: score_test_set(folder, trained, backbone, classifiers, device, amp_dtype))
        report[name] = {"uri": uri, "classes": len(folder.remap), **scores}
    return report


def test_set_metrics(report: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """``test_<set>_<classifier>_top1`` for each set of :func:`score_test_sets`' report."""
    return {f"test_{name}_{classifier}_top1": float(scores[classifier])
            for name, scores in report.items() for classifier in CLASSIFIERS if classifier in scores}
