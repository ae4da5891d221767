"""How fast does a data-loader worker turn JPEG bytes into a training image?

Times :func:`trainer.data.datasets.read_image` (decode, RGB, shorter side to ``--load-size``,
centre crop) on one core for synthetic photographs of several sizes (smooth colour fields plus
sensor-like noise, JPEG quality 90, made here: nothing is downloaded), as it runs (a large JPEG
decoded at a reduced scale, the datasets module's docstring says why) and with the full decode
(``DRAFT_GAP`` set past any image), and prints ms per image, img/s per core, the ratio and the
mean and largest difference between the two results in 8-bit levels. For scale: a ViT-S/14 step
on an H200 takes about 1,400 images a second (benchmarks/RESULTS.md), that many decodes a second
for the loader's workers together. Asserts nothing.

    python benchmarks/decode.py
    python benchmarks/decode.py --sizes 640x480 4000x3000 --load-size 256 --images 20
"""

from __future__ import annotations

import argparse
import io
import time
from unittest import mock

import numpy as np
import torch
from PIL import Image

from trainer.data import datasets


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["500x375", "1024x768", "2048x1536", "4000x3000"],
                        help="WIDTHxHEIGHT of the JPEGs")
    parser.add_argument("--load-size", type=int, default=256)
    parser.add_argument("--images", type=int, default=10, help="timed decodes per size and way, after one untimed")
    return parser.parse_args()


def photograph(width: int, height: int, seed: int) -> bytes:
    """A JPEG (quality 90) of smooth random colour fields with Gaussian noise: a photograph's
    entropy, roughly, so its decode costs about what a real one of that size does."""
    rng = np.random.default_rng(seed)
    fields = Image.fromarray((rng.random((max(1, height // 32), max(1, width // 32), 3)) * 255).astype(np.uint8))
    smooth = np.asarray(fields.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float64)
    pixels = np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def seconds_per_image(data: bytes, load_size: int, images: int) -> tuple[float, torch.Tensor]:
    """Seconds per :func:`read_image` call on ``data`` and its result."""
    result = datasets.read_image(data, load_size)
    tick = time.perf_counter()
    for _ in range(images):
        datasets.read_image(data, load_size)
    return (time.perf_counter() - tick) / images, result


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    print(f"read_image to {args.load_size} px on one core, {args.images} images per row (torch threads 1)")
    print(f"{'size':>10} {'KiB':>6} {'full ms':>8} {'now ms':>8} {'img/s now':>10} {'speed-up':>9} "
          f"{'mean diff':>10} {'max diff':>9}")
    for index, size in enumerate(args.sizes):
        width, height = (int(v) for v in size.lower().split("x"))
        data = photograph(width, height, index)
        with mock.patch.object(datasets, "DRAFT_GAP", 10**9):  # no reduced scale fits: the full decode
            full, want = seconds_per_image(data, args.load_size, args.images)
        now, got = seconds_per_image(data, args.load_size, args.images)
        diff = (got.int() - want.int()).abs()
        print(f"{size:>10} {len(data) / 1024:>6.0f} {1000 * full:>8.2f} {1000 * now:>8.2f} {1 / now:>10.1f} "
              f"{full / now:>8.2f}x {float(diff.float().mean()):>10.2f} {int(diff.max()):>9d}")


if __name__ == "__main__":
    main()
