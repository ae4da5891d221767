"""The paper's figures beside an evaluation's: is this backbone where DINOv2's released models are?

Why: the first question after a pretraining or a distillation run is whether it reached the
original's level, and the answer needs the protocol to match as well as the model's size. When
the backbone is one of the released shapes (ViT-S/B/L/g, patch 14, with or without registers) and
a benchmark ran as the original runs it, the report gets the original's figure for it (from the
released models' table in the DINOv2 repository's README and the paper): ImageNet-1k k-NN (k = 20,
T = 0.07) and linear on its 1,000 class folders, ImageNet-V2 linear (a ``test_uri`` or one of
``test_sets`` naming v2, not its Threshold0.7 or TopImages variant: the figure is MatchedFrequency's),
iNaturalist 2018 linear (8,142 classes), ADE20K linear (1 layer) and +ms (4 layers, multi-scale),
NYU-Depth v2 lin.4 RMSE and its transfer to SUN RGB-D, and revisited Oxford's hard mAP. Anything
else (another data set, another k, a DPT head, a part of a split) gets no figure: one not measured the same way
would mislead. The comparison is a table in the report and ``paper_comparison.md``, each gap a
metric (``paper_gap_<benchmark>``, MLflow's column to sort runs by); it gates nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from dinoflow.storage import Storage
from evaluators.data_settings import named_roots, named_sets

SHAPES = {(384, 12): "ViT-S/14", (768, 12): "ViT-B/14", (1024, 24): "ViT-L/14", (1536, 40): "ViT-g/14"}
IMAGENET_CLASSES, INAT18_CLASSES = 1000, 8142
BENCHMARKS = ("in1k_knn", "in1k_linear", "inv2_linear", "inat18_linear", "ade20k_linear", "ade20k_ms", "nyu_lin4",
              "sunrgbd_lin4", "oxford_hard")
LOWER_IS_BETTER = {"nyu_lin4", "sunrgbd_lin4"}
LABELS = {"in1k_knn": "ImageNet-1k k-NN (k=20)", "in1k_linear": "ImageNet-1k linear",
          "inv2_linear": "ImageNet-V2 linear", "inat18_linear": "iNaturalist 2018 linear",
          "ade20k_linear": "ADE20K linear mIoU", "ade20k_ms": "ADE20K +ms mIoU", "nyu_lin4": "NYU-Depth v2 lin.4 RMSE",
          "sunrgbd_lin4": "NYU -> SUN RGB-D lin.4 RMSE", "oxford_hard": "revisited Oxford hard mAP"}
# the released models' figures, as fractions (RMSE in metres), in BENCHMARKS' order; None: not published
_WITHOUT = {"ViT-S/14": (0.790, 0.811, 0.708, 0.695, 0.443, 0.472, 0.417, 0.431, 0.432),
            "ViT-B/14": (0.821, 0.845, 0.749, 0.763, 0.473, 0.513, 0.362, 0.400, 0.495),
            "ViT-L/14": (0.835, 0.863, 0.776, 0.798, 0.477, 0.531, 0.333, 0.396, 0.540),
            "ViT-g/14": (0.835, 0.865, 0.784, 0.816, 0.490, 0.530, 0.298, 0.362, 0.523)}
_WITH_REGISTERS = {"ViT-S/14": (0.791, 0.809, 0.710, 0.676, None, None, None, None, 0.395),
                   "ViT-B/14": (0.820, 0.846, 0.756, 0.738, None, None, None, None, 0.510),
                   "ViT-L/14": (0.838, 0.867, 0.785, 0.809, None, None, None, None, 0.557),
                   "ViT-g/14": (0.837, 0.871, 0.788, 0.815, None, None, None, None, 0.582)}
PAPER = {(name, registers): dict(zip(BENCHMARKS, figures)) for registers, table in ((False, _WITHOUT),
                                                                                     (True, _WITH_REGISTERS))
         for name, figures in table.items()}


def released_shape(backbone: nn.Module) -> tuple[str, bool] | None:
    """``(name, with registers)`` when ``backbone`` has a released model's shape, else None."""
    size = (int(getattr(backbone, "embed_dim", 0)), len(getattr(backbone, "blocks", ())))
    if getattr(backbone, "patch_size", None) != 14 or size not in SHAPES:
        return None
    return SHAPES[size], bool(getattr(backbone, "num_register_tokens", 0))


def _matched_v2(name: str) -> bool:
    """Whether a test set's root or name is ImageNet-V2's MatchedFrequency, the variant of the paper's
    figure: it names v2 and not one of the other two variants (Threshold0.7, TopImages)."""
    lowered = name.lower()
    return "v2" in lowered and not any(other in lowered for other in ("threshold", "top-images", "topimages"))


def benchmarks_run(config: Any, classes: int | None) -> dict[str, str]:
    """Which of :data:`BENCHMARKS` ``config`` (a :class:`~evaluators.suite.SuiteConfig`) ran as the
    original runs it, each with the metric holding its figure; ``classes``: the labelled set's."""
    tasks, found = set(config.tasks), {}
    if config.train_limit or config.test_limit:  # a part of each split: not the benchmark the figures are of
        return found
    if classes == IMAGENET_CLASSES and not config.test_uri:
        if "knn" in tasks and 20 in config.ks and config.temperature == 0.07:
            found["in1k_knn"] = "knn_top1_k20"
        if "linear" in tasks:
            found["in1k_linear"] = "linear_top1"
    if classes == IMAGENET_CLASSES and "linear" in tasks:
        if _matched_v2(config.test_uri):
            found["inv2_linear"] = "linear_top1"
        further = named_roots(config.test_sets, "test_sets") if config.test_sets else []
        found.update({"inv2_linear": f"test_{name}_linear_top1" for name, _ in further if _matched_v2(name)})
    if classes == INAT18_CLASSES and not config.test_uri and "linear" in tasks:
        found["inat18_linear"] = "linear_top1"
    seg, depth, retrieval = ([name for name, _ in named_sets(given)]
                             for given in (config.seg_data, config.depth_data, config.retrieval_data))
    if "seg" in tasks and seg == ["ade20k"]:
        if config.layers == 1 and not config.multiscale:
            found["ade20k_linear"] = "seg_miou"
        elif config.layers == 4 and config.multiscale:
            found["ade20k_ms"] = "seg_miou"
    if "depth" in tasks and config.layers == 4 and config.depth_head_kind == "linear":
        if depth == ["nyu"]:
            found["nyu_lin4"] = "depth_rmse"
        elif depth == ["nyu", "sunrgbd"]:
            found["sunrgbd_lin4"] = "depth_rmse"
    if "retrieval" in tasks and retrieval == ["roxford5k"]:
        found["oxford_hard"] = "retrieval_map_hard"
    return found


def paper_comparison(metrics: dict[str, float], config: Any, backbone: nn.Module,
                     classes: int | None) -> list[dict[str, Any]]:
    """A row per benchmark run as the original's on a backbone of a released shape:
    ``{"key" (of BENCHMARKS), "benchmark", "metric", "model", "ours", "paper", "gap"}``, ``gap``
    signed so that > 0 is better than the paper; empty when the shape or no protocol matches."""
    shape = released_shape(backbone)
    if shape is None:
        return []
    figures = PAPER[shape]
    rows = []
    for benchmark, metric in benchmarks_run(config, classes).items():
        paper = figures[benchmark]
        if paper is None or metric not in metrics:
            continue
        ours = float(metrics[metric])
        gap = paper - ours if benchmark in LOWER_IS_BETTER else ours - paper
        rows.append({"key": benchmark, "benchmark": LABELS[benchmark], "metric": metric,
                     "model": shape[0] + (" with registers" if shape[1] else ""), "ours": ours, "paper": paper,
                     "gap": gap})
    return rows


def save_comparison(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """``rows`` as a Markdown table (percentages, RMSE in metres), written atomically."""
    def shown(row: dict[str, Any], value: float) -> str:
        return f"{value:.3f}" if row["metric"] == "depth_rmse" else f"{100 * value:.1f}"

    lines = ["| benchmark | model | ours | paper | gap (+: better) |", "|---|---|---|---|---|"]
    lines += [f"| {row['benchmark']} | {row['model']} | {shown(row, row['ours'])} | {shown(row, row['paper'])} | "
              f"{'+' if row['gap'] >= 0 else '-'}{shown(row, abs(row['gap']))} |" for row in rows]
    Storage().write_bytes(str(path), ("\n".join(lines) + "\n").encode())
    return Path(path)
