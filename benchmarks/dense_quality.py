"""Does pretraining help dense tasks? Segmentation, depth and retrieval on synthetic scenes.

Writes ``--images`` synthetic scenes (seeds disjoint from the evaluation scenes) as PNG files,
pretrains the ``tiny`` recipe on that folder for ``--minutes`` (56 px crops, patch 7), then runs
the suite's dense and retrieval tasks on its teacher and on the same architecture with random
weights, and prints both with the ratio. It asserts nothing.

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--out", default="runs/bench-dense-quality")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    storage = Storage()
    storage.delete(args.out, recursive=True)
    folder = join_uri(args.out, "scenes")
    scenes = make_scenes(args.images, seed=1000, config=SceneConfig(size=56))
    for i, image in enumerate(scenes.images):
        buffer = io.BytesIO()
        Image.fromarray(image.transpose(1, 2, 0)).save(buffer, format="PNG")
        storage.write_bytes(join_uri(folder, f"{i:06d}.png"), buffer.getvalue())
    cfg = load_config(PretrainConfig, "tiny", [f"out={join_uri(args.out, 'pretrain')}", f"data.uri={folder}",
                                               f"max_minutes={args.minutes}", *OVERRIDES, *args.overrides])
    started = time.monotonic()
    summary = run_pretrain(cfg, storage, NullTracker(), evaluate=False)
    trained = load_backbone(summary["backbone"], "safetensors")
    torch.manual_seed(cfg.seed)
    untrained = build_networks(cfg)[1].backbone
    suite = SuiteConfig(tasks=("seg", "depth", "retrieval"), scene_size=56)
    rows = {name: run_suite(model, suite)["metrics"] for name, model in (("random init", untrained),
                                                                          ("pretrained", trained))}
    print(f"\ntiny on {args.images} synthetic scenes: {summary['steps']} steps, {summary['train_minutes']:.1f} min "
          f"training ({(time.monotonic() - started) / 60:.1f} min wall), {torch.get_num_threads()} threads")
    names = ("seg_miou", "seg_pixel_accuracy", "depth_rmse", "depth_abs_rel", "depth_delta1",
             "retrieval_map_easy", "retrieval_map_medium", "retrieval_map_hard")
    print(f"{'metric':<22} {'random init':>12} {'pretrained':>12}")
    for name in names:
        print(f"{name:<22} {rows['random init'][name]:>12.4f} {rows['pretrained'][name]:>12.4f}")
    storage.write_bytes(join_uri(args.out, "dense_quality.json"), json.dumps(rows, indent=2).encode())


if __name__ == "__main__":
    main()
