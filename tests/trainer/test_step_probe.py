"""``benchmarks/step_probe.py``: the hand FLOP count of the ceiling probe against torch's own
``FlopCounterMode`` on tiny sizes, and one real probe step on CPU.

``FlopCounterMode`` does not count the CPU kernel of ``scaled_dot_product_attention``, so the
attention term is checked on its own against an explicit ``q @ k^T`` and ``weights @ v``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

SPEC = importlib.util.spec_from_file_location(
    "step_probe", Path(__file__).resolve().parents[2] / "benchmarks" / "step_probe.py")
step_probe = sys.modules["step_probe"] = importlib.util.module_from_spec(SPEC)  # dataclasses look it up
SPEC.loader.exec_module(step_probe)

SHAPE = step_probe.ProbeShape(embed_dim=32, depth=2, num_heads=4, patch_size=7, global_crop_size=28,
                              local_crop_size=14, num_local_crops=2, hidden_dim=24, head_layers=3, bottleneck_dim=16,
                              num_prototypes=64, batch_size=4, masked_rows=5)


def attention_flops(tokens: int) -> int:
    """Counted FLOPs of one crop's attention in all blocks, done with plain matmuls."""
    head_dim = SHAPE.embed_dim // SHAPE.num_heads
    q = k = v = torch.randn(1, SHAPE.num_heads, tokens, head_dim)
    with FlopCounterMode(display=False) as counter:
        (q @ k.transpose(-1, -2)).softmax(-1) @ v
    return SHAPE.depth * counter.get_total_flops()


def test_forward_and_backward_flops_match_flop_counter() -> None:
    model = step_probe.ProbeViT(SHAPE)
    for crop in (SHAPE.global_crop_size, SHAPE.local_crop_size):
        images = torch.randn(3, 3, crop, crop, requires_grad=True)  # input grad: backward is a full 2x
        tokens = (crop // SHAPE.patch_size) ** 2 + 1
        with FlopCounterMode(display=False) as forward:
            model(images)
        assert forward.get_total_flops() + 3 * attention_flops(tokens) == 3 * step_probe.forward_flops(SHAPE, crop)
        with FlopCounterMode(display=False) as both:
            model(images)[0].sum().backward()
        assert both.get_total_flops() + 9 * attention_flops(tokens) == 9 * step_probe.forward_flops(SHAPE, crop)


@pytest.mark.parametrize("patch_head", [None, (8, 48)], ids=["shared", "separate"])
def test_the_head_on_patch_rows_adds_its_forward_per_row(patch_head: tuple[int, int] | None) -> None:
    """The heads' hand counts against the counter's, and the patch rows they take: an index
    selects exactly the patch tokens ``tokens[:, 1:].flatten(0, 1)[index]``."""
    shape = dataclasses.replace(SHAPE, patch_head=patch_head)
    model = step_probe.ProbeViT(shape)
    images, index = torch.randn(3, 3, 28, 28), torch.tensor([0, 15, 16, 47, 5])
    with FlopCounterMode(display=False) as cls_only:
        model(images)
    with FlopCounterMode(display=False) as with_rows:
        cls_logits, patch_logits = model(images, index)
    assert with_rows.get_total_flops() - cls_only.get_total_flops() == 5 * step_probe.head_flops(shape, patches=True)
    bottleneck, prototypes = patch_head or (16, 64)
    assert step_probe.head_flops(shape, patches=True) == 2 * (32 * 24 + 24 * 24 + 24 * bottleneck
                                                              + bottleneck * prototypes)
    assert patch_logits.shape == (5, prototypes) and cls_logits.shape == (3, 64)

    captured = {}
    model.norm.register_forward_hook(lambda module, args, out: captured.update(tokens=out))
    model(images, index)
    assert torch.allclose(patch_logits, model.patch_head(captured["tokens"][:, 1:].flatten(0, 1)[index]))
    assert torch.allclose(cls_logits, model.head(captured["tokens"][:, 0]))
    assert (model.patch_head is model.head) == (patch_head is None)


def test_flops_per_image_is_student_three_passes_plus_teacher_forward_and_the_masked_rows() -> None:
    g, loc = step_probe.forward_flops(SHAPE, 28), step_probe.forward_flops(SHAPE, 14)
    masked = 4 * 5 * step_probe.head_flops(SHAPE, patches=True)  # 5 rows: student forward + backward, teacher
    assert step_probe.probe_flops_per_image(SHAPE) == 3 * (2 * g + 2 * loc) + 2 * g + masked / 4


def test_the_probe_shape_pads_its_masked_rows_as_dinoflows_step_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """A recipe's probe: the DINO head's sizes and the masked rows of dinoflow's padded step."""
    from dinoflow.config import PretrainConfig, load_config

    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import gpu_correctness

    cfg = load_config(PretrainConfig, "tiny", ["optim.batch_size=6", "heads.num_layers=2", "heads.hidden_dim=40"])
    shape = step_probe.probe_shape(cfg)
    assert shape.masked_rows == len(gpu_correctness.synthetic_batch(cfg).mask_index) > 0
    assert (shape.batch_size, shape.head_layers, shape.hidden_dim, shape.num_prototypes) == (
        6, 2, 40, cfg.heads.num_prototypes)
    assert [m.out_features for m in step_probe.ProbeViT(shape).head if isinstance(m, torch.nn.Linear)] == [
        40, cfg.heads.bottleneck_dim, cfg.heads.num_prototypes]
    assert shape.patch_head is None
    separate = step_probe.probe_shape(load_config(PretrainConfig, "tiny", [
        "heads.ibot_separate_head=true", "heads.ibot_bottleneck_dim=12", "heads.ibot_num_prototypes=30"]))
    assert separate.patch_head == (12, 30)


def test_probe_step_trains_the_student_only() -> None:
    torch.manual_seed(0)
    student, teacher = step_probe.ProbeViT(SHAPE), step_probe.ProbeViT(SHAPE)
    before = [p.detach().clone() for p in student.parameters()]
    teacher_before = [p.detach().clone() for p in teacher.parameters()]
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    step_probe.probe_step(student, teacher, torch.randn(4, 3, 28, 28), torch.randn(4, 3, 14, 14),
                          torch.tensor([1, 2, 40]), optimizer, None)
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, teacher.parameters()))


SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_step.py"


def test_probe_mode_prints_both_rows_on_cpu(tmp_path: Path) -> None:
    report = tmp_path / "probe.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--probe", "--device", "cpu", "--config", "tiny", "--steps",
                           "1", "--warmup", "1", "--json", str(report), "--", "optim.batch_size=4",
                           "crops.num_local_crops=2", "optim.fused_adamw=on"],  # the GPU's path: losses read late
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in done.stdout.splitlines()
            if line.split()[:1] in (["dinoflow"], ["probe"])}
    assert set(rows) == {"dinoflow", "probe"}
    assert all(value > 0 for figures in rows.values() for value in figures)
    assert rows["probe"][3] == 1.0
    written = {row["step"]: row for row in json.loads(report.read_text())["rows"]}  # the same rows, unrounded
    for name, (img_per_s, _, _, ratio) in rows.items():
        assert round(written[name]["img_per_s"], 1) == img_per_s and round(written[name]["ours_vs_probe"], 2) == ratio
        assert not written[name]["compiled"]
    preparation = json.loads(report.read_text())["batch_preparation"]  # crops and masks, then the step
    step_ips = written["dinoflow"]["img_per_s"]
    assert preparation["step"] == "dinoflow" and preparation["img_per_s"] > 0
    assert abs(1 / preparation["end_to_end_img_per_s"] - (1 / preparation["img_per_s"] + 1 / step_ips)) < 1e-9
    assert abs(preparation["share"] - preparation["end_to_end_img_per_s"] / preparation["img_per_s"]) < 1e-9
    assert "batch preparation (multi-crop on cpu, masks on the host):" in done.stdout
    # the eager row timed again as the loop runs it, the next batch prepared in each step's wait
    assert [loop["step"] for loop in preparation["loops"]] == ["dinoflow"] and written["dinoflow"]["loop_img_per_s"] > 0
    assert written["dinoflow"]["loop_side_stream_img_per_s"] > 0
    assert "with the batch made on a second stream" in done.stdout
    assert "dinoflow with the next batch prepared in its wait, as the loop runs:" in done.stdout


def test_compile_needs_a_warm_up_step_and_the_probe_mode() -> None:
    for extra, message in ((["--probe", "--warmup", "0"], "--compile needs --warmup of at least 1"),
                           ([], "--compile, --json and --profile go with --probe"),
                           (["--probe", "--autotune"], "--cuda-graphs, --autotune, --subset-drop-above and "
                                                        "--rounds go with --probe --compile"),
                           (["--probe", "--rounds", "-1"], "--rounds takes a count of at least 0, got -1"),
                           (["--probe", "--subset-drop-above", "1"],
                            "--subset-drop-above takes a rate in [0, 1), got 1.0")):
        compiled = [] if "--autotune" in extra else ["--compile"]
        done = subprocess.run([sys.executable, str(SCRIPT), *compiled, *extra], capture_output=True, text=True,
                              timeout=120, check=False)
        assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]


def test_the_subset_row_times_stochastic_depth_in_its_subset_form_then_puts_the_threshold_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``--subset-drop-above``'s row: at the recipe's rate 0.1 (10 samples a group: 9 kept, the rate
    exactly) the blocks take the subset form while it is timed and when its step (kept for
    ``--rounds``) runs again, the mask form before and after."""
    import argparse

    from dinoflow.config import PretrainConfig, load_config
    from trainer.models import layers

    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import gpu_correctness
    import train_step

    overrides = ["optim.batch_size=5", "crops.num_local_crops=2", "model.drop_path_rate=0.1"]
    args = argparse.Namespace(config="tiny", overrides=overrides, steps=1, warmup=0)
    batch = gpu_correctness.synthetic_batch(load_config(PretrainConfig, "tiny", overrides))
    forms = []
    sizes = layers.subset_sizes
    monkeypatch.setattr(layers, "subset_sizes", lambda shapes, rate: forms.append(sizes(shapes, rate)) or forms[-1])
    timed = train_step.time_dinoflow(args, torch.device("cpu"), False, batch, subset_drop_above=0.05)
    assert timed.seconds > 0 and forms and all(kept == [9, 9] for kept in forms)
    assert layers.SUBSET_DROP_ABOVE == 0.1
    forms.clear()
    timed.step()
    assert forms and all(kept == [9, 9] for kept in forms)
    assert layers.SUBSET_DROP_ABOVE == 0.1
    forms.clear()
    train_step.time_dinoflow(args, torch.device("cpu"), False, batch)
    assert forms and all(kept is None for kept in forms)


def test_the_subset_replay_check_passes_and_catches_a_wrong_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    """``gpu_correctness.py``'s ``subset_cudagraphs`` check, compiled on the CPU (no CUDA graphs here):
    it passes on the subset form as built, with exactly the drawn share dropped in each group and
    other samples drawn by the second replay, and fails when the kept samples' scale ``B / k`` is
    off by 1 %."""
    from trainer.models import layers

    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import gpu_correctness

    check = gpu_correctness.subset_replays(torch.device("cpu"))
    assert check["ok"] and check["dropped"] == [[2, 4], [2, 4]] and check["draws_differ"], check
    rows = layers._subset_rows

    def off_scale(*args: object) -> tuple:
        index, inverse, picked, scales, shapes = rows(*args)
        return index, inverse, picked, scales * 1.01, shapes

    monkeypatch.setattr(layers, "_subset_rows", off_scale)
    check = gpu_correctness.subset_replays(torch.device("cpu"))
    assert not check["ok"] and check["max_abs_diff"] > 1e-3 and check["dropped"] == [[2, 4], [2, 4]]


def test_the_lagged_skip_check_passes_and_fails_without_the_carried_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    """``gpu_correctness``'s ``lagged_skip`` on the CPU (fused AdamW there too): the two steps leave
    every weight as it was; with the second step not told about the unread first, it moves them."""
    from dinoflow.config import PretrainConfig, load_config
    from trainer import engine

    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import gpu_correctness

    cfg = load_config(PretrainConfig, "tiny", ["optim.batch_size=4", *gpu_correctness.FORCED])
    weights = engine.build_networks(cfg)[0].state_dict()
    batch = gpu_correctness.synthetic_batch(cfg)
    check = gpu_correctness.lagged_skip(cfg, weights, batch, torch.device("cpu"))
    assert check["ok"] and check["first_raised"] and check["second_finite"] and check["max_abs_diff"] == 0, check
    finish = engine.finish_step
    monkeypatch.setattr(engine, "finish_step", lambda *args: finish(*args[:-1], None))  # ``after`` left out
    check = gpu_correctness.lagged_skip(cfg, weights, batch, torch.device("cpu"))
    assert not check["ok"] and check["first_raised"] and check["max_abs_diff"] > 0, check
