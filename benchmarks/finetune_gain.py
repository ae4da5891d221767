"""What does fine-tuning a pretrained backbone give over its frozen features, and over the same
fine-tuning from a random start? On Fashion-MNIST on this CPU.

Pretrains the start (recipe ``--pretrain-config``, default ``tiny``) for ``--start-minutes`` unless
``--weights`` names a backbone, then on the same train and test images: k-NN and the linear probe
of its frozen features (the trainer's evaluation), fine-tuning from it (recipe ``--config``,
default ``finetune-tiny``), and the same fine-tuning from a randomly initialised backbone of the
same architecture (the same seed, data and schedule: only the start differs). Prints the test
top-1 of each and their differences, writes them as JSON; asserts nothing.

With ``--ema DECAY`` it measures the moving average instead: one fine-tuning from the start with
``ema_decay=DECAY keep=best eval_every_epochs=0.5`` (``--val-fraction``: the pick on that share of
the train images held out; ``--ema-warmup``: the decay warmed up), printing the weights' and the
EMA's top-1 at each evaluation (the held-out images' beside the test's) and what was released.

    python benchmarks/finetune_gain.py --start-minutes 3
    python benchmarks/finetune_gain.py --weights runs/demo/work/pretrain/<key> -- optim.epochs=4
    python benchmarks/finetune_gain.py --start-minutes 3 --ema 0.998 -- data.test_limit=0
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


def decay(text: str) -> float:
    """``--ema``'s value: a decay in (0, 1)."""
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a decay in (0, 1), e.g. 0.998")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="", help="the pretrained backbone (default: pretrain one)")
    parser.add_argument("--pretrain-config", default="tiny", help="recipe of the start when pretrained here")
    parser.add_argument("--start-minutes", type=float, default=3)
    parser.add_argument("--config", default="finetune-tiny", help="the fine-tuning recipe (of both runs)")
    parser.add_argument("--out", default="runs/bench-finetune-gain", help="run root (emptied first)")
    parser.add_argument("--ema", type=decay, default=None, metavar="DECAY",
                        help="measure the weights' moving average of this decay instead (one run, keep=best)")
    parser.add_argument("--val-fraction", type=float, default=0.0,
                        help="with --ema: the share of train images held out to pick on (0: the pick on test)")
    parser.add_argument("--ema-warmup", action="store_true", help="with --ema: warm the decay up (ema_warmup)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the fine-tuning runs' recipe")
    args = parser.parse_args(argv)
    if args.ema is None and (args.val_fraction or args.ema_warmup):
        parser.error("--val-fraction and --ema-warmup go with --ema")
    return args


def ema_overrides(args: argparse.Namespace) -> list[str]:
    """The recipe's overrides of ``--ema``'s run, the user's last (they win)."""
    return [f"ema_decay={args.ema}", f"ema_warmup={str(args.ema_warmup).lower()}", "keep=best",
            "eval_every_epochs=0.5", f"data.val_fraction={args.val_fraction}", *args.overrides]


def measure_ema(args: argparse.Namespace, weights: str, storage: Storage) -> dict:
    """``--ema``: one fine-tuning from ``weights``; each evaluation's weights and EMA top-1 printed
    (with the held-out images' after a slash), then the weights released and the split that picked them."""
    cfg = load_config(FinetuneConfig, args.config, [f"weights={weights}", f"out={join_uri(args.out, 'ema')}",
                                                    *ema_overrides(args)])
    summary = finetune(cfg, storage)

    def top1(row: dict, prefix: str) -> str:
        held = f" / {100 * row[prefix + 'val_top1']:.1f}" if prefix + "val_top1" in row else ""
        return f"{100 * row[prefix + 'top1']:.1f}{held}"

    print(f"\nFine-tuning {weights} on {cfg.data.uri} with ema_decay={cfg.ema_decay} (warm-up "
          f"{'on' if cfg.ema_warmup else 'off'}), {cfg.data.val_fraction:g} of train held out, "
          f"{torch.get_num_threads()} threads, recipe {args.config} {' '.join(args.overrides)}")
    print(f"top-1 % (test{' / held out' if cfg.data.val_fraction else ''}): step, weights, EMA")
    for row in summary["history"]:
        print(f"  {row['step']:6d}  {top1(row, '')}  {top1(row, 'ema_')}")
    released = summary["released"]
    print(f"released: step {released['step']}'s {released['weights']}, picked on {released['picked_on']}: "
          f"test top-1 {100 * released['top1']:.1f} %; {summary['train_minutes']:.1f} min, evaluations excluded")
    return {"history": summary["history"], "released": released, "train_minutes": summary["train_minutes"]}


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
    if args.ema is not None:
        measured = measure_ema(args, weights, storage)
        storage.write_bytes(join_uri(args.out, "ema.json"), json.dumps(measured, indent=2).encode())
        return
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
