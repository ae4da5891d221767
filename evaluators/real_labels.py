"""ImageNet-ReaL: the validation images' "reassessed labels" (Beyer et al., 2020), the third column of
the original's ImageNet linear results (val, ReaL, V2).

Why: an ImageNet validation image often shows more than its one label (a keyboard beside a
monitor), or its label is wrong; ReaL gives each image the set of classes raters found in it, and a
prediction is right when it is in the set. The release is one ``real.json``: a list of 50,000 lists
of class indices (in the sorted-WordNet-ID order of the class folders), the n-th for validation
image ``ILSVRC2012_val_<n>.JPEG``; an image with an empty list (no class fits) is left out. Images
are matched by that name, so the validation split may lie flat or in class folders.
"""

from __future__ import annotations

import json
import re

import numpy as np
from torch import Tensor

from dinoflow.storage import Storage
from evaluators.imagenet_val import VAL_PREFIX

NAME = re.compile(rf"{VAL_PREFIX}(\d{{8}})\.JPEG$", re.IGNORECASE)


def load_real(storage: Storage, uri: str) -> list[list[int]]:
    """``real.json`` at ``uri``: each validation image's list of class indices."""
    if not storage.exists(uri):
        raise FileNotFoundError(f"real_labels {uri} is missing: give ImageNet-ReaL's real.json")
    lists = json.loads(storage.read_bytes(uri))
    if not isinstance(lists, list) or not all(isinstance(item, list) for item in lists):
        raise ValueError(f"{uri}: ReaL's real.json is a list of lists of class indices, one per validation image")
    return lists


def real_accuracy(predictions: Tensor, keys: list[str], real: list[list[int]]) -> tuple[float, int]:
    """The share of the images ``keys`` (their files named ``ILSVRC2012_val_<n>.JPEG``) whose
    prediction is among image n's ReaL classes, over the images with any; and how many those are."""
    numbers = []
    for key in keys:
        found = NAME.search(key)
        if found is None or not 1 <= int(found.group(1)) <= len(real):
            raise ValueError(f"{key}: ReaL scores ImageNet's validation images, named ILSVRC2012_val_<n>.JPEG with "
                             f"n from 1 to {len(real)}")
        numbers.append(int(found.group(1)) - 1)
    labelled = [(row, real[number]) for row, number in enumerate(numbers) if real[number]]
    if not labelled:
        raise ValueError("none of the validation images has a ReaL label")
    predicted = predictions.cpu().numpy()
    right = np.array([int(predicted[row]) in classes for row, classes in labelled])
    return float(right.mean()), len(labelled)
