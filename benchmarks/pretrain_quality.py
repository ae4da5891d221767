"""Does pretraining learn? Fashion-MNIST k-NN and linear-probe accuracy after N minutes on this CPU.

Pretrains a recipe (default ``tiny``) on Fashion-MNIST's train split without labels, and after
5, 15 and 60 minutes of training (evaluations excluded) scores the teacher's CLS features on the
full test split: k-NN (k=20, T=0.07) against the full train split, and the one-pass linear
probe, on the final CLS token ("linear") and on the last 4 blocks' CLS tokens concatenated
("last 4"). "protocol" is the original's report: of the two probes, the one best on the
held-out part of train. "attn J" is how well the last block's CLS attention outlines the garments
of the first 1,000 test images (:func:`evaluators.suite.attention_figures`: the Jaccard of the
head-mean map's 60 % mask with each garment's silhouette). Raw pixels and the untrained network
are scored in the same run as baselines. It prints a table and writes it as JSON; it asserts nothing.

    python benchmarks/pretrain_quality.py                       # 5, 15, 60 minutes
    python benchmarks/pretrain_quality.py --minutes 5 15 -- model.layerscale_init=0.1
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dinoflow.config import PretrainConfig, load_config
from dinoflow.storage import Storage, join_uri
from evaluators.attention import garment_foreground
from evaluators.features import labelled_features
from evaluators.linear import LinearProbeConfig, best_by_val, linear_probe
from evaluators.report import knn_accuracies
from evaluators.suite import attention_figures
from trainer.data.datasets import collate_samples
from trainer.data.fashion_mnist import load_split
from trainer.engine import build_networks, pretrain
from trainer.run import build_dataset


SCORES = {"knn": "k-NN", "linear": "linear", "last4": "last 4", "protocol": "protocol",
          "attention_jaccard": "attn J"}  # key: column title
ATTENTION_IMAGES = 1000  # test garments the attention Jaccard is measured on


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny", help="pretraining preset")
    parser.add_argument("--minutes", type=float, nargs="+", default=[5, 15, 60])
    parser.add_argument("--out", default="runs/bench-pretrain-quality", help="run root (emptied first)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    storage = Storage()
    storage.delete(args.out, recursive=True)
    cfg = load_config(PretrainConfig, args.config, [
        f"out={args.out}", f"max_minutes={max(args.minutes)}", f"eval.at_minutes={sorted(args.minutes)}",
        "eval.every_steps=0", "eval.train_limit=0", "eval.test_limit=0", *args.overrides,
    ])
    train, test = load_split(storage, cfg.data.uri, "train"), load_split(storage, cfg.data.uri, "test")
    train_labels, test_labels = torch.from_numpy(train.labels), torch.from_numpy(test.labels)

    def score(views: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """k-NN on the first (train, test) view, the linear probe on each view, and with several
        views the "protocol" pick: the probe best on the held-out part of train."""
        (train_x, test_x), *_ = views.values()
        knn = knn_accuracies(train_x, train_labels, test_x, test_labels, ks=(20,), temperature=0.07, num_classes=10)
        probes = {name: linear_probe(view_train, train_labels, view_test, test_labels, LinearProbeConfig(),
                                     num_classes=10) for name, (view_train, view_test) in views.items()}
        scores = {"knn": knn["k20"], **{name: probe.test_accuracy for name, probe in probes.items()}}
        if len(probes) > 1:
            scores["protocol"] = probes[best_by_val(probes)].test_accuracy
        return scores

    def evaluate(backbone: torch.nn.Module, step: int) -> dict[str, float]:
        # the last of the 4 concatenated CLS tokens is the final one (bit for bit): one extraction serves both
        last4 = [labelled_features(backbone, torch.from_numpy(split.images), cfg.model.patch_size, layers=4)
                 for split in (train, test)]
        final = [x[:, -backbone.embed_dim:] for x in last4]
        garments = torch.from_numpy(test.images[:ATTENTION_IMAGES])
        looked = attention_figures(backbone, garments, garment_foreground(garments))
        return {**score({"linear": (final[0], final[1]), "last4": (last4[0], last4[1])}),
                "attention_jaccard": looked["attention_jaccard"]}

    rows = [{"what": "raw pixels", **score({"linear": (torch.from_numpy(train.images).flatten(1).float(),
                                                       torch.from_numpy(test.images).flatten(1).float())})}]
    torch.manual_seed(cfg.seed)
    untrained = build_networks(cfg)[1].backbone
    rows.append({"what": "untrained network", **evaluate(untrained, 0)})
    started = time.monotonic()
    summary = pretrain(cfg, build_dataset(cfg.data, cfg.crops, storage), collate_samples, storage,
                       evaluate=evaluate)
    for mark in summary["history"]:
        rows.append({"what": f"{args.config} after {mark['train_minutes']:.1f} min", "step": mark["step"],
                     "img_per_s": round(mark["images_seen"] / (60 * mark["train_minutes"]), 1),
                     **{key: mark[key] for key in SCORES}})
    if not summary["stopped_early"]:  # the schedule ended before the last mark: its end is scored too
        rows.append({"what": f"{args.config} at schedule end, {summary['train_minutes']:.1f} min",
                     "step": summary["steps"],
                     "img_per_s": round(summary["images_seen"] / (60 * summary["train_minutes"]), 1),
                     **{key: summary["final"][key] for key in SCORES}})
    print(f"\n{args.config} on Fashion-MNIST, {torch.get_num_threads()} threads, "
          f"wall {(time.monotonic() - started) / 60:.1f} min incl. evaluations")
    print(f"{'features':<32} {'step':>6} {'img/s':>7} " + " ".join(f"{SCORES[key]:>9}" for key in SCORES))
    for row in rows:
        scores = " ".join(f"{100 * row[key]:>8.1f}%" if key in row else f"{'':>9}" for key in SCORES)
        print(f"{row['what']:<32} {row.get('step', ''):>6} {row.get('img_per_s', ''):>7} {scores}")
    storage.write_bytes(join_uri(args.out, "quality.json"), json.dumps(rows, indent=2).encode())


if __name__ == "__main__":
    main()
