"""Distillation: frozen teacher, student learning, exact resume, export, and the CLI."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dinoflow.config import DistillConfig, PretrainConfig, load_config
from dinoflow.storage import Storage
from trainer.data.augment import MultiCrop
from trainer.data.datasets import collate_samples
from trainer.distill import (
    build_student,
    distill,
    distill_loss_terms,
    fingerprint,
    load_teacher,
)
from trainer.engine import CropBatch, Objective, load_latest_checkpoint, pretrain
from trainer.models.hub import load_backbone, save_backbone
from trainer.run import build_dataset

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
HEADS = ["heads.num_prototypes=64", "heads.hidden_dim=64", "heads.bottleneck_dim=16"]
TEACHER = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "optim.batch_size=16", "max_steps=3",
           "crops.num_local_crops=2", f"data.uri={FASHION_MNIST}", "eval.every_steps=0", *HEADS]
STUDENT = ["model.embed_dim=16", "model.depth=2", "model.num_heads=2", "optim.batch_size=16",
           "optim.epoch_length=10", "optim.epochs=3", "optim.warmup_epochs=0", "optim.base_lr=0.02",
           "optim.freeze_last_layer_epochs=0", "crops.num_local_crops=2", "checkpoint_every=3",
           f"data.uri={FASHION_MNIST}", "eval.every_steps=0", "seed=5", *HEADS]

pytestmark = pytest.mark.skipif(not Path(FASHION_MNIST).is_dir(), reason="Fashion-MNIST is not installed")


@pytest.fixture(scope="module")
def storage() -> Storage:
    return Storage()


@pytest.fixture(scope="module")
def dataset(storage: Storage) -> torch.utils.data.Dataset:
    return build_dataset(load_config(PretrainConfig, "tiny", [f"data.uri={FASHION_MNIST}"]).data, 28, storage)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory: pytest.TempPathFactory, storage: Storage, dataset) -> Path:
    """A (barely) pretrained 32-d teacher run folder."""
    out = tmp_path_factory.mktemp("teacher")
    cfg = load_config(PretrainConfig, "tiny", [*TEACHER, f"out={out}"])
    pretrain(cfg, dataset, collate_samples, storage)
    return out


def student_config(teacher: Path, out: Path, *extra: str) -> DistillConfig:
    return load_config(DistillConfig, "distill-tiny", [f"teacher.uri={teacher}", f"out={out}", *STUDENT, *extra])


def fixed_batch(cfg: DistillConfig, dataset) -> CropBatch:
    torch.manual_seed(0)
    images = collate_samples([dataset[i] for i in range(16)]).images
    global_crops, local_crops = MultiCrop(cfg.crops)(images)
    return CropBatch(global_crops, local_crops, torch.zeros(0, dtype=torch.bool))


def test_teacher_frozen_and_student_learns(teacher_run: Path, tmp_path: Path, storage: Storage, dataset) -> None:
    cfg = student_config(teacher_run, tmp_path / "run", "max_steps=12")
    teacher, objective_state = load_teacher(cfg, storage)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    saved = load_latest_checkpoint(storage, str(teacher_run))["teacher"]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    for key, tensor in saved.items():  # the checkpoint's teacher network, heads included
        assert torch.equal(before[key], tensor), key
    hash_before = fingerprint(teacher)

    batch = fixed_batch(cfg, dataset)
    objective = Objective(cfg)
    objective.load_state_dict(objective_state)

    def loss_of(student) -> float:
        with torch.no_grad():
            terms = distill_loss_terms(student, teacher, copy.deepcopy(objective), batch, cfg.loss.teacher_temp)
        return float(terms["dino"] + terms["ibot"])

    torch.manual_seed(cfg.seed)
    initial = loss_of(build_student(cfg)[0].eval())
    summary = distill(cfg, dataset, collate_samples, storage, teacher=(teacher, objective_state))
    assert summary["steps"] == 12 and summary["teacher_sha256"] == hash_before
    student = build_student(cfg)[0]
    student.load_state_dict(load_latest_checkpoint(storage, cfg.out)["student"])
    trained = loss_of(student.eval())
    assert trained < initial - 0.05, (initial, trained)

    assert fingerprint(teacher) == hash_before
    for key, tensor in teacher.state_dict().items():
        assert torch.equal(tensor, before[key]), key
    assert fingerprint(load_teacher(cfg, storage)[0]) == hash_before  # the teacher's files are untouched


def test_no_masking_no_drop_path_and_all_patches(teacher_run: Path, tmp_path: Path, storage: Storage,
                                                 dataset) -> None:
    cfg = student_config(teacher_run, tmp_path, "model.drop_path_rate=0.3")
    student, student_ema = build_student(cfg)
    assert student.backbone.arch_kwargs["drop_path_rate"] == 0.0  # no stochastic depth, whatever the recipe
    assert all(not p.requires_grad for p in student_ema.parameters())
    teacher, _ = load_teacher(cfg, storage)
    batch = fixed_batch(cfg, dataset)
    objective = Objective(cfg)
    seen = []
    original = objective.ibot.forward

    def spy(student_logits, teacher_probs, masks):
        seen.append(masks)
        return original(student_logits, teacher_probs, masks)

    objective.ibot.forward = spy
    distill_loss_terms(student, teacher, objective, batch, 0.04)
    grid = (cfg.crops.global_crop_size // cfg.model.patch_size) ** 2
    assert seen[0].shape == (2 * 16, grid) and bool(seen[0].all())


def test_resume_is_exact_and_student_exports(teacher_run: Path, tmp_path: Path, storage: Storage, dataset) -> None:
    teacher = load_teacher(student_config(teacher_run, tmp_path), storage)
    whole = student_config(teacher_run, tmp_path / "whole", "max_steps=6")
    distill(whole, dataset, collate_samples, storage, teacher=teacher)
    split = tmp_path / "split"
    distill(student_config(teacher_run, split, "max_steps=3"), dataset, collate_samples, storage, teacher=teacher)
    distill(student_config(teacher_run, split, "max_steps=6"), dataset, collate_samples, storage, teacher=teacher)
    want, got = load_latest_checkpoint(storage, str(tmp_path / "whole")), load_latest_checkpoint(storage, str(split))
    assert got["step"] == want["step"] == 6
    for part in ("student", "teacher", "objective"):  # "teacher": the student EMA
        for key, tensor in want[part].items():
            torch.testing.assert_close(got[part][key], tensor, rtol=0, atol=0, msg=f"{part}.{key}")

    other_teacher = copy.deepcopy(teacher[0])
    with torch.no_grad():
        other_teacher.backbone.cls_token.add_(1.0)
    with pytest.raises(ValueError, match="another teacher"):  # the teacher is not checkpointed: refuse a swap
        distill(student_config(teacher_run, split, "max_steps=7"), dataset, collate_samples, storage,
                teacher=(other_teacher, teacher[1]))

    exported = load_backbone(str(tmp_path / "whole" / "backbone.safetensors"), "safetensors", storage)
    assert exported.embed_dim == 16
    for key, tensor in exported.state_dict().items():
        assert torch.equal(tensor, want["teacher"][f"backbone.{key}"]), key


def test_teacher_from_backbone_file(teacher_run: Path, tmp_path: Path, storage: Storage, dataset) -> None:
    network, _ = load_teacher(student_config(teacher_run, tmp_path), storage)
    weights = tmp_path / "teacher.safetensors"
    save_backbone(network.backbone, str(weights), storage)
    cfg = student_config(weights, tmp_path / "run", "teacher.source=backbone", "max_steps=2")
    teacher, objective_state = load_teacher(cfg, storage)
    assert objective_state is None and teacher.dino_head.last_layer.weight_v.shape[0] == 64
    again, _ = load_teacher(cfg, storage)
    assert fingerprint(again) == fingerprint(teacher)  # the frozen random heads are fixed by the seed
    summary = distill(cfg, dataset, collate_samples, storage)
    assert summary["steps"] == 2 and summary["teacher_sha256"] == fingerprint(teacher)


def test_heads_must_match_the_teachers(teacher_run: Path, tmp_path: Path, storage: Storage) -> None:
    cfg = student_config(teacher_run, tmp_path, "heads.num_prototypes=32")
    with pytest.raises(ValueError, match="heads.num_prototypes = 32"):
        load_teacher(cfg, storage)


def test_cli_distills(teacher_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.cli import app

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["distill", "--teacher", str(teacher_run), "--student", "distill-tiny",
                                      f"out={out}", *STUDENT, "max_steps=2", "eval.train_limit=200",
                                      "eval.test_limit=50"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and "knn_top1_k20" in summary["final"]
    assert (out / "backbone.safetensors").exists()

    bad = CliRunner().invoke(app, ["distill", "--teacher", str(tmp_path / "nothing"), f"out={tmp_path / 'x'}"])
    assert bad.exit_code == 2 and "holds no checkpoints" in bad.output
