"""Checkpoints that outlive their world size and their crashes.

A checkpoint holds whole tensors keyed by parameter name (networks, centres, and the optimizer
state through ``torch.distributed.checkpoint.state_dict`` with ``full_state_dict``), so a run
written by 2 ranks resumes on 1 and the other way round. The runs are real: ``torchrun`` starts 2
processes that meet over gloo on 127.0.0.1 and shard with FSDP2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from tests.trainer.test_distributed import (
    GLOBAL_BATCH,
    HELPER,
    LOSS_TOLERANCE,
    PARAM_TOLERANCE,
    SMALL,
    _run,
    _wait,
)

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
SAVE_AT, STEPS = 4, 8
OVERRIDES = [*SMALL, "loss.centering=softmax", "heads.ibot_separate_head=true"]


def _steps(ranks: int, out: Path, *options: str) -> subprocess.Popen:
    launcher = TORCHRUN if ranks == 2 else [sys.executable]
    strategy = "fsdp2" if ranks == 2 else "single"
    return _run([*launcher, str(HELPER), str(out), str(GLOBAL_BATCH), str(STEPS), *options, *OVERRIDES,
                 f"distributed.strategy={strategy}"], out)


def _assert_same_state(got: dict, want: dict, tolerance: float) -> None:
    for part in ("student", "teacher", "objective"):
        assert got[part].keys() == want[part].keys()
        for name, tensor in want[part].items():
            torch.testing.assert_close(got[part][name], tensor, rtol=0, atol=tolerance, msg=f"{part}.{name}")


def test_a_checkpoint_resumes_at_another_world_size(tmp_path: Path) -> None:
    """2 ranks -> step 4 -> 1 rank -> step 8 ends where 2 ranks uninterrupted end, and 1 -> 2 ends
    where 1 ends (every rank augments the global batch here, so the split changes nothing but the
    sums' order: the tolerances are those of 2 x B vs 1 x 2B)."""
    two, one = tmp_path / "two.pt", tmp_path / "one.pt"
    two_ckpt, one_ckpt = tmp_path / "two_ckpt.pt", tmp_path / "one_ckpt.pt"
    first = [(_steps(2, two, f"--save-at={SAVE_AT}:{two_ckpt}"), two),
             (_steps(1, one, f"--save-at={SAVE_AT}:{one_ckpt}"), one)]
    two_result, one_result = (_wait(process, out) for process, out in first)

    written_by_two, written_by_one = (torch.load(p, weights_only=True) for p in (two_ckpt, one_ckpt))
    assert written_by_two["step"] == written_by_one["step"] == SAVE_AT
    for written in (written_by_two, written_by_one):  # one format: whole tensors keyed by parameter name
        state = written["optimizer"]["state"]
        assert set(state) <= set(written["student"]) and "backbone.blocks.0.attn.qkv.weight" in state
        assert state["backbone.blocks.0.attn.qkv.weight"]["exp_avg"].shape == (96, 32)
    for name, moments in written_by_two["optimizer"]["state"].items():
        for key, tensor in moments.items():
            torch.testing.assert_close(written_by_one["optimizer"]["state"][name][key], tensor, rtol=0,
                                       atol=PARAM_TOLERANCE, msg=f"{name}.{key}")

    one_from_two, two_from_one = tmp_path / "one_from_two.pt", tmp_path / "two_from_one.pt"
    second = [(_steps(1, one_from_two, f"--resume={two_ckpt}"), one_from_two),
              (_steps(2, two_from_one, f"--resume={one_ckpt}"), two_from_one)]
    resumed_on_one, resumed_on_two = (_wait(process, out) for process, out in second)

    assert (resumed_on_one["world_size"], resumed_on_two["world_size"]) == (1, 2)
    for resumed, reference in ((resumed_on_one, two_result), (resumed_on_two, one_result)):
        assert len(resumed["losses"]) == STEPS - SAVE_AT
        for step, (a, b) in enumerate(zip(resumed["losses"], reference["losses"][SAVE_AT:]), start=SAVE_AT):
            for term in ("dino", "ibot", "total"):
                assert abs(a[term] - b[term]) < LOSS_TOLERANCE, f"step {step} {term}: {a[term]} vs {b[term]}"
        _assert_same_state(resumed, reference, PARAM_TOLERANCE)


def _pretrain(out: Path, ranks: int, steps: int, log: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """The engine's whole loop on 48 random images, a global batch of 8 on any world size."""
    launcher = [*TORCHRUN[:-1], str(ranks)] if ranks > 1 else [sys.executable]
    strategy = "fsdp2" if ranks > 1 else "single"
    process = _run([*launcher, str(HELPER), "pretrain", *SMALL, f"distributed.strategy={strategy}",
                    "checkpoint_every=2", f"optim.batch_size={8 // ranks}", f"out={out}", f"max_steps={steps}"],
                   out / log, env)
    return process


def _finish(process: subprocess.Popen, out: Path, log: str) -> None:
    process.wait(timeout=240)
    assert process.returncode == 0, (out / log).with_suffix(".log").read_text()[-4000:]


def _latest(out: Path) -> dict:
    pointer = json.loads((out / "checkpoints" / "latest.json").read_text())
    return torch.load(pointer["uri"], weights_only=True)


def test_pretrain_resumes_at_another_world_size(tmp_path: Path) -> None:
    """The engine's own save and restore: 2 ranks write step 2, 1 rank goes on to 4, 2 ranks to 6.
    Each rank augments only its own images, so a run that changes world size sees other crops
    than one that does not: this checks that it resumes and keeps counting, not the weights."""
    out = tmp_path / "run"
    out.mkdir()
    for ranks, steps in ((2, 2), (1, 4), (2, 6)):
        _finish(_pretrain(out, ranks, steps, f"launch{steps}"), out, f"launch{steps}")
        checkpoint = _latest(out)
        assert (checkpoint["step"], checkpoint["images_seen"]) == (steps, 8 * steps)
        steps_taken = {float(m["step"]) for m in checkpoint["optimizer"]["state"].values()}
        assert steps_taken == {float(steps)}  # Adam's bias correction continues from the checkpoint


def test_a_killed_rank_ends_the_job_and_the_rerun_finishes_like_an_uninterrupted_run(tmp_path: Path) -> None:
    """Rank 1 SIGKILLs itself while reading the images of step 3 (0-based: steps 0-2 done, a
    checkpoint after every 2): torchrun stops rank 0 and fails; the rerun resumes from step 2 and
    its step-6 weights equal those of a run that was never killed (same world size: exact but for
    fp32 noise, 1e-6 absolute)."""
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    for out in (whole, crashed):
        out.mkdir()
    reference = _pretrain(whole, 2, 6, "launch")
    # 4 images per rank and step: the 14th read is the second image of step 3 (0-based)
    killed = _pretrain(crashed, 2, 6, "killed", {"KILL_RANK_AT_ITEM": "1:14"})
    killed.wait(timeout=240)
    log = (crashed / "killed.log").read_text()
    assert killed.returncode != 0, log[-4000:]
    assert "Signals.SIGKILL" in log or "SIGKILL" in log, log[-4000:]
    assert _latest(crashed)["step"] == 2  # the last whole checkpoint before the crash
    _finish(_pretrain(crashed, 2, 6, "rerun"), crashed, "rerun")
    _finish(reference, whole, "launch")

    want, got = _latest(whole), _latest(crashed)
    assert want["step"] == got["step"] == 6 and want["images_seen"] == got["images_seen"] == 6 * 8
    _assert_same_state(got, want, 1e-6)


def test_single_process_optimizer_state_is_keyed_by_name_and_reads_older_checkpoints() -> None:
    from dinoflow.config import PretrainConfig, load_config
    from trainer.engine import build_networks, param_groups
    from trainer.strategy import Strategy

    cfg = load_config(PretrainConfig, "tiny", SMALL)
    student, _ = build_networks(cfg)
    optimizer = torch.optim.AdamW(param_groups(student, cfg))
    for parameter in student.parameters():
        parameter.grad = torch.randn_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    strategy = Strategy()
    by_name = strategy.optimizer_state(student, optimizer)
    assert "backbone.blocks.0.attn.qkv.weight" in by_name["state"]
    for state in (by_name, optimizer.state_dict()):  # this format, and torch's (older checkpoints)
        fresh = torch.optim.AdamW(param_groups(student, cfg))
        strategy.load_optimizer_state(student, fresh, state)
        for want, got in zip(optimizer.state_dict()["state"].values(), fresh.state_dict()["state"].values()):
            for key in want:
                assert torch.equal(got[key], want[key])
