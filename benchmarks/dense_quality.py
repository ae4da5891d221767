"""Does pretraining help dense tasks? Segmentation, depth and retrieval on synthetic scenes.

Writes ``--images`` synthetic scenes (seeds disjoint from the evaluation scenes) as PNG files,
pretrains the ``tiny`` recipe on that folder (56 px crops, patch 7) for ``--minutes`` or the
schedule given in the overrides, then runs the suite's dense tasks on its teacher and on the
same architecture with random weights, for the last block and for the last 4 blocks (the
original's two linear protocols), plus retrieval, and prints both with the difference. It asserts
nothing. A second call with the same ``--out`` resumes the pretraining from its last checkpoint
(and only evaluates once it is done); ``--fresh`` starts over.

    python benchmarks/dense_quality.py --minutes 10
"""

from __future__ import annotations

import argparse
import io
import json
import time

import torch
from PIL import Image

from dinoflow.config import PretrainConfig, load_config
from dinoflow.storage import Storage, join_uri
from dinoflow.tracking import NullTracker
from evaluators.suite import SuiteConfig, run_suite
from evaluators.synthetic import SceneConfig, make_scenes
from trainer.engine import build_networks
from trainer.models.hub import load_backbone
from trainer.run import run_pretrain

OVERRIDES = ["data.kind=folder", "crops.load_size=56", "crops.global_crop_size=56", "crops.local_crop_size=28",
             "eval.every_steps=0"]
DENSE = ("seg_miou", "seg_pixel_accuracy", "depth_rmse", "depth_abs_rel", "depth_delta1")
RETRIEVAL = ("retrieval_map_easy", "retrieval_map_medium", "retrieval_map_hard")


def write_scenes(storage: Storage, folder: str, count: int) -> None:
    """The pretraining images (seed 1000; the suite's scenes use seeds 0-2), unless already there."""
    if storage.exists(join_uri(folder, f"{count - 1:06d}.png")):
        return
    scenes = make_scenes(count, seed=1000, config=SceneConfig(size=56))
    for i, image in enumerate(scenes.images):
        buffer = io.BytesIO()
        Image.fromarray(image.transpose(1, 2, 0)).save(buffer, format="PNG")
        storage.write_bytes(join_uri(folder, f"{i:06d}.png"), buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--out", default="runs/bench-dense-quality")
    parser.add_argument("--fresh", action="store_true", help="delete --out first instead of resuming")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    storage = Storage()
    if args.fresh:
        storage.delete(args.out, recursive=True)
    folder = join_uri(args.out, "scenes")
    write_scenes(storage, folder, args.images)
    cfg = load_config(PretrainConfig, "tiny", [f"out={join_uri(args.out, 'pretrain')}", f"data.uri={folder}",
                                               f"max_minutes={args.minutes}", *OVERRIDES, *args.overrides])
    started = time.monotonic()
    summary = run_pretrain(cfg, storage, NullTracker(), evaluate=False)
    trained = load_backbone(summary["backbone"], "safetensors")
    torch.manual_seed(cfg.seed)
    untrained = build_networks(cfg)[1].backbone
    rows: dict[str, dict[str, float]] = {}
    for layers in (1, 4):
        tasks = ("seg", "depth", "retrieval") if layers == 1 else ("seg", "depth")
        suite = SuiteConfig(tasks=tasks, scene_size=56, layers=layers)
        for name, model in (("random init", untrained), ("pretrained", trained)):
            for metric, value in run_suite(model, suite)["metrics"].items():
                row = metric if metric.startswith("retrieval") else f"{metric} (last {layers})"
                rows.setdefault(row, {})[name] = value
    print(f"\ntiny on {args.images} synthetic scenes: {summary['steps']} steps, {summary['train_minutes']:.1f} min "
          f"of training in all ({(time.monotonic() - started) / 60:.1f} min wall this call), "
          f"{torch.get_num_threads()} threads")
    print(f"{'metric':<30} {'random init':>12} {'pretrained':>12} {'difference':>12}")
    for metric in [f"{m} (last {layers})" for layers in (1, 4) for m in DENSE] + list(RETRIEVAL):
        random_init, pretrained = rows[metric]["random init"], rows[metric]["pretrained"]
        print(f"{metric:<30} {random_init:>12.4f} {pretrained:>12.4f} {pretrained - random_init:>+12.4f}")
    storage.write_bytes(join_uri(args.out, "dense_quality.json"), json.dumps(rows, indent=2).encode())


if __name__ == "__main__":
    main()
