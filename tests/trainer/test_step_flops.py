"""``benchmarks/step_flops.py``: the FLOPs of dinoflow's real step, counted on fake tensors, against
an independent count, the ceiling probe's hand formula (``benchmarks/step_probe.py``): in the
backbones, dinoflow's step does the probe's work less the patch embedding's input gradient, which
the probe's formula counts and the step never computes (its input is the image); in the heads, the
probe's head work (every crop's CLS token and the padded masked patches) and the losses' own small
products."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
# one block: the counter's Python overhead per operator, not the sizes, sets this file's time
SIZES = ["model.depth=1", "optim.batch_size=4", "crops.global_crop_size=28", "crops.local_crop_size=14",
         "crops.num_local_crops=2", "model.num_register_tokens=0", "model.ffn_layer=mlp", "heads.num_prototypes=256"]


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


def test_the_step_does_the_probes_work_less_what_it_never_computes_plus_the_losses_products(
        step_flops, step_probe, no_drop_path: dict) -> None:
    from dinoflow.config import PretrainConfig, load_config

    figures = no_drop_path
    shape = step_flops.probe_shape(load_config(PretrainConfig, "tiny", SIZES))
    student_crops = 2 + shape.num_local_crops
    heads = (step_probe.head_flops(shape) * (3 * student_crops + 2)
             + step_probe.head_flops(shape, patches=True) * 4 * shape.masked_rows / shape.batch_size)
    want = (step_flops.probe_flops_per_image(shape) - heads - 2 * _patch_embedding(shape, shape.global_crop_size)
            - shape.num_local_crops * _patch_embedding(shape, shape.local_crop_size))
    assert figures["backbone_gflop_per_image"] * 1e9 == pytest.approx(want, rel=1e-12)
    assert figures["probe_gflop_per_image"] * 1e9 == pytest.approx(step_flops.probe_flops_per_image(shape), rel=1e-12)
    # the heads: the probe's head work on the same rows, and the losses' products (the centre's
    # update, KoLeo's similarities) under 1 % on top; a recomputed or wider head would show here
    extra = figures["heads_and_losses_gflop_per_image"] * 1e9 - heads
    assert 0 < extra < 0.01 * heads
    assert figures["gflop_per_image"] == pytest.approx(
        figures["backbone_gflop_per_image"] + figures["heads_and_losses_gflop_per_image"])
    assert figures["masked_rows"] == shape.masked_rows > 0


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
        return step_probe.forward_flops(shape, crop) - _patch_embedding(shape, crop) - step_probe.head_flops(shape)

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
