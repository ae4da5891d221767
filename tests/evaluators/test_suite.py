"""The benchmark suite runs every task on a backbone and reports flat metrics."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from dinoflow.storage import Storage
from evaluators.attention import attention_summary, garment_foreground
from evaluators.dense import HeadConfig
from evaluators.features import to_model_input
from evaluators.suite import SuiteConfig, run_suite
from evaluators.synthetic import SceneConfig, make_scenes
from trainer.data.fashion_mnist import load_split
from trainer.models.vit import build_vit


def test_every_task_reports_its_metrics(tmp_path) -> None:
    torch.manual_seed(0)
    backbone = build_vit("vit_small", patch_size=7, embed_dim=32, depth=2, num_heads=2, img_size=28,
                         layerscale_init=1.0)
    config = SuiteConfig(tasks=("knn", "linear", "seg", "depth", "retrieval"),
                         data_uri="/usr/share/datasets/fashion-mnist", train_limit=500, test_limit=200,
                         train_scenes=24, test_scenes=8, seg_head=HeadConfig(steps=6), depth_head=HeadConfig(steps=6),
                         retrieval_scenes=6)
    report = run_suite(backbone, config, pictures=tmp_path)
    metrics = report["metrics"]
    for name in ("knn_top1_k10", "knn_top1_k20", "linear_top1", "pixels_knn_top1_k20", "seg_miou",
                 "seg_pixel_accuracy", "depth_rmse", "depth_abs_rel", "depth_delta1", "retrieval_map_easy",
                 "retrieval_map_medium", "retrieval_map_hard"):
        assert name in metrics and metrics[name] == metrics[name], name  # present and not NaN
    assert 0 <= metrics["seg_miou"] <= 1 and metrics["depth_rmse"] > 0
    assert len(report["features"]) == 4 and report["features"][0].shape == (500, 32)
    assert 0 <= metrics["high_norm_token_share"] < 0.5 and 0 < metrics["cls_attention_on_patches"] < 1
    # the attention masks are scored against the test scenes' shapes (class > 0), at 56 px = 8 patches
    test = make_scenes(8, config.seed + 1, SceneConfig(size=config.scene_size))
    scenes = attention_summary(backbone, to_model_input(test.images, patch_size=7),
                               foreground=torch.from_numpy(test.masks != 0))["metrics"]
    for name in ("attention_jaccard", "attention_jaccard_best_head", "high_norm_token_share"):
        assert metrics[name] == pytest.approx(scenes[name]), name
    assert 0 < metrics["attention_jaccard"] <= metrics["attention_jaccard_best_head"] <= 1
    for name in ("pca_features.png", "dense_predictions.png", "attention_maps.png", "probe_sweeps.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    report.pop("features")
    json.dumps(report)  # the rest is the JSON report
    assert report["config"]["tasks"] == ["knn", "linear", "seg", "depth", "retrieval"]


def test_classification_alone_scores_attention_on_the_garments() -> None:
    torch.manual_seed(1)
    backbone = build_vit("vit_small", patch_size=7, embed_dim=16, depth=2, num_heads=2, img_size=28)
    config = SuiteConfig(tasks=("knn",), data_uri="/usr/share/datasets/fashion-mnist", train_limit=100,
                         test_limit=20)
    metrics = run_suite(backbone, config)["metrics"]
    garments = torch.from_numpy(load_split(Storage(), config.data_uri, "test").images[:20])
    big = garment_foreground(garments).repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)  # 28 -> 56 px
    expected = attention_summary(backbone.eval(), to_model_input(garments, size=56, patch_size=7), foreground=big)
    assert metrics["attention_jaccard"] == pytest.approx(expected["metrics"]["attention_jaccard"])


def test_the_logistic_regression_task_sweeps_c_on_the_final_cls_features() -> None:
    """``logreg`` alone: its metrics are :func:`logistic_regression`'s on the report's features
    (the final CLS tokens), with the original's 45 values of C."""
    from evaluators.logreg import LogRegConfig, logistic_regression

    torch.manual_seed(2)
    backbone = build_vit("vit_small", patch_size=7, embed_dim=16, depth=2, num_heads=2, img_size=28,
                         layerscale_init=1.0)  # (at the default 1e-5 a random backbone's CLS is one vector)
    config = SuiteConfig(tasks=("logreg",), data_uri="/usr/share/datasets/fashion-mnist", train_limit=300,
                         test_limit=100)
    report = run_suite(backbone, config)
    metrics, (train_x, train_y, test_x, test_y) = report["metrics"], report["features"]
    assert not any(name.startswith(("linear", "knn", "pixels_knn")) for name in metrics)  # logreg alone ran
    want = logistic_regression(train_x, train_y, test_x, test_y, LogRegConfig(), num_classes=10)
    assert metrics["logreg_top1"] == want.test_accuracy and metrics["logreg_best_c"] == want.best_c
    assert metrics["logreg_val_top1"] == want.val_accuracy > 0.3  # 10 classes: well above chance
    assert len(report["tasks"]["classification"]["logreg"]["val_accuracies"]) == 45


def test_knn_runs_only_when_asked_for(tmp_path) -> None:
    """``tasks`` decides: the probe alone scores no k-NN, neither on its own features nor on raw
    pixels, and draws no k-NN confusion matrix; with knn beside it, both are there."""
    torch.manual_seed(3)
    backbone = build_vit("vit_small", patch_size=7, embed_dim=16, depth=2, num_heads=2, img_size=28,
                         layerscale_init=1.0)
    config = SuiteConfig(tasks=("linear",), data_uri="/usr/share/datasets/fashion-mnist", train_limit=200,
                         test_limit=50)
    report = run_suite(backbone, config, pictures=tmp_path / "linear")
    assert "linear_top1" in report["metrics"] and "knn" not in report["tasks"]["classification"]
    assert not [name for name in report["metrics"] if "knn" in name]
    assert "pixels_knn" not in report["tasks"]["classification"]
    assert not (tmp_path / "linear" / "confusion_knn.png").exists()
    assert (tmp_path / "linear" / "probe_sweeps.png").is_file()
    both = run_suite(backbone, replace(config, tasks=("knn", "linear")), pictures=tmp_path / "both")
    assert {"knn_top1_k20", "pixels_knn_top1_k20"} <= set(both["metrics"])
    assert both["metrics"]["linear_top1"] == report["metrics"]["linear_top1"]  # the probe as it was
    assert (tmp_path / "both" / "confusion_knn.png").is_file()


def test_further_test_sets_and_corruptions_score_only_the_tasks_asked_for(tmp_path) -> None:
    """logreg alone: the further test sets and ImageNet-C's folders are scored by the logistic
    regression, none by a k-NN the tasks did not name."""
    from tests.evaluators.test_classification import backbone
    from tests.evaluators.test_clean_probes import sets
    from tests.evaluators.test_corruptions import write_corruptions

    given = sets(tmp_path)
    write_corruptions(tmp_path / "c", tmp_path / "in" / "val", severities=(1,))
    config = SuiteConfig(tasks=("logreg",), data_uri=str(tmp_path / "in"), image_size=28, ks=(5,),
                         test_sets=given, corruption_uri=str(tmp_path / "c"))
    report = run_suite(backbone(), config, pictures=tmp_path / "pictures")
    metrics, section = report["metrics"], report["tasks"]["classification"]
    assert not [name for name in metrics if "knn" in name]
    assert {"test_imagenetv2_logreg_top1", "test_imagenet-r_logreg_top1", "corruption_logreg_error"} <= set(metrics)
    assert all("knn" not in scores for scores in section["test_sets"].values())
    assert section["corruptions"]["knn"] == {} and section["corruptions"]["knn_k"] is None
    assert section["corruptions"]["logreg"].keys() == {"gaussian_noise", "defocus_blur", "fog"}
    assert not (tmp_path / "pictures" / "confusion_knn.png").exists()
    assert (tmp_path / "pictures" / "corruption_errors.png").is_file()


def test_four_layer_depth_reads_the_originals_blocks_and_segmentation_the_last_four() -> None:
    """layers=4: seg's "+ms" head reads the last 4 blocks, depth's "lin.4" the original's 4 (its
    table for 12, 24 and 40 blocks; of 8 blocks evenly spaced: 1, 3, 5, 7). Seg reads them through
    the final LayerNorm, depth without it (the original's depthers pass ``norm=False``)."""
    from evaluators.dense import patch_tokens, spaced_blocks
    from evaluators.suite import _dense_tasks

    assert [spaced_blocks(12, 4), spaced_blocks(24, 4), spaced_blocks(40, 4), spaced_blocks(12, 1)] == [
        (2, 5, 8, 11), (4, 11, 17, 23), (9, 19, 29, 39), 1]
    assert [spaced_blocks(8, 4), spaced_blocks(16, 4), spaced_blocks(24, 2)] == [(1, 3, 5, 7), (3, 7, 11, 15),
                                                                                 (11, 23)]
    torch.manual_seed(0)
    backbone = build_vit("vit_small", patch_size=7, embed_dim=16, depth=8, num_heads=2, img_size=28,
                         layerscale_init=1.0).eval()
    config = SuiteConfig(tasks=("seg", "depth"), train_scenes=6, test_scenes=2, scene_size=28, layers=4,
                         seg_head=HeadConfig(steps=2), depth_head=HeadConfig(steps=2))
    dense = _dense_tasks(backbone, config, Storage())
    assert dense["seg"].train.layers == 4 and dense["depth"].train.layers == (1, 3, 5, 7)
    assert dense["seg"].train.channels == dense["depth"].train.channels == 64
    images = to_model_input(torch.from_numpy(make_scenes(6, 0, SceneConfig(size=28)).images), patch_size=7)
    for task, blocks, norm in (("seg", [4, 5, 6, 7], True), ("depth", [1, 3, 5, 7], False)):
        with torch.no_grad():
            outputs = backbone.get_intermediate_layers(images, n=blocks, reshape=True, return_class_token=True,
                                                       norm=norm)
        expected = torch.cat([p for p, _ in outputs], dim=1), torch.cat([c for _, c in outputs], dim=1)
        assert dense[task].train.norm is norm
        for got, want in zip((*patch_tokens(backbone, images, tuple(blocks), norm=norm), *dense[task].train.held[:2]),
                             expected * 2):
            torch.testing.assert_close(got, want)
    assert not torch.allclose(dense["depth"].train.held[0], patch_tokens(backbone, images, (1, 3, 5, 7))[0])
    metrics = run_suite(backbone, config)["metrics"]
    assert metrics["depth_rmse"] > 0 and 0 <= metrics["seg_miou"] <= 1


def test_multiscale_four_layer_segmentation_runs() -> None:
    torch.manual_seed(0)
    backbone = build_vit("vit_small", patch_size=7, embed_dim=16, depth=4, num_heads=2, img_size=28)
    config = SuiteConfig(tasks=("seg",), train_scenes=8, test_scenes=4, layers=4, multiscale=True,
                         seg_head=HeadConfig(steps=1))
    metrics = run_suite(backbone, config)["metrics"]
    assert 0 <= metrics["seg_miou"] <= 1 and 0 <= metrics["seg_pixel_accuracy"] <= 1


def test_bad_task_lists_are_named() -> None:
    with pytest.raises(ValueError,
                       match="unknown tasks \\['segm'\\]; allowed: knn, linear, logreg, seg, depth, retrieval"):
        SuiteConfig(tasks=("segm",))
    with pytest.raises(ValueError, match="need data_uri"):
        SuiteConfig(tasks=("knn",))
    assert SuiteConfig(tasks=("seg",)).tasks == ("seg",)
    with pytest.raises(ValueError, match="layers must be >= 1 .*, got 0"):  # depth ran lin.1 under it
        SuiteConfig(tasks=("seg", "depth"), layers=0)
    for ks, temperature in (((0, 20), 0.07), ((), 0.07), ((20,), -1.0)):
        with pytest.raises(ValueError, match=r"ks must hold k-NN's neighbour counts, each >= 1, and temperature"):
            SuiteConfig(tasks=("seg",), ks=ks, temperature=temperature)


def test_options_set_any_plain_setting_by_name_and_refuse_what_they_cannot_set() -> None:
    """``with_options``: the one way a pipeline passes the suite's settings that have no parameter
    of their own. Every plain field (the heads' by ``<head>.<field>``) is settable, found from the
    dataclasses, so a new field needs no new code; a wrong name, type or range is refused naming it."""
    from dataclasses import fields

    from evaluators.suite import option_values, settable_options, with_options

    base = SuiteConfig(tasks=("seg",))
    expected = {f.name for f in fields(SuiteConfig)} - {"tasks", "ks", "data_kind", "seg_head", "depth_head"}
    expected |= {f"{head}.{f.name}" for head in ("seg_head", "depth_head") for f in fields(HeadConfig)}
    assert set(settable_options(base)) == expected
    assert with_options(base, {}) == base
    given = with_options(base, {"video_frames": 16, "video_pool": "concat", "layers": 4, "multiscale": True,
                                "seg_head.lr": 1, "depth_head.batch_size": 8.0, "dense_cache_gib": 0.5})
    assert (given.video_frames, given.video_pool, given.layers, given.multiscale) == (16, "concat", 4, True)
    assert given.seg_head == HeadConfig(lr=1.0) and type(given.seg_head.lr) is float  # an int passes for a float
    assert given.depth_head == HeadConfig(steps=1000, batch_size=8) and type(given.depth_head.batch_size) is int
    assert given.dense_cache_gib == 0.5  # (a whole float passes for an int: a KFP Struct's numbers are floats)
    values = option_values(given)
    assert set(values) == expected and (values["video_frames"], values["seg_head.lr"]) == (16, 1.0)
    assert (values["seg_head.steps"], values["depth_head.steps"]) == (2000, 1000)
    with pytest.raises(ValueError, match=r"unknown eval option 'frames'; allowed: .*seg_head.lr.*video_frames") as bad:
        with_options(base, {"frames": 16})
    assert "ks" not in str(bad.value).split("allowed: ")[1].split(", ")
    with pytest.raises(ValueError, match="eval option 'seg_data' has an input of its own: set it by seg_data"):
        with_options(base, {"seg_data": "voc:/x"}, {"seg_data": "seg_data"})
    with pytest.raises(ValueError, match=r"allowed: (?!.*seg_data)"):
        with_options(base, {"nope": 1}, {"seg_data": "seg_data"})
    for name, value, kind in (("video_frames", "8", "an int, got str '8'"), ("multiscale", 1, "a bool, got int 1"),
                              ("video_frames", True, "an int, got bool True"), ("seg_head.lr", "1e-3", "a float"),
                              ("video_frames", 8.5, "an int, got float 8.5")):
        with pytest.raises(ValueError, match=f"eval option {name} takes {kind}"):
            with_options(base, {name: value})
    with pytest.raises(ValueError, match="video_frames must be >= 1, got 0"):  # the config's own range checks
        with_options(base, {"video_frames": 0})
    with pytest.raises(ValueError, match="lr > 0"):
        with_options(base, {"depth_head.lr": -1.0})
