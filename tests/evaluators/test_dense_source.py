"""Dense heads' features held or made per batch: the same batches either way, held only under the
budget, the real data sets decoded by DataLoader workers from file:// and s3:// alike."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from dinoflow.storage import Storage
from evaluators.dense import HeadConfig, head_batches, row_batches
from evaluators.dense_datasets import ArraySplit, load_voc
from evaluators.dense_source import FeatureSource, feature_bytes, feature_sources, hold
from evaluators.features import to_model_input
from tests.evaluators.test_dense_datasets import write_halves
from trainer.models.vit import build_vit


def _backbone(depth: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_vit("vit_small", patch_size=7, embed_dim=16, depth=depth, num_heads=2, img_size=28).eval()


def _scenes(count: int, seed: int) -> ArraySplit:
    rng = np.random.default_rng(seed)
    masks = rng.integers(0, 4, (count, 28, 28)).astype(np.uint8)
    masks[:, 0] = 255
    return ArraySplit(rng.integers(0, 255, (count, 3, 28, 28), dtype=np.uint8), masks)


def _assert_same_batches(first: FeatureSource, second: FeatureSource, rows: list) -> None:
    count = 0
    for (p1, c1, y1), (p2, c2, y2) in zip(first.batches(rows), second.batches(rows), strict=True):
        torch.testing.assert_close(p1.cpu(), p2.cpu(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c1.cpu(), c2.cpu(), atol=1e-5, rtol=1e-5)
        assert torch.equal(y1, y2)
        count += 1
    assert count == len(rows)


def test_live_batches_are_the_held_ones() -> None:
    """The training rows (random, repeated over epochs) and the test rows give the same features,
    CLS tokens and labels whether looked up or made from the images; so do the class counts."""
    live = FeatureSource(_scenes(20, 0), _backbone(depth=3), layers=2)
    held = hold(live)
    assert held.held is not None and held.held[0].shape == (20, 32, 4, 4) and held.held[1].shape == (20, 32)
    assert live.channels == held.channels == 32
    _assert_same_batches(live, held, head_batches(20, HeadConfig(steps=7, batch_size=6)))
    _assert_same_batches(live, held, row_batches(20))
    assert torch.equal(live.class_counts(4), held.class_counts(4))
    assert live.class_counts(4).sum() == 20 * 27 * 28  # every pixel but the ignored first rows


def test_features_are_held_only_when_they_fit_the_budget() -> None:
    backbone = _backbone()
    splits = [_scenes(10, 0), _scenes(6, 1)]
    needed = feature_bytes(backbone, 10, 28, 1) + feature_bytes(backbone, 6, 28, 1)
    held = feature_sources(backbone, splits, 1, None, 0, budget_bytes=needed)
    assert all(s.held is not None for s in held)
    assert sum(s.held[0].nbytes + s.held[1].nbytes for s in held) == needed  # the estimate is exact
    assert all(s.held is None for s in feature_sources(backbone, splits, 1, None, 0, budget_bytes=needed - 1))
    # a split whose features are not read (+ms's test split) is neither held nor counted
    train_only = feature_bytes(backbone, 10, 28, 1)
    train, test = feature_sources(backbone, splits, 1, None, 0, budget_bytes=train_only, read=(True, False))
    assert train.held is not None and test.held is None


def test_plus_ms_makes_no_feature_of_the_test_images_at_their_own_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    """seg by +ms scores the test scenes from their images at five scales and flips: the pass that
    held their features at the one scale is not made, and the report is the one made with it."""
    import evaluators.dense_source as dense_source
    import evaluators.suite as suite

    backbone = _backbone()
    config = suite.SuiteConfig(tasks=("seg",), train_scenes=16, test_scenes=4, scene_size=28, layers=2,
                               multiscale=True, seg_head=HeadConfig(steps=3, batch_size=8))
    held: list[int] = []
    hold = dense_source.hold

    def counted(source):
        held.append(len(source))
        return hold(source)

    monkeypatch.setattr(dense_source, "hold", counted)
    report = suite.run_suite(backbone, config)["metrics"]
    assert held == [16]  # the training scenes only
    every = dense_source.feature_sources
    monkeypatch.setattr(suite, "feature_sources", lambda *args, read=None, **kw: every(*args, **kw))  # both held
    assert suite.run_suite(backbone, config)["metrics"] == report and held == [16, 16, 4]


def test_a_source_reads_its_blocks_through_the_final_norm_or_not() -> None:
    """``norm=False`` (depth's): the blocks' raw outputs, held or made per batch alike; the default
    (segmentation's): through the final LayerNorm."""
    backbone = _backbone(depth=3)
    split = _scenes(6, 0)
    images = torch.from_numpy(split.images)
    for norm in (True, False):
        live = FeatureSource(split, backbone, layers=2, norm=norm)
        [held] = feature_sources(backbone, [split], 2, None, 0, budget_bytes=2**30, norm=norm)
        assert held.held is not None and held.norm is norm
        _assert_same_batches(live, held, row_batches(6))
        (patches, _, _), = live.batches([range(6)])
        with torch.no_grad():
            blocks = backbone.get_intermediate_layers(to_model_input(images, patch_size=7), n=2, reshape=True,
                                                      norm=norm)
        torch.testing.assert_close(patches, torch.cat(blocks, dim=1))


def test_workers_decode_a_real_layout_from_storage(storage_root: tuple[Storage, str], tmp_path: Path) -> None:
    """VOC files on file:// and on the S3 server, decoded by two DataLoader workers (each with a
    Storage of its own) while the backbone runs per batch: the same batches as held in-process."""
    storage, root = storage_root
    voc, _ = write_halves(tmp_path)
    storage.upload_dir(voc, root)
    split = load_voc(storage, root, "train", 28)
    backbone = _backbone()
    live = FeatureSource(split, backbone, num_workers=2)
    held = hold(FeatureSource(split, backbone))
    _assert_same_batches(live, held, head_batches(len(split), HeadConfig(steps=4, batch_size=5)))
    assert torch.equal(live.class_counts(21), held.class_counts(21))
    assert live.class_counts(21)[[1, 2]].sum() == 12 * 28 * 28 - (held.held[2] == 255).sum()


def test_the_suite_scores_alike_with_features_held_or_made_per_batch(tmp_path: Path) -> None:
    """seg on a VOC layout and depth on an NYU one: a budget of 0 runs the backbone on every
    head batch (two workers decoding), the default holds the features; the heads and their scores
    agree."""
    from evaluators.suite import SuiteConfig, run_suite

    voc, nyu = write_halves(tmp_path)
    backbone = _backbone()
    config = SuiteConfig(tasks=("seg", "depth"), seg_data=f"voc:{voc}", depth_data=f"nyu:{nyu}", image_size=28,
                         seg_head=HeadConfig(steps=40), depth_head=HeadConfig(steps=40), dense_augment=False)
    held = run_suite(backbone, config)["metrics"]
    live = run_suite(backbone, replace(config, dense_cache_gib=0.0, num_workers=2))["metrics"]
    assert held.keys() == live.keys()
    for name in ("seg_miou", "seg_pixel_accuracy", "depth_rmse", "depth_abs_rel", "depth_delta1"):
        assert live[name] == pytest.approx(held[name], abs=1e-3), name
    assert held["seg_pixel_accuracy"] > 0.6
    # augmented crops (the default): made per batch whatever the budget, each step's drawn anew, and
    # the same again in one worker or two (each draw seeded by the sample and its draw)
    augmented = [run_suite(backbone, replace(config, dense_augment=True, num_workers=workers))["metrics"]
                 for workers in (0, 2)]
    assert augmented[0] == pytest.approx(augmented[1], abs=1e-6) and augmented[0] != pytest.approx(held, abs=1e-6)
    with pytest.raises(ValueError, match="dense_cache_gib must be >= 0"):
        SuiteConfig(tasks=("seg",), dense_cache_gib=-1)


def test_the_suite_resumes_the_heads_training_from_its_work_dir(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Features made per batch, the run lost in the depth head's fourth step (the seg head done):
    the rerun with the same ``work_dir`` runs the backbone on no seg training batch and on depth's
    last five only, and reports what an unbroken run reports."""
    import evaluators.suite as suite
    from evaluators.dense import HeadSaves

    backbone = _backbone()
    run = backbone.get_intermediate_layers
    calls: list[int] = []
    lost_at = [0]

    def counted(images: torch.Tensor, *args, **kwargs):
        calls.append(len(images))
        if len(calls) == lost_at[0]:
            raise RuntimeError("pod lost")
        return run(images, *args, **kwargs)

    backbone.get_intermediate_layers = counted  # type: ignore[method-assign]
    head = HeadConfig(steps=8, batch_size=8)
    config = suite.SuiteConfig(tasks=("seg", "depth"), train_scenes=24, test_scenes=8, scene_size=28,
                               seg_head=head, depth_head=head, dense_cache_gib=0.0)
    unbroken = suite.run_suite(backbone, config)["metrics"]
    every = len(calls)
    monkeypatch.setattr(suite, "HeadSaves", lambda *args: HeadSaves(*args, every_s=0.0))  # a save each step
    calls.clear()
    lost_at[0] = 8 + 2 + 4  # seg's 8 steps and 2 test batches, then depth's fourth step
    with pytest.raises(RuntimeError, match="pod lost"):
        suite.run_suite(backbone, replace(config, work_dir=str(tmp_path / "work")))
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["depth-head", "seg-head"]
    calls.clear()
    resumed = suite.run_suite(backbone, replace(config, work_dir=str(tmp_path / "work")))["metrics"]
    assert len(calls) == every - 8 - 3
    assert resumed == unbroken
