"""Dataset adapters of the dense benchmarks, reading each data set's own on-disk layout.

Every split is a :class:`~torch.utils.data.Dataset` whose item ``i`` is an image ``(3, h, w)``
uint8 and its labels ``(h', w')``: a class-index mask uint8 (255 = ignore) or a depth map float32
in metres (0 = unknown), sized by the split's :class:`Fit`: squares (the synthetic scenes' way,
aspect distorted), square crops of the aspect-kept image (a head's training samples: one per image,
or drawn anew, flipped and colour-jittered at each step), or the
whole aspect-kept image with the labels as stored (scored through sliding windows, the original's
protocol for ADE20K, VOC and Cityscapes, used for NYU too). A split lists its files when made (a
missing split, or its first sample's files, fail there) and decodes a sample when asked, so a
DataLoader's workers decode in parallel and nothing holds a whole split: ADE20K's 20k training
images are 16 GB of pixels at 512 px.

* **ADE20K** (``ADEChallengeData2016``): ``images/{training,validation}/*.jpg`` and
  ``annotations/{training,validation}/*.png`` (same stem). Label 0 ("other") is ignored and the
  150 classes become 0..149, as the original evaluation does (``reduce_zero_label``).
* **Pascal VOC 2012**: ids in ``ImageSets/Segmentation/{train,val}.txt``, images
  ``JPEGImages/<id>.jpg``, masks ``SegmentationClass/<id>.png`` (palette indices 0..20, 255 on
  object boundaries, kept as ignore). The train split is the SBD-augmented "trainaug" set (10,582
  images, the original's VOC configs' training set) where the root holds it: masks
  ``SegmentationClassAug/<id>.png`` and a list of its ids (:data:`VOC_AUG_LISTS`: mmseg's ``aug.txt``
  or ``trainaug.txt``, DeepLab's ``train_aug.txt``), else the release's 1,464 of ``train.txt``.
* **Cityscapes** (``leftImg8bit_trainvaltest`` and ``gtFine_trainvaltest`` unpacked side by side):
  ``leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png`` and
  ``gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png``; the 34 label ids become the 19
  evaluated classes 0..18 (:data:`CITYSCAPES_TRAIN_IDS`, the data set's own ``trainId`` column),
  every other id ignored.
* **NYU-Depth v2**, the layout of the depth toolbox the original's depth evaluation used:
  ``nyu_{train,test}.txt`` lines ``<image> <depth> <focal>`` (``/kitchen_0028b/rgb_00045.jpg
  /kitchen_0028b/sync_depth_00045.png 518.8579``), paths under the root, the depth a 16-bit PNG of
  millimetres (0 unknown), depths of 10 m or more unknown as the toolbox scores none; the training
  frames cut to rows 45-471 and columns 43-607 of their 480 x 640 (the RGB frame's white border:
  the toolbox's ``NYUCrop``). Or this project's own layout: ``{train,test}/*.npz``, each with
  ``image`` ``(H, W, 3)`` uint8 and ``depth`` ``(H, W)`` float32 metres, taken as they are. The test
  split is scored inside the Eigen crop, as NYU's depth results are reported (:func:`eigen_crop`).
* **KITTI** (Eigen split, the layout of the depth toolbox the original's depth evaluation used):
  ``kitti_eigen_{train,test}.txt`` lines ``<image> <depth> <focal>``, the image (a camera PNG)
  under ``input/``, the projected LiDAR depth (a 16-bit PNG, metres x 256, 0 unknown) under
  ``gt_depth/`` (``None``: a frame without one, skipped; the depth archive extracts as
  ``train/<drive>/`` and ``val/<drive>/``, which the toolbox's layout merges under ``gt_depth/``).
  Both cut to the bottom-centred 352 x 1216 (KB crop), depths beyond 80 m unknown, the test split
  scored inside the Garg crop (:func:`garg_crop`).
* **SUN RGB-D** (the toolbox's layout, where NYU-trained heads are tested): ``SUNRGBD_{train,val}_splits.txt``
  lines ``<image> <depth>``, paths under the root; a depth a 16-bit PNG of millimetres with its bits
  rotated left by 3, as the data set stores them; capped at 8 m, the val split scored at NYU's Eigen
  rows and columns (:func:`sunrgbd_crop`).

:class:`ArraySplit` serves arrays already in memory (the synthetic scenes) the same way.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import PurePosixPath

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from dinoflow.storage import Storage, join_uri
from trainer.data.datasets import ProcessLocalStorage

_log = logging.getLogger(__name__)

# Cityscapes' label id -> train id of its 19 evaluated classes (road, sidewalk, building, wall, fence, pole,
# traffic light, traffic sign, vegetation, terrain, sky, person, rider, car, truck, bus, train, motorcycle,
# bicycle); every other id is ignored
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                        26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
_CITYSCAPES_LOOKUP = np.full(256, 255, dtype=np.uint8)
_CITYSCAPES_LOOKUP[list(CITYSCAPES_TRAIN_IDS)] = list(CITYSCAPES_TRAIN_IDS.values())

# (read a file's bytes, the sample's files, decode the image too) -> (image or None, labels), as stored
Decoder = Callable[[Callable[[str], bytes], tuple[str, ...], bool], tuple[Image.Image | None, Image.Image]]
FITS = ("square", "crop", "whole")
CROP_ATTEMPTS = 10  # a window placed at most this many times while one class holds too much of it (mmseg's)
# the depth toolbox's ColorAug ranges (its NYU config's brightness; its KITTI config's is 0.9-1.1, Fit.brightness)
JITTER_GAMMA, JITTER_BRIGHTNESS, JITTER_COLOUR = (0.9, 1.1), (0.75, 1.25), (0.9, 1.1)


@dataclass(frozen=True)
class Fit:
    """How a split sizes its samples, ``side`` pixels (a multiple of the backbone's patch).

    * ``square``: image and labels resized to ``side`` x ``side``, aspect ratios distorted;
    * ``crop``: the image resized so that its shorter side is ``side`` (aspect kept), then a
      ``side`` x ``side`` window of it, placed once per sample (drawn from ``seed`` and the sample's
      index, so held features stay valid), the labels alike: a head's training samples, as the
      original's random crops;
    * ``whole``: the image with its shorter side at ``side`` (aspect kept) and the labels as stored:
      scored at their own resolution through sliding windows (:func:`~evaluators.dense.slid_average`),
      as the original evaluates ADE20K, VOC and Cityscapes (and here NYU's depths alike).

    With ``augment`` (``crop`` only), each draw of a sample (``draw``: how many times the head's
    training has drawn it before, :func:`~evaluators.dense.head_batches`) places its window anew,
    flips it left to right with probability 1/2, and with probability 1/2 jitters the image's
    colours (:func:`colour_jitter`), as the original's heads train on random crops, flips and
    colour changes (the depth toolbox's ``ColorAug``; mmseg's photometric distortion for
    segmentation, of which this keeps the brightness and colour changes). ``scales`` draws the
    resize's ratio to ``side`` from a range (mmseg's 0.5-2 for segmentation: the window then sees
    the image zoomed in or out, an image smaller than it padded), ``rotation`` turns the image
    about its centre by up to that many degrees half the time (the depth toolbox's 2.5) before the
    window is cut; :meth:`outside` names the window's pixels that came from no pixel of the image,
    which a split marks unknown. ``crop`` gives the window's rows and columns when it is not a
    ``side`` square (the depth toolbox's 416 x 544 of NYU's 480 x 640 frames, 352 x 704 of KITTI's
    352 x 1216: more of a wide frame in each crop); ``brightness`` the jitter's range of brightness
    gains (the toolbox's 0.75-1.25 for NYU, 0.9-1.1 for KITTI's outdoor frames). With
    ``max_class_share`` below 1 (segmentation: mmseg's ``cat_max_ratio`` 0.75) a split places the
    window again, up to :data:`CROP_ATTEMPTS` times in all, while one class holds that share or
    more of its labelled pixels (``attempt``: the try; the last kept). Every draw is seeded by
    ``seed``, the sample, the draw and the try: a resumed training draws the same.

    Images resize bilinearly, labels by nearest neighbour (class indices and depths stay values).
    """

    mode: str = "square"
    side: int = 224
    seed: int = 0
    augment: bool = False
    scales: tuple[float, float] = (1.0, 1.0)
    rotation: float = 0.0
    max_class_share: float = 1.0
    crop: tuple[int, int] = (0, 0)
    brightness: tuple[float, float] = JITTER_BRIGHTNESS

    def __post_init__(self) -> None:
        if self.mode not in FITS or self.side < 1:
            raise ValueError(f"fit mode must be one of {', '.join(FITS)} and side >= 1, got {self.mode!r}, {self.side}")
        if (self.augment or self.reshaped or self.crop != (0, 0)) and self.mode != "crop":
            raise ValueError(f"augment draws crops: fit mode 'crop', not {self.mode!r}")
        if (self.reshaped or self.max_class_share < 1) and not self.augment:
            raise ValueError("scales, rotation and max_class_share are drawn with augment: set augment=True")
        if not 0 < self.max_class_share <= 1:
            raise ValueError(f"max_class_share must be in (0, 1], got {self.max_class_share}")
        if self.crop != (0, 0) and min(self.crop) < 1:
            raise ValueError(f"crop must be the window's (rows, columns), both >= 1, or (0, 0): a side square; got "
                             f"{self.crop}")
        if not 0 < self.brightness[0] <= self.brightness[1]:
            raise ValueError(f"brightness must be a range of gains 0 < low <= high, got {self.brightness}")
        if not 0 < self.scales[0] <= self.scales[1] or not 0 <= self.rotation < 90:
            raise ValueError(f"scales must be a range 0 < low <= high and rotation 0-90 degrees, got {self.scales}, "
                             f"{self.rotation}")

    @property
    def reshaped(self) -> bool:
        """Whether the draws resize by a drawn ratio or rotate (and so may leave the window pixels of no image)."""
        return self.scales != (1.0, 1.0) or self.rotation > 0

    @property
    def window(self) -> tuple[int, int]:
        """The crops' rows and columns."""
        return self.crop if self.crop != (0, 0) else (self.side, self.side)

    def image(self, image: Image.Image, index: int, draw: int = 0, attempt: int = 0) -> np.ndarray:
        """``(3, h, w)`` uint8 of an RGB image (``draw``, ``attempt``: see the class docstring)."""
        pixels = np.array(self._placed(image, index, Image.BILINEAR, draw, attempt)).transpose(2, 0, 1)
        if not self.augment:
            return pixels
        jitter = np.random.default_rng([self.seed, index, draw, 1])
        if jitter.random() >= 0.5:
            return pixels
        return colour_jitter(pixels, gamma=jitter.uniform(*JITTER_GAMMA), brightness=jitter.uniform(*self.brightness),
                             colours=jitter.uniform(*JITTER_COLOUR, size=3))

    def labels(self, labels: Image.Image, index: int, draw: int = 0, attempt: int = 0) -> np.ndarray:
        """``(h, w)`` labels (as stored with ``whole``), placed as :meth:`image` places the image."""
        return np.array(labels if self.mode == "whole" else self._placed(labels, index, Image.NEAREST, draw, attempt))

    def outside(self, size: tuple[int, int], index: int, draw: int = 0, attempt: int = 0) -> np.ndarray | None:
        """Where the window of a picture of ``size`` (width, height) holds no pixel of it (padding,
        rotated-in corners), ``(rows, columns)`` bool; None when no draw can leave any."""
        if not self.reshaped and (self.crop == (0, 0) or self.mode != "crop"):
            return None
        return self.labels(Image.new("L", size, 1), index, draw, attempt) == 0

    def _placed(self, picture: Image.Image, index: int, resample: int, draw: int, attempt: int) -> Image.Image:
        width, height = picture.size
        if self.mode == "square":
            return picture.resize((self.side, self.side), resample)
        place = np.random.default_rng([self.seed, index, draw] if self.augment else [self.seed, index])
        ratio = place.uniform(*self.scales) if self.scales != (1.0, 1.0) else 1.0
        scale = self.side * ratio / min(width, height)
        least = self.side if ratio >= 1 else 1  # zoomed out: smaller than the window, padded by the crop
        size = (max(least, round(width * scale)), max(least, round(height * scale)))
        resized = picture.resize(size, resample)
        if self.mode == "whole":
            return resized
        if self.rotation and place.random() < 0.5:
            resized = resized.rotate(place.uniform(-self.rotation, self.rotation), resample, fillcolor=0)
        rows, cols = self.window
        left, top = (int(place.integers(0, max(extent - wanted, 0) + 1)) for extent, wanted in zip(size, (cols, rows)))
        if attempt:  # placed again in the same resized image (max_class_share)
            again = np.random.default_rng([self.seed, index, draw, attempt])
            left, top = (int(again.integers(0, max(extent - wanted, 0) + 1))
                         for extent, wanted in zip(size, (cols, rows)))
        window = resized.crop((left, top, left + cols, top + rows))  # beyond the image: 0
        if self.augment and place.random() < 0.5:
            return window.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return window


def colour_jitter(pixels: np.ndarray, gamma: float, brightness: float, colours: np.ndarray) -> np.ndarray:
    """``(3, h, w)`` uint8 pixels ``x`` as ``clip(255 (x / 255)^gamma * brightness * colour_c)``,
    rounded: a gamma, a brightness and a gain per channel."""
    scaled = 255.0 * (pixels / 255.0) ** gamma * brightness * np.asarray(colours, dtype=np.float64)[:, None, None]
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


class DenseSplit(Dataset[tuple[Tensor, Tensor]]):
    """One split of a data set on storage: per sample its files (``files[i]``, the image's first),
    a decoder, the :class:`Fit` of its samples (a side alone: squares) and a ``relabel`` of their label values (after
    sizing: nearest resizing and cropping keep values); :meth:`label` decodes the labels alone (the
    loss's class counts need no pixels). ``layout`` names the layout the files were found by, where a
    data set is read in more than one (VOC's train split: trainaug or the release's train)."""

    def __init__(self, storage: Storage, files: list[tuple[str, ...]], names: list[str], decode: Decoder,
                 fit: Fit | int, what: str, relabel: Callable[[np.ndarray], np.ndarray] | None = None,
                 layout: str = "") -> None:
        if not files:
            raise FileNotFoundError(f"no {what} found")
        absent = [uri for uri in files[0] if not storage.exists(uri)]
        if absent:  # a layout not the expected one fails here, not in a loader's worker at the first batch
            raise FileNotFoundError(f"{absent[0]} is missing: a file of the first of the {what} "
                                    "(evaluators/dense_datasets.py describes each data set's layout)")
        self._storage = ProcessLocalStorage(storage)
        self._files = files
        self._decode = decode
        self._relabel = relabel
        self.names = names
        self.fit = fit if isinstance(fit, Fit) else Fit("square", fit)
        self.layout = layout  # which of a data set's layouts the files were read by, where it has several (VOC's)

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, key: int) -> tuple[Tensor, Tensor]:
        """Sample ``key % len`` at its draw ``key // len`` (the keys of :func:`~evaluators.dense.head_batches`)."""
        draw, index = divmod(key, len(self._files))
        image, labels = self._decode(self._storage.get().read_bytes, self._files[index], True)
        assert image is not None
        attempt, values = self._labels(labels, index, draw)
        return torch.from_numpy(np.ascontiguousarray(self.fit.image(image, index, draw, attempt))), values

    def label(self, index: int) -> Tensor:
        return self._labels(self._decode(self._storage.get().read_bytes, self._files[index], False)[1], index, 0)[1]

    def _labels(self, labels: Image.Image, index: int, draw: int) -> tuple[int, Tensor]:
        """The try of the window kept (:class:`Fit`'s ``max_class_share``) and its labels."""
        tries = CROP_ATTEMPTS if self.fit.max_class_share < 1 else 1
        for attempt in range(tries):
            values = self.fit.labels(labels, index, draw, attempt)
            values = self._relabel(values) if self._relabel else values
            outside = self.fit.outside(labels.size, index, draw, attempt)
            if outside is not None:  # no pixel of the image there: ignored (masks) or unknown (depths)
                values = np.where(outside, 255 if values.dtype == np.uint8 else 0, values).astype(values.dtype)
            if attempt + 1 < tries:  # the last try is kept whatever it holds
                _, counts = np.unique(values[values != 255], return_counts=True)
                if len(counts) > 1 and counts.max() < self.fit.max_class_share * counts.sum():
                    break
        return attempt, torch.from_numpy(np.ascontiguousarray(values))


class ArraySplit(Dataset[tuple[Tensor, Tensor]]):
    """Images ``(N, 3, S, S)`` uint8 and their labels ``(N, S, S)`` already in memory, served as a
    :class:`DenseSplit` serves files."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        if len(images) != len(labels) or not len(images):
            raise ValueError(f"need as many labels as images, at least one: got {len(images)} and {len(labels)}")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int) -> tuple[Tensor, Tensor]:
        """Sample ``key % len`` (every draw alike: nothing here is augmented)."""
        index = key % len(self.images)
        return torch.from_numpy(self.images[index]), torch.from_numpy(self.labels[index])

    def label(self, index: int) -> Tensor:
        return torch.from_numpy(self.labels[index])


def _image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def _mask(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        if image.mode not in ("L", "P"):
            raise ValueError(f"a mask must be a single-channel index PNG (mode L or P), got mode {image.mode}")
        return image.copy() if image.mode == "L" else Image.fromarray(np.array(image, dtype=np.uint8), mode="L")


def _segmentation_sample(read: Callable[[str], bytes], files: tuple[str, ...],
                         with_image: bool) -> tuple[Image.Image | None, Image.Image]:
    return (_image(read(files[0])) if with_image else None), _mask(read(files[1]))


def _ade20k_labels(raw: np.ndarray) -> np.ndarray:
    return np.where(raw == 0, 255, raw - 1).astype(np.uint8)  # "other" ignored, 1..150 -> 0..149


def _cityscapes_labels(raw: np.ndarray) -> np.ndarray:
    return _CITYSCAPES_LOOKUP[raw]


def _nyu_sample(read: Callable[[str], bytes], files: tuple[str, ...],
                with_image: bool) -> tuple[Image.Image | None, Image.Image]:
    uri = files[0]
    with np.load(io.BytesIO(read(uri)), allow_pickle=False) as data:
        if "image" not in data or "depth" not in data:
            raise ValueError(f"{uri}: an NYU sample needs arrays 'image' and 'depth', has {sorted(data)}")
        image, depth = data["image"], data["depth"].astype(np.float32)
    if image.ndim != 3 or image.shape[2] != 3 or depth.shape != image.shape[:2]:
        raise ValueError(f"{uri}: image {image.shape} must be (H, W, 3) and depth {depth.shape} (H, W)")
    return (Image.fromarray(image) if with_image else None), Image.fromarray(depth, mode="F")


def _depth_png(read: Callable[[str], bytes], uri: str, expected: str) -> Image.Image:
    """A 16-bit PNG's depth map, refused (``expected`` says what it should be) in any other mode."""
    depth = Image.open(io.BytesIO(read(uri)))
    if depth.mode not in ("I", "I;16", "I;16B"):
        raise ValueError(f"{uri}: {expected}, got mode {depth.mode}")
    return depth


def _image_beside(read: Callable[[str], bytes], uri: str, depth_uri: str, size: tuple[int, int]) -> Image.Image:
    """The RGB image at ``uri``, refused unless of its depth map's ``size`` (width, height): a pair of
    another size (another camera, a list's line pairing the wrong files) would be cut or scaled out of
    register with its depths, every pixel's depth then scored against another pixel's."""
    image = _image(read(uri))
    if image.size != size:
        raise ValueError(f"{uri} is {image.size[0]} x {image.size[1]} but its depth map {depth_uri} is "
                         f"{size[0]} x {size[1]}: an image and its depths must be of one frame")
    return image


NYU_MAX_DEPTH = 10.0  # metres: the depth toolbox's NYU range; its PNGs' farther depths are not scored (nor trained on)
NYU_FRAME = (480, 640)  # rows, columns of NYU's frames
NYU_BORDER_CROP = (45, 472, 43, 608)  # rows, columns of a training frame kept: the toolbox's NYUCrop


def _nyu_png_sample(read: Callable[[str], bytes], files: tuple[str, ...], with_image: bool,
                    train: bool = False) -> tuple[Image.Image | None, Image.Image]:
    """An NYU frame of the depth toolbox's layout: its RGB image and its depths in metres (a 16-bit PNG
    of millimetres; 0 and :data:`NYU_MAX_DEPTH` or more unknown), a training frame cut to
    :data:`NYU_BORDER_CROP`."""
    image_uri, depth_uri = files
    depth = _depth_png(read, depth_uri, "an NYU depth map is a 16-bit PNG (millimetres)")
    metres = np.asarray(depth, dtype=np.float32) / 1000
    metres = np.where(metres < NYU_MAX_DEPTH, metres, 0).astype(np.float32)
    image = _image_beside(read, image_uri, depth_uri, depth.size) if with_image else None
    if train:
        if metres.shape != NYU_FRAME:
            raise ValueError(f"{depth_uri}: {metres.shape[1]} x {metres.shape[0]}, not NYU's 640 x 480 frame (its "
                             "training frames are cut to the toolbox's NYUCrop)")
        top, bottom, left, right = NYU_BORDER_CROP
        metres = metres[top:bottom, left:right]
        image = image.crop((left, top, right, bottom)) if image is not None else None
    return image, Image.fromarray(np.ascontiguousarray(metres), mode="F")


KB_CROP = (352, 1216)  # KITTI frames cut to their bottom-centred rows x columns, as the depth toolbox does
KITTI_MAX_DEPTH = 80.0  # metres: farther LiDAR returns are not scored (nor trained on)


def _kitti_sample(read: Callable[[str], bytes], files: tuple[str, ...],
                  with_image: bool) -> tuple[Image.Image | None, Image.Image]:
    """A KITTI frame and its LiDAR depths in metres (a 16-bit PNG of metres x 256; 0 and beyond
    :data:`KITTI_MAX_DEPTH` unknown), both cut to the bottom-centred :data:`KB_CROP` as the depth toolbox does."""
    image_uri, depth_uri = files
    depth = _depth_png(read, depth_uri, "a KITTI depth map is a 16-bit PNG (metres x 256)")
    width, height = depth.size
    rows, cols = KB_CROP
    if height < rows or width < cols:
        raise ValueError(f"{depth_uri}: {width} x {height} is smaller than KITTI's {cols} x {rows} crop")
    top, left = height - rows, (width - cols) // 2
    box = (left, top, left + cols, top + rows)
    metres = np.asarray(depth.crop(box), dtype=np.float32) / 256
    # the sizes compared before the cut: PIL pads a crop to its box, so after it any image would pass
    image = _image_beside(read, image_uri, depth_uri, depth.size).crop(box) if with_image else None
    return image, Image.fromarray(np.where(metres <= KITTI_MAX_DEPTH, metres, 0).astype(np.float32), mode="F")


def load_ade20k(storage: Storage, root: str, split: str, fit: Fit | int, limit: int = 0) -> DenseSplit:
    """ADE20K images and masks (classes 0..149, 255 ignored) of ``split`` (training or validation)."""
    if split not in ("training", "validation"):
        raise ValueError(f"ADE20K split must be training or validation, got {split!r}")
    images = sorted(u for u in storage.list(join_uri(root, "images", split)) if u.endswith(".jpg"))
    images = images[:limit] if limit else images
    names = [PurePosixPath(uri).stem for uri in images]
    files = [(uri, join_uri(root, "annotations", split, f"{stem}.png")) for uri, stem in zip(images, names)]
    return DenseSplit(storage, files, names, _segmentation_sample, fit,
                      f"ADE20K images under {join_uri(root, 'images', split)}", _ade20k_labels)


# the lists of VOC's SBD-augmented training set ("trainaug", 10,582 images), in the layouts it is downloaded in, the
# first found read: mmseg's tools/convert_datasets/voc_aug.py writes aug.txt (the 9,118 beyond train.txt, what the
# original's VOC configs read beside train.txt) and trainaug.txt (all), DeepLab's lists are train_aug.txt, of ids
# (VainF's DeepLabV3Plus) or of "/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png" lines (deeplab-pytorch's)
VOC_AUG_LISTS = ("ImageSets/Segmentation/aug.txt", "ImageSets/Segmentation/trainaug.txt",
                 "ImageSets/Segmentation/train_aug.txt", "ImageSets/SegmentationAug/train_aug.txt")


def _voc_ids(storage: Storage, listing: str) -> list[str]:
    """The image ids of a VOC list: each line's first field, its folder and extension dropped
    (lines of ids, or of image and mask paths)."""
    lines = storage.read_bytes(listing).decode().splitlines()
    return [PurePosixPath(line.split()[0]).stem for line in lines if line.strip()]


def _voc_train_aug(storage: Storage, root: str, train: list[str]) -> tuple[list[str], str] | None:
    """The ids beyond ``train`` (train.txt's) of the first of :data:`VOC_AUG_LISTS` the root holds,
    and its path; None where it holds none. Refused: a list naming a val image (trained on what is
    scored), or a first extra id without its ``SegmentationClassAug`` mask."""
    found = [join_uri(root, listing) for listing in VOC_AUG_LISTS if storage.exists(join_uri(root, listing))]
    if not found:
        return None
    known = set(train)
    extra = list(dict.fromkeys(i for i in _voc_ids(storage, found[0]) if i not in known))
    val_list = join_uri(root, "ImageSets", "Segmentation", "val.txt")
    scored = set(_voc_ids(storage, val_list)) if storage.exists(val_list) else set()
    leaked = [i for i in extra if i in scored]
    if leaked:
        raise ValueError(f"{found[0]} lists {len(leaked)} images of {val_list} (first {leaked[0]}): the training "
                         "set would hold images the val split scores; trainaug lists leave val's out")
    if extra and not storage.exists(join_uri(root, "SegmentationClassAug", f"{extra[0]}.png")):
        raise FileNotFoundError(f"{join_uri(root, 'SegmentationClassAug', f'{extra[0]}.png')} is missing: {found[0]} "
                                "lists VOC's SBD-augmented training set, whose masks are SegmentationClassAug/<id>.png "
                                "(mmseg's voc_aug.py output or DeepLab's SegmentationClassAug.zip, under the root)")
    return extra, found[0]


def load_voc(storage: Storage, root: str, split: str, fit: Fit | int, limit: int = 0) -> DenseSplit:
    """Pascal VOC 2012 segmentation images and masks (0..20, 255 ignored) of ``split`` (train or val).

    The train split is "trainaug" where the root holds one of :data:`VOC_AUG_LISTS`: train.txt's
    images with their ``SegmentationClass`` masks, then the list's others with their
    ``SegmentationClassAug`` ones (the SBD's), as the original's VOC configs train (mmseg's
    ``voc12aug``); else train.txt's alone. The layout read is logged and named in the split's
    ``layout``."""
    listing = join_uri(root, "ImageSets", "Segmentation", f"{split}.txt")
    if not storage.exists(listing):
        raise FileNotFoundError(f"VOC split list {listing} is missing (splits: train, val)")
    ids = _voc_ids(storage, listing)
    masks = [join_uri(root, "SegmentationClass", f"{i}.png") for i in ids]
    layout, what = split, f"VOC ids in {listing}"
    augmented = _voc_train_aug(storage, root, ids) if split == "train" else None
    if augmented is not None:
        extra, aug_list = augmented
        ids, masks = ids + extra, masks + [join_uri(root, "SegmentationClassAug", f"{i}.png") for i in extra]
        layout, what = "trainaug", f"VOC ids in {listing} and {aug_list}"
    _log.info("VOC %s split: %d images (%s; %s)", split, len(ids), layout, what)
    ids, masks = (ids[:limit], masks[:limit]) if limit else (ids, masks)
    files = [(join_uri(root, "JPEGImages", f"{i}.jpg"), mask) for i, mask in zip(ids, masks)]
    return DenseSplit(storage, files, ids, _segmentation_sample, fit, what, layout=layout)


def load_cityscapes(storage: Storage, root: str, split: str, fit: Fit | int, limit: int = 0) -> DenseSplit:
    """Cityscapes images and fine masks (train ids 0..18, 255 ignored) of ``split`` (train or val)."""
    if split not in ("train", "val"):
        raise ValueError(f"Cityscapes split must be train or val (test's masks are withheld), got {split!r}")
    suffix = "_leftImg8bit.png"
    images = sorted(u for u in storage.list(join_uri(root, "leftImg8bit", split), recursive=True) if u.endswith(suffix))
    images = images[:limit] if limit else images
    names = [PurePosixPath(uri).name.removesuffix(suffix) for uri in images]
    files = [(uri, join_uri(root, "gtFine", split, PurePosixPath(uri).parent.name, f"{name}_gtFine_labelIds.png"))
             for uri, name in zip(images, names)]
    return DenseSplit(storage, files, names, _segmentation_sample, fit,
                      f"Cityscapes images (*{suffix}) under {join_uri(root, 'leftImg8bit', split)}", _cityscapes_labels)


def load_nyu(storage: Storage, root: str, split: str, fit: Fit | int, limit: int = 0) -> DenseSplit:
    """NYU-Depth v2 images and depth maps (metres, 0 unknown) of ``split`` (train or test): the
    frames listed in ``nyu_<split>.txt`` where the root holds it (the depth toolbox's layout, in the
    order of their image paths, as it sorts them), else ``<split>/*.npz``; the test split's depths
    outside the Eigen crop unknown (:func:`eigen_crop`), so they are not scored."""
    if split not in ("train", "test"):
        raise ValueError(f"NYU split must be train or test, got {split!r}")
    crop = eigen_crop if split == "test" else None
    listing = join_uri(root, f"nyu_{split}.txt")
    if storage.exists(listing):
        pairs = sorted(_listed_pairs(storage, listing))[: limit or None]
        return DenseSplit(storage, [(join_uri(root, image), join_uri(root, depth)) for image, depth in pairs],
                          [image.replace("/", "_").rsplit(".", 1)[0] for image, _ in pairs],
                          partial(_nyu_png_sample, train=split == "train"), fit,
                          f"NYU frames with depth in {listing}", crop)
    samples = sorted(u for u in storage.list(join_uri(root, split)) if u.endswith(".npz"))
    samples = samples[:limit] if limit else samples
    return DenseSplit(storage, [(uri,) for uri in samples], [PurePosixPath(uri).stem for uri in samples], _nyu_sample,
                      fit, f"NYU frames (a split list {listing} or {join_uri(root, split)}/*.npz)", crop)


def load_kitti(storage: Storage, root: str, split: str, fit: Fit | int, limit: int = 0) -> DenseSplit:
    """KITTI's Eigen-split images and LiDAR depths (metres, 0 unknown or beyond 80 m) of ``split``
    (train or test), the frames listed in ``kitti_eigen_<split>.txt``; the test split's depths
    outside the Garg crop unknown (:func:`garg_crop`)."""
    if split not in ("train", "test"):
        raise ValueError(f"KITTI split must be train or test, got {split!r}")
    listing = join_uri(root, f"kitti_eigen_{split}.txt")
    if not storage.exists(listing):
        raise FileNotFoundError(f"KITTI split list {listing} is missing (lines '<image> <depth> <focal>', the "
                                "image under input/, the depth under gt_depth/)")
    pairs = _listed_pairs(storage, listing)
    files = [(join_uri(root, "input", image), join_uri(root, "gt_depth", depth)) for image, depth in pairs]
    names = [image.replace("/", "_").removesuffix(".png") for image, _ in pairs]
    files, names = (files[:limit], names[:limit]) if limit else (files, names)
    return DenseSplit(storage, files, names, _kitti_sample, fit, f"KITTI frames with depth in {listing}",
                      garg_crop if split == "test" else None)


def _listed_pairs(storage: Storage, listing: str) -> list[tuple[str, str]]:
    """The ``(image, depth)`` paths of a depth toolbox split list (lines ``<image> <depth> [...]``),
    leading slashes dropped; a frame whose depth is ``None`` (none projected) is skipped."""
    pairs = []
    for number, line in enumerate(storage.read_bytes(listing).decode().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2:
            raise ValueError(f"{listing} line {number}: {line!r} is not '<image> <depth> [<focal>]'")
        if fields[1] != "None":
            pairs.append((fields[0].lstrip("/"), fields[1].lstrip("/")))
    return pairs


SUN_MAX_DEPTH = 8.0  # metres: SUN RGB-D's depths and the predictions scored on it are capped here, as the toolbox does


def _sunrgbd_sample(read: Callable[[str], bytes], files: tuple[str, ...],
                    with_image: bool) -> tuple[Image.Image | None, Image.Image]:
    image_uri, depth_uri = files
    depth = _depth_png(read, depth_uri, "a SUN RGB-D depth map is a 16-bit PNG")
    stored = np.asarray(depth, dtype=np.int64).astype(np.uint16)
    metres = (np.right_shift(stored, 3) | np.left_shift(stored, 13)).astype(np.float32) / 1000  # its bits rotated by 3
    image = _image_beside(read, image_uri, depth_uri, depth.size) if with_image else None
    return image, Image.fromarray(np.minimum(metres, SUN_MAX_DEPTH), mode="F")


def load_sunrgbd(storage: Storage, root: str, split: str, fit: Fit | int, limit: int = 0) -> DenseSplit:
    """SUN RGB-D images and depths (metres, 0 unknown, capped at :data:`SUN_MAX_DEPTH`) of ``split``,
    the frames listed in ``SUNRGBD_<split>_splits.txt`` (paths under ``root``), the depth toolbox's
    layout of the set that NYU-trained heads are tested on; the val split's depths outside NYU's
    Eigen rows and columns unknown (:func:`sunrgbd_crop`)."""
    listing = join_uri(root, f"SUNRGBD_{split}_splits.txt")
    if not storage.exists(listing):
        raise FileNotFoundError(f"SUN RGB-D split list {listing} is missing (lines '<image> <depth>', paths under "
                                f"{root}; splits: train, val)")
    pairs = _listed_pairs(storage, listing)[: limit or None]
    return DenseSplit(storage, [(join_uri(root, image), join_uri(root, depth)) for image, depth in pairs],
                      [image.replace("/", "_").rsplit(".", 1)[0] for image, _ in pairs], _sunrgbd_sample, fit,
                      f"SUN RGB-D frames with depth in {listing}", sunrgbd_crop if split == "val" else None)


def _kept_inside(depth: np.ndarray, top: int, bottom: int, left: int, right: int) -> np.ndarray:
    """``depth`` with every pixel outside rows ``top:bottom`` and columns ``left:right`` unknown (0)."""
    kept = np.zeros_like(depth)
    kept[..., top:bottom, left:right] = depth[..., top:bottom, left:right]
    return kept


GARG_CROP = (0.40810811, 0.99189189, 0.03594771, 0.96405229)  # the share of rows, columns of a frame scored


def garg_crop(depth: np.ndarray) -> np.ndarray:
    """``depth`` with every pixel outside the Garg crop set unknown (0): KITTI's depth metrics are
    reported over rows 40.8-99.2 % and columns 3.6-96.4 % of a frame (Garg et al., 2016), most of the
    sky above the LiDAR's reach left out. The shares are of the map given, here the KB-cropped
    352 x 1216 (rows 143-348, columns 43-1171), as the depth toolbox the original's KITTI results
    come from masks its KB-cropped ground truth (``eval_kb_crop``, then ``eval_mask``); BTS's
    evaluation takes them of the whole ~375 x 1242 frame instead (rows 153-370 there, 130-347 of the
    KB crop), a slightly different set of pixels."""
    height, width = depth.shape[-2:]
    top, bottom = int(GARG_CROP[0] * height), int(GARG_CROP[1] * height)
    left, right = int(GARG_CROP[2] * width), int(GARG_CROP[3] * width)
    return _kept_inside(depth, top, bottom, left, right)


EIGEN_CROP = (45, 471, 41, 601)  # rows and columns of NYU's 480 x 640 frames that are scored (Eigen et al., 2014)


def eigen_crop(depth: np.ndarray) -> np.ndarray:
    """``depth`` with every pixel outside the Eigen crop set unknown (0): NYU's depth metrics are
    reported over rows 45-470 and columns 41-600 of its 480 x 640 frames, leaving out the border the
    Kinect's depth and the RGB camera do not share. A map of another size (a resized test set) keeps
    the same share of its frame."""
    height, width = depth.shape[-2:]
    top, bottom, left, right = (round(edge * side) for edge, side in zip(
        (EIGEN_CROP[0] / 480, EIGEN_CROP[1] / 480, EIGEN_CROP[2] / 640, EIGEN_CROP[3] / 640),
        (height, height, width, width)))
    return _kept_inside(depth, top, bottom, left, right)


def sunrgbd_crop(depth: np.ndarray) -> np.ndarray:
    """``depth`` with every pixel outside rows 45-470 and columns 41-600 set unknown (0): NYU's
    Eigen crop (:data:`EIGEN_CROP`) at the same pixels of SUN RGB-D's larger frames, as the depth
    toolbox scores its transfer from NYU."""
    return _kept_inside(depth, *EIGEN_CROP)
