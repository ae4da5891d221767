"""DeepSpeed ZeRO-3: 2 ranks x B images train like 1 process x 2B images, and its checkpoints
(whole tensors by name, optimizer state included) resume under another strategy and back.

Real runs: ``torchrun`` starts 2 processes that meet over gloo on 127.0.0.1; DeepSpeed picks its
CPU accelerator and partitions student (with AdamW) and teacher with ZeRO stage 3 in fp32. The
first run on a machine compiles DeepSpeed's ``deepspeed_shm_comm`` op (~2 min) into
``TORCH_EXTENSIONS_DIR`` (default here: ``~/.cache/dinoflow/torch_extensions``), later runs reuse it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from tests.trainer.test_distributed import GLOBAL_BATCH, HELPER, SMALL, STEPS, _run, _wait

import deepspeed  # noqa: F401  (a requirement: fail, not skip, without it)

EXTENSIONS = os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "dinoflow" / "torch_extensions"))
ENV = {"TORCH_EXTENSIONS_DIR": EXTENSIONS}
LOSS_TOLERANCE = 1e-5  # absolute, per term and step (measured: ~6e-7)
PARAM_TOLERANCE = 1e-5  # absolute, every element of student, teacher and centres (measured: ~2e-7)
SAVE_AT = STEPS // 2


def _torchrun(out: Path, *args: str, steps: int = STEPS) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(HELPER), str(out), str(GLOBAL_BATCH), str(steps), *args]


def _close(want: dict, got: dict, losses_from: int = 0, steps: int = STEPS) -> None:
    assert len(got["losses"]) == steps - losses_from
    for step, (a, b) in enumerate(zip(want["losses"][losses_from:], got["losses"]), start=losses_from):
        for term in ("dino", "ibot", "total"):
            assert abs(a[term] - b[term]) < LOSS_TOLERANCE, f"step {step} {term}: {a[term]} vs {b[term]}"
    for part in ("student", "teacher", "objective"):
        assert want[part].keys() == got[part].keys()
        for name, tensor in want[part].items():
            torch.testing.assert_close(got[part][name], tensor, rtol=0, atol=PARAM_TOLERANCE, msg=f"{part}.{name}")


def test_zero3_two_ranks_train_like_one_process_and_checkpoints_cross_strategies(tmp_path: Path) -> None:
    os.makedirs(EXTENSIONS, exist_ok=True)
    started = time.perf_counter()
    overrides = [*SMALL, "loss.centering=sinkhorn_knopp", "heads.ibot_separate_head=True"]
    single_out, zero_out = tmp_path / "single.pt", tmp_path / "zero3.pt"
    single_ckpt, zero_ckpt = tmp_path / "single_ckpt.pt", tmp_path / "zero3_ckpt.pt"
    single = _run([sys.executable, str(HELPER), str(single_out), str(GLOBAL_BATCH), str(STEPS), *overrides,
                   f"--save-at={SAVE_AT}:{single_ckpt}", "distributed.strategy=single"], single_out, ENV)
    zero = _run(_torchrun(zero_out, *overrides, f"--save-at={SAVE_AT}:{zero_ckpt}", "distributed.strategy=deepspeed"),
                zero_out, ENV)
    want, got = _wait(single, single_out), _wait(zero, zero_out)
    assert (want["world_size"], got["world_size"]) == (1, 2)
    assert want["losses"][-1]["total"] < want["losses"][0]["total"]  # it trained
    _close(want, got)
    # the teacher moved by EMA (it is not a copy of the student)
    assert not torch.allclose(got["teacher"]["backbone.blocks.0.attn.qkv.weight"],
                              got["student"]["backbone.blocks.0.attn.qkv.weight"])

    # the ZeRO-3 checkpoint holds the same whole, by-name state as the single one...
    a, b = torch.load(single_ckpt, weights_only=True), torch.load(zero_ckpt, weights_only=True)
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for name, entry in a["optimizer"]["state"].items():
        for key, value in entry.items():
            torch.testing.assert_close(b["optimizer"]["state"][name][key], value, rtol=0, atol=PARAM_TOLERANCE,
                                       msg=f"optimizer.{name}.{key}")
    # ...so each resumes under the other strategy and ends where the uninterrupted run ends
    single_resumed, zero_resumed = tmp_path / "single_resumed.pt", tmp_path / "zero3_resumed.pt"
    from_zero = _run([sys.executable, str(HELPER), str(single_resumed), str(GLOBAL_BATCH), str(STEPS), *overrides,
                      f"--resume={zero_ckpt}", "distributed.strategy=single"], single_resumed, ENV)
    from_single = _run(_torchrun(zero_resumed, *overrides, f"--resume={single_ckpt}",
                                 "distributed.strategy=deepspeed"), zero_resumed, ENV)
    _close(want, _wait(from_zero, single_resumed), SAVE_AT)
    _close(want, _wait(from_single, zero_resumed), SAVE_AT)
    print(f"deepspeed test: {time.perf_counter() - started:.0f} s")


def test_zero3_accumulates_micro_batches_like_one_process(tmp_path: Path) -> None:
    """Gradient accumulation: 2 ranks x 2 micro-batches of 4 images train like 1 process x 2
    micro-batches of 8 (the same 16 images per step, the same 8 per global micro-batch, so
    Sinkhorn-Knopp and the centres see the same rows). The micro-batches' gradients must add up in
    ZeRO-3's partitions before the step, not replace each other (same tolerances as above)."""
    os.makedirs(EXTENSIONS, exist_ok=True)
    steps = 4
    overrides = [*SMALL, "loss.centering=softmax", "heads.ibot_separate_head=False", "--micro=2"]
    single_out, zero_out = tmp_path / "single.pt", tmp_path / "zero3.pt"
    single = _run([sys.executable, str(HELPER), str(single_out), str(GLOBAL_BATCH), str(steps), *overrides,
                   "distributed.strategy=single"], single_out, ENV)
    zero = _run(_torchrun(zero_out, *overrides, "distributed.strategy=deepspeed", steps=steps), zero_out, ENV)
    want, got = _wait(single, single_out), _wait(zero, zero_out)
    assert (want["world_size"], got["world_size"]) == (1, 2)
    _close(want, got, steps=steps)
