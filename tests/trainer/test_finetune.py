"""Supervised fine-tuning (trainer/finetune.py): its loss, mixing and layer-wise decay against
formulas and torch, and whole runs on Fashion-MNIST and class folders: they learn, resume
exactly, write weights that reproduce their scores, and refuse bad input by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

from dinoflow.config import ConfigError, FinetuneAugmentConfig, FinetuneConfig, load_config
from dinoflow.storage import Storage
from evaluators.classification import labelled_images
from evaluators.features import to_model_input
from pipelines.cli import app
from trainer.data.fashion_mnist import load_split
from dinoflow.run_files import CLASSIFIER_FILE
from trainer.finetune import (ema_decay_at, finetune, held_out_rows, load_for_finetuning, mix, pick_weights,
                              soft_cross_entropy, soft_targets, train_labels, training_images, validation_images)
from trainer.models.classifier import Classifier, read_classifier
from trainer.models.hub import load_backbone, save_backbone
from trainer.models.vit import build_vit
from trainer.optim import layer_groups

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
needs_fashion_mnist = pytest.mark.skipif(not Path(FASHION_MNIST).is_dir(), reason="Fashion-MNIST is not installed")


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    """A small random backbone (patch 7, 28 px) as a pretraining run writes one."""
    torch.manual_seed(0)
    path = tmp_path / "pretrained" / "backbone.safetensors"
    path.parent.mkdir()
    save_backbone(build_vit("vit_small", img_size=28, patch_size=7, embed_dim=64, depth=3, num_heads=4,
                            layerscale_init=1.0), str(path))
    return path


def config(weights: Path, out: Path, *overrides: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, "finetune-tiny", [f"weights={weights}", f"out={out}", "data.train_limit=512",
                                                         "data.test_limit=200", "optim.batch_size=64",
                                                         "optim.epochs=1", *overrides])


def test_soft_cross_entropy_of_smoothed_one_hot_targets_is_torchs_label_smoothing() -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(32, 7) * 3, torch.randint(0, 7, (32,))
    for eps in (0.0, 0.1, 0.4):
        ours = soft_cross_entropy(logits, soft_targets(labels, 7, eps))
        torch.testing.assert_close(ours, F.cross_entropy(logits, labels, label_smoothing=eps))


def test_mixup_mixes_images_and_targets_with_one_weight() -> None:
    torch.manual_seed(1)
    images, labels = torch.randn(6, 3, 8, 8), torch.arange(6)
    targets = soft_targets(labels, 6, 0.0)
    mixed, mixed_targets = mix(images, targets, FinetuneAugmentConfig(mixup_alpha=0.8, cutmix_alpha=0.0))
    lam = float(mixed_targets[0, 0])  # image 0's own class keeps lam, its partner's (5) gets 1 - lam
    assert 0 < lam < 1 and float(mixed_targets[0, 5]) == pytest.approx(1 - lam)
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.flip(0))
    torch.testing.assert_close(mixed_targets.sum(1), torch.ones(6))


def test_cutmix_targets_weigh_each_image_by_its_share_of_pixels() -> None:
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 16, 16).clone()  # image i: every pixel = i
    targets = soft_targets(torch.arange(4), 4, 0.0)
    for seed in range(20):
        torch.manual_seed(seed)
        mixed, mixed_targets = mix(images, targets, FinetuneAugmentConfig(mixup_alpha=0.0, cutmix_alpha=1.0))
        for i in range(4):
            pasted = float((mixed[i] == 3 - i).float().mean())  # the partner (the batch reversed) is 3 - i
            assert float(mixed_targets[i, 3 - i]) == pytest.approx(pasted)
            assert float(mixed_targets[i, i]) == pytest.approx(1 - pasted)


def test_no_mixing_when_its_probability_is_zero_or_both_are_off() -> None:
    images, targets = torch.randn(4, 3, 8, 8), soft_targets(torch.arange(4), 4, 0.1)
    for augment in (FinetuneAugmentConfig(mix_probability=0.0), FinetuneAugmentConfig(mixup_alpha=0, cutmix_alpha=0)):
        mixed, same = mix(images, targets, augment)
        assert mixed is images and same is targets


def test_layer_groups_decay_each_block_below_the_head() -> None:
    backbone = build_vit("vit_small", img_size=28, patch_size=7, embed_dim=32, depth=4, num_heads=2)
    model = Classifier(backbone, 5, "cls")
    groups = layer_groups(model, 0.5, 0.2)
    of = {id(p): (g["lr_multiplier"], g["wd_multiplier"]) for g in groups for p in g["params"]}
    for name, parameter in model.named_parameters():
        if name.startswith("backbone.blocks."):
            expected = 0.5 ** (4 - int(name.split(".")[2]))  # block i of 4: decay^(4 - i)
        elif name.startswith(("backbone.cls_token", "backbone.pos_embed", "backbone.mask_token")):
            expected = 0.5 ** 5
        elif name.startswith("backbone.patch_embed"):
            expected = 0.5 ** 5 * 0.2
        else:  # the final norm and the classifier
            expected = 1.0
        decayed = 0.0 if name.endswith(".bias") or "norm" in name or "gamma" in name else 1.0
        assert of[id(parameter)] == pytest.approx((expected, decayed)), name


def test_the_backbone_is_built_for_the_crop_with_drop_path_rising_over_the_blocks(weights: Path) -> None:
    cfg = load_config(FinetuneConfig, None, [f"weights={weights.parent}", "image_size=56", "drop_path_rate=0.2"])
    backbone = load_for_finetuning(cfg, Storage())
    assert backbone.pos_embed.shape[1] == 1 + 8 * 8
    assert [block.drop_path for block in backbone.blocks] == pytest.approx([0.0, 0.1, 0.2])
    original = load_backbone(str(weights), "safetensors")
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():  # at 56 px the resized table computes what the saved model's own interpolation does
        torch.testing.assert_close(backbone.eval()(images), original(images), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="image_size = 30 is not a multiple of the backbone's patch size 7"):
        load_for_finetuning(cfg.model_copy(update={"image_size": 30}), Storage())
    with pytest.raises(ValueError, match="weights is empty"):
        load_for_finetuning(cfg.model_copy(update={"weights": ""}), Storage())


@needs_fashion_mnist
def test_a_run_learns_writes_weights_that_reproduce_its_score_and_resumes_exactly(weights: Path,
                                                                                  tmp_path: Path) -> None:
    regularised = ["augment.mixup_alpha=0.8", "augment.cutmix_alpha=1.0", "augment.random_erasing=0.25",
                   "augment.crop_scale=[0.5,1.0]", "eval_every_epochs=0.5"]
    straight = finetune(config(weights, tmp_path / "straight", *regularised), Storage())
    assert straight["steps"] == 8 and [row["step"] for row in straight["history"]] == [4, 8]
    # halted after 4 steps, then resumed from its checkpoint: every weight as the straight run's
    finetune(config(weights, tmp_path / "resumed", *regularised, "max_steps=4"), Storage())
    resumed = finetune(config(weights, tmp_path / "resumed", *regularised), Storage())
    assert resumed["steps"] == 8
    for file in ("backbone.safetensors", CLASSIFIER_FILE):
        ours, theirs = (load_file(tmp_path / run / file) for run in ("straight", "resumed"))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), file

    learned = finetune(config(weights, tmp_path / "learned", "data.train_limit=2048", "optim.epochs=2",
                              "optim.base_lr=8e-3", "optim.layerwise_decay=1.0"), Storage())
    # a random backbone (a plain supervised loop reaches 0.46-0.55 here); 10 classes: chance is 0.1
    assert learned["final"]["top1"] > 0.3, learned["history"]
    # the files written score what the run reported, read back through the backbone loader
    backbone = load_backbone(str(tmp_path / "learned" / "backbone.safetensors"), "safetensors")
    head, classes, head_input = read_classifier(str(tmp_path / "learned" / CLASSIFIER_FILE), Storage())
    assert classes == tuple(learned["classes"]) and len(classes) == 10 and head_input == "cls+avgpool"
    test = load_split(Storage(), FASHION_MNIST, "test")
    with torch.no_grad():
        out = backbone.forward_features(to_model_input(torch.from_numpy(test.images[:200]), patch_size=7))
        features = torch.cat([out["x_norm_clstoken"], out["x_norm_patchtokens"].mean(1)], dim=1)
        predicted = (features @ head["head.weight"].T + head["head.bias"]).argmax(1).numpy()
    assert float(np.mean(predicted == test.labels[:200])) == pytest.approx(learned["final"]["top1"], abs=1e-6)
    for picture in ("confusion_matrix.png", "training_curves.png"):
        assert (tmp_path / "learned" / picture).stat().st_size > 1000
    assert json.loads((tmp_path / "learned" / "summary.json").read_text())["final"] == learned["final"]


@needs_fashion_mnist
def test_two_accumulated_micro_batches_step_as_one_batch_of_both(weights: Path, tmp_path: Path) -> None:
    """The same 64 images a step (the seeded order's first 64), as one batch or as 2 x 32 accumulated:
    the same weights after 3 steps (the augmentation off, so both see the same pixels)."""
    still = ["augment.crop_scale=[1,1]", "augment.horizontal_flip=false", "augment.random_erasing=0",
             "augment.mixup_alpha=0", "augment.cutmix_alpha=0", "drop_path_rate=0", "max_steps=3"]
    one = finetune(config(weights, tmp_path / "one", *still), Storage())
    two = finetune(config(weights, tmp_path / "two", *still, "optim.batch_size=32", "optim.grad_accumulation=2"),
                   Storage())
    assert one["images_seen"] == two["images_seen"] == 192
    ours, theirs = (load_file(tmp_path / run / "backbone.safetensors") for run in ("one", "two"))
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5, msg=name)
    with pytest.raises(ValueError, match=r"fewer than one step's 1024 \(optim.batch_size = 64 x "
                                         r"optim.grad_accumulation = 16\)"):
        finetune(config(weights, tmp_path / "big", "optim.grad_accumulation=16"), Storage())


@needs_fashion_mnist
def test_two_ranks_fine_tune_like_one_process_and_a_run_resumes_at_another_world_size(weights: Path,
                                                                                     tmp_path: Path) -> None:
    """``dinoflow finetune --nproc 2``: 2 ranks of 32 images (FSDP2 over gloo, real processes; and
    DeepSpeed ZeRO-3) step as one process of 64 (the augmentation off: all see the same pixels),
    their EMAs (kept on each rank's shards or partitions) alike; 2-rank runs stopped after 2 steps
    (FSDP2, ZeRO-3) go on in one process to the same weights and EMA."""
    import os
    import subprocess
    import sys

    from tests.trainer.test_distributed import ROOT

    still = ["augment.crop_scale=[1,1]", "augment.horizontal_flip=false", "augment.random_erasing=0",
             "augment.mixup_alpha=0", "augment.cutmix_alpha=0", "drop_path_rate=0", "ema_decay=0.6"]
    one = finetune(config(weights, tmp_path / "one", *still, "max_steps=3"), Storage())
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    env.pop("RANK", None)

    def two_ranks(out: str, steps: int, *extra: str) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [sys.executable, "-m", "pipelines.cli", "finetune", "--nproc", "2", "--weights", str(weights),
             f"out={tmp_path / out}", "data.train_limit=512", "data.test_limit=200", "optim.epochs=1",
             "optim.batch_size=32", *still, f"max_steps={steps}", *extra],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        return done

    done = two_ranks("two", 3)
    assert "--nproc_per_node 2" in done.stderr and "distributed.strategy=fsdp2" in done.stderr
    assert done.stdout.count('"images_seen"') == 1  # rank 0 alone reports
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert (two["steps"], two["images_seen"]) == (3, 192) == (one["steps"], one["images_seen"])
    assert two["final"]["top1"] == pytest.approx(one["final"]["top1"], abs=0.011)  # 200 images: 2 may flip
    two_ranks("mixed", 2)
    finetune(config(weights, tmp_path / "mixed", *still, "max_steps=3"), Storage())  # one process of 64 now
    two_ranks("zero3", 2, "distributed.strategy=deepspeed")  # its checkpoint goes on in one process too
    zero3 = torch.load(tmp_path / "zero3" / "checkpoints" / "step_000000002.pt", weights_only=True)
    assert "strategy: deepspeed" in zero3["config"]
    finetune(config(weights, tmp_path / "zero3", *still, "max_steps=3"), Storage())
    ours = torch.load(tmp_path / "one" / "checkpoints" / "step_000000003.pt", weights_only=True)
    for run in ("two", "mixed", "zero3"):
        theirs = torch.load(tmp_path / run / "checkpoints" / "step_000000003.pt", weights_only=True)
        for kind in ("model", "ema"):
            for name, value in ours[kind].items():
                torch.testing.assert_close(theirs[kind][name], value, rtol=1e-4, atol=1e-5, msg=f"{run} {kind} {name}")
        assert not torch.equal(theirs["ema"]["head.weight"], theirs["model"]["head.weight"])


@needs_fashion_mnist
def test_a_run_resumed_with_other_settings_is_refused_naming_them(weights: Path, tmp_path: Path) -> None:
    finetune(config(weights, tmp_path / "run", "max_steps=1"), Storage())
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    with pytest.raises(ValueError, match=r"image_size = 56 \(the run: 28\); head_input = 'cls' \(the run: "
                                         r"'cls\+avgpool'\); data.val_fraction = 0.25 \(the run: 0.0\); resume it "
                                         r"with its settings or use a new out"):
        finetune(config(weights, tmp_path / "run", "image_size=56", "head_input=cls", "data.val_fraction=0.25"),
                 Storage())
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before


def test_the_weights_picked_are_the_first_of_the_highest_top1_the_weights_before_their_ema() -> None:
    rows = [{"step": 2, "top1": 0.5, "ema_top1": 0.6, "ema_top5": 0.9},
            {"step": 4, "top1": 0.7, "top5": 0.95, "ema_top1": 0.7},
            {"step": 6, "top1": 0.4, "ema_top1": 0.7}]
    assert pick_weights(rows, "test") == (4, "weights", {"top1": 0.7, "top5": 0.95})
    assert pick_weights(rows[:1], "test") == (2, "ema", {"top1": 0.6, "top5": 0.9})
    assert pick_weights([{"step": 1, "top1": 0.2}, {"step": 3, "top1": 0.3}], "test") == (3, "weights", {"top1": 0.3})
    with pytest.raises(ValueError, match="no evaluation holds a top1"):
        pick_weights([{"step": 1}], "test")


def test_with_held_out_images_the_pick_is_on_their_top1_not_on_tests() -> None:
    """Rows where the splits disagree: on test the last step's EMA wins, on the held-out images the
    first step's EMA; the scores handed back are the pick's on both splits."""
    rows = [{"step": 2, "top1": 0.8, "val_top1": 0.5, "ema_top1": 0.6, "ema_val_top1": 0.7},
            {"step": 4, "top1": 0.7, "val_top1": 0.6, "ema_top1": 0.9, "ema_val_top1": 0.55, "ema_val_top5": 0.9}]
    assert pick_weights(rows, "test") == (4, "ema", {"top1": 0.9, "val_top1": 0.55, "val_top5": 0.9})
    assert pick_weights(rows, "val") == (2, "ema", {"top1": 0.6, "val_top1": 0.7})
    assert pick_weights(rows[1:], "val") == (4, "weights", {"top1": 0.7, "val_top1": 0.6})  # the EMA's 0.55 is lower
    with pytest.raises(ValueError, match="no evaluation holds a val_top1 to pick weights by"):
        pick_weights([{"step": 1, "top1": 0.5, "ema_top1": 0.6}], "val")


def test_the_held_out_rows_are_each_classs_share_drawn_from_the_seed() -> None:
    """Unbalanced classes (1 to 120 images): each class gives ``round(fraction x n_c)``, within half
    an image of its share; the same seed draws the same rows, another seed others."""
    counts = {0: 120, 1: 37, 2: 7, 3: 3, 4: 1}
    labels = np.random.default_rng(5).permutation(np.repeat(list(counts), list(counts.values())))
    for fraction in (0.1, 0.25, 0.49):
        held = held_out_rows(labels, fraction, seed=3)
        assert np.array_equal(held, np.unique(held))  # sorted, each row once
        for label, count in counts.items():
            assert abs(int(np.sum(labels[held] == label)) - fraction * count) <= 0.5, (fraction, label)
        assert np.array_equal(held, held_out_rows(labels, fraction, seed=3))
        assert not np.array_equal(held, held_out_rows(labels, fraction, seed=4))
    assert len(held_out_rows(labels, 0.0, seed=3)) == 0


@needs_fashion_mnist
def test_the_held_out_images_are_never_trained_on_and_scored_as_the_test_images_are(weights: Path,
                                                                                  tmp_path: Path) -> None:
    """Fashion-MNIST and class folders: the trained rows and the held-out ones split the train
    split between them, and the held-out ones are what :func:`score` reads as a test split."""
    from tests.evaluators.test_classification import write_folders

    write_folders(tmp_path / "data", {"cat": (24, 4), "dog": (10, 4), "fish": (5, 4)})
    for uri, limit in ((FASHION_MNIST, 512), (str(tmp_path / "data"), 0)):
        cfg = config(weights, tmp_path / "run", f"data.uri={uri}", f"data.train_limit={limit}",
                     "data.val_fraction=0.2")
        images = labelled_images(cfg.data.uri, "auto", Storage(), cfg.data.train_limit, image_size=cfg.image_size)
        labels = train_labels(images)
        held = held_out_rows(labels, cfg.data.val_fraction, cfg.seed)
        train = training_images(images, cfg, Storage(), held)
        validation = validation_images(images, held)
        if uri == FASHION_MNIST:  # rows of Fashion-MNIST's train file
            held_indices, everything = held.tolist(), list(range(512))
            assert torch.equal(validation.test, images.train[held]) and torch.equal(validation.test_y,
                                                                                    images.train_y[held])
        else:  # indices into the class folders' listing; the held-out images' labels as their test split reads them
            held_indices, everything = validation.test.indices, images.train.indices
            truth = torch.cat([truth for _, truth in validation.test_batches(torch.device("cpu"), 7)])
            assert np.array_equal(truth.numpy(), labels[held])
        assert set(train.indices).isdisjoint(held_indices)
        assert sorted([*train.indices, *held_indices]) == sorted(everything)
        for label in range(len(images.classes)):
            assert np.sum(labels[held] == label) == round(0.2 * np.sum(labels == label)) > 0, (uri, label)


@needs_fashion_mnist
def test_a_run_with_held_out_images_scores_them_and_picks_on_them(weights: Path, tmp_path: Path) -> None:
    """``data.val_fraction=0.25`` of 512 images: 384 trained on (6 steps of 64), the 128 others
    scored beside the test split for the weights and their EMA at each evaluation; ``keep=best``
    releases the evaluation of the best held-out top-1 (computed here from the history) and says so."""
    summary = finetune(config(weights, tmp_path / "run", "data.val_fraction=0.25", "keep=best", "ema_decay=0.6",
                              "eval_every_epochs=0.5"), Storage())
    assert (summary["steps"], summary["images_seen"]) == (6, 384)
    assert [sorted(row) for row in summary["history"]] == [
        ["ema_top1", "ema_top5", "ema_val_top1", "ema_val_top5", "images_seen", "step", "top1", "top5",
         "train_minutes", "val_top1", "val_top5"]] * 2
    assert [row["step"] for row in summary["history"]] == [3, 6]
    evaluated = [(row, kind, prefix) for row in summary["history"] for kind, prefix in (("weights", ""),
                                                                                       ("ema", "ema_"))]
    row, kind, prefix = max(evaluated, key=lambda one: one[0][one[2] + "val_top1"])  # a tie: the first, as picked
    picked = {name: row[prefix + name] for name in ("top1", "top5", "val_top1", "val_top5")}
    assert summary["released"] == summary["best"] == {"step": row["step"], "weights": kind, "picked_on": "val",
                                                      **picked}
    assert summary["final"]["val_top1"] == summary["history"][-1]["val_top1"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["released"] == summary["released"]
    assert [p.name for p in (tmp_path / "run" / "best").iterdir()] == [f"step_{row['step']:08d}"]


def test_bad_held_out_shares_are_refused_naming_the_field(weights: Path, tmp_path: Path) -> None:
    for value, message in (("0.5", "data.val_fraction = '0.5': Input should be less than 0.5"),
                           ("-0.1", "data.val_fraction = '-0.1': Input should be greater than or equal to 0")):
        with pytest.raises(ConfigError, match=message):
            load_config(FinetuneConfig, "finetune-tiny", [f"data.val_fraction={value}"])
    from tests.evaluators.test_classification import write_folders

    write_folders(tmp_path / "data", {"cat": (3, 1), "dog": (3, 1)})  # 0.1 of 3 images a class rounds to none
    with pytest.raises(ValueError, match="data.val_fraction = 0.1 holds out none of the 6 train images: raise it"):
        finetune(config(weights, tmp_path / "run", f"data.uri={tmp_path / 'data'}", "data.train_limit=0",
                        "data.val_fraction=0.1"), Storage())
    assert not (tmp_path / "run").exists()


@needs_fashion_mnist
def test_the_ema_follows_its_formula_resumes_exactly_and_is_released_where_it_scores_higher(weights: Path,
                                                                                             tmp_path: Path) -> None:
    """``ema_decay``: after every step ``ema = d ema + (1 - d) weights`` (read from the run's last two
    checkpoints), scored beside the weights at each evaluation; a run halted and resumed ends with
    the same EMA; the files written are the final evaluation's better of the two."""
    ema = ["ema_decay=0.6", "checkpoint_every=1", "eval_every_epochs=0.5"]
    straight = finetune(config(weights, tmp_path / "straight", *ema), Storage())
    first, last = (torch.load(path, weights_only=True) for path in
                   sorted((tmp_path / "straight" / "checkpoints").glob("step_*.pt")))
    assert (first["step"], last["step"]) == (7, 8)
    for name, value in last["ema"].items():
        expected = 0.6 * first["ema"][name] + 0.4 * last["model"][name]
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(last["ema"]["head.weight"], last["model"]["head.weight"])
    assert [sorted(row) for row in straight["history"]] == [
        ["ema_top1", "ema_top5", "images_seen", "step", "top1", "top5", "train_minutes"]] * 2
    final, final_ema = straight["final"], straight["final_ema"]
    kind = "ema" if final_ema["top1"] > final["top1"] else "weights"
    assert straight["released"] == {"step": 8, "weights": kind, "picked_on": "test",
                                    **(final_ema if kind == "ema" else final)}
    written = load_file(tmp_path / "straight" / "backbone.safetensors")
    released = last["ema" if kind == "ema" else "model"]
    assert all(torch.equal(value, released[f"backbone.{name}"]) for name, value in written.items())

    finetune(config(weights, tmp_path / "resumed", *ema, "max_steps=3"), Storage())
    finetune(config(weights, tmp_path / "resumed", *ema), Storage())
    again = torch.load(sorted((tmp_path / "resumed" / "checkpoints").glob("step_*.pt"))[-1], weights_only=True)
    assert all(torch.equal(again["ema"][name], value) for name, value in last["ema"].items())


def test_the_ema_warm_up_decay_is_tensorflows_num_updates_rule_capped_by_the_decay() -> None:
    """After step t (1, 2, ...): ``min(d, (1 + t) / (10 + t))``: 2/11, 3/12, then d = 0.28 from
    t = 3 (4/13 = 0.31 is above it); without the warm-up d at every step."""
    assert [ema_decay_at(t, 0.28, True) for t in range(1, 6)] == pytest.approx([2 / 11, 3 / 12, 0.28, 0.28, 0.28])
    assert [ema_decay_at(t, 0.28, False) for t in range(1, 6)] == [0.28] * 5
    with pytest.raises(ConfigError, match="ema_warmup is on but ema_decay = 0 keeps no moving average"):
        load_config(FinetuneConfig, "finetune-tiny", ["ema_warmup=true"])


@needs_fashion_mnist
def test_the_warmed_up_ema_follows_its_decays_from_the_start_and_resumes_exactly(weights: Path,
                                                                                tmp_path: Path) -> None:
    """``ema_warmup``: the EMA after steps 1, 2, 3 (the checkpoints of a run halted after the first
    step, then of one straight through) is the start's weights (the run's seeded initialisation made
    again here) and each step's weights averaged with the decays 2/11, 3/12 and 0.28 (``ema_decay``,
    below 4/13); the halted run resumed ends with the same EMA."""
    warm = ["ema_decay=0.28", "ema_warmup=true", "checkpoint_every=1", "eval_every_epochs=0",
            "optim.warmup_epochs=0"]  # the first step moves the weights (a warm-up's rate starts at 0)
    cfg = config(weights, tmp_path / "straight", *warm, "max_steps=3")
    finetune(cfg, Storage())
    finetune(config(weights, tmp_path / "resumed", *warm, "max_steps=1"), Storage())
    checkpoints = [torch.load(tmp_path / run / "checkpoints" / f"step_{step:09d}.pt", weights_only=True)
                   for run, step in (("resumed", 1), ("straight", 2), ("straight", 3))]  # the last 2 are kept
    torch.manual_seed(cfg.seed)  # the run's start: the backbone, then the classifier's head, from the seed
    average = Classifier(load_for_finetuning(cfg, Storage()), 10, cfg.head_input).state_dict()
    for checkpoint, decay in zip(checkpoints, (2 / 11, 3 / 12, 0.28)):
        average = {name: decay * value + (1 - decay) * checkpoint["model"][name] for name, value in average.items()}
        for name, value in checkpoint["ema"].items():
            torch.testing.assert_close(value, average[name], rtol=1e-5, atol=1e-6, msg=f"{checkpoint['step']} {name}")
    assert all(not torch.equal(checkpoint["ema"]["head.weight"], checkpoint["model"]["head.weight"])
               for checkpoint in checkpoints)

    finetune(config(weights, tmp_path / "resumed", *warm, "max_steps=3"), Storage())
    again = torch.load(tmp_path / "resumed" / "checkpoints" / "step_000000003.pt", weights_only=True)
    assert all(torch.equal(again["ema"][name], value) for name, value in checkpoints[-1]["ema"].items())


def test_keep_best_releases_the_weights_of_the_first_best_evaluation(weights: Path, tmp_path: Path) -> None:
    """``keep=best``: a colour a class is learned by the first evaluation, so later ones tie and the
    first is released; its files are a run halted there (the same schedule), and score as said."""
    from tests.evaluators.test_classification import write_folders

    write_folders(tmp_path / "data", {"cat": (24, 4), "dog": (24, 4), "fish": (24, 4)})
    common = [f"weights={weights}", f"data.uri={tmp_path / 'data'}", "data.test_limit=0", "optim.batch_size=8",
              "optim.epochs=3", "optim.base_lr=4e-3", "keep=best"]
    best = finetune(load_config(FinetuneConfig, "finetune-tiny", [*common, f"out={tmp_path / 'best'}"]), Storage())
    tops = [row["top1"] for row in best["history"]]
    assert [row["step"] for row in best["history"]] == [9, 18, 27] and tops.index(max(tops)) < 2, tops
    step = best["history"][tops.index(max(tops))]["step"]
    assert best["released"] == best["best"] == {"step": step, "weights": "weights", "picked_on": "test",
                                                "top1": max(tops)}
    halted = finetune(load_config(FinetuneConfig, "finetune-tiny", [*common, f"out={tmp_path / 'halted'}",
                                                                    f"max_steps={step}", "keep=last"]), Storage())
    assert halted["released"]["top1"] == max(tops)
    for file in ("backbone.safetensors", CLASSIFIER_FILE):
        ours, theirs = (load_file(tmp_path / run / file) for run in ("best", "halted"))
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), file
    assert [p.name for p in (tmp_path / "best" / "best").iterdir()] == [f"step_{step:08d}"]  # the others pruned
    assert finetune(load_config(FinetuneConfig, "finetune-tiny", [*common, f"out={tmp_path / 'best'}"]),
                    Storage())["released"] == best["released"]  # a finished run started again: the same pick


def test_class_folders_train_and_a_separate_test_set_of_fewer_classes_is_scored_over_them(weights: Path,
                                                                                       tmp_path: Path) -> None:
    from tests.evaluators.test_classification import write_folders

    write_folders(tmp_path / "data", {"cat": (24, 4), "dog": (24, 4), "fish": (24, 4)})
    write_folders(tmp_path / "other", {"dog": (0, 6), "fish": (0, 6)}, seed=1)
    cfg = load_config(FinetuneConfig, "finetune-tiny", [
        f"weights={weights}", f"out={tmp_path / 'run'}", f"data.uri={tmp_path / 'data'}",
        f"data.test_uri={tmp_path / 'other' / 'val'}", "data.test_limit=0", "optim.batch_size=8",
        "optim.epochs=3", "optim.base_lr=4e-3", "data.num_workers=1", "data.max_aspect=2"])
    train = training_images(labelled_images(cfg.data.uri, "folder", Storage(), cfg.image_size), cfg, Storage(),
                            np.zeros(0, dtype=np.int64))
    aspects = [train[i].aspect for i in range(len(train))]  # the images' whole regions (30-60 px sides)
    assert len(set(aspects)) > 10 and 0.5 <= min(aspects) < 1 < max(aspects) <= 2
    summary = finetune(cfg, Storage())
    assert summary["classes"] == ["cat", "dog", "fish"] and summary["steps"] == 27
    assert summary["final"]["top1"] == 1.0  # a colour a class: learned, and never "cat", which is not in the test set
    assert "top5" not in summary["final"]  # 3 classes


def test_a_report_holds_the_confusion_matrix_up_to_30_classes(weights: Path) -> None:
    """ImageNet's 1,000 classes would make a 1M-cell matrix in every report (and an unreadable
    picture): up to 30 classes it is there, summing to the test images, above it is left out."""
    from evaluators.classification import FashionMnistImages
    from trainer.finetune import classifier_report

    backbone = load_backbone(str(weights), "safetensors")
    rng = np.random.default_rng(0)
    for count in (30, 31):
        names = tuple(f"class{i}" for i in range(count))
        pixels = torch.from_numpy(rng.integers(0, 256, (12, 28, 28), dtype=np.uint8))
        labels = torch.from_numpy(rng.integers(0, count, 12))
        images = FashionMnistImages(pixels, labels, pixels, labels, classes=names)
        report = classifier_report(Classifier(backbone, count, "cls"), names, images, 28, torch.device("cpu"))
        assert report["test_images"] == 12 and 0 <= report["metrics"]["classify_top1"] <= 1
        assert ("confusion" in report) == (count == 30)
        if count == 30:
            assert np.asarray(report["confusion"]).sum() == 12


def test_the_command_fine_tunes_and_says_bad_input_in_one_line(weights: Path, tmp_path: Path) -> None:
    from tests.evaluators.test_classification import write_folders

    write_folders(tmp_path / "data", {"cat": (16, 4), "dog": (16, 4)})
    args = ["finetune", "--weights", str(weights.parent), f"out={tmp_path / 'run'}", f"data.uri={tmp_path / 'data'}",
            "data.test_limit=0", "optim.batch_size=8", "optim.epochs=1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["steps"] == 4 and (tmp_path / "run" / "backbone.safetensors").exists()
    for bad, message in ((["image_size=30"], "image_size = 30 is not a multiple of the backbone's patch size 7"),
                         (["augment.crop_scale=[0.9,0.2]"], "augment.crop_scale = [0.9, 0.2] must hold 0 < low"),
                         ([f"data.uri={tmp_path / 'none'}"], "holds neither Fashion-MNIST")):
        refused = CliRunner().invoke(app, [*args[:3], f"out={tmp_path / 'bad'}", *args[4:], *bad])
        assert refused.exit_code == 2 and "Traceback" not in refused.stderr, refused.output
        assert message in refused.stderr.strip().splitlines()[-1], refused.stderr
        assert not (tmp_path / "bad" / "checkpoints").exists()
    with pytest.raises(ConfigError, match="unknown key 'optim.layer_decay'"):
        load_config(FinetuneConfig, "finetune-tiny", ["optim.layer_decay=0.5"])

    # `dinoflow eval classify`: the fine-tuned folder scored again on the same test images, the same top-1
    evaluate = ["eval", "classify", "--weights", str(tmp_path / "run"), "--data-uri", str(tmp_path / "data"),
                "--image-size", "28"]
    scored = CliRunner().invoke(app, evaluate)
    assert scored.exit_code == 0, scored.output
    report = json.loads(scored.stdout)
    tuned = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert report["metrics"]["classify_top1"] == pytest.approx(tuned["final"]["top1"], abs=1e-6)
    assert report["classes"] == ["cat", "dog"] and report["test_images"] == 8
    assert np.asarray(report["confusion"]).sum() == 8
    write_folders(tmp_path / "other", {"cat": (3, 1), "dog": (3, 1), "fish": (3, 1)})  # other classes
    for bad, message in ((["--weights", str(weights), "--data-uri", str(tmp_path / "data")], "has no classifier"),
                         (["--data-uri", str(tmp_path / "other")], "the data's 3 classes (cat, dog, fish, ...) are not "
                                                                   "the classifier's 2 (cat, dog, ...)")):
        refused = CliRunner().invoke(app, [*evaluate, *bad])
        assert refused.exit_code == 2 and message in refused.stderr.strip().splitlines()[-1], refused.output


def packaged_config(run: Path, tmp_path: Path) -> dict:
    """The ``config.json`` of the MLflow package the register stage makes of a fine-tuning run's folder."""
    from trainer.models.packaging import save_mlflow_model

    package = save_mlflow_model(run / "backbone.safetensors", {"patch_size": 7, "image_size": 28},
                                tmp_path / f"package-{run.name}" / "model", example=np.zeros((1, 28, 28), np.uint8),
                                classifier=run / CLASSIFIER_FILE)
    return json.loads(next(package.rglob("config.json")).read_text())


def test_class_folders_record_the_centre_crop_their_evaluation_scored_with_the_classifier(weights: Path,
                                                                                        tmp_path: Path) -> None:
    """A run on class folders scores centre crops: its classifier (released and held by ``keep=best``),
    its summary and its package record ``centre_crop``, and it is served centre-cropped."""
    from serve.model import PIXEL_TRANSFORM, load_served_model
    from tests.evaluators.test_classification import write_folders
    from trainer.models.classifier import saved_eval_transform

    write_folders(tmp_path / "data", {"cat": (16, 4), "dog": (16, 4)})
    summary = finetune(load_config(FinetuneConfig, "finetune-tiny", [
        f"weights={weights}", f"out={tmp_path / 'run'}", f"data.uri={tmp_path / 'data'}", "data.test_limit=0",
        "optim.batch_size=8", "max_steps=1", "keep=best"]), Storage())
    assert summary["eval_transform"] == "centre_crop"
    held = next((tmp_path / "run" / "best").iterdir()) / CLASSIFIER_FILE
    for classifier in (tmp_path / "run" / CLASSIFIER_FILE, held):
        assert saved_eval_transform(str(classifier), Storage()) == "centre_crop", classifier
    assert packaged_config(tmp_path / "run", tmp_path)["eval_transform"] == "centre_crop"
    served = load_served_model(str(tmp_path / "run"))
    assert not served.whole_images and served.transform == PIXEL_TRANSFORM


@needs_fashion_mnist
def test_fashion_mnist_records_the_whole_images_its_evaluation_scored(weights: Path, tmp_path: Path) -> None:
    from serve.model import WHOLE_TRANSFORM, load_served_model
    from trainer.models.classifier import saved_eval_transform

    summary = finetune(config(weights, tmp_path / "run", "max_steps=1"), Storage())
    assert summary["eval_transform"] == "whole"
    assert saved_eval_transform(str(tmp_path / "run" / CLASSIFIER_FILE), Storage()) == "whole"
    assert packaged_config(tmp_path / "run", tmp_path)["eval_transform"] == "whole"
    assert load_served_model(str(tmp_path / "run")).transform == WHOLE_TRANSFORM
