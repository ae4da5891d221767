"""The paper's figures beside an evaluation's: only for a released shape and a benchmark run as the original's."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evaluators.reference import BENCHMARKS, PAPER, benchmarks_run, paper_comparison, released_shape
from evaluators.suite import SuiteConfig, run_suite
from trainer.models.vit import build_vit


def shaped(arch: str, registers: int = 0, patch_size: int = 14) -> torch.nn.Module:
    with torch.device("meta"):  # the shape alone: no memory
        return build_vit(arch, registers, patch_size=patch_size)


def test_the_released_shapes_are_recognised() -> None:
    assert [released_shape(shaped(arch)) for arch in ("vit_small", "vit_base", "vit_large", "vit_giant2")] == [
        ("ViT-S/14", False), ("ViT-B/14", False), ("ViT-L/14", False), ("ViT-g/14", False)]
    assert released_shape(shaped("vit_large", registers=4)) == ("ViT-L/14", True)
    assert released_shape(shaped("vit_small", patch_size=16)) is None
    assert released_shape(build_vit("vit_small", depth=2, embed_dim=32, num_heads=2, img_size=28)) is None
    assert set(PAPER) == {(name, registers) for name in ("ViT-S/14", "ViT-B/14", "ViT-L/14", "ViT-g/14")
                          for registers in (False, True)}
    assert all(list(figures) == list(BENCHMARKS) for figures in PAPER.values())
    assert PAPER["ViT-L/14", False]["in1k_knn"] == 0.835 and PAPER["ViT-g/14", True]["oxford_hard"] == 0.582


@pytest.mark.parametrize(("settings", "classes", "expected"), [
    ({"tasks": ("knn", "linear"), "data_uri": "/in1k"}, 1000,
     {"in1k_knn": "knn_top1_k20", "in1k_linear": "linear_top1"}),
    ({"tasks": ("knn",), "data_uri": "/in1k", "ks": (10,)}, 1000, {}),  # not the original's k
    ({"tasks": ("knn",), "data_uri": "/in1k", "temperature": 0.1}, 1000, {}),
    ({"tasks": ("knn", "linear"), "data_uri": "/in100"}, 100, {}),  # an ImageNet subset
    ({"tasks": ("linear",), "data_uri": "/in1k", "test_uri": "/imagenetv2-matched-frequency"}, 1000,
     {"inv2_linear": "linear_top1"}),
    ({"tasks": ("knn", "linear"), "data_uri": "/in1k", "test_uri": "/imagenet-r"}, 1000, {}),
    ({"tasks": ("knn", "linear"), "data_uri": "/in1k", "test_sets": "/d/imagenet-r,/d/imagenetv2-matched-frequency"},
     1000, {"in1k_knn": "knn_top1_k20", "in1k_linear": "linear_top1",
            "inv2_linear": "test_imagenetv2-matched-frequency_linear_top1"}),
    ({"tasks": ("linear",), "data_uri": "/in1k", "test_sets": "/d/imagenetv2-top-images-format-val,"
      "/d/imagenetv2-threshold0.7-format-val,/d/imagenetv2-matched-frequency-format-val"}, 1000,
     {"in1k_linear": "linear_top1",
      "inv2_linear": "test_imagenetv2-matched-frequency-format-val_linear_top1"}),  # the paper's variant alone
    ({"tasks": ("linear",), "data_uri": "/in1k", "test_uri": "/imagenetv2-top-images-format-val"}, 1000, {}),
    ({"tasks": ("knn", "linear"), "data_uri": "/in1k", "train_limit": 5000}, 1000, {}),  # a part of the split
    ({"tasks": ("linear",), "data_uri": "/inat2018"}, 8142, {"inat18_linear": "linear_top1"}),
    ({"tasks": ("seg",), "seg_data": "ade20k:/a"}, None, {"ade20k_linear": "seg_miou"}),
    ({"tasks": ("seg",), "seg_data": "ade20k:/a", "layers": 4, "multiscale": True}, None, {"ade20k_ms": "seg_miou"}),
    ({"tasks": ("seg",), "seg_data": "ade20k:/a", "layers": 4}, None, {}),  # neither protocol
    ({"tasks": ("seg",), "seg_data": "voc:/v"}, None, {}),
    ({"tasks": ("depth",), "depth_data": "nyu:/n", "layers": 4}, None, {"nyu_lin4": "depth_rmse"}),
    ({"tasks": ("depth",), "depth_data": "nyu:/n"}, None, {}),  # lin.1
    ({"tasks": ("depth",), "depth_data": "nyu:/n", "layers": 4, "depth_head_kind": "dpt"}, None, {}),
    ({"tasks": ("depth",), "depth_data": "nyu:/n->sunrgbd:/s", "layers": 4}, None, {"sunrgbd_lin4": "depth_rmse"}),
    ({"tasks": ("depth",), "depth_data": "kitti:/k", "layers": 4}, None, {}),
    ({"tasks": ("retrieval",), "retrieval_data": "roxford5k:/o"}, None, {"oxford_hard": "retrieval_map_hard"}),
    ({"tasks": ("retrieval",), "retrieval_data": "rparis6k:/p"}, None, {}),
])
def test_only_the_originals_protocols_are_compared(settings: dict, classes: int | None, expected: dict) -> None:
    assert benchmarks_run(SuiteConfig(**settings), classes) == expected


def test_the_gap_is_signed_better_positive_and_registers_have_fewer_figures() -> None:
    config = SuiteConfig(tasks=("knn", "depth"), data_uri="/in1k", depth_data="nyu:/n", layers=4)
    metrics = {"knn_top1_k20": 0.80, "depth_rmse": 0.40, "linear_top1": 0.9}
    rows = paper_comparison(metrics, config, shaped("vit_small"), 1000)
    assert [(row["benchmark"], row["paper"]) for row in rows] == [("ImageNet-1k k-NN (k=20)", 0.790),
                                                                  ("NYU-Depth v2 lin.4 RMSE", 0.417)]
    assert rows[0]["gap"] == pytest.approx(0.01) and rows[1]["gap"] == pytest.approx(0.017)  # both better
    assert rows[0]["ours"] == 0.80 and rows[0]["model"] == "ViT-S/14"
    with_registers = paper_comparison(metrics, config, shaped("vit_small", registers=4), 1000)
    assert [row["benchmark"] for row in with_registers] == ["ImageNet-1k k-NN (k=20)"]  # no depth figure published
    assert with_registers[0]["paper"] == 0.791 and with_registers[0]["model"] == "ViT-S/14 with registers"
    assert paper_comparison(metrics, replace(config, layers=1), shaped("vit_small"), 1000)[1:] == []
    assert paper_comparison(metrics, config, build_vit("vit_small", depth=2, embed_dim=32, num_heads=2), 1000) == []


def test_an_imagenet_shaped_evaluation_of_a_vit_s_reports_the_papers_figure(tmp_path: Path) -> None:
    """The suite's report and its picture folder: 1,000 class folders (one image each way, 28 px)
    under a ViT-S/14-shaped backbone get the paper's k-NN figure beside the measured one."""
    rng = np.random.default_rng(0)
    for index in range(1000):
        for split in ("train", "val"):
            folder = tmp_path / "in1k" / split / f"n{index:08d}"
            folder.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(folder / "0.png")
    torch.manual_seed(0)
    model = build_vit("vit_small", patch_size=14, img_size=28)
    report = run_suite(model, SuiteConfig(tasks=("knn",), data_uri=str(tmp_path / "in1k"), image_size=28),
                       pictures=tmp_path / "pictures")
    [row] = report["tasks"]["paper"]
    assert row["ours"] == report["metrics"]["knn_top1_k20"] and row["paper"] == 0.790
    assert row["gap"] == pytest.approx(row["ours"] - 0.790) == report["metrics"]["paper_gap_in1k_knn"]
    table = (tmp_path / "pictures" / "paper_comparison.md").read_text()
    assert "| ImageNet-1k k-NN (k=20) | ViT-S/14 | " in table and "| 79.0 |" in table
