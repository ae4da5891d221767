"""Does distillation pay? A small student distilled from a larger teacher vs. the same student
pretrained from scratch, for the same wall-clock budget on this CPU, on Fashion-MNIST.

Pretrains the teacher (recipe ``tiny``, 128-d x 6 blocks) for ``--teacher-minutes`` unless
``--teacher RUN`` names a pretrain run folder; then distils the student (``--student`` preset,
default ``distill-tiny``: 64-d x 4 blocks) for ``--minutes`` of training, and pretrains the same
student architecture from scratch with the ``tiny`` recipe for the same ``--minutes``. Each
released backbone (the teacher's EMA for pretraining, the student EMA for distillation) is scored
on its CLS features over the full splits: k-NN (k=20, T=0.07) against the train split, and the
one-pass linear probe, as in ``benchmarks/pretrain_quality.py``. Prints a table, writes it as
JSON; asserts nothing. The distillation objective is the preset's ``distill.objective`` unless
an override names it (``-- distill.objective=heads``); the table says which ran.

    python benchmarks/distill_quality.py --teacher-minutes 4 --minutes 4 --train-limit 20000 --test-limit 5000
    python benchmarks/distill_quality.py --teacher runs/pretrain-tiny --minutes 10 -- optim.base_lr=1e-3
    python benchmarks/distill_quality.py --teacher runs/pretrain-tiny --minutes 4 -- distill.objective=features

On a shared, loaded machine, ``--steps N`` gives each student N optimiser steps instead of a time
budget (its img/s column then says what the same minutes would have bought).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dinoflow.config import DistillConfig, PretrainConfig, load_config
from dinoflow.storage import Storage, join_uri
from evaluators.classification import labelled_images
from evaluators.linear import LinearProbeConfig
from evaluators.report import classification_report, report_metrics
from trainer.data.datasets import collate_samples
from trainer.distill import distill, load_teacher
from trainer.engine import pretrain
from trainer.models.hub import load_backbone
from trainer.run import build_dataset


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="", help="a pretrain run folder (default: pretrain one)")
    parser.add_argument("--teacher-config", default="tiny", help="recipe of the teacher pretrained here")
    parser.add_argument("--teacher-minutes", type=float, default=4)
    parser.add_argument("--student", default="distill-tiny", help="distillation preset of the student")
    parser.add_argument("--scratch-config", default="tiny", help="recipe of the from-scratch student "
                        "(its model section is replaced by the student's)")
    parser.add_argument("--minutes", type=float, default=4, help="training budget of each student")
    parser.add_argument("--steps", type=int, default=0, help="give each student this many steps instead of "
                        "--minutes (for a loaded machine, where wall-clock budgets are not comparable)")
    parser.add_argument("--train-limit", type=int, default=0, help="labelled train images scored (0: all)")
    parser.add_argument("--test-limit", type=int, default=0, help="test images scored (0: all)")
    parser.add_argument("--out", default="runs/bench-distill-quality", help="run root (emptied first)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the student's distillation config")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    storage = Storage()
    storage.delete(args.out, recursive=True)
    started = time.monotonic()
    rows: list[dict] = []
    teacher_uri = args.teacher
    if not teacher_uri:
        teacher_uri = join_uri(args.out, "teacher")
        teacher_cfg = load_config(PretrainConfig, args.teacher_config, [
            f"out={teacher_uri}", f"max_minutes={args.teacher_minutes}", "eval.every_steps=0"])
        summary = pretrain(teacher_cfg, build_dataset(teacher_cfg.data, teacher_cfg.crops, storage),
                           collate_samples, storage)
        rows.append({"what": f"teacher ({args.teacher_config}, pretrained)", **_run_facts(summary)})
    else:
        rows.append({"what": f"teacher {teacher_uri}"})

    budget = [f"max_steps={args.steps}", "max_minutes=0"] if args.steps else [f"max_minutes={args.minutes}"]
    cfg = load_config(DistillConfig, args.student, [
        f"teacher.uri={teacher_uri}", "teacher.source=checkpoint", f"out={join_uri(args.out, 'distilled')}",
        *budget, "eval.every_steps=0", *args.overrides])
    teacher = load_teacher(cfg, storage)
    dataset = build_dataset(cfg.data, cfg.crops, storage)
    distilled = distill(cfg, dataset, collate_samples, storage, teacher=teacher)
    rows.append({"what": f"student distilled ({args.student}, {cfg.distill.objective})", **_run_facts(distilled)})

    model = [f"model.{k}={v}" for k, v in cfg.model.model_dump().items() if k != "drop_path_rate" and v is not None]
    scratch_cfg = load_config(PretrainConfig, args.scratch_config, [
        *model, f"out={join_uri(args.out, 'scratch')}", *budget, "eval.every_steps=0"])
    scratch = pretrain(scratch_cfg, dataset, collate_samples, storage)
    rows.append({"what": f"student from scratch ({args.scratch_config})", **_run_facts(scratch)})
    trained_minutes = (time.monotonic() - started) / 60

    labelled = labelled_images(cfg.data.uri, "fashion_mnist", storage, args.train_limit, args.test_limit)
    train_count, test_count = len(labelled.train), len(labelled.test)

    def score(backbone: torch.nn.Module) -> dict[str, float]:
        report = classification_report(labelled.features(backbone, views=True), (20,), 0.07, LinearProbeConfig())
        metrics = report_metrics(report)
        return {"knn": metrics["knn_top1_k20"], "linear": metrics["linear_top1"]}

    rows[0].update(score(teacher[0].backbone), params=_params(teacher[0].backbone))
    for row, summary in zip(rows[1:], (distilled, scratch)):
        backbone = load_backbone(summary["backbone"], "safetensors", storage)
        row.update(score(backbone), params=_params(backbone))

    each = f"{args.steps} steps" if args.steps else f"{args.minutes:g} min"
    print(f"\nDistillation on Fashion-MNIST, {torch.get_num_threads()} threads, students {each} each; "
          f"wall {trained_minutes:.1f} min training + {(time.monotonic() - started) / 60 - trained_minutes:.1f} "
          f"min scoring (k-NN k=20 T=0.07 and the linear probe over its 4 views; {train_count} train / "
          f"{test_count} test images)")
    print(f"{'backbone':<48} {'params':>8} {'min':>5} {'steps':>6} {'img/s':>6} {'k-NN':>7} {'linear':>7}")
    for row in rows:
        print(f"{row['what']:<48} {row['params']:>8} {row.get('minutes', ''):>5} {row.get('steps', ''):>6} "
              f"{row.get('img_per_s', ''):>6} {100 * row['knn']:>6.1f}% {100 * row['linear']:>6.1f}%")
    storage.write_bytes(join_uri(args.out, "quality.json"), json.dumps(rows, indent=2).encode())


def _run_facts(summary: dict) -> dict:
    minutes = summary["train_minutes"]
    return {"minutes": round(minutes, 1), "steps": summary["steps"],
            "img_per_s": round(summary["images_seen"] / max(60 * minutes, 1e-9))}


def _params(backbone: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in backbone.parameters()) / 1e6:.2f}M"


if __name__ == "__main__":
    main()
