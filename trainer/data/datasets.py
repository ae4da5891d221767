"""Map-style datasets of fixed-size uint8 RGB images: image folders and Fashion-MNIST (tar shards:
:mod:`trainer.data.shards`), and the decoding they share.

Why fixed-size uint8: every image is decoded on a CPU worker once, to RGB, and resampled
(bicubic) to ``load_size x load_size``. Batches of equal-sized uint8 tensors are 4x smaller than
float ones to move, and the random resized crops, flips and colour jitter of the multi-crop
augmentation then run batched on the device instead of image by image in Python.

Which part of an image is kept: its centred region of aspect ratio (width / height) at most
``max_aspect`` and at least its inverse, squeezed to the square, with that region's aspect in
``Sample.aspect``. ``max_aspect`` 1 keeps the centre square (the evaluations' centre crop); above
1, training's random resized crops draw their boxes over the whole region in its own pixels (the
aspect undoes the squeeze, :func:`trainer.data.augment.crop_boxes`), as the original's crops are
drawn over the whole image: a 4:3 photograph's centre square holds 75 % of it.

Why a large JPEG is decoded at a reduced scale: a worker's time goes mostly into decoding, and
libjpeg can decode at 1/2, 1/4 or 1/8 of the size for a fraction of the work. As Pillow's own
``thumbnail`` does, the scale kept leaves the shorter side at least twice ``load_size`` before the
bicubic resize, so the result differs from a full decode by less than the choice of resampling
filter does (``benchmarks/decode.py`` times both and gives the difference); images under that
size, and other formats, decode as before.

Why a bad image is a ``Sample`` with ``image=None`` rather than an error: a few broken files in a
large crawl are normal and one of them must not kill a multi-day run. :func:`collate_samples`
drops them and names them in ``Batch.bad_keys``, and :class:`BadImageTracker` fails the run when
too many go missing, because then the data (or its decoding) is broken. A JPEG that lacks only its
end-of-image marker, as many in crawls and in real data sets do, is not bad (:func:`read_region`).

All bytes are read through :class:`~dinoflow.storage.Storage`, so local folders, ``file://`` and
``s3://`` work alike, also inside forked or spawned ``DataLoader`` workers.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch
from PIL import ExifTags, Image, UnidentifiedImageError
from torch.utils.data import Dataset

from dinoflow.storage import Storage
from trainer.data.fashion_mnist import load_split

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
DEFAULT_MAX_PIXELS = 64_000_000
# Only these decoders run, so a mislabelled file never reaches e.g. Pillow's EPS plugin, which
# shells out to Ghostscript.
DECODE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
DECODE_ERRORS = (
    UnidentifiedImageError,
    Image.DecompressionBombError,
    OSError,  # truncated data ("image file is truncated"), broken streams
    ValueError,
    EOFError,
    SyntaxError,  # Pillow's PNG reader raises it for broken chunks
)
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One image ``(3, S, S)`` uint8, or None when it could not be decoded; label -1 if none;
    ``aspect``: the width / height of the image region the square holds (module docstring)."""

    image: torch.Tensor | None
    label: int
    key: str
    aspect: float = 1.0


@dataclass(frozen=True)
class Batch:
    """Decoded images ``(B, 3, S, S)`` uint8 with labels ``(B,)`` int64 and their regions' aspects
    ``(B,)`` float32 (:class:`Sample`), and the keys skipped.

    A batch whose images were all bad has ``B = 0`` and ``images`` of shape ``(0, 3, 0, 0)``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    keys: list[str]
    bad_keys: list[str]
    aspects: torch.Tensor

    def pin_memory(self) -> Batch:
        """This batch with its tensors in page-locked memory: a DataLoader with ``pin_memory`` calls
        this in its pinning thread (it leaves objects without the method as they are). Why: CUDA
        stages a copy from pageable memory through pinned memory synchronously and may wait for the
        work queued on the stream first, so the loop's next batch, copied in the step's wait, could
        leave the host only once the step had finished; from pinned memory the copy waits for
        nothing."""
        return replace(self, images=self.images.pin_memory(), labels=self.labels.pin_memory(),
                       aspects=self.aspects.pin_memory())

    def to(self, device: torch.device) -> Batch:
        """This batch's tensors on ``device`` (copied without blocking from pinned memory)."""
        return replace(self, images=self.images.to(device, non_blocking=True),
                       labels=self.labels.to(device, non_blocking=True),
                       aspects=self.aspects.to(device, non_blocking=True))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode as RGB; transparent pixels are composited onto white.

    Why white: colours under alpha 0 are arbitrary (often black or garbage), and white is how
    transparent product shots and logos are shown. 16-bit grayscale is scaled down, because
    Pillow's own conversion clips it at 255 and turns most such images white.
    """
    if img.mode == "I" or img.mode.startswith("I;16"):
        scaled = np.clip(np.asarray(img, dtype=np.float64) / 257.0, 0, 255).round()
        img = Image.fromarray(scaled.astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


DRAFT_GAP = 2  # a JPEG decodes at a reduced scale only while its shorter side stays >= DRAFT_GAP x load_size


def check_max_aspect(max_aspect: float) -> None:
    """Refuse a ``max_aspect`` below 1, naming what is allowed."""
    if max_aspect < 1:
        raise ValueError(f"max_aspect must be at least 1 (1 keeps the centre square), got {max_aspect}")


def region_size(width: float, height: float, max_aspect: float = 1.0) -> tuple[float, float]:
    """The width and height of the centred region of a ``width x height`` image that is kept: the
    whole image when its aspect ratio lies within ``[1 / max_aspect, max_aspect]``, else the largest
    centred part whose ratio is that bound (``max_aspect`` 1: the centre square)."""
    check_max_aspect(max_aspect)
    return min(width, height * max_aspect), min(height, width * max_aspect)


def resize_center_crop(img: Image.Image, size: int, extent: tuple[float, float] | None = None,
                       max_aspect: float = 1.0) -> Image.Image:
    """The centred region of :func:`region_size` resampled to ``size x size`` (bicubic,
    antialiased): with ``max_aspect`` 1, the shorter side resized to ``size`` and the centre square kept.

    Done as one resampling of the region of the source, so no intermediate image is made and its
    size needs no rounding. ``extent``: where the picture ends in ``img`` (width, height) if not at
    its edges (a JPEG decoded at a reduced scale, whose size is rounded up).
    """
    width, height = extent or img.size
    region_width, region_height = region_size(width, height, max_aspect)
    left, top = (width - region_width) / 2, (height - region_height) / 2
    return img.resize((size, size), Image.Resampling.BICUBIC,
                      box=(left, top, left + region_width, top + region_height))


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # (3, S, S)


class TooManyPixels(ValueError):
    """An image whose header gives more than the allowed number of pixels."""

    def __init__(self, width: int, height: int, max_pixels: int) -> None:
        super().__init__(f"{width}x{height} pixels is more than max_pixels={max_pixels}")
        self.width, self.height, self.max_pixels = width, height, max_pixels


# how a picture stored with each EXIF orientation is turned upright (ImageOps.exif_transpose's; 1: as stored)
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}
QUARTER_TURNS = (5, 6, 7, 8)  # the orientations stored a quarter turn from upright: width and height swap


def exif_orientation(img: Image.Image) -> int | None:
    """The EXIF (or XMP) orientation of an opened image, None when it has none or its EXIF cannot be
    read: a broken EXIF block does not make the picture unreadable (viewers show it as stored)."""
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation)
    except DECODE_ERRORS:
        return None
    return orientation if isinstance(orientation, int) else None


def read_region(data: bytes, load_size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                max_aspect: float = 1.0) -> tuple[torch.Tensor, float]:
    """An encoded image's region of aspect at most ``max_aspect`` (module docstring) as
    ``(3, load_size, load_size)`` uint8, and that region's aspect ratio (width / height); raises
    one of ``DECODE_ERRORS``.

    The image is the upright one its EXIF (or XMP) orientation says a viewer shows (a phone stores
    a portrait photo sideways with orientation 6): the region and its aspect are the upright
    image's. Why the square is turned upright rather than the decoded image: the centred region of
    a turned image is the turned centred region (:func:`region_size` is the same with width and
    height swapped), a draft's extent (below) holds only in the stored orientation, and turning the
    small square costs next to nothing (nothing at all without an orientation).

    A large JPEG is decoded at a reduced scale (module docstring), its region's shorter side kept
    at least ``DRAFT_GAP x load_size``.
    Refused: not a JPEG/PNG/WebP/GIF/BMP Pillow can read (``UnidentifiedImageError``), truncated
    (the whole image is decoded, so a cut file is caught here and not later), or more than
    ``max_pixels`` pixels (:class:`TooManyPixels`, checked from the header before decoding). A JPEG
    that lacks only its end-of-image marker is not truncated: it is read with the marker added
    (:func:`_with_end_of_image` says when that is so).
    """
    try:
        return _read_region(data, load_size, max_pixels, max_aspect)
    except OSError:  # truncated, broken stream
        completed = _with_end_of_image(data, max_pixels)
        if completed is None:
            raise
    return _read_region(completed, load_size, max_pixels, max_aspect)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """``data`` opened by one of ``DECODE_FORMATS``, refused above ``max_pixels`` from its header, before decoding."""
    img = Image.open(io.BytesIO(data), formats=DECODE_FORMATS)
    width, height = img.size
    if width * height > max_pixels:
        img.close()
        raise TooManyPixels(width, height, max_pixels)
    return img


def _read_region(data: bytes, load_size: int, max_pixels: int, max_aspect: float) -> tuple[torch.Tensor, float]:
    """:func:`read_region` of ``data`` as it is."""
    with _open(data, max_pixels) as img:
        width, height = img.size
        region_width, region_height = region_size(width, height, max_aspect)
        side = max(int(min(region_width, region_height)), 1)
        draft = img.draft(None, (width * DRAFT_GAP * load_size // side, height * DRAFT_GAP * load_size // side))
        img.load()
        square = resize_center_crop(to_rgb(img), load_size, draft[1][2:] if draft else None, max_aspect)
        orientation = exif_orientation(img)  # read once loaded: a PNG may hold it after the pixels
    if orientation in UPRIGHT:
        square = square.transpose(UPRIGHT[orientation])
    if orientation in QUARTER_TURNS:
        region_width, region_height = region_height, region_width
    return _to_tensor(square), region_width / region_height


END_OF_IMAGE = b"\xff\xd9"
# what :func:`_with_end_of_image` decodes after a JPEG's data to see whether libjpeg reads past it: pseudo-random
# bytes, neither 0x00 (libjpeg pads a cut scan with zero bits) nor 0xFF (a marker); not all ones either, which
# libjpeg decodes as it decodes zeros where a Huffman table's shortest code is an end of block
_TAIL_PROBE = bytes((0xA5 + 97 * i) % 254 + 1 for i in range(64))
# JPEG frames (SOFn markers) whose scans _codes_every_coefficient judges: baseline, extended and progressive Huffman;
# the others (lossless, hierarchical, arithmetic-coded: rare) are never completed
_JUDGED_FRAMES = frozenset({0xC0, 0xC1, 0xC2})
_OTHER_FRAMES = frozenset({0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def _with_end_of_image(data: bytes, max_pixels: int) -> bytes | None:
    """``data`` and the end-of-image marker it lacks (or its second byte) when it is a JPEG whole but for that
    marker, else None.

    Why: files that end right after their last scan are common in crawls and in real data sets, and Pillow refuses
    them as truncated (its decoder waits for the marker) though every pixel is there. Why not append the marker
    alone (all that Pillow's ``LOAD_TRUNCATED_IMAGES``, a process-wide flag, does for a JPEG): libjpeg decodes the
    rest of a scan cut short by a marker from zero bits, with a warning that Pillow drops, so a file cut in its scan
    data would be read too, its missing part grey or smeared. Asked instead: the scans that ``data`` starts code
    every coefficient to its last bit (:func:`_codes_every_coefficient`: a progressive file cut between two scans
    does not), and the pixels, decoded at full scale, do not depend on what follows ``data``: the same with the
    marker right after it (past a cut, libjpeg reads zeros) and after ``_TAIL_PROBE`` (which libjpeg skips after a
    whole scan and reads into a cut one). Both decodes are held to ``max_pixels`` like any other.
    """
    body = data.removesuffix(b"\xff")  # a file cut inside the marker
    if not data.startswith(b"\xff\xd8") or data.endswith(END_OF_IMAGE) or not _codes_every_coefficient(body):
        return None
    completed = body + END_OF_IMAGE
    try:
        whole = _pixel_digest(completed, max_pixels) == _pixel_digest(body + _TAIL_PROBE + END_OF_IMAGE, max_pixels)
    except DECODE_ERRORS:
        return None
    return completed if whole else None


def _pixel_digest(data: bytes, max_pixels: int) -> bytes:
    """A digest of an image's pixels, decoded at full scale."""
    with _open(data, max_pixels) as img:
        img.load()
        return hashlib.sha256(img.tobytes()).digest()


def _codes_every_coefficient(data: bytes) -> bool:
    """Whether ``data`` (a JPEG from its start-of-image marker, maybe cut) ends in a scan's entropy-coded data and
    its scans code all 64 coefficients of every component down to their last bit (successive approximation ``Al``
    0), in a baseline, extended or progressive Huffman frame; False for other frames and for headers that are cut
    or cannot be read."""
    components: set[int] = set()
    coded: set[tuple[int, int]] = set()
    pos, in_scan = 2, False
    while pos < len(data):
        if data[pos] != 0xFF or pos + 4 > len(data):
            return False
        marker, end = data[pos + 1], pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xFF:  # a fill byte before a marker
            pos += 1
            continue
        segment = data[pos + 4 : end]
        if end > len(data) or marker in _OTHER_FRAMES or 0xD0 <= marker <= 0xD9 or marker == 0x01:
            return False
        if marker in _JUDGED_FRAMES:
            components = set(segment[6 : 6 + 3 * segment[5] : 3]) if len(segment) >= 6 else set()
        elif marker == 0xDA:  # start of scan: its components, first and last coefficient, last bit (Al)
            count = segment[0] if segment else 0
            if len(segment) < 4 + 2 * count:
                return False
            first, last, low_bit = segment[1 + 2 * count], segment[2 + 2 * count], segment[3 + 2 * count] & 0x0F
            if low_bit == 0:
                coded.update((c, k) for c in segment[1 : 1 + 2 * count : 2] for k in range(first, last + 1))
            end = _entropy_data_end(data, end)
        pos, in_scan = end, marker == 0xDA
    return in_scan and bool(components) and coded >= {(c, k) for c in components for k in range(64)}


def _entropy_data_end(data: bytes, pos: int) -> int:
    """Where the entropy-coded data from ``pos`` ends: at the next marker (not a stuffed 0xFF 0x00, a fill byte or a
    restart marker), ``len(data)`` when none follows."""
    while (pos := data.find(b"\xff", pos)) != -1 and pos + 1 < len(data):
        following = data[pos + 1]
        if following not in (0x00, 0xFF) and not 0xD0 <= following <= 0xD7:
            return pos
        pos += 1
    return len(data)


def read_image(data: bytes, load_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """An encoded image's centre square as ``(3, load_size, load_size)`` uint8 (:func:`read_region`)."""
    return read_region(data, load_size, max_pixels)[0]


def decode_region(data: bytes, load_size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                  max_aspect: float = 1.0) -> tuple[torch.Tensor, float] | None:
    """:func:`read_region`, or None if the image is bad (the reason is logged at DEBUG level)."""
    try:
        return read_region(data, load_size, max_pixels, max_aspect)
    except DECODE_ERRORS as err:
        _log.debug("bad image (%d bytes): %s: %s", len(data), type(err).__name__, err)
        return None


def decode_image(data: bytes, load_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor | None:
    """An image's centre square (:func:`read_image`), or None if the image is bad."""
    region = decode_region(data, load_size, max_pixels)
    return None if region is None else region[0]


def sample_of(region: tuple[torch.Tensor, float] | None, label: int, key: str) -> Sample:
    """A :class:`Sample` of a decoded region (:func:`decode_region`), or of a bad image (None)."""
    return Sample(None, label, key) if region is None else Sample(region[0], label, key, region[1])


def check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be a positive number of pixels, got {value}")


class ProcessLocalStorage:
    """The caller's Storage in the process that made the dataset; a fresh twin in any other.

    Why: fsspec's s3 client refuses to run in a process forked after it was created ("not
    fork-safe"), and a pickled one is useless in a spawned worker, so each DataLoader worker
    builds its own Storage with the same settings on first use.
    """

    def __init__(self, storage: Storage) -> None:
        self._settings = (storage.s3, storage.retry, storage.part_size)
        self._storage: Storage | None = storage
        self._pid = os.getpid()

    def get(self) -> Storage:
        if self._storage is None or self._pid != os.getpid():
            self._storage = Storage(*self._settings)
            self._pid = os.getpid()
        return self._storage

    def __getstate__(self) -> dict[str, Any]:
        return {"_settings": self._settings, "_storage": None, "_pid": None}


def _has_extension(uri: str, extensions: Sequence[str]) -> bool:
    return uri.lower().endswith(tuple("." + ext.lower().lstrip(".") for ext in extensions))


def keys_sha256(keys: Iterable[str]) -> str:
    """The sha256 of image keys in their order: which images a pass reads, known without decoding
    any (what saved work of that pass is keyed by)."""
    digest = hashlib.sha256()
    for key in keys:
        digest.update(str(key).encode() + b"\0")  # no key holds a NUL: it ends each unambiguously
    return digest.hexdigest()


class ImageListDataset(Dataset[Sample]):
    """The images at ``keys`` (URIs), each with its label: a split whose files a data set lists
    itself (Pascal VOC's ``ImageSets``), decoded as :class:`ImageFolderDataset`'s."""

    def __init__(
        self,
        storage: Storage,
        keys: Sequence[str],
        labels: Sequence[int] | np.ndarray,
        load_size: int,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_aspect: float = 1.0,
    ) -> None:
        check_positive(load_size=load_size, max_pixels=max_pixels)
        check_max_aspect(max_aspect)
        if len(keys) != len(labels):
            raise ValueError(f"{len(keys)} image keys but {len(labels)} labels: give one label per image")
        self.load_size = load_size
        self.max_pixels = max_pixels
        self.max_aspect = max_aspect
        self._storage = ProcessLocalStorage(storage)
        # numpy arrays rather than lists of Python objects: forked workers then share the pages
        self._keys = np.array(keys, dtype=str)
        self._labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def labels(self) -> np.ndarray:
        """Every image's label (``(N,)`` int64; a folder's: -1 outside class folders), known without decoding."""
        return self._labels

    @property
    def keys(self) -> np.ndarray:
        """Every image's URI (``(N,)`` str), known without decoding."""
        return self._keys

    def __getitem__(self, index: int) -> Sample:
        key = str(self._keys[index])
        region = decode_region(self._storage.get().read_bytes(key), self.load_size, self.max_pixels, self.max_aspect)
        return sample_of(region, int(self._labels[index]), key)


class ImageFolderDataset(ImageListDataset):
    """Every image file under ``root_uri`` (recursively), labelled by its first-level folder.

    Files match ``extensions`` (with or without the dot) case-insensitively; hidden files and
    folders (names starting with ".") are skipped. When every image lies inside a subfolder,
    the sorted subfolder names are ``classes`` and each label is an index into them; otherwise
    ``classes`` is empty and every label is -1. ``Sample.key`` is the file's URI.
    """

    def __init__(
        self,
        storage: Storage,
        root_uri: str,
        load_size: int,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_aspect: float = 1.0,
    ) -> None:
        check_positive(load_size=load_size, max_pixels=max_pixels)
        check_max_aspect(max_aspect)
        prefix = root_uri.rstrip("/") + "/"
        relative = [
            uri[len(prefix) :]
            for uri in storage.list(root_uri, recursive=True)
            if _has_extension(uri, extensions)
        ]
        relative = [path for path in relative if not any(part.startswith(".") for part in path.split("/"))]
        if not relative:
            raise FileNotFoundError(
                f"no images under {root_uri}: allowed extensions are {', '.join(extensions)} "
                "(any case; hidden files are skipped)"
            )
        self.root_uri = root_uri
        if all("/" in path for path in relative):
            self.classes: tuple[str, ...] = tuple(sorted({path.split("/", 1)[0] for path in relative}))
            index = {name: i for i, name in enumerate(self.classes)}
            labels = np.array([index[path.split("/", 1)[0]] for path in relative], dtype=np.int64)
        else:
            self.classes = ()
            labels = np.full(len(relative), -1, dtype=np.int64)
        super().__init__(storage, [prefix + path for path in relative], labels, load_size, max_pixels, max_aspect)


class FashionMnistDataset(Dataset[Sample]):
    """Fashion-MNIST's 28x28 grayscale images as 3 equal channels, labels 0-9.

    The images are resized (bicubic) to ``load_size`` when it is not 28. ``Sample.key`` is
    ``<root_uri>#<split>/<index>``.
    """

    def __init__(
        self,
        storage: Storage,
        root_uri: str,
        split: Literal["train", "test"],
        load_size: int = 28,
    ) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        check_positive(load_size=load_size)
        data = load_split(storage, root_uri, split)
        self.root_uri = root_uri
        self.split = split
        self.load_size = load_size
        self._images = data.images  # (N, 28, 28) uint8
        self._labels = data.labels  # (N,) int64

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> Sample:
        gray = self._images[index]  # (28, 28)
        if self.load_size != gray.shape[0]:
            gray = np.asarray(resize_center_crop(Image.fromarray(gray, mode="L"), self.load_size))
        image = torch.from_numpy(np.array(gray, dtype=np.uint8)).expand(3, -1, -1).contiguous()
        return Sample(image=image, label=int(self._labels[index]), key=f"{self.root_uri}#{self.split}/{index}")


def collate_samples(samples: Sequence[Sample]) -> Batch:
    """A DataLoader ``collate_fn``: stacks the decoded images and lists the bad ones' keys."""
    good = [sample for sample in samples if sample.image is not None]
    bad_keys = [sample.key for sample in samples if sample.image is None]
    if not good:
        images = torch.empty((0, 3, 0, 0), dtype=torch.uint8)
    else:
        shapes = {tuple(sample.image.shape) for sample in good if sample.image is not None}
        if len(shapes) > 1:
            raise ValueError(
                f"samples of different shapes {sorted(shapes)} in one batch "
                f"(first keys: {', '.join(s.key for s in good[:3])}); one dataset's load_size must be shared"
            )
        images = torch.stack([sample.image for sample in good if sample.image is not None])
    labels = torch.tensor([sample.label for sample in good], dtype=torch.int64)
    aspects = torch.tensor([sample.aspect for sample in good], dtype=torch.float32)
    return Batch(images=images, labels=labels, keys=[sample.key for sample in good], bad_keys=bad_keys,
                 aspects=aspects)


MIN_SEEN = 20  # images BadImageTracker's limit waits for at least
BAD_IMAGES_ALLOWED = 30  # bad images the limit allows before it is judged (BadImageTracker's default min_seen)


class BadImageTracker:
    """Counts images seen and bad over batches; :meth:`check` fails once too many were bad.

    Why: skipping a handful of broken files is right, but a high fraction means the data set or
    its decoding is broken, and training on the remainder would silently skew the data.

    The limit applies once ``min_seen`` images were seen, by default as many as let it allow
    :data:`BAD_IMAGES_ALLOWED` bad ones: ``max(20, ceil(30 / max_fraction))``, 3,000 at 1 %. Why
    that many: the fraction of a few batches is noise. With 64 images a step one bad file in the
    first batch is 1.6 %, and a data set 0.5 % bad crossed a 1 % limit within 100 steps in 42 % of
    simulated runs judged from 20 images on; judged from 3,000 (where such a data set shows 15 bad
    on average, 30 being 4 standard deviations off), 6 of 20,000 simulated runs of 3,000 steps
    stopped. A broken data set still stops at that count: 47 steps of 64 at 1 %. A rate close to
    the limit may cross it by chance (at 80 % of it, 1 simulated run in 5 stopped): leave room.
    ``max_fraction=0`` tolerates no bad image (judged from 20 on).

    At the end there are two cases. Where the images were the whole data (an evaluation split, a
    pool to embed: ``check(final=True)``), their fraction is the data's, no noise, and the limit
    applies whatever the count. Where they were a sample of it (a training run's shuffled batches:
    :meth:`check_run_end`), a run that ends before ``min_seen`` images is held to the count the
    limit allows at ``min_seen`` (:attr:`allowance`, 30 by default), not to the fraction of its
    few images: those same images followed by good ones would have passed the running check, so
    one bad file among a smoke run's 40 images (2.5 %) passes a 1 % limit, while 31 fail it.
    """

    def __init__(self, max_fraction: float, min_seen: int | None = None, max_examples: int = 5) -> None:
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"max_fraction must be within [0, 1], got {max_fraction}")
        if min_seen is None:
            min_seen = max(MIN_SEEN, math.ceil(BAD_IMAGES_ALLOWED / max_fraction)) if max_fraction else MIN_SEEN
        if min_seen < 1:
            raise ValueError(f"min_seen must be at least 1, got {min_seen}")
        self.max_fraction = max_fraction
        self.min_seen = min_seen
        self.max_examples = max_examples
        self.seen = 0
        self.bad = 0
        self.examples: list[str] = []

    @property
    def fraction(self) -> float:
        """Bad images over images seen; 0 before any."""
        return self.bad / self.seen if self.seen else 0.0

    def update(self, batch: Batch) -> None:
        """Count one batch's decoded and bad images, keeping the first bad keys as examples."""
        self.add(len(batch.keys), batch.bad_keys)

    def add(self, decoded: int, bad_keys: Sequence[str]) -> None:
        """Count ``decoded`` good images and the bad ones named (e.g. a finished part's, on resume)."""
        self.seen += decoded + len(bad_keys)
        self.bad += len(bad_keys)
        self.examples.extend(bad_keys[: self.max_examples - len(self.examples)])

    @property
    def allowance(self) -> float:
        """Bad images the limit allows when it is first judged (``max_fraction x min_seen``)."""
        return self.max_fraction * self.min_seen

    def check(self, final: bool = False) -> None:
        """Raise ValueError if the bad fraction is above the limit: once ``min_seen`` images were
        seen, or with ``final`` (the whole data was read) whatever the count."""
        if self.seen == 0 or (self.seen < self.min_seen and not final):
            return
        if self.fraction > self.max_fraction:
            self._fail(f"more than the allowed max_fraction {self.max_fraction:.1%}")

    def check_run_end(self) -> None:
        """The end of a training run, whose images were a sample of the data: :meth:`check` once
        ``min_seen`` images were seen; before, ValueError if more were bad than the :attr:`allowance`
        (the class docstring says why)."""
        if self.seen >= self.min_seen:
            self.check()
        elif self.bad > self.allowance:
            self._fail(f"more than the {math.floor(self.allowance)} that max_fraction {self.max_fraction:.1%} "
                       f"allows before it is judged at {self.min_seen} images")

    def _fail(self, why: str) -> None:
        raise ValueError(f"{self.bad} of {self.seen} images ({self.fraction:.1%}) could not be decoded, {why}; "
                         f"examples: {', '.join(self.examples)}")

    def summary(self) -> dict[str, Any]:
        """Counts for logging (and checkpoints): seen, bad, fraction and example keys."""
        return {"seen": self.seen, "bad": self.bad, "fraction": self.fraction, "examples": list(self.examples)}

    def restore(self, summary: dict[str, Any]) -> None:
        """Continue counting from a :meth:`summary` (a resumed run keeps its tally)."""
        self.seen, self.bad = int(summary.get("seen", 0)), int(summary.get("bad", 0))
        self.examples = list(summary.get("examples", []))[: self.max_examples]
