"""dinoflow export and dinoflow eval, end to end through the command line."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from typer.testing import CliRunner

from dinoflow.storage import Storage
from evaluators.features import labelled_features, to_model_input
from evaluators.report import knn_accuracies
from evaluators.suite import SuiteConfig
from trainer.data.fashion_mnist import load_split
from pipelines.cli import app
from trainer.models.hub import load_backbone, read_weights, save_backbone
from trainer.models.vit import build_vit


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = build_vit("vit_small", num_register_tokens=4, img_size=28, patch_size=7, embed_dim=64, depth=2,
                      num_heads=4, layerscale_init=1.0)
    path = tmp_path / "backbone.safetensors"
    save_backbone(model, str(path))
    return path


def test_export_to_every_format(weights: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    model = load_backbone(str(weights), "safetensors")
    for export_format in ("hf", "onnx", "safetensors"):
        out = tmp_path / export_format
        result = runner.invoke(app, ["export", "--weights", str(weights), "--format", export_format,
                                     "--out", str(out), "--height", "28", "--width", "42"])
        assert result.exit_code == 0, result.output
    state, arch = read_weights(str(tmp_path / "hf"), "hf", Storage())
    assert arch["num_register_tokens"] == 4 and set(state) == set(model.state_dict())
    images = torch.randn(1, 3, 28, 42)
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    cls = session.run(["cls_token"], {session.get_inputs()[0].name: images.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(cls, model(images).numpy(), atol=1e-4)
    again = load_backbone(str(tmp_path / "safetensors" / "backbone.safetensors"), "safetensors")
    assert again.arch_kwargs == model.arch_kwargs
    refused = runner.invoke(app, ["export", "--weights", str(weights), "--format", "hf", "--out", str(tmp_path / "hf")])
    assert refused.exit_code == 2 and "is not empty" in refused.stderr
    bad = runner.invoke(app, ["export", "--weights", str(weights), "--format", "coreml", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "allowed: hf, onnx, safetensors" in bad.stderr


def fashion_features(weights: Path, train: int, test: int) -> list[torch.Tensor]:
    """The final CLS features and labels of Fashion-MNIST's first ``train`` and ``test`` images, as
    the library makes them: train_x, train_y, test_x, test_y."""
    model = load_backbone(str(weights), "safetensors")
    features = []
    for split, count in (("train", train), ("test", test)):
        data = load_split(Storage(), "/usr/share/datasets/fashion-mnist", split)
        features += [labelled_features(model, torch.from_numpy(data.images[:count]), 7),
                     torch.from_numpy(data.labels[:count])]
    return features


def test_eval_knn_matches_the_library(weights: Path, tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["eval", "knn", "--weights", str(weights), "--train-limit", "500",
                                      "--test-limit", "100", "--out", str(report_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert 0.0 <= report["metrics"]["knn_top1_k20"] <= 1.0 and "linear_top1" not in report["metrics"]
    features = fashion_features(weights, 500, 100)
    assert knn_accuracies(*features, ks=(20,))["k20"] == report["metrics"]["knn_top1_k20"]
    assert to_model_input(torch.zeros(1, 28, 28, dtype=torch.uint8), patch_size=7).shape == (1, 3, 28, 28)


def test_eval_logreg_is_the_librarys_sweep_on_the_cls_features(weights: Path, tmp_path: Path) -> None:
    from evaluators.logreg import LogRegConfig, logistic_regression

    report_path = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["eval", "logreg", "--weights", str(weights), "--train-limit", "400",
                                      "--test-limit", "100", "--out", str(report_path)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(report_path.read_text())["metrics"]
    want = logistic_regression(*fashion_features(weights, 400, 100), LogRegConfig(), num_classes=10)
    assert (metrics["logreg_top1"], metrics["logreg_best_c"]) == (want.test_accuracy, want.best_c)
    assert "linear_top1" not in metrics


def test_eval_rejects_bad_input(weights: Path) -> None:
    runner = CliRunner()
    unknown = runner.invoke(app, ["eval", "svm", "--weights", str(weights)])
    assert "allowed: knn, linear, logreg, video, suite" in unknown.stderr
    bad_task = runner.invoke(app, ["eval", "suite", "--weights", str(weights), "--tasks", "knn,segm"])
    assert bad_task.exit_code == 2 and "unknown tasks ['segm']" in bad_task.stderr
    missing = runner.invoke(app, ["eval", "knn", "--weights", str(weights.parent / "nope.safetensors")])
    assert missing.exit_code == 2 and "nope.safetensors" in missing.stderr


def test_eval_options_set_the_suites_other_settings_by_name(weights: Path, tmp_path: Path) -> None:
    """``--option name=value`` (the pipelines' ``eval_options`` names) reads each value as its
    setting's type: the report is the library's with those settings; a setting with a flag of its
    own is refused naming the flag, as are a bad value, a bad name and a pair without ``=``."""
    from evaluators.suite import SuiteConfig, run_suite

    runner = CliRunner()
    given = ["--option", "retrieval_scenes=6", "--option", "scene_size=28", "--option", "seed=3",
             "--option", "temperature=0.1"]
    result = runner.invoke(app, ["eval", "suite", "--weights", str(weights), "--tasks", "retrieval",
                                 "--out", str(tmp_path / "report.json"), *given])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert {name: report["config"][name] for name in ("retrieval_scenes", "scene_size", "seed", "temperature")} == {
        "retrieval_scenes": 6, "scene_size": 28, "seed": 3, "temperature": 0.1}
    expected = run_suite(load_backbone(str(weights), "safetensors"),
                         SuiteConfig(tasks=("retrieval",), retrieval_scenes=6, scene_size=28, seed=3))
    assert report["metrics"] == pytest.approx(expected["metrics"], abs=1e-6)
    for option, said in (("video_frames=4", "eval option 'video_frames' has an input of its own: set it by "
                                            "--video-frames"),
                         ("seed=x", "--option 'seed=x': seed takes an int"),
                         ("met_whiten=maybe", "--option 'met_whiten=maybe': met_whiten takes a bool"),
                         ("frames=4", "unknown eval option 'frames'; allowed: "), ("seed", "give name=value")):
        refused = runner.invoke(app, ["eval", "suite", "--weights", str(weights), "--tasks", "retrieval",
                                      "--option", option])
        assert refused.exit_code == 2 and said in refused.stderr, (option, refused.stderr)


def test_attention_draws_the_maps_and_names_the_high_norm_tokens(weights: Path, tmp_path: Path) -> None:
    """Images in, the picture out and its figures as JSON: the same as the library on the same pixels."""
    from PIL import Image

    from evaluators.attention import attention_summary
    from trainer.data.datasets import read_image

    rng = np.random.default_rng(0)
    paths = []
    for index, shape in enumerate([(40, 60, 3), (35, 35, 3)]):
        path = tmp_path / f"image{index}.png"
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(path)
        paths.append(str(path))
    out = tmp_path / "maps" / "attention.png"
    runner = CliRunner()
    result = runner.invoke(app, ["attention", *paths, "--weights", str(weights), "--out", str(out), "--size", "42",
                                 "--factor", "1.2"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert out.read_bytes()[:4] == b"\x89PNG"
    pixels = torch.stack([read_image(Path(p).read_bytes(), 42) for p in paths])
    summary = attention_summary(load_backbone(str(weights), "safetensors").eval(),
                                to_model_input(pixels, patch_size=7), factor=1.2)
    assert printed["high_norm_token_share"] == pytest.approx(summary["metrics"]["high_norm_token_share"])
    assert printed["cls_attention_on_patches"] == pytest.approx(summary["metrics"]["cls_attention_on_patches"])
    flagged = [[list(map(int, rc)) for rc in torch.nonzero(high).tolist()] for high in summary["high_norm"]]
    assert [image["high_norm_tokens"] for image in printed["images"]] == flagged
    assert any(flagged)  # at 1.2 x the median some of a random model's tokens stand out
    shares = [mask.float().mean().item() for mask in summary["masks"]]
    assert [image["attention_mask_share"] for image in printed["images"]] == pytest.approx(shares)
    first = tmp_path / "maps" / "first.png"
    earlier = runner.invoke(app, ["attention", *paths, "--weights", str(weights), "--out", str(first), "--size", "42",
                                  "--block", "0", "--mass", "0.3"])
    assert earlier.exit_code == 0, earlier.output
    summary = attention_summary(load_backbone(str(weights), "safetensors").eval(),
                                to_model_input(pixels, patch_size=7), block=0, mass=0.3)
    assert json.loads(earlier.stdout)["cls_attention_on_patches"] == pytest.approx(
        summary["metrics"]["cls_attention_on_patches"]) != printed["cls_attention_on_patches"]  # not the last's
    assert [image["attention_mask_share"] for image in json.loads(earlier.stdout)["images"]] == pytest.approx(
        [mask.float().mean().item() for mask in summary["masks"]])
    heads = tmp_path / "maps" / "heads.png"
    assert runner.invoke(app, ["attention", *paths, "--weights", str(weights), "--out", str(heads), "--size", "42",
                               "--per-head"]).exit_code == 0
    assert Image.open(heads).size[1] > Image.open(out).size[1]  # a row per head (4) instead of their mean
    for args, message in (([paths[0], "--size", "40"], "not a positive multiple of the patch size 7"),
                          ([str(tmp_path / "missing.png")], "missing.png"),
                          ([str(weights)], "is not a readable image"),
                          ([paths[0], "--factor", "1"], "factor must be > 1"),
                          ([paths[0], "--block", "9"], "block 9 out of range"),
                          ([paths[0], "--mass", "1"], "mass must be in (0, 1)")):
        bad = runner.invoke(app, ["attention", *args, "--weights", str(weights), "--out", str(tmp_path / "x.png")])
        assert bad.exit_code == 2 and message in bad.stderr, bad.output
    assert not (tmp_path / "x.png").exists()
    wrong = runner.invoke(app, ["attention", paths[0], "--weights", str(weights), "--out", str(tmp_path / "x.jpg")])
    assert wrong.exit_code == 2 and "must name a .png file" in wrong.stderr


@pytest.mark.parametrize("command", [["pretrain", "--config", "vits14"], ["distill", "device=cuda"]])
def test_a_gpu_run_on_a_machine_without_one_is_refused_in_one_line(command: list[str], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU recipes name ``device: cuda``; on a CPU-only machine the run stopped deep in its
    first step with torch's assertion, after creating its MLflow run and folder."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also where a GPU is: the refusal is tested
    result = CliRunner().invoke(app, [*command, f"out={tmp_path / 'run'}"])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: device = 'cuda', but this machine has no CUDA device")
    assert "set device=cpu" in result.stderr and not (tmp_path / "run").exists()


def test_init_weights_that_do_not_fit_the_recipe_are_named_in_one_line(weights: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["pretrain", "--config", "tiny", f"out={tmp_path / 'run'}", "max_steps=1",
                                      "model.embed_dim=32", f"init_weights={weights}"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.stderr  # (MLflow's own INFO lines come before: its store is made first)
    assert result.stderr.strip().splitlines()[-1:] == [
        f"error: init weights {weights} do not fit the recipe's backbone: model.embed_dim = 32 (the weights: 64); "
        "model.depth = 6 (the weights: 2); "
        "model.num_register_tokens = 0 (the weights: 4); set these (or model.arch) to the weights' values"]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_every_weights_command_takes_each_layout_from_the_path(tmp_path: Path) -> None:
    """eval, attention, curate, export and index build read Meta's released .pth, a run folder or a
    Hugging Face folder without --source, as the same backbone (they took only safetensors)."""
    from PIL import Image

    from trainer.models.hf import export_hf
    from trainer.models.hub import convert_official_state_dict

    torch.manual_seed(0)  # heads of 64 channels, as Meta's are (a .pth does not say)
    model = build_vit("vit_small", num_register_tokens=4, img_size=28, patch_size=7, embed_dim=128, depth=2,
                      num_heads=2, layerscale_init=1.0).eval()
    torch.save(model.state_dict(), tmp_path / "released.pth")  # Meta's layout: our keys are theirs
    assert set(convert_official_state_dict(torch.load(tmp_path / "released.pth"))) == set(model.state_dict())
    (tmp_path / "run").mkdir()
    save_backbone(model, str(tmp_path / "run" / "backbone.safetensors"))
    export_hf(model, tmp_path / "hf")
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(image)
    runner = CliRunner()
    figures = {}
    for name, layout in (("released.pth", "official"), ("run", "safetensors"), ("hf", "hf")):
        uri = str(tmp_path / name)
        result = runner.invoke(app, ["attention", str(image), "--weights", uri, "--out", str(tmp_path / f"{name}.png"),
                                     "--size", "28"])
        assert result.exit_code == 0, result.output
        assert f"({layout}, from the path; --source to choose)" in result.stderr
        figures[name] = json.loads(result.stdout)["cls_attention_on_patches"]
        exported = runner.invoke(app, ["export", "--weights", uri, "--format", "safetensors",
                                       "--out", str(tmp_path / f"export-{name}")])
        assert exported.exit_code == 0, exported.output
        again = load_backbone(str(tmp_path / f"export-{name}" / "backbone.safetensors"), "safetensors")
        assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())
    assert figures["released.pth"] == pytest.approx(figures["run"]) == pytest.approx(figures["hf"], abs=1e-5)
    evaluated = runner.invoke(app, ["eval", "knn", "--weights", str(tmp_path / "released.pth"), "--train-limit",
                                    "100", "--test-limit", "50"])
    assert evaluated.exit_code == 0, evaluated.output
    curated = runner.invoke(app, ["curate", "--pool", str(tmp_path / "pool-missing"), "--out", str(tmp_path / "c"),
                                  "--weights", str(tmp_path / "released.pth"), "--no-track"])
    assert "(official, from the path" in curated.stderr  # the weights loaded; the pool is the bad input
    named = runner.invoke(app, ["eval", "knn", "--weights", str(tmp_path / "run" / "backbone.safetensors"),
                                "--source", "official"])
    assert named.exit_code == 2 and "this is a safetensors file: give source safetensors, or auto" in named.stderr


@pytest.mark.parametrize("command, message", [
    (["curate", "--pool", "{tmp}/empty", "--out", "{tmp}/curated", "--no-track"], "no images under {tmp}/empty"),
    (["curate", "--pool", "{tmp}/pool", "--out", "{tmp}/curated", "--no-track", "--balance-target", "2",
      "--balance-clusters", "50"], "level 1 asks for 50 clusters of 3 nodes"),
    (["pretrain", "--config", "tiny", "out={tmp}/run", "data.kind=folder", "data.uri={tmp}/empty"],
     "no images under {tmp}/empty"),
    (["distill", "--teacher", "{weights}", "--teacher-source", "backbone", "out={tmp}/run", "data.kind=folder",
      "data.uri={tmp}/empty"], "no images under {tmp}/empty"),
    (["export", "--weights", "{weights}", "--format", "onnx", "--out", "{tmp}/onnx", "--height", "30"],
     "ONNX input size 30x224 must be positive multiples of the patch size 7"),
    (["eval", "knn", "--weights", "{tmp}/empty"], "{tmp}/empty is a folder without backbone.safetensors"),
    (["serve", "--model", "{tmp}/pool"], "{tmp}/pool is a folder without backbone.safetensors"),
])
def test_bad_input_is_said_in_one_line(command: list[str], message: str, weights: Path, tmp_path: Path) -> None:
    """Bad input met once a command runs (a folder without images, weights where there are none, an
    ONNX size the patches do not tile) ends in one `error:` line with status 2, not a traceback."""
    from PIL import Image

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    (tmp_path / "pool").mkdir()
    for index in range(3):
        Image.fromarray(np.full((16, 16, 3), 80 * index, dtype=np.uint8)).save(tmp_path / "pool" / f"{index}.png")
    fill = {"tmp": str(tmp_path), "weights": str(weights)}
    result = CliRunner().invoke(app, [part.format(**fill) for part in command])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {message.format(**fill)}"), result.stderr
    assert not (tmp_path / "onnx").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_eval_scores_class_folders(weights: Path, tmp_path: Path) -> None:
    """`dinoflow eval --data-uri` naming train/ and val/ class folders, decoded by a worker process."""
    from tests.evaluators.test_classification import CLASSES, write_folders

    write_folders(tmp_path / "data", {"cat": (12, 4), "dog": (12, 4), "fish": (12, 4)})
    result = CliRunner().invoke(app, ["eval", "knn", "--weights", str(weights), "--data-uri", str(tmp_path / "data"),
                                      "--image-size", "28", "--num-workers", "1", "--k", "5"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["tasks"]["classification"]["classes"] == list(CLASSES)
    assert report["metrics"]["knn_top1_k5"] > 0.9 and report["config"]["image_size"] == 28
    # --work-dir: the pass saved in parts under the folder; the same command again reads it back, same report
    args = ["eval", "knn", "--weights", str(weights), "--data-uri", str(tmp_path / "data"), "--image-size", "28",
            "--k", "5", "--work-dir", str(tmp_path / "work")]
    saved, again = (CliRunner().invoke(app, args) for _ in range(2))
    assert saved.exit_code == again.exit_code == 0, saved.output + again.output
    assert json.loads(saved.stdout)["metrics"] == json.loads(again.stdout)["metrics"] == report["metrics"]
    assert (tmp_path / "work" / "classification" / "identity.json").exists()
    # --test-uri: a test set of its own (as ImageNet-R beside ImageNet), of 2 classes: scored over them
    write_folders(tmp_path / "other", {"dog": (0, 3), "fish": (0, 3)}, seed=1)
    separate = CliRunner().invoke(app, ["eval", "knn", "--weights", str(weights), "--data-uri", str(tmp_path / "data"),
                                        "--test-uri", str(tmp_path / "other" / "val"), "--image-size", "28",
                                        "--k", "5"])
    assert separate.exit_code == 0, separate.output
    assert json.loads(separate.stdout)["tasks"]["classification"]["test_classes"] == 2
    assert (tmp_path / "work" / "classification" / "train" / "part-00000.safetensors").exists()
    bad = CliRunner().invoke(app, ["eval", "knn", "--weights", str(weights), "--device", "tpu"])
    assert bad.exit_code == 2 and bad.stderr.strip().splitlines()[-1] == (
        "error: unknown device 'tpu'; allowed: cpu, cuda, cuda:<index>")


def test_eval_records_its_run_in_mlflow(weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With MLFLOW_TRACKING_URI set, a benchmark from the command line is an MLflow run like a
    pipeline's evaluate stage: its settings, metrics, report and pictures (it was printed only)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    result = CliRunner().invoke(app, ["eval", "knn", "--weights", str(weights), "--train-limit", "200",
                                      "--test-limit", "50", "--pictures", str(tmp_path / "pictures"),
                                      "--experiment", "benchmarks"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("benchmarks").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["weights"] == str(weights)
    assert run.data.metrics["knn_top1_k20"] == pytest.approx(printed["metrics"]["knn_top1_k20"])
    assert run.data.tags["dinoflow.stage"] == "evaluate"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"report.json", "attention_maps.png",
                                                                        "confusion_knn.png"}
    assert (tmp_path / "pictures" / "attention_maps.png").read_bytes()[:4] == b"\x89PNG"
    assert f"MLflow run {run.info.run_id} in {uri}" in result.stderr


def test_eval_suite_runs_segmentation_and_depth_on_real_layouts(weights: Path, tmp_path: Path) -> None:
    from tests.evaluators.test_dense_datasets import write_halves

    voc, nyu = write_halves(tmp_path)
    result = CliRunner().invoke(app, ["eval", "suite", "--weights", str(weights), "--tasks", "seg,depth",
                                      "--seg-data", f"voc:{voc}", "--depth-data", f"nyu:{nyu}", "--image-size", "28",
                                      "--test-limit", "3", "--dense-cache-gib", "0.5", "--no-dense-augment"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {"seg_miou", "depth_rmse"} <= set(report["metrics"])
    assert report["config"]["seg_data"] == f"voc:{voc}" and report["config"]["dense_cache_gib"] == 0.5
    assert report["config"]["dense_augment"] is False
    defaults = SuiteConfig(tasks=("seg",))  # the options' defaults are the suite's
    assert (report["config"]["seg_head"], report["config"]["depth_head"]) == (asdict(defaults.seg_head),
                                                                              asdict(defaults.depth_head))
    assert sum(key.startswith("iou_") for key in report["tasks"]["seg"]) == 21  # VOC's classes
    plus_ms = CliRunner().invoke(app, ["eval", "suite", "--weights", str(weights), "--tasks", "seg",
                                       "--seg-data", f"voc:{voc}", "--image-size", "28", "--test-limit", "3", "--ms",
                                       "--seg-steps", "5", "--head-batch-size", "4", "--work-dir", str(tmp_path / "w")])
    assert plus_ms.exit_code == 0, plus_ms.output
    config = json.loads(plus_ms.stdout)["config"]
    assert (config["layers"], config["multiscale"], config["dense_augment"]) == (2, True, True)  # 2 blocks
    assert (config["seg_head"]["steps"], config["seg_head"]["batch_size"]) == (5, 4)
    assert (tmp_path / "w" / "seg-head" / "head_state.pt").is_file()  # the head's training, saved at its end
    assert 0 < json.loads(plus_ms.stdout)["metrics"]["seg_miou"] <= 1
    from tests.evaluators.test_retrieval import write_revisited

    write_revisited(tmp_path / "rparis", "rparis6k")
    oxford = CliRunner().invoke(app, ["eval", "suite", "--weights", str(weights), "--tasks", "retrieval",
                                      "--retrieval-data", f"rparis6k:{tmp_path / 'rparis'}", "--image-size", "56"])
    assert oxford.exit_code == 0, oxford.output
    assert 0 < json.loads(oxford.stdout)["metrics"]["retrieval_map_medium"] <= 1
    bad = CliRunner().invoke(app, ["eval", "suite", "--weights", str(weights), "--tasks", "seg",
                                   "--seg-data", str(voc)])
    assert bad.exit_code == 2 and "give <data set>:<root>" in bad.stderr
