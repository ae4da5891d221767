"""The pretraining AdamW (``trainer/optim.py``): its parameter groups, and its kernel, fused or
torch's default, which trains alike and survives a resume with the other."""

from __future__ import annotations

import pytest
import torch

from tests.trainer.test_engine import SCHED, config, images
from trainer.batches import make_batch
from trainer.data.augment import MultiCrop
from trainer.engine import Objective, build_networks, train_step
from trainer.optim import build_adamw, param_groups, use_fused_adamw, with_kernel_choice
from trainer.strategy import Strategy


def test_param_groups_multipliers_and_decay() -> None:
    cfg = config("optim.patch_embed_lr_mult=0.2")
    student, _ = build_networks(cfg)
    groups = param_groups(student, cfg)
    assert sum(len(g["params"]) for g in groups) == len(list(student.parameters()))
    where = {id(p): g for g in groups for p in g["params"]}
    named = dict(student.named_parameters())
    depth = 3

    def group(name: str) -> dict:
        return where[id(named[name])]

    assert group("backbone.cls_token")["lr_multiplier"] == pytest.approx(0.5 ** (depth + 1))
    assert group("backbone.patch_embed.proj.weight")["lr_multiplier"] == pytest.approx(0.2 * 0.5 ** (depth + 1))
    assert group("backbone.blocks.0.attn.qkv.weight")["lr_multiplier"] == pytest.approx(0.5 ** depth)
    assert group("backbone.blocks.2.mlp.fc1.weight")["lr_multiplier"] == pytest.approx(0.5)
    assert group("dino_head.mlp.0.weight")["lr_multiplier"] == 1.0
    for name in ("backbone.blocks.1.attn.qkv.bias", "backbone.blocks.1.norm1.weight", "backbone.blocks.1.ls1.gamma",
                 "backbone.norm.weight"):
        assert group(name)["wd_multiplier"] == 0.0, name
    for name in ("backbone.blocks.1.attn.qkv.weight", "backbone.pos_embed", "backbone.mask_token"):
        assert group(name)["wd_multiplier"] == 1.0, name
    assert group("dino_head.last_layer.weight_v")["is_last_layer"]
    assert not group("dino_head.mlp.0.weight")["is_last_layer"]


def test_fused_adamw_trains_like_the_default_one() -> None:
    """Three real steps (DINO and iBOT losses, masks, drop path, clipping) from the same networks
    and batches: the fused kernel and torch's default path end at the same parameters and losses.

    KoLeo is weighted 0 here (still computed): at init the CLS embeddings nearly coincide, so its
    -log nearest-neighbour distance turns the kernels' rounding-level differences (~1e-8 after a
    step) into 1e-2 changes of the loss, which Adam's normalised update carries into the weights."""
    runs = []
    for choice in ("on", "off"):
        cfg = config(f"optim.fused_adamw={choice}", "loss.koleo_weight=0")
        torch.manual_seed(0)
        student, teacher = build_networks(cfg)
        objective = Objective(cfg)
        optimizer = build_adamw(student, cfg, torch.device("cpu"))
        assert optimizer.param_groups[0]["fused"] is (True if choice == "on" else None)
        losses = []
        for step in range(3):
            torch.manual_seed(step)  # the same crops and drop-path draws in both runs
            batch = make_batch(images(), step, cfg, MultiCrop(cfg.crops))
            losses.append(train_step(student, teacher, objective, [batch], SCHED, optimizer, clip_grad=3.0))
        runs.append((student, losses))
    (fused, fused_losses), (default, default_losses) = runs
    for a, b in zip(fused_losses, default_losses):
        for term in ("dino", "ibot", "total"):
            assert a[term] == pytest.approx(b[term], abs=1e-6), term
    for (name, a), b in zip(fused.named_parameters(), default.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    moved = build_networks(config())[0]  # a fresh start differs: the steps did move the weights
    assert not torch.allclose(fused.backbone.blocks[0].attn.qkv.weight, moved.backbone.blocks[0].attn.qkv.weight)


def test_auto_fuses_adamw_on_cuda_only_and_not_under_deepspeed() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert use_fused_adamw(config(), cuda) and not use_fused_adamw(config(), cpu)
    assert use_fused_adamw(config("distributed.strategy=fsdp2"), cuda)
    assert not use_fused_adamw(config("distributed.strategy=deepspeed"), cuda)
    assert use_fused_adamw(config("optim.fused_adamw=on", "distributed.strategy=deepspeed"), cpu)
    assert not use_fused_adamw(config("optim.fused_adamw=off"), cuda)


def test_a_resumed_optimizer_takes_this_runs_kernel_not_the_checkpoints() -> None:
    """A checkpoint written by torch's default AdamW, loaded (through the strategy's by-name format)
    into a fused one, stays fused and keeps its moments and step; and back."""
    cfg = config()
    torch.manual_seed(0)
    student, teacher = build_networks(cfg)
    written = build_adamw(student, cfg, torch.device("cpu"))
    train_step(student, teacher, Objective(cfg), [make_batch(images(), 0, cfg, MultiCrop(cfg.crops))], SCHED, written,
               clip_grad=3.0)
    state = Strategy().optimizer_state(student, written)
    for choice, fused in (("on", True), ("off", None)):
        resumed = build_adamw(student, config(f"optim.fused_adamw={choice}"), torch.device("cpu"))
        Strategy().load_optimizer_state(student, resumed, with_kernel_choice(state, resumed))
        assert all(group["fused"] is fused for group in resumed.param_groups)
        qkv = student.backbone.blocks[0].attn.qkv.weight
        torch.testing.assert_close(resumed.state[qkv]["exp_avg"], written.state[qkv]["exp_avg"])
        assert float(resumed.state[qkv]["step"]) == 1.0
