"""Distillation: frozen teacher, student learning, exact resume, export, and the CLI."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
import torch
import yaml
from typer.testing import CliRunner

from dinoflow.config import ConfigError, DistillConfig, PretrainConfig, load_config
from dinoflow.storage import Storage
from tests.trainer.host_reads import host_reads
from tests.trainer.test_engine import SCHED
from trainer.batches import CropBatch
from trainer.checkpoints import latest_checkpoint_uri, load_latest_checkpoint
from trainer.data.augment import MultiCrop
from trainer.data.datasets import collate_samples
from trainer.distill import (
    FeatureStudent,
    HeadlessNetwork,
    build_student,
    distill,
    distill_loss,
    distill_loss_terms,
    fingerprint,
    load_teacher,
)
from trainer.engine import Objective, build_backbone, pretrain
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
    cfg = load_config(PretrainConfig, "tiny", [f"data.uri={FASHION_MNIST}"])
    return build_dataset(cfg.data, cfg.crops, storage)


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


@pytest.mark.parametrize("objective", ["heads", "features"])
def test_teacher_frozen_and_student_learns(teacher_run: Path, tmp_path: Path, storage: Storage, dataset,
                                           objective: str) -> None:
    cfg = student_config(teacher_run, tmp_path / "run", "max_steps=12", f"distill.objective={objective}")
    teacher, objective_state = load_teacher(cfg, storage)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    saved = load_latest_checkpoint(storage, str(teacher_run))["teacher"]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    if objective == "features":  # the teacher's backbone alone: no heads, no centres
        assert isinstance(teacher, HeadlessNetwork) and objective_state is None
        saved = {k: v for k, v in saved.items() if k.startswith("backbone.")}
    assert set(before) == set(saved)
    for key, tensor in saved.items():  # the checkpoint's teacher network (heads included for `heads`)
        assert torch.equal(before[key], tensor), key
    hash_before = fingerprint(teacher)

    batch = fixed_batch(cfg, dataset)
    losses = Objective(cfg)
    if objective_state is not None:
        losses.load_state_dict(objective_state)

    def loss_of(student) -> float:
        with torch.no_grad():
            terms = distill_loss(student, teacher, copy.deepcopy(losses), batch, cfg, cfg.loss.teacher_temp)[1]
        return float(sum(v for k, v in terms.items() if k != "koleo"))

    torch.manual_seed(cfg.seed)
    teacher_dim = teacher.backbone.embed_dim
    initial = loss_of(build_student(cfg, teacher_dim)[0].eval())
    summary = distill(cfg, dataset, collate_samples, storage, teacher=(teacher, objective_state))
    assert summary["steps"] == 12 and summary["teacher_sha256"] == hash_before
    assert summary["objective"] == objective
    student = build_student(cfg, teacher_dim)[0]
    student.load_state_dict(load_latest_checkpoint(storage, cfg.out)["student"])
    trained = loss_of(student.eval())
    assert trained < initial - 0.05, (initial, trained)

    assert fingerprint(teacher) == hash_before
    for key, tensor in teacher.state_dict().items():
        assert torch.equal(tensor, before[key]), key
    assert fingerprint(load_teacher(cfg, storage)[0]) == hash_before  # the teacher's files are untouched


@pytest.mark.parametrize("objective", ["heads", "features"])
def test_a_fresh_student_starts_from_init_weights(teacher_run: Path, tmp_path: Path, storage: Storage, dataset,
                                                  objective: str) -> None:
    """``init_weights`` (here our safetensors) start the student and so its released EMA; before,
    distillation took the field from the pretraining config and ignored it."""
    cfg = student_config(teacher_run, tmp_path / "run", "max_steps=1", f"distill.objective={objective}",
                         f"init_weights={tmp_path / 'start.safetensors'}")
    torch.manual_seed(11)
    start = build_backbone(cfg, drop_path=False)
    with torch.no_grad():
        for parameter in start.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    save_backbone(start, str(tmp_path / "start.safetensors"))
    summary = distill(cfg, dataset, collate_samples, storage)
    released = load_backbone(summary["backbone"], "safetensors")
    torch.manual_seed(cfg.seed)
    random_init = build_student(cfg, 32)[1].backbone  # where the seed alone starts
    moved = max((v - start.state_dict()[k]).abs().max().item() for k, v in released.state_dict().items())
    apart = max((v - random_init.state_dict()[k]).abs().max().item() for k, v in released.state_dict().items())
    assert moved < 0.05 * apart, (moved, apart)


def test_no_masking_no_drop_path_and_all_patches(teacher_run: Path, tmp_path: Path, storage: Storage,
                                                 dataset) -> None:
    cfg = student_config(teacher_run, tmp_path, "model.drop_path_rate=0.3", "distill.objective=heads")
    student, student_ema = build_student(cfg)
    assert student.backbone.arch_kwargs["drop_path_rate"] == 0.0  # no stochastic depth, whatever the recipe
    assert all(not p.requires_grad for p in student_ema.parameters())
    teacher, _ = load_teacher(cfg, storage)
    batch = fixed_batch(cfg, dataset)
    objective = Objective(cfg)
    seen = []
    original = objective.ibot.forward

    def spy(features, prototypes, targets, masks, mask_index):
        seen.append((masks, mask_index))
        return original(features, prototypes, targets, masks, mask_index)

    objective.ibot.forward = spy
    distill_loss_terms(student, teacher, objective, batch, 0.04)
    grid = (cfg.crops.global_crop_size // cfg.model.patch_size) ** 2
    masks, index = seen[0]
    assert masks.shape == (2 * 16, grid) and bool(masks.all())
    assert torch.equal(index, torch.arange(2 * 16 * grid))


@pytest.mark.parametrize(("objective", "accumulation"), [("heads", 1), ("features", 2)])
def test_resume_is_exact_and_student_exports(teacher_run: Path, tmp_path: Path, storage: Storage, dataset,
                                             objective: str, accumulation: int) -> None:
    def config(out: Path, *extra: str) -> DistillConfig:
        return student_config(teacher_run, out, f"distill.objective={objective}",
                              f"optim.grad_accumulation={accumulation}", *extra)

    teacher = load_teacher(config(tmp_path), storage)
    whole = config(tmp_path / "whole", "max_steps=6")
    distill(whole, dataset, collate_samples, storage, teacher=teacher)
    split = tmp_path / "split"
    distill(config(split, "max_steps=3"), dataset, collate_samples, storage, teacher=teacher)
    distill(config(split, "max_steps=6"), dataset, collate_samples, storage, teacher=teacher)
    want, got = load_latest_checkpoint(storage, str(tmp_path / "whole")), load_latest_checkpoint(storage, str(split))
    assert got["step"] == want["step"] == 6
    assert got["images_seen"] == want["images_seen"] == 6 * 16 * accumulation
    for part in ("student", "teacher", "objective"):  # "teacher": the student EMA
        assert set(got[part]) == set(want[part]), part
        for key, tensor in want[part].items():
            torch.testing.assert_close(got[part][key], tensor, rtol=0, atol=0, msg=f"{part}.{key}")
    for key, tensor in want["optimizer"]["state"].items():  # AdamW moments too
        for name, value in tensor.items():
            torch.testing.assert_close(got["optimizer"]["state"][key][name], value, rtol=0, atol=0)

    other_teacher = copy.deepcopy(teacher[0])
    with torch.no_grad():
        other_teacher.backbone.cls_token.add_(1.0)
    with pytest.raises(ValueError, match="another teacher"):  # the teacher is not checkpointed: refuse a swap
        distill(config(split, "max_steps=7"), dataset, collate_samples, storage,
                teacher=(other_teacher, teacher[1]))
    other = "heads" if objective == "features" else "features"
    with pytest.raises(ValueError, match=f"distill.objective = '{other}' \\(the run: '{objective}'\\)"):
        distill(student_config(teacher_run, split, "max_steps=7", f"distill.objective={other}"), dataset,
                collate_samples, storage)

    # the released student is a plain backbone, whichever way it is read
    exported = load_backbone(str(tmp_path / "whole" / "backbone.safetensors"), "safetensors", storage)
    assert exported.embed_dim == 16
    for key, tensor in exported.state_dict().items():
        assert torch.equal(tensor, want["teacher"][f"backbone.{key}"]), key
    checkpoint_file = latest_checkpoint_uri(storage, str(tmp_path / "whole"))
    from_training = load_backbone(checkpoint_file, "training", storage, exported.arch_kwargs)
    images = torch.rand(3, 3, 28, 28)
    torch.testing.assert_close(from_training.eval()(images), exported.eval()(images), rtol=0, atol=0)


def test_micro_batches_step_as_their_union(teacher_run: Path, tmp_path: Path, storage: Storage, dataset) -> None:
    """``optim.grad_accumulation``: two micro-batches of 8 move the student as one batch of 16 (the
    feature losses are means over equal halves; KoLeo, which pairs images within a batch, off).
    Before, distillation took one micro-batch a step while its learning rate was scaled for all."""
    from trainer.distill import distill_step
    from trainer.optim import build_adamw

    cfg = student_config(teacher_run, tmp_path, "distill.objective=features", "loss.koleo_weight=0")
    teacher, _ = load_teacher(cfg, storage)
    whole = fixed_batch(cfg, dataset)
    halves = [CropBatch(whole.global_crops[:, part], whole.local_crops[:, part], whole.masks, whole.mask_index)
              for part in (slice(0, 8), slice(8, 16))]
    weights = []
    for micro_batches in ([whole], halves):
        torch.manual_seed(0)
        student, student_ema = build_student(cfg, teacher.backbone.embed_dim)
        optimizer = build_adamw(student, cfg, torch.device("cpu"))
        terms = distill_step(student, student_ema, teacher, Objective(cfg), micro_batches, SCHED, optimizer, cfg).read()
        assert set(terms) == {"cls", "patch", "koleo", "total"}
        weights.append(student.state_dict())
    for key, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][key], tensor, rtol=1e-5, atol=1e-6, msg=key)


def test_the_last_steps_distil_at_high_resolution(teacher_run: Path, tmp_path: Path, storage: Storage, dataset,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``crops.highres_steps``: the last steps' crops at the high-resolution sizes, as pretraining's
    (the engine's ``step_crops``); before, distillation kept the recipe's crops to the end."""
    import trainer.distill as distill_module

    sizes = []
    step_crops = distill_module.step_crops

    def recording(cfg, device):
        crop_of = step_crops(cfg, device)

        def crop(step: int):
            multi_crop = crop_of(step)
            sizes.append((step, multi_crop.crops.global_crop_size))
            return multi_crop
        return crop

    monkeypatch.setattr(distill_module, "step_crops", recording)
    cfg = student_config(teacher_run, tmp_path, "optim.epochs=1", "optim.epoch_length=3", "crops.highres_steps=1",
                         "crops.highres_global_crop_size=42", "crops.highres_local_crop_size=14")
    summary = distill(cfg, dataset, collate_samples, storage)
    assert summary["steps"] == 3 and sizes == [(0, 28), (1, 28), (2, 42)]


def test_features_runs_no_heads(teacher_run: Path, tmp_path: Path, storage: Storage, dataset,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = student_config(teacher_run, tmp_path, "distill.objective=features", "distill.patch_weight=0.5")
    teacher, _ = load_teacher(cfg, storage)
    assert [name for name, _ in teacher.named_children()] == ["backbone"]  # heads are not even loaded
    student, student_ema = build_student(cfg, teacher.backbone.embed_dim)
    assert isinstance(student, FeatureStudent) and isinstance(student_ema, HeadlessNetwork)
    assert [name for name, _ in student.named_children()] == ["backbone", "cls_projector", "patch_projector"]
    assert student.cls_projector.weight.shape == (32, 16)  # student width -> teacher width
    assert set(student_ema.state_dict()) == {f"backbone.{k}" for k in student.backbone.state_dict()}

    batch = fixed_batch(cfg, dataset)
    teacher_inputs = []
    original = teacher.backbone.forward_features_list
    monkeypatch.setattr(teacher.backbone, "forward_features_list",
                        lambda images, masks=None: teacher_inputs.append([x.shape for x in images])
                        or original(images, masks))
    loss, terms = distill_loss(student, teacher, Objective(cfg), batch, cfg, 0.04)
    assert teacher_inputs == [[(2 * 16, 3, 28, 28)]]  # the teacher sees the global crops only
    assert set(terms) == {"cls", "patch", "koleo"}
    torch.testing.assert_close(loss, terms["cls"] + 0.5 * terms["patch"] + cfg.loss.koleo_weight * terms["koleo"])
    loss.backward()
    no_gradient = [name for name, p in student.named_parameters() if p.grad is None]
    assert no_gradient == ["backbone.mask_token"]  # no masking in distillation; everything else learns
    with pytest.raises(TypeError, match="needs a FeatureStudent"):
        distill_loss(build_student(student_config(teacher_run, tmp_path, "distill.objective=heads"))[0], teacher,
                     Objective(cfg), batch, cfg, 0.04)


def test_features_teacher_from_backbone_file_and_from_a_features_run(teacher_run: Path, tmp_path: Path,
                                                                     storage: Storage, dataset) -> None:
    network, _ = load_teacher(student_config(teacher_run, tmp_path, "distill.objective=features"), storage)
    weights = tmp_path / "teacher.safetensors"
    save_backbone(network.backbone, str(weights), storage)
    cfg = student_config(weights, tmp_path / "run", "teacher.source=backbone", "distill.objective=features",
                         "max_steps=2")
    teacher, objective_state = load_teacher(cfg, storage)
    assert isinstance(teacher, HeadlessNetwork) and objective_state is None
    assert fingerprint(teacher) == fingerprint(network)  # no random heads: the same weights either way
    summary = distill(cfg, dataset, collate_samples, storage)
    assert summary["steps"] == 2 and summary["teacher_sha256"] == fingerprint(teacher)

    # a feature-distilled run teaches features (its EMA backbone), never heads (it has none)
    again = load_teacher(student_config(tmp_path / "run", tmp_path / "next", "distill.objective=features"), storage)[0]
    released = load_backbone(summary["backbone"], "safetensors", storage)
    assert again.backbone.state_dict().keys() == released.state_dict().keys()
    assert all(torch.equal(again.backbone.state_dict()[k], v) for k, v in released.state_dict().items())
    with pytest.raises(ValueError, match="has no DINO/iBOT heads"):
        load_teacher(student_config(tmp_path / "run", tmp_path / "next", "distill.objective=heads"), storage)


def test_the_teacher_source_is_found_from_the_path(teacher_run: Path, tmp_path: Path, storage: Storage,
                                                   dataset) -> None:
    """teacher.source auto (the default): a run folder is read as a checkpoint (heads and centres),
    weights as a backbone, in any layout: Meta's released .pth, a Hugging Face folder, safetensors
    (a backbone was read as safetensors only, and had to be named)."""
    from trainer.models.hf import export_hf
    from trainer.models.vit import build_vit

    from_run, centres = load_teacher(student_config(teacher_run, tmp_path, "distill.objective=heads"), storage)
    assert centres is not None and hasattr(from_run, "dino_head")  # the checkpoint's heads and centres
    backbone = load_teacher(student_config(teacher_run, tmp_path, "distill.objective=features"), storage)[0].backbone
    export_hf(backbone, tmp_path / "hf")
    save_backbone(backbone, str(tmp_path / "teacher.safetensors"), storage)
    torch.manual_seed(0)  # Meta's layout: heads of 64 channels (a .pth does not say)
    released = build_vit("vit_small", patch_size=7, embed_dim=64, depth=2, num_heads=1, img_size=28,
                         layerscale_init=1.0)
    torch.save(released.state_dict(), tmp_path / "dinov2_pretrain.pth")
    for uri, expected in (("hf", backbone), ("teacher.safetensors", backbone), ("dinov2_pretrain.pth", released)):
        teacher, centres = load_teacher(student_config(tmp_path / uri, tmp_path, "distill.objective=features"),
                                        storage)
        assert centres is None and isinstance(teacher, HeadlessNetwork), uri
        assert all(torch.equal(teacher.backbone.state_dict()[k], v) for k, v in expected.state_dict().items()), uri
    cfg = student_config(tmp_path / "dinov2_pretrain.pth", tmp_path / "run", "distill.objective=features",
                         "max_steps=2")
    summary = distill(cfg, dataset, collate_samples, storage)
    assert summary["steps"] == 2 and load_backbone(summary["backbone"], "safetensors").embed_dim == 16


@pytest.mark.parametrize(("override", "message"), [
    ("distill.objective=logits", "distill.objective = 'logits': Input should be 'heads' or 'features'"),
    ("distill.patch_weight=-1", "distill.patch_weight = '-1': Input should be greater than or equal to 0"),
    ("distill.centering=center", "distill.centering = 'center': Input should be 'sinkhorn_knopp' or 'softmax'"),
    ("distill.cls_weight=2", "unknown key 'distill.cls_weight' (allowed: objective, patch_weight, centering)"),
])
def test_bad_distill_values_fail_clearly(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(DistillConfig, "distill-tiny", [override])


def test_teacher_from_backbone_file(teacher_run: Path, tmp_path: Path, storage: Storage, dataset) -> None:
    network, _ = load_teacher(student_config(teacher_run, tmp_path, "distill.objective=heads"), storage)
    weights = tmp_path / "teacher.safetensors"
    save_backbone(network.backbone, str(weights), storage)
    cfg = student_config(weights, tmp_path / "run", "teacher.source=backbone", "max_steps=2", "distill.objective=heads")
    teacher, objective_state = load_teacher(cfg, storage)
    assert objective_state is None and teacher.dino_head.last_layer.weight_v.shape[0] == 64
    again, _ = load_teacher(cfg, storage)
    assert fingerprint(again) == fingerprint(teacher)  # the frozen random heads are fixed by the seed
    summary = distill(cfg, dataset, collate_samples, storage)
    assert summary["steps"] == 2 and summary["teacher_sha256"] == fingerprint(teacher)


def test_heads_must_match_the_teachers(teacher_run: Path, tmp_path: Path, storage: Storage) -> None:
    cfg = student_config(teacher_run, tmp_path, "heads.num_prototypes=32", "distill.objective=heads")
    with pytest.raises(ValueError, match="heads.num_prototypes = 32"):
        load_teacher(cfg, storage)
    load_teacher(student_config(teacher_run, tmp_path, "heads.num_prototypes=32"), storage)  # features: no heads


def test_cli_distills(teacher_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.cli import app

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["distill", "--teacher", str(teacher_run), "--student", "distill-tiny",
                                      f"out={out}", *STUDENT, "max_steps=2", "eval.train_limit=200",
                                      "eval.test_limit=50", "tracking.metric_every=1"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and "knn_top1_k20" in summary["final"]
    assert summary["objective"] == "features"  # the preset's default
    assert summary["tracking"]["dropped"] == 0 and summary["tracking"]["rejected"] == 0  # nothing lost on the way
    assert (out / "backbone.safetensors").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # the loss curves, drawn and logged
    assert (out / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "training_curves.png" in {a.path for a in client.list_artifacts(summary["mlflow_run_id"])}

    bad = CliRunner().invoke(app, ["distill", "--teacher", str(tmp_path / "nothing"), f"out={tmp_path / 'x'}"])
    assert bad.exit_code == 2 and bad.output == f"error: read {tmp_path / 'nothing'}: not found\n"
    named = CliRunner().invoke(app, ["distill", "--teacher", str(tmp_path / "nothing"), "--teacher-source",
                                     "checkpoint", f"out={tmp_path / 'x'}"])
    assert named.exit_code == 2 and "holds no checkpoints/latest.json (for backbone weights" in named.output


def test_the_lagged_loss_read_distils_as_reading_each_step(teacher_run: Path, tmp_path: Path, storage: Storage,
                                                           dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    """Distillation's loop reads its steps' losses as pretraining's does (``optim.lagged_loss_read``,
    fused AdamW): a step's losses while the next one runs, a checkpointed step's at once; the same
    losses logged, the same checkpoints, bitwise."""
    from tests.trainer.test_loader_wait import Metrics
    from trainer import distill as distill_module, engine

    real_loss, real_read, order = distill_module.distill_loss, engine.StepLosses.read, []
    monkeypatch.setattr(distill_module, "distill_loss", lambda *a, **k: (order.append("q"), real_loss(*a, **k))[1])
    monkeypatch.setattr(engine.StepLosses, "read", lambda self: (order.append("r"), real_read(self))[1])
    teacher = load_teacher(student_config(teacher_run, tmp_path), storage)
    runs = {}
    for lagged in (False, True):
        metrics, order[:] = Metrics(), []
        cfg = student_config(teacher_run, tmp_path / str(lagged), "max_steps=5", "checkpoint_every=3",
                             "optim.fused_adamw=on", f"optim.lagged_loss_read={lagged}")
        distill(cfg, dataset, collate_samples, storage, tracker=metrics, teacher=teacher)
        logged = {step: {k: v for k, v in m.items() if k not in ("images_per_second", "data_wait_share")}
                  for step, m in metrics.steps.items()}
        runs[lagged] = ("".join(order), logged, load_latest_checkpoint(storage, cfg.out))
    assert runs[False][0] == "qr" * 5 and runs[True][0] == "qqrqrr" + "qqrr"  # steps 3 and 5 saved: read at once
    assert sorted(runs[False][1]) == list(range(1, 6)) and runs[True][1] == runs[False][1]
    want, got = runs[False][2], runs[True][2]
    assert got["step"] == want["step"] == 5
    for part in ("student", "teacher", "objective"):
        for key, tensor in want[part].items():
            torch.testing.assert_close(got[part][key], tensor, rtol=0, atol=0, msg=f"{part}.{key}")


@pytest.mark.parametrize("fused", [False, True])
def test_a_non_finite_distillation_step_halts_with_the_student_unchanged(teacher_run: Path, tmp_path: Path,
                                                                        storage: Storage, dataset,
                                                                        fused: bool) -> None:
    """The distillation step ends as pretraining's (one read of the losses): a non-finite loss
    raises naming its terms, with the student as it was, read before the update or (fused AdamW)
    after the kernel skipped it; ``while_waiting`` still runs once, before the read."""
    from trainer.distill import distill_step
    from trainer.optim import build_adamw

    cfg = student_config(teacher_run, tmp_path, "distill.objective=heads", f"optim.fused_adamw={'on' if fused else 'off'}")
    teacher, _ = load_teacher(cfg, storage)
    student, student_ema = build_student(cfg)
    with torch.no_grad():
        student.dino_head.mlp[0].weight.fill_(float("nan"))
    before = copy.deepcopy(student.state_dict())
    optimizer = build_adamw(student, cfg, torch.device("cpu"))
    calls = []
    with pytest.raises(FloatingPointError, match=r"loss is nan \(\{'dino': nan"):
        distill_step(student, student_ema, teacher, Objective(cfg), [fixed_batch(cfg, dataset)], SCHED, optimizer, cfg,
                     while_waiting=lambda: calls.append(1)).read()
    assert calls == [1]
    for key, value in student.state_dict().items():
        assert torch.equal(value, before[key]) or key == "dino_head.mlp.0.weight", key
    if fused:  # the skipped step is not counted either
        assert all(float(state["step"]) == 0 for state in optimizer.state.values())


@pytest.mark.parametrize("objective", ["features", "heads"])
def test_a_fused_distillation_step_reads_back_from_the_device_only_its_losses(teacher_run: Path, tmp_path: Path,
                                                                               storage: Storage, dataset,
                                                                               objective: str) -> None:
    """As pretraining's step (``test_a_fused_step_reads_back_from_the_device_only_its_losses``):
    the teacher's targets, the student's losses, the update and the EMA wait for nothing; the
    losses are read once."""
    from trainer.distill import distill_step
    from trainer.optim import build_adamw

    cfg = student_config(teacher_run, tmp_path, f"distill.objective={objective}", "optim.fused_adamw=on")
    teacher, _ = load_teacher(cfg, storage)
    student, student_ema = build_student(cfg, teacher.backbone.embed_dim)
    optimizer = build_adamw(student, cfg, torch.device("cpu"))
    batch = fixed_batch(cfg, dataset)
    for _ in range(2):  # the first step makes the optimizer's state; both are checked
        with host_reads() as reads:
            distill_step(student, student_ema, teacher, Objective(cfg), [batch], SCHED, optimizer, cfg).read()
        assert reads == ["tolist in trainer/engine.py:read"]


def test_a_teachers_heads_beside_its_backbone_are_its_trained_heads(teacher_run: Path, tmp_path: Path,
                                                                   storage: Storage) -> None:
    """A pipeline's pretrain output holds backbone.safetensors and heads.safetensors, no checkpoints:
    read as a backbone, its teacher is the same network, heads and centres, as from the run folder."""
    from_run, centres = load_teacher(student_config(teacher_run, tmp_path, "distill.objective=heads"), storage)
    cfg = student_config(teacher_run / "backbone.safetensors", tmp_path, "teacher.source=backbone",
                         "distill.objective=heads")
    teacher, objective_state = load_teacher(cfg, storage)
    assert fingerprint(teacher) == fingerprint(from_run)
    assert objective_state.keys() == centres.keys()
    assert all(torch.equal(objective_state[k], v) for k, v in centres.items())
    with pytest.raises(ValueError, match="heads.num_prototypes = 32 but the teacher's heads have 64"):
        load_teacher(student_config(teacher_run / "backbone.safetensors", tmp_path, "teacher.source=backbone",
                                    "distill.objective=heads", "heads.num_prototypes=32"), storage)


def test_the_papers_vits14_distillation_preset_fits_a_vitg14_teachers_heads() -> None:
    """``distill-vits14``: a ViT-S/14 student whose heads take the ViT-g/14 recipe's targets (131k
    prototypes, a separate iBOT head), without stochastic depth, at the paper's lr and schedule."""
    from trainer.distill import _check_prototypes
    from trainer.schedules import total_steps

    student = load_config(DistillConfig, "distill-vits14")
    _check_prototypes(load_config(PretrainConfig, "vitg14").heads, student.heads)
    assert (student.model.arch, student.model.ffn_layer, student.model.drop_path_rate) == ("vit_small", "mlp", 0.0)
    assert student.distill.objective == "heads" and student.optim.base_lr == 1e-3
    assert total_steps(student.optim) == 625_000 and student.distill.centering == "sinkhorn_knopp"
    assert (student.loss.warmup_teacher_temp, student.loss.teacher_temp, student.loss.warmup_teacher_temp_epochs) == (
        0.04, 0.07, 30)


def test_the_teachers_targets_follow_distill_centering_not_the_student_recipes(teacher_run: Path, tmp_path: Path,
                                                                              storage: Storage, dataset) -> None:
    """A pretrain preset as the student's recipe (``tiny``: loss.centering=softmax) distils against
    Sinkhorn-Knopp targets, distill.centering's default (the original's): the centres are neither taken
    from the teacher nor moved. distill.centering=softmax starts them from the teacher's and moves them."""
    teacher_centres = load_latest_checkpoint(storage, str(teacher_run))["objective"]
    saved = {}
    for centering in ("sinkhorn_knopp", "softmax"):
        told = ["distill.centering=softmax"] if centering == "softmax" else []
        cfg = load_config(DistillConfig, "tiny", [f"teacher.uri={teacher_run}", f"out={tmp_path / centering}",
                                                 *STUDENT, "distill.objective=heads", "max_steps=1", *told])
        assert (cfg.loss.centering, cfg.distill.centering) == ("softmax", centering)
        distill(cfg, dataset, collate_samples, storage)
        saved[centering] = load_latest_checkpoint(storage, str(tmp_path / centering))["objective"]
    fresh = Objective(cfg).state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in saved["sinkhorn_knopp"].items())
    assert not any(torch.equal(v, fresh[k]) for k, v in teacher_centres.items())  # the teacher's had moved
    for name, centre in saved["softmax"].items():  # one step on from the teacher's: nearer it than the fresh one
        assert 0 < (centre - teacher_centres[name]).norm() < (centre - fresh[name]).norm()


def test_a_resume_keeps_how_the_targets_are_normalised(teacher_run: Path, tmp_path: Path, storage: Storage,
                                                        dataset) -> None:
    """distill.centering changed on a resume is refused, and so is a run saved before the setting
    existed (its targets normalised per loss.centering, softmax here) resumed under Sinkhorn-Knopp:
    its stored centres would go unread midway."""
    args = [f"teacher.uri={teacher_run}", f"out={tmp_path / 'run'}", *STUDENT, "distill.objective=heads"]
    distill(load_config(DistillConfig, "tiny", [*args, "max_steps=1"]), dataset, collate_samples, storage)
    with pytest.raises(ValueError, match=r"otherwise: distill.centering = 'softmax' \(the run: 'sinkhorn_knopp'\)"):
        distill(load_config(DistillConfig, "tiny", [*args, "max_steps=2", "distill.centering=softmax"]), dataset,
                collate_samples, storage)
    pointer = tmp_path / "run" / "checkpoints" / "step_000000001.pt"  # its config as written before the setting
    checkpoint = torch.load(pointer, weights_only=True)
    saved = yaml.safe_load(checkpoint["config"])
    del saved["distill"]["centering"]
    torch.save({**checkpoint, "config": yaml.safe_dump(saved)}, pointer)
    with pytest.raises(ValueError, match=r"distill.centering = 'sinkhorn_knopp' \(the run: 'softmax'\)"):
        distill(load_config(DistillConfig, "tiny", [*args, "max_steps=2"]), dataset, collate_samples, storage)
    assert distill(load_config(DistillConfig, "tiny", [*args, "max_steps=2", "distill.centering=softmax"]), dataset,
                   collate_samples, storage)["steps"] == 2


def test_a_training_dump_named_as_such_is_a_teacher_with_its_heads(teacher_run: Path, tmp_path: Path,
                                                                    storage: Storage, dataset) -> None:
    """teacher.source=training: a dump like the original's (``{"teacher": {"backbone.*", "dino_head.*",
    ...}}``, read once) gives the run's teacher network and heads, and distils; a dump is never found from
    its path (a .pth is Meta's released layout too), so auto refuses it."""
    from_run, _ = load_teacher(student_config(teacher_run, tmp_path, "distill.objective=heads"), storage)
    checkpoint = load_latest_checkpoint(storage, str(teacher_run))
    torch.save({"teacher": checkpoint["teacher"], "iteration": 7}, tmp_path / "training_dump.pth")
    dump = tmp_path / "training_dump.pth"
    teacher, centres = load_teacher(student_config(dump, tmp_path, "teacher.source=training",
                                                   "distill.objective=heads"), storage)
    assert fingerprint(teacher) == fingerprint(from_run) and centres is None  # a dump holds no centres
    headless, _ = load_teacher(student_config(dump, tmp_path, "teacher.source=training",
                                              "distill.objective=features"), storage)
    assert all(torch.equal(headless.backbone.state_dict()[k], v) for k, v in from_run.backbone.state_dict().items())
    with pytest.raises(ValueError, match="cannot infer the architecture"):
        load_teacher(student_config(dump, tmp_path, "distill.objective=heads"), storage)
    cfg = student_config(dump, tmp_path / "run", "teacher.source=training", "distill.objective=heads", "max_steps=2")
    assert distill(cfg, dataset, collate_samples, storage)["steps"] == 2


def test_a_distilled_runs_centres_are_not_its_student_emas(teacher_run: Path, tmp_path: Path, storage: Storage,
                                                          dataset) -> None:
    """A distill run as the teacher is its student EMA with its heads; the centres in its checkpoint
    followed its own teacher's outputs, so none are taken (as its heads.safetensors holds none)."""
    first = student_config(teacher_run, tmp_path / "first", "distill.objective=heads", "max_steps=2")
    distill(first, dataset, collate_samples, storage)
    teacher, centres = load_teacher(student_config(tmp_path / "first", tmp_path, "distill.objective=heads"), storage)
    assert centres is None and hasattr(teacher, "dino_head")
    _, pretrained_centres = load_teacher(student_config(teacher_run, tmp_path, "distill.objective=heads"), storage)
    assert pretrained_centres is not None  # a pretrain run's centres are its teacher's: still taken


def test_a_distilled_run_writes_its_students_heads_and_a_student_may_start_from_them(
        teacher_run: Path, tmp_path: Path, storage: Storage, dataset) -> None:
    from trainer.engine import start_from_weights
    from trainer.models.head_weights import find_heads

    summary = distill(student_config(teacher_run, tmp_path / "run", "distill.objective=heads", "max_steps=2"),
                      dataset, collate_samples, storage)
    ema = load_latest_checkpoint(storage, str(tmp_path / "run"))["teacher"]  # the reference: the EMA's checkpoint
    saved = find_heads(str(tmp_path / "run"), "auto", storage)
    assert summary["heads"] == saved.uri and saved.centres == {}  # the teacher's centres are not the student's
    assert saved.heads.keys() == {k for k in ema if not k.startswith("backbone.")}
    assert all(torch.equal(v, ema[k]) for k, v in saved.heads.items())
    # the paper's fresh student heads by default; init_heads=auto continues from the saved ones
    for init_heads, expected in (("fresh", ""), ("auto", saved.uri)):
        told = [f"init_heads={init_heads}"] if init_heads == "auto" else []
        cfg = student_config(teacher_run, tmp_path / "next", "distill.objective=heads",
                             f"init_weights={tmp_path / 'run'}", *told)
        assert cfg.init_heads == init_heads
        student = build_student(cfg)[0]
        assert start_from_weights(cfg, student, None, storage) == expected
        same = [torch.equal(v, student.state_dict()[k]) for k, v in saved.heads.items()]
        assert all(same) if init_heads == "auto" else not any(same)
    features = distill(student_config(teacher_run, tmp_path / "features", "distill.objective=features",
                                      "max_steps=1"), dataset, collate_samples, storage)
    assert "heads" not in features and not (tmp_path / "features" / "heads.safetensors").exists()
