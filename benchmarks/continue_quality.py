"""Does continuing from a run's heads pay? A pretrained run continued with the DINO/iBOT heads
and centres it was trained with (``init_heads=auto``) vs. with new heads (``init_heads=fresh``),
for the same steps, on Fashion-MNIST on this CPU.

Pretrains the start (recipe ``--config``, default ``tiny``) for ``--start-minutes`` unless
``--start RUN`` names a run folder, then continues it twice from its weights for ``--steps`` steps
(the same seed, data and schedule; only the heads differ), scoring the teacher's CLS features
every ``--every`` steps with k-NN (k=20, T=0.07) and at the end with k-NN and the linear probe,
as the trainer's own evaluation does. Prints the k-NN trajectory of both and the start's scores,
writes them as JSON; asserts nothing.

    python benchmarks/continue_quality.py --start-minutes 3 --steps 150 --every 25
    python benchmarks/continue_quality.py --start runs/tiny --steps 300 -- optim.base_lr=1e-3
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dinoflow.config import PretrainConfig, load_config
from dinoflow.storage import Storage, join_uri
from trainer.data.datasets import collate_samples
from trainer.engine import pretrain
from trainer.models.hub import load_backbone
from trainer.run import build_dataset, labelled_evaluators


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start", default="", help="a pretrain run folder (default: pretrain one)")
    parser.add_argument("--config", default="tiny", help="recipe of the start and of both continuations")
    parser.add_argument("--start-minutes", type=float, default=3)
    parser.add_argument("--steps", type=int, default=150, help="steps of each continuation")
    parser.add_argument("--every", type=int, default=25, help="k-NN every this many steps")
    parser.add_argument("--train-limit", type=int, default=10000, help="labelled train images scored (0: all)")
    parser.add_argument("--test-limit", type=int, default=2000, help="test images scored (0: all)")
    parser.add_argument("--out", default="runs/bench-continue-quality", help="run root (emptied first)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of both continuations' recipe")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    storage = Storage()
    storage.delete(args.out, recursive=True)
    started = time.monotonic()
    scoring = [f"eval.train_limit={args.train_limit}", f"eval.test_limit={args.test_limit}"]
    start = args.start
    if not start:
        start = join_uri(args.out, "start")
        cfg = load_config(PretrainConfig, args.config, [f"out={start}", f"max_minutes={args.start_minutes}",
                                                        "eval.every_steps=0"])
        pretrain(cfg, build_dataset(cfg.data, cfg.crops, storage), collate_samples, storage)
    runs: dict[str, dict] = {}
    for heads in ("auto", "fresh"):
        cfg = load_config(PretrainConfig, args.config, [
            f"out={join_uri(args.out, heads)}", f"init_weights={start}", f"init_heads={heads}",
            f"max_steps={args.steps}", "max_minutes=0", f"eval.every_steps={args.every}", *scoring, "seed=1",
            *args.overrides])
        periodic, final = labelled_evaluators(cfg, storage)
        if heads == "auto":  # the start's own scores, on the same images
            runs["start"] = final(load_backbone(start, "auto", storage), 0)
        summary = pretrain(cfg, build_dataset(cfg.data, cfg.crops, storage), collate_samples, storage,
                           evaluate=periodic, final_evaluate=final)
        runs[heads] = {"knn": {h["step"]: h["knn_top1_k20"] for h in summary["history"]},
                       "final": summary["final"], "minutes": summary["train_minutes"]}

    print(f"\nContinued pretraining from {start} on Fashion-MNIST, {torch.get_num_threads()} threads, "
          f"{args.steps} steps each, wall {(time.monotonic() - started) / 60:.1f} min; k-NN k=20 T=0.07 "
          f"({args.train_limit or 'all'} train / {args.test_limit or 'all'} test images)")
    print(f"start: k-NN {100 * runs['start']['knn_top1_k20']:.1f} %, linear {100 * runs['start']['linear_top1']:.1f} %")
    print(f"{'step':>6} {'heads kept':>11} {'new heads':>10}")
    for step in sorted(runs["auto"]["knn"]):
        print(f"{step:>6} {100 * runs['auto']['knn'][step]:>10.1f}% {100 * runs['fresh']['knn'].get(step, 0):>9.1f}%")
    for name in ("knn_top1_k20", "linear_top1"):
        print(f"{'end ' + name:>6}: heads kept {100 * runs['auto']['final'][name]:.1f} %, "
              f"new heads {100 * runs['fresh']['final'][name]:.1f} %")
    storage.write_bytes(join_uri(args.out, "quality.json"), json.dumps(runs, indent=2).encode())


if __name__ == "__main__":
    main()
