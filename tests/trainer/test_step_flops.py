"""``benchmarks/step_flops.py``: the FLOPs of dinoflow's real step, counted on fake tensors, against
an independent count: in the backbones, dinoflow's step does the ceiling probe's work (the probe's
hand formula, ``benchmarks/step_probe.py``), less the probe's CLS head and the patch embedding's
input gradient, which the probe's formula counts and the step never computes (its input is the image)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
# one block: the counter's Python overhead per operator, not the sizes, sets this file's time
SIZES = ["model.depth=1", "optim.batch_size=4", "crops.global_crop_size=28", "crops.local_crop_size=14",
         "crops.num_local_crops=2", "model.num_register_tokens=0", "model.ffn_layer=mlp", "heads.num_prototypes=256"]


def _head(shape) -> int:
    """The probe's CLS head, per crop: bottleneck then prototypes."""
    return 2 * (shape.embed_dim * shape.bottleneck_dim + shape.bottleneck_dim * shape.num_prototypes)


def _patch_embedding(shape, crop: int) -> int:
    """One crop's patch embedding forward, a matrix product per patch."""
    return 2 * (crop // shape.patch_size) ** 2 * 3 * shape.patch_size ** 2 * shape.embed_dim


@pytest.fixture(scope="module")
def step_flops():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import step_flops
    finally:
        sys.path.remove(str(BENCHMARKS))
    return step_flops


@pytest.fixture(scope="module")
def step_probe(step_flops):
    """``benchmarks/step_probe.py``, as ``step_flops`` imported it."""
    return sys.modules["step_probe"]


@pytest.fixture(scope="module")
def no_drop_path(step_flops) -> dict:
    """The figures of the small recipe without stochastic depth."""
    from dinoflow.config import PretrainConfig, load_config

    return step_flops.step_flops(load_config(PretrainConfig, "tiny", [*SIZES, "model.drop_path_rate=0"]))


def test_the_backbones_count_is_the_probes_formula_less_what_the_step_never_computes(step_flops,
                                                                                     no_drop_path: dict) -> None:
    from dinoflow.config import PretrainConfig, load_config

    figures = no_drop_path
    shape = step_flops.probe_shape(load_config(PretrainConfig, "tiny", SIZES))
    student_crops = 2 + shape.num_local_crops
    want = (step_flops.probe_flops_per_image(shape) - _head(shape) * (3 * student_crops + 2)
            - 2 * _patch_embedding(shape, shape.global_crop_size)
            - shape.num_local_crops * _patch_embedding(shape, shape.local_crop_size))
    assert figures["backbone_gflop_per_image"] * 1e9 == pytest.approx(want, rel=1e-12)
    assert figures["probe_gflop_per_image"] * 1e9 == step_flops.probe_flops_per_image(shape)
    # the heads (MLPs on every crop's CLS token and on the masked patches, prototypes) do work on top
    assert figures["heads_and_losses_gflop_per_image"] > 0
    assert figures["gflop_per_image"] == pytest.approx(
        figures["backbone_gflop_per_image"] + figures["heads_and_losses_gflop_per_image"])
    assert figures["masked_rows"] > 0


def test_subset_stochastic_depth_takes_its_share_of_the_student_blocks_off(step_flops, step_probe,
                                                                           no_drop_path: dict) -> None:
    """At rate 0.5 (the subset form; 8 samples per crop group here, 4 kept) the student's residual
    branches run on half of each group's samples: its blocks' matmuls, forward and backward, halve;
    the teacher's forward and the patch embedding do not change."""
    from dinoflow.config import PretrainConfig, load_config

    full = no_drop_path
    half = step_flops.step_flops(load_config(PretrainConfig, "tiny", [*SIZES, "model.drop_path_rate=0.5"]))
    shape = step_flops.probe_shape(load_config(PretrainConfig, "tiny", SIZES))

    def blocks(crop: int) -> int:  # one forward of one crop through the blocks, by the probe's formula
        return step_probe.forward_flops(shape, crop) - _patch_embedding(shape, crop) - _head(shape)

    student_blocks = 3 * (2 * blocks(shape.global_crop_size) + shape.num_local_crops * blocks(shape.local_crop_size))
    skipped = (full["backbone_gflop_per_image"] - half["backbone_gflop_per_image"]) * 1e9
    assert skipped == pytest.approx(student_blocks / 2, rel=1e-12)


def test_the_command_prints_and_writes_its_figures(step_flops, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "flops.json"
    monkeypatch.setattr(sys, "argv", ["step_flops.py", "--config", "tiny", "--json", str(out), *SIZES])
    step_flops.main()
    printed = capsys.readouterr().out
    figures = json.loads(out.read_text())
    assert figures["config"] == "tiny" and figures["batch"] == 4
    assert f"{figures['gflop_per_image']:.2f}" in printed and "ours / probe" in printed
