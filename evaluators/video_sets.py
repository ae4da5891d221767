"""The video benchmarks' sets read as released: their own split lists, no conversion to class folders.

Why: none of the three video sets the original probes ships as ``train/<class>/`` folders (UCF-101's
splits come apart from its videos, Kinetics-400 and Something-Something v2 name each video's class
in a table), and rewriting them as folders by hand is where a benchmark goes wrong unnoticed. A root
laid out as one of these releases (as its archives extract) is read as it is by the video probe
(:func:`evaluators.video.video_splits`); any other root is class folders.

======================  ================================================  ===================  ====================
set                     root holds (as its archives extract)              train                test (reported)
======================  ================================================  ===================  ====================
UCF-101                 ``UCF-101/<Class>/*.avi``, ``ucfTrainTestlist/``  ``trainlist01.txt``  ``testlist01.txt``
Kinetics-400            ``annotations/*.csv``, ``train/``, ``val/``       ``train.csv``        ``val.csv``
Something-Something v2  ``20bn-something-something-v2/``, ``labels/``     ``*train.json``      ``*validation.json``
======================  ================================================  ===================  ====================

The Kinetics root is CVDF's ``k400/`` or one holding it; SSv2's label files are
``labels/something-something-v2-{labels,train,validation}.json`` (20BN's release) or
``labels/{labels,train,validation}.json`` (the later one's names).

Classes: UCF-101's in ``classInd.txt``'s order (numbered from 1; a train line's number must be its
folder's); Kinetics' the train csv's names sorted (csv quoting: ``"passing American football (in
game)"``), a video's file ``<youtube_id>_<time_start:06d>_<time_end:06d>.mp4``; SSv2's by the labels
file's index, a video's class its template with the brackets taken out. UCF-101 is read at split 1,
Kinetics and SSv2 at their validation split, as the original reports them (SSv2's test labels
are not in its lists).

A video a list names is looked for by its file name in the split's folder (listed once, every level
down; letter case aside where no file has the very name: some copies of UCF-101 name the files its
lists call ``v_HandStandPushups_*`` ``v_HandstandPushups_*``): one the folder lacks (Kinetics'
deleted YouTube videos, a few per cent) is skipped and counted (:attr:`VideoRelease.missing`); a
split with none left fails.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from dinoflow.storage import Storage, basename, join_uri
from evaluators.released_sets import Marker, holds_markers, release_file, release_lines

UCF_SPLIT = 1  # the split the original reports (of three)
SSV2_PREFIXES = ("something-something-v2-", "")  # its label files' names: 20BN's release, then the later one


class VideoEntry(NamedTuple):
    """One video of a release: its name in the release's lists, its file's URI, its class's index."""

    key: str
    uri: str
    label: int


@dataclass(frozen=True)
class VideoRelease:
    """A release's classes, its train and test videos found on disk, and how many its lists name that
    are not (``{"train": n, "test": n}``)."""

    name: str
    classes: tuple[str, ...]
    train: list[VideoEntry]
    test: list[VideoEntry]
    missing: dict[str, int]


Listed = tuple[str, str, int]  # a video as a list names it: its key, its file's name, its class's index
Split = tuple[str, str, list[Listed]]  # its list's URI, the folder its files lie under, and its videos
Listing = tuple[tuple[str, ...], Split, Split]  # classes, train, test


def _ucf101(storage: Storage, root: str) -> Listing:
    """``ucfTrainTestlist/classInd.txt`` (``1 ApplyEyeMakeup``), ``trainlist01.txt``
    (``ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1``) and ``testlist01.txt`` (the path alone: the
    class is its folder), the paths under ``UCF-101/``."""
    if not storage.exists(join_uri(root, "ucfTrainTestlist", "classInd.txt")):
        raise FileNotFoundError(f"{join_uri(root, 'ucfTrainTestlist', 'classInd.txt')} is missing: UCF-101's "
                                "split lists ship apart from its videos, as UCF101TrainTestSplits-RecognitionTask"
                                f".zip; extract it in {root}, beside UCF-101/")
    numbered = {int(number): name for number, name in (line.split() for line in release_lines(
        storage, root, "ucfTrainTestlist", "classInd.txt"))}
    classes = tuple(numbered[number] for number in sorted(numbered))
    index = {name: i for i, name in enumerate(classes)}
    splits = []
    for listing in (f"trainlist{UCF_SPLIT:02d}.txt", f"testlist{UCF_SPLIT:02d}.txt"):
        listing_uri, videos = join_uri(root, "ucfTrainTestlist", listing), []
        for line in release_lines(storage, root, "ucfTrainTestlist", listing):
            path, *number = line.split()
            folder = path.split("/", 1)[0]
            if folder not in index:
                raise ValueError(f"{listing_uri}: {path} is of class {folder!r}, which classInd.txt lacks")
            if number and numbered.get(int(number[0])) != folder:
                raise ValueError(f"{listing_uri}: {path} is numbered {number[0]}, which classInd.txt gives to "
                                 f"{numbered.get(int(number[0]))!r}, not {folder!r}")
            videos.append((path, basename(path), index[folder]))
        splits.append((listing_uri, join_uri(root, "UCF-101"), videos))
    return classes, *splits


def _kinetics(storage: Storage, root: str) -> Listing:
    """``annotations/{train,val}.csv`` (``label,youtube_id,time_start,time_end,split``), each row's
    video ``<split>/<youtube_id>_<time_start:06d>_<time_end:06d>.mp4``; the root CVDF's ``k400/``
    or one holding it."""
    base = root if storage.exists(join_uri(root, "annotations", "train.csv")) else join_uri(root, "k400")
    tables = [list(csv.DictReader(io.StringIO(release_file(storage, base, "annotations", f"{split}.csv")
                                              .decode("utf-8-sig")))) for split in ("train", "val")]
    classes = tuple(sorted({row["label"] for row in tables[0]}))
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({row["label"] for row in tables[1]} - set(index))
    if unknown:
        raise ValueError(f"{join_uri(base, 'annotations', 'val.csv')}: classes {unknown[:5]} that train.csv lacks")
    splits = []
    for split, rows in zip(("train", "val"), tables):
        videos = []
        for row in rows:
            key = f"{row['youtube_id']}_{int(float(row['time_start'])):06d}_{int(float(row['time_end'])):06d}"
            videos.append((key, f"{key}.mp4", index[row["label"]]))
        splits.append((join_uri(base, "annotations", f"{split}.csv"), join_uri(base, split), videos))
    return classes, *splits


def _ssv2(storage: Storage, root: str) -> Listing:
    """``labels/<prefix>labels.json`` (template without brackets -> class index, a string) and
    ``<prefix>{train,validation}.json`` (``{"id", "template", ...}`` each), the prefix
    ``something-something-v2-`` or none (:data:`SSV2_PREFIXES`); video ``<id>.webm``."""
    prefix = next((p for p in SSV2_PREFIXES if storage.exists(join_uri(root, "labels", f"{p}labels.json"))),
                  SSV2_PREFIXES[0])
    labels = json.loads(release_file(storage, root, "labels", f"{prefix}labels.json"))
    indices = {template: int(i) for template, i in labels.items()}
    classes = tuple(sorted(indices, key=indices.__getitem__))
    if [indices[name] for name in classes] != list(range(len(classes))):
        raise ValueError(f"{join_uri(root, 'labels', f'{prefix}labels.json')}: class indices must run 0 to "
                         f"{len(classes) - 1}, once each")
    splits = []
    for split in ("train", "validation"):
        listing_uri, videos = join_uri(root, "labels", f"{prefix}{split}.json"), []
        for entry in json.loads(release_file(storage, root, "labels", f"{prefix}{split}.json")):
            template = entry["template"].replace("[", "").replace("]", "")
            if template not in indices:
                raise ValueError(f"{listing_uri}: video {entry['id']}'s template {template!r} is not among "
                                 f"{prefix}labels.json's {len(indices)} classes")
            videos.append((str(entry["id"]), f"{entry['id']}.webm", indices[template]))
        splits.append((listing_uri, join_uri(root, "20bn-something-something-v2"), videos))
    return classes, *splits


# each release: the files or folders its root holds (relative to it; of a tuple, one at least), and its reader
VIDEO_RELEASES: dict[str, tuple[tuple[Marker, ...], Callable[[Storage, str], Listing]]] = {
    "UCF-101": (("UCF-101",), _ucf101),
    "Kinetics-400": ((("annotations/train.csv", "k400/annotations/train.csv"),), _kinetics),
    "Something-Something v2": (("20bn-something-something-v2",), _ssv2)}


def video_release_at(root: str, storage: Storage) -> str | None:
    """The release of :data:`VIDEO_RELEASES` laid out at ``root``, or None (class folders, say)."""
    return next((name for name, (markers, _) in VIDEO_RELEASES.items() if holds_markers(storage, root, markers)),
                None)


def read_video_release(name: str, root: str, storage: Storage) -> VideoRelease:
    """Release ``name`` at ``root``: its classes, and its train and test videos that lie on disk."""
    classes, *splits = VIDEO_RELEASES[name][1](storage, root)
    on_disk: dict[str, dict[str, str]] = {}  # each folder's files, file name -> URI
    found, missing = [], {}
    for split, (listing, folder, videos) in zip(("train", "test"), splits):
        if folder not in on_disk:
            on_disk[folder] = {basename(uri): uri for uri in storage.list(folder, recursive=True)}
        files = on_disk[folder]
        folded = {file.lower(): uri for file, uri in files.items()}
        entries = [VideoEntry(key, files.get(file) or folded[file.lower()], label) for key, file, label in videos
                   if file in files or file.lower() in folded]
        if not entries:
            raise ValueError(f"{root} ({name}): none of the {len(videos)} videos {listing} names is under {folder}")
        found.append(entries)
        missing[split] = len(videos) - len(entries)
    return VideoRelease(name, classes, *found, missing)
