"""The frozen-feature suite on an accelerator against the CPU: the same figures, and the time each takes.

Every task of ``dinoflow eval suite`` (k-NN, the linear probe over its four views, segmentation and
depth heads with +ms, retrieval) runs the whole of its work on the backbone's device: features, k-NN
similarities, the probe's grid, the dense heads' training and their batched scoring. This runs the
suite once on ``--reference`` (the CPU) and once on ``--device`` with the same seeded ViT-S/14 and
the same data (class folders of coloured noise written to a temporary folder, and the synthetic
scenes), then on ``--device`` with the feature pass in bf16 (``--precision``), and with the dense
heads' features made per batch by the backbone instead of held (``dense_cache_gib=0``: the path of
a whole ADE20K), and prints each metric per run with its difference from the reference and the
seconds each run took; then segmentation and depth on a VOC and an NYU layout of 4:3 images on both
(the real data sets' path: heads trained on crops, whole test images scored through windows). The
figures should agree to rounding (the probe and the heads train on features that differ in the last
bits, so they may move by a sample or a pixel); a device path that reads another device's tensor
fails outright. With ``--dpt-steps N``, the NYU layout's depth also by lin.4 and by the DPT decoder
trained N steps each on ``--device`` (the RMSE of each and its seconds). Asserts nothing.

    python benchmarks/eval_device.py --device cpu --images 12      # smoke: the CPU against itself
    python benchmarks/eval_device.py --device cuda --json eval_device.json --dpt-steps 300
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from evaluators.dense import HeadConfig
from evaluators.suite import SuiteConfig, run_suite
from trainer.devices import available_device
from trainer.models.vit import build_vit

CLASSES = ("red", "green", "blue", "grey")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reference", default="cpu")
    parser.add_argument("--images", type=int, default=40, help="train images per class (a quarter as many to test)")
    parser.add_argument("--image-size", type=int, default=112, help="class folders' centre crop (x14)")
    parser.add_argument("--precision", default="bf16", help="the extra run's feature pass on --device")
    parser.add_argument("--dpt-steps", type=int, default=0, help="also train lin.4 and the DPT depth head this many "
                        "steps on the NYU layout on --device and compare them (0: not; ~5 s a DPT step on a CPU)")
    parser.add_argument("--json", default="", help="write the figures here too")
    return parser.parse_args()


def write_class_folders(root: Path, per_class: int, seed: int = 0) -> None:
    """``root/{train,val}/<class>/*.png``: each class a colour under noise, in varied sizes."""
    rng = np.random.default_rng(seed)
    for index, name in enumerate(CLASSES):
        colour = np.eye(3)[index] * 150 + 50 if index < 3 else np.full(3, 128.0)
        for split, count in (("train", per_class), ("val", max(1, per_class // 4))):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                height, width = rng.integers(100, 180, size=2)
                pixels = np.clip(colour + rng.normal(0, 60, (height, width, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def write_dense_layouts(root: Path, train: int, seed: int = 0) -> tuple[Path, Path]:
    """A Pascal VOC and an NYU-Depth v2 layout of the same 4:3 images (not square: the real sets'
    whole-image windows), each split left and right at a random column: red (class 1, 2 m) and green
    (class 2, 8 m), the boundary ignored; ``train`` training images, a quarter as many to test."""
    rng = np.random.default_rng(seed)
    voc, nyu = root / "voc", root / "nyu"
    for split, count in (("train", train), ("val", max(1, train // 4))):
        ids = [f"{split}{i}" for i in range(count)]
        (voc / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids))
        for folder in (voc / "JPEGImages", voc / "SegmentationClass", nyu / ("train" if split == "train" else "test")):
            folder.mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(ids):
            cut = int(rng.integers(40, 150))
            pixels = np.where(np.arange(196)[None, :, None] < cut, (220, 30, 30), (30, 220, 30)).repeat(147, 0)
            pixels = np.clip(pixels + rng.normal(0, 20, pixels.shape), 0, 255).astype(np.uint8)
            labels = np.where(np.arange(196) < cut, 1, 2)[None].repeat(147, 0).astype(np.uint8)
            labels[:, cut] = 255
            Image.fromarray(pixels).save(voc / "JPEGImages" / f"{name}.jpg", quality=95)
            Image.fromarray(labels, mode="L").save(voc / "SegmentationClass" / f"{name}.png")
            np.savez(nyu / ("train" if split == "train" else "test") / f"{i:05d}.npz", image=pixels,
                     depth=np.where(labels == 1, 2.0, 8.0).astype(np.float32))
    return voc, nyu


def timed_suite(device: torch.device, config: SuiteConfig, weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The suite on ``device`` from ``weights``; its metrics and seconds (a warm-up pass first, so
    a device's start-up is not counted)."""
    backbone = build_vit("vit_small", patch_size=14, img_size=224, layerscale_init=1.0)
    backbone.load_state_dict(weights)
    backbone = backbone.to(device).eval()
    with torch.no_grad():
        backbone(torch.zeros(2, 3, config.image_size, config.image_size, device=device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    report = run_suite(backbone, config)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"device": str(device), "precision": config.precision, "seconds": time.perf_counter() - started,
            "dense": "per batch" if config.dense_cache_gib == 0 else "held", "metrics": report["metrics"]}


def main() -> None:
    args = parse_args()
    reference, device = available_device(args.reference), available_device(args.device)
    torch.manual_seed(0)
    weights = build_vit("vit_small", patch_size=14, img_size=224, layerscale_init=1.0).state_dict()
    with tempfile.TemporaryDirectory() as scratch:
        write_class_folders(Path(scratch), args.images)
        config = SuiteConfig(tasks=("knn", "linear", "seg", "depth", "retrieval"), data_uri=scratch,
                             image_size=args.image_size, ks=(10, 20), train_scenes=128, test_scenes=32,
                             layers=4, multiscale=True, seg_head=HeadConfig(steps=200),
                             depth_head=HeadConfig(steps=100), retrieval_scenes=16)
        runs = [timed_suite(reference, config, weights), timed_suite(device, config, weights),
                timed_suite(device, replace(config, precision=args.precision), weights),
                timed_suite(device, replace(config, dense_cache_gib=0.0), weights)]
        # real data sets' layouts: heads on crops, scored on whole 4:3 images through windows (+ms)
        voc, nyu = write_dense_layouts(Path(scratch), args.images)
        layouts = SuiteConfig(tasks=("seg", "depth"), seg_data=f"voc:{voc}", depth_data=f"nyu:{nyu}",
                              image_size=args.image_size, layers=4, multiscale=True, seg_head=HeadConfig(steps=100),
                              depth_head=HeadConfig(steps=50))
        windowed = [timed_suite(reference, layouts, weights), timed_suite(device, layouts, weights)]
        heads = [timed_suite(device, replace(layouts, tasks=("depth",), depth_head_kind=kind,
                                             depth_head=HeadConfig(steps=args.dpt_steps)), weights)
                 for kind in ("linear", "dpt")] if args.dpt_steps else []
    print_runs(runs, args.device)
    print("\nVOC and NYU layouts, whole 4:3 test images through sliding windows:")
    print_runs(windowed, args.device)
    for kind, run in zip(("lin.4", "DPT"), heads):
        print(f"NYU layout, {kind} depth head ({args.dpt_steps} steps on {args.device}): "
              f"RMSE {run['metrics']['depth_rmse']:.4f}, delta1 {run['metrics']['depth_delta1']:.4f}, "
              f"{run['seconds']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "windowed": windowed, "depth_heads": heads}, indent=2))


def print_runs(runs: list[dict[str, Any]], device: str) -> None:
    """Each metric per run, the largest difference from the first (the reference), the seconds."""
    print(f"{'metric':<32}" + "".join(f"{r['device'] + ' ' + r['precision']:>18}" for r in runs)
          + f"{'max |diff|':>12}")
    print(f"{'dense features':<32}" + "".join(f"{r['dense']:>18}" for r in runs))
    for name in sorted(runs[0]["metrics"]):
        values = [r["metrics"].get(name, float("nan")) for r in runs]
        diff = max(abs(v - values[0]) for v in values[1:])
        print(f"{name:<32}" + "".join(f"{v:>18.4f}" for v in values) + f"{diff:>12.4f}")
    print(f"{'seconds':<32}" + "".join(f"{r['seconds']:>18.1f}" for r in runs)
          + f"   ({runs[0]['seconds'] / runs[1]['seconds']:.1f}x the reference's speed on {device})")


if __name__ == "__main__":
    main()
