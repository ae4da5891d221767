"""Pascal VOC 2007 classification: a binary logistic regression per class on frozen features, scored by 11-point mAP.

Why: VOC 2007 is the multi-label set among the paper's fine-grained benchmarks (one image may hold
a person, a dog and a sofa), so top-1 does not apply. Its protocol (Kornblith et al., 2019, which
the paper's transfer table follows) fits an L2-regularised binary logistic regression per class
on the final CLS features, picks ``C`` on the release's ``val`` split after fitting on ``train``,
refits on ``trainval`` and reports on ``test`` the mean over the 20 classes of the VOC 2007
devkit's 11-point interpolated average precision.

The data is read as released (``VOCdevkit/VOC2007``, the trainval and test archives extracted into
one folder): ``JPEGImages/<id>.jpg`` and ``ImageSets/Main/<class>_<split>.txt``, whose lines read
``<id> 1`` (present), ``<id> 0`` (present but difficult) or ``<id> -1`` (absent). A difficult entry
counts neither way: it is left out of its class's fit and of its AP (the devkit ranks it but
counts it neither a hit nor a false alarm, which leaves every precision at every recall as it is).

The regressions share :mod:`evaluators.logreg`'s solver and objective, the data term the binary
cross-entropy of each class's known entries (``t_ik`` in {1, -1}):

    L(W, b) = (1 / N) sum_k sum_{i: t_ik != 0} BCE(x_i . w_k + b_k, [t_ik = 1]) + ||W||^2 / (2 C N)

It separates into the classes' problems, each scikit-learn's ``||w_k||^2 / 2 + C sum_i BCE``
divided by ``C N``: one L-BFGS fits all 20 at one ``C``, the sweep's.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Subset

from dinoflow.storage import Storage, join_uri
from evaluators.classification import FolderImages, LabelledFeatures, eval_load_size, limited
from evaluators.logreg import LogRegConfig, fit_logistic, normalized, sweep_c
from trainer.data.datasets import ImageListDataset

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
# the recall levels of the 11-point AP exactly as the devkit's MATLAB loop `for t=0:0.1:1` makes them: its colon
# operator adds multiples of the step to the start for the first half and takes them from the end for the second,
# so 0.3 is 0.30000000000000004 but 0.6 and 0.7 are exact (numpy's arange(0, 1.1, 0.1) makes 0.6000000000000001,
# which a recall of exactly 3/5 misses)
RECALL_LEVELS = torch.tensor([k * 0.1 for k in range(5)] + [0.5] + [1 - k * 0.1 for k in range(4, -1, -1)],
                             dtype=torch.float64)


def is_voc(root: str, storage: Storage) -> bool:
    """Whether ``root`` is laid out as a Pascal VOC release (its class lists under ``ImageSets/Main``)."""
    return storage.exists(join_uri(root, "ImageSets", "Main", f"{VOC_CLASSES[0]}_trainval.txt"))


def voc_targets(storage: Storage, root: str, split: str) -> tuple[list[str], Tensor]:
    """The image ids of ``split`` (train, val, trainval or test) in its first class file's order, and
    their ``(N, 20)`` int8 targets (1 present, 0 difficult, -1 absent), one column per class of
    :data:`VOC_CLASSES`."""
    ids: list[str] = []
    columns = []
    for name in VOC_CLASSES:
        listing = join_uri(root, "ImageSets", "Main", f"{name}_{split}.txt")
        if not storage.exists(listing):
            raise FileNotFoundError(f"{listing} is missing: a VOC 2007 root holds ImageSets/Main/<class>_<split>.txt "
                                    "for its 20 classes and the splits train, val and test (extract the test "
                                    "archive into the same VOCdevkit/VOC2007 as trainval's)")
        rows = [line.split() for line in storage.read_bytes(listing).decode().splitlines() if line.strip()]
        bad = [row for row in rows if len(row) != 2 or row[1] not in ("1", "0", "-1")]
        if bad or not rows:
            raise ValueError(f"{listing}: each line must read '<id> <1|0|-1>' (present, difficult, absent); got "
                             f"{' '.join(bad[0]) if bad else 'no lines'!r}")
        given = dict(rows)
        ids = ids or [row[0] for row in rows]
        if len(given) != len(rows) or given.keys() != set(ids):
            raise ValueError(f"{listing} must list each image of {VOC_CLASSES[0]}_{split}.txt once, and no other")
        columns.append(torch.tensor([int(given[i]) for i in ids], dtype=torch.int8))
    return ids, torch.stack(columns, 1)


@dataclass(frozen=True)
class VocImages:
    """VOC's ``trainval`` (train's images, then val's) and ``test`` as :class:`FolderImages`, each
    image's label its row in ``trainval`` or ``test``: the rows a feature pass kept (an
    undecodable image is skipped) index the targets."""

    images: FolderImages
    trainval: Tensor  # (N, 20) int8: 1 present, 0 difficult, -1 absent
    is_val: Tensor  # (N,) bool: the row is one of val's
    test: Tensor  # (M, 20) int8


def voc_images(root: str, storage: Storage, train_limit: int = 0, test_limit: int = 0, image_size: int = 224,
               seed: int = 0, num_workers: int = 0) -> VocImages:
    """The VOC release at ``root`` listed for the feature pass, prepared as the class folders'
    (:mod:`evaluators.classification`); a limit keeps a seeded random subset of trainval or test."""
    (train_ids, train_t), (val_ids, val_t), (test_ids, test_t) = (voc_targets(storage, root, split)
                                                                   for split in ("train", "val", "test"))
    load = eval_load_size(image_size)

    def listed(ids: list[str], limit: int) -> Subset:
        keys = [join_uri(root, "JPEGImages", f"{i}.jpg") for i in ids]
        return limited(ImageListDataset(storage, keys, np.arange(len(ids)), load), limit, seed)

    images = FolderImages(listed(train_ids + val_ids, train_limit), listed(test_ids, test_limit), VOC_CLASSES, None,
                          image_size, num_workers)
    is_val = torch.arange(len(train_ids) + len(val_ids)) >= len(train_ids)
    return VocImages(images, torch.cat([train_t, val_t]), is_val, test_t)


def one_vs_rest_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """``sum_k sum_{i: t_ik != 0} BCE(logits_ik, [t_ik = 1])``: the module's data term, ``targets``
    ``(N, K)`` of 1, 0 (left out) and -1."""
    known = (targets != 0).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, (targets > 0).to(logits.dtype), weight=known, reduction="sum")


def average_precision_11(scores: Tensor, targets: Tensor) -> Tensor:
    """Each class's (column's) 11-point interpolated average precision, VOC 2007's: the mean over the
    recall levels ``t`` = 0, 0.1, ..., 1 of the highest precision at a recall of at least ``t`` (0
    where none), the rows ranked by ``scores`` (descending; ties in row order); ``targets`` ``(N, K)``
    of 1, 0 (difficult: neither a hit nor a false alarm) and -1. NaN for a class without a positive."""
    order = scores.double().argsort(dim=0, descending=True, stable=True)
    ranked = targets.gather(0, order)
    hits, false_alarms = (ranked > 0).double().cumsum(0), (ranked < 0).double().cumsum(0)
    recall = hits / (targets > 0).double().sum(0)
    precision = hits / (hits + false_alarms).clamp_min(1)
    levels = RECALL_LEVELS.to(scores.device).view(-1, 1, 1)
    best = torch.where(recall.unsqueeze(0) >= levels, precision.unsqueeze(0), 0.0).amax(1)
    return torch.where((targets > 0).any(0), best.mean(0), torch.nan)


def mean_average_precision(scores: Tensor, targets: Tensor) -> float:
    """:func:`average_precision_11`'s mean over the classes with a positive."""
    return float(average_precision_11(scores, targets).nanmean())


@dataclass(frozen=True)
class MultiLabelResult:
    """Outcome of :func:`multilabel_logistic_regression`; mAPs are fractions in [0, 1]."""

    best_c: float
    val_map: float  # of the fit at best_c on the held-out rows (trained without them)
    test_map: float  # of the refit on every train row
    class_ap: tuple[float, ...]  # test AP per class (NaN: no positive in test)
    c_values: tuple[float, ...]
    val_maps: tuple[float, ...]  # per C
    num_train: int  # rows the sweep was fit on
    num_val: int
    num_test: int
    feature_dim: int

    def to_dict(self) -> dict:
        """A JSON-able dict (a NaN AP as None)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["class_ap"] = [None if np.isnan(ap) else ap for ap in self.class_ap]
        out["c_values"], out["val_maps"] = list(self.c_values), list(self.val_maps)
        return out


def multilabel_logistic_regression(train_features: Tensor, train_targets: Tensor, held_out: Tensor,
                                   test_features: Tensor, test_targets: Tensor, config: LogRegConfig = LogRegConfig(),
                                   device: str | torch.device = "cpu") -> MultiLabelResult:
    """The sweep over ``config.c_values`` on the L2-normalised features, fit on the train rows not
    ``held_out`` (``(N,)`` bool) and picked by the held-out rows' mAP (ties: the smallest ``C``),
    refit on every train row and scored on test; targets ``(N, K)`` of 1, 0 (difficult) and -1."""
    if train_targets.ndim != 2 or train_targets.shape[1] != test_targets.shape[1]:
        raise ValueError(f"targets must be (N, K) of one K: got train {tuple(train_targets.shape)}, "
                         f"test {tuple(test_targets.shape)}")
    if len(train_features) != len(train_targets) or len(held_out) != len(train_targets) \
            or len(test_features) != len(test_targets):
        raise ValueError("features, targets and the held-out mask must have one row per image")
    features, test_x = normalized(train_features, device), normalized(test_features, device)
    targets, test_t = train_targets.to(device, torch.float32), test_targets.to(device, torch.float32)
    held_out = held_out.to(device)
    if not (targets[held_out] > 0).any() or not (targets[~held_out] > 0).any():
        raise ValueError(f"the fit rows ({int((~held_out).sum())}) and the held-out rows ({int(held_out.sum())}) "
                         "must each hold a positive of some class to pick C")
    classes = targets.shape[1]

    def held_out_map(x: Tensor, t: Tensor, weight: Tensor, bias: Tensor) -> float:
        return mean_average_precision(x @ weight + bias, t)

    best, picked, val_maps = sweep_c((features[~held_out], targets[~held_out]), (features[held_out], targets[held_out]),
                                     classes, config, held_out_map, one_vs_rest_loss)
    weight, bias = fit_logistic(features, targets, classes, config.c_values[best], config.max_iter, picked,
                                one_vs_rest_loss)
    class_ap = average_precision_11(test_x @ weight + bias, test_t).cpu()
    return MultiLabelResult(best_c=config.c_values[best], val_map=val_maps[best], test_map=float(class_ap.nanmean()),
                            class_ap=tuple(class_ap.tolist()), c_values=tuple(config.c_values),
                            val_maps=tuple(val_maps), num_train=int((~held_out).sum()), num_val=int(held_out.sum()),
                            num_test=len(test_x), feature_dim=features.shape[1])


def voc_scores(voc: VocImages, data: LabelledFeatures, device: str | torch.device = "cpu",
               logreg: LogRegConfig = LogRegConfig()) -> dict:
    """VOC's features (``data``: ``voc.images``' feature pass) scored as the protocol scores them:
    :meth:`MultiLabelResult.to_dict` with ``classes`` (their names, in ``class_ap``'s order)."""
    result = multilabel_logistic_regression(data.train_x, voc.trainval[data.train_y], voc.is_val[data.train_y],
                                            data.test_x, voc.test[data.test_y], logreg, device)
    return {**result.to_dict(), "classes": list(VOC_CLASSES)}
