"""Video classification on frozen frame features: the original's linear evaluation on UCF-101,
Kinetics-400 and Something-Something v2.

Why: a backbone trained on still images is judged on video by what its frame features hold,
with no temporal model trained: ``frames`` evenly spaced frames of each video (8 in the
original), each prepared as the image benchmarks prepare an image (the shorter side resized to
``image_size / 0.875``, the centre square kept), through the frozen backbone; their final CLS
tokens averaged (``pool="mean"``: UCF-101 and Kinetics-400, whose classes are in the scene) or
concatenated in time order (``"concat"``: Something-Something v2, whose classes are motions:
"pushing something left" and "... right" show the same frames in the other order, which a mean
cannot tell apart); then the linear probe of :func:`evaluators.linear.linear_probe` on those
features, its learning rate picked on held-out videos. ``pool="auto"`` (the default) runs each
source's protocol, :func:`protocol_pool`: concat on Something-Something v2 as released, mean on
anything else (the synthetic clips and class folders included); ``"mean"`` or ``"concat"`` is run
as given. The report's ``pool`` is the one that ran.

The frames taken are ``linspace(0, T - 1, frames)`` rounded: the first and the last, the rest
evenly between (a short video gives some twice).

Layout: a release as it extracts, where ``root`` holds one (:mod:`evaluators.video_sets`): UCF-101
(``UCF-101/`` and ``ucfTrainTestlist/``: split 1), Kinetics-400 (CVDF's ``k400/``: ``annotations/*.csv``,
``train/`` and ``val/``) or Something-Something v2 (``20bn-something-something-v2/`` and ``labels/``:
validation), each video in the split and class its lists say, the videos they name that are absent
skipped and counted (``missing``); else class folders, ``<root>/train/<class>/<video>`` and
``<root>/val/<class>/<video>`` (``test/`` when there is no ``val/``). A video is a file FFmpeg reads
through PyAV (``.mp4``, ``.avi``, ``.mkv``, ``.webm``, ``.mov``), an animated GIF or WebP (Pillow),
or (class folders) a folder of frame images taken in the order of the numbers in their names
(:func:`frame_order`: FFmpeg's ``%d`` names, ``1.jpg`` ... ``10.jpg``, and zero-padded ones alike;
UCF-101 and Kinetics as extracted frames). Undecodable videos are skipped and counted, as images
are (more than 5 % of a split stops it).

Without a data set, :func:`make_videos` draws synthetic clips of a textured square crossing a
textured background, the classes its direction (left, right, up, down): a mean sees each
direction's frames as the opposite one's (a clip and its reversal hold the same frames) and
scores at most half, a concatenation can score all.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dinoflow.progress import progress
from dinoflow.storage import Storage, join_uri
from evaluators.classification import MAX_BAD_FRACTION, eval_load_size
from evaluators.features import to_model_input
from evaluators.linear import LinearProbeConfig, linear_probe
from evaluators.video_sets import read_video_release, video_release_at
from evaluators.visualize import save_image_grid
from trainer.data.datasets import (
    DECODE_ERRORS,
    IMAGE_EXTENSIONS,
    BadImageTracker,
    ProcessLocalStorage,
    Sample,
    collate_samples,
    resize_center_crop,
)

Pool = Literal["mean", "concat"]
POOLS = ("mean", "concat")  # how the frames' features pool
PoolChoice = Literal["auto", "mean", "concat"]
POOL_CHOICES = ("auto", *POOLS)  # "auto": the protocol's pool for the videos read (:func:`protocol_pool`)
CONCAT_RELEASES = frozenset({"Something-Something v2"})  # releases whose classes are motions: concatenated
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov")  # read by PyAV
ANIMATED_EXTENSIONS = (".gif", ".webp")  # read by Pillow
DIRECTIONS = ("left", "right", "up", "down")  # the synthetic clips' classes
VIDEO_PICTURE = "video_frames.png"


def protocol_pool(source: str) -> Pool:
    """The pool the original's protocol runs on ``source`` (a :class:`VideoSplits` source): concat on
    the releases of :data:`CONCAT_RELEASES`, whose classes are motions a mean cannot tell from their
    reversals; mean on the rest, whose classes are in the scene."""
    return "concat" if source in CONCAT_RELEASES else "mean"


def frame_order(uri: str) -> tuple[tuple[str | int, ...], str]:
    """The sort key of a frame file: its text with each run of digits read as a number, so that
    FFmpeg's unpadded ``%d`` names come in time order (``2.jpg`` before ``10.jpg``, where text order
    puts ``10`` first) as zero-padded ones do; the text itself breaks ties (``01`` beside ``1``)."""
    runs = re.split(r"(\d+)", uri)  # text, digits, text, ...: a number at every odd place
    return tuple(int(run) if index % 2 else run for index, run in enumerate(runs)), uri


def frame_indices(total: int, count: int) -> list[int]:
    """The ``count`` frames taken of ``total``: ``linspace(0, total - 1, count)`` rounded."""
    if total < 1:
        raise ValueError("the video has no frames")
    return [int(i) for i in np.linspace(0, total - 1, count).round()]


def decode_video(data: bytes, name: str, count: int) -> list[Image.Image]:
    """The :func:`frame_indices` frames of an encoded video (``name`` tells its kind: an animated
    GIF or WebP through Pillow, anything else through PyAV), as RGB pictures. Where the container
    says how many frames it holds, only those taken are kept and decoding stops at the last (a
    long video is not held whole); else every frame is decoded first. A file PyAV cannot read
    raises ``ValueError``. PyAV is imported here, where a video file is decoded: frame folders,
    GIFs and the rest of the suite run without it."""
    if name.lower().endswith(ANIMATED_EXTENSIONS):
        with Image.open(io.BytesIO(data)) as picture:
            frames = []
            for index in frame_indices(getattr(picture, "n_frames", 1), count):
                picture.seek(index)
                frames.append(picture.convert("RGB"))
            return frames
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise ValueError(f"{name}: no video stream")
            declared = container.streams.video[0].frames
            if declared > 0:  # the container counts its frames: keep those taken, stop after the last
                wanted = frame_indices(declared, count)
                kept = {}
                for index, frame in enumerate(container.decode(video=0)):
                    if index in wanted:
                        kept[index] = frame.to_image()
                    if index == wanted[-1]:
                        break
                if len(kept) == len(set(wanted)):
                    return [kept[index] for index in wanted]
        with av.open(io.BytesIO(data)) as container:  # no count, or a wrong one: every frame decoded
            decoded = [frame.to_image() for frame in container.decode(video=0)]
    except av.error.FFmpegError as err:
        raise ValueError(f"{name}: {err}") from err
    return [decoded[index] for index in frame_indices(len(decoded), count)]


class VideoList(Dataset[Sample]):
    """Videos given as ``(key, files, label)``: a video file (:func:`decode_video`) or a video's frame
    files in time order; each a :class:`~trainer.data.datasets.Sample` keyed ``key`` whose image is
    its ``frames`` frames ``(frames, 3, load_size, load_size)`` uint8 (centre squares), labelled by
    an index into ``classes``."""

    def __init__(self, storage: Storage, videos: Sequence[tuple[str, str | list[str], int]],
                 classes: tuple[str, ...], frames: int, load_size: int) -> None:
        if frames < 1:
            raise ValueError(f"frames must be >= 1, got {frames}")
        self.classes, self.frames, self.load_size = classes, frames, load_size
        self._storage = ProcessLocalStorage(storage)
        self._keys = [key for key, _, _ in videos]
        self._files = [files for _, files, _ in videos]
        self._labels = [label for _, _, label in videos]

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, index: int) -> Sample:
        files, key = self._files[index], self._keys[index]
        storage = self._storage.get()
        try:
            if isinstance(files, str):
                pictures = decode_video(storage.read_bytes(files), files, self.frames)
            else:
                pictures = [Image.open(io.BytesIO(storage.read_bytes(files[i]))).convert("RGB")
                            for i in frame_indices(len(files), self.frames)]
        except (*DECODE_ERRORS, ValueError):
            return Sample(None, self._labels[index], key)
        squares = [np.asarray(resize_center_crop(picture, self.load_size)) for picture in pictures]
        return Sample(torch.from_numpy(np.stack(squares)).permute(0, 3, 1, 2).contiguous(), self._labels[index], key)


class VideoFolder(VideoList):
    """The videos of ``<root_uri>/<class>/`` (files, or folders of frames, each in :func:`frame_order`),
    keyed by their URIs, in name order; ``classes`` are the class folders, sorted, or those given (a
    test split's, by train's names)."""

    def __init__(self, storage: Storage, root_uri: str, frames: int, load_size: int,
                 classes: tuple[str, ...] | None = None) -> None:
        prefix = root_uri.rstrip("/") + "/"
        files: dict[str, str] = {}  # <class>/<video> -> its file
        folders: dict[str, list[str]] = {}  # <class>/<video> -> its frames' files
        for uri in storage.list(root_uri, recursive=True):
            parts = uri[len(prefix):].split("/")
            if any(part.startswith(".") for part in parts):
                continue
            if len(parts) == 2 and parts[1].lower().endswith(VIDEO_EXTENSIONS + ANIMATED_EXTENSIONS):
                files["/".join(parts)] = uri
            elif len(parts) == 3 and parts[2].lower().endswith(IMAGE_EXTENSIONS):
                folders.setdefault("/".join(parts[:2]), []).append(uri)
        videos: dict[str, str | list[str]] = {**files, **{key: sorted(frames, key=frame_order)
                                                         for key, frames in folders.items()}}
        if not videos:
            raise FileNotFoundError(f"no videos under {root_uri}: give <class>/<video> files "
                                    f"({', '.join(VIDEO_EXTENSIONS + ANIMATED_EXTENSIONS)}) or <class>/<video>/ "
                                    f"folders of frames ({', '.join(IMAGE_EXTENSIONS)})")
        found = tuple(sorted({key.split("/")[0] for key in videos}))
        classes = classes if classes is not None else found
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(f"{root_uri}: classes {unknown} are not among train's {len(classes)}")
        super().__init__(storage, [(join_uri(root_uri, key), videos[key], classes.index(key.split("/")[0]))
                                   for key in sorted(videos)], classes, frames, load_size)
        self.root_uri = root_uri


class ClipArray(Dataset[Sample]):
    """Clips held in memory, ``(N, T, H, W, 3)`` uint8 with labels: the synthetic ones."""

    def __init__(self, clips: np.ndarray, labels: np.ndarray, frames: int) -> None:
        self.clips, self.labels, self.frames = clips, labels, frames

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> Sample:
        taken = self.clips[index][frame_indices(self.clips.shape[1], self.frames)]
        return Sample(torch.from_numpy(taken).permute(0, 3, 1, 2).contiguous(), int(self.labels[index]),
                      f"clip/{index}")


@torch.no_grad()
def video_features(backbone: nn.Module, videos: Dataset[Sample], image_size: int, pool: Pool, batch_size: int = 16,
                   num_workers: int = 0, amp_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, int]:
    """Each video's pooled frame features ``(N, D)`` (mean) or ``(N, frames x D)`` (concat) in
    fp32 on the CPU, its labels, and how many videos were undecodable (skipped)."""
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; allowed: {', '.join(POOLS)}")
    device = next(backbone.parameters()).device
    tracker = BadImageTracker(MAX_BAD_FRACTION)
    features, labels = [], []
    loader = DataLoader(videos, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_samples)
    for batch in progress(loader, desc="video features", unit="batch"):
        tracker.update(batch)
        tracker.check()
        if not batch.keys:
            continue
        clips = batch.images  # (B, K, 3, S, S)
        offset = (clips.shape[-1] - image_size) // 2
        frames = clips[..., offset:offset + image_size, offset:offset + image_size].flatten(0, 1)
        inputs = to_model_input(frames.to(device), patch_size=int(backbone.patch_size))
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            cls = backbone.forward_features(inputs)["x_norm_clstoken"].float()
        cls = cls.view(clips.shape[0], clips.shape[1], -1)
        features.append((cls.mean(dim=1) if pool == "mean" else cls.flatten(1)).cpu())
        labels.append(batch.labels)
    tracker.check(final=True)
    return torch.cat(features), torch.cat(labels), tracker.bad


@dataclass(frozen=True)
class VideoConfig:
    """The video probe: frames a video, how they pool (``"auto"``: :func:`protocol_pool`), the probe;
    synthetic clips when no data."""

    frames: int = 8
    pool: PoolChoice = "auto"
    image_size: int = 224  # the frames' centre crop (a data set's; the synthetic clips are drawn at it)
    clips_per_class: tuple[int, int] = (48, 16)  # synthetic train and test clips of each direction
    clip_length: int = 8  # synthetic frames per clip
    batch_size: int = 16
    num_workers: int = 0
    probe: LinearProbeConfig = LinearProbeConfig()

    def __post_init__(self) -> None:
        if self.pool not in POOL_CHOICES:
            raise ValueError(f"unknown video pool {self.pool!r}; allowed: {', '.join(POOL_CHOICES)}")
        if self.frames < 1:
            raise ValueError(f"video frames must be >= 1, got {self.frames}")


class VideoSplits(NamedTuple):
    """What :func:`video_splits` read: the train and test videos, the class names, where they came
    from (``"synthetic clips"``, ``"class folders"`` or a release's name) and how many videos each
    split's lists name that were not on disk (a release's; else 0)."""

    train: Dataset[Sample]
    test: Dataset[Sample]
    classes: tuple[str, ...]
    source: str
    missing: dict[str, int]


def video_splits(root: str, config: VideoConfig, storage: Storage, seed: int = 0) -> VideoSplits:
    """The train and test videos of ``root`` read at ``image_size / 0.875``: a release's
    (:func:`~evaluators.video_sets.video_release_at`), else class folders' (its ``val/``, else
    ``test/``); or (``root`` empty) synthetic clips at ``image_size``."""
    if not root:
        train, test = (make_videos(count, config.clip_length, config.image_size, seed + index)
                       for index, count in enumerate(config.clips_per_class))
        return VideoSplits(ClipArray(*train, config.frames), ClipArray(*test, config.frames), DIRECTIONS,
                           "synthetic clips", {"train": 0, "test": 0})
    load = eval_load_size(config.image_size)
    if name := video_release_at(root, storage):
        release = read_video_release(name, root, storage)
        train_list, test_list = (VideoList(storage, videos, release.classes, config.frames, load)
                                 for videos in (release.train, release.test))
        return VideoSplits(train_list, test_list, release.classes, name, release.missing)
    folder = VideoFolder(storage, join_uri(root, "train"), config.frames, load)
    test_root = join_uri(root, "val") if storage.list(join_uri(root, "val")) else join_uri(root, "test")
    return VideoSplits(folder, VideoFolder(storage, test_root, config.frames, load, folder.classes), folder.classes,
                       "class folders", {"train": 0, "test": 0})


def save_video_frames(videos: Dataset[Sample], classes: tuple[str, ...], image_size: int, path: Path,
                      count: int = 4) -> Path:
    """The frames the backbone sees of the first ``count`` videos (centre crops), a row each, the
    first titled with its class: a look at what was read and taken."""
    rows, titles = [], []
    for index in range(min(count, len(videos))):  # type: ignore[arg-type]
        sample = videos[index]
        if sample.image is None:
            continue
        offset = (sample.image.shape[-1] - image_size) // 2
        frames = sample.image[..., offset:offset + image_size, offset:offset + image_size].permute(0, 2, 3, 1)
        rows.append(frames.numpy())
        titles += [f"{classes[sample.label]}: frame 1" if t == 0 else str(t + 1) for t in range(len(frames))]
    return save_image_grid(np.concatenate(rows), titles, path, columns=rows[0].shape[0])


def video_probe(backbone: nn.Module, root: str, config: VideoConfig, storage: Storage, device: torch.device,
                amp_dtype: torch.dtype | None = None, seed: int = 0, pictures: Path | None = None) -> dict:
    """The linear probe on pooled frame features of ``root``'s videos (synthetic clips when empty):
    ``{"test_accuracy", "val_accuracy", "best_lr", ..., "frames", "pool", "classes", "bad", "source",
    "missing"}`` (:class:`VideoSplits`; ``pool`` the one that ran, ``"auto"`` resolved by
    :func:`protocol_pool`); with ``pictures`` (a folder), ``video_frames.png`` of the
    first test videos (:func:`save_video_frames`)."""
    train, test, classes, source, missing = video_splits(root, config, storage, seed)
    pool = protocol_pool(source) if config.pool == "auto" else config.pool
    size = config.image_size
    if pictures is not None:
        save_video_frames(test, classes, size, pictures / VIDEO_PICTURE)
    (train_x, train_y, train_bad), (test_x, test_y, test_bad) = (
        video_features(backbone, split, size, pool, config.batch_size, config.num_workers, amp_dtype)
        for split in (train, test))
    probe = linear_probe(train_x, train_y, test_x, test_y, config.probe, num_classes=len(classes), device=device)
    return {**probe.to_dict(), "frames": config.frames, "pool": pool, "classes": list(classes),
            "bad": {"train": train_bad, "test": test_bad}, "source": source, "missing": missing}


def make_videos(per_class: int, length: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic clips ``(4 per_class, length, size, size, 3)`` uint8 and labels (:data:`DIRECTIONS`):
    a square of a random colour and texture crossing a noisy background at a random height (or
    column) and speed; every right clip is a left clip reversed in time, every down clip an up clip
    reversed, so the two hold the same frames."""
    rng = np.random.default_rng(seed)
    clips, labels = [], []
    side = max(size // 3, 2)
    for _ in range(per_class):
        for axis in (1, 0):  # horizontal (left, right), then vertical (up, down)
            background = rng.integers(0, 32, (size, size, 3)).astype(np.uint8)
            colour = rng.integers(128, 256, 3)
            texture = (rng.random((side, side, 1)) * 64).astype(np.int64)
            span = size - side
            across = int(rng.integers(0, span + 1))
            low, high = int(rng.integers(0, span // 3 + 1)), span - int(rng.integers(0, span // 3 + 1))
            frames = []
            for t in range(length):
                along = round(high + (low - high) * t / max(length - 1, 1))  # moving towards 0: left or up
                frame = background.copy()
                y, x = (across, along) if axis == 1 else (along, across)
                frame[y:y + side, x:x + side] = np.clip(colour + texture, 0, 255)
                frames.append(frame)
            first = DIRECTIONS.index("left" if axis == 1 else "up")
            clips += [np.stack(frames), np.stack(frames[::-1])]
            labels += [first, first + 1]
    return np.stack(clips), np.asarray(labels, dtype=np.int64)
