"""The evaluate stage on class folders: the pipeline's benchmark of one's own labelled images."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from components.evaluate import run_evaluate_stage
from components.stage import StageContext
from tests.evaluators.test_classification import CLASSES, write_folders
from trainer.models.hub import save_backbone
from trainer.models.vit import build_vit


def test_the_stage_scores_class_folders_and_draws_their_confusion_matrix(tmp_path: Path) -> None:
    """``data_uri`` naming train/ and val/ class folders (it read Fashion-MNIST only): the report
    names the classes, the confusion matrix is drawn over them, a rerun comes from the cache."""
    write_folders(tmp_path / "data", {"cat": (8, 3), "dog": (8, 3), "fish": (8, 3)})
    torch.manual_seed(0)
    (tmp_path / "backbone").mkdir()
    save_backbone(build_vit("vit_small", patch_size=14, embed_dim=32, depth=2, num_heads=2, img_size=56,
                            layerscale_init=1.0),
                  str(tmp_path / "backbone" / "backbone.safetensors"))
    ctx = StageContext(run_root=str(tmp_path / "root"))
    result = run_evaluate_stage(ctx, tmp_path / "backbone", tmp_path / "out", str(tmp_path / "data"), tasks=["knn"])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["tasks"]["classification"]["classes"] == list(CLASSES)
    assert report["metrics"]["knn_top1_k20"] == result["metrics"]["knn_top1_k20"] > 0.9  # colours separate
    assert (tmp_path / "out" / "confusion_knn.png").read_bytes()[:4] == b"\x89PNG"
    again = run_evaluate_stage(ctx, tmp_path / "backbone", tmp_path / "again", str(tmp_path / "data"), tasks=["knn"])
    assert again["cached"] and again["metrics"] == result["metrics"]
    # decoding processes (as on a cluster's GPU pod) give the same figures; the device is part of the key
    workers = run_evaluate_stage(replace(ctx, use_cache=False), tmp_path / "backbone", tmp_path / "workers",
                                 str(tmp_path / "data"), tasks=["knn"], num_workers=2)
    assert not workers["cached"] and workers["metrics"] == result["metrics"]
    # a test set of its own (ImageNet-R's role), of 2 of the 3 classes: scored over them, a cache key of its own
    write_folders(tmp_path / "other", {"dog": (0, 3), "fish": (0, 3)}, seed=1)
    separate = run_evaluate_stage(ctx, tmp_path / "backbone", tmp_path / "separate", str(tmp_path / "data"),
                                  tasks=["knn"], test_uri=str(tmp_path / "other" / "val"))
    assert not separate["cached"]
    assert json.loads((tmp_path / "separate" / "report.json").read_text())["tasks"]["classification"][
        "test_classes"] == 2
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            run_evaluate_stage(ctx, tmp_path / "backbone", tmp_path / "gpu", str(tmp_path / "data"), tasks=["knn"],
                               device="cuda")


def test_no_labelled_images_is_refused_naming_the_parameters(tmp_path: Path) -> None:
    ctx = StageContext(run_root=str(tmp_path / "root"))
    with pytest.raises(ValueError,
                       match="no labelled images for knn, linear and logreg: give the pipeline eval_data_uri"):
        run_evaluate_stage(ctx, tmp_path / "backbone", tmp_path / "out", "", tasks=["knn"])


def test_a_rerun_after_a_lost_task_resumes_the_feature_pass(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The task dies in its feature pass (a fault injected after the second part: a lost pod
    here); the rerun loads the two saved parts, makes the rest, reports what an unbroken run
    reports, and removes the parts."""
    import evaluators.classification as classification
    import evaluators.suite as suite
    from evaluators.feature_parts import FeatureParts

    write_folders(tmp_path / "data", {"cat": (8, 3), "dog": (8, 3), "fish": (8, 3)})
    torch.manual_seed(0)
    (tmp_path / "backbone").mkdir()
    save_backbone(build_vit("vit_small", patch_size=14, embed_dim=32, depth=2, num_heads=2, img_size=56,
                            layerscale_init=1.0), str(tmp_path / "backbone" / "backbone.safetensors"))
    monkeypatch.setattr(suite, "FeatureParts", lambda *args: FeatureParts(*args, rows=5))  # 24 train rows: 5 parts
    made = classification.FolderImages._part
    calls: list[int] = []
    lost = [False]

    def dies_after_two(self, *args):
        calls.append(1)
        if len(calls) == 3 and not lost[0]:
            lost[0] = True
            raise RuntimeError("pod lost")
        return made(self, *args)

    ctx = StageContext(run_root=str(tmp_path / "root"), use_cache=False)
    monkeypatch.setattr(classification.FolderImages, "_part", dies_after_two)
    with pytest.raises(RuntimeError, match="pod lost"):
        run_evaluate_stage(ctx, tmp_path / "backbone", tmp_path / "out", str(tmp_path / "data"), tasks=["linear"])
    work = tmp_path / "root" / "work" / "evaluate"
    assert len(list(work.glob("*/classification/train/part-*.safetensors"))) == 2
    calls.clear()
    resumed = run_evaluate_stage(ctx, tmp_path / "backbone", tmp_path / "out", str(tmp_path / "data"),
                                 tasks=["linear"])
    assert len(calls) == 3 + 2  # train's last 3 parts, test's 2: not the 2 saved
    assert not list(work.iterdir())  # removed with the report written
    monkeypatch.setattr(classification.FolderImages, "_part", made)
    unbroken = run_evaluate_stage(replace(ctx, run_root=str(tmp_path / "other")), tmp_path / "backbone",
                                  tmp_path / "unbroken", str(tmp_path / "data"), tasks=["linear"])
    assert resumed["metrics"] == unbroken["metrics"]


def test_the_stage_runs_the_benchmarks_on_real_data_sets(tmp_path: Path) -> None:
    """``retrieval_data``, ``video_data``, ``image_size``, ``precision`` reach the suite from the
    stage (the pipelines' evaluate ran on synthetic sets only): the stage reports what the suite
    reports on the same weights and data, and they key its cache; ``seg_data`` and ``depth_data``
    reach its check of their form."""
    from evaluators.suite import SuiteConfig, run_suite
    from evaluators.video import make_videos
    from tests.evaluators.test_retrieval import write_revisited
    from tests.evaluators.test_video import write_folders
    from trainer.models.hub import load_backbone

    write_revisited(tmp_path / "oxford")
    torch.manual_seed(0)
    (tmp_path / "backbone").mkdir()
    save_backbone(build_vit("vit_small", patch_size=14, embed_dim=32, depth=2, num_heads=2, img_size=56,
                            layerscale_init=1.0), str(tmp_path / "backbone" / "backbone.safetensors"))
    oxford = f"roxford5k:{tmp_path / 'oxford'}"
    ctx = StageContext(run_root=str(tmp_path / "root"))
    result = run_evaluate_stage(ctx, tmp_path / "backbone", tmp_path / "out", "", tasks=["retrieval"],
                                retrieval_data=oxford, image_size=56)
    backbone = load_backbone(str(tmp_path / "backbone" / "backbone.safetensors"), "safetensors").eval()
    expected = run_suite(backbone, SuiteConfig(tasks=("retrieval",), retrieval_data=oxford, image_size=56))
    assert result["metrics"] == pytest.approx(expected["metrics"], abs=1e-6)
    for changed in ({"image_size": 42}, {"precision": "bf16"}):
        again = run_evaluate_stage(ctx, tmp_path / "backbone", tmp_path / "again", "", tasks=["retrieval"],
                                   **{"retrieval_data": oxford, "image_size": 56, **changed})
        assert not again["cached"] and again["metrics"].keys() == result["metrics"].keys()
    for split, seed in (("train", 0), ("val", 1)):
        write_folders(tmp_path / "videos" / split, *make_videos(2, 4, 64, seed))
    videos = run_evaluate_stage(ctx, tmp_path / "backbone", tmp_path / "video", "", tasks=["video"],
                                video_data=str(tmp_path / "videos"), image_size=56)
    expected = run_suite(backbone, SuiteConfig(tasks=("video",), video_data=str(tmp_path / "videos"), image_size=56))
    assert videos["metrics"] == pytest.approx(expected["metrics"], abs=1e-6) and "video_top1" in videos["metrics"]
    for name, given in (("seg_data", "coco:/x"), ("depth_data", "diode:/x")):
        with pytest.raises(ValueError, match=f"{name} = '{given}'; give <data set>:<root>"):
            run_evaluate_stage(ctx, tmp_path / "backbone", tmp_path / "bad", "", tasks=["seg"], **{name: given})


def test_the_dense_heads_train_as_long_as_the_stage_is_told(tmp_path: Path) -> None:
    """``seg_steps``, ``depth_steps`` and ``depth_head`` reach the suite and key the cache; a bad one is
    refused."""
    torch.manual_seed(0)
    (tmp_path / "backbone").mkdir()
    save_backbone(build_vit("vit_small", patch_size=14, embed_dim=32, depth=2, num_heads=2, img_size=56,
                            layerscale_init=1.0), str(tmp_path / "backbone" / "backbone.safetensors"))
    ctx = StageContext(run_root=str(tmp_path / "root"))
    run_evaluate_stage(ctx, tmp_path / "backbone", tmp_path / "out", "", tasks=["seg", "depth"], seg_steps=2,
                       depth_steps=3)
    config = json.loads((tmp_path / "out" / "report.json").read_text())["config"]
    assert (config["seg_head"]["steps"], config["depth_head"]["steps"]) == (2, 3)
    again = run_evaluate_stage(ctx, tmp_path / "backbone", tmp_path / "again", "", tasks=["seg", "depth"],
                               seg_steps=2, depth_steps=4)
    assert not again["cached"]
    assert json.loads((tmp_path / "again" / "report.json").read_text())["config"]["depth_head"]["steps"] == 4
    with pytest.raises(ValueError, match="the DPT depth head reads 4 blocks; this backbone has 2"):
        run_evaluate_stage(ctx, tmp_path / "backbone", tmp_path / "dpt", "", tasks=["depth"], depth_head="dpt")
    save_backbone(build_vit("vit_small", patch_size=14, embed_dim=32, depth=4, num_heads=2, img_size=56,
                            layerscale_init=1.0), str(tmp_path / "backbone" / "backbone.safetensors"))
    dpt = run_evaluate_stage(ctx, tmp_path / "backbone", tmp_path / "dpt", "", tasks=["depth"], depth_steps=3,
                             depth_head="dpt")
    assert not dpt["cached"] and json.loads((tmp_path / "dpt" / "report.json").read_text())["config"][
        "depth_head_kind"] == "dpt"
    with pytest.raises(ValueError, match="unknown depth head 'unet'; allowed: linear, dpt"):
        run_evaluate_stage(ctx, tmp_path / "backbone", tmp_path / "bad", "", tasks=["depth"], depth_head="unet")
    with pytest.raises(ValueError, match="steps and batch_size must be >= 1"):
        run_evaluate_stage(ctx, tmp_path / "backbone", tmp_path / "bad", "", tasks=["seg"], seg_steps=-1)


def test_eval_options_reach_the_suite_key_the_cache_and_are_recorded(tmp_path: Path) -> None:
    """``options`` (the pipelines' ``eval_options``) set the suite's other settings: the stage
    reports what the suite reports with them set on the same weights, a change of one reruns it
    and MLflow holds each as ``option.<name>``; a setting the stage has an input for is refused
    naming the pipeline parameter, before anything is cached."""
    from mlflow.tracking import MlflowClient

    from dinoflow.tracking import default_tracking_uri
    from evaluators.suite import SuiteConfig, run_suite
    from trainer.models.hub import load_backbone

    torch.manual_seed(0)
    (tmp_path / "backbone").mkdir()
    save_backbone(build_vit("vit_small", patch_size=14, embed_dim=32, depth=2, num_heads=2, img_size=56,
                            layerscale_init=1.0), str(tmp_path / "backbone" / "backbone.safetensors"))
    tracking = default_tracking_uri(str(tmp_path / "root"))
    ctx = StageContext(run_root=str(tmp_path / "root"), tracking_uri=tracking)
    options = {"retrieval_scenes": 6, "scene_size": 28, "seed": 3}
    result = run_evaluate_stage(ctx, tmp_path / "backbone", tmp_path / "out", "", tasks=["retrieval"],
                                options=options)
    backbone = load_backbone(str(tmp_path / "backbone" / "backbone.safetensors"), "safetensors").eval()
    expected = run_suite(backbone, SuiteConfig(tasks=("retrieval",), **options))
    assert result["metrics"] == pytest.approx(expected["metrics"], abs=1e-6)
    default = run_suite(backbone, SuiteConfig(tasks=("retrieval",)))
    assert result["metrics"] != pytest.approx(default["metrics"], abs=1e-6)  # the options changed the work
    config = json.loads((tmp_path / "out" / "report.json").read_text())["config"]
    assert {name: config[name] for name in options} == options
    again = run_evaluate_stage(ctx, tmp_path / "backbone", tmp_path / "again", "", tasks=["retrieval"],
                               options={**options, "seed": 4})
    assert not again["cached"]
    same = run_evaluate_stage(ctx, tmp_path / "backbone", tmp_path / "same", "", tasks=["retrieval"],
                              options={"seed": 3, "scene_size": 28.0, "retrieval_scenes": 6.0})  # as KFP passes them
    assert same["cached"]  # the same settings: their order and a whole float for an int aside
    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("dinoflow").experiment_id])
    recorded = [run.data.params for run in runs if run.data.params.get("option.seed") == "4"]
    assert recorded and recorded[0]["option.retrieval_scenes"] == "6"
    with pytest.raises(ValueError, match="eval option 'seg_head.steps' has an input of its own: set it by "
                                         "eval_seg_steps"):
        run_evaluate_stage(ctx, tmp_path / "backbone", tmp_path / "bad", "", tasks=["seg"],
                           options={"seg_head.steps": 5})
    assert not (tmp_path / "bad").exists()


def test_the_finegrained_sets_come_through_eval_options(tmp_path: Path) -> None:
    """The task in ``tasks`` and its sets in ``options`` (set after the tasks: the pipelines'
    ``eval_options``): each set's logistic regression reported and drawn; the task without its
    sets refused naming them."""
    write_folders(tmp_path / "cub", {"cat": (8, 3), "dog": (8, 3), "fish": (8, 3)})
    write_folders(tmp_path / "dtd", {"cat": (6, 2), "dog": (6, 2), "fish": (6, 2)}, seed=3)
    torch.manual_seed(0)
    (tmp_path / "backbone").mkdir()
    save_backbone(build_vit("vit_small", patch_size=14, embed_dim=32, depth=2, num_heads=2, img_size=56,
                            layerscale_init=1.0), str(tmp_path / "backbone" / "backbone.safetensors"))
    ctx = StageContext(run_root=str(tmp_path / "root"))
    result = run_evaluate_stage(ctx, tmp_path / "backbone", tmp_path / "out", "", tasks=["finegrained"],
                                image_size=56, options={"finegrained_data": f"{tmp_path / 'cub'},{tmp_path / 'dtd'}"})
    assert {"finegrained_cub_top1", "finegrained_dtd_class_mean", "finegrained_mean_top1"} <= set(result["metrics"])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert list(report["tasks"]["finegrained"]) == ["cub", "dtd"]
    assert (tmp_path / "out" / "finegrained_sweeps.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="the finegrained task needs finegrained_data"):
        run_evaluate_stage(ctx, tmp_path / "backbone", tmp_path / "bad", "", tasks=["finegrained"])
