"""What does fine-tuning a pretrained backbone give over its frozen features, and over the same
fine-tuning from a random start? On Fashion-MNIST on this CPU.

Pretrains the start (recipe ``--pretrain-config``, default ``tiny``) for ``--start-minutes`` unless
``--weights`` names a backbone, then on the same train and test images: k-NN and the linear probe
of its frozen features (the trainer's evaluation), fine-tuning from it (recipe ``--config``,
default ``finetune-tiny``), and the same fine-tuning from a randomly initialised backbone of the
same architecture (the same seed, data and schedule: only the start differs). Prints the test
top-1 of each and their differences, writes them as JSON; asserts nothing.

    python benchmarks/finetune_gain.py --start-minutes 3
    python benchmarks/finetune_gain.py --weights runs/demo/work/pretrain/<key> -- optim.epochs=4
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dinoflow.config import FinetuneConfig, PretrainConfig, load_config
from dinoflow.storage import Storage, join_uri
from dinoflow.tracking import NullTracker
from evaluators.classification import labelled_images
from evaluators.linear import LinearProbeConfig
from evaluators.report import classification_report, report_metrics
from trainer.finetune import finetune
from trainer.models.hub import load_backbone, save_backbone
from trainer.models.vit import DinoVisionTransformer
from trainer.run import run_pretrain


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="", help="the pretrained backbone (default: pretrain one)")
    parser.add_argument("--pretrain-config", default="tiny", help="recipe of the start when pretrained here")
    parser.add_argument("--start-minutes", type=float, default=3)
    parser.add_argument("--config", default="finetune-tiny", help="the fine-tuning recipe of both runs")
    parser.add_argument("--out", default="runs/bench-finetune-gain", help="run root (emptied first)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of both fine-tuning runs' recipe")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    storage = Storage()
    storage.delete(args.out, recursive=True)
    started = time.monotonic()
    weights = args.weights
    if not weights:
        weights = join_uri(args.out, "start")
        cfg = load_config(PretrainConfig, args.pretrain_config, [f"out={weights}", f"max_minutes={args.start_minutes}"])
        run_pretrain(cfg, storage, NullTracker(), evaluate=False)
    pretrained = load_backbone(weights, "auto", storage)
    torch.manual_seed(0)
    random_start = join_uri(args.out, "random", "backbone.safetensors")
    save_backbone(DinoVisionTransformer(**pretrained.arch_kwargs), random_start, storage)

    recipe = load_config(FinetuneConfig, args.config, args.overrides)
    data = recipe.data
    images = labelled_images(data.uri, data.kind, storage, data.train_limit, data.test_limit, recipe.image_size,
                             recipe.seed, data.num_workers, data.test_uri)
    tick = time.monotonic()
    frozen = report_metrics(classification_report(images.features(pretrained, views=True), (20,), 0.07,
                                                  LinearProbeConfig(), "cpu"))
    results: dict[str, dict] = {"frozen": {"knn_top1_k20": frozen["knn_top1_k20"], "linear_top1": frozen["linear_top1"],
                                           "minutes": (time.monotonic() - tick) / 60}}
    for name, start in (("pretrained", weights), ("random", random_start)):
        cfg = load_config(FinetuneConfig, args.config, [f"weights={start}", f"out={join_uri(args.out, name)}",
                                                        *args.overrides])
        summary = finetune(cfg, storage)
        results[name] = {"top1": summary["final"]["top1"], "by_epoch": [row["top1"] for row in summary["history"]],
                         "minutes": summary["train_minutes"], "steps": summary["steps"]}

    pre, rand = results["pretrained"], results["random"]
    print(f"\nFine-tuning {weights} on {data.uri} ({data.train_limit or 'all'} train / {data.test_limit or 'all'} "
          f"test images), {torch.get_num_threads()} threads, recipe {args.config} {' '.join(args.overrides)}, "
          f"wall {(time.monotonic() - started) / 60:.1f} min")
    print(f"frozen features: k-NN {100 * frozen['knn_top1_k20']:.1f} %, "
          f"linear probe {100 * frozen['linear_top1']:.1f} %")
    for name, row in (("fine-tuned from the pretrained backbone", pre), ("fine-tuned from a random start", rand)):
        trail = " / ".join(f"{100 * top1:.1f}" for top1 in row["by_epoch"])
        print(f"{name}: top-1 {100 * row['top1']:.1f} % ({row['steps']} steps, {row['minutes']:.1f} min; "
              f"each evaluation {trail})")
    print(f"fine-tuned - linear probe: {100 * (pre['top1'] - frozen['linear_top1']):+.1f} points; "
          f"pretrained - random start: {100 * (pre['top1'] - rand['top1']):+.1f} points")
    storage.write_bytes(join_uri(args.out, "gain.json"), json.dumps(results, indent=2).encode())


if __name__ == "__main__":
    main()
