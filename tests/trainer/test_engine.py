"""The pretraining engine: the training step, its losses and EMA, and the loop."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable

import pytest
import torch

from dinoflow.config import PretrainConfig, load_config
from dinoflow.storage import Storage
from tests.trainer.host_reads import host_reads
from tests.trainer.test_loader_wait import Metrics
from trainer import engine
from trainer.batches import CropBatch, make_batch
from trainer.checkpoints import load_latest_checkpoint
from trainer.data.augment import MultiCrop
from trainer.engine import Objective, SSLNetwork, build_networks, ema_update, train_step
from trainer.optim import build_adamw, param_groups
from trainer.schedules import ScheduleValues

TINY = ["model.embed_dim=32", "model.depth=3", "model.num_heads=2", "model.patch_size=7",
        "crops.local_crop_size=14", "heads.num_prototypes=64", "heads.hidden_dim=64",
        "heads.bottleneck_dim=16", "optim.batch_size=8", "optim.layerwise_decay=0.5"]


SCHED = ScheduleValues(  # the schedule values of a step in these tests (frozen: shared safely)
    lr=1e-3, last_layer_lr=1e-3, weight_decay=0.04, teacher_momentum=0.9, teacher_temp=0.05)


def config(*extra: str) -> PretrainConfig:
    return load_config(PretrainConfig, "tiny", [*TINY, *extra])


def images(count: int = 8) -> torch.Tensor:
    return (torch.rand(count, 3, 28, 28, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)


def test_ema_update_formula() -> None:
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    before = copy.deepcopy(teacher)
    ema_update(teacher, student, 0.9)
    for t, t0, s in zip(teacher.parameters(), before.parameters(), student.parameters()):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s)


@pytest.mark.parametrize("centering", ["softmax", "sinkhorn_knopp"])
@pytest.mark.parametrize("separate_head", [False, True])
def test_train_step_updates_student_then_teacher(centering: str, separate_head: bool) -> None:
    cfg = config(f"loss.centering={centering}", f"heads.ibot_separate_head={separate_head}",
                 "heads.ibot_num_prototypes=48")
    torch.manual_seed(0)
    student, teacher = build_networks(cfg)
    objective = Objective(cfg)
    optimizer = torch.optim.AdamW(param_groups(student, cfg))
    batch = make_batch(images(), 0, cfg, MultiCrop(cfg.crops))
    assert batch.global_crops.shape == (2, 8, 3, 28, 28) and batch.local_crops.shape == (6, 8, 3, 14, 14)
    assert batch.masks.shape == (16, 16) and batch.masks.any()
    student_before, teacher_before = copy.deepcopy(student), copy.deepcopy(teacher)
    sched = ScheduleValues(lr=1e-3, last_layer_lr=0.0, weight_decay=0.04, teacher_momentum=0.9, teacher_temp=0.05)
    losses = train_step(student, teacher, objective, [batch], sched, optimizer, clip_grad=3.0)
    health = {"health_target_entropy", "health_prototypes_used", "health_feature_spread"}  # figures, no losses
    assert set(losses) == {"dino", "ibot", "koleo", "total", *health}
    weights = cfg.loss
    assert losses["total"] == pytest.approx(weights.dino_weight * losses["dino"] + weights.ibot_weight * losses["ibot"]
                                            + weights.koleo_weight * losses["koleo"], rel=1e-5)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    moved = [n for (n, a), b in zip(student.named_parameters(), student_before.parameters()) if not torch.equal(a, b)]
    assert "backbone.blocks.0.attn.qkv.weight" in moved and "dino_head.mlp.0.weight" in moved
    assert not any("last_layer" in n for n in moved)  # last layer frozen by its schedule
    for t, t0, s in zip(teacher.parameters(), teacher_before.parameters(), student.parameters()):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s)
    if centering == "softmax":
        assert objective.dino_center.center.abs().sum() > 0


def test_gradient_accumulation_matches_one_big_batch() -> None:
    cfg = config("model.drop_path_rate=0", "loss.centering=sinkhorn_knopp", "loss.koleo_weight=0",
                 "loss.mask_probability=0", "loss.ibot_weight=0")
    torch.manual_seed(0)
    student, teacher = build_networks(cfg)
    batch = make_batch(images(8), 0, cfg, MultiCrop(cfg.crops))
    halves = [type(batch)(batch.global_crops[:, i:i + 4], batch.local_crops[:, i:i + 4],
                          batch.masks.view(2, 8, -1)[:, i:i + 4].reshape(8, -1)) for i in (0, 4)]
    sched = ScheduleValues(lr=1e-3, last_layer_lr=1e-3, weight_decay=0.0, teacher_momentum=0.5, teacher_temp=0.07)
    results = []
    for micro in ([batch], halves):
        s, t = copy.deepcopy(student), copy.deepcopy(teacher)
        optimizer = torch.optim.SGD(param_groups(s, cfg), lr=0)  # SGD: the update is linear in the gradient
        train_step(s, t, Objective(cfg), micro, sched, optimizer, clip_grad=0)
        results.append(s)
    # the DINO loss is a batch mean, and Sinkhorn here sees the whole batch or each half: compare
    # only the patch embedding's update direction, which both runs share to within a few percent
    a, b = (r.backbone.blocks[0].attn.qkv.weight - student.backbone.blocks[0].attn.qkv.weight for r in results)
    cosine = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert cosine > 0.9


def test_accumulated_micro_batches_move_the_centres_once_as_their_union() -> None:
    """Softmax centring under gradient accumulation: the DINO and iBOT centres move once a step, by
    the mean of both halves' teacher rows, as for the whole batch (a move each would weigh the
    first half by 0.9 x 0.1 and the second by 0.1)."""
    cfg = config("model.drop_path_rate=0", "loss.centering=softmax", "loss.mask_probability=1")
    torch.manual_seed(0)
    student, teacher = build_networks(cfg)
    batch = make_batch(images(8), 0, cfg, MultiCrop(cfg.crops))
    assert batch.masks.any()
    halves = [type(batch)(batch.global_crops[:, i:i + 4], batch.local_crops[:, i:i + 4],
                          batch.masks.view(2, 8, -1)[:, i:i + 4].reshape(8, -1)) for i in (0, 4)]
    sched = ScheduleValues(lr=1e-3, last_layer_lr=1e-3, weight_decay=0.0, teacher_momentum=0.5, teacher_temp=0.07)
    centres = []
    for micro in ([batch], halves):
        s, t, objective = copy.deepcopy(student), copy.deepcopy(teacher), Objective(cfg)
        train_step(s, t, objective, micro, sched, torch.optim.SGD(param_groups(s, cfg), lr=0), clip_grad=0)
        centres.append([objective.dino_center.center.clone(), objective.ibot_center.center.clone()])
        assert objective.dino_center.center.abs().sum() > 0 and objective.ibot_center.center.abs().sum() > 0
    for whole, accumulated in zip(*centres):
        torch.testing.assert_close(accumulated, whole, rtol=1e-5, atol=1e-6)


def test_a_failed_step_leaves_the_centres_as_they_were() -> None:
    """An error inside a step drops the centre updates it had made: a rerun of the step starts from
    the same centre."""
    cfg = config("loss.centering=softmax")
    objective = Objective(cfg)
    logits = torch.randn(6, cfg.heads.num_prototypes)
    with pytest.raises(RuntimeError, match="the second micro-batch failed"), objective.one_step():
        objective.targets(logits, objective.dino_center, 0.07)
        raise RuntimeError("the second micro-batch failed")
    assert objective.dino_center.center.abs().sum() == 0
    with objective.one_step():
        objective.targets(logits, objective.dino_center, 0.07)
    torch.testing.assert_close(objective.dino_center.center, 0.1 * logits.mean(dim=0, keepdim=True))


@pytest.mark.parametrize("fused", [False, True])
def test_nan_loss_halts_with_a_clear_error(fused: bool) -> None:
    """A non-finite loss raises and the student's weights stay as they were: checked on the host
    before the update, or (fused AdamW) skipped by the kernel and read after it."""
    cfg = config()
    student, teacher = build_networks(cfg)
    with torch.no_grad():
        student.dino_head.mlp[0].weight.fill_(float("nan"))
    batch = make_batch(images(), 0, cfg, MultiCrop(cfg.crops))
    before = {name: p.clone() for name, p in student.named_parameters()}
    optimizer = torch.optim.AdamW(param_groups(student, cfg), fused=fused or None)
    with pytest.raises(FloatingPointError, match="loss is nan"):
        train_step(student, teacher, Objective(cfg), [batch], SCHED, optimizer, 3.0)
    assert all(torch.equal(p, before[name]) for name, p in student.named_parameters() if name != "dino_head.mlp.0.weight")
    if fused:  # the skipped step is not counted either
        assert all(float(state["step"]) == 0 for state in optimizer.state.values())


TrainedRun = tuple[torch.nn.Module, Objective, list[dict[str, float]]]


def two_steps(cfg: PretrainConfig, adjust: Callable[[CropBatch], CropBatch] = lambda batch: batch) -> TrainedRun:
    """The student, objective and losses after two steps from seeded networks on seeded batches,
    each batch passed through ``adjust`` first."""
    torch.manual_seed(0)
    student, teacher = build_networks(cfg)
    objective = Objective(cfg)
    optimizer = build_adamw(student, cfg, torch.device("cpu"))
    losses = []
    for step in range(2):
        torch.manual_seed(step)  # the same crops and drop-path draws in every run
        batch = adjust(make_batch(images(), step, cfg, MultiCrop(cfg.crops)))
        losses.append(train_step(student, teacher, objective, [batch], SCHED, optimizer, clip_grad=3.0))
    return student, objective, losses


def assert_trained_alike(run: TrainedRun, reference: TrainedRun) -> None:
    """The same loss terms each step, the same centres and the same student weights."""
    (student, objective, losses), (reference_student, reference_objective, reference_losses) = run, reference
    for a, b in zip(losses, reference_losses, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(objective.state_dict(), reference_objective.state_dict())
    for (name, a), b in zip(student.named_parameters(), reference_student.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("centering", ["softmax", "sinkhorn_knopp"])
def test_padding_the_masked_patches_changes_no_loss_and_no_weight(centering: str) -> None:
    """Two steps on a padded batch and on the same batch unpadded (``mask_index`` derived from the
    masks) give the same loss terms, centres and weights: padding rows count nowhere."""
    cfg = config(f"loss.centering={centering}")

    def unpadded(batch: CropBatch) -> CropBatch:
        assert len(batch.mask_index) > int(batch.masks.sum())  # there is padding to ignore
        return CropBatch(batch.global_crops, batch.local_crops, batch.masks)

    assert_trained_alike(two_steps(cfg), two_steps(cfg, unpadded))


@pytest.mark.parametrize("centering", ["softmax", "sinkhorn_knopp"])
def test_a_shared_head_on_cls_and_patches_in_one_call_trains_as_a_call_each(centering: str, monkeypatch) -> None:
    """Two steps with the shared DINO/iBOT head taking the CLS tokens and the masked patches in one
    call (``SSLNetwork.heads``), and with a call each (the reference, patched in): the same loss
    terms, centres and weights, for the student's losses and the teacher's targets alike."""
    cfg = config(f"loss.centering={centering}")
    assert not cfg.heads.ibot_separate_head
    one_call = two_steps(cfg)

    def a_call_each(network: SSLNetwork, cls, patches, cls_fused=None, patch_fused=None):
        return network.dino_head(cls, cls_fused), network.dino_head(patches, patch_fused) if len(patches) else None

    monkeypatch.setattr(SSLNetwork, "heads", a_call_each)
    assert_trained_alike(one_call, two_steps(cfg))


@pytest.mark.parametrize(("preset", "low", "high"), [
    ("vits14", 21e6, 23e6), ("vitb14", 85e6, 88e6), ("vitl14", 300e6, 310e6), ("vitg14", 1.10e9, 1.15e9),
])
def test_full_size_recipes_build_the_released_shapes(preset: str, low: float, high: float) -> None:
    cfg = load_config(PretrainConfig, preset)
    with torch.device("meta"):
        student, _ = build_networks(cfg)
    backbone = sum(p.numel() for p in student.backbone.parameters())
    assert low < backbone < high
    assert cfg.model.compile_blocks and cfg.loss.compile and cfg.crops.compile  # the GPU recipes: the fast path
    if preset in ("vitl14", "vitg14"):  # the large recipes: SK, separate iBOT head, 131k prototypes
        assert cfg.loss.centering == "sinkhorn_knopp" and student.ibot_head is not None
        assert student.dino_head.last_layer.weight_v.shape == (131072, 384)
        assert student.ibot_head.last_layer.weight_v.shape == (131072, 256)
        assert cfg.optim.base_lr == 2e-4 and cfg.model.drop_path_rate == 0.4
    else:
        assert student.ibot_head is None and student.dino_head.last_layer.weight_v.shape == (65536, 256)


def test_highres_phase_uses_larger_crops() -> None:
    cfg = config("crops.highres_global_crop_size=42", "crops.highres_local_crop_size=21")
    hr = MultiCrop(cfg.crops.model_copy(update={"global_crop_size": 42, "local_crop_size": 21}))
    batch = make_batch(images(), 5, cfg, hr)
    assert batch.global_crops.shape[-1] == 42 and batch.masks.shape == (16, 36)


class _RandomImages(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 24  # three batches of 8: every image is drawn once in three steps

    def __getitem__(self, index: int):
        from trainer.data.datasets import Sample

        image = (torch.rand(3, 28, 28, generator=torch.Generator().manual_seed(index)) * 255).to(torch.uint8)
        return Sample(image=image if index != 5 else None, label=-1, key=f"img{index}")


def test_pretrain_evaluates_on_the_training_clock(tmp_path) -> None:
    from trainer.data.datasets import collate_samples
    from trainer.engine import pretrain

    cfg = config(f"out={tmp_path / 'run'}", "max_steps=3", "eval.at_minutes=[0.00001, 500]", "data.max_bad_fraction=0.1")
    calls: list[int] = []

    def evaluate(backbone, step: int) -> dict[str, float]:
        assert not any(p.requires_grad for p in backbone.parameters())  # the teacher is evaluated
        calls.append(step)
        return {"score": float(step)}

    summary = pretrain(cfg, _RandomImages(), collate_samples, Storage(), evaluate=evaluate)
    assert calls == [1, 3]  # the first mark after step 1, then the closing evaluation
    assert [h["step"] for h in summary["history"]] == [1] and summary["final"] == {"score": 3.0}
    assert summary["bad_images"]["bad"] == 1 and summary["bad_images"]["examples"] == ["img5"]
    assert 0 < summary["train_minutes"] < 5 and summary["steps"] == 3


class _SizedImages(torch.utils.data.Dataset):
    """24 random images decoded to ``load_size``; ``read``: the size of each image read, in order
    (a list the high-resolution phase's copy of the data set shares)."""

    def __init__(self) -> None:
        self.load_size, self.read = 28, []

    def __len__(self) -> int:
        return 24

    def __getitem__(self, index: int):
        from trainer.data.datasets import Sample

        self.read.append(self.load_size)
        pixels = torch.rand(3, self.load_size, self.load_size, generator=torch.Generator().manual_seed(index))
        return Sample(image=(pixels * 255).to(torch.uint8), label=-1, key=f"img{index}")


def test_the_high_resolution_phase_crops_images_decoded_at_its_load_size(tmp_path) -> None:
    """``crops.highres_load_size``: the last step (``crops.highres_steps=1`` of 3) reads its images at
    56 px for its 42 px crops; the steps before at the recipe's 28."""
    from trainer.data.datasets import collate_samples
    from trainer.engine import pretrain

    cfg = config(f"out={tmp_path / 'run'}", "optim.epochs=1", "optim.epoch_length=3", "crops.highres_steps=1",
                 "crops.highres_global_crop_size=42", "crops.highres_local_crop_size=14",
                 "crops.highres_load_size=56")
    data = _SizedImages()
    assert pretrain(cfg, data, collate_samples, Storage())["steps"] == 3
    assert data.read == [28] * 16 + [56] * 8


def test_a_fresh_run_starts_from_init_weights_and_a_resumed_one_ignores_them(tmp_path) -> None:
    from trainer.data.datasets import collate_samples
    from trainer.engine import pretrain
    from trainer.models.hub import load_backbone, save_backbone

    torch.manual_seed(123)
    start = build_networks(config())[0].backbone
    save_backbone(start, str(tmp_path / "start.safetensors"))
    cfg = config(f"out={tmp_path / 'run'}", "max_steps=1", f"init_weights={tmp_path / 'start.safetensors'}",
                 "data.max_bad_fraction=0.1", "seed=7")
    summary = pretrain(cfg, _RandomImages(), collate_samples, Storage())
    teacher = load_backbone(summary["backbone"], "safetensors")
    random_init = build_networks(cfg)[1].backbone  # what seed 7 alone would have started from
    moved = {k: (v - start.state_dict()[k]).abs().max().item() for k, v in teacher.state_dict().items()}
    apart = {k: (v - random_init.state_dict()[k]).abs().max().item() for k, v in teacher.state_dict().items()}
    # one EMA step (momentum 0.99) from the init weights: close to them, far from a random init
    assert max(moved.values()) < 0.01 * max(apart.values())
    # a resumed run takes the checkpoint, whatever init_weights says
    broken = config(f"out={tmp_path / 'run'}", "max_steps=2", f"init_weights={tmp_path / 'missing.safetensors'}",
                    "data.max_bad_fraction=0.1", "seed=7")
    assert pretrain(broken, _RandomImages(), collate_samples, Storage())["steps"] == 2
    # ... but not under another seed, batch or architecture: named, the checkpoint kept
    moved_on = config(f"out={tmp_path / 'run'}", "max_steps=3", "data.max_bad_fraction=0.1", "seed=8",
                      f"optim.batch_size={cfg.optim.batch_size * 2}", "model.num_register_tokens=1")
    batch = cfg.optim.batch_size
    with pytest.raises(ValueError, match=r"holds a pretraining run started otherwise: seed = 8 \(the run: 7\); "
                       r"model.num_register_tokens = 1 \(the run: 0\); the global batch \(optim.batch_size x "
                       rf"ranks\) = {batch * 2} \(the run: {batch}\); resume it with its settings"):
        pretrain(moved_on, _RandomImages(), collate_samples, Storage())
    assert load_latest_checkpoint(Storage(), str(tmp_path / "run"))["step"] == 2
    fresh = config(f"out={tmp_path / 'other'}", "max_steps=1", f"init_weights={tmp_path / 'missing.safetensors'}")
    with pytest.raises(Exception, match="missing.safetensors"):
        pretrain(fresh, _RandomImages(), collate_samples, Storage())


def test_a_fresh_run_starts_from_released_weights_with_their_position_table_resized(tmp_path) -> None:
    """Meta's .pth layout (a 10 x 10 table here, 37 x 37 there), the source taken from the path."""
    from trainer.data.datasets import collate_samples
    from trainer.engine import pretrain
    from trainer.models.hub import init_backbone, load_backbone
    from trainer.models.vit import build_vit

    torch.manual_seed(3)
    released = build_vit("vit_small", embed_dim=32, depth=3, num_heads=2, patch_size=7, img_size=70)
    with torch.no_grad():
        for parameter in released.parameters():
            parameter.copy_(0.1 * torch.randn_like(parameter))
    torch.save(released.state_dict(), tmp_path / "dinov2_tiny_pretrain.pth")
    cfg = config(f"out={tmp_path / 'run'}", "max_steps=1", f"init_weights={tmp_path / 'dinov2_tiny_pretrain.pth'}",
                 "data.max_bad_fraction=0.1", "seed=7")
    start = build_networks(cfg)[0].backbone
    init_backbone(start, cfg.init_weights, "official", Storage())
    summary = pretrain(cfg, _RandomImages(), collate_samples, Storage())
    teacher = load_backbone(summary["backbone"], "safetensors")
    random_init = build_networks(cfg)[1].backbone
    moved = {k: (v - start.state_dict()[k]).abs().max().item() for k, v in teacher.state_dict().items()}
    apart = {k: (v - random_init.state_dict()[k]).abs().max().item() for k, v in teacher.state_dict().items()}
    assert teacher.pos_embed.shape == (1, 17, 32)
    assert max(moved.values()) < 0.01 * max(apart.values())
    # weights that do not fit the recipe: named before any step, nothing written
    misfit = config(f"out={tmp_path / 'misfit'}", "max_steps=1", "model.num_register_tokens=4",
                    f"init_weights={tmp_path / 'dinov2_tiny_pretrain.pth'}")
    with pytest.raises(ValueError, match=r"model.num_register_tokens = 4 \(the weights: 0\)"):
        pretrain(misfit, _RandomImages(), collate_samples, Storage())
    assert not (tmp_path / "misfit" / "checkpoints").exists()


def test_the_bad_image_tally_survives_a_resume(tmp_path) -> None:
    from trainer.data.datasets import collate_samples
    from trainer.engine import pretrain

    def run(out: str, *steps: int) -> dict:
        for last in steps:
            summary = pretrain(config(f"out={tmp_path / out}", f"max_steps={last}", "data.max_bad_fraction=0.1",
                                      "checkpoint_every=1"), _RandomImages(), collate_samples, Storage())
        return summary["bad_images"]

    whole = run("whole", 6)  # two passes over 24 images, one of them bad each time
    assert (whole["seen"], whole["bad"], whole["examples"]) == (48, 2, ["img5", "img5"])
    assert run("pieces", 2, 4, 6) == whole


def test_a_short_run_with_one_bad_image_passes_the_default_limit(tmp_path) -> None:
    """Three steps read the 24 images once, one of them bad (4.2 %): the default limit (1 %) is
    judged from 3,000 images on, and a run that ends before is held to the 30 bad images it allows
    there, not to the fraction of its few images (which failed this run at its end)."""
    from trainer.data.datasets import collate_samples
    from trainer.engine import pretrain

    cfg = config(f"out={tmp_path / 'run'}", "max_steps=3")
    assert cfg.data.max_bad_fraction == 0.01
    summary = pretrain(cfg, _RandomImages(), collate_samples, Storage())
    assert (summary["steps"], summary["bad_images"]["seen"], summary["bad_images"]["bad"]) == (3, 24, 1)


class _SkippedBatchImages(torch.utils.data.Dataset):
    """24 images (three batches of 8 a data epoch under ``seed``); those of the first epoch's second
    batch undecodable, so the loader skips it. ``read``: the keys read, in order."""

    def __init__(self, seed: int) -> None:
        from trainer.batches import ResumableBatches

        order = iter(ResumableBatches(24, 8, seed))
        next(order)
        self.bad, self.read = set(next(order)), []

    def __len__(self) -> int:
        return 24

    def __getitem__(self, index: int):
        from trainer.data.datasets import Sample

        self.read.append(f"img{index}")
        image = (torch.rand(3, 28, 28, generator=torch.Generator().manual_seed(index)) * 255).to(torch.uint8)
        return Sample(image=None if index in self.bad else image, label=-1, key=f"img{index}")


def test_a_run_resumed_after_a_skipped_batch_ends_where_an_uninterrupted_one_ends(tmp_path) -> None:
    """The loader skips a batch all bad, so step s reads loader batch s + 1. A run stopped after
    step 2's checkpoint (written when step 3's images were already read) resumes from the loader
    batch after step 2's, not from step 2's own: it reads what the uninterrupted run reads and ends
    on its weights (resumed at ``step x micro-batches``, it read step 2's batch again)."""
    from trainer.data.datasets import collate_samples
    from trainer.engine import pretrain
    from trainer.models.hub import load_backbone

    def cfg(out: str) -> PretrainConfig:
        return config(f"out={tmp_path / out}", "max_steps=4", "checkpoint_every=1", "eval.every_steps=3",
                      "data.max_bad_fraction=0.5")

    def stop(backbone, step: int) -> dict[str, float]:
        raise RuntimeError(f"stopped after step {step}")

    whole_data, cut_data = _SkippedBatchImages(cfg("whole").seed), _SkippedBatchImages(cfg("whole").seed)
    whole = pretrain(cfg("whole"), whole_data, collate_samples, Storage())
    with pytest.raises(RuntimeError, match="stopped after step 3"):
        pretrain(cfg("cut"), cut_data, collate_samples, Storage(), evaluate=stop)
    saved = load_latest_checkpoint(Storage(), str(tmp_path / "cut"))
    assert saved["step"] == 2 and len(cut_data.read) == 5 * 8  # step 4's images read during step 3
    cut_data.read.clear()
    resumed = pretrain(cfg("cut"), cut_data, collate_samples, Storage())
    assert cut_data.read == whole_data.read[3 * 8:]  # loader batches 3 and 4
    ends = [load_backbone(summary["backbone"], "safetensors").state_dict() for summary in (whole, resumed)]
    for key, value in ends[0].items():
        torch.testing.assert_close(ends[1][key], value, rtol=0, atol=0, msg=key)
    assert saved["loader_batch"] == 3


@pytest.mark.parametrize("centering", ["softmax", "sinkhorn_knopp"])
def test_patch_targets_from_features_equal_targets_from_logits(centering: str) -> None:
    """The teacher's iBOT targets made from its bottleneck features and prototypes (the logits never
    written whole) against the targets and centre update made from the explicit logits."""
    cfg = config(f"loss.centering={centering}", "heads.num_prototypes=64")
    generator = torch.Generator().manual_seed(0)
    # unit rows, as the head makes them (normalised bottleneck, weight-normalised prototypes): bounded logits
    features, prototypes = (torch.nn.functional.normalize(torch.randn(rows, 16, generator=generator), dim=1)
                            for rows in (13, 64))
    fused, explicit = Objective(cfg), Objective(cfg)
    for objective in (fused, explicit):
        objective.ibot_center.center.normal_(generator=torch.Generator().manual_seed(1))
    targets = fused.patch_targets(features, prototypes, 0.05)
    logits = features @ prototypes.T
    torch.testing.assert_close(targets.probs(), explicit.targets(logits, explicit.ibot_center, 0.05),
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fused.ibot_center.center, explicit.ibot_center.center, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [False, True])
def test_while_waiting_runs_once_with_the_step_queued_before_its_losses_are_read(fused: bool) -> None:
    """The loop's hook for preparing the next batch: called once, after the fused update and the
    EMA are queued (on the default path, before the update, which waits for the read), and the
    step's result is the one it has without the hook."""
    cfg = config()
    results, calls = [], []
    for hook in (None, lambda: calls.append(not torch.equal(student.backbone.blocks[0].attn.qkv.weight, before))):
        torch.manual_seed(0)
        student, teacher = build_networks(cfg)
        before = student.backbone.blocks[0].attn.qkv.weight.detach().clone()
        optimizer = torch.optim.AdamW(param_groups(student, cfg), fused=fused or None)
        torch.manual_seed(1)
        batch = make_batch(images(), 0, cfg, MultiCrop(cfg.crops))
        results.append(train_step(student, teacher, Objective(cfg), [batch], SCHED, optimizer, 3.0, while_waiting=hook))
    assert calls == [fused]  # the weights had moved when it ran on the fused path only
    assert results[0] == results[1]


@pytest.mark.parametrize("centering", ["softmax", "sinkhorn_knopp"])
@pytest.mark.parametrize("separate_head", [False, True])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_a_fused_step_reads_back_from_the_device_only_its_losses(centering: str, separate_head: bool,
                                                                   micro_batches: int) -> None:
    """The GPU path's step (fused AdamW) waits for the device once: nothing in the losses, the
    masking, the heads, the clipping, the update or the EMA reads a value back or sizes a tensor
    by values (each would drain the GPU's queue mid-step); the one read is the losses'."""
    cfg = config(f"loss.centering={centering}", f"heads.ibot_separate_head={separate_head}",
                 "heads.ibot_num_prototypes=48")
    torch.manual_seed(0)
    student, teacher = build_networks(cfg)
    optimizer = torch.optim.AdamW(param_groups(student, cfg), fused=True)
    batches = [make_batch(images(), step, cfg, MultiCrop(cfg.crops)) for step in range(micro_batches)]
    for _ in range(2):  # the first step makes the optimizer's state; both are checked
        with host_reads() as reads:
            train_step(student, teacher, Objective(cfg), batches, SCHED, optimizer, clip_grad=3.0)
        assert reads == ["tolist in trainer/engine.py:read"]


def test_the_read_counter_sees_a_value_read_and_a_boolean_index(monkeypatch) -> None:
    """The check above can fail: a loss term read as a float and a boolean mask's pick, slipped
    into the step, are reported where they happen (the pick's gradient in the backward too)."""
    real_terms = engine.loss_terms

    def reading(*args, **kwargs):
        terms = real_terms(*args, **kwargs)
        if float(terms["koleo"]) > -1:  # a value read
            both = torch.stack([terms["dino"], terms["ibot"]])
            terms["koleo"] = terms["koleo"] + both[both > 0].sum() * 0  # an output sized by values
        return terms

    monkeypatch.setattr(engine, "loss_terms", reading)
    cfg = config()
    student, teacher = build_networks(cfg)
    optimizer = torch.optim.AdamW(param_groups(student, cfg), fused=True)
    batch = make_batch(images(), 0, cfg, MultiCrop(cfg.crops))
    with host_reads() as reads:
        train_step(student, teacher, Objective(cfg), [batch], SCHED, optimizer, clip_grad=3.0)
    where = "tests/trainer/test_engine.py:reading"
    assert reads == [f"_local_scalar_dense in {where}", f"index in {where}",
                     "index_put in trainer/strategy.py:backward",  # the boolean index's gradient waits too
                     "tolist in trainer/engine.py:read"]


def test_an_evaluation_between_steps_leaves_the_training_draws_alone(tmp_path) -> None:
    """The loop draws the next step's crops before evaluating (they are prepared in the step's
    wait), so an evaluation that draws random numbers must not move the stream the next step's
    stochastic depth reads: a run evaluated every step ends where an unevaluated one does."""
    from trainer.data.datasets import collate_samples
    from trainer.engine import pretrain
    from trainer.models.hub import load_backbone

    def evaluate(backbone, step: int) -> dict[str, float]:
        return {"noise": torch.rand(1000).sum().item()}

    ends = []
    for name, every, fn in (("plain", 0, None), ("evaluated", 1, evaluate)):
        cfg = config(f"out={tmp_path / name}", "max_steps=3", f"eval.every_steps={every}", "model.drop_path_rate=0.3",
                     "data.max_bad_fraction=0.1")
        summary = pretrain(cfg, _RandomImages(), collate_samples, Storage(), evaluate=fn)
        ends.append(load_backbone(summary["backbone"], "safetensors").state_dict())
    for key, value in ends[0].items():
        torch.testing.assert_close(ends[1][key], value, rtol=0, atol=0, msg=key)


class _SpoilingImages(torch.utils.data.Dataset):
    """24 images; every one read after the first 16 (two batches of 8) is undecodable."""

    def __init__(self) -> None:
        self.reads = 0

    def __len__(self) -> int:
        return 24

    def __getitem__(self, index: int):
        from trainer.data.datasets import Sample

        self.reads += 1
        image = (torch.rand(3, 28, 28, generator=torch.Generator().manual_seed(index)) * 255).to(torch.uint8)
        return Sample(image=image if self.reads <= 16 else None, label=-1, key=f"img{index}")


def test_a_bad_next_batch_stops_the_run_after_this_steps_checkpoint(tmp_path) -> None:
    """Step 3's images are read while step 2 runs; they break the bad-image limit (judged from 300
    images on at 10 %: the loader skips batches all bad until then), and the run stops where a
    step-by-step loop would: with step 2 trained and checkpointed, its tally clean."""
    from trainer.data.datasets import collate_samples
    from trainer.engine import pretrain

    cfg = config(f"out={tmp_path / 'run'}", "max_steps=4", "checkpoint_every=1", "data.max_bad_fraction=0.1")
    with pytest.raises(ValueError, match="288 of 304 images"):
        pretrain(cfg, _SpoilingImages(), collate_samples, Storage())
    checkpoint = load_latest_checkpoint(Storage(), cfg.out)
    assert checkpoint["step"] == 2
    assert json.loads(checkpoint["bad_images"]) == {"seen": 16, "bad": 0, "fraction": 0.0, "examples": []}


def test_a_bad_next_batch_with_a_step_unread_reads_and_logs_it_first(tmp_path) -> None:
    """As above with the losses read late and no checkpoint due: step 2 is unread when step 3's
    images break the limit; it is read and logged before the error goes on, as a step-by-step loop
    would have, and the checkpoint is the one a step-by-step loop leaves (none here)."""
    from trainer.data.datasets import collate_samples
    from trainer.engine import pretrain

    metrics = Metrics()
    cfg = config(f"out={tmp_path / 'run'}", "max_steps=4", "checkpoint_every=10", "optim.fused_adamw=on",
                 "data.max_bad_fraction=0.1")
    with pytest.raises(ValueError, match="288 of 304 images"):
        pretrain(cfg, _SpoilingImages(), collate_samples, Storage(), tracker=metrics)
    assert sorted(metrics.steps) == [1, 2] and load_latest_checkpoint(Storage(), cfg.out) is None


def test_the_side_stream_option_trains_as_the_same_stream_does(tmp_path) -> None:
    """``data.side_stream`` moves the next batch's device work to a second CUDA stream and nothing
    else: the same draws in the same order. Off CUDA there is no second stream (the calls are plain),
    so here the two runs must end bitwise equal; the GPU check compares the streams' crops on a GPU
    (``benchmarks/gpu_correctness.py``: ``side_stream``)."""
    from trainer.batches import SideStream
    from trainer.data.datasets import collate_samples
    from trainer.engine import pretrain
    from trainer.models.hub import load_backbone

    side = SideStream(torch.device("cpu"), enabled=True)
    assert side.stream is None and side.run(lambda: 7) == 7
    ends = []
    for on in (False, True):
        cfg = config(f"out={tmp_path / str(on)}", "max_steps=3", "model.drop_path_rate=0.3", f"data.side_stream={on}",
                     "data.max_bad_fraction=0.1")
        summary = pretrain(cfg, _RandomImages(), collate_samples, Storage())
        ends.append(load_backbone(summary["backbone"], "safetensors").state_dict())
    for key, value in ends[0].items():
        torch.testing.assert_close(ends[1][key], value, rtol=0, atol=0, msg=key)


def test_the_lagged_loss_read_trains_logs_evaluates_and_saves_as_reading_each_step(tmp_path, monkeypatch) -> None:
    """``optim.lagged_loss_read`` (fused AdamW in one process) reads a step's losses while the next
    one runs, and changes nothing else: the same losses logged at the same steps, the evaluations
    and checkpoints at the same steps on the same weights, the same end, bitwise."""
    from trainer.data.datasets import collate_samples
    from trainer.engine import pretrain
    from trainer.models.hub import load_backbone

    saved: list[tuple[bool, int]] = []
    real_save = engine.save_checkpoint
    monkeypatch.setattr(engine, "save_checkpoint", lambda storage, out, data, step: (
        saved.append((out.endswith("True"), step)), real_save(storage, out, data, step))[1])
    real_terms, real_read, order = engine.loss_terms, engine.StepLosses.read, []
    monkeypatch.setattr(engine, "loss_terms", lambda *a, **k: (order.append("q"), real_terms(*a, **k))[1])
    monkeypatch.setattr(engine.StepLosses, "read", lambda self: (order.append("r"), real_read(self))[1])
    runs, orders = {}, {}
    for lagged in (False, True):
        metrics, order[:] = Metrics(), []

        def evaluate(backbone, step: int) -> dict[str, float]:
            return {"weights": float(sum(p.double().sum() for p in backbone.parameters()))}

        cfg = config(f"out={tmp_path / str(lagged)}", "max_steps=7", "checkpoint_every=3", "eval.every_steps=2",
                     "model.drop_path_rate=0.3", "optim.fused_adamw=on", f"optim.lagged_loss_read={lagged}",
                     "data.max_bad_fraction=0.1")
        summary = pretrain(cfg, _RandomImages(), collate_samples, Storage(), tracker=metrics, evaluate=evaluate)
        timed = ("images_per_second", "data_wait_share")
        runs[lagged] = ({step: {k: v for k, v in m.items() if k not in timed} for step, m in metrics.steps.items()},
                        [{k: v for k, v in h.items() if k != "train_minutes"} for h in summary["history"]],
                        summary["final"], load_backbone(summary["backbone"], "safetensors").state_dict())
        orders[lagged] = "".join(order)
    # queued (q) and read (r): steps 2, 3, 4, 6 and 7 are evaluated or saved, so read at once
    assert orders == {False: "qr" * 7, True: "qqrr" + "qr" * 2 + "qqrr" + "qr"}
    (logged, history, final, end), (lagged_logged, lagged_history, lagged_final, lagged_end) = runs[False], runs[True]
    assert sorted(logged) == list(range(1, 8)) and lagged_logged == logged
    assert [h["step"] for h in history] == [2, 4, 6] and lagged_history == history and lagged_final == final
    assert [step for lagged, step in saved if lagged] == [step for lagged, step in saved if not lagged] == [3, 6, 7]
    for key, value in end.items():
        torch.testing.assert_close(lagged_end[key], value, rtol=0, atol=0, msg=key)


def test_a_non_finite_step_read_late_leaves_every_weight_as_before_it() -> None:
    """A step queued after a non-finite one whose losses are not yet read is skipped on the device
    too, so reading them raises with the student as it was before both; without the carried flag
    the second step would have moved it."""
    from trainer.engine import queue_step

    cfg = config()
    moved = []
    for carried in (True, False):
        torch.manual_seed(0)
        student, teacher = build_networks(cfg)
        before = {name: p.detach().clone() for name, p in student.named_parameters()}
        optimizer = torch.optim.AdamW(param_groups(student, cfg), fused=True)
        spoiled = make_batch(images(), 0, cfg, MultiCrop(cfg.crops))
        spoiled.local_crops.fill_(float("nan"))  # the student's alone: the teacher's centres stay finite
        objective = Objective(cfg)
        first = queue_step(student, teacher, objective, [spoiled], SCHED, optimizer, 3.0)
        second = queue_step(student, teacher, objective, [make_batch(images(), 1, cfg, MultiCrop(cfg.crops))],
                            SCHED, optimizer, 3.0, after=first if carried else None)
        assert first.values is None and second.values is None  # queued, not read
        with pytest.raises(FloatingPointError, match="loss is nan"):
            first.read()
        assert math.isfinite(second.read()["total"])
        moved.append(not all(torch.equal(p, before[name]) for name, p in student.named_parameters()))
    assert moved == [False, True]


def test_a_non_finite_loss_read_late_names_its_step_and_leaves_the_last_checkpoint(tmp_path, monkeypatch) -> None:
    """In the loop the read comes a step late; the error names the step whose loss it was, and
    the checkpoint on disk is the last one before it."""
    from trainer.data.datasets import collate_samples
    from trainer.engine import pretrain

    real_terms, calls = engine.loss_terms, []

    def spoiled_third(*args, **kwargs):
        terms = real_terms(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            terms["dino"] = terms["dino"] * float("nan")
        return terms

    monkeypatch.setattr(engine, "loss_terms", spoiled_third)
    cfg = config(f"out={tmp_path / 'run'}", "max_steps=6", "checkpoint_every=2", "optim.fused_adamw=on",
                 "data.max_bad_fraction=0.1")
    with pytest.raises(FloatingPointError, match="^step 3: loss is nan"):
        pretrain(cfg, _RandomImages(), collate_samples, Storage())
    assert len(calls) == 4  # step 4 was queued (and skipped on the device) before step 3 was read
    assert load_latest_checkpoint(Storage(), cfg.out)["step"] == 2


def test_a_time_limit_with_a_step_unread_reads_counts_and_saves_it(tmp_path) -> None:
    """The time limit is judged on the steps read; the step queued when it is reached, unread
    then, is read, logged and saved with the rest: none of its work is lost."""
    from trainer.data.datasets import collate_samples
    from trainer.engine import pretrain

    metrics = Metrics()
    cfg = config(f"out={tmp_path / 'run'}", "max_steps=6", "max_minutes=0.000001", "optim.fused_adamw=on",
                 "data.max_bad_fraction=0.1")
    summary = pretrain(cfg, _RandomImages(), collate_samples, Storage(), tracker=metrics)
    # step 1 was unread when step 2 was queued (the clock still at 0), then the limit was past
    assert summary["stopped_early"] and summary["steps"] == 2 and sorted(metrics.steps) == [1, 2]
    assert load_latest_checkpoint(Storage(), cfg.out)["step"] == 2
